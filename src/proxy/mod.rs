//! The per-request pipeline: route, classify, forward, then relay the response or hand the
//! upgraded connections to a tunnel. It never touches a socket; the listener describes the
//! connection once in a `ConnInfo`.

pub mod body;
pub mod error;
pub mod headers;
pub mod policy;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{
    HeaderValue, CONTENT_TYPE, HOST, LOCATION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SET_COOKIE, STRICT_TRANSPORT_SECURITY, UPGRADE,
};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config;
use crate::metrics::StatusCounts;
use crate::router::{Route, Target};
use crate::shutdown::{Signal, Tracker};
use crate::snapshot::{Current, ListenerPolicy, Snapshot};
use crate::telemetry::{fields as f, RequestSpan};
use crate::upstream::{self, Endpoint, Lease, TunnelLease};
use crate::websocket::{self, tunnel, Classification, Protocol};
use body::ProxyBody;
use error::{ProxyError, RequestLabels};

/// The client connection a request arrived on, computed once per connection. Only what is
/// used is here: each fact can cost a syscall per connection (the local address does).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub tls: Option<TlsInfo>,
    /// Fires when this connection's listener stops (removed by a reload, or shutdown): its
    /// WebSocket tunnels then close politely.
    pub drain: Signal,
}

/// What the TLS handshake of a connection established.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub sni: Option<String>,
    /// ALPN chose HTTP/2.
    pub h2: bool,
    /// The verified client certificate's names (mTLS).
    pub client_identity: Option<String>,
}

#[derive(Debug)]
pub struct Proxy {
    current: Current,
    /// Per-client-address state; outlives snapshots, so a reload resets no count.
    limiter: Arc<policy::ClientLimiter>,
    /// Plain requests' tokens, apart from the handshakes' so that neither drains the other.
    request_limiter: Arc<policy::ClientLimiter>,
    /// Upgraded connections leave hyper's sight; they are counted here for the drain.
    tunnels: Tracker,
    pub stats: Arc<ProxyStats>,
    /// Fired when the drain period is over: every tunnel closes at once.
    close_tunnels: Signal,
}

/// What the proxy counts that belongs to no route.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Answers to requests no route matched (404, and refusals before routing).
    pub unrouted: StatusCounts,
    /// Refusals of requests no route matched (none yet: every refusal comes after routing).
    pub refusals: crate::metrics::Refusals,
}

/// A validated upgrade waiting for the upstream's 101.
struct PendingUpgrade {
    protocol: Protocol,
    requested: Option<HeaderValue>,
    client: hyper::upgrade::OnUpgrade,
}

/// What a tunnel is started with.
struct Tunnel {
    /// The client's side is an HTTP/2 stream (RFC 8441).
    h2: bool,
    labels: tunnel::Labels,
    options: tunnel::Options,
    signals: tunnel::Signals,
}

/// What one request works with besides itself.
#[derive(Clone, Copy)]
struct RequestCtx<'a> {
    snapshot: &'a Snapshot,
    policy: &'a ListenerPolicy,
    facts: &'a Facts,
    conn: &'a ConnInfo,
    /// Makes the request's spans, for a line of code that does not know the request.
    span: RequestSpan<'a>,
}

/// The request facts kept for logging after the request itself has moved upstream. Owned
/// copies, not slices of the request head: a slice keeps hyper's whole read buffer (8 KiB)
/// alive for as long as the request waits upstream, minutes for a long poll.
struct Facts {
    method: Method,
    host: HeaderValue,
    uri: Uri,
    /// Who logs and limits count the request for: the peer, or the client a trusted proxy
    /// named in `X-Forwarded-For` (then with port 0: the header carries none).
    client: SocketAddr,
}

