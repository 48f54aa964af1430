//! A backend whose health a test turns: it answers `/healthz` with the status it is set to, or
//! falls silent (every request, checks included, waits forever, as a hung process does). Other
//! requests get `x-backend: NAME` (and the status an `x-reply-status` header asks for);
//! WebSocket handshakes are accepted and echoed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::client::Body;
use super::{within, WAIT};

/// The status meaning "hang instead of answering".
const SILENT: u16 = 0;

pub struct HealthBackend {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    name: String,
    /// What `/healthz` answers, or `SILENT`.
    status: AtomicU16,
    checks: AtomicUsize,
    requests: AtomicUsize,
}

impl HealthBackend {
    /// Healthy, listening on 127.0.0.1:0 when this returns.
    pub async fn start(name: &str) -> HealthBackend {
        let listener = within(WAIT, TcpListener::bind("127.0.0.1:0"))
            .await
            .expect("backend binds");
        let addr = listener.local_addr().expect("backend address");
        let state = Arc::new(State {
            name: name.to_owned(),
            status: AtomicU16::new(200),
            checks: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        });
        tokio::spawn(accept(listener, state.clone()));
        HealthBackend { addr, state }
    }

    /// `/healthz` answers `status` from now on, and everything else is served again.
    pub fn answer_checks_with(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Nothing is answered any more, health checks included.
    pub fn fall_silent(&self) {
        self.state.status.store(SILENT, Ordering::SeqCst);
    }

    /// Health check requests received so far.
    pub fn checks(&self) -> usize {
        self.state.checks.load(Ordering::SeqCst)
    }

    /// Other requests (and handshakes) received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let status = state.status.load(Ordering::SeqCst);
    let counter = if request.uri().path() == "/healthz" {
        &state.checks
    } else {
        &state.requests
    };
    counter.fetch_add(1, Ordering::SeqCst);
    if status == SILENT {
        std::future::pending::<()>().await;
    }
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
        *response.status_mut() = status;
        response.headers_mut().insert(
            "x-backend",
            HeaderValue::from_str(&state.name).expect("backend name is a header value"),
        );
        response
    };
    if request.uri().path() == "/healthz" {
        let status = StatusCode::from_u16(status).expect("a status");
        return Ok(text(status, format!("{} health\n", state.name)));
    }
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        let status = request
            .headers()
            .get("x-reply-status")
            .and_then(|v| StatusCode::from_bytes(v.as_bytes()).ok())
            .unwrap_or(StatusCode::OK);
        return Ok(text(status, format!("backend={}\n", state.name)));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    let mut response = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    headers.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("base64"),
    );
    Ok(response)
}
