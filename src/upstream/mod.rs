//! Upstream groups: pick a server (by policy, key or sticky cookie, among the healthy ones),
//! connect first (failing over while nothing has been sent), then send through a `Lease` that
//! counts the server's open requests and tunnels.

pub mod affinity;
pub mod balance;
pub mod health;
pub mod http1;
pub mod pool;

use std::future::poll_fn;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{self, Balance, Passive, ServerAddress, Timeouts};
use crate::metrics::Histogram;
use crate::shutdown::{self, Signal, Trigger};
use crate::telemetry::{error_chain, fields as f, RequestSpan};
use crate::tls;
pub use affinity::Affinity;
use affinity::StickyCookie;
use health::{Change, Checks, Health};
use http1::{BodyFraming, Connection, Stream, Upload};
use pool::Pool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {server} failed")]
    Connect {
        server: Arc<str>,
        #[source]
        source: io::Error,
    },
    #[error("connect to {server} timed out after {after:?}")]
    ConnectTimeout { server: Arc<str>, after: Duration },
    #[error("TLS with {server} failed")]
    Tls {
        server: Arc<str>,
        #[source]
        source: io::Error,
    },
    #[error("{server} sent no response head within {after:?} of the request")]
    ResponseTimeout { server: Arc<str>, after: Duration },
    #[error("exchange with {server} failed")]
    Exchange {
        server: Arc<str>,
        #[source]
        source: http1::Error,
    },
}

impl Error {
    /// The server that failed, by its configured address.
    pub fn server(&self) -> &str {
        match self {
            Error::Connect { server, .. }
            | Error::ConnectTimeout { server, .. }
            | Error::Tls { server, .. }
            | Error::ResponseTimeout { server, .. }
            | Error::Exchange { server, .. } => server,
        }
    }

    /// The client's own request body failed (it went away mid-upload, or was over its route's
    /// `max_request_body`): not the upstream's fault.
    pub fn is_client_body(&self) -> bool {
        matches!(
            self,
            Error::Exchange {
                source: http1::Error::ClientBody(_),
                ..
            }
        )
    }

    /// The request body grew past its route's `max_request_body` while being sent.
    pub fn is_body_too_large(&self) -> bool {
        match self {
            Error::Exchange {
                source: http1::Error::ClientBody(cause),
                ..
            } => cause.downcast_ref::<BodyTooLarge>().is_some(),
            _ => false,
        }
    }
}

/// What a request body that crosses its limit ends with; the upstream request is abandoned.
#[derive(Debug, thiserror::Error)]
#[error("request body is over the route's limit of {0} bytes")]
pub struct BodyTooLarge(pub u64);

#[derive(Debug)]
pub struct UpstreamGroup {
    pub name: Arc<str>,
    balance: Balance,
    /// Kept to tell whether a reload changed how the group's TLS servers are reached.
    tls: config::UpstreamTls,
    endpoints: Vec<Arc<Endpoint>>,
    weights: Vec<u32>,
    /// Round robin order over `endpoints`, weighted.
    sequence: Vec<usize>,
    next: AtomicUsize,
    /// Each server's hash (of its configured address) and weight, for rendezvous hashing.
    rendezvous: Vec<(u64, u32)>,
    sticky: Option<StickyCookie>,
    passive: Option<Arc<Ejection>>,
    health: Option<Arc<config::HealthCheck>>,
    /// The window over which a server's tunnels close when it turns unhealthy, if they do.
    close_tunnels_on_unhealthy: Option<Duration>,
    checks: Checks,
}

