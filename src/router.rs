//! The compiled route table: the most specific host wins (exact, then the longest `*.suffix`,
//! then routes without hosts), and within it the longest path prefix on a segment boundary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::config::{self, Action, HostPattern};
use crate::metrics::{CloseCodes, Histogram, Refusals, StatusCounts};

/// What a matched route does, plus its live counters.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub target: Target,
    /// Lowercase Upgrade protocols besides `websocket` that may pass.
    pub upgrades: Vec<String>,
    pub websocket: config::WebSocket,
    /// Which `Origin`s may open a tunnel (or send any request, with `origin_check = "all"`).
    pub origins: Option<config::OriginPolicy>,
    /// Which subprotocol offers reach the backend.
    pub subprotocols: Option<config::SubprotocolPolicy>,
    /// Open tunnels one client address may have here; none: `[limits.per_client]`'s default.
    pub max_tunnels_per_client: Option<u32>,
    /// Larger request bodies get 413.
    pub max_request_body: Option<u64>,
    /// The global `[timeouts]` with this route's overrides.
    pub timeouts: config::RouteTimeouts,
    /// Shared with the tunnels the route opened, which outlive their request.
    pub stats: Arc<RouteStats>,
}

#[derive(Debug, Clone)]
pub enum Target {
    /// Index into the snapshot's upstream groups.
    Proxy { upstream: usize },
    Respond {
        status: http::StatusCode,
        body: Bytes,
    },
}

#[derive(Debug, Default)]
pub struct RouteStats {
    pub requests: AtomicU64,
    /// Answers by status class, a tunnel's 101 (or 200 on HTTP/2) included.
    pub statuses: StatusCounts,
    pub tunnels_open: AtomicU64,
    /// HTTP/2 streams (RFC 8441) among `tunnels_open`.
    pub tunnels_open_h2: AtomicU64,
    pub tunnels_total: AtomicU64,
    /// Tunnels that were HTTP/2 streams (RFC 8441), included in `tunnels_total`.
    pub tunnels_over_h2: AtomicU64,
    /// What closed tunnels carried and how they ended.
    pub tunnel: TunnelStats,
    /// Requests and handshakes refused before the upstream was asked.
    pub refusals: Refusals,
}

/// Recorded once per tunnel, when it closes: counting bytes as they move would put a shared
/// atomic in every read of every tunnel of the route.
#[derive(Debug)]
pub struct TunnelStats {
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub duration: Histogram,
    pub client_closes: CloseCodes,
    pub upstream_closes: CloseCodes,
}

impl Default for TunnelStats {
    fn default() -> TunnelStats {
        TunnelStats {
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            duration: Histogram::new(crate::metrics::TUNNEL_BUCKETS),
            client_closes: CloseCodes::default(),
            upstream_closes: CloseCodes::default(),
        }
    }
}