impl Proxy {
    pub fn new(
        current: Current,
        limiter: Arc<policy::ClientLimiter>,
        tunnels: Tracker,
        close_tunnels: Signal,
    ) -> Proxy {
        Proxy {
            current,
            request_limiter: policy::ClientLimiter::new(limiter.capacity()),
            limiter,
            tunnels,
            stats: Arc::default(),
            close_tunnels,
        }
    }

    pub async fn handle(&self, request: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let started = Instant::now();
        // Once per request: a reload in the middle does not change what this request sees.
        let snapshot = self.current.load_full();
        let policy = snapshot.policy(&conn.listener);
        let host = request_host(&request);
        let facts = Facts {
            method: request.method().clone(),
            host: host
                .as_ref()
                .map_or(HeaderValue::from_static(""), detached_value),
            uri: detached_uri(request.uri()),
            client: client_of(&request, conn, policy),
        };
        // Only whether it was valid is matched on below, across the wait for the upstream.
        let host = host.map(drop);
        let host_text = facts.host.to_str().unwrap_or("");
        let path = facts.uri.path();
        let mut route = None;
        let redirect = policy.redirect.as_ref().filter(|r| !r.exempts(path));
        let result = match host {
            // Extended CONNECT (RFC 8441) carries a :protocol and is routed like a handshake.
            _ if facts.method == Method::CONNECT && connect_protocol(&request).is_none() => {
                Err(ProxyError::ConnectMethod)
            }
            Err(err) => Err(err),
            Ok(_) if redirect.is_some() && !host_text.is_empty() => {
                let to = redirect.expect("checked").location(host_text, &facts.uri);
                Ok((redirect_to(to), None))
            }
            Ok(_) => match snapshot.router.route(host_text, path) {
                None => Err(ProxyError::NoRoute),
                Some(matched) => {
                    route = Some(matched);
                    matched.stats.requests.fetch_add(1, Ordering::Relaxed);
                    let make = || request_span(conn, &facts, host_text, &matched.name);
                    let span = RequestSpan::new(&make);
                    let request_ctx = RequestCtx {
                        snapshot: &snapshot,
                        policy,
                        facts: &facts,
                        conn,
                        span,
                    };
                    self.dispatch(request, matched, &request_ctx).await
                }
            },
        };
        let route_name = route.map(|r| &*r.name);
        let mut response = match result {
            Ok((response, server)) => {
                if snapshot.access_log {
                    access_line(
                        conn,
                        &facts,
                        response.status(),
                        route_name,
                        &server,
                        started,
                    );
                }
                response
            }
            Err(err) => {
                if let Some(reason) = err.refusal() {
                    match route {
                        Some(route) => route.stats.refusals.record(reason),
                        None => self.stats.refusals.record(reason),
                    }
                }
                error::respond(
                    err,
                    &RequestLabels {
                        method: &facts.method,
                        host: host_text,
                        path,
                        route: route_name,
                        client: facts.client,
                        conn,
                    },
                )
            }
        };
        match route {
            Some(route) => route.stats.statuses.record(response.status()),
            None => self.stats.unrouted.record(response.status()),
        }
        if let Some(hsts) = &policy.hsts {
            response
                .headers_mut()
                .insert(STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        response
    }

    /// Returns the response and, when proxied, the upstream server that answered.
    async fn dispatch(
        &self,
        mut request: Request<Incoming>,
        route: &Route,
        ctx: &RequestCtx<'_>,
    ) -> Result<(Response<ProxyBody>, Option<Arc<Endpoint>>), ProxyError> {
        let RequestCtx {
            snapshot,
            policy,
            facts,
            conn,
            span,
        } = *ctx;
        let upstream = match &route.target {
            Target::Respond { status, body } => return Ok((respond(*status, body.clone()), None)),
            Target::Proxy { upstream } => &snapshot.upstreams[*upstream],
        };
        let classification = websocket::classify(
            request.method(),
            request.version(),
            request.headers(),
            &route.upgrades,
            connect_protocol(&request),
        );
        let protocol = match classification {
            Classification::Reject(err) => return Err(ProxyError::Handshake(err)),
            Classification::Upgrade(protocol) => Some(protocol),
            Classification::Plain => None,
        };
        if let Some(origins) = &route.origins {
            if protocol.is_some() || origins.check == config::OriginCheck::All {
                policy::check_origin(request.headers(), &origins.allowed, origins.allow_missing)
                    .map_err(ProxyError::Origin)?;
            }
        }
        if let (Some(_), Some(subprotocols)) = (protocol, &route.subprotocols) {
            filter_subprotocols(request.headers_mut(), subprotocols)?;
        }
        // A declared length is judged at once; a chunked body where it crosses the limit.
        if let Some(limit) = route.max_request_body {
            if hyper::body::Body::size_hint(request.body()).lower() > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
        }
        // Taken before the backend is contacted; dropped with the request if no tunnel opens.
        let client_guard = match protocol {
            Some(_) => self.admit_tunnel(snapshot, route, facts.client.ip())?,
            None => {
                self.admit_request(snapshot, facts.client.ip())?;
                None
            }
        };
        // An HTTP/2 stream becomes an HTTP/1.1 handshake upstream, with a key of our own.
        let bridged_key = (protocol == Some(Protocol::WebSocketOverH2)).then(|| {
            let key = websocket::new_key();
            *request.method_mut() = Method::GET;
            let headers = request.headers_mut();
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(SEC_WEBSOCKET_KEY, key.clone());
            key
        });
        // Taken before the request moves upstream: it resolves once our answer (101, or 200 to
        // an extended CONNECT) reaches the client.
        let upgrade = protocol.map(|protocol| PendingUpgrade {
            protocol,
            requested: request.headers().get(UPGRADE).cloned(),
            client: hyper::upgrade::on(&mut request),
        });
        prepare_upstream_request(&mut request, facts, conn, policy, upgrade.is_some());
        if upgrade.is_some() && route.websocket.permessage_deflate == config::Deflate::Strip {
            headers::strip_extension(request.headers_mut(), "permessage-deflate");
        }

        let upstream_failed = |source| ProxyError::Upstream {
            upstream: upstream.name.to_string(),
            source,
        };
        // A slow route's longer response timeout applies to it alone.
        let timeouts = config::Timeouts {
            connect: route.timeouts.connect,
            upstream_response_header: route.timeouts.upstream_response_header,
            ..snapshot.timeouts
        };
        let affinity = upstream.affinity(request.headers(), request.uri(), facts.client.ip());
        let mut lease = upstream
            .connect(&timeouts, &affinity, span)
            .await
            .map_err(upstream_failed)?;
        let mut response = match bridged_key {
            // The CONNECT stream's body is the tunnel itself, not a request body.
            Some(_) => lease.send_bodyless(request.map(drop), span).await,
            None => lease.send(request, route.max_request_body, span).await,
        }
        .map_err(upstream_failed)?;
        let server = Some(lease.endpoint().clone());
        // On a 101 too: a client that upgrades at once must still come back to this server.
        if let Some(cookie) =
            upstream.sticky_cookie(&affinity, lease.endpoint(), conn.tls.is_some())
        {
            response.headers_mut().append(SET_COOKIE, cookie.clone());
        }

        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, ()) = response.into_parts();
            headers::to_downstream(&mut parts.headers, false);
            return Ok((
                Response::from_parts(parts, ProxyBody::upstream(lease)),
                server,
            ));
        }
        let accepted = bridged_key.as_ref().is_none_or(|key| {
            let accept = websocket::accept_for(key.as_bytes());
            response
                .headers()
                .get(SEC_WEBSOCKET_ACCEPT)
                .map(HeaderValue::as_bytes)
                == Some(accept.as_bytes())
        });
        // Only an allowed subprotocol may be chosen: the filter would mean little otherwise.
        let chosen_allowed = route.subprotocols.as_ref().is_none_or(|subprotocols| {
            response
                .headers()
                .get(SEC_WEBSOCKET_PROTOCOL)
                .is_none_or(|chosen| subprotocols.allowed.iter().any(|a| a == chosen))
        });
        let switched = upgrade.filter(|upgrade| {
            accepted
                && chosen_allowed
                && websocket::switched_to(
                    response.headers(),
                    upgrade.protocol,
                    upgrade.requested.as_ref(),
                )
        });
        let Some(upgrade) = switched else {
            return Err(ProxyError::BadSwitch {
                upstream: upstream.name.to_string(),
                server: lease.endpoint().label.clone(),
            });
        };
        let upstream_upgrade = lease.take_upgraded();
        let options = tunnel::Options {
            idle: route.timeouts.websocket_idle,
            half_closed: route.timeouts.websocket_half_closed,
            // Other upgrades are not WebSocket: their bytes stay opaque.
            frames: (upgrade.protocol != Protocol::Other)
                .then(|| frame_options(&route.websocket, response.headers())),
        };
        let labels = tunnel::Labels {
            origin: tunnel_origin(route, facts, conn),
            client: facts.client,
        };
        let signals = tunnel::Signals {
            drain: conn.drain.clone(),
            close: self.close_tunnels.clone(),
            retire: lease.endpoint().retirement(),
        };
        let tunnel = Tunnel {
            h2: bridged_key.is_some(),
            labels,
            options,
            signals,
        };
        self.spawn_tunnel(
            (upgrade.client, upstream_upgrade),
            (lease, client_guard),
            route,
            tunnel,
        );
        let (mut parts, _) = response.into_parts();
        if bridged_key.is_some() {
            route.stats.tunnels_over_h2.fetch_add(1, Ordering::Relaxed);
            // RFC 8441 §5: a 2xx opens the stream; subprotocol and extensions pass through.
            parts.status = StatusCode::OK;
            parts.version = Version::HTTP_2;
            headers::to_downstream(&mut parts.headers, false);
            parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
        } else {
            headers::to_downstream(&mut parts.headers, true);
        }
        Ok((Response::from_parts(parts, ProxyBody::empty()), server))
    }

