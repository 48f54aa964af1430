//! Splices two upgraded connections: one half per direction, half-closes propagated, an idle
//! timeout, a drain signal, byte counts, and one log line when the tunnel ends.
//!
//! Bytes move through one buffer per thread: read, then write straight through, and copy into
//! the half's own `Vec` only what the destination would not take. An idle tunnel therefore holds
//! no buffer at all, unlike `tokio::io::copy_bidirectional`'s two 8 KiB buffers per tunnel.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client_io::ClientIo;
use crate::shutdown::Signal;
use crate::telemetry::fields as f;
use crate::upstream::http1::Stream;
use crate::websocket::frame;

/// Large enough that bulk transfers make few syscalls; it exists once per worker thread.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

mod watch;

use watch::{Control, Rules, Watch};
pub use watch::{FrameCounts, ProtocolError, Violation};

/// What the close log line names.
#[derive(Debug)]
pub struct Labels {
    pub origin: Origin,
    pub client: SocketAddr,
}

/// The request a tunnel came from, as its close line names it: with the connection's and the
/// request's fields where that line is on (`close_line_enabled`), else by its route alone. The
/// fields, not the request's span: a span holds about 340 bytes of the subscriber's registry
/// (measured: an idle WebSocket holding its request's and connection's spans cost 3.1 KiB more
/// RSS, 2.5 to 5.6 KiB). 16 bytes either way: a tunnel task has no room for more.
#[derive(Debug)]
pub enum Origin {
    Route(Arc<str>),
    Request(Arc<RequestFields>),
}

/// The connection span's and the request span's fields, for one line at the tunnel's end.
#[derive(Debug)]
pub struct RequestFields {
    pub route: Arc<str>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub sni: Option<Box<str>>,
    pub method: http::Method,
    pub host: Box<str>,
    pub path: Box<str>,
}

impl Origin {
    pub fn route(&self) -> &str {
        match self {
            Origin::Route(route) => route,
            Origin::Request(request) => &request.route,
        }
    }

    fn request(&self) -> Option<&RequestFields> {
        match self {
            Origin::Route(_) => None,
            Origin::Request(request) => Some(request),
        }
    }
}

/// Whether a tunnel's close line would be written: what it is given to name depends on it.
pub fn close_line_enabled() -> bool {
    tracing::enabled!(tracing::Level::INFO)
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// No bytes either way for this long closes the tunnel.
    pub idle: Duration,
    /// Once one side has closed (or wsgate has sent its Close), this much silence from the
    /// other closes the tunnel.
    pub half_closed: Duration,
    /// `None`: an opaque byte pipe (an upgrade other than WebSocket).
    pub frames: Option<FrameOptions>,
}

/// How a WebSocket tunnel follows its frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameOptions {
    pub keepalive: Option<Keepalive>,
    pub max_frame: Option<u64>,
    pub max_message: Option<u64>,
    pub strict: bool,
    /// permessage-deflate was negotiated: RSV1 is allowed on a message's first frame.
    pub deflate: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Nothing heard from a peer for this long: it is sent a Ping.
    pub interval: Duration,
    /// Nothing heard for this long after a Ping: the peer is gone.
    pub timeout: Duration,
    /// Ping the upstream server too, not only the client.
    pub upstream: bool,
}

/// What tells a tunnel to end: `drain` politely (Close 1001 at frame boundaries, then wait for
/// the close handshakes), `close` at once, `retire` (its server left the configuration) with
/// Close 1012 at a random moment within the window it carries.
#[derive(Debug, Clone)]
pub struct Signals {
    pub drain: Signal,
    pub close: Signal,
    /// Fired with the spread in milliseconds.
    pub retire: Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    Client,
    Upstream,
    IdleTimeout,
    /// The drain period ended with the tunnel still open.
    Shutdown,
    /// Shutdown began (or the listener was removed): both sides were sent Close 1001.
    Drain,
    /// A reload removed the server: the client was sent Close 1012, the server 1001.
    Retired,
    /// This side answered nothing within the keepalive timeout.
    Unresponsive(Side),
    /// This side broke a frame limit or, in strict mode, the protocol.
    Violation(Side, Violation),
}

