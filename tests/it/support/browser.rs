//! A real browser as a child process, and the origin it talks to: headless Chromium (Debian's
//! `chromium` package, which `.ci/run` installs) in its own process group with a fresh profile,
//! killed and cleaned up on drop, optionally driven over the DevTools protocol (`devtools.rs`);
//! and a backend that serves one page, a WebSocket echo at `/ws`, and collects what the page
//! reports through `fetch("/report?...")`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::{within, WAIT};

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium showing one URL. Dropping it kills the whole process group (browser,
/// zygotes, renderers, network service) and removes its folder: profile, home, log.
pub struct Chromium {
    child: Child,
    dir: PathBuf,
}

impl Chromium {
    pub fn installed() -> bool {
        Path::new(CHROMIUM).is_file()
    }

    /// Starts Chromium on `url`. Certificate errors are ignored (the test CA is not in its
    /// store); QUIC and background services are off, and every name but `localhost` fails to
    /// resolve (IP literals too: pages use `localhost`), so the only traffic is the page's.
    pub fn open(url: &str) -> Chromium {
        Chromium::launch(url, &[])
    }

    /// Starts Chromium on `about:blank` with the DevTools protocol on a loopback port of its
    /// choosing, which `devtools_endpoint` reads once it listens.
    pub fn with_devtools() -> Chromium {
        Chromium::launch("about:blank", &["--remote-debugging-port=0"])
    }

    fn launch(url: &str, extra: &[&str]) -> Chromium {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("wsgate-it-chromium-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Chromium folder");
        let log = File::create(dir.join("chromium.log")).expect("create the Chromium log");
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
                // Loopback only: it still asks Google for the time, updates and accounts.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(url)
            // Everything it writes outside the profile (crash reports, the NSS database, its
            // singleton socket) goes under the same folder, not into the user's home or /tmp.
            .env("HOME", &dir)
            .env("TMPDIR", &dir)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_DATA_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own group, so that drop can kill the helpers it forks along with it.
            .process_group(0)
            .spawn()
            .expect("start chromium");
        Chromium { child, dir }
    }

    /// Its exit status, if it has exited (it should not: headless Chromium stays up).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on chromium")
    }

    /// The end of what it wrote to stderr, without its D-Bus complaints (there is no bus).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    /// The file its stderr goes to (removed on drop, with the rest of its folder).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("chromium.log")
    }

    /// The browser's DevTools WebSocket URL, once `--remote-debugging-port=0` has bound: it
    /// writes the port and the browser target's path to `DevToolsActivePort` in its profile.
    pub fn devtools_endpoint(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("profile/DevToolsActivePort")).ok()?;
        let mut lines = text.lines();
        let port: u16 = lines.next()?.trim().parse().ok()?;
        // Both lines, or the file is still being written.
        let path = lines.next()?.trim();
        path.starts_with("/devtools/browser/")
            .then(|| format!("ws://127.0.0.1:{port}{path}"))
    }
}

/// The end of a Chromium log, without its D-Bus complaints (there is no bus).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The group id is the browser's pid, which stays ours until `wait` reaps it.
        let group = format!("-{}", self.child.id());
        let killed = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        if !killed.is_ok_and(|s| s.success()) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `fetch("/report?...")` from the page: its query, decoded.
#[derive(Debug)]
pub struct Report(pub HashMap<String, String>);

impl Report {
    pub fn get(&self, name: &str) -> &str {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("report has no {name:?}: {self:?}"))
    }
}

/// Serves `page` at `/`, echoes WebSocket messages at `/ws`, takes reports at `/report`, and
/// answers 404 to anything else (Chromium asks for `/favicon.ico`).
pub struct PageBackend {
    pub addr: SocketAddr,
    reports: mpsc::UnboundedReceiver<Report>,
}

impl PageBackend {
    pub async fn start(page: &'static str) -> PageBackend {
        let listener = within(WAIT, TcpListener::bind("127.0.0.1:0"))
            .await
            .expect("backend binds");
        let addr = listener.local_addr().expect("backend address");
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(page, tx.clone(), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        PageBackend { addr, reports }
    }

    /// The next report, waiting at most `limit`, or `None` at `limit`.
    pub async fn next_report(&mut self, limit: Duration) -> Option<Report> {
        tokio::time::timeout(limit, self.reports.recv())
            .await
            .ok()
            .flatten()
    }
}

async fn handle(
    page: &'static str,
    reports: mpsc::UnboundedSender<Report>,
    mut request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response
    };
    match request.uri().path() {
        "/" => {
            let mut response = reply(StatusCode::OK, page);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            Ok(response)
        }
        "/report" => {
            let query = request.uri().query().unwrap_or("");
            let _ = reports.send(Report(decode_query(query)));
            Ok(reply(StatusCode::NO_CONTENT, ""))
        }
        "/ws" => {
            let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY) else {
                return Ok(reply(StatusCode::BAD_REQUEST, "WebSocket only\n"));
            };
            let accept = derive_accept_key(key.as_bytes());
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                // Until the stream ends, so that tungstenite answers the page's close frame.
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
            let mut response = reply(StatusCode::SWITCHING_PROTOCOLS, "");
            let headers = response.headers_mut();
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(
                SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept).expect("accept key is a header value"),
            );
            Ok(response)
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, "not found\n")),
    }
}

/// `application/x-www-form-urlencoded`, as `URLSearchParams` writes it.
fn decode_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(name), decode_component(value))
        })
        .collect()
}

fn decode_component(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