    /// A plain request of `client` spends a token of its own bucket.
    fn admit_request(
        &self,
        snapshot: &Snapshot,
        client: std::net::IpAddr,
    ) -> Result<(), ProxyError> {
        let Some(rate) = snapshot.per_client.requests else {
            return Ok(());
        };
        match self
            .request_limiter
            .admit(client, rate, Instant::now().into_std())
        {
            policy::Admission::Allowed => Ok(()),
            policy::Admission::Limited { retry_after } => {
                Err(ProxyError::RequestRate { retry_after })
            }
        }
    }

    /// A handshake of `client` spends a token and, when tunnels are limited, counts a tunnel.
    fn admit_tunnel(
        &self,
        snapshot: &Snapshot,
        route: &Route,
        client: std::net::IpAddr,
    ) -> Result<Option<policy::TunnelGuard>, ProxyError> {
        let limits = &snapshot.per_client;
        let now = Instant::now().into_std();
        if let Some(rate) = limits.handshakes {
            if let policy::Admission::Limited { retry_after } =
                self.limiter.admit(client, rate, now)
            {
                return Err(ProxyError::HandshakeRate { retry_after });
            }
        }
        let tunnels = policy::TunnelLimits {
            per_client: limits.max_tunnels,
            per_client_on_route: route
                .max_tunnels_per_client
                .or(limits.max_tunnels_per_route),
        };
        if tunnels == policy::TunnelLimits::default() {
            return Ok(None);
        }
        self.limiter
            .open_tunnel(client, &route.name, tunnels, now)
            .map(Some)
            .map_err(ProxyError::Tunnels)
    }