impl ClosedBy {
    fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Upstream => "upstream",
            ClosedBy::IdleTimeout => "idle_timeout",
            ClosedBy::Shutdown => "shutdown",
            ClosedBy::Drain => "drain",
            ClosedBy::Retired => "server_removed",
            ClosedBy::Unresponsive(Side::Client) => "client_unresponsive",
            ClosedBy::Unresponsive(Side::Upstream) => "upstream_unresponsive",
            ClosedBy::Violation(Side::Client, _) => "client_violation",
            ClosedBy::Violation(Side::Upstream, _) => "upstream_violation",
        }
    }

    fn violation(self) -> Option<&'static str> {
        match self {
            ClosedBy::Violation(_, violation) => Some(violation.as_str()),
            _ => None,
        }
    }
}

/// What one peer sent through the tunnel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Direction {
    pub bytes: u64,
    /// `None` for an opaque tunnel.
    pub frames: Option<FrameCounts>,
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub closed_by: ClosedBy,
    /// Client to upstream.
    pub up: Direction,
    /// Upstream to client.
    pub down: Direction,
}

/// What lives exactly as long as a tunnel, told how it ended before it is dropped. It knows
/// the tunnel's upstream and server (its lease does), so `Labels` need not carry them again:
/// every byte of the task is paid by every idle WebSocket.
pub trait Hold: Send + 'static {
    /// The upstream and the server, for the close line.
    fn upstream(&self) -> (&str, &str);
    fn closed(self, outcome: &Outcome, lived: std::time::Duration);
}

/// Starts the tunnel as its own task, which runs to the end, logs one line, and drops `hold`
/// (what must live as long as the tunnel: its lease, its drain guard). Plain TCP on both sides
/// is unwrapped from hyper's `Upgraded` so that reads go straight to the sockets.
///
/// The task is exactly one `Tunnel`: a hand-written future rather than an `async fn`, whose
/// state machine would hold a second copy of the splice and a future per signal. An idle
/// WebSocket costs this struct and its two sockets, nothing more.
pub fn spawn<H: Hold>(
    client: Upgraded,
    (upstream, early_upstream): (Stream, Bytes),
    labels: Labels,
    options: Options,
    signals: Signals,
    hold: H,
) {
    let (client, early_client) = unwrap_tcp(client);
    let upstream = Io::Socket(upstream);
    let splice = Splice::new(client, early_client, upstream, early_upstream, &options);
    tokio::spawn(Tunnel {
        driver: drive(splice, options, signals),
        labels,
        started: Instant::now(),
        hold: Some(hold),
    });
}

pub(crate) struct Tunnel<H> {
    driver: Driver<Io, Io>,
    labels: Labels,
    started: Instant,
    hold: Option<H>,
}

impl<H: Hold> Future for Tunnel<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `driver` is pinned structurally and never moved out; the other fields are
        // not pinned (`hold` is taken out, which is fine for an unpinned field).
        let this = unsafe { self.get_unchecked_mut() };
        let driver = unsafe { Pin::new_unchecked(&mut this.driver) };
        let (result, outcome) = ready!(driver.poll(cx));
        if let Some(hold) = this.hold.take() {
            log_close(
                &this.labels,
                hold.upstream(),
                this.started,
                &result,
                &outcome,
            );
            hold.closed(&outcome, this.started.elapsed());
        }
        Poll::Ready(())
    }
}

