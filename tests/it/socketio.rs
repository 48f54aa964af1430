//! A real socket.io 4 application through wsgate (issue 13): three `node server.js` backends and
//! `node client.js`, both in tests/socketio. A socket.io session is a long-polling handshake, more
//! polling requests carrying its id, then a WebSocket upgrade carrying it too; every one must reach
//! the backend that holds the session, or that backend's peers answer 400 "Session ID unknown".
//! Hashing a query key and the sticky cookie keep a session on one backend, round robin does not.
//! Without Node or tests/socketio/node_modules (`.ci/run` installs both) the tests print
//! `SKIP socket.io test: ...` and pass.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::support::{upstream_config, within, TestGateway, WAIT};

const CLIENTS: usize = 30;
/// client.js's own bound for all its clients: a whole run takes well under a second when it
/// works, and a client that is still waiting after this has failed.
const CLIENT_RUN: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Whether Node and the installed packages are there, printing the skip when they are not.
fn installed() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let missing = if !node.is_ok_and(|status| status.success()) {
        "node is not installed (.ci/run installs nodejs and npm, then runs tests/socketio/install.sh)"
    } else if !app_dir().join("node_modules/.package-lock.json").is_file() {
        // npm writes this file last: a complete install, as tests/socketio/install.sh checks.
        "tests/socketio/node_modules is missing or incomplete (run tests/socketio/install.sh)"
    } else {
        return true;
    };
    // Straight to stderr: the test harness captures `eprintln!`, and a skip must show.
    let _ = writeln!(std::io::stderr(), "SKIP socket.io test: {missing}");
    false
}

/// `node server.js PORT NAME` on 127.0.0.1, killed when dropped.
struct SocketIoBackend {
    child: Child,
}

impl Drop for SocketIoBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Backends named `names` on free loopback ports, each accepting connections on return.
async fn start_backends(names: &'static [&'static str]) -> (Vec<SocketIoBackend>, Vec<SocketAddr>) {
    let start = tokio::task::spawn_blocking(move || {
        // All probes are held until every port is chosen, so that no two backends share one.
        let probes: Vec<TcpListener> = names
            .iter()
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        let addrs: Vec<SocketAddr> = probes.iter().map(|p| p.local_addr().unwrap()).collect();
        drop(probes);
        // Started together, then waited for: node takes a good part of a second to load.
        let mut backends: Vec<SocketIoBackend> = names
            .iter()
            .zip(&addrs)
            .map(|(name, addr)| {
                let child = Command::new("node")
                    .arg("server.js")
                    .arg(addr.port().to_string())
                    .arg(name)
                    .current_dir(app_dir())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("node starts");
                SocketIoBackend { child }
            })
            .collect();
        for (backend, &addr) in backends.iter_mut().zip(&addrs) {
            wait_until_listening(&mut backend.child, addr);
        }
        (backends, addrs)
    });
    within(WAIT + WAIT, start)
        .await
        .expect("the backends start")
}

/// Polls until `addr` accepts a connection, bounded in attempts and time; a backend that exits
/// first (its port taken meanwhile, a broken install) fails at once with its status.
fn wait_until_listening(child: &mut Child, addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    for _ in 0..(WAIT.as_millis() / POLL.as_millis()) {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("socket.io backend on {addr} exited with {status}");
        }
        if TcpStream::connect_timeout(&addr, WAIT).is_ok() {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    panic!("socket.io backend on {addr} never accepted a connection");
}

/// client.js's one line of figures.
#[derive(Debug, Deserialize)]
struct Summary {
    connected: usize,
    upgraded: usize,
    echoed: usize,
    /// Echoed clients per backend name.
    backends: BTreeMap<String, usize>,
    /// Failed clients per first failure.
    errors: BTreeMap<String, usize>,
}

/// Runs `node client.js URL CLIENTS [QUERY_KEY]` on a blocking thread (the gateway runs on this
/// test's runtime) and parses its line; the process is killed if it outlives its own bound.
async fn run_clients(url: String, query_key: Option<&'static str>) -> Summary {
    let run = tokio::task::spawn_blocking(move || {
        let mut command = Command::new("node");
        command
            .arg("client.js")
            .arg(&url)
            .arg(CLIENTS.to_string())
            .args(query_key)
            .env("SIO_CLIENT_TIMEOUT_MS", CLIENT_RUN.as_millis().to_string())
            .current_dir(app_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = command.spawn().expect("node starts");
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let limit = CLIENT_RUN + WAIT;
        let deadline = Instant::now() + limit;
        let mut status = None;
        for _ in 0..(limit.as_millis() / POLL.as_millis()) {
            status = child.try_wait().expect("try_wait");
            if status.is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("client.js did not exit within {limit:?}");
        };
        let text = reader.join().unwrap();
        assert!(status.success(), "client.js exited with {status}: {text}");
        text
    });
    let text = within(CLIENT_RUN + WAIT + WAIT, run).await.unwrap();
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|err| panic!("client.js printed {text:?}: {err}"))
}

/// A route for every path to upstream `app` over `servers`, with `extra` keys in its table.
fn socketio_config(balance: &str, extra: &str, servers: &[SocketAddr]) -> String {
    format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}{extra}",
        upstream_config("app", balance, servers)
    )
}

