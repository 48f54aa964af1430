//! WebSocket passthrough: handshakes relayed unchanged, bytes spliced both ways whatever their
//! framing, half-closes, counters, the idle timeout, and backends that misbehave.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::support::raw::exchange;
use crate::support::ws::{frame, handshake, next_message, switching_protocols, WsStream, TEXT};
use crate::support::*;

async fn echo_gateway() -> (WsBackend, TestGateway) {
    let backend = WsBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    (backend, gw)
}

async fn send(ws: &mut WsStream, message: Message) {
    within(WAIT, ws.send(message)).await.expect("send");
}

/// Reads until the stream ends, returning the close frame seen on the way, if any.
async fn read_to_end(ws: &mut WsStream) -> Option<CloseFrame<'static>> {
    let mut close = None;
    for _ in 0..1000 {
        match within(WAIT, ws.next()).await {
            Some(Ok(Message::Close(frame))) => close = frame.map(CloseFrame::into_owned),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return close,
        }
    }
    panic!("stream did not end");
}

fn text_of(len: usize) -> String {
    let mut text = "abcdefghijklmnopqrstuvwxyz0123456789".repeat(len / 36 + 1);
    text.truncate(len);
    text
}

fn binary_of(len: usize) -> Vec<u8> {
    let mut bytes = (0..=255u8).rev().collect::<Vec<u8>>().repeat(len / 256 + 1);
    bytes.truncate(len);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_messages_echo_at_every_length_boundary() {
    let (_backend, gw) = echo_gateway().await;
    let (mut ws, _) = ws_connect(gw.addr, "/echo").await;
    // 7-bit, 16-bit and 64-bit payload lengths on each side of their limits, then 16 MiB.
    for len in [0, 125, 126, 65_535, 65_536, 16 * 1024 * 1024] {
        let text = Message::Text(text_of(len));
        send(&mut ws, text.clone()).await;
        let echoed = next_message(&mut ws).await;
        assert!(echoed == text, "text of {len} bytes came back different");

        let binary = Message::Binary(binary_of(len));
        send(&mut ws, binary.clone()).await;
        let echoed = next_message(&mut ws).await;
        assert!(
            echoed == binary,
            "binary of {len} bytes came back different"
        );
    }
}

#[tokio::test]
async fn fragmented_messages_with_an_interleaved_ping_are_reassembled_by_the_backend() {
    let (_backend, gw) = echo_gateway().await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    let fragment = |data: &[u8], opcode: Data, fin: bool| {
        Message::Frame(Frame::message(data.to_vec(), OpCode::Data(opcode), fin))
    };
    send(&mut ws, fragment(b"Hel", Data::Text, false)).await;
    // Control frames may sit between fragments (RFC 6455 section 5.4).
    send(&mut ws, Message::Ping(b"mid-message".to_vec())).await;
    send(&mut ws, fragment(b"lo, ", Data::Continue, false)).await;
    send(&mut ws, fragment(b"world", Data::Continue, true)).await;

    let mut pong = false;
    let mut text = None;
    for _ in 0..10 {
        match within(WAIT, ws.next())
            .await
            .expect("open")
            .expect("message")
        {
            Message::Pong(payload) => {
                assert_eq!(payload, b"mid-message");
                pong = true;
            }
            Message::Text(t) => text = Some(t),
            other => panic!("unexpected {other:?}"),
        }
        if pong && text.is_some() {
            break;
        }
    }
    assert!(pong, "no pong for the ping between fragments");
    assert_eq!(text.as_deref(), Some("Hello, world"));

    // A binary message in three 40 KiB fragments.
    let whole = binary_of(120 * 1024);
    for (i, part) in whole.chunks(40 * 1024).enumerate() {
        let opcode = if i == 0 { Data::Binary } else { Data::Continue };
        send(&mut ws, fragment(part, opcode, i == 2)).await;
    }
    assert!(next_message(&mut ws).await == Message::Binary(whole));
}

#[tokio::test]
async fn ping_is_answered_with_a_pong_through_the_tunnel() {
    let (_backend, gw) = echo_gateway().await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    send(&mut ws, Message::Ping(b"are you there?".to_vec())).await;
    let answer = within(WAIT, ws.next())
        .await
        .expect("open")
        .expect("message");
    assert_eq!(answer, Message::Pong(b"are you there?".to_vec()));
}

#[tokio::test]
async fn client_close_code_and_reason_reach_the_backend_and_its_reply_comes_back() {
    let (mut backend, gw) = echo_gateway().await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    let bye = CloseFrame {
        code: CloseCode::from(4001),
        reason: "client bye".into(),
    };
    within(WAIT, ws.close(Some(bye.clone()))).await.unwrap();
    assert_eq!(backend.next_close().await, Some(bye.clone()));
    // The backend's closing handshake answer echoes the code.
    assert_eq!(read_to_end(&mut ws).await, Some(bye));
}

#[tokio::test]
async fn backend_close_code_and_reason_reach_the_client() {
    let (_backend, gw) = echo_gateway().await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    send(&mut ws, Message::Text("close:1011".into())).await;
    let close = read_to_end(&mut ws).await;
    assert_eq!(
        close,
        Some(CloseFrame {
            code: CloseCode::Error,
            reason: "backend bye".into()
        })
    );
}

#[tokio::test]
async fn handshake_reaches_the_backend_with_its_headers_and_forwarding_added() {
    let (mut backend, gw) = echo_gateway().await;
    let mut request = gw.ws_url("/chat?room=1").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "http://app.test".parse().unwrap());
    let key = request.headers()["sec-websocket-key"].clone();
    let (mut ws, response) = ws_connect_with(gw.addr, request).await;
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-backend"], "a");

    let seen = backend.next_handshake().await;
    assert_eq!(seen["sec-websocket-key"], key);
    assert_eq!(seen["sec-websocket-version"], "13");
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["connection"], "upgrade");
    assert_eq!(seen["origin"], "http://app.test");
    assert_eq!(seen["host"], gw.addr.to_string());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");

    send(&mut ws, Message::Text("still works".into())).await;
    assert_eq!(
        next_message(&mut ws).await,
        Message::Text("still works".into())
    );
}