    /// `upgrades`: the client's, resolving once our answer reached it, and the upstream's
    /// socket with the bytes that followed its 101.
    /// `holds`: the server lease and the client's tunnel count, both given back at its end.
    fn spawn_tunnel(
        &self,
        upgrades: (
            hyper::upgrade::OnUpgrade,
            (upstream::http1::Stream, bytes::Bytes),
        ),
        holds: (Lease, Option<policy::TunnelGuard>),
        route: &Route,
        tunnel: Tunnel,
    ) {
        let (lease, client_guard) = holds;
        let (client, upstream) = upgrades;
        let Tunnel {
            h2,
            labels,
            options,
            signals,
        } = tunnel;
        route.stats.tunnel_opened(h2);
        let hold = TunnelHold {
            lease: lease.into_tunnel(h2),
            _guard: self.tunnels.guard(),
            _client: client_guard.map(Box::new),
            stats: route.stats.clone(),
        };
        // This small task only waits for both sides to switch; the tunnel is a task of its
        // own, allocated once the handshake's buffers are freed.
        tokio::spawn(async move {
            match client.await {
                Ok(client) => {
                    tunnel::spawn(client, upstream, labels, options, signals, hold);
                }
                Err(err) => tracing::debug!(
                    route = %labels.origin.route(),
                    client = %labels.client,
                    error = %err,
                    "upgrade did not complete"
                ),
            }
        });
    }
}

