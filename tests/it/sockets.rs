//! Restarts and upgrades that refuse no connection, through the real binary: a socket passed
//! in by systemd's protocol (socket activation), and two processes sharing an address with
//! SO_REUSEPORT while the first drains.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;

use crate::support::binary::{self, Gateway, TempFile};
use crate::support::WAIT;

fn respond_config(listeners: &str) -> String {
    format!(
        "[log]\nlevel = \"info\"\n\n{listeners}\n\
         [[route]]\nname = \"health\"\npath = \"/healthz\"\nrespond = {{ status = 200, body = \"up\" }}\n"
    )
}

fn assert_up(addr: SocketAddr) {
    let response = binary::get(addr, "/healthz");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nup"), "{response}");
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn stop(mut gateway: Gateway) {
    gateway.wait_for_signal_handlers();
    gateway.signal("TERM");
    let status = gateway.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", gateway.log.join("\n"));
}

#[test]
fn socket_activation_serves_on_an_inherited_socket_without_binding() {
    // Held open here as systemd holds it: binding its address again would be EADDRINUSE.
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let config = TempFile::new(
        "activated",
        &respond_config(&format!(
            "[[listener]]\nname = \"http\"\nbind = \"{addr}\"\n"
        )),
    );
    let mut gateway = Gateway::spawn_with_socket(&config.path, &socket, None);
    let line = gateway.wait_for_line("listening");
    assert_eq!(field(&line, "address"), addr.to_string(), "{line}");
    assert_eq!(field(&line, "inherited"), "true", "{line}");
    assert_up(addr);
    stop(gateway);
}

#[test]
fn socket_activation_matches_a_listener_by_its_fdname() {
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    // A bind wsgate could not do (no such local address): the name alone has to match.
    let config = TempFile::new(
        "activated-by-name",
        &respond_config(
            "[[listener]]\nname = \"web\"\nbind = \"192.0.2.1:80\"\n\n\
             [[listener]]\nname = \"local\"\nbind = \"127.0.0.1:0\"\n",
        ),
    );
    let mut gateway = Gateway::spawn_with_socket(&config.path, &socket, Some("web"));
    let first = gateway.wait_for_line("listening");
    let second = gateway.wait_for_line("listening");
    let (web, local) = if field(&first, "listener") == "web" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(field(&web, "address"), addr.to_string(), "{web}");
    assert_eq!(field(&web, "inherited"), "true", "{web}");
    // The other listener binds as usual.
    assert_eq!(field(&local, "inherited"), "false", "{local}");
    assert_up(addr);
    assert_up(field(&local, "address").parse().unwrap());
    stop(gateway);
}

#[test]
fn socket_activation_refuses_an_fd_that_is_not_a_listening_tcp_socket() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let unlistened = tokio::net::TcpSocket::new_v4().unwrap();
    unlistened.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = TempFile::new(
        "activated-badly",
        &respond_config("[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n"),
    );
    for (mut gateway, problem) in [
        (
            Gateway::spawn_with_socket(&config.path, &udp, None),
            "not a stream socket",
        ),
        (
            Gateway::spawn_with_socket(&config.path, &unlistened, None),
            "listen() was not called on it",
        ),
    ] {
        let line = gateway.wait_for_line("cannot start");
        let expected = format!("socket activation: fd 3 is not a listening TCP socket: {problem}");
        assert!(line.contains(&expected), "{line}");
        assert_eq!(gateway.wait_exit(WAIT).code(), Some(1));
    }
}

/// A backend that takes one request and answers it only when told to.
fn holding_backend() -> (SocketAddr, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut stream, _) = backend.accept().expect("gateway connects");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let _ = seen_tx.send(());
        if released.recv_timeout(WAIT).is_ok() {
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nheld",
            );
        }
    });
    (addr, seen, release)
}

/// Which instance answered (its `respond` body).
fn who(addr: SocketAddr) -> String {
    let response = binary::get(addr, "/who");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    response.rsplit("\r\n\r\n").next().unwrap().to_owned()
}

#[test]
fn reuse_port_lets_a_second_instance_start_on_the_same_address_while_the_first_drains() {
    // A free port for both configs; something else could take it in between (unlikely).
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (backend, request_seen, release) = holding_backend();
    let config = |who: &str| {
        // `stopped accepting` (debug) is logged once the listener's socket is closed.
        format!(
            "[log]\nlevel = \"info,wsgate::listener=debug\"\n\n[timeouts]\ndrain = \"30s\"\n\n\
             [[listener]]\nname = \"http\"\nbind = \"{addr}\"\nreuse_port = true\n\n\
             [[route]]\nname = \"who\"\npath = \"/who\"\nrespond = {{ status = 200, body = \"{who}\" }}\n\n\
             [[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
             [[upstream]]\nname = \"app\"\nservers = [\"{backend}\"]\n"
        )
    };
    let (first_config, second_config) = (
        TempFile::new("reuse-first", &config("first")),
        TempFile::new("reuse-second", &config("second")),
    );
    let mut first = Gateway::spawn(&first_config.path);
    assert_eq!(first.listening_address(), addr);

    // A request in flight at the first, alone on the address so far: its drain waits for it.
    let mut held = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    held.set_read_timeout(Some(WAIT)).unwrap();
    held.write_all(b"GET /held HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    request_seen
        .recv_timeout(WAIT)
        .expect("the held request reached the backend");

    let mut second = Gateway::spawn(&second_config.path);
    assert_eq!(second.listening_address(), addr, "the second bound too");
    // The kernel spreads new connections over both sockets; 200 tries make missing one
    // a 2^-199 chance.
    let (mut by_first, mut by_second) = (0, 0);
    for _ in 0..200 {
        match who(addr).as_str() {
            "first" => by_first += 1,
            "second" => by_second += 1,
            other => panic!("answered by {other:?}"),
        }
        if by_first > 0 && by_second > 0 {
            break;
        }
    }
    assert!(by_first > 0 && by_second > 0, "{by_first} / {by_second}");

    first.wait_for_signal_handlers();
    first.signal("TERM");
    first.wait_for_line("stopped accepting");
    for attempt in 0..20 {
        assert_eq!(
            who(addr),
            "second",
            "request {attempt} after the first closed"
        );
    }
    assert!(
        first.is_running(),
        "the first is still draining its request"
    );

    release.send(()).unwrap();
    let mut response = String::new();
    held.read_to_string(&mut response).unwrap();
    assert!(response.ends_with("\r\n\r\nheld"), "{response}");
    let status = first.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", first.log.join("\n"));
    assert_eq!(who(addr), "second");
    stop(second);
}

/// `Max open files` soft and hard limits of a running process, from /proc.
fn open_files_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

#[test]
fn a_low_open_files_soft_limit_is_raised_to_the_hard_limit() {
    let here = open_files_limits(std::process::id()).expect("/proc/self/limits");
    if here.1 != "unlimited" && here.1.parse::<u64>().is_ok_and(|hard| hard <= 512) {
        eprintln!(
            "SKIP open files test: the hard limit {} leaves nothing to raise",
            here.1
        );
        return;
    }
    let config = TempFile::new(
        "nofile",
        &respond_config("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n"),
    );
    let mut gateway = Gateway::spawn_with_soft_nofile(&config.path, 512);
    assert_up(gateway.listening_address());
    let (soft, hard) = open_files_limits(gateway.pid()).expect("the gateway's limits");
    assert_eq!(soft, hard, "started with a soft limit of 512");
    assert_ne!(soft, "512");
    stop(gateway);
}
