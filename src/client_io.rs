//! A client's HTTP/1 connection as hyper sees it. hyper keeps an 8 KiB read buffer and an 8 KiB
//! write buffer for as long as it serves a connection, idle or not; so the listener parks an
//! idle keep-alive connection (takes the socket back from hyper and drops the rest) and serves
//! it afresh when the client sends again. To know when that is safe, the socket records what
//! hyper did with it in the connection's `Activity`, and it replays the bytes hyper had read
//! ahead when it was parked.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// What one client connection's requests and socket have been doing. Shared by the service
/// (which counts requests) and the socket (which notes reads and flushes); both run on the
/// connection's own task, so relaxed ordering is enough.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests whose response hyper has not yet dropped.
    open: AtomicUsize,
    /// Requests started so far.
    started: AtomicU64,
    /// The latest request came with a body, which hyper may still be reading.
    body: AtomicBool,
    /// Bytes came in after the latest request head: pipelined requests, or a body.
    read_ahead: AtomicBool,
    /// hyper wrote since its last completed flush.
    unflushed: AtomicBool,
}

impl Activity {
    /// hyper parsed a request head and called the service; the request counts as open until
    /// the returned claim drops, which the response body does once hyper is done with it.
    pub fn request_started(self: &Arc<Self>, has_body: bool) -> OpenRequest {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        self.body.store(has_body, Ordering::Relaxed);
        self.read_ahead.store(false, Ordering::Relaxed);
        OpenRequest(self.clone())
    }

    pub fn requests(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// hyper has nothing in hand: every response is dropped (so written to its buffer) and
    /// flushed, the last request had no body, and nothing was read after its head. Taking the
    /// socket back now loses no byte and no state.
    pub fn is_idle(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
            && !self.body.load(Ordering::Relaxed)
            && !self.read_ahead.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
    }
}

/// One request's claim on its connection's `Activity`.
#[derive(Debug)]
pub struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request's claim until hyper drops it.
#[derive(Debug)]
pub struct Claimed<B> {
    body: B,
    _open: OpenRequest,
}

impl<B> Claimed<B> {
    pub fn new(body: B, open: OpenRequest) -> Claimed<B> {
        Claimed { body, _open: open }
    }
}

impl<B: Body + Unpin> Body for Claimed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket under hyper: `T` is a `TcpStream` or a server-side TLS stream.
#[derive(Debug)]
pub struct ClientIo<T> {
    io: T,
    /// Read by hyper before the connection was parked, not yet parsed: served first.
    replay: Bytes,
    activity: Arc<Activity>,
}

impl<T> ClientIo<T> {
    pub fn new(io: T, activity: Arc<Activity>) -> ClientIo<T> {
        ClientIo {
            io,
            replay: Bytes::new(),
            activity,
        }
    }

    /// Bytes hyper had read but not parsed when it handed the socket back.
    pub fn replay(&mut self, bytes: Bytes) {
        self.replay = join(bytes, std::mem::take(&mut self.replay));
    }

    pub fn has_replay(&self) -> bool {
        !self.replay.is_empty()
    }

    /// The socket and what is still to be read before it: `read` (what hyper had read past
    /// its last message), then any replay hyper did not take.
    pub fn into_parts(self, read: Bytes) -> (T, Bytes) {
        (self.io, join(read, self.replay))
    }
}

/// Never returns an empty slice of a larger buffer: it would keep the whole buffer alive.
fn join(first: Bytes, then: Bytes) -> Bytes {
    match (first.is_empty(), then.is_empty()) {
        (true, true) => return Bytes::new(),
        (false, true) => return first,
        (true, false) => return then,
        (false, false) => {}
    }
    let mut joined = BytesMut::with_capacity(first.len() + then.len());
    joined.extend_from_slice(&first);
    joined.extend_from_slice(&then);
    joined.freeze()
}

/// Sockets whose readiness can be awaited without reading, so that a parked connection holds
/// no buffer.
pub trait Readiness {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Readiness for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// Parked only after hyper's read came back empty, by when rustls holds no plaintext: new
/// bytes can only come from the socket.
impl Readiness for TlsStream<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}

impl<T: Readiness> ClientIo<T> {
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_read_ready(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            if this.replay.is_empty() {
                // Even empty, a slice of hyper's old read buffer would keep all 8 KiB of it.
                this.replay = Bytes::new();
            }
            this.activity.read_ahead.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_ahead.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(result, Poll::Ready(Ok(()))) {
            this.activity.unflushed.store(false, Ordering::Relaxed);
        }
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_replay_is_read_before_the_socket_and_counts_as_read_ahead() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = ClientIo::new(ours, activity.clone());
        let open = activity.request_started(false);
        io.replay(Bytes::from_static(b"GET /next"));
        assert!(io.has_replay());
        peer.write_all(b" HTTP/1.1").await.unwrap();
        let mut got = vec![0; 18];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"GET /next HTTP/1.1");
        assert!(!io.has_replay());
        drop(open);
        assert!(!activity.is_idle(), "bytes of the next request are in hand");
        let (_, rest) = io.into_parts(Bytes::from_static(b"hyper's"));
        assert_eq!(rest, Bytes::from_static(b"hyper's"));
    }

    #[tokio::test]
    async fn idle_means_no_open_request_no_body_nothing_read_ahead_and_all_flushed() {
        let (ours, _peer) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = ClientIo::new(ours, activity.clone());
        assert!(activity.is_idle());
        let open = activity.request_started(true);
        assert!(!activity.is_idle(), "a request is open");
        drop(open);
        assert!(!activity.is_idle(), "its body may still be unread");
        let open = activity.request_started(false);
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        drop(open);
        assert!(!activity.is_idle(), "written, not flushed");
        io.flush().await.unwrap();
        assert!(activity.is_idle());
        assert_eq!(activity.requests(), 2);
    }

    #[test]
    fn joining_never_keeps_an_empty_slice_of_a_larger_buffer() {
        let buffer = Bytes::from(vec![7u8; 8192]);
        let end_of_buffer = buffer[8192..].as_ptr();
        let joined = join(buffer.slice(8192..), Bytes::new());
        assert!(joined.is_empty());
        assert_ne!(
            joined.as_ptr(),
            end_of_buffer,
            "an empty slice of the buffer, which would keep all of it alive"
        );
        let joined = join(Bytes::from_static(b"ab"), Bytes::from_static(b"cd"));
        assert_eq!(joined, Bytes::from_static(b"abcd"));
    }
}
