//! The validated configuration: the vocabulary every other module shares.
//!
//! `load` reads a file, `parse` checks text; both return every problem found, each located as
//! `file:line:col`. A `Config` that exists is one the gateway can run, and its values are
//! already what the runtime uses (header names and values, status codes, TLS server names,
//! addresses): nothing downstream parses config text again, so nothing can fail there.

mod cidr;
mod origin;
mod raw;
mod validate;

pub use cidr::{Cidr, CidrError, CidrProblem, CidrSet};
pub use origin::{Origin, OriginPattern, OriginPatternError};

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use rustls_pki_types::ServerName;
use tracing_subscriber::filter::Directive;

#[derive(Debug, Clone)]
pub struct Config {
    /// Runtime worker threads; 1 means a current-thread runtime.
    pub workers: usize,
    pub log: Log,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub reload: Reload,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub admin: Option<Admin>,
}

/// `[admin]`: metrics, health, readiness and the status page, on a listener of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub bind: SocketAddr,
    /// Peers allowed to connect; empty means loopback only.
    pub allow: CidrSet,
    /// Bind with SO_REUSEPORT, so that a new process can start beside the old one.
    pub reuse_port: bool,
}

#[derive(Debug, Clone)]
pub struct Log {
    /// The tracing filter, e.g. `info` or `wsgate=debug,info`, one directive per comma.
    pub level: Vec<Directive>,
    /// One line per proxied request (tunnels always log their close).
    pub access: bool,
    pub format: LogFormat,
}

/// How each log line is written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For a person: `timestamp LEVEL spans: target: message key=value ...`.
    #[default]
    Text,
    /// For a log shipper: one JSON object per line, span fields flattened into it.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect to an upstream server.
    pub connect: Duration,
    /// From accepting a TLS connection to the end of its handshake.
    pub tls_handshake: Duration,
    /// Reading a request head from a client. hyper starts this clock as soon as a connection
    /// is ready for its next request, so it also closes idle keep-alive client connections.
    pub request_header: Duration,
    /// From the end of the request body to the upstream's response head.
    pub upstream_response_header: Duration,
    /// How long an idle pooled upstream connection is kept for reuse.
    pub upstream_keepalive: Duration,
    /// A tunnel with no bytes in either direction for this long is closed.
    pub websocket_idle: Duration,
    /// Once one side of a tunnel has closed, silence from the other for this long closes it.
    pub websocket_half_closed: Duration,
    /// On shutdown, how long in-flight requests and open tunnels get to finish.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            tls_handshake: Duration::from_secs(10),
            request_header: Duration::from_secs(30),
            upstream_response_header: Duration::from_secs(60),
            upstream_keepalive: Duration::from_secs(30),
            websocket_idle: Duration::from_secs(600),
            websocket_half_closed: Duration::from_secs(30),
            drain: Duration::from_secs(30),
        }
    }
}

/// How a running gateway takes a new config (SIGHUP always reloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// Reload when the config file changes, checked every `watch_interval`.
    pub watch: bool,
    pub watch_interval: Duration,
    /// Tunnels of servers a reload removed close at random moments within this window, so that
    /// their clients do not reconnect in one storm.
    pub close_spread: Duration,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: false,
            watch_interval: Duration::from_secs(2),
            close_spread: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line + headers) accepted; larger gets 431. Also the
    /// HTTP/2 header list limit.
    pub request_header_bytes: usize,
    /// Streams one HTTP/2 client may have open at once (nginx: 128).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 receive window per stream and per connection, in bytes.
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    pub per_client: PerClient,
}

/// `[limits.per_client]`: what one client address may do, across the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerClient {
    /// WebSocket handshakes; over it, 429 with `Retry-After`.
    pub handshakes: Option<Rate>,
    /// Plain HTTP requests, in a bucket of their own; over it, 429 with `Retry-After`.
    pub requests: Option<Rate>,
    /// Open tunnels across all routes.
    pub max_tunnels: Option<u32>,
    /// Open tunnels on any one route, unless the route sets its own.
    pub max_tunnels_per_route: Option<u32>,
    /// Client addresses the limiter remembers at once (beyond those with open tunnels).
    pub tracked_clients: usize,
}

impl Default for PerClient {
    fn default() -> Self {
        PerClient {
            handshakes: None,
            requests: None,
            max_tunnels: None,
            max_tunnels_per_route: None,
            // About 100 bytes each: under 7 MiB when full.
            tracked_clients: 65_536,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_header_bytes: 32 * 1024,
            h2_max_concurrent_streams: 128,
            // Envoy's edge guidance is a 1 MiB connection window; a stream gets as much, so
            // that one WebSocket over HTTP/2 is not held to nginx's 64 KiB per round trip.
            h2_stream_window: 1024 * 1024,
            h2_connection_window: 4 * 1024 * 1024,
            per_client: PerClient::default(),
        }
    }
}