/// What lives exactly as long as a tunnel: its lease on the server (counted by
/// least-connections), its place in the drain, its client's and its route's counts.
pub(crate) struct TunnelHold {
    lease: TunnelLease,
    _guard: crate::shutdown::Guard,
    /// The client's open-tunnel count (`[limits.per_client]`), when limited. Boxed: the tunnel
    /// task's size budget has no room for its 40 bytes.
    _client: Option<Box<policy::TunnelGuard>>,
    stats: Arc<crate::router::RouteStats>,
}

impl Drop for TunnelHold {
    fn drop(&mut self) {
        self.stats.tunnel_closed(self.lease.is_h2());
    }
}

impl tunnel::Hold for TunnelHold {
    fn upstream(&self) -> (&str, &str) {
        let server = self.lease.endpoint();
        (server.upstream_name(), &server.label)
    }

    fn closed(self, outcome: &tunnel::Outcome, lived: std::time::Duration) {
        let stats = &self.stats.tunnel;
        stats
            .bytes_up
            .fetch_add(outcome.up.bytes, Ordering::Relaxed);
        stats
            .bytes_down
            .fetch_add(outcome.down.bytes, Ordering::Relaxed);
        stats.duration.observe(lived);
        // Opaque tunnels have no frames, hence no close codes to count.
        if let (Some(up), Some(down)) = (outcome.up.frames, outcome.down.frames) {
            stats.client_closes.record(up.close_code);
            stats.upstream_closes.record(down.close_code);
        }
    }
}

/// Leaves only the route's allowed offers in a handshake's `Sec-WebSocket-Protocol`.
fn filter_subprotocols(
    headers: &mut http::HeaderMap,
    subprotocols: &config::SubprotocolPolicy,
) -> Result<(), ProxyError> {
    let kept = match policy::filter_subprotocols(headers, &subprotocols.allowed) {
        policy::Subprotocols::NotOffered => return Ok(()),
        policy::Subprotocols::Kept(kept) => Some(policy::subprotocol_header(&kept)),
        policy::Subprotocols::NoneLeft => None,
    };
    match (kept, subprotocols.unmatched) {
        (Some(kept), _) => {
            headers.insert(SEC_WEBSOCKET_PROTOCOL, kept);
        }
        (None, config::SubprotocolUnmatched::Refuse) => return Err(ProxyError::NoSubprotocol),
        (None, config::SubprotocolUnmatched::Forward) => {
            headers.remove(SEC_WEBSOCKET_PROTOCOL);
        }
    }
    Ok(())
}