#[tokio::test]
async fn keep_alive_upgrade_connection_list_and_mixed_case_websocket_still_upgrade() {
    let (_backend, gw) = echo_gateway().await;
    // What Firefox sends.
    let request = "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive, Upgrade\r\n\
                   Upgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut client = RawClient::connect(gw.addr).await;
    client.send(request).await;
    let head = client.read_head().await;
    assert_eq!(head.status, 101, "{}", head.raw);
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
}

#[tokio::test]
async fn subprotocol_negotiation_passes_end_to_end() {
    let (mut backend, gw) = echo_gateway().await;
    let request = ws::request_with_protocols(gw.addr, "/", "chat,superchat");
    let (mut ws, response) = ws_connect_with(gw.addr, request).await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "superchat");
    assert_eq!(
        backend.next_handshake().await["sec-websocket-protocol"],
        "chat,superchat"
    );
    send(&mut ws, Message::Text("hi".into())).await;
    assert_eq!(next_message(&mut ws).await, Message::Text("hi".into()));
}

#[tokio::test]
async fn permessage_deflate_offer_and_answer_pass_unchanged() {
    let (mut backend, gw) = echo_gateway().await;
    let offer = "permessage-deflate; client_max_window_bits";
    let mut client = RawClient::connect(gw.addr).await;
    client
        .send(handshake(
            "app.test",
            "/",
            &[&format!("Sec-WebSocket-Extensions: {offer}")],
        ))
        .await;
    let head = client.read_head().await;
    assert_eq!(head.status, 101, "{}", head.raw);
    assert_eq!(
        head.header("sec-websocket-extensions"),
        Some(ws::DEFLATE_ANSWER)
    );
    assert_eq!(head.header("upgrade"), Some("websocket"));
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(
        backend.next_handshake().await["sec-websocket-extensions"],
        offer
    );
}