/// One server of a group, with its live counters, health and idle connections.
#[derive(Debug)]
pub struct Endpoint {
    address: ServerAddress,
    /// For `https://` servers.
    tls: Option<Tls>,
    /// The address as configured, for logs and error pages.
    pub label: Arc<str>,
    /// The group's name, for logs.
    upstream: Arc<str>,
    /// Leases alive: requests in flight plus open tunnels.
    active: AtomicUsize,
    tunnels: AtomicUsize,
    /// HTTP/2 streams (RFC 8441) among `tunnels`.
    tunnels_h2: AtomicUsize,
    connect_failures: AtomicU64,
    /// From sending a request to its response head.
    pub response_time: Histogram,
    pub health: Health,
    pool: Pool<Connection>,
    /// Fired when the server's tunnels are to close (a reload removed the server, or it went
    /// unhealthy), with the window in milliseconds over which they do. Replaced after firing
    /// for unhealthiness, so that tunnels opened once it is back wait on a fresh one.
    retired: Mutex<Trigger>,
}

/// The connector and the name a TLS server is sent (SNI) and verified against.
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish()
    }
}

impl Endpoint {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// The name of the upstream the server belongs to.
    pub fn upstream_name(&self) -> &str {
        &self.upstream
    }

    pub fn tunnels_over_h2(&self) -> usize {
        self.tunnels_h2.load(Ordering::Relaxed)
    }

    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// The server left the configuration: its tunnels close at random moments within
    /// `spread`, so that their clients do not all reconnect at once.
    pub fn retire(&self, spread: Duration) {
        self.retirement_trigger()
            .fire_with(spread.as_millis() as u64);
    }

    /// The server turned unhealthy: the tunnels open now close as on `retire`; later ones
    /// (once it is back) do not.
    pub fn close_tunnels(&self, spread: Duration) {
        let fresh = shutdown::channel().0;
        let fired = std::mem::replace(&mut *self.retirement_trigger(), fresh);
        fired.fire_with(spread.as_millis() as u64);
    }

    /// What a tunnel on this server waits on for its retirement.
    pub fn retirement(&self) -> Signal {
        self.retirement_trigger().signal()
    }

    fn retirement_trigger(&self) -> std::sync::MutexGuard<'_, Trigger> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self, after: Duration) -> Result<Connection, Error> {
        let result = self.connect_once(after).await;
        if result.is_err() {
            self.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn connect_once(&self, after: Duration) -> Result<Connection, Error> {
        let connecting = async {
            match &self.address {
                ServerAddress::Ip(addr) => TcpStream::connect(addr).await,
                ServerAddress::Name { host, port } => {
                    TcpStream::connect((host.as_str(), *port)).await
                }
            }
        };
        let stream = match tokio::time::timeout(after, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    server: self.label.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    server: self.label.clone(),
                    after,
                })
            }
        };
        // Small writes (WebSocket frames, request heads) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        // The connection is driven by the request using it, not by a task of its own: a
        // channel hop per request and a second hyper state machine cost more than all of
        // wsgate's own request handling (see `http1`).
        match &self.tls {
            None => Ok(Connection::new(Stream::Tcp(stream))),
            Some(Tls { connector, name }) => {
                let tls = tokio::time::timeout(after, connector.connect(name.clone(), stream))
                    .await
                    .map_err(|_| Error::ConnectTimeout {
                        server: self.label.clone(),
                        after,
                    })?
                    .map_err(|source| Error::Tls {
                        server: self.label.clone(),
                        source,
                    })?;
                Ok(Connection::new(Stream::Tls(Box::new(tls))))
            }
        }
    }
}

/// An upstream whose TLS settings cannot be used (a CA bundle or client certificate).
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream:?}: TLS")]
pub struct SetupError {
    upstream: String,
    #[source]
    source: tls::Error,
}

