//! Frame-aware tunnels end to end, over real sockets: keepalive Pings and their Pongs, Close
//! 1001 on shutdown, frame and message limits, strict mode, the permessage-deflate policy.
//! The client is tungstenite where a well-behaved one will do, raw bytes where it must not be.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use wsgate::websocket::frame::{self, close_code, Header, BINARY, CLOSE, PING, PONG, TEXT};

use crate::support::raw::head_header;
use crate::support::ws::handshake;
use crate::support::*;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

type Backends = mpsc::UnboundedReceiver<(String, RawClient)>;

/// A gateway whose `[websocket]` table is `websocket`, in front of a backend the test drives.
async fn gateway(websocket: &str, extra_101: &'static str) -> (TestGateway, Backends) {
    let (backend, backends) = upgraded_backend(extra_101).await;
    let config = format!("[websocket]\n{websocket}\n\n{}", proxy_config(&[backend]));
    (TestGateway::start(&config).await, backends)
}

/// A raw client's handshake with `extra` lines; returns both ends of the tunnel.
async fn open(
    addr: SocketAddr,
    backends: &mut Backends,
    extra: &[&str],
) -> (RawClient, RawClient, String) {
    let mut client = RawClient::connect(addr).await;
    client.send(handshake("a.test", "/", extra)).await;
    let (head, server) = within(WAIT, backends.recv())
        .await
        .expect("backend running");
    let answer = client.read_head().await;
    assert_eq!(answer.status, 101, "{}", answer.raw);
    (client, server, head)
}

fn framed(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(&mut out, opcode, payload, mask);
    out
}

fn close(code: u16, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_close(&mut out, code, "", mask);
    out
}

#[track_caller]
fn assert_close(frame: &(Header, Vec<u8>), code: u16) {
    assert_eq!(frame.0.opcode, CLOSE, "{frame:?}");
    assert_eq!(frame::close_code(&frame.1), Some(code), "{frame:?}");
}

/// The next frame that is not one of the gateway's keepalive Pings (bounded).
async fn next_non_ping(peer: &mut RawClient) -> (Header, Vec<u8>) {
    for _ in 0..1000 {
        let frame = peer.read_frame().await;
        if frame.0.opcode != PING {
            return frame;
        }
    }
    panic!("only Pings");
}