fn log_close(
    labels: &Labels,
    (upstream, server): (&str, &str),
    started: Instant,
    result: &io::Result<()>,
    outcome: &Outcome,
) {
    let counts = |direction: &Direction| direction.frames.unwrap_or_default();
    let (up, down) = (counts(&outcome.up), counts(&outcome.down));
    let framed = outcome.up.frames.is_some();
    let request = labels.origin.request();
    tracing::info!(
        { f::EVENT } = f::event::TUNNEL_CLOSED,
        { f::LISTENER } = request.map(|r| tracing::field::display(&r.listener)),
        { f::PEER } = request.map(|r| tracing::field::display(r.peer)),
        { f::SNI } = request.and_then(|r| r.sni.as_deref()),
        { f::METHOD } = request.map(|r| tracing::field::display(&r.method)),
        { f::HOST } = request.map(|r| &*r.host),
        { f::PATH } = request.map(|r| &*r.path),
        { f::ROUTE } = %labels.origin.route(),
        { f::UPSTREAM } = upstream,
        { f::SERVER } = server,
        { f::CLIENT } = %labels.client,
        { f::DURATION_MS } = started.elapsed().as_millis() as u64,
        { f::BYTES_UP } = outcome.up.bytes,
        { f::BYTES_DOWN } = outcome.down.bytes,
        { f::FRAMES_UP } = framed.then_some(up.frames),
        { f::FRAMES_DOWN } = framed.then_some(down.frames),
        { f::MESSAGES_UP } = framed.then_some(up.messages),
        { f::MESSAGES_DOWN } = framed.then_some(down.messages),
        { f::CLIENT_CLOSE_CODE } = up.close_code,
        { f::UPSTREAM_CLOSE_CODE } = down.close_code,
        { f::CLOSED_BY } = outcome.closed_by.as_str(),
        { f::VIOLATION } = outcome.closed_by.violation(),
        { f::ERROR } = result.as_ref().err().map(tracing::field::display),
        "websocket closed"
    );
}

/// Plain TCP under hyper's `Upgraded` (the client's `ClientIo`) is taken out, with the bytes
/// hyper had already read.
fn unwrap_tcp(upgraded: Upgraded) -> (Io, Bytes) {
    match upgraded.downcast::<TokioIo<ClientIo<TcpStream>>>() {
        Ok(parts) => {
            let (tcp, early) = parts.io.into_inner().into_parts(parts.read_buf);
            (Io::Socket(Stream::Tcp(tcp)), early)
        }
        Err(upgraded) => (Io::Upgraded(TokioIo::new(upgraded)), Bytes::new()),
    }
}