impl UpstreamGroup {
    /// `previous`: the group of the same name in the snapshot being replaced. A server it had
    /// (same address, reached the same way) is carried over with its pool and counters, so that
    /// least-connections still counts the tunnels opened before a reload.
    /// `close_spread`: the window over which a server's tunnels close when it goes.
    pub fn new(
        config: &config::Upstream,
        previous: Option<&UpstreamGroup>,
        close_spread: Duration,
    ) -> Result<UpstreamGroup, SetupError> {
        let weights: Vec<u32> = config.servers.iter().map(|s| s.weight).collect();
        let kept = |server: &config::Server| {
            let previous = previous.filter(|p| p.tls == config.tls)?;
            previous
                .endpoints
                .iter()
                .find(|e| {
                    e.address == server.address
                        && e.tls.as_ref().map(|t| &t.name) == server.tls.as_ref()
                })
                .cloned()
        };
        // Built once, for the first TLS server: a group without one needs no CA bundle.
        let mut connector: Option<TlsConnector> = None;
        let mut endpoints = Vec::with_capacity(config.servers.len());
        for server in &config.servers {
            if let Some(endpoint) = kept(server) {
                endpoints.push(endpoint);
                continue;
            }
            let tls = match &server.tls {
                None => None,
                Some(name) => {
                    let connector = match &connector {
                        Some(connector) => connector,
                        None => connector.insert(tls_connector(config)?),
                    };
                    Some(Tls {
                        connector: connector.clone(),
                        name: name.clone(),
                    })
                }
            };
            endpoints.push(Arc::new(Endpoint {
                label: match tls {
                    Some(_) => format!("https://{}", server.address),
                    None => server.address.to_string(),
                }
                .into(),
                address: server.address.clone(),
                tls,
                upstream: config.name.as_str().into(),
                active: AtomicUsize::new(0),
                tunnels: AtomicUsize::new(0),
                tunnels_h2: AtomicUsize::new(0),
                connect_failures: AtomicU64::new(0),
                response_time: Histogram::new(crate::metrics::RESPONSE_BUCKETS),
                health: Health::new(),
                pool: Pool::default(),
                retired: Mutex::new(shutdown::channel().0),
            }));
        }
        let rendezvous = endpoints
            .iter()
            .zip(&weights)
            .map(|(e, &w)| (balance::stable_hash(e.label.as_bytes()), w))
            .collect();
        Ok(UpstreamGroup {
            name: config.name.as_str().into(),
            balance: config.balance.clone(),
            tls: config.tls.clone(),
            sticky: config
                .sticky
                .as_ref()
                .map(|sticky| StickyCookie::new(sticky, endpoints.iter().map(|e| &*e.label))),
            endpoints,
            sequence: balance::smooth_weighted_sequence(&weights),
            weights,
            next: AtomicUsize::new(0),
            rendezvous,
            passive: config.passive.map(|rule| {
                Arc::new(Ejection {
                    rule,
                    close_tunnels: config.close_tunnels_on_unhealthy.then_some(close_spread),
                })
            }),
            health: config.health.clone().map(Arc::new),
            close_tunnels_on_unhealthy: config.close_tunnels_on_unhealthy.then_some(close_spread),
            checks: Checks::default(),
        })
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Starts the active health checks, if configured: a task per server, until
    /// `stop_health_checks` or the group's drop. Needs a Tokio runtime.
    pub fn start_health_checks(&self) {
        let Some(check) = &self.health else { return };
        let plan = health::CheckPlan {
            upstream: self.name.clone(),
            check: check.clone(),
            close_tunnels: self.close_tunnels_on_unhealthy,
        };
        let tasks = self
            .endpoints
            .iter()
            .map(|endpoint| {
                tokio::spawn(health::run(Arc::downgrade(endpoint), plan.clone())).abort_handle()
            })
            .collect();
        self.checks.replace(tasks);
    }

    pub fn stop_health_checks(&self) {
        self.checks.stop();
    }

    /// What the request says about its server: its hash key and sticky cookie, where the
    /// upstream uses them.
    pub fn affinity(&self, headers: &HeaderMap, uri: &Uri, client: IpAddr) -> Affinity {
        Affinity {
            key: match &self.balance {
                Balance::Hash(key) => affinity::hash_of(key, headers, uri, client),
                _ => None,
            },
            pinned: self.sticky.as_ref().and_then(|s| s.pinned(headers)),
        }
    }

    /// The `Set-Cookie` that pins the client to `server`, unless its cookie already does.
    pub fn sticky_cookie(
        &self,
        affinity: &Affinity,
        server: &Arc<Endpoint>,
        tls: bool,
    ) -> Option<&HeaderValue> {
        let sticky = self.sticky.as_ref()?;
        let index = self.endpoints.iter().position(|e| Arc::ptr_eq(e, server))?;
        (affinity.pinned != Some(index)).then(|| sticky.set_cookie(index, tls))
    }

    fn usable(&self, i: usize) -> bool {
        self.endpoints[i].health.is_usable()
    }

    /// The server to try first: the sticky one, then the key's owner or the policy's pick,
    /// among usable servers; among all when none is usable (fail open).
    fn first_choice(&self, affinity: &Affinity) -> usize {
        if let Some(pinned) = affinity.pinned.filter(|&i| self.usable(i)) {
            return pinned;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.endpoints.len();
        match (&self.balance, affinity.key) {
            (Balance::Hash(_), Some(key)) => {
                let best = |only_usable: bool| {
                    (0..n)
                        .filter(|&i| !only_usable || self.usable(i))
                        .map(|i| {
                            let (server, weight) = self.rendezvous[i];
                            (balance::rendezvous_score(key, server, weight), i)
                        })
                        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
                        .map(|(_, i)| i)
                };
                best(true).or_else(|| best(false)).unwrap_or(0)
            }
            (Balance::RoundRobin, _) => {
                let len = self.sequence.len();
                (0..len)
                    .map(|step| self.sequence[(turn + step) % len])
                    .find(|&i| self.usable(i))
                    .unwrap_or(self.sequence[turn % len])
            }
            // Least connections, and hashing for a request without its key.
            _ => {
                let load = |only_usable: bool| {
                    move |i: usize| {
                        (!only_usable || self.usable(i))
                            .then(|| (self.endpoints[i].active(), self.weights[i]))
                    }
                };
                balance::least_loaded(n, turn, load(true))
                    .or_else(|| balance::least_loaded(n, turn, load(false)))
                    .unwrap_or(0)
            }
        }
    }

    /// Where to go after `first` failed: the key's hash order, or around the group; usable
    /// servers before the others.
    fn fallbacks(&self, affinity: &Affinity, first: usize) -> Vec<usize> {
        let n = self.endpoints.len();
        let mut order: Vec<usize> = match (&self.balance, affinity.key) {
            (Balance::Hash(_), Some(key)) => balance::rendezvous_order(key, &self.rendezvous),
            _ => (1..n).map(|offset| (first + offset) % n).collect(),
        };
        order.retain(|&i| i != first);
        // Stable: each part keeps its order.
        order.sort_by_key(|&i| !self.usable(i));
        order
    }

    /// A lease on a connected server. A server that cannot be connected to is skipped for the
    /// next one: nothing has been sent yet, so any method may fail over. The last error is
    /// returned when every server failed.
    /// `span`: the request's, for the lines a failure writes.
    pub async fn connect(
        &self,
        timeouts: &Timeouts,
        affinity: &Affinity,
        span: RequestSpan<'_>,
    ) -> Result<Lease, Error> {
        let first = self.first_choice(affinity);
        let mut rest: Option<std::vec::IntoIter<usize>> = None;
        let mut next = Some(first);
        while let Some(i) = next {
            let endpoint = &self.endpoints[i];
            // Counted before connecting, so concurrent least-connections picks see it.
            let mut lease = Lease::new(endpoint.clone(), timeouts, self.passive.clone());
            let err = match lease.checkout().await {
                Ok(()) => return Ok(lease),
                Err(err) => err,
            };
            lease.judge_failure(span);
            // Built only once the first choice failed: the common path allocates nothing.
            let rest = rest.get_or_insert_with(|| self.fallbacks(affinity, first).into_iter());
            next = rest.next();
            match next {
                Some(_) => {
                    let request = span.make();
                    tracing::event!(
                        parent: &request,
                        tracing::Level::WARN,
                        { f::EVENT } = f::event::FAILOVER,
                        { f::UPSTREAM } = %self.name,
                        { f::SERVER } = %endpoint.label,
                        { f::ERROR } = %error_chain(&err),
                        "upstream server failed, trying the next one"
                    );
                }
                None => return Err(err),
            }
        }
        unreachable!("the loop returns on its last server")
    }
}

fn tls_connector(config: &config::Upstream) -> Result<TlsConnector, SetupError> {
    if config.tls.insecure_skip_verify {
        tracing::warn!(
            upstream = %config.name,
            "TLS certificate verification is off for this upstream (insecure_skip_verify)"
        );
    }
    let client = tls::upstream_client_config(&config.tls).map_err(|source| SetupError {
        upstream: config.name.clone(),
        source,
    })?;
    Ok(TlsConnector::from(client))
}

/// Passive ejection as a group applies it.
#[derive(Debug)]
struct Ejection {
    rule: Passive,
    /// Close the server's tunnels, over this window, when it is ejected.
    close_tunnels: Option<Duration>,
}

/// A claim on one server for one request, and then its response body or tunnel.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
    conn: Option<Connection>,
    reused: bool,
    timeouts: LeaseTimeouts,
    /// The group's passive ejection rule, applied to how this exchange ends. Shared, so that
    /// a lease (which lives in every response body) grows by a pointer only.
    passive: Option<Arc<Ejection>>,
}

/// The timeouts a lease uses, not all of them: a lease lives in every response body.
#[derive(Debug, Clone, Copy)]
struct LeaseTimeouts {
    connect: Duration,
    upstream_response_header: Duration,
    upstream_keepalive: Duration,
}

/// A lease that became a tunnel: one pointer, since it lives in every open WebSocket. It counts
/// as an open request and an open tunnel of its server until dropped.
#[derive(Debug)]
pub struct TunnelLease {
    endpoint: Arc<Endpoint>,
    /// The client's side is an HTTP/2 stream.
    h2: bool,
}

impl TunnelLease {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The client's side is an HTTP/2 stream.
    pub fn is_h2(&self) -> bool {
        self.h2
    }
}

impl Drop for TunnelLease {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.tunnels.fetch_sub(1, Ordering::Relaxed);
        if self.h2 {
            self.endpoint.tunnels_h2.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Lease {
    fn new(endpoint: Arc<Endpoint>, timeouts: &Timeouts, passive: Option<Arc<Ejection>>) -> Lease {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Lease {
            endpoint,
            conn: None,
            reused: false,
            timeouts: LeaseTimeouts {
                connect: timeouts.connect,
                upstream_response_header: timeouts.upstream_response_header,
                upstream_keepalive: timeouts.upstream_keepalive,
            },
            passive,
        }
    }

    /// A connect failure, a timeout or a 5xx: one more towards the server's ejection.
    fn judge_failure(&self, span: RequestSpan<'_>) {
        let Some(Ejection {
            rule,
            close_tunnels,
        }) = self.passive.as_deref()
        else {
            return;
        };
        if self.endpoint.health.failed(rule) != Change::Ejected {
            return;
        }
        let request = span.make();
        tracing::event!(
            parent: &request,
            tracing::Level::WARN,
            { f::EVENT } = f::event::HEALTH_CHANGE,
            { f::UPSTREAM } = %self.endpoint.upstream,
            { f::SERVER } = %self.endpoint.label,
            { f::STATE } = "down",
            { f::CHECK } = "passive",
            { f::FAILURES } = rule.fail,
            { f::EJECT_S } = rule.eject.as_secs_f64(),
            { f::TUNNELS_CLOSING } = close_tunnels.map_or(0, |_| self.endpoint.tunnels()),
            "upstream server ejected after failures in a row"
        );
        if let Some(spread) = close_tunnels {
            self.endpoint.close_tunnels(*spread);
        }
    }

    fn judge_answer(&self, status: http::StatusCode, span: RequestSpan<'_>) {
        let Some(_) = &self.passive else { return };
        if status.is_server_error() {
            self.judge_failure(span);
        } else if self.endpoint.health.answered() == Change::Recovered {
            let request = span.make();
            tracing::event!(
                parent: &request,
                tracing::Level::INFO,
                { f::EVENT } = f::event::HEALTH_CHANGE,
                { f::UPSTREAM } = %self.endpoint.upstream,
                { f::SERVER } = %self.endpoint.label,
                { f::STATE } = "up",
                { f::CHECK } = "passive",
                "upstream server answers again after its ejection"
            );
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    async fn checkout(&mut self) -> Result<(), Error> {
        // Pooled only after its previous response ended; `take` leaves out those the server
        // closed meanwhile.
        if let Some(conn) = self.endpoint.pool.take(self.timeouts.upstream_keepalive) {
            self.conn = Some(conn);
            self.reused = true;
            return Ok(());
        }
        self.conn = Some(self.endpoint.connect(self.timeouts.connect).await?);
        self.reused = false;
        Ok(())
    }

    /// Sends `request` and waits for the response head; the body stays on the connection for
    /// `ResponseBody`. The response timeout starts once the request body has been sent, so a
    /// slow upload is not mistaken for a slow upstream. A body that grows past `max_body`
    /// bytes fails the exchange (`is_body_too_large`).
    pub async fn send(
        &mut self,
        request: Request<Incoming>,
        max_body: Option<u64>,
        span: RequestSpan<'_>,
    ) -> Result<Response<()>, Error> {
        self.send_body(request.map(Some), max_body, span).await
    }

    /// Sends a request that has no body, such as a handshake made up by wsgate.
    pub async fn send_bodyless(
        &mut self,
        request: Request<()>,
        span: RequestSpan<'_>,
    ) -> Result<Response<()>, Error> {
        self.send_body(request.map(|()| None), None, span).await
    }

    async fn send_body(
        &mut self,
        request: Request<Option<Incoming>>,
        max_body: Option<u64>,
        span: RequestSpan<'_>,
    ) -> Result<Response<()>, Error> {
        let sent = tokio::time::Instant::now();
        let result = self.exchange(request, max_body).await;
        if result.is_ok() {
            self.endpoint.response_time.observe(sent.elapsed());
        }
        match &result {
            Ok(response) => self.judge_answer(response.status(), span),
            // The client's own body failing says nothing about the server.
            Err(err) if !err.is_client_body() => self.judge_failure(span),
            Err(_) => {}
        }
        result
    }

    async fn exchange(
        &mut self,
        request: Request<Option<Incoming>>,
        max_body: Option<u64>,
    ) -> Result<Response<()>, Error> {
        let (parts, body) = request.into_parts();
        let body = body.filter(|body| !body.is_end_stream());
        let framing = match &body {
            None => BodyFraming::None,
            Some(_) if parts.headers.contains_key(CONTENT_LENGTH) => BodyFraming::Length,
            Some(_) => BodyFraming::Chunked,
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let head = http1::encode_head(&parts.method, target, &parts.headers, framing);
        let body = body.map(|body| RequestBody::new(body, max_body.unwrap_or(u64::MAX)));
        let mut upload = Upload::new(head.clone(), body, framing);
        loop {
            let conn = self.conn.as_mut().expect("checked out before sending");
            let mut read_any = false;
            let result = round_trip(
                conn,
                &mut upload,
                &parts.method,
                &mut read_any,
                self.timeouts.upstream_response_header,
            )
            .await;
            let err = match result {
                Ok(response) => return Ok(response),
                Err(RoundTrip::Timeout(after)) => {
                    return Err(Error::ResponseTimeout {
                        server: self.endpoint.label.clone(),
                        after,
                    })
                }
                Err(RoundTrip::Failed(err)) => err,
            };
            // A pooled connection the server closed just as it was reused: nothing of the
            // answer came and nothing of the body was taken, so the request goes again on a
            // fresh connection.
            let unanswered = matches!(err, http1::Error::Closed | http1::Error::Io(_));
            if self.reused && unanswered && !read_any && !upload.started {
                tracing::debug!(server = %self.endpoint.label, "pooled connection was closed, reconnecting");
                self.conn = Some(self.endpoint.connect(self.timeouts.connect).await?);
                self.reused = false;
                upload = upload.restart(head.clone());
                continue;
            }
            return Err(Error::Exchange {
                server: self.endpoint.label.clone(),
                source: err,
            });
        }
    }

    /// After a 101: the upstream's socket and the bytes that came after the head.
    pub fn take_upgraded(&mut self) -> (Stream, Bytes) {
        self.conn
            .take()
            .expect("an upgraded lease has its connection")
            .into_upgraded()
    }

    /// The response was read to its end: the connection can serve another request.
    pub fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            if conn.is_reusable() {
                conn.park();
                self.endpoint.pool.put(conn);
            }
        }
    }

    /// The connection became a tunnel (`h2`: for an HTTP/2 stream); the returned lease counts
    /// it until dropped.
    pub fn into_tunnel(self, h2: bool) -> TunnelLease {
        self.endpoint.tunnels.fetch_add(1, Ordering::Relaxed);
        if h2 {
            self.endpoint.tunnels_h2.fetch_add(1, Ordering::Relaxed);
        }
        // The request count moves over to the tunnel lease, which gives it back on drop.
        self.endpoint.active.fetch_add(1, Ordering::Relaxed);
        TunnelLease {
            endpoint: self.endpoint.clone(),
            h2,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

enum RoundTrip {
    Timeout(Duration),
    Failed(http1::Error),
}

/// Writes the request and reads the response head. An answer that comes while the body is
/// still being written (a 413 to a large upload) is taken, and the connection is not reused.
async fn round_trip(
    conn: &mut Connection,
    upload: &mut Upload<RequestBody>,
    method: &http::Method,
    read_any: &mut bool,
    after: Duration,
) -> Result<Response<()>, RoundTrip> {
    let mut write_failed = None;
    let early = poll_fn(|cx| {
        if write_failed.is_none() {
            match upload.poll_write(conn.stream_mut(), cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(None),
                Poll::Ready(Err(err @ http1::Error::ClientBody(_))) => {
                    return Poll::Ready(Some(Err(err)))
                }
                // The server may have answered and closed: its answer is still to be read.
                Poll::Ready(Err(err)) => write_failed = Some(err),
                Poll::Pending => {}
            }
        }
        conn.poll_response(cx, method, read_any).map(Some)
    })
    .await;
    match early {
        Some(Ok(response)) => {
            conn.abandon();
            return Ok(response);
        }
        Some(Err(err)) => {
            // Nothing came back: the failed write is the cause worth telling.
            let err = match (err, write_failed) {
                (http1::Error::Closed, Some(write)) => write,
                (err, _) => err,
            };
            return Err(RoundTrip::Failed(err));
        }
        None => {}
    }
    tokio::time::timeout(
        after,
        poll_fn(|cx| conn.poll_response(cx, method, read_any)),
    )
    .await
    .map_err(|_| RoundTrip::Timeout(after))?
    .map_err(RoundTrip::Failed)
}

/// A response body read from the upstream connection as the client takes it; at its end the
/// connection goes back to the pool, and dropped earlier it is closed.
#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once released.
    lease: Option<Lease>,
}

impl ResponseBody {
    pub fn new(lease: Lease) -> ResponseBody {
        // hyper never polls a body that is empty from the start (HEAD, 204, 304,
        // Content-Length: 0), so such a lease is released here.
        if lease.conn.as_ref().is_none_or(Connection::body_is_end) {
            lease.release();
            return ResponseBody { lease: None };
        }
        ResponseBody { lease: Some(lease) }
    }

    fn conn(&self) -> Option<&Connection> {
        self.lease.as_ref().and_then(|lease| lease.conn.as_ref())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = http1::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, http1::Error>>> {
        let Some(conn) = self.lease.as_mut().and_then(|lease| lease.conn.as_mut()) else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(conn.poll_body(cx));
        let ended = conn.body_is_end();
        match &frame {
            None => self.release(),
            Some(Ok(_)) if ended => self.release(),
            Some(Ok(_)) => {}
            // A broken response must not be reused: dropping the lease closes it.
            Some(Err(_)) => drop(self.lease.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.conn().is_none_or(Connection::body_is_end)
    }

    fn size_hint(&self) -> SizeHint {
        self.conn()
            .map_or_else(|| SizeHint::with_exact(0), Connection::body_size_hint)
    }
}

impl ResponseBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

/// The client's request body on its way upstream, cut when it crosses the route's limit.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    /// Bytes still allowed.
    allowance: u64,
    limit: u64,
}

impl RequestBody {
    fn new(inner: Incoming, limit: u64) -> RequestBody {
        RequestBody {
            inner,
            allowance: limit,
            limit,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let len = data.map_or(0, |d| d.len() as u64);
            match self.allowance.checked_sub(len) {
                Some(left) => self.allowance = left,
                None => return Poll::Ready(Some(Err(Box::new(BodyTooLarge(self.limit))))),
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(servers: &str, balance: &str) -> UpstreamGroup {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\n[[upstream]]\nname = \"app\"\n{balance}\nservers = [{servers}]\n"
        );
        let config = config::parse(&text, "t.toml").expect("valid");
        UpstreamGroup::new(&config.upstreams[0], None, Duration::from_secs(1)).expect("built")
    }

    const HASHED: &str = "balance = \"hash\"\nhash_key = \"query:k\"";
    const FIVE: &str = "\"10.0.0.1:80\", \"10.0.0.2:80\", { address = \"10.0.0.3:80\", weight = 2 }, \"b.internal:80\", \"https://c.internal:443\"";

    fn choice(group: &UpstreamGroup, key: u64) -> Arc<str> {
        let affinity = Affinity {
            key: Some(key),
            pinned: None,
        };
        group.endpoints[group.first_choice(&affinity)].label.clone()
    }

    #[test]
    fn two_independently_built_upstreams_choose_alike_for_10_000_keys() {
        let (one, two) = (group(FIVE, HASHED), group(FIVE, HASHED));
        // Traffic on one of them changes nothing: the choice depends on the key alone.
        let _busy = Lease::new(one.endpoints[0].clone(), &Timeouts::default(), None);
        for k in 0..10_000u32 {
            let key = balance::stable_hash(format!("user-{k}").as_bytes());
            assert_eq!(choice(&one, key), choice(&two, key), "key {k}");
        }
    }

    #[test]
    fn removing_one_of_five_servers_moves_at_most_1_3_n_of_the_keys() {
        let five = group(FIVE, HASHED);
        let four = group(FIVE.rsplit_once(", ").unwrap().0, HASHED);
        let moved = (0..1_000u32)
            .filter(|k| {
                let key = balance::stable_hash(&k.to_be_bytes());
                choice(&five, key) != choice(&four, key)
            })
            .count();
        assert!(moved * 5 <= 1_300, "{moved} of 1000 keys moved");
    }

    #[test]
    fn a_down_owner_s_keys_go_to_their_next_server_and_a_keyless_request_is_balanced() {
        let group = group(FIVE, HASHED);
        let key = balance::stable_hash(b"room");
        let order = balance::rendezvous_order(key, &group.rendezvous);
        let affinity = Affinity {
            key: Some(key),
            pinned: None,
        };
        assert_eq!(group.first_choice(&affinity), order[0]);
        group.endpoints[order[0]]
            .health
            .down
            .store(true, Ordering::Relaxed);
        assert_eq!(group.first_choice(&affinity), order[1]);
        let fallbacks = group.fallbacks(&affinity, order[1]);
        assert_eq!(
            fallbacks,
            [&order[2..], &order[..1]].concat(),
            "healthy first"
        );
        // Keyless: the least loaded, never the down server.
        for _ in 0..10 {
            assert_ne!(group.first_choice(&Affinity::default()), order[0]);
        }
    }
}