/// How a WebSocket tunnel on `route` follows its frames, given the backend's 101.
fn frame_options(route: &config::WebSocket, switched: &http::HeaderMap) -> tunnel::FrameOptions {
    tunnel::FrameOptions {
        keepalive: route.ping_interval.map(|interval| tunnel::Keepalive {
            interval,
            timeout: route.ping_timeout,
            upstream: route.ping_upstream,
        }),
        max_frame: route.max_frame,
        max_message: route.max_message,
        strict: route.strict,
        deflate: websocket::deflate_negotiated(switched),
    }
}

/// The request's line (`[log] access`). It names the connection and the request itself, not
/// through spans: see `telemetry::RequestSpan`. Out of `handle`, whose future every request
/// polls: the macro's expansion is large.
#[inline(never)]
fn access_line(
    conn: &ConnInfo,
    facts: &Facts,
    status: StatusCode,
    route: Option<&str>,
    server: &Option<Arc<Endpoint>>,
    started: Instant,
) {
    tracing::info!(
        { f::EVENT } = f::event::REQUEST,
        { f::LISTENER } = %conn.listener,
        { f::PEER } = %conn.peer,
        { f::SNI } = sni(conn),
        { f::STATUS } = status.as_u16(),
        { f::ROUTE } = route.unwrap_or("-"),
        { f::SERVER } = server.as_ref().map_or("-", |e| &*e.label),
        { f::METHOD } = %facts.method,
        { f::HOST } = facts.host.to_str().unwrap_or(""),
        { f::PATH } = facts.uri.path(),
        { f::CLIENT } = %facts.client,
        { f::HEAD_MS } = started.elapsed().as_millis() as u64,
        "request"
    );
}

/// The spans of a request whose lines are written by code that does not know it (failover,
/// ejection): the connection's (listener, peer, SNI), and its child with the request's
/// method, host, path (no query) and route. Made only then, and for the request's time only.
/// Under a filter above info it is `Span::none()`, made at the cost of a level check.
fn request_span(conn: &ConnInfo, facts: &Facts, host: &str, route: &str) -> tracing::Span {
    let parent = tracing::info_span!(
        f::CONN_SPAN,
        { f::LISTENER } = %conn.listener,
        { f::PEER } = %conn.peer,
        { f::SNI } = sni(conn),
    );
    tracing::info_span!(
        parent: &parent,
        f::REQUEST_SPAN,
        { f::METHOD } = %facts.method,
        { f::HOST } = host,
        { f::PATH } = facts.uri.path(),
        { f::ROUTE } = route,
    )
}

/// The TLS server name the client asked for, for log lines.
fn sni(conn: &ConnInfo) -> Option<&str> {
    conn.tls.as_ref().and_then(|tls| tls.sni.as_deref())
}

/// What the tunnel's close line names: the connection's and the request's fields where the line
/// is on (kept in one allocation rather than as spans, which an idle WebSocket would hold for
/// hours), else the route alone.
fn tunnel_origin(route: &Route, facts: &Facts, conn: &ConnInfo) -> tunnel::Origin {
    if !tunnel::close_line_enabled() {
        return tunnel::Origin::Route(route.name.clone());
    }
    tunnel::Origin::Request(Arc::new(tunnel::RequestFields {
        route: route.name.clone(),
        listener: conn.listener.clone(),
        peer: conn.peer,
        sni: sni(conn).map(Box::from),
        method: facts.method.clone(),
        host: facts.host.to_str().unwrap_or("").into(),
        path: facts.uri.path().into(),
    }))
}

/// See `Facts::client`.
fn client_of(request: &Request<Incoming>, conn: &ConnInfo, policy: &ListenerPolicy) -> SocketAddr {
    let trusted = &policy.trusted_proxies;
    if trusted.is_empty() {
        return conn.peer;
    }
    let ip = headers::client_address(conn.peer.ip(), request.headers(), |ip| trusted.contains(ip));
    match ip == conn.peer.ip() {
        true => conn.peer,
        false => SocketAddr::new(ip, 0),
    }
}