/// One side of a tunnel: a socket (plain, or TLS to the upstream), or whatever else hyper
/// upgraded on the client's side (TLS, an HTTP/2 stream).
enum Io {
    Socket(Stream),
    Upgraded(TokioIo<Upgraded>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Socket(io) => Pin::new(io).poll_read(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Socket(io) => Pin::new(io).poll_write(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Socket(io) => Pin::new(io).poll_flush(cx),
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Socket(io) => Pin::new(io).poll_shutdown(cx),
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Uniformly at random in `[0, spread)`, so that the tunnels of a retired server close spread
/// out rather than in one reconnect storm.
fn random_within(spread: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut bytes = [0; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    let nanos = spread.as_nanos().max(1);
    Duration::from_nanos((u128::from(u64::from_le_bytes(bytes)) % nanos) as u64)
}

/// Keepalive of one peer: when wsgate last pinged it without hearing from it since.
#[derive(Debug, Clone, Copy, Default)]
struct PingState {
    sent: Option<Instant>,
}

/// Drives a splice to its end: timers (idle, keepalive, the close handshake's bound) and
/// signals. `idle` bounds silence in both directions; once one side has closed, the other
/// gets only `half_closed` of silence, so a peer that never closes its end cannot pin the
/// tunnel. The one timer is re-armed only when it fires or a deadline moves earlier, so
/// moving bytes never touches the timer wheel.
fn drive<A, B>(splice: Splice<A, B>, options: Options, signals: Signals) -> Driver<A, B> {
    let timers = Timers {
        idle: options.idle,
        half_closed: options.half_closed,
        keepalive: options.frames.and_then(|frames| frames.keepalive),
        pings: [PingState::default(); 2],
        closing_until: None,
        retire_at: None,
    };
    let first = timers.next(&splice);
    Driver {
        state: State {
            splice,
            timers,
            signals,
            framed: options.frames.is_some(),
            reason: None,
            draining: false,
            retiring: false,
        },
        timer: tokio::time::sleep_until(first),
    }
}

struct Driver<A, B> {
    state: State<A, B>,
    timer: tokio::time::Sleep,
}

struct State<A, B> {
    splice: Splice<A, B>,
    timers: Timers,
    signals: Signals,
    framed: bool,
    /// Why wsgate is ending the tunnel, once it is.
    reason: Option<ClosedBy>,
    draining: bool,
    retiring: bool,
}

impl<A, B> Future for Driver<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = (io::Result<()>, Outcome);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: only `timer` is pinned structurally, and it is never moved out.
        let Driver { state: this, timer } = unsafe { self.get_unchecked_mut() };
        let mut timer = unsafe { Pin::new_unchecked(timer) };
        // Each round handles one event; a round that handles none returns Pending.
        loop {
            let mut rearm = false;
            if this.signals.close.poll_fired(cx).is_ready() {
                this.reason = Some(ClosedBy::Shutdown);
                return Poll::Ready(this.finish(Ok(())));
            }
            if this.framed && !this.draining && this.signals.drain.poll_fired(cx).is_ready() {
                this.draining = true;
                let going_away = frame::close_code::GOING_AWAY;
                this.close_politely(ClosedBy::Drain, Side::Client, going_away, Some(going_away));
                rearm = true;
            }
            if !this.retiring && this.signals.retire.poll_fired(cx).is_ready() {
                this.retiring = true;
                let spread = Duration::from_millis(this.signals.retire.value());
                this.timers.retire_at = Some(Instant::now() + random_within(spread));
                rearm = true;
            }
            match this.splice.poll_event(cx) {
                Poll::Ready(Event::Finished(result)) => return Poll::Ready(this.finish(result)),
                Poll::Ready(Event::HalfClosed) => {
                    this.timers.idle = this.timers.idle.min(this.timers.half_closed);
                    rearm = true;
                }
                Poll::Ready(Event::Violation(side, violation)) => {
                    // The breaking side is told why; the other was sent 1001 already.
                    let why = ClosedBy::Violation(side, violation);
                    this.close_politely(why, side, violation.close_code(), None);
                    rearm = true;
                }
                Poll::Pending => {}
            }
            if rearm {
                timer.as_mut().reset(this.timers.next(&this.splice));
                continue;
            }
            ready!(timer.as_mut().poll(cx));
            match this.timers.fired(&mut this.splice) {
                Due::Nothing => {}
                Due::Retire if !this.framed => {
                    this.reason.get_or_insert(ClosedBy::Retired);
                    return Poll::Ready(this.finish(Ok(())));
                }
                Due::Retire => {
                    let restart = frame::close_code::SERVICE_RESTART;
                    let going_away = frame::close_code::GOING_AWAY;
                    this.close_politely(ClosedBy::Retired, Side::Client, restart, Some(going_away));
                }
                Due::Closing(why) => {
                    this.reason.get_or_insert(why);
                }
                Due::End(why) => {
                    this.reason.get_or_insert(why);
                    return Poll::Ready(this.finish(Ok(())));
                }
            }
            timer.as_mut().reset(this.timers.next(&this.splice));
        }
    }
}

impl<A, B> State<A, B> {
    /// Sends `side` Close `code` and the other side `other` (unless already closing), and
    /// bounds the close handshakes from now.
    fn close_politely(&mut self, why: ClosedBy, side: Side, code: u16, other: Option<u16>) {
        if self.reason.is_none() {
            self.reason = Some(why);
            self.splice.start_close(side, code, other);
            self.timers.closing();
        }
    }

    fn finish(&mut self, result: Result<(), (ClosedBy, io::Error)>) -> (io::Result<()>, Outcome) {
        let closed_by = self
            .reason
            .or(self.splice.first_eof)
            .unwrap_or(match &result {
                Err((side, _)) => *side,
                Ok(()) => ClosedBy::Client,
            });
        let outcome = Outcome {
            closed_by,
            up: self.splice.up.direction(),
            down: self.splice.down.direction(),
        };
        (result.map_err(|(_, err)| err), outcome)
    }
}

struct Timers {
    idle: Duration,
    half_closed: Duration,
    keepalive: Option<Keepalive>,
    /// Indexed by `Side as usize`.
    pings: [PingState; 2],
    /// wsgate sent its Close: the close handshakes must end by then.
    closing_until: Option<Instant>,
    /// The server was retired: the tunnel closes then.
    retire_at: Option<Instant>,
}

impl Timers {
    fn pinged(&self, side: Side) -> Option<Keepalive> {
        self.keepalive
            .filter(|k| side == Side::Client || k.upstream)
            .filter(|_| self.closing_until.is_none())
    }

    fn closing(&mut self) {
        self.closing_until
            .get_or_insert_with(|| Instant::now() + self.half_closed);
    }

    fn next<A, B>(&self, splice: &Splice<A, B>) -> Instant {
        let mut next = splice.last_activity() + self.idle;
        for at in [self.closing_until, self.retire_at].into_iter().flatten() {
            next = next.min(at);
        }
        let now = Instant::now();
        for side in [Side::Client, Side::Upstream] {
            let Some(keepalive) = self.pinged(side) else {
                continue;
            };
            let heard = splice.heard[side as usize];
            next = next.min(match self.pings[side as usize].sent {
                Some(sent) if heard < sent => {
                    // Hearing back does not re-arm the timer, so look once an interval in
                    // (the next Ping is due an interval after the answer), then at the timeout.
                    let look = sent + keepalive.interval.min(keepalive.timeout);
                    if look > now {
                        look
                    } else {
                        sent + keepalive.timeout
                    }
                }
                _ => heard + keepalive.interval,
            });
        }
        next
    }

    /// What the timer found due.
    fn fired<A, B>(&mut self, splice: &mut Splice<A, B>) -> Due {
        let now = Instant::now();
        if self.closing_until.is_some_and(|until| now >= until) {
            // The close handshake did not finish in time; the reason is already recorded.
            return Due::End(ClosedBy::IdleTimeout);
        }
        if now >= splice.last_activity() + self.idle {
            return Due::End(ClosedBy::IdleTimeout);
        }
        if self.retire_at.is_some_and(|at| now >= at) {
            self.retire_at = None;
            return Due::Retire;
        }
        for side in [Side::Client, Side::Upstream] {
            let Some(keepalive) = self.pinged(side) else {
                continue;
            };
            let heard = splice.heard[side as usize];
            let ping = &mut self.pings[side as usize];
            if ping.sent.is_some_and(|sent| heard >= sent) {
                ping.sent = None;
            }
            match ping.sent {
                Some(sent) if now >= sent + keepalive.timeout => {
                    let reason = ClosedBy::Unresponsive(side);
                    if splice.give_up_on(side) {
                        self.closing();
                        return Due::Closing(reason);
                    }
                    return Due::End(reason);
                }
                None if now >= heard + keepalive.interval => {
                    // Counted as sent even when this direction already carried a Close (and
                    // so takes no Ping): the peer then has `timeout` to finish closing.
                    splice.half_toward(side).ping();
                    ping.sent = Some(now);
                }
                _ => {}
            }
        }
        Due::Nothing
    }
}

enum Due {
    Nothing,
    /// The server was retired and this tunnel's moment has come.
    Retire,
    /// Close frames are on their way; the tunnel ends when they are written or answered.
    Closing(ClosedBy),
    /// End the tunnel now.
    End(ClosedBy),
}

/// Both directions of a tunnel; finished when both have ended.
struct Splice<A, B> {
    client: A,
    upstream: B,
    /// Client to upstream.
    up: Half,
    /// Upstream to client.
    down: Half,
    /// When bytes last came from each side, indexed by `Side as usize`.
    heard: [Instant; 2],
    first_eof: Option<ClosedBy>,
}

/// What one poll of a splice found worth telling its driver.
enum Event {
    /// One direction has just ended; the other may go on.
    HalfClosed,
    /// This side broke a frame rule; the other side has been sent Close 1001.
    Violation(Side, Violation),
    Finished(Result<(), (ClosedBy, io::Error)>),
}

impl<A, B> Splice<A, B> {
    /// `early_*` are bytes a side sent right behind the handshake, already read by hyper.
    fn new(
        client: A,
        early_client: Bytes,
        upstream: B,
        early_upstream: Bytes,
        options: &Options,
    ) -> Self {
        let now = Instant::now();
        Splice {
            client,
            upstream,
            up: Half::new(Side::Client, options, &early_client),
            down: Half::new(Side::Upstream, options, &early_upstream),
            heard: [now; 2],
            first_eof: None,
        }
    }

    fn last_activity(&self) -> Instant {
        self.heard[0].max(self.heard[1])
    }

    /// The half whose destination is `side`.
    fn half_toward(&mut self, side: Side) -> &mut Half {
        match side {
            Side::Client => &mut self.down,
            Side::Upstream => &mut self.up,
        }
    }

    /// Sends `side` a Close with `code`, and the other side one with `other` if given; from
    /// then on the tunnel ends when each Close is answered (or its source ends).
    fn start_close(&mut self, side: Side, code: u16, other: Option<u16>) {
        self.half_toward(side).close(code);
        let opposite = match side {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        };
        let half = self.half_toward(opposite);
        match other {
            Some(code) => half.close(code),
            None => half.closing = true,
        }
    }

    /// `side` answers nothing: the live side is sent Close 1001 if its stream is at a frame
    /// boundary (true), else there is nothing polite left to do (false).
    fn give_up_on(&mut self, side: Side) -> bool {
        let (from_dead, to_dead) = match side {
            Side::Client => (&mut self.up, &mut self.down),
            Side::Upstream => (&mut self.down, &mut self.up),
        };
        if !from_dead.at_boundary() {
            return false;
        }
        from_dead.close(frame::close_code::GOING_AWAY);
        from_dead.source_gone = true;
        to_dead.done = true;
        true
    }
}

impl<A, B> Splice<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let mut heard = [false; 2];
        let was_open = self.first_eof.is_none();
        let up = poll_direction(
            &mut self.up,
            cx,
            (&mut self.client, &mut self.upstream),
            self.down.done,
            &mut heard[0],
        );
        // After `up`: if it has just ended, this one is the last.
        let down = poll_direction(
            &mut self.down,
            cx,
            (&mut self.upstream, &mut self.client),
            self.up.done,
            &mut heard[1],
        );
        for (ended, side) in [(up, ClosedBy::Client), (down, ClosedBy::Upstream)] {
            match ended {
                Some(Err(err)) => return Poll::Ready(Event::Finished(Err((side, err)))),
                Some(Ok(())) => {
                    self.first_eof.get_or_insert(side);
                }
                None => {}
            }
        }
        if heard[0] || heard[1] {
            let now = Instant::now();
            for (at, heard) in self.heard.iter_mut().zip(heard) {
                if heard {
                    *at = now;
                }
            }
        }
        if let Some(violation) = self.up.violation.take() {
            return Poll::Ready(Event::Violation(Side::Client, violation));
        }
        if let Some(violation) = self.down.violation.take() {
            return Poll::Ready(Event::Violation(Side::Upstream, violation));
        }
        if self.up.done && self.down.done {
            Poll::Ready(Event::Finished(Ok(())))
        } else if was_open && self.first_eof.is_some() {
            Poll::Ready(Event::HalfClosed)
        } else {
            Poll::Pending
        }
    }
}

/// Polls one direction unless it is over; `Some` once it has just ended (or failed).
/// `other_done`: the other direction is over already.
fn poll_direction<R, W>(
    half: &mut Half,
    cx: &mut Context<'_>,
    (reader, writer): (&mut R, &mut W),
    other_done: bool,
    heard: &mut bool,
) -> Option<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if half.done {
        return None;
    }
    match half.poll(cx, reader, writer, other_done, heard) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

/// One direction's state. `pending` is empty (and unallocated) unless the destination was
/// slow or wsgate changed what a read carried.
struct Half {
    pending: Vec<u8>,
    written: usize,
    read_done: bool,
    done: bool,
    unflushed: bool,
    /// Read from the source.
    bytes: u64,
    /// `None` for an opaque tunnel.
    watch: Option<Watch>,
    /// wsgate is closing the tunnel: this direction ends once its Close has gone and the
    /// source's has come (or the source is gone).
    closing: bool,
    source_gone: bool,
    violation: Option<Violation>,
}

impl Half {
    fn new(from: Side, options: &Options, early: &[u8]) -> Half {
        let watch = options.frames.map(|frames| {
            Watch::new(Rules {
                from,
                max_frame: frames.max_frame.unwrap_or(u64::MAX),
                max_message: frames.max_message.unwrap_or(u64::MAX),
                strict: frames.strict,
                deflate: frames.deflate,
                pinged: frames
                    .keepalive
                    .is_some_and(|k| from == Side::Client || k.upstream),
            })
        });
        let mut half = Half {
            pending: Vec::new(),
            written: 0,
            read_done: false,
            done: false,
            unflushed: false,
            bytes: early.len() as u64,
            watch,
            closing: false,
            source_gone: false,
            violation: None,
        };
        // Copied out so that hyper's read buffer, which `Bytes` would pin, is freed now.
        half.pending = match half.watch.as_mut().map(|watch| watch.scan(early)) {
            Some((edited, violation)) => {
                half.violation = violation;
                edited.unwrap_or_else(|| early.to_vec())
            }
            None => early.to_vec(),
        };
        half
    }

