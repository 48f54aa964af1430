//! The accept loop of one listener: it never exits on a bad connection, sets TCP_NODELAY,
//! describes each connection once, and serves it with hyper until done or drained.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Limits, Timeouts};
use crate::proxy::{ConnInfo, Proxy};
use crate::shutdown::{Signal, Tracker};

/// After an accept error that is not one connection's fault (EMFILE, ENOBUFS), wait before
/// the next accept, doubling up to this, so the loop neither spins nor gives up.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

pub struct Listener {
    pub name: Arc<str>,
    pub socket: TcpListener,
    pub http: Arc<http1::Builder>,
}

/// One hyper builder per listener, configured once.
pub fn http1_builder(timeouts: &Timeouts, limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.request_header)
        .max_header_size(limits.request_header_bytes);
    builder
}

impl Listener {
    /// Accepts until `drain` fires. Each connection registers with `connections`.
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
                    let info = ConnInfo {
                        listener: self.name.clone(),
                        peer,
                    };
                    let task = serve_connection(
                        stream,
                        info,
                        proxy.clone(),
                        self.http.clone(),
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
    info: ConnInfo,
    proxy: Arc<Proxy>,
    http: Arc<http1::Builder>,
    mut drain: Signal,
) {
    let _ = stream.set_nodelay(true);
    let peer = info.peer;
    // One Arc clone per request, holding both the proxy and the connection's description.
    let connection = Arc::new(Connection { proxy, info });
    let service = service_fn(move |request| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(connection.proxy.handle(request, &connection.info).await) }
    });
    let serving = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(serving);
    let result = tokio::select! {
        result = serving.as_mut() => result,
        () = drain.fired() => {
            // Finish the request in flight, then close; idle connections close at once.
            serving.as_mut().graceful_shutdown();
            serving.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
}
