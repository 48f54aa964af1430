//! The tunnel over in-memory pipes, in paused time: what each peer sees of keepalive, drain,
//! limits and strict mode, byte for byte.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::*;
use crate::shutdown::{self, Trigger};
use crate::websocket::frame::{
    close_code, encode, encode_close, Header, BINARY, CLOSE, PING, PONG, TEXT,
};

const MASK: [u8; 4] = [1, 2, 3, 4];
/// In paused time this is simulated; it only bounds a test that would otherwise hang.
const WAIT: Duration = Duration::from_secs(3600);

struct Tunnel {
    client: DuplexStream,
    upstream: DuplexStream,
    drain: Trigger,
    _close: Trigger,
    retire: Trigger,
    task: JoinHandle<(io::Result<()>, Outcome)>,
}

fn options(frames: FrameOptions) -> Options {
    Options {
        idle: Duration::from_secs(600),
        half_closed: Duration::from_secs(30),
        frames: Some(frames),
    }
}

fn keepalive() -> FrameOptions {
    FrameOptions {
        keepalive: Some(Keepalive {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(20),
            upstream: false,
        }),
        ..FrameOptions::default()
    }
}

fn start(options: Options) -> Tunnel {
    let (client_io, client) = tokio::io::duplex(1 << 20);
    let (upstream_io, upstream) = tokio::io::duplex(1 << 20);
    let (drain, drain_signal) = shutdown::channel();
    let (close, close_signal) = shutdown::channel();
    let splice = Splice::new(client_io, Bytes::new(), upstream_io, Bytes::new(), &options);
    let (retire, retirement) = shutdown::channel();
    let signals = Signals {
        drain: drain_signal,
        close: close_signal,
        retire: retirement,
    };
    let task = tokio::spawn(drive(splice, options, signals));
    Tunnel {
        client,
        upstream,
        drain,
        _close: close,
        retire,
        task,
    }
}

fn framed(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out, opcode, payload, mask);
    out
}

fn close_frame(code: u16, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_close(&mut out, code, "", mask);
    out
}

/// The next whole frame a peer receives: its header and unmasked payload.
async fn next_frame(peer: &mut DuplexStream) -> (Header, Vec<u8>) {
    let mut head = Vec::new();
    let (header, len) = loop {
        if let Some(parsed) = Header::parse(&head) {
            break parsed;
        }
        let mut byte = [0];
        within(peer.read_exact(&mut byte)).await.unwrap();
        head.push(byte[0]);
    };
    assert_eq!(head.len(), len);
    let mut payload = vec![0; header.payload_len as usize];
    within(peer.read_exact(&mut payload)).await.unwrap();
    if let Some(key) = header.mask {
        frame::apply_mask(&mut payload, key, 0);
    }
    (header, payload)
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("the tunnel did not answer")
}

async fn send(peer: &mut DuplexStream, bytes: &[u8]) {
    within(peer.write_all(bytes)).await.unwrap();
}

