//! Splices two upgraded connections: one half per direction, half-closes propagated, an idle
//! timeout, a drain signal, byte counts, and one log line when the tunnel ends.
//!
//! Bytes move through one buffer per thread: read, then write straight through, and copy into
//! the half's own `Vec` only what the destination would not take. An idle tunnel therefore holds
//! no buffer at all, unlike `tokio::io::copy_bidirectional`'s two 8 KiB buffers per tunnel.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::shutdown::Signal;

/// Large enough that bulk transfers make few syscalls; it exists once per worker thread.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// What the close log line names.
#[derive(Debug)]
pub struct Labels {
    pub route: String,
    pub upstream: String,
    pub server: String,
    pub client: SocketAddr,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// No bytes either way for this long closes the tunnel.
    pub idle: Duration,
    /// Once one side has closed, this much silence from the other closes the tunnel.
    pub half_closed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    Client,
    Upstream,
    IdleTimeout,
    Shutdown,
}

impl ClosedBy {
    fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Upstream => "upstream",
            ClosedBy::IdleTimeout => "idle_timeout",
            ClosedBy::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub closed_by: ClosedBy,
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
}

/// Runs the tunnel to its end and logs one line. Plain TCP on both sides is unwrapped from
/// hyper's `Upgraded` so that reads go straight to the sockets.
pub async fn run(
    client: Upgraded,
    upstream: Upgraded,
    labels: &Labels,
    limits: Limits,
    close: Signal,
) -> Outcome {
    let started = Instant::now();
    let (client, early_client) = unwrap_tcp(client);
    let (upstream, early_upstream) = unwrap_tcp(upstream);
    let splice = Splice::new(client, early_client, upstream, early_upstream);
    let outcome = drive(splice, limits, close).await;
    let (result, outcome) = outcome;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(()) => tracing::info!(
            route = %labels.route,
            upstream = %labels.upstream,
            server = %labels.server,
            client = %labels.client,
            duration_ms,
            bytes_up = outcome.bytes_up,
            bytes_down = outcome.bytes_down,
            closed_by = outcome.closed_by.as_str(),
            "websocket closed"
        ),
        Err(err) => tracing::info!(
            route = %labels.route,
            upstream = %labels.upstream,
            server = %labels.server,
            client = %labels.client,
            duration_ms,
            bytes_up = outcome.bytes_up,
            bytes_down = outcome.bytes_down,
            closed_by = outcome.closed_by.as_str(),
            error = %err,
            "websocket closed"
        ),
    }
    outcome
}

/// Plain TCP under hyper's `Upgraded` is taken out, with the bytes hyper had already read.
fn unwrap_tcp(upgraded: Upgraded) -> (Io, Bytes) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (Io::Tcp(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => (Io::Upgraded(TokioIo::new(upgraded)), Bytes::new()),
    }
}

