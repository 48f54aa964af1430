//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status.json` and a live status page
//! at `/`. Read-only, on its own socket (never through a proxy listener), open to loopback and
//! to the `admin.allow` ranges only. It reads counters where they live; it changes nothing.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::CidrSet;
use crate::metrics::{self, Sources, STATUS_CLASSES};
use crate::shutdown::Signal;

/// The status page: one file, no external script, style or font, so it works offline and
/// under a strict CSP. It polls `/status.json`.
const PAGE: &str = include_str!("admin/status.html");

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct State {
    pub sources: Sources,
    /// Set the moment a drain starts: `/readyz` turns 503 so balancers stop sending.
    pub draining: Arc<AtomicBool>,
    pub started: Instant,
}

/// Serves until `stop` fires. A peer outside loopback and `allow` is closed without a byte.
pub async fn serve(listener: TcpListener, allow: CidrSet, state: State, mut stop: Signal) {
    let state = Arc::new(state);
    loop {
        let accepted = tokio::select! {
            () = stop.fired() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(error = %err, "admin: accept failed");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if !allowed(peer.ip(), &allow) {
            tracing::warn!(%peer, "admin: connection from outside admin.allow closed");
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&request, &state)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn allowed(ip: IpAddr, allow: &CidrSet) -> bool {
    ip.to_canonical().is_loopback() || allow.contains(ip.to_canonical())
}

fn answer(request: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET or HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => typed(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::render(&state.sources),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.draining.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/status.json" => typed(
            StatusCode::OK,
            "application/json",
            status(state).to_string(),
        ),
        "/" => typed(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_owned()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz, /status.json or /\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    typed(status, "text/plain; charset=utf-8", body.to_owned())
}

fn typed(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Live numbers: never from a cache.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What the status page shows, from the same counters as `/metrics`.
pub fn status(state: &State) -> serde_json::Value {
    let sources = &state.sources;
    let snapshot = sources.current.load_full();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let listeners: Vec<_> = sources
        .listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|l| {
            json!({
                "name": &*l.name,
                "address": l.address.to_string(),
                "tls": l.tls,
                "connections_open": l.stats.open(),
                "connections_total": load(&l.stats.accepted),
                "tls_failures": load(&l.stats.tls_failures),
            })
        })
        .collect();
    let routes: Vec<_> = snapshot
        .router
        .routes()
        .iter()
        .map(|route| {
            let stats = &route.stats;
            let statuses: serde_json::Map<_, _> = STATUS_CLASSES
                .iter()
                .enumerate()
                .map(|(i, class)| ((*class).to_owned(), json!(stats.statuses.get(i))))
                .collect();
            json!({
                "name": &*route.name,
                "requests": load(&stats.requests),
                "statuses": statuses,
                "tunnels_open": load(&stats.tunnels_open),
                "tunnels_open_h2": load(&stats.tunnels_open_h2),
                "tunnels_total": load(&stats.tunnels_total),
                "bytes_client_to_upstream": load(&stats.tunnel.bytes_up),
                "bytes_upstream_to_client": load(&stats.tunnel.bytes_down),
            })
        })
        .collect();
    let upstreams: Vec<_> = snapshot
        .upstreams
        .iter()
        .map(|group| {
            let servers: Vec<_> = group
                .endpoints()
                .iter()
                .map(|server| {
                    let health = &server.health;
                    let state = if health.is_down() {
                        "down"
                    } else if health.is_ejected() {
                        "ejected"
                    } else {
                        "up"
                    };
                    json!({
                        "server": &*server.label,
                        "health": state,
                        // A lease counts a request in flight or an open tunnel.
                        "requests_open": server.active().saturating_sub(server.tunnels()),
                        "tunnels_open": server.tunnels(),
                        "connect_failures": server.connect_failures(),
                    })
                })
                .collect();
            json!({ "name": &*group.name, "servers": servers })
        })
        .collect();
    let reloads = &sources.reloads;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "ready": !state.draining.load(Ordering::Relaxed),
        "listeners": listeners,
        "routes": routes,
        "upstreams": upstreams,
        "reloads": {
            "ok": load(&reloads.ok),
            "rejected": load(&reloads.rejected),
            "last_success_unix": load(&reloads.last_success),
            "recent": reloads.recent(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_always_and_others_only_when_allowed() {
        let none = CidrSet::new(Vec::new());
        let lan = CidrSet::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(allowed(ip("127.0.0.1"), &none));
        assert!(allowed(ip("::1"), &none));
        assert!(allowed(ip("::ffff:127.0.0.1"), &none));
        assert!(!allowed(ip("10.1.2.3"), &none));
        assert!(allowed(ip("10.1.2.3"), &lan));
        assert!(allowed(ip("::ffff:10.1.2.3"), &lan));
        assert!(!allowed(ip("192.0.2.1"), &lan));
    }
}
