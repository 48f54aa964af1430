//! The accept loop of one listener: it never exits on a bad connection, sets TCP_NODELAY, runs
//! the TLS step when the listener has one, describes each connection once, and serves it with
//! hyper (HTTP/1.1, or HTTP/2 by ALPN or h2c preface) until done or drained.

mod h1;
pub mod proxy_protocol;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::{Body, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::client_io::Readiness;
use crate::config::{self, Limits, Timeouts};
use crate::proxy::{error::PLAIN_HTTP_TO_TLS_PORT, ConnInfo, Proxy, TlsInfo};
use crate::shutdown::{Signal, Tracker};
use crate::tls;

/// After an accept error that is not one connection's fault (EMFILE, ENOBUFS), wait before
/// the next accept, doubling up to this, so the loop neither spins nor gives up.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// What a client sends first when it speaks HTTP/2 without TLS (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct Listener {
    pub name: Arc<str>,
    pub socket: TcpListener,
    /// Passed in by systemd rather than bound by wsgate.
    pub inherited: bool,
    /// How connections are served; a reload swaps it, and each new connection loads it once.
    pub ctx: Arc<ArcSwap<ListenerCtx>>,
    pub stats: Arc<ListenerStats>,
}

/// What operators watch on a listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Failed TLS handshakes, and plain HTTP sent to a TLS port.
    pub tls_failures: AtomicU64,
    /// `tls_failures` by kind, in the order of `TLS_FAILURE_KINDS`.
    tls_failure_kinds: [AtomicU64; TLS_FAILURE_KINDS.len()],
    /// Connections accepted, and open now.
    pub accepted: AtomicU64,
    open: AtomicUsize,
    /// Request heads over `limits.max_header_bytes`, answered 431 by hyper.
    pub headers_too_large: AtomicU64,
    /// HTTP/1 connections idle between requests, held without hyper's buffers.
    pub parked: AtomicUsize,
    /// Connections closed for their PROXY header: missing, malformed, late, or untrusted peer.
    pub proxy_header_failures: AtomicU64,
}

/// The kinds a failed TLS handshake is counted under.
const TLS_FAILURE_KINDS: [&str; 5] = ["timeout", "closed", "not_tls", "handshake", "plain_http"];