#[tokio::test]
async fn a_quiet_client_is_pinged_and_its_pongs_stop_at_the_gateway() {
    let (gw, mut backends) = gateway("ping_interval = \"200ms\"\nping_timeout = \"10s\"", "").await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    let (_, mut server) = within(WAIT, backends.recv()).await.unwrap();
    // tungstenite shows each Ping and answers it with a Pong on its next read or write.
    for _ in 0..2 {
        match within(WAIT, ws.next()).await {
            Some(Ok(Message::Ping(token))) => assert_eq!(token.len(), 8),
            other => panic!("expected a keepalive Ping, got {other:?}"),
        }
    }
    within(WAIT, ws.send(Message::Text("hi".into())))
        .await
        .unwrap();
    // The Pongs came before "hi" but went no further.
    let (header, payload) = server.read_frame().await;
    assert_eq!((header.opcode, payload.as_slice()), (TEXT, &b"hi"[..]));
    assert!(header.mask.is_some());

    // The application's own Ping and Pong pass both ways.
    within(WAIT, ws.send(Message::Ping(b"app".to_vec())))
        .await
        .unwrap();
    let (header, payload) = server.read_frame().await;
    assert_eq!((header.opcode, payload.as_slice()), (PING, &b"app"[..]));
    server.send(framed(PONG, b"app", None)).await;
    let pong = loop {
        match within(WAIT, ws.next()).await {
            Some(Ok(Message::Ping(_))) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(pong, Some(Ok(Message::Pong(ref p))) if p == b"app"),
        "{pong:?}"
    );
}

#[tokio::test]
async fn a_client_that_stops_answering_is_closed_and_the_backend_gets_1001() {
    let (gw, mut backends) =
        gateway("ping_interval = \"200ms\"\nping_timeout = \"300ms\"", "").await;
    let started = Instant::now();
    let (mut client, mut server, _) = open(gw.addr, &mut backends, &[]).await;
    assert_close(&server.read_frame().await, close_code::GOING_AWAY);
    assert!(server.read_to_close().await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The client got the Ping it never answered, then the connection ended.
    let (ping, token) = client.read_frame().await;
    assert_eq!((ping.opcode, ping.mask, token.len()), (PING, None, 8));
    assert!(client.read_to_close().await.is_empty());
    let stats = gw.route_stats("app");
    eventually("tunnel closed", || {
        stats.tunnels_open.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn the_backend_can_be_pinged_too_and_its_pongs_stop_at_the_gateway() {
    let (gw, mut backends) = gateway("ping_interval = \"200ms\"\nping_upstream = true", "").await;
    let (mut client, mut server, _) = open(gw.addr, &mut backends, &[]).await;
    let (ping, token) = server.read_frame().await;
    assert_eq!(ping.opcode, PING);
    assert!(ping.mask.is_some(), "a server is sent masked frames");
    let mut reply = framed(PONG, &token, None);
    reply.extend(framed(BINARY, b"data", None));
    server.send(reply).await;
    let (header, payload) = next_non_ping(&mut client).await;
    assert_eq!((header.opcode, payload.as_slice()), (BINARY, &b"data"[..]));
}

#[tokio::test]
async fn shutdown_sends_close_1001_both_ways_after_the_frame_in_flight() {
    let (mut gw, mut backends) = gateway("ping_interval = \"off\"", "").await;
    let (mut client, mut server, _) = open(gw.addr, &mut backends, &[]).await;
    let whole = framed(BINARY, &[7; 1000], None);
    server.send(&whole[..500]).await;
    let first = client.read_exact(500).await;

    let started = Instant::now();
    gw.begin_shutdown().await;
    // The backend's side is at a boundary: its Close comes at once, masked.
    let server_close = server.read_frame().await;
    assert!(server_close.0.mask.is_some());
    assert_close(&server_close, close_code::GOING_AWAY);
    // The client's side is mid-frame: the frame ends whole, then the Close.
    server.send(&whole[500..]).await;
    let rest = client.read_exact(whole.len() - 500).await;
    assert!(
        [first, rest].concat() == whole,
        "the frame in flight was cut"
    );
    assert_close(&client.read_frame().await, close_code::GOING_AWAY);
    client.send(close(close_code::GOING_AWAY, Some(MASK))).await;
    server.send(close(close_code::GOING_AWAY, None)).await;
    assert!(client.read_to_close().await.is_empty());
    assert!(server.read_to_close().await.is_empty());
    gw.finish_shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "waited out the drain period"
    );
}

#[tokio::test]
async fn a_frame_over_max_frame_gets_1009_and_never_reaches_the_backend() {
    let (gw, mut backends) = gateway("max_frame = 1024", "").await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    let (_, mut server) = within(WAIT, backends.recv()).await.unwrap();
    within(WAIT, ws.send(Message::Binary(vec![1; 1000])))
        .await
        .unwrap();
    assert_eq!(server.read_frame().await.1.len(), 1000);
    within(WAIT, ws.send(Message::Binary(vec![2; 2000])))
        .await
        .unwrap();
    match next_message_or_close(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected Close 1009, got {other:?}"),
    }
    assert_close(&server.read_frame().await, close_code::GOING_AWAY);
}

async fn next_message_or_close(ws: &mut crate::support::ws::WsStream) -> Message {
    for _ in 0..1000 {
        match within(WAIT, ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return message,
            other => panic!("stream ended: {other:?}"),
        }
    }
    panic!("only Pings");
}

#[tokio::test]
async fn a_fragmented_message_over_max_message_gets_1009() {
    let (gw, mut backends) = gateway("max_message = 1024", "").await;
    let (mut client, mut server, _) = open(gw.addr, &mut backends, &[]).await;
    // Three fragments of 600 bytes: the second takes the message past the limit.
    let mut fragments = framed(BINARY, &[1; 600], Some(MASK));
    fragments[0] &= 0x7f;
    let mut second = framed(frame::CONTINUATION, &[2; 600], Some(MASK));
    second[0] &= 0x7f;
    fragments.extend(second);
    fragments.extend(framed(frame::CONTINUATION, &[3; 600], Some(MASK)));
    client.send(fragments).await;
    let (first, payload) = server.read_frame().await;
    assert_eq!(
        (first.opcode, first.fin, payload.len()),
        (BINARY, false, 600)
    );
    assert_close(&server.read_frame().await, close_code::GOING_AWAY);
    assert_close(
        &next_non_ping(&mut client).await,
        close_code::MESSAGE_TOO_BIG,
    );
}

#[tokio::test]
async fn strict_mode_closes_with_1002_on_each_protocol_error() {
    let (gw, mut backends) = gateway("strict = true", "").await;
    let reserved_bits = {
        let mut f = framed(TEXT, b"x", Some(MASK));
        f[0] |= 0x40;
        f
    };
    let fragmented_ping = {
        let mut f = framed(PING, b"x", Some(MASK));
        f[0] &= 0x7f;
        f
    };
    let client_cases: [(&str, Vec<u8>); 6] = [
        ("unmasked client frame", framed(TEXT, b"x", None)),
        ("reserved opcode", framed(0x3, b"x", Some(MASK))),
        ("RSV1 without permessage-deflate", reserved_bits),
        (
            "control frame over 125 bytes",
            framed(PING, &[0; 126], Some(MASK)),
        ),
        ("fragmented control frame", fragmented_ping),
        (
            "continuation without a message",
            framed(frame::CONTINUATION, b"x", Some(MASK)),
        ),
    ];
    for (case, bytes) in client_cases {
        let (mut client, mut server, _) = open(gw.addr, &mut backends, &[]).await;
        client.send(bytes).await;
        assert_close(
            &next_non_ping(&mut client).await,
            close_code::PROTOCOL_ERROR,
        );
        let (header, payload) = server.read_frame().await;
        assert_eq!(
            header.opcode, CLOSE,
            "{case}: the bad frame reached the backend"
        );
        assert_eq!(frame::close_code(&payload), Some(1001), "{case}");
    }
    // And from the server's side: a masked frame.
    let (mut client, mut server, _) = open(gw.addr, &mut backends, &[]).await;
    server.send(framed(TEXT, b"x", Some(MASK))).await;
    assert_close(&server.read_frame().await, close_code::PROTOCOL_ERROR);
    assert_close(&next_non_ping(&mut client).await, close_code::GOING_AWAY);
}

#[tokio::test]
async fn permessage_deflate_frames_pass_untouched_with_strict_tracking() {
    let (gw, mut backends) = gateway(
        "strict = true",
        "Sec-WebSocket-Extensions: permessage-deflate",
    )
    .await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits";
    let (mut client, mut server, head) = open(gw.addr, &mut backends, &[offer]).await;
    assert_eq!(
        head_header(&head, "sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits")
    );
    // A compressed message sets RSV1 on its first frame (RFC 7692 §6).
    let mut compressed = framed(
        TEXT,
        &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
        Some(MASK),
    );
    compressed[0] |= 0x40;
    client.send(&compressed).await;
    assert_eq!(server.read_exact(compressed.len()).await, compressed);
    let mut answer = framed(TEXT, &[0xf2, 0x48, 0x05, 0x00], None);
    answer[0] |= 0x40;
    server.send(&answer).await;
    let (header, _) = next_non_ping(&mut client).await;
    assert_eq!(header.rsv, frame::RSV1);
}

#[tokio::test]
async fn permessage_deflate_strip_removes_the_offer_before_the_backend() {
    let mut backend = WsBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\nwebsocket = {{ permessage_deflate = \"strip\" }}\n\n{}",
        upstream_config("app", "round_robin", &[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let mut client = RawClient::connect(gw.addr).await;
    let offer =
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-webkit-other";
    client.send(handshake("a.test", "/", &[offer])).await;
    let answer = client.read_head().await;
    assert_eq!(answer.status, 101, "{}", answer.raw);
    assert!(!answer.has("sec-websocket-extensions"), "{}", answer.raw);
    let seen = backend.next_handshake().await;
    assert_eq!(seen["sec-websocket-extensions"], "x-webkit-other");
}