impl RouteStats {
    pub fn tunnel_opened(&self, h2: bool) {
        self.tunnels_open.fetch_add(1, Ordering::Relaxed);
        self.tunnels_total.fetch_add(1, Ordering::Relaxed);
        if h2 {
            self.tunnels_open_h2.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn tunnel_closed(&self, h2: bool) {
        self.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        if h2 {
            self.tunnels_open_h2.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Sorted most specific first, so the first match is the best one.
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    host: Option<HostPattern>,
    path: String,
    route: usize,
}

impl Entry {
    /// Higher sorts first: exact host, longer suffix, any host; then longer path.
    fn specificity(&self) -> (u8, usize, usize) {
        let (rank, len) = match &self.host {
            Some(HostPattern::Exact(_)) => (2, 0),
            Some(HostPattern::Suffix(suffix)) => (1, suffix.len()),
            None => (0, 0),
        };
        (rank, len, self.path.len())
    }

    fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(HostPattern::Exact(exact)) => host.eq_ignore_ascii_case(exact),
            Some(HostPattern::Suffix(suffix)) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        };
        host_ok && path_has_prefix(path, &self.path)
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, never `/apix`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// `Example.com:8080` -> `Example.com`, `[::1]:80` -> `[::1]`, `example.com.` -> `example.com`.
pub fn host_without_port(authority: &str) -> &str {
    let host = if authority.starts_with('[') {
        authority
            .find(']')
            .map_or(authority, |end| &authority[..=end])
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
    };
    host.strip_suffix('.').unwrap_or(host)
}

impl Router {
    /// `previous`: the table being replaced; a route of the same name keeps its stats.
    pub fn new(routes: &[config::Route], previous: Option<&Router>) -> Router {
        let mut entries = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            let hosts: Vec<Option<HostPattern>> = if route.hosts.is_empty() {
                vec![None]
            } else {
                route.hosts.iter().cloned().map(Some).collect()
            };
            entries.extend(hosts.into_iter().map(|host| Entry {
                host,
                path: route.path.clone(),
                route: index,
            }));
        }
        // Stable: equal specificity keeps config order (validation rejects exact duplicates).
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.specificity()));
        let routes = routes
            .iter()
            .map(|route| Route {
                name: route.name.as_str().into(),
                target: match &route.action {
                    Action::Proxy { upstream } => Target::Proxy {
                        upstream: *upstream,
                    },
                    Action::Respond { status, body } => Target::Respond {
                        status: *status,
                        body: Bytes::from(body.clone()),
                    },
                },
                upgrades: route.upgrades.clone(),
                websocket: route.websocket,
                origins: route.origins.clone(),
                subprotocols: route.subprotocols.clone(),
                max_tunnels_per_client: route.max_tunnels_per_client,
                max_request_body: route.max_request_body,
                timeouts: route.timeouts,
                stats: previous
                    .and_then(|p| p.routes.iter().find(|r| *r.name == *route.name))
                    .map_or_else(Arc::default, |r| r.stats.clone()),
            })
            .collect();
        Router { routes, entries }
    }

    /// `host` may carry a port. A linear scan: tables are small, and the first hit is the best.
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        let host = host_without_port(host);
        self.entries
            .iter()
            .find(|entry| entry.matches(host, path))
            .map(|entry| &self.routes[entry.route])
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, hosts: &[&str], path: &str) -> config::Route {
        config::Route {
            name: name.into(),
            hosts: hosts
                .iter()
                .map(|h| match h.strip_prefix('*') {
                    Some(suffix) => HostPattern::Suffix(suffix.into()),
                    None => HostPattern::Exact((*h).into()),
                })
                .collect(),
            path: path.into(),
            action: Action::Respond {
                status: http::StatusCode::OK,
                body: String::new(),
            },
            upgrades: Vec::new(),
            websocket: config::WebSocket::default(),
            origins: None,
            subprotocols: None,
            max_request_body: None,
            timeouts: (&config::Timeouts::default()).into(),
            max_tunnels_per_client: None,
        }
    }

    fn table() -> Router {
        Router::new(
            &[
                route("root", &[], "/"),
                route("api", &[], "/api"),
                route("api-v2", &[], "/api/v2/"),
                route("wild", &["*.example.com"], "/"),
                route("deep-wild", &["*.eu.example.com"], "/"),
                route("exact", &["www.example.com"], "/"),
                route("exact-api", &["www.example.com"], "/api"),
            ],
            None,
        )
    }

    #[test]
    fn picks_the_most_specific_route() {
        let router = table();
        let cases = [
            ("other.org", "/", "root"),
            ("other.org", "/apix", "root"),
            ("other.org", "/api", "api"),
            ("other.org", "/api/", "api"),
            ("other.org", "/api/users", "api"),
            ("other.org", "/api/v2", "api"),
            ("other.org", "/api/v2/x", "api-v2"),
            ("a.example.com", "/api", "wild"),
            ("a.b.example.com", "/", "wild"),
            ("example.com", "/", "root"),
            ("x.eu.example.com", "/", "deep-wild"),
            ("WWW.Example.COM:8080", "/", "exact"),
            ("www.example.com.", "/api/x", "exact-api"),
        ];
        for (host, path, want) in cases {
            let got = router.route(host, path).map(|r| &*r.name);
            assert_eq!(got, Some(want), "{host} {path}");
        }
    }

    #[test]
    fn no_match_without_a_catch_all() {
        let router = Router::new(&[route("api", &["api.test"], "/v1")], None);
        assert!(router.route("api.test", "/v2").is_none());
        assert!(router.route("other.test", "/v1").is_none());
        assert!(router.route("api.test", "/v1/x").is_some());
    }

    #[test]
    fn strips_ports_from_authorities() {
        assert_eq!(host_without_port("a.test:80"), "a.test");
        assert_eq!(host_without_port("a.test"), "a.test");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("a.test.:1"), "a.test");
    }
}