/// HTTP/2's `:protocol` pseudo-header (RFC 8441), present only on extended CONNECT.
fn connect_protocol(request: &Request<Incoming>) -> Option<&str> {
    request
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(hyper::ext::Protocol::as_str)
}

fn detached_value(value: &HeaderValue) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone())
}

fn detached_uri(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = uri.scheme().cloned();
    parts.authority = uri.authority().and_then(|a| a.as_str().parse().ok());
    parts.path_and_query = uri.path_and_query().and_then(|pq| match pq.as_str() {
        "/" => Some(PathAndQuery::from_static("/")),
        text => text.parse().ok(),
    });
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The host a request is for: the absolute-form authority if present (RFC 9112 §3.2.2),
/// else the one Host header. HTTP/1.1 requires Host; HTTP/1.0 may omit it.
fn request_host(request: &Request<Incoming>) -> Result<HeaderValue, ProxyError> {
    if let Some(authority) = request.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::BadHost);
    }
    let mut hosts = request.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) if host.to_str().is_ok() && !host.is_empty() => Ok(host.clone()),
        (None, _) if request.version() <= Version::HTTP_10 => Ok(HeaderValue::from_static("")),
        _ => Err(ProxyError::BadHost),
    }
}

/// Origin-form target, Host from the authority, HTTP/1.1 upstream, forwarding headers.
fn prepare_upstream_request(
    request: &mut Request<Incoming>,
    facts: &Facts,
    conn: &ConnInfo,
    policy: &ListenerPolicy,
    upgrade: bool,
) {
    if request.uri().authority().is_some() {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        request.headers_mut().insert(HOST, facts.host.clone());
    } else if !request.headers().contains_key(HOST) {
        // An HTTP/1.0 request without Host goes upstream as HTTP/1.1, which requires one:
        // empty, as RFC 9112 §3.2 says for a target without an authority.
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static(""));
    }
    if request.version() == Version::HTTP_2 {
        headers::join_cookies(request.headers_mut());
    }
    *request.version_mut() = Version::HTTP_11;
    let forwarding = headers::Forwarding {
        client: conn.peer.ip(),
        proto: if conn.tls.is_some() { "https" } else { "http" },
        host: (!facts.host.is_empty()).then_some(&facts.host),
    };
    let trusted = policy.trusted_proxies.contains(conn.peer.ip());
    headers::to_upstream_from(request.headers_mut(), &forwarding, upgrade, trusted);
    if let Some(name) = &policy.client_identity_header {
        let identity = conn
            .tls
            .as_ref()
            .and_then(|tls| tls.client_identity.as_deref());
        match identity.and_then(|id| HeaderValue::from_str(id).ok()) {
            Some(identity) => request.headers_mut().insert(name, identity),
            None => request.headers_mut().remove(name),
        };
    }
}

/// 308 keeps the method and body, unlike 301 (RFC 9110 §15.4.9).
fn redirect_to(location: String) -> Response<ProxyBody> {
    let mut response = respond(StatusCode::PERMANENT_REDIRECT, bytes::Bytes::new());
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

fn respond(status: StatusCode, body: bytes::Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::fixed(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    /// tokio allocates a task in 128-byte steps (its cell is cache-line aligned) with about
    /// 104 bytes of its own; an open WebSocket's task stays within 1 KiB.
    #[test]
    fn a_websocket_task_fits_in_1_kib() {
        let tunnel = std::mem::size_of::<crate::websocket::tunnel::Tunnel<super::TunnelHold>>();
        eprintln!("tunnel task: {tunnel} + 104 bytes");
        assert!(
            tunnel + 104 <= 1024,
            "a tunnel task is {tunnel} + 104 bytes"
        );
    }
}
