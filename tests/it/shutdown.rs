//! Shutdown is a drain: stop accepting, let requests finish, close WebSockets with 1001 and
//! wait for their close handshakes, cut what is left when the drain period ends; in-process
//! and through the real binary's signal handling.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::binary::{self, TempFile};
use crate::support::ws::next_message;
use crate::support::*;

/// Polls (yielding, bounded) until connecting to `addr` is refused: the listener is closed.
async fn wait_until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    for _ in 0..100_000 {
        match within(WAIT, TcpStream::connect(addr)).await {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // Reset: it was queued on the listener as it closed. Try again.
            Err(_) => {}
            Ok(stream) => drop(stream),
        }
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        tokio::task::yield_now().await;
    }
    panic!("{addr} still accepts connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_completes_during_the_drain() {
    let mut backend = HttpBackend::start("a").await;
    let config = format!(
        "[timeouts]\ndrain = \"20s\"\n\n{}",
        proxy_config(&[backend.addr])
    );
    let mut gw = TestGateway::start(&config).await;
    let mut client = Client::connect(gw.addr).await;
    let pending = tokio::spawn(async move {
        client
            .fetch(
                request("GET", "app.test", "/slow")
                    .header("x-reply-hold", "1")
                    .body(empty())
                    .unwrap(),
            )
            .await
    });
    // The request is at the backend, which holds its answer.
    assert_eq!(backend.next_request().await.uri, "/slow");

    gw.begin_shutdown().await;
    wait_until_refused(gw.addr).await;
    // The connection with a request in flight is what the drain waits for.
    assert!(!gw.is_stopped());
    backend.release();
    let reply = within(WAIT, pending).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "backend=a method=GET uri=/slow body_len=0\n");

    let finishing = Instant::now();
    gw.finish_shutdown().await;
    let waited = finishing.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "run() returned {waited:?} after the last request: it waited for the drain timer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_get_close_1001_both_ways_when_shutdown_begins() {
    let mut backend = WsBackend::start("a").await;
    // Long, so that finishing early shows the close handshakes ended the drain, not the timer.
    let config = format!(
        "[timeouts]\ndrain = \"60s\"\n\n{}",
        proxy_config(&[backend.addr])
    );
    let mut gw = TestGateway::start(&config).await;
    let stats = gw.route_stats("app");
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    within(WAIT, ws.send(Message::Text("before".into())))
        .await
        .unwrap();
    assert_eq!(next_message(&mut ws).await, Message::Text("before".into()));

    let started = Instant::now();
    gw.begin_shutdown().await;
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected Close 1001, got {other:?}"),
    }
    let backend_close = backend.next_close().await.expect("a close code");
    assert_eq!(u16::from(backend_close.code), 1001);
    // tungstenite answers the Close; then the gateway ends the connection.
    let end = within(WAIT, ws.next()).await;
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
    gw.finish_shutdown().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "waited {took:?}");
    assert_eq!(stats.tunnels_open.load(SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tunnel_works_during_the_drain_and_is_cut_when_it_ends() {
    let backend = raw_backend(|mut stream| async move {
        let _ = read_request_head(&mut stream).await;
        let switched =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n";
        if stream.write_all(switched.as_bytes()).await.is_ok() {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    })
    .await;
    let drain = Duration::from_secs(2);
    let config = format!(
        "[timeouts]\ndrain = \"2s\"\n\n[[route]]\nname = \"raw\"\nupstream = \"app\"\nupgrades = [\"x-raw\"]\n\n{}",
        upstream_config("app", "round_robin", &[backend])
    );
    let mut gw = TestGateway::start(&config).await;
    let stats = gw.route_stats("raw");
    let mut client = RawClient::connect(gw.addr).await;
    client
        .send("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: x-raw\r\n\r\n")
        .await;
    assert_eq!(client.read_head().await.status, 101);

    let started = Instant::now();
    gw.begin_shutdown().await;
    wait_until_refused(gw.addr).await;
    client.send(b"during the drain").await;
    assert_eq!(client.read_exact(16).await, b"during the drain");
    assert_eq!(stats.tunnels_open.load(SeqCst), 1);

    // Not a WebSocket: there is no Close to send, so the gateway cuts it when the drain ends.
    assert!(within(drain + WAIT, client.read_to_close())
        .await
        .is_empty());
    let closed_after = started.elapsed();
    assert!(closed_after >= drain, "closed after {closed_after:?}");
    gw.finish_shutdown().await;
    assert_eq!(stats.tunnels_open.load(SeqCst), 0);
}

#[tokio::test]
async fn new_connections_are_refused_once_shutdown_starts() {
    let mut gw =
        TestGateway::start("[[route]]\nname = \"r\"\nrespond = { status = 200, body = \"up\" }\n")
            .await;
    assert_eq!(get(gw.addr, "a.test", "/").await.text(), "up");
    gw.begin_shutdown().await;
    wait_until_refused(gw.addr).await;
    gw.finish_shutdown().await;
    let refused = within(WAIT, TcpStream::connect(gw.addr)).await;
    assert!(refused.is_err(), "connected after run() returned");
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_the_drain() {
    let gw = TestGateway::start(
        "[timeouts]\ndrain = \"20s\"\n\n[[route]]\nname = \"r\"\nrespond = { status = 200, body = \"up\" }\n",
    )
    .await;
    let mut client = Client::connect(gw.addr).await;
    let reply = client
        .fetch(request("GET", "a.test", "/").body(empty()).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The client keeps its connection open, idle.
    let started = Instant::now();
    gw.shutdown().await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "drain took {waited:?}");
    eventually("client connection closed", || client.is_closed()).await;
}

const BINARY_CONFIG: &str = "[log]\nlevel = \"info\"\n\n\
                             [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
                             [[route]]\nname = \"health\"\npath = \"/healthz\"\nrespond = { status = 200, body = \"up\" }\n";

#[test]
fn binary_exits_0_on_sigterm_when_idle() {
    let config = TempFile::new("sigterm", BINARY_CONFIG);
    let mut gateway = binary::Gateway::spawn(&config.path);
    let addr = gateway.listening_address();
    binary::wait_until_connectable(addr);
    let response = binary::get(addr, "/healthz");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nup"), "{response}");
    gateway.wait_for_signal_handlers();

    gateway.signal("TERM");
    let status = gateway.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", gateway.log.join("\n"));
}

/// A gateway that answers requests must already drain on SIGTERM: the handlers have to be in
/// place before the listeners bind, or a SIGTERM in between kills the process (default action)
/// with no drain. That was a race, so this tries several times; it failed most reliably on a
/// loaded machine, e.g. under `taskset -c 0`.
#[test]
fn binary_catches_sigterm_as_soon_as_it_serves() {
    let config = TempFile::new("early-sigterm", BINARY_CONFIG);
    for attempt in 0..50 {
        let mut gateway = binary::Gateway::spawn(&config.path);
        let addr = gateway.listening_address();
        let response = binary::get(addr, "/healthz");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert_ne!(
            gateway.catches_term_and_int(),
            Some(false),
            "attempt {attempt}: serving, but SIGTERM would still kill it"
        );
    }
}

#[test]
fn binary_exits_130_on_a_second_signal_during_the_drain() {
    // A backend that takes the request and never answers keeps the drain (30 s) busy.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let (got_request, request_seen) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let (mut stream, _) = backend.accept().expect("gateway connects");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap_or(0);
        let _ = got_request.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        // Hold the connection until the gateway goes away (or the timeout).
        let _ = stream.read(&mut buf);
    });
    let config = TempFile::new(
        "second-signal",
        &format!(
            "[timeouts]\ndrain = \"30s\"\n\n{BINARY_CONFIG}\n\
             [[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
             [[upstream]]\nname = \"app\"\nservers = [\"{backend_addr}\"]\n"
        ),
    );
    let mut gateway = binary::Gateway::spawn(&config.path);
    let addr = gateway.listening_address();
    binary::wait_until_connectable(addr);
    let mut client = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client
        .write_all(b"GET /stuck HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let head = request_seen
        .recv_timeout(WAIT)
        .expect("request reached the backend");
    assert!(head.starts_with("GET /stuck HTTP/1.1\r\n"), "{head}");
    gateway.wait_for_signal_handlers();

    gateway.signal("TERM");
    gateway.wait_for_line("SIGTERM received");
    let started = Instant::now();
    gateway.signal("INT");
    let status = gateway.wait_exit(WAIT);
    assert_eq!(status.code(), Some(130), "log:\n{}", gateway.log.join("\n"));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The client's request died with the process.
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    holder.join().unwrap();
}
