//! The real `wsgate` binary as a child process: config files under the temp dir, runs bounded
//! by a deadline, stderr read line by line on a thread, signals sent with `kill`.
//!
//! Waiting on a process has no event to await from std, so these waits poll `try_wait` with a
//! short sleep, bounded in count and time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
const POLL: Duration = Duration::from_millis(10);

/// A file under the temp dir with a name no other test (or test run) uses; removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("wsgate-it-{}-{n}-{name}.toml", std::process::id()));
        std::fs::write(&path, contents).expect("write a temp config");
        TempFile { path }
    }

    pub fn display(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    quiet(command)
}

fn quiet(mut command: Command) -> Command {
    command
        .env_remove("RUST_LOG")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        // Left to wsgate to see that stderr is a pipe: every log line a test reads proves it.
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn read_all(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut text);
        text
    })
}

/// Waits for `child` to exit, killing it (and panicking) after `limit`.
fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    let max_polls = limit.as_millis() / POLL.as_millis() + 1;
    for _ in 0..max_polls {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("wsgate did not exit within {limit:?}");
}

/// Runs `wsgate ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    let mut child = command(args).spawn().expect("spawn wsgate");
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, WAIT);
    Output {
        status,
        stdout: stdout.join().unwrap().into_bytes(),
        stderr: stderr.join().unwrap().into_bytes(),
    }
}

/// `wsgate --config PATH` (or other arguments) running in the background.
pub struct Gateway {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stderr line read so far, for failure messages.
    pub log: Vec<String>,
}

impl Gateway {
    pub fn spawn(config: &Path) -> Gateway {
        Gateway::spawn_with_env(config, &[])
    }

    /// `spawn`, with environment variables set for the process.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> Gateway {
        let config = config.to_str().expect("UTF-8 temp path");
        let mut command = command(&["--config", config]);
        command.envs(env.iter().copied());
        Gateway::start(command)
    }

    /// `wsgate ARGS` in the background, e.g. `proxy --from 127.0.0.1:0 --to ...`.
    pub fn spawn_args(args: &[&str]) -> Gateway {
        Gateway::start(command(args))
    }

    /// `spawn`, started with an open-files soft limit of `soft` (as a container runtime does).
    pub fn spawn_with_soft_nofile(config: &Path, soft: u64) -> Gateway {
        let config = config.to_str().expect("UTF-8 temp path");
        let mut command = command(&["--config", config]);
        // SAFETY: the hook runs in the forked child before exec and calls only getrlimit and
        // setrlimit, which are async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(move || {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = soft.min(limit.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Gateway::start(command)
    }

    /// Starts wsgate the way systemd's socket activation does: `socket` as fd 3,
    /// `LISTEN_FDS=1`, `LISTEN_PID` its own pid and, if given, `LISTEN_FDNAMES`.
    pub fn spawn_with_socket(
        config: &Path,
        socket: &impl AsRawFd,
        fdname: Option<&str>,
    ) -> Gateway {
        let config = config.to_str().expect("UTF-8 temp path");
        // The pid is known only in the child: the shell exports its own, which `exec` keeps.
        let mut command = Command::new("sh");
        command
            .args(["-c", r#"export LISTEN_PID=$$; exec "$0" "$@""#, BIN])
            .args(["--config", config]);
        let mut command = quiet(command);
        command.env("LISTEN_FDS", "1");
        if let Some(name) = fdname {
            command.env("LISTEN_FDNAMES", name);
        }
        let fd = socket.as_raw_fd();
        // SAFETY: the hook runs in the forked child before exec and calls only dup2 and
        // fcntl, which are async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(move || place_at_fd_3(fd));
        }
        Gateway::start(command)
    }

    fn start(mut command: Command) -> Gateway {
        let mut child = command.spawn().expect("spawn wsgate");
        let _ = read_all(child.stdout.take().unwrap());
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Gateway {
            child,
            lines,
            log: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first stderr line (from now on) containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no stderr line containing {needle:?}; log so far:\n{}",
            self.log.join("\n")
        );
    }

    /// The address the `listening` log line announces (the config binds port 0).
    pub fn listening_address(&mut self) -> SocketAddr {
        let line = self.wait_for_line("listening");
        let address = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("address="))
            .unwrap_or_else(|| panic!("no address= in {line:?}"));
        address.parse().expect("a socket address")
    }

    /// Whether the process has installed handlers for SIGTERM and SIGINT (`SigCgt` in
    /// /proc/PID/status); `None` where there is no /proc.
    pub fn catches_term_and_int(&self) -> Option<bool> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
        let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
        // Bit n-1 stands for signal n: SIGINT is 2, SIGTERM is 15.
        let wanted = (1 << (2 - 1)) | (1 << (15 - 1));
        Some(mask & wanted == wanted)
    }

    /// Waits until SIGTERM and SIGINT are caught rather than fatal (bounded polling; returns
    /// at once where /proc is missing).
    pub fn wait_for_signal_handlers(&self) {
        let deadline = Instant::now() + WAIT;
        for _ in 0..2_000 {
            if self.catches_term_and_int() != Some(false) {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        panic!("wsgate never installed its SIGTERM/SIGINT handlers");
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Whether the process is still running (not yet exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_bounded(&mut self.child, limit)
    }
}

/// In a pre_exec hook: makes `fd` the child's fd 3, open across exec (std opens every fd
/// close-on-exec; a dup2'd copy is not).
fn place_at_fd_3(fd: RawFd) -> std::io::Result<()> {
    let placed = if fd == 3 {
        // dup2 onto itself would keep close-on-exec.
        unsafe { libc::fcntl(3, libc::F_SETFD, 0) }
    } else {
        unsafe { libc::dup2(fd, 3) }
    };
    if placed < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls until a TCP connection to `addr` succeeds: bounded in attempts and time.
pub fn wait_until_connectable(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    for _ in 0..2_000 {
        if std::net::TcpStream::connect_timeout(&addr, WAIT).is_ok() {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    panic!("{addr} never accepted a connection");
}

/// A blocking GET on a new connection, with bounded socket timeouts; returns the whole
/// response.
pub fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}