/// Reads until EOF; what came before it must be nothing.
async fn expect_eof(peer: &mut DuplexStream) {
    let mut rest = Vec::new();
    within(peer.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "after the close: {rest:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_pinged_and_its_pong_goes_no_further() {
    let mut t = start(options(keepalive()));
    let before = Instant::now();
    let (ping, token) = next_frame(&mut t.client).await;
    assert_eq!(ping.opcode, PING);
    assert_eq!(ping.mask, None, "frames to a client are never masked");
    assert!(before.elapsed() >= Duration::from_secs(30));
    // The Pong and the next message arrive in one read.
    let mut reply = framed(PONG, &token, Some(MASK));
    reply.extend(framed(TEXT, b"after", Some(MASK)));
    send(&mut t.client, &reply).await;
    let (first, payload) = next_frame(&mut t.upstream).await;
    assert_eq!((first.opcode, payload.as_slice()), (TEXT, &b"after"[..]));
    // Answered: the next Ping comes an interval after the client was last heard.
    let (again, _) = next_frame(&mut t.client).await;
    assert_eq!(again.opcode, PING);
    t.task.abort();
}

#[tokio::test(start_paused = true)]
async fn application_pings_and_pongs_pass_both_ways_unchanged() {
    let mut t = start(options(keepalive()));
    let ping = framed(PING, b"app", Some(MASK));
    send(&mut t.client, &ping).await;
    let mut seen = vec![0; ping.len()];
    within(t.upstream.read_exact(&mut seen)).await.unwrap();
    assert_eq!(seen, ping);
    let pong = framed(PONG, b"app", None);
    send(&mut t.upstream, &pong).await;
    let mut seen = vec![0; pong.len()];
    within(t.client.read_exact(&mut seen)).await.unwrap();
    assert_eq!(seen, pong);
    // A Pong with a payload of wsgate's length but not its token is the application's.
    let stray = framed(PONG, b"12345678", Some(MASK));
    send(&mut t.client, &stray).await;
    let mut seen = vec![0; stray.len()];
    within(t.upstream.read_exact(&mut seen)).await.unwrap();
    assert_eq!(seen, stray);
    t.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_answering_is_closed_and_the_backend_gets_1001() {
    let mut t = start(options(keepalive()));
    let started = Instant::now();
    let (ping, _) = next_frame(&mut t.client).await;
    assert_eq!(ping.opcode, PING);
    let (close, payload) = next_frame(&mut t.upstream).await;
    assert_eq!(close.opcode, CLOSE);
    assert!(close.mask.is_some(), "frames to a server are masked");
    assert_eq!(frame::close_code(&payload), Some(close_code::GOING_AWAY));
    expect_eof(&mut t.upstream).await;
    let (result, outcome) = within(t.task).await.unwrap();
    result.unwrap();
    assert_eq!(outcome.closed_by, ClosedBy::Unresponsive(Side::Client));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(50) && took < Duration::from_secs(51),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_keepalive_pings_masked_and_swallows_the_pong() {
    let mut frames = keepalive();
    frames.keepalive.as_mut().unwrap().upstream = true;
    let mut t = start(options(frames));
    let (ping, token) = next_frame(&mut t.upstream).await;
    assert_eq!(ping.opcode, PING);
    assert!(ping.mask.is_some());
    let mut reply = framed(PONG, &token, None);
    reply.extend(framed(BINARY, b"data", None));
    send(&mut t.upstream, &reply).await;
    // The client was pinged too; answer, then look at what came from upstream.
    let (client_ping, token) = next_frame(&mut t.client).await;
    assert_eq!(client_ping.opcode, PING);
    send(&mut t.client, &framed(PONG, &token, Some(MASK))).await;
    let (data, payload) = next_frame(&mut t.client).await;
    assert_eq!((data.opcode, payload.as_slice()), (BINARY, &b"data"[..]));
    t.task.abort();
}

#[tokio::test(start_paused = true)]
async fn drain_closes_both_sides_with_1001_after_the_frame_in_flight() {
    let mut t = start(options(FrameOptions::default()));
    let whole = framed(BINARY, &[7; 1000], None);
    send(&mut t.upstream, &whole[..500]).await;
    let mut seen = vec![0; 500];
    within(t.client.read_exact(&mut seen)).await.unwrap();
    t.drain.fire();
    // The client side is mid-frame: its Close waits; the upstream side gets one now.
    let (close, payload) = next_frame(&mut t.upstream).await;
    assert_eq!(close.opcode, CLOSE);
    assert_eq!(frame::close_code(&payload), Some(close_code::GOING_AWAY));
    send(&mut t.upstream, &whole[500..]).await;
    let mut rest = vec![0; whole.len() - 500];
    within(t.client.read_exact(&mut rest)).await.unwrap();
    assert!(
        [seen, rest].concat() == whole,
        "the frame in flight is whole"
    );
    let (close, payload) = next_frame(&mut t.client).await;
    assert_eq!(close.opcode, CLOSE);
    assert_eq!(frame::close_code(&payload), Some(close_code::GOING_AWAY));
    // Both answer: the close handshakes end the tunnel, and the answers go no further.
    send(
        &mut t.client,
        &close_frame(close_code::GOING_AWAY, Some(MASK)),
    )
    .await;
    send(&mut t.upstream, &close_frame(close_code::GOING_AWAY, None)).await;
    expect_eof(&mut t.client).await;
    expect_eof(&mut t.upstream).await;
    let (result, outcome) = within(t.task).await.unwrap();
    result.unwrap();
    assert_eq!(outcome.closed_by, ClosedBy::Drain);
    assert_eq!(outcome.up.frames.unwrap().close_code, Some(1001));
}

#[tokio::test(start_paused = true)]
async fn drain_gives_up_on_peers_that_never_answer_the_close() {
    let mut t = start(options(FrameOptions::default()));
    let started = Instant::now();
    t.drain.fire();
    let (close, _) = next_frame(&mut t.client).await;
    assert_eq!(close.opcode, CLOSE);
    let (result, outcome) = within(t.task).await.unwrap();
    result.unwrap();
    assert_eq!(outcome.closed_by, ClosedBy::Drain);
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "half_closed bounds the wait"
    );
}

#[tokio::test(start_paused = true)]
async fn an_opaque_tunnel_ignores_the_drain() {
    let mut t = start(Options {
        frames: None,
        ..options(FrameOptions::default())
    });
    t.drain.fire();
    send(&mut t.client, b"not a frame").await;
    let mut seen = [0; 11];
    within(t.upstream.read_exact(&mut seen)).await.unwrap();
    assert_eq!(&seen, b"not a frame");
    t.task.abort();
}

/// A frame that breaks a rule: the sender is told `code`, the other side 1001, and the frame
/// never reaches it.
async fn refused(frames: FrameOptions, from_client: bool, bytes: &[u8], code: u16, why: Violation) {
    let mut t = start(options(frames));
    let ok = if from_client {
        framed(TEXT, b"ok", Some(MASK))
    } else {
        framed(TEXT, b"ok", None)
    };
    let stream = [ok.as_slice(), bytes].concat();
    let (sender, other) = if from_client {
        (&mut t.client, &mut t.upstream)
    } else {
        (&mut t.upstream, &mut t.client)
    };
    send(sender, &stream).await;
    let (first, payload) = next_frame(other).await;
    assert_eq!(
        (first.opcode, payload.as_slice()),
        (TEXT, &b"ok"[..]),
        "{why:?}"
    );
    let (close, payload) = next_frame(other).await;
    assert_eq!(close.opcode, CLOSE, "{why:?}");
    assert_eq!(
        frame::close_code(&payload),
        Some(close_code::GOING_AWAY),
        "{why:?}"
    );
    let (close, payload) = next_frame(sender).await;
    assert_eq!(close.opcode, CLOSE, "{why:?}");
    assert_eq!(frame::close_code(&payload), Some(code), "{why:?}");
    let side = if from_client {
        Side::Client
    } else {
        Side::Upstream
    };
    send(sender, &close_frame(code, from_client.then_some(MASK))).await;
    send(other, &close_frame(1001, (!from_client).then_some(MASK))).await;
    let (_, outcome) = within(t.task).await.unwrap();
    assert_eq!(outcome.closed_by, ClosedBy::Violation(side, why));
}

#[tokio::test(start_paused = true)]
async fn frames_and_messages_over_the_limits_are_refused_with_1009() {
    let limits = FrameOptions {
        max_frame: Some(100),
        max_message: Some(150),
        ..FrameOptions::default()
    };
    let big = framed(BINARY, &[0; 101], Some(MASK));
    refused(
        limits,
        true,
        &big,
        close_code::MESSAGE_TOO_BIG,
        Violation::FrameTooBig,
    )
    .await;
    let big = framed(BINARY, &[0; 101], None);
    refused(
        limits,
        false,
        &big,
        close_code::MESSAGE_TOO_BIG,
        Violation::FrameTooBig,
    )
    .await;
    // Three fragments of 60, with a Ping between: the third passes the message limit.
    let mut fragments = vec![0x02, 0x80 | 60];
    fragments.extend(MASK);
    fragments.extend([0; 60]);
    fragments.extend(framed(PING, b"", Some(MASK)));
    fragments.extend([0x00, 0x80 | 60]);
    fragments.extend(MASK);
    fragments.extend([0; 60]);
    fragments.extend([0x80, 0x80 | 60]);
    fragments.extend(MASK);
    fragments.extend([0; 60]);
    let mut t = start(options(limits));
    send(&mut t.client, &fragments).await;
    for opcode in [BINARY, PING, 0x00] {
        assert_eq!(next_frame(&mut t.upstream).await.0.opcode, opcode);
    }
    let (close, payload) = next_frame(&mut t.upstream).await;
    assert_eq!(
        (close.opcode, frame::close_code(&payload)),
        (CLOSE, Some(1001))
    );
    let (close, payload) = next_frame(&mut t.client).await;
    assert_eq!(
        (close.opcode, frame::close_code(&payload)),
        (CLOSE, Some(1009))
    );
    t.task.abort();
}

#[tokio::test(start_paused = true)]
async fn strict_mode_refuses_each_protocol_error_with_1002() {
    let strict = FrameOptions {
        strict: true,
        ..FrameOptions::default()
    };
    use super::watch::ProtocolError::*;
    let cases: [(super::watch::ProtocolError, bool, Vec<u8>); 7] = [
        (UnmaskedClientFrame, true, framed(TEXT, b"x", None)),
        (MaskedServerFrame, false, framed(TEXT, b"x", Some(MASK))),
        (ReservedOpcode, true, framed(0x3, b"x", Some(MASK))),
        (ReservedBits, true, {
            let mut f = framed(TEXT, b"x", Some(MASK));
            f[0] |= 0x40;
            f
        }),
        (ControlFrameTooLong, false, framed(PING, &[0; 126], None)),
        (FragmentedControlFrame, true, {
            let mut f = framed(PING, b"x", Some(MASK));
            f[0] &= 0x7f;
            f
        }),
        (BadFragmentation, true, framed(0x0, b"x", Some(MASK))),
    ];
    for (what, from_client, bytes) in cases {
        let code = close_code::PROTOCOL_ERROR;
        refused(strict, from_client, &bytes, code, Violation::Protocol(what)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn strict_mode_allows_rsv1_once_deflate_is_negotiated() {
    let mut t = start(options(FrameOptions {
        strict: true,
        deflate: true,
        ..FrameOptions::default()
    }));
    let mut compressed = framed(TEXT, b"x", Some(MASK));
    compressed[0] |= 0x40;
    send(&mut t.client, &compressed).await;
    let mut seen = vec![0; compressed.len()];
    within(t.upstream.read_exact(&mut seen)).await.unwrap();
    assert_eq!(seen, compressed);
    t.task.abort();
}

#[tokio::test(start_paused = true)]
async fn frames_messages_and_close_codes_are_counted_per_direction() {
    let mut t = start(options(FrameOptions::default()));
    // A message in two fragments with a Ping between them, then a whole one, then a Close.
    let mut up = vec![0x01, 0x80 | 3];
    up.extend(MASK);
    up.extend(b"abc");
    up.extend(framed(PING, b"p", Some(MASK)));
    up.extend([0x80, 0x80 | 2]);
    up.extend(MASK);
    up.extend(b"de");
    up.extend(framed(BINARY, b"whole", Some(MASK)));
    up.extend(close_frame(4001, Some(MASK)));
    // Written a byte at a time: the counts do not depend on how reads fall.
    for byte in &up {
        send(&mut t.client, &[*byte]).await;
    }
    let mut seen = vec![0; up.len()];
    within(t.upstream.read_exact(&mut seen)).await.unwrap();
    assert_eq!(seen, up, "passed through untouched");
    send(&mut t.upstream, &close_frame(4001, None)).await;
    drop(t.upstream);
    let mut rest = Vec::new();
    within(t.client.read_to_end(&mut rest)).await.unwrap();
    drop(t.client);
    let (_, outcome) = within(t.task).await.unwrap();
    let up = outcome.up.frames.unwrap();
    assert_eq!((up.frames, up.messages, up.close_code), (5, 2, Some(4001)));
    let down = outcome.down.frames.unwrap();
    assert_eq!(
        (down.frames, down.messages, down.close_code),
        (1, 0, Some(4001))
    );
}

#[tokio::test(start_paused = true)]
async fn after_an_answer_the_next_ping_comes_one_interval_later_even_with_a_longer_timeout() {
    let mut t = start(options(FrameOptions {
        keepalive: Some(Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
            upstream: false,
        }),
        ..FrameOptions::default()
    }));
    let (_, token) = next_frame(&mut t.client).await;
    send(&mut t.client, &framed(PONG, &token, Some(MASK))).await;
    let answered = Instant::now();
    let (again, _) = next_frame(&mut t.client).await;
    assert_eq!(again.opcode, PING);
    let gap = answered.elapsed();
    assert!(
        gap >= Duration::from_secs(10) && gap < Duration::from_secs(11),
        "{gap:?}"
    );
    t.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_retired_server_closes_its_tunnels_with_1012_within_the_spread() {
    let mut t = start(options(FrameOptions::default()));
    let retired = Instant::now();
    t.retire.fire_with(10_000);
    let (close, payload) = next_frame(&mut t.client).await;
    assert_eq!(close.opcode, CLOSE);
    assert_eq!(
        frame::close_code(&payload),
        Some(close_code::SERVICE_RESTART)
    );
    assert!(retired.elapsed() < Duration::from_secs(10));
    let (close, payload) = next_frame(&mut t.upstream).await;
    assert_eq!(close.opcode, CLOSE);
    assert_eq!(frame::close_code(&payload), Some(close_code::GOING_AWAY));
    send(
        &mut t.client,
        &close_frame(close_code::SERVICE_RESTART, Some(MASK)),
    )
    .await;
    send(&mut t.upstream, &close_frame(close_code::GOING_AWAY, None)).await;
    let (_, outcome) = within(t.task).await.unwrap();
    assert_eq!(outcome.closed_by, ClosedBy::Retired);
}

#[test]
fn retirement_moments_spread_over_the_whole_window() {
    let spread = Duration::from_secs(30);
    let moments: Vec<Duration> = (0..200).map(|_| random_within(spread)).collect();
    assert!(moments.iter().all(|m| *m < spread));
    // 200 uniform draws: all in one third of the window would be astronomically unlikely.
    assert!(moments.iter().any(|m| *m < Duration::from_secs(10)));
    assert!(moments.iter().any(|m| *m > Duration::from_secs(20)));
}

/// An idle WebSocket costs its task, which is one `Tunnel`: keep it from growing unnoticed.
#[test]
fn a_tunnel_task_stays_small() {
    let size = std::mem::size_of::<super::Tunnel<()>>();
    eprintln!(
        "Tunnel {size} Splice {} Half {} Watch {} Timers {} Signals {} Labels {} Sleep {}",
        std::mem::size_of::<Splice<Io, Io>>(),
        std::mem::size_of::<Half>(),
        std::mem::size_of::<Watch>(),
        std::mem::size_of::<Timers>(),
        std::mem::size_of::<Signals>(),
        std::mem::size_of::<Labels>(),
        std::mem::size_of::<tokio::time::Sleep>(),
    );
    assert!(size <= 1024, "a tunnel is {size} bytes");
}