/// The soft limit on open files, where the platform says.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_tunnels_echo_without_cross_talk() {
    const TUNNELS: usize = 500;
    // Four sockets per tunnel live in this process: client, gateway (2) and backend.
    if let Some(limit) = open_files_limit() {
        assert!(
            limit >= 4 * TUNNELS as u64 + 512,
            "open-file limit {limit} is too low for {TUNNELS} tunnels: raise `ulimit -n`"
        );
    }
    let (_backend, gw) = echo_gateway().await;
    let stats = gw.route_stats("app");
    let addr = gw.addr;
    within(Duration::from_secs(90), async {
        // All open at once before any of them talks.
        let mut opening = JoinSet::new();
        for i in 0..TUNNELS {
            opening.spawn(async move { (i, ws_connect(addr, &format!("/t/{i}")).await.0) });
        }
        let mut tunnels = Vec::with_capacity(TUNNELS);
        while let Some(opened) = opening.join_next().await {
            tunnels.push(opened.expect("tunnel opened"));
        }
        assert_eq!(stats.tunnels_open.load(SeqCst), TUNNELS as u64);

        let mut talking = JoinSet::new();
        for (i, mut ws) in tunnels {
            talking.spawn(async move {
                for round in 0..3 {
                    let text = format!("tunnel {i} round {round} {}", "#".repeat(i));
                    send(&mut ws, Message::Text(text.clone())).await;
                    assert_eq!(next_message(&mut ws).await, Message::Text(text));
                    let binary = [&(i as u32).to_be_bytes()[..], &[round; 300]].concat();
                    send(&mut ws, Message::Binary(binary.clone())).await;
                    assert_eq!(next_message(&mut ws).await, Message::Binary(binary));
                }
                within(WAIT, ws.close(None)).await.unwrap();
                read_to_end(&mut ws).await;
            });
        }
        while let Some(done) = talking.join_next().await {
            done.expect("tunnel echoed its own payloads");
        }
    })
    .await;
    eventually("all tunnels closed", || {
        stats.tunnels_open.load(SeqCst) == 0
    })
    .await;
    assert_eq!(stats.tunnels_total.load(SeqCst), TUNNELS as u64);
}

#[tokio::test]
async fn backend_bytes_sent_in_the_same_write_as_the_101_reach_the_client() {
    let early = frame(TEXT, b"hello before you asked", false);
    let backend = raw::early_data_backend(early.clone()).await;
    let gw = TestGateway::start(&proxy_config(&[backend])).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(handshake("app.test", "/", &[])).await;
    let head = client.read_head().await;
    assert_eq!(head.status, 101, "{}", head.raw);
    assert_eq!(client.read_exact(early.len()).await, early);
}

#[tokio::test]
async fn client_bytes_sent_in_the_same_write_as_the_handshake_reach_the_backend() {
    let (_backend, gw) = echo_gateway().await;
    let mut bytes = handshake("app.test", "/", &[]).into_bytes();
    bytes.extend(frame(TEXT, b"sent with the handshake", true));
    let mut client = RawClient::connect(gw.addr).await;
    client.send(bytes).await;
    let head = client.read_head().await;
    assert_eq!(head.status, 101, "{}", head.raw);
    // The echo backend parsed it as a frame and answered it, unmasked.
    let echo = frame(TEXT, b"sent with the handshake", false);
    assert_eq!(client.read_exact(echo.len()).await, echo);
}