/// Three backends behind a gateway configured by `config`, and one run of the clients.
async fn clients_through_wsgate(
    config: impl FnOnce(&[SocketAddr]) -> String,
    query_key: Option<&'static str>,
    case: &str,
) -> Summary {
    show_gateway_warnings();
    let (_backends, addrs) = start_backends(&["a", "b", "c"]).await;
    let gw = TestGateway::start(&config(&addrs)).await;
    let summary = run_clients(gw.url("/"), query_key).await;
    eprintln!("socket.io, {CLIENTS} clients, {case}: {summary:?}");
    summary
}

/// The gateway's warnings (a 502's cause) in the failing test's output: the gateway runs on the
/// test's own thread, whose prints libtest captures.
fn show_gateway_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("wsgate=warn")
        .with_test_writer()
        .try_init();
}

/// Every client connected, upgraded and echoed twice, and the sessions were spread over more
/// than one backend (a pass with a single busy backend would prove nothing about stickiness).
fn assert_all_made_it(summary: &Summary) {
    assert_eq!(
        (summary.connected, summary.upgraded, summary.echoed),
        (CLIENTS, CLIENTS, CLIENTS),
        "{summary:?}"
    );
    assert!(summary.errors.is_empty(), "{summary:?}");
    assert!(summary.backends.len() >= 2, "{summary:?}");
}

#[tokio::test]
async fn socket_io_clients_all_connect_and_upgrade_with_hash_on_a_query_key() {
    if !installed() {
        return;
    }
    let summary = clients_through_wsgate(
        |servers| socketio_config("hash", "hash_key = \"query:client\"\n", servers),
        Some("client"),
        "balance = hash on query:client",
    )
    .await;
    assert_all_made_it(&summary);
}

#[tokio::test]
async fn socket_io_clients_all_connect_and_upgrade_with_the_sticky_cookie() {
    if !installed() {
        return;
    }
    // Round robin under the cookie: the cookie alone keeps each session on its backend.
    let sticky =
        "sticky = { cookie = \"wsgate_server\", secret = \"socket.io test secret, 16+ bytes\" }\n";
    let summary = clients_through_wsgate(
        |servers| socketio_config("round_robin", sticky, servers),
        None,
        "balance = round_robin with the sticky cookie",
    )
    .await;
    assert_all_made_it(&summary);
}

#[tokio::test]
async fn socket_io_with_round_robin_fails_without_stickiness() {
    if !installed() {
        return;
    }
    let summary = clients_through_wsgate(
        |servers| socketio_config("round_robin", "", servers),
        Some("client"),
        "balance = round_robin",
    )
    .await;
    assert!(summary.upgraded < CLIENTS, "{summary:?}");
    // Each failure is a request that reached a backend without the session: a polling request
    // answered 400 "Session ID unknown", or a WebSocket upgrade refused with 400. Not a 502 or a
    // timeout, which would be wsgate's fault or the harness's.
    let failed: usize = summary.errors.values().sum();
    assert_eq!(failed, CLIENTS - summary.echoed, "{summary:?}");
    for what in summary.errors.keys() {
        let unknown_session = what.contains(r#"400 {"code":1,"message":"Session ID unknown"}"#)
            || what.contains("websocket error (Unexpected server response: 400)");
        assert!(unknown_session, "unexpected failure {what:?}: {summary:?}");
    }
}

/// The harness itself, and wsgate's part in it: with one backend there is nothing to keep
/// together, so every client must make it; the round robin failures above are stickiness only.
#[tokio::test]
async fn socket_io_clients_all_connect_and_upgrade_through_wsgate_to_one_backend() {
    if !installed() {
        return;
    }
    show_gateway_warnings();
    let (_backends, addrs) = start_backends(&["only"]).await;
    let gw = TestGateway::start(&socketio_config("round_robin", "", &addrs)).await;
    let summary = run_clients(gw.url("/"), Some("client")).await;
    eprintln!("socket.io, {CLIENTS} clients, one backend: {summary:?}");
    assert_eq!(
        (summary.connected, summary.upgraded, summary.echoed),
        (CLIENTS, CLIENTS, CLIENTS),
        "{summary:?}"
    );
    assert_eq!(summary.backends.get("only"), Some(&CLIENTS), "{summary:?}");
}