/// One side of a tunnel: a bare socket, or whatever else hyper upgraded (TLS, HTTP/2 later).
enum Io {
    Tcp(TcpStream),
    Upgraded(TokioIo<Upgraded>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_read(cx, buf),
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
            Io::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_flush(cx),
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// `idle` bounds silence in both directions; once one side has closed, the other gets only
/// `half_closed` of silence, so a peer that never closes its end cannot pin the tunnel.
async fn drive<A, B>(
    mut splice: Splice<A, B>,
    limits: Limits,
    mut close: Signal,
) -> (io::Result<()>, Outcome)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut idle = limits.idle;
    // The timer is re-armed only when it fires, from the last activity the splice recorded,
    // so moving bytes never touches the timer wheel.
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let (result, forced) = loop {
        tokio::select! {
            event = std::future::poll_fn(|cx| splice.poll_event(cx)) => match event {
                Event::Finished(result) => break (result, None),
                Event::HalfClosed => {
                    idle = idle.min(limits.half_closed);
                    idle_timer.as_mut().reset(splice.last_activity + idle);
                }
            },
            () = &mut idle_timer => {
                let deadline = splice.last_activity + idle;
                if Instant::now() >= deadline {
                    break (Ok(()), Some(ClosedBy::IdleTimeout));
                }
                idle_timer.as_mut().reset(deadline);
            }
            () = close.fired() => break (Ok(()), Some(ClosedBy::Shutdown)),
        }
    };
    let closed_by = forced.or(splice.first_eof).unwrap_or(match &result {
        Err((side, _)) => *side,
        Ok(()) => ClosedBy::Client,
    });
    let outcome = Outcome {
        closed_by,
        bytes_up: splice.up.bytes,
        bytes_down: splice.down.bytes,
    };
    (result.map_err(|(_, err)| err), outcome)
}

/// Both directions of a tunnel; finished when both have ended.
struct Splice<A, B> {
    client: A,
    upstream: B,
    up: Half,
    down: Half,
    last_activity: Instant,
    first_eof: Option<ClosedBy>,
}

/// One direction's state. `pending` is empty (and unallocated) unless the destination was slow.
#[derive(Default)]
struct Half {
    pending: Vec<u8>,
    written: usize,
    read_done: bool,
    done: bool,
    unflushed: bool,
    bytes: u64,
}

impl<A, B> Splice<A, B> {
    /// `early_*` are bytes a side sent right behind the handshake, already read by hyper.
    fn new(client: A, early_client: Bytes, upstream: B, early_upstream: Bytes) -> Self {
        Splice {
            client,
            upstream,
            // Copied out so that hyper's read buffer, which `Bytes` would pin, is freed now.
            up: Half {
                pending: early_client.to_vec(),
                ..Half::default()
            },
            down: Half {
                pending: early_upstream.to_vec(),
                ..Half::default()
            },
            last_activity: Instant::now(),
            first_eof: None,
        }
    }
}

/// What one poll of a splice found worth telling its driver.
enum Event {
    /// One direction has just ended; the other may go on.
    HalfClosed,
    Finished(Result<(), (ClosedBy, io::Error)>),
}

impl<A, B> Splice<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let mut moved = false;
        let was_open = self.first_eof.is_none();
        if !self.up.done {
            let last = self.down.done;
            let polled = self
                .up
                .poll(cx, &mut self.client, &mut self.upstream, last, &mut moved);
            if let Poll::Ready(result) = polled {
                if let Err(err) = result {
                    return Poll::Ready(Event::Finished(Err((ClosedBy::Client, err))));
                }
                self.first_eof.get_or_insert(ClosedBy::Client);
            }
        }
        if !self.down.done {
            let last = self.up.done;
            let polled = self
                .down
                .poll(cx, &mut self.upstream, &mut self.client, last, &mut moved);
            if let Poll::Ready(result) = polled {
                if let Err(err) = result {
                    return Poll::Ready(Event::Finished(Err((ClosedBy::Upstream, err))));
                }
                self.first_eof.get_or_insert(ClosedBy::Upstream);
            }
        }
        if moved {
            self.last_activity = Instant::now();
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

impl Half {
    /// Ready once this direction saw EOF, delivered everything and shut the writer down.
    /// `last`: the other direction is over, so both sockets close as soon as this one ends,
    /// and closing sends the FIN: an explicit shutdown would be a wasted syscall.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        last: bool,
        moved: &mut bool,
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
                self.bytes += n as u64;
                self.unflushed = true;
                *moved = true;
            }
            if !self.pending.is_empty() {
                // Release the backlog's memory; an idle tunnel keeps nothing.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
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
                    Poll::Ready(Ok(())) => {
                        Poll::Ready(Ok(self.write_through(cx, writer, buf.filled())))
                    }
                }
            });
            match step {
                Poll::Ready(Ok(Ok(true))) => *moved = true,
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

    /// Writes freshly read `data` on, keeping what the writer refused. `Ok(false)` means EOF.
    fn write_through<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
        data: &[u8],
    ) -> io::Result<bool> {
        if data.is_empty() {
            return Ok(false);
        }
        let taken = match Pin::new(&mut *writer).poll_write(cx, data) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => 0,
        };
        self.bytes += taken as u64;
        self.unflushed |= taken > 0;
        self.pending.extend_from_slice(&data[taken..]);
        Ok(true)
    }
}