    fn direction(&self) -> Direction {
        Direction {
            bytes: self.bytes,
            frames: self.watch.as_ref().map(|watch| watch.counts),
        }
    }

    fn at_boundary(&self) -> bool {
        self.watch
            .as_ref()
            .is_some_and(|watch| watch.at_boundary() && !watch.close_sent)
    }

    /// Queues a Ping, unless this direction already carried a Close (nothing may follow it).
    fn ping(&mut self) {
        if let Some(watch) = self.watch.as_mut().filter(|w| !w.close_sent) {
            watch.inject.get_or_insert(Control::Ping);
        }
    }

    fn close(&mut self, code: u16) {
        self.closing = true;
        if let Some(watch) = &mut self.watch {
            if !watch.close_sent {
                watch.inject = Some(Control::Close(code));
            }
        }
    }

    fn close_complete(&self) -> bool {
        self.closing
            && self.watch.as_ref().is_some_and(|watch| {
                watch.close_sent
                    && (watch.close_heard || self.source_gone)
                    && watch.inject.is_none()
            })
    }

    /// Ready once this direction saw EOF (or finished wsgate's close handshake), delivered
    /// everything and shut the writer down. `last`: the other direction is over, so both
    /// sockets close as soon as this one ends, and closing sends the FIN: an explicit
    /// shutdown would be a wasted syscall.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        last: bool,
        heard: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            while self.written < self.pending.len() {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                // Release the backlog's memory; an idle tunnel keeps nothing.
                self.pending = Vec::new();
                self.written = 0;
            }
            if let Some(watch) = self.watch.as_mut().filter(|w| w.inject.is_some()) {
                watch.inject_now(&mut self.pending);
                if !self.pending.is_empty() {
                    continue;
                }
            }
            if self.read_done || self.close_complete() {
                // The peer may already be gone; its write side is closed either way.
                let _ = if last {
                    // Buffering writers (TLS, HTTP/2) must still hand over what they hold.
                    ready!(Pin::new(&mut *writer).poll_flush(cx))
                } else {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx))
                };
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with_borrow_mut(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(self.forward(cx, writer, buf.filled()))),
                }
            });
            match step {
                Poll::Ready(Ok(Ok(true))) => *heard = true,
                Poll::Ready(Ok(Ok(false))) => self.read_done = true,
                Poll::Ready(Ok(Err(err))) | Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    if self.unflushed {
                        // TCP flushes are free; TLS and HTTP/2 writers may hold bytes back.
                        if let Poll::Ready(result) = Pin::new(&mut *writer).poll_flush(cx) {
                            result?;
                            self.unflushed = false;
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Passes freshly read `data` on: unchanged straight through, or as the watch rewrote it.
    /// `Ok(false)` means EOF.
    fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
        data: &[u8],
    ) -> io::Result<bool> {
        if data.is_empty() {
            return Ok(false);
        }
        self.bytes += data.len() as u64;
        if let Some(watch) = &mut self.watch {
            let (edited, violation) = watch.scan(data);
            self.violation = self.violation.or(violation);
            if let Some(edited) = edited {
                // Rare (a Ping or Close inserted, a Pong or refused frame taken out): the
                // backlog path writes it.
                self.pending = edited;
                self.written = 0;
                return Ok(true);
            }
        }
        self.write_through(cx, writer, data)?;
        Ok(true)
    }

    /// Writes `data` on, keeping what the writer refused.
    fn write_through<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
        data: &[u8],
    ) -> io::Result<()> {
        let taken = match Pin::new(&mut *writer).poll_write(cx, data) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => 0,
        };
        self.unflushed |= taken > 0;
        self.pending.extend_from_slice(&data[taken..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
