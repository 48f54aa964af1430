//! Serde mirror of the TOML file: nothing is checked here beyond shape; `validate` turns it into
//! the domain types. Every table denies unknown keys so that a typo is an error, not a default.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub workers: Option<Spanned<i64>>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub websocket: WebSocket,
    #[serde(default)]
    pub reload: Reload,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<Upstream>,
    pub admin: Option<Spanned<Admin>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub bind: Spanned<String>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub reuse_port: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub level: Option<Spanned<String>>,
    pub access: Option<bool>,
    pub format: Option<Spanned<String>>,
}

/// Durations are strings such as `"5s"`, `"250ms"`, `"2m"` or `"1h"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: Option<Spanned<String>>,
    pub tls_handshake: Option<Spanned<String>>,
    pub request_header: Option<Spanned<String>>,
    pub upstream_response_header: Option<Spanned<String>>,
    pub upstream_keepalive: Option<Spanned<String>>,
    pub websocket_idle: Option<Spanned<String>>,
    pub websocket_half_closed: Option<Spanned<String>>,
    pub drain: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub request_header_bytes: Option<Spanned<i64>>,
    pub h2_max_concurrent_streams: Option<Spanned<i64>>,
    pub h2_stream_window: Option<Spanned<i64>>,
    pub h2_connection_window: Option<Spanned<i64>>,
    #[serde(default)]
    pub per_client: PerClient,
}

/// `[limits.per_client]`: what one client address may do, across the gateway.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerClient {
    /// An integer or a fraction, e.g. `0.5` for one every two seconds.
    pub handshakes_per_second: Option<Spanned<f64>>,
    pub handshake_burst: Option<Spanned<i64>>,
    /// Plain HTTP requests, in a bucket of their own.
    pub requests_per_second: Option<Spanned<f64>>,
    pub request_burst: Option<Spanned<i64>>,
    pub max_tunnels: Option<Spanned<i64>>,
    pub max_tunnels_per_route: Option<Spanned<i64>>,
    pub tracked_clients: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: Spanned<String>,
    pub bind: Spanned<String>,
    pub http2: Option<bool>,
    pub reuse_port: Option<bool>,
    pub tls: Option<Tls>,
    pub redirect_https: Option<Spanned<RedirectHttps>>,
    pub proxy_protocol: Option<Spanned<bool>>,
    pub proxy_protocol_from: Option<Spanned<Vec<Spanned<String>>>>,
    pub proxy_protocol_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectHttps {
    pub port: Option<Spanned<i64>>,
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub certificates: Spanned<Vec<Certificate>>,
    pub unknown_sni: Option<Spanned<String>>,
    pub min_version: Option<Spanned<String>>,
    pub watch_interval: Option<Spanned<String>>,
    pub hsts: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub client_identity_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Spanned<String>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub respond: Option<Spanned<Respond>>,
    #[serde(default)]
    pub upgrades: Vec<Spanned<String>>,
    pub websocket: Option<WebSocket>,
    /// Absent: no check; `[]`: no browser origin is allowed.
    pub allowed_origins: Option<Vec<Spanned<String>>>,
    pub allow_missing_origin: Option<Spanned<bool>>,
    pub origin_check: Option<Spanned<String>>,
    pub subprotocols: Option<Vec<Spanned<String>>>,
    pub subprotocol_unmatched: Option<Spanned<String>>,
    pub max_request_body: Option<Spanned<i64>>,
    pub max_tunnels_per_client: Option<Spanned<i64>>,
    pub timeouts: Option<RouteTimeouts>,
}

/// A route's `timeouts = { ... }`: the global keys that make sense for one route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    pub connect: Option<Spanned<String>>,
    pub upstream_response_header: Option<Spanned<String>>,
    pub websocket_idle: Option<Spanned<String>>,
    pub websocket_half_closed: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    pub watch: Option<bool>,
    pub watch_interval: Option<Spanned<String>>,
    pub close_spread: Option<Spanned<String>>,
}

/// `[websocket]` sets every route's defaults; a route's `websocket = { ... }` overrides keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocket {
    /// A duration, or `"off"`.
    pub ping_interval: Option<Spanned<String>>,
    pub ping_timeout: Option<Spanned<String>>,
    pub ping_upstream: Option<bool>,
    pub max_frame: Option<Spanned<i64>>,
    pub max_message: Option<Spanned<i64>>,
    pub strict: Option<bool>,
    pub permessage_deflate: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    pub status: Spanned<i64>,
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: Spanned<String>,
    pub balance: Option<Spanned<String>>,
    pub servers: Spanned<Vec<Server>>,
    pub tls: Option<UpstreamTls>,
    pub hash_key: Option<Spanned<String>>,
    pub sticky: Option<Spanned<Sticky>>,
    pub health: Option<Spanned<HealthCheck>>,
    pub passive: Option<Passive>,
    #[serde(default)]
    pub close_tunnels_on_unhealthy: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    pub cookie: Spanned<String>,
    pub secret: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub websocket: bool,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub status: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    pub fail: Option<Spanned<i64>>,
    pub eject: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca: Option<Spanned<String>>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
}

/// A server is either `"host:port"` or `{ address = "host:port", weight = 2 }`. Kept as a raw
/// value because `Spanned` cannot sit inside an untagged enum; `validate` reads both shapes.
pub type Server = Spanned<toml::Value>;