#[tokio::test]
async fn client_half_close_reaches_the_backend_which_can_still_answer() {
    let (got_tx, mut got) = mpsc::unbounded_channel::<Vec<u8>>();
    let backend = raw_backend(move |mut stream| {
        let got_tx = got_tx.clone();
        async move {
            let (head, mut received) = read_request_head(&mut stream).await;
            stream
                .write_all(switching_protocols(&head).as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&buf[..n]);
            }
            // Our read side saw EOF; the write side is still open.
            let _ = got_tx.send(received);
            stream
                .write_all(&frame(TEXT, b"answer after your EOF", false))
                .await
                .unwrap();
            stream.shutdown().await.unwrap();
        }
    })
    .await;
    let gw = TestGateway::start(&proxy_config(&[backend])).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(handshake("app.test", "/", &[])).await;
    assert_eq!(client.read_head().await.status, 101);
    let last_words = frame(TEXT, b"last words", true);
    client.send(&last_words).await;
    client.shutdown_write().await;

    let received = within(WAIT, got.recv()).await.expect("backend saw EOF");
    assert_eq!(received, last_words);
    assert_eq!(
        client.read_to_close().await,
        frame(TEXT, b"answer after your EOF", false)
    );
    let stats = gw.route_stats("app");
    eventually("tunnel closed", || stats.tunnels_open.load(SeqCst) == 0).await;
}

