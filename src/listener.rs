//! The accept loop of one listener: it never exits on a bad connection, sets TCP_NODELAY, runs
//! the TLS step when the listener has one, describes each connection once, and serves it with
//! hyper (HTTP/1.1, or HTTP/2 by ALPN or h2c preface) until done or drained.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{Limits, Timeouts};
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
    /// Failed TLS handshakes, for operators to watch.
    pub tls_failures: Arc<AtomicU64>,
}

/// A listener's serving parameters, replaced whole by a reload.
pub struct ListenerCtx {
    pub protocols: Arc<Protocols>,
    pub tls: Option<TlsAcceptor>,
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
        loop {
            let accepted = tokio::select! {
                () = drain.fired() => break,
                accepted = self.socket.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let connection = Connection {
                        proxy: proxy.clone(),
                        info: ConnInfo {
                            listener: self.name.clone(),
                            peer,
                            tls: None,
                            drain: drain.clone(),
                        },
                    };
                    let task = serve_connection(
                        stream,
                        connection,
                        self.ctx.load_full(),
                        self.tls_failures.clone(),
                        drain.clone(),
                    );
                    let guard = connections.guard();
                    tokio::spawn(async move {
                        task.await;
                        drop(guard);
                    });
                }
                Err(err) if is_connection_error(&err) => {
                    tracing::debug!(listener = %self.name, error = %err, "accept: connection failed");
                }
                Err(err) => {
                    tracing::error!(
                        listener = %self.name,
                        error = %err,
                        retry_ms = backoff.as_millis() as u64,
                        "accept failed; retrying"
                    );
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
}

async fn serve_connection(
    stream: TcpStream,
    mut connection: Connection,
    ctx: Arc<ListenerCtx>,
    tls_failures: Arc<AtomicU64>,
    drain: Signal,
) {
    let _ = stream.set_nodelay(true);
    let peer = connection.info.peer;
    let protocols = &ctx.protocols;
    let Some(acceptor) = &ctx.tls else {
        let h2 = protocols.http2.is_some() && opens_with_h2_preface(&stream, protocols).await;
        return serve_http(TokioIo::new(stream), h2, connection, protocols, drain).await;
    };
    match tls::accept(acceptor, stream, protocols.timeouts.tls_handshake).await {
        Ok(tls::Accepted::Tls(stream, facts)) => {
            connection.info.tls = Some(TlsInfo {
                sni: facts.sni,
                h2: facts.h2,
                client_identity: facts.client_identity,
            });
            serve_http(
                TokioIo::new(*stream),
                facts.h2,
                connection,
                protocols,
                drain,
            )
            .await;
        }
        Ok(tls::Accepted::PlainHttp(stream)) => {
            tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, listener = %connection.info.listener, "plain HTTP sent to a TLS port: answered 400");
            refuse_plain_http(stream).await;
        }
        Err(err) => {
            tls_failures.fetch_add(1, Ordering::Relaxed);
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

async fn serve_http<I>(
    io: I,
    h2: bool,
    connection: Connection,
    protocols: &Protocols,
    mut drain: Signal,
) where
    I: Read + Write + Unpin + Send + 'static,
{
    let peer = connection.info.peer;
    // One Arc clone per request, holding both the proxy and the connection's description.
    let connection = Arc::new(connection);
    let service = service_fn(move |request: Request<Incoming>| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(connection.proxy.handle(request, &connection.info).await) }
    });
    let result = match protocols.http2.as_ref().filter(|_| h2) {
        // On drain: GOAWAY, streams in flight finish, no new ones start.
        Some(http2) => until_drained(http2.serve_connection(io, service), &mut drain).await,
        // On drain: the request in flight finishes, then the connection closes.
        None => {
            let serving = protocols.http1.serve_connection(io, service);
            until_drained(serving.with_upgrades(), &mut drain).await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
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