/// A token bucket's parameters: one token earned every `interval`, at most `burst` held, one
/// spent per admission. The bucket itself is per client, in `proxy::policy::ClientLimiter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub interval: Duration,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    /// HTTP/2 besides HTTP/1.1: offered by ALPN with TLS, prior-knowledge h2c without.
    pub http2: bool,
    /// Binds with SO_REUSEPORT, so that a second wsgate can bind the same address while this
    /// one drains (an upgrade without socket activation).
    pub reuse_port: bool,
    pub tls: Option<Tls>,
    /// A plain listener that sends clients to HTTPS.
    pub redirect_https: Option<RedirectHttps>,
    /// Every connection opens with a PROXY protocol header (v1 or v2), read before TLS.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Peers whose `X-Forwarded-*` and `Forwarded` are kept and appended to; from anyone
    /// else they are dropped and rebuilt.
    pub trusted_proxies: CidrSet,
    /// Connections served at once (a permit taken before the TLS handshake); `None`: no limit.
    pub max_connections: Option<u32>,
}

/// The L4 balancers in front of a listener, and how long their header may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Only these peers may send a header; a connection from anyone else is closed.
    pub from: CidrSet,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectHttps {
    /// The HTTPS port named in `Location` (left out when 443).
    pub port: u16,
    /// Path prefixes served here instead, e.g. `/.well-known/acme-challenge/`.
    pub except: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The first one is the default certificate.
    pub certificates: Vec<CertificateFiles>,
    pub unknown_sni: UnknownSni,
    pub min_version: TlsVersion,
    /// How often the certificate and key files are checked for changes (and reloaded).
    pub watch_interval: Duration,
    /// `Strict-Transport-Security` value added to every response of this listener.
    pub hsts: Option<HeaderValue>,
    pub client_auth: Option<ClientAuth>,
}

/// Client certificates (mTLS), verified against a CA bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca: PathBuf,
    /// Clients without a certificate are let in (a presented one must still verify).
    pub optional: bool,
    /// Carries the verified identity to the upstream; a client's own header of that name
    /// is always removed.
    pub identity_header: Option<HeaderName>,
}

/// PEM files, resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a client gets whose SNI names no certificate, or that sends no SNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownSni {
    /// The first certificate.
    Default,
    /// The handshake fails.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Empty means any host.
    pub hosts: Vec<HostPattern>,
    /// A path prefix that matches on a segment boundary.
    pub path: String,
    pub action: Action,
    /// Upgrade protocols besides `websocket` that this route passes through, lowercase.
    pub upgrades: Vec<String>,
    pub websocket: WebSocket,
    /// `None`: any origin.
    pub origins: Option<OriginPolicy>,
    /// `None`: every offer goes to the backend.
    pub subprotocols: Option<SubprotocolPolicy>,
    /// Larger request bodies get 413; `None`: no limit.
    pub max_request_body: Option<u64>,
    /// The global timeouts with this route's overrides applied.
    pub timeouts: RouteTimeouts,
    /// Open tunnels one client address may have on this route: the route's own value, or
    /// `[limits.per_client] max_tunnels_per_route`.
    pub max_tunnels_per_client: Option<u32>,
}

/// Which browser origins may use a route (cross-site WebSocket hijacking, RFC 6455 §10.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    pub allowed: Vec<OriginPattern>,
    /// Let in requests without `Origin` (non-browser clients send none).
    pub allow_missing: bool,
    pub check: OriginCheck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginCheck {
    /// WebSocket handshakes only.
    WebSocket,
    /// Every request.
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubprotocolPolicy {
    /// Compared exactly with the client's offers.
    pub allowed: Vec<String>,
    pub unmatched: SubprotocolUnmatched,
}

/// A handshake that offered subprotocols, none of them allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubprotocolUnmatched {
    /// 400.
    Refuse,
    /// To the backend without `Sec-WebSocket-Protocol`.
    Forward,
}

/// The timeouts a route can set for itself; each defaults to the global one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTimeouts {
    pub connect: Duration,
    pub upstream_response_header: Duration,
    pub websocket_idle: Duration,
    pub websocket_half_closed: Duration,
}

impl From<&Timeouts> for RouteTimeouts {
    fn from(global: &Timeouts) -> RouteTimeouts {
        RouteTimeouts {
            connect: global.connect,
            upstream_response_header: global.upstream_response_header,
            websocket_idle: global.websocket_idle,
            websocket_half_closed: global.websocket_half_closed,
        }
    }
}

