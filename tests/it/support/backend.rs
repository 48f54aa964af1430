//! A real hyper HTTP/1.1 backend that records what it received and answers as each request's
//! `x-reply-*` headers say (they are end-to-end headers, so they pass the gateway untouched):
//!
//! - `x-reply-status: 201`: the status (default 200).
//! - `x-reply-header: Name: value`, repeatable: extra response headers.
//! - `x-reply-hold: 1`: answer only after `HttpBackend::release`.
//! - `x-reply-stream: N`: a body of N pattern bytes, streamed in chunks, no Content-Length;
//!   with `x-reply-stream-pause-at: M`, the stream stops after M bytes until `release`.
//! - `x-notify-at-bytes: M`: `body_reached` completes once M request-body bytes have arrived.
//!
//! Otherwise the body is `backend=NAME method=.. uri=.. body_len=..\n`. Every response carries
//! `x-backend: NAME`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

use super::client::Body;
use super::pattern::{self, Check};
use super::{within, WAIT};

/// Request bodies up to this size are kept whole in the record.
const KEEP_BODY: usize = 1024 * 1024;

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The body, if at most `KEEP_BODY` bytes.
    pub body: Bytes,
    /// What arrived, checked against the stream pattern.
    pub body_check: Check,
    /// The body ended with an error (the sender went away).
    pub body_error: bool,
    /// Which TCP connection it came on, counting from 1.
    pub connection: usize,
}

impl Recorded {
    /// The single value of `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let value = values.next()?;
        assert!(values.next().is_none(), "{name} appears more than once");
        Some(value.to_str().expect("ASCII header"))
    }
}

struct State {
    name: String,
    connections: AtomicUsize,
    log: Mutex<Vec<Recorded>>,
    received: mpsc::UnboundedSender<Recorded>,
    release: Notify,
    body_reached: Notify,
}

pub struct HttpBackend {
    pub addr: SocketAddr,
    state: Arc<State>,
    received: mpsc::UnboundedReceiver<Recorded>,
}

impl HttpBackend {
    /// Listening on 127.0.0.1:0 when this returns.
    pub async fn start(name: &str) -> HttpBackend {
        let listener = within(WAIT, TcpListener::bind("127.0.0.1:0"))
            .await
            .expect("backend binds");
        let addr = listener.local_addr().expect("backend address");
        let (tx, received) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            name: name.to_owned(),
            connections: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            received: tx,
            release: Notify::new(),
            body_reached: Notify::new(),
        });
        tokio::spawn(accept(listener, state.clone()));
        HttpBackend {
            addr,
            state,
            received,
        }
    }

    /// The next request, in arrival order (recorded once its body has been read).
    pub async fn next_request(&mut self) -> Recorded {
        within(WAIT, self.received.recv())
            .await
            .expect("backend is running")
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Lets one held reply (or paused stream) go on; remembered if none is waiting yet.
    pub fn release(&self) {
        self.state.release.notify_one();
    }

    /// Completes once a request body crossed its `x-notify-at-bytes` mark.
    pub async fn body_reached(&self) {
        within(WAIT, self.state.body_reached.notified()).await;
    }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let connection = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), connection, request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn handle(
    state: Arc<State>,
    connection: usize,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, mut body) = request.into_parts();
    let notify_at = number(&parts.headers, "x-notify-at-bytes");
    let mut kept = Vec::new();
    let mut check = Check::default();
    let mut body_error = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            body_error = true;
            break;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let before = check.len;
        check.feed(&data);
        if kept.len() < KEEP_BODY {
            kept.extend_from_slice(&data);
        }
        if notify_at.is_some_and(|at| before < at && check.len >= at) {
            state.body_reached.notify_one();
        }
    }
    let record = Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: if check.len as usize <= KEEP_BODY {
            Bytes::from(kept)
        } else {
            Bytes::new()
        },
        body_check: check,
        body_error,
        connection,
    };
    state.log.lock().unwrap().push(record.clone());
    let _ = state.received.send(record);

    let headers = &parts.headers;
    if headers.contains_key("x-reply-hold") {
        state.release.notified().await;
    }
    let status = number(headers, "x-reply-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let body: Body = match number(headers, "x-reply-stream") {
        Some(total) => {
            let pause = number(headers, "x-reply-stream-pause-at").map(|at| {
                let state = state.clone();
                let wait: pattern::Pause = Box::pin(async move { state.release.notified().await });
                (at, wait)
            });
            StreamBody::new(pattern::frames(total, pause)).boxed_unsync()
        }
        None => Full::new(Bytes::from(format!(
            "backend={} method={} uri={} body_len={}\n",
            state.name, parts.method, parts.uri, check.len
        )))
        .boxed_unsync(),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let out = response.headers_mut();
    out.insert(
        "x-backend",
        HeaderValue::from_str(&state.name).expect("backend name is a header value"),
    );
    for line in headers.get_all("x-reply-header") {
        let line = line.to_str().expect("ASCII x-reply-header");
        let (name, value) = line
            .split_once(':')
            .expect("x-reply-header is `Name: value`");
        out.append(
            HeaderName::from_bytes(name.trim().as_bytes()).expect("header name"),
            HeaderValue::from_str(value.trim()).expect("header value"),
        );
    }
    Ok(response)
}