/// A backend that closes while the client keeps its end open and silent: once half-closed,
/// the tunnel lives only `websocket_half_closed` more, not the whole `websocket_idle`.
#[tokio::test]
async fn half_closed_tunnel_is_closed_after_websocket_half_closed() {
    let backend = raw_backend(|mut stream| async move {
        let (head, _) = read_request_head(&mut stream).await;
        let mut answer = switching_protocols(&head).into_bytes();
        answer.extend_from_slice(&frame(TEXT, b"bye", false));
        let _ = stream.write_all(&answer).await;
        // Dropping the stream closes the backend's side entirely.
    })
    .await;
    let config = format!(
        "[timeouts]\nwebsocket_idle = \"1h\"\nwebsocket_half_closed = \"300ms\"\n\n{}",
        proxy_config(&[backend])
    );
    let gw = TestGateway::start(&config).await;
    let stats = gw.route_stats("app");
    let mut client = RawClient::connect(gw.addr).await;
    client.send(handshake("app.test", "/", &[])).await;
    assert_eq!(client.read_head().await.status, 101);
    // The client never closes; it only reads, and sees the backend's frame, then EOF.
    assert_eq!(client.read_to_close().await, frame(TEXT, b"bye", false));
    // Bounded by `eventually`, far below the hour of `websocket_idle`.
    eventually("half-closed tunnel closed", || {
        stats.tunnels_open.load(SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn tunnel_counters_follow_a_tunnel_from_open_to_closed() {
    let (_backend, gw) = echo_gateway().await;
    let stats = gw.route_stats("app");
    let server = gw.endpoint("app", 0);
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    // Counted before the 101 is relayed, so the client seeing it is enough.
    assert_eq!(stats.tunnels_open.load(SeqCst), 1);
    assert_eq!(stats.tunnels_total.load(SeqCst), 1);
    assert_eq!(stats.requests.load(SeqCst), 1);
    assert_eq!(server.tunnels(), 1);
    assert_eq!(server.active(), 1);

    send(&mut ws, Message::Text("x".into())).await;
    next_message(&mut ws).await;
    within(WAIT, ws.close(None)).await.unwrap();
    read_to_end(&mut ws).await;
    // The backend closed its side; the tunnel ends once the client closes its socket too
    // (until then only the client-to-backend direction is still open).
    drop(ws);
    eventually("tunnel closed", || stats.tunnels_open.load(SeqCst) == 0).await;
    eventually("lease returned", || server.active() == 0).await;
    assert_eq!(server.tunnels(), 0);
    assert_eq!(stats.tunnels_total.load(SeqCst), 1);

    let (_ws, _) = ws_connect(gw.addr, "/").await;
    assert_eq!(stats.tunnels_open.load(SeqCst), 1);
    assert_eq!(stats.tunnels_total.load(SeqCst), 2);
}

#[tokio::test]
async fn idle_tunnel_is_closed_after_websocket_idle() {
    let backend = WsBackend::start("a").await;
    let config = format!(
        "[timeouts]\nwebsocket_idle = \"300ms\"\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let stats = gw.route_stats("app");
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    let last_activity = Instant::now();
    send(&mut ws, Message::Text("one".into())).await;
    next_message(&mut ws).await;

    // No close frame: the gateway drops both connections.
    let end = within(WAIT, ws.next()).await;
    let idle = last_activity.elapsed();
    assert!(
        matches!(end, None | Some(Err(WsError::Protocol(_) | WsError::Io(_)))),
        "{end:?}"
    );
    assert!(idle >= Duration::from_millis(300), "closed after {idle:?}");
    eventually("tunnel closed", || stats.tunnels_open.load(SeqCst) == 0).await;
}

#[tokio::test]
async fn traffic_keeps_a_tunnel_open_past_the_idle_timeout() {
    let backend = WsBackend::start("a").await;
    let config = format!(
        "[timeouts]\nwebsocket_idle = \"1s\"\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    let started = Instant::now();
    // Pacing, not waiting for an event: 8 x 250 ms spans twice the idle timeout.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        send(&mut ws, Message::Text(format!("tick {i}"))).await;
        assert_eq!(
            next_message(&mut ws).await,
            Message::Text(format!("tick {i}"))
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(gw.route_stats("app").tunnels_open.load(SeqCst), 1);
}

#[tokio::test]
async fn backend_refusing_the_handshake_is_relayed_as_is() {
    let backend = raw::refusing_backend().await;
    let gw = TestGateway::start(&proxy_config(&[backend])).await;
    let response = exchange(gw.addr, handshake("app.test", "/", &[])).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.text(), "forbidden by backend");
    assert_eq!(response.head.header("x-reason"), Some("policy"));

    let stream = within(WAIT, tokio::net::TcpStream::connect(gw.addr))
        .await
        .unwrap();
    let request = gw.ws_url("/").into_client_request().unwrap();
    let refused = within(WAIT, tokio_tungstenite::client_async(request, stream)).await;
    match refused {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    assert_eq!(gw.route_stats("app").tunnels_total.load(SeqCst), 0);
}

#[tokio::test]
async fn backend_switching_to_another_protocol_gives_502() {
    let backend = raw_backend(|mut stream| async move {
        let _ = read_request_head(&mut stream).await;
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            )
            .await
            .unwrap();
        let _ = stream.read(&mut [0u8; 1024]).await;
    })
    .await;
    let gw = TestGateway::start(&proxy_config(&[backend])).await;
    let response = exchange(gw.addr, handshake("app.test", "/", &[])).await;
    assert_eq!(response.status(), 502, "{}", response.head.raw);
    assert_eq!(gw.route_stats("app").tunnels_total.load(SeqCst), 0);
}

#[tokio::test]
async fn upgrade_listed_in_the_route_is_tunnelled_like_websocket() {
    let (head_tx, mut heads) = mpsc::unbounded_channel::<String>();
    let backend = raw_backend(move |mut stream| {
        let head_tx = head_tx.clone();
        async move {
            let (head, _) = read_request_head(&mut stream).await;
            let _ = head_tx.send(head);
            stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-raw\r\nConnection: Upgrade\r\n\r\n",
                )
                .await
                .unwrap();
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    })
    .await;
    let config = format!(
        "[[route]]\nname = \"raw\"\nupstream = \"app\"\nupgrades = [\"x-raw\"]\n\n{}",
        upstream_config("app", "round_robin", &[backend])
    );
    let gw = TestGateway::start(&config).await;
    let mut client = RawClient::connect(gw.addr).await;
    client
        .send(
            "GET /raw HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: x-raw\r\n\r\n",
        )
        .await;
    let head = client.read_head().await;
    assert_eq!(head.status, 101, "{}", head.raw);
    assert_eq!(head.header("upgrade"), Some("x-raw"));
    let seen = within(WAIT, heads.recv()).await.unwrap();
    assert_eq!(raw::head_header(&seen, "upgrade"), Some("x-raw"));
    assert_eq!(raw::head_header(&seen, "connection"), Some("upgrade"));

    client.send(b"not websocket at all\x00\xff").await;
    assert_eq!(client.read_exact(22).await, b"not websocket at all\x00\xff");
    assert_eq!(gw.route_stats("raw").tunnels_open.load(SeqCst), 1);
}