/// What wsgate does with a WebSocket tunnel's frames; every byte passes through untouched
/// except the Pings, Pongs and Closes named here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocket {
    /// Nothing heard from the client for this long: wsgate sends it a Ping. `None`: off.
    pub ping_interval: Option<Duration>,
    /// Nothing heard for this long after a Ping: the peer is gone and the tunnel is closed.
    pub ping_timeout: Duration,
    /// Ping the upstream server as well, masked as a client's frames are.
    pub ping_upstream: bool,
    /// Largest frame payload accepted from either side; larger closes with 1009.
    pub max_frame: Option<u64>,
    /// Largest message (fragments together) accepted from either side; larger closes with 1009.
    pub max_message: Option<u64>,
    /// Close with 1002 on frames RFC 6455 forbids (masking, reserved opcodes and bits, control
    /// frames that are long or fragmented).
    pub strict: bool,
    pub permessage_deflate: Deflate,
}

impl Default for WebSocket {
    fn default() -> Self {
        WebSocket {
            // Below the idle timers of NATs and cloud load balancers (60 s and up), so that a
            // quiet WebSocket stays open without the application doing anything.
            ping_interval: Some(Duration::from_secs(30)),
            ping_timeout: Duration::from_secs(20),
            ping_upstream: false,
            max_frame: None,
            max_message: None,
            strict: false,
            permessage_deflate: Deflate::Pass,
        }
    }
}

/// What happens to a client's permessage-deflate offer (RFC 7692).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// Offer and answer go through untouched.
    Pass,
    /// The offer is removed before the backend sees it: no tunnel of the route is compressed.
    Strip,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Lowercase host name without port.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any name ending in it.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to the upstream with this index in `Config::upstreams`.
    Proxy { upstream: usize },
    /// Answer directly, like nginx `return` or Caddy `respond`.
    Respond { status: StatusCode, body: String },
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<Server>,
    /// How `https://` servers are verified and what we present to them.
    pub tls: UpstreamTls,
    /// A cookie that pins a client to the server that first answered it.
    pub sticky: Option<Sticky>,
    pub health: Option<HealthCheck>,
    pub passive: Option<Passive>,
    /// Close the tunnels of a server that turns unhealthy (1012, spread like a removal's).
    pub close_tunnels_on_unhealthy: bool,
}

/// `sticky = { cookie, secret }`. The secret keys the tokens, so that a client cannot name a
/// server it was not given, and every instance sharing it recognises the others' cookies.
#[derive(Clone, PartialEq, Eq)]
pub struct Sticky {
    pub cookie: String,
    pub secret: Vec<u8>,
}

impl fmt::Debug for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sticky")
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

/// `[upstream.health]`: active checks of every server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: http::uri::PathAndQuery,
    /// Check with a WebSocket handshake (expecting 101) instead of a GET.
    pub websocket: bool,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that bring a down server back, and failures that take it down.
    pub rise: u32,
    pub fall: u32,
    /// The statuses a GET check passes with.
    pub status: std::ops::RangeInclusive<u16>,
    /// The check's `Host`; the server's own address when absent.
    pub host: Option<http::HeaderValue>,
}

/// `[upstream.passive]`: `fail` consecutive connect failures or 5xx answers eject a server
/// for `eject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passive {
    pub fail: u32,
    pub eject: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// A PEM bundle to verify servers against; the system's roots when absent.
    pub ca: Option<PathBuf>,
    /// Accept any server certificate. Logged as a warning at start.
    pub insecure_skip_verify: bool,
    /// A client certificate for servers that ask for one.
    pub client: Option<CertificateFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// Fewest open requests plus tunnels, relative to weight.
    LeastConnections,
    /// Weighted rendezvous hashing of what the key names; least connections without it.
    Hash(HashKey),
}

/// What a request is hashed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address (after PROXY protocol and trusted forwarding headers).
    ClientAddress,
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub address: ServerAddress,
    pub weight: u32,
    /// `https://` or `wss://`: spoken to over TLS, with this name sent as SNI and verified.
    /// `None` is plain TCP; a TLS server without a name cannot be written down.
    pub tls: Option<ServerName<'static>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddress {
    /// An IP literal, connected to without a lookup.
    Ip(SocketAddr),
    /// A host name, resolved at each new connection.
    Name { host: String, port: u16 },
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddress::Ip(addr) => addr.fmt(f),
            ServerAddress::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", display_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
}

/// One problem in a config file, with where it is and what would fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Location { file, line, col } = &self.location;
        write!(f, "{file}:{line}:{col}: {}", self.message)
    }
}

fn display_diagnostics(diagnostics: &[Diagnostic]) -> String {
    let lines: Vec<String> = diagnostics.iter().map(Diagnostic::to_string).collect();
    lines.join("\n")
}

impl Config {
    pub fn upstream(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }
}

/// Reads and validates the file at `path`; errors are located by the path as given.
pub fn load(path: &Path) -> Result<Config, Error> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: display.clone(),
        source,
    })?;
    parse(&text, &display)
}

/// Validates config `text`; `file` names it in error locations.
pub fn parse(text: &str, file: &str) -> Result<Config, Error> {
    validate::validate(text, file).map_err(Error::Invalid)
}