impl ListenerStats {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn tls_failed(&self, kind: &str) {
        self.tls_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = TLS_FAILURE_KINDS.iter().position(|k| *k == kind) {
            self.tls_failure_kinds[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each kind's label and count.
    pub fn tls_failure_kinds(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        TLS_FAILURE_KINDS
            .iter()
            .zip(&self.tls_failure_kinds)
            .map(|(kind, n)| (*kind, n.load(Ordering::Relaxed)))
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<ListenerStats>);

impl OpenConnection {
    fn new(stats: &Arc<ListenerStats>) -> OpenConnection {
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(stats.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A listener's serving parameters, replaced whole by a reload.
pub struct ListenerCtx {
    pub protocols: Arc<Protocols>,
    pub tls: Option<TlsAcceptor>,
    /// Every connection opens with a PROXY header, read before TLS.
    pub proxy_protocol: Option<config::ProxyProtocol>,
    /// `max_connections`: a permit is taken before `accept` and held for the connection's life.
    pub connections: Option<Arc<Semaphore>>,
}

/// The hyper builders of one listener, configured once.
pub struct Protocols {
    http1: http1::Builder,
    /// With TLS, offered by ALPN; without, taken when a client opens with the h2c preface.
    http2: Option<http2::Builder<TokioExecutor>>,
    timeouts: Timeouts,
}

impl Protocols {
    pub fn new(timeouts: &Timeouts, limits: &Limits, http2: bool) -> Protocols {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(timeouts.request_header)
            .max_header_size(limits.request_header_bytes);
        let h2 = http2.then(|| {
            let mut h2 = http2::Builder::new(TokioExecutor::new());
            // SETTINGS_ENABLE_CONNECT_PROTOCOL: WebSockets over HTTP/2 (RFC 8441).
            h2.timer(TokioTimer::new())
                .enable_connect_protocol()
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .initial_stream_window_size(limits.h2_stream_window)
                .initial_connection_window_size(limits.h2_connection_window)
                .max_header_list_size(limits.request_header_bytes as u32);
            h2
        });
        Protocols {
            http1: h1,
            http2: h2,
            timeouts: *timeouts,
        }
    }
}

impl Listener {
    /// Accepts until `drain` fires (shutdown, or a reload removed the listener); then its
    /// connections finish what is in flight and its WebSockets close politely. Each connection
    /// registers with `connections`.
    pub async fn serve(self, proxy: Arc<Proxy>, mut drain: Signal, connections: Tracker) {
        let mut backoff = Duration::from_millis(10);
        let mut trouble = AcceptTrouble::default();
        loop {
            // At the limit, nothing is accepted: new connections wait in the kernel's backlog
            // (and beyond it, the client's SYN retries), costing wsgate no descriptor.
            let permit = match self.ctx.load().connections.clone() {
                Some(limit) => tokio::select! {
                    () = drain.fired() => break,
                    permit = limit.acquire_owned() => permit.ok(),
                },
                None => None,
            };
            let accepted = tokio::select! {
                () = drain.fired() => break,
                accepted = self.socket.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    if let Some(failures) = trouble.recovered() {
                        tracing::warn!(listener = %self.name, failures, "accepting again");
                    }
                    let connection = Connection {
                        proxy: proxy.clone(),
                        info: ConnInfo {
                            listener: self.name.clone(),
                            peer,
                            tls: None,
                            drain: drain.clone(),
                        },
                        stats: self.stats.clone(),
                    };
                    let task =
                        serve_connection(stream, connection, self.ctx.load_full(), drain.clone());
                    let guard = connections.guard();
                    let open = OpenConnection::new(&self.stats);
                    tokio::spawn(async move {
                        task.await;
                        drop((guard, permit, open));
                    });
                }
                Err(err) if is_connection_error(&err) => {
                    tracing::debug!(listener = %self.name, error = %err, "accept: connection failed");
                }
                Err(err) => {
                    if trouble.failed() {
                        tracing::error!(
                            listener = %self.name,
                            error = %err,
                            "accept failed; backing off and retrying (logged again once it works)"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
        // Closed before saying so: once this line is out, new connections to a shared
        // (SO_REUSEPORT) address go to the other sockets of the group.
        drop(self.socket);
        tracing::debug!(listener = %self.name, "stopped accepting");
    }
}

/// Accept failures that are not one connection's fault (EMFILE, ENOBUFS) come in episodes
/// that can last thousands of attempts: one line at the start, one at the end.
#[derive(Debug, Default)]
struct AcceptTrouble {
    failures: u64,
}

impl AcceptTrouble {
    /// Counts a failure; true for an episode's first, the one to log.
    fn failed(&mut self) -> bool {
        self.failures += 1;
        self.failures == 1
    }

    /// After a successful accept: the failures of the episode it ends, if one was going on.
    fn recovered(&mut self) -> Option<u64> {
        (self.failures > 0).then(|| std::mem::take(&mut self.failures))
    }
}

/// Errors that concern one connection only; the listener itself is fine.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

struct Connection {
    proxy: Arc<Proxy>,
    info: ConnInfo,
    stats: Arc<ListenerStats>,
}

/// The task of one connection. Every phase that ends (TLS handshake, h2c sniff) is boxed: the
/// task is allocated once for the connection's life, sized by its largest state, and an idle
/// keep-alive connection should not keep paying for a handshake long over.
async fn serve_connection(
    mut stream: TcpStream,
    mut connection: Connection,
    ctx: Arc<ListenerCtx>,
    drain: Signal,
) {
    let _ = stream.set_nodelay(true);
    if let Some(proxy_protocol) = &ctx.proxy_protocol {
        match Box::pin(client_from_proxy_header(
            &mut stream,
            &connection,
            proxy_protocol,
        ))
        .await
        {
            Some(client) => connection.info.peer = client,
            None => return,
        }
    }
    let protocols = &ctx.protocols;
    match &ctx.tls {
        None => {
            let h2 = protocols.http2.is_some()
                && Box::pin(opens_with_h2_preface(&stream, protocols)).await;
            serve_http(stream, h2, true, connection, protocols, drain).await;
        }
        Some(acceptor) => Box::pin(serve_tls(stream, acceptor, connection, protocols, drain)).await,
    }
}

/// The client the balancer's PROXY header names (the socket's peer for v2 `LOCAL`), or `None`
/// once the connection is to be closed: its one log line is written here. An untrusted peer's
/// bytes are never parsed.
async fn client_from_proxy_header(
    stream: &mut TcpStream,
    connection: &Connection,
    proxy_protocol: &config::ProxyProtocol,
) -> Option<std::net::SocketAddr> {
    let peer = connection.info.peer;
    let listener = &*connection.info.listener;
    let failed = || {
        connection
            .stats
            .proxy_header_failures
            .fetch_add(1, Ordering::Relaxed);
    };
    if !proxy_protocol.from.contains(peer.ip()) {
        failed();
        tracing::warn!(%peer, listener, "PROXY header refused: peer is not in proxy_protocol_from; closed");
        return None;
    }
    match proxy_protocol::read_header(stream, proxy_protocol.timeout).await {
        Ok(source) => Some(source.map_or(peer, |s| {
            std::net::SocketAddr::new(s.ip().to_canonical(), s.port())
        })),
        Err(err) => {
            failed();
            tracing::warn!(
                %peer,
                listener,
                error = %crate::telemetry::error_chain(&err),
                "PROXY header refused; closed"
            );
            None
        }
    }
}

async fn serve_tls(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    mut connection: Connection,
    protocols: &Protocols,
    drain: Signal,
) {
    let peer = connection.info.peer;
    match tls::accept(acceptor, stream, protocols.timeouts.tls_handshake).await {
        Ok(tls::Accepted::Tls(stream, facts)) => {
            connection.info.tls = Some(TlsInfo {
                sni: facts.sni,
                h2: facts.h2,
                client_identity: facts.client_identity,
            });
            serve_http(*stream, facts.h2, false, connection, protocols, drain).await;
        }
        Ok(tls::Accepted::PlainHttp(stream)) => {
            connection.stats.tls_failed("plain_http");
            tracing::info!(%peer, listener = %connection.info.listener, "plain HTTP sent to a TLS port: answered 400");
            refuse_plain_http(stream).await;
        }
        Err(err) => {
            connection.stats.tls_failed(err.kind());
            tracing::debug!(
                %peer,
                listener = %connection.info.listener,
                failure = err.kind(),
                error = %crate::telemetry::error_chain(&err),
                "TLS handshake failed"
            );
        }
    }
}

/// Waits (within the request-header timeout) until the first bytes tell HTTP/2's preface from
/// an HTTP/1 request line. Only peeks: hyper reads the bytes afterwards.
async fn opens_with_h2_preface(stream: &TcpStream, protocols: &Protocols) -> bool {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        // Each round waits for more bytes; a preface arrives in one or a few segments.
        for _ in 0..H2_PREFACE.len() {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if buf[..n] != H2_PREFACE[..n] {
                return false;
            }
            if n == H2_PREFACE.len() {
                return true;
            }
            if stream.readable().await.is_err() {
                return false;
            }
        }
        false
    };
    tokio::time::timeout(protocols.timeouts.request_header, sniff)
        .await
        .unwrap_or(false)
}

/// Answers a plain-HTTP client on a TLS port the way nginx does, then closes gracefully:
/// reading what it sent keeps the kernel from resetting the connection over our answer.
async fn refuse_plain_http(mut stream: TcpStream) {
    let answer = async {
        stream.write_all(PLAIN_HTTP_TO_TLS_PORT).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            if stream.read(&mut sink).await? == 0 {
                break;
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// `fresh`: nothing was read from `io` yet, so the connection starts parked until the client
/// sends. (A TLS stream may already hold the first request, read with the handshake.)
async fn serve_http<T>(
    io: T,
    h2: bool,
    fresh: bool,
    connection: Connection,
    protocols: &Protocols,
    drain: Signal,
) where
    T: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static,
{
    let peer = connection.info.peer;
    // One Arc clone per request, holding both the proxy and the connection's description.
    let connection = Arc::new(connection);
    let result = match protocols.http2.as_ref().filter(|_| h2) {
        Some(http2) => Box::pin(serve_http2(TokioIo::new(io), connection, http2, drain)).await,
        None => Box::pin(h1::serve(io, fresh, connection, protocols, drain)).await,
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
}

/// On drain: GOAWAY, streams in flight finish, no new ones start.
async fn serve_http2<I>(
    io: I,
    connection: Arc<Connection>,
    http2: &http2::Builder<TokioExecutor>,
    mut drain: Signal,
) -> hyper::Result<()>
where
    I: Read + Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(connection.proxy.handle(request, &connection.info).await) }
    });
    until_drained(http2.serve_connection(io, service), &mut drain).await
}

/// hyper's HTTP/1 and HTTP/2 server connections can both finish what is in flight and close.
trait GracefulShutdown: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S> GracefulShutdown for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, B, S, E> GracefulShutdown for http2::Connection<I, S, E>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
    E: Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// Serves the connection to its end; once `drain` fires, it finishes what is in flight.
async fn until_drained<C: GracefulShutdown>(connection: C, drain: &mut Signal) -> C::Output {
    tokio::pin!(connection);
    tokio::select! {
        output = connection.as_mut() => output,
        () = drain.fired() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown;
    use crate::snapshot::Snapshot;

    #[test]
    fn accept_trouble_is_logged_once_per_episode() {
        let mut trouble = AcceptTrouble::default();
        assert_eq!(trouble.recovered(), None, "no episode, nothing to say");
        assert!(trouble.failed(), "the first failure is logged");
        assert!(!trouble.failed());
        assert!(!trouble.failed());
        assert_eq!(trouble.recovered(), Some(3));
        assert_eq!(trouble.recovered(), None, "said once");
        assert!(trouble.failed(), "a new episode is logged again");
        assert_eq!(trouble.recovered(), Some(1));
    }

    /// A parked connection is its socket, this task and the boxed HTTP/1 future; hyper's state
    /// (boxed apart, dropped while parked) and the TLS handshake's are not in either. tokio
    /// adds about 104 bytes to a task; the rest of an idle connection is its `Connection` and
    /// `Activity`. The budget fails if a handshake or hyper's connection moves inline.
    #[tokio::test]
    async fn a_parked_connection_s_futures_fit_in_1_25_kib() {
        let config = crate::config::parse(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n\
             [[route]]\nname = \"r\"\nrespond = { status = 200, body = \"\" }\n",
            "test.toml",
        )
        .expect("valid config");
        let snapshot = Snapshot::build(&config, None).expect("snapshot");
        let (_close, close_signal) = shutdown::channel();
        let proxy = Arc::new(Proxy::new(
            Arc::new(ArcSwap::from_pointee(snapshot)),
            crate::proxy::policy::ClientLimiter::new(1024),
            Tracker::default(),
            close_signal,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().unwrap()).await;
        let (stream, peer) = listener.accept().await.expect("accept");
        let (_drain, drain) = shutdown::channel();
        let connection = || Connection {
            proxy: proxy.clone(),
            info: ConnInfo {
                listener: "l".into(),
                peer,
                tls: None,
                drain: drain.clone(),
            },
            stats: Arc::default(),
        };
        let protocols = Protocols::new(&config.timeouts, &config.limits, true);
        let ctx = Arc::new(ListenerCtx {
            protocols: Arc::new(Protocols::new(&config.timeouts, &config.limits, true)),
            tls: None,
            proxy_protocol: None,
            connections: None,
        });
        let task =
            std::mem::size_of_val(&serve_connection(stream, connection(), ctx, drain.clone()));
        let stream = client.expect("connect");
        let h1 = h1::serve(
            stream,
            true,
            Arc::new(connection()),
            &protocols,
            drain.clone(),
        );
        let h1 = std::mem::size_of_val(&h1);
        eprintln!("connection task: {task} + 104 bytes, HTTP/1 future: {h1} bytes");
        assert!(
            task + 104 + h1 <= 1280,
            "task {task} + 104 + HTTP/1 future {h1}"
        );
    }
}
