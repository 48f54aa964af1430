//! Raw TOML -> domain types. Every problem is collected, not just the first, so that
//! `wsgate check` shows them all at once; each names its place as `file:line:col`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::raw;
use super::{
    Action, Balance, CertificateFiles, ClientAuth, Config, Diagnostic, HostPattern, Limits,
    Listener, Location, Log, RedirectHttps, Route, Server, ServerAddress, Timeouts, Tls,
    TlsVersion, UnknownSni, Upstream, UpstreamTls,
};

/// hyper cannot read a request head into a buffer smaller than this.
const MIN_HEADER_BYTES: i64 = 8 * 1024;
const MAX_HEADER_BYTES: i64 = 1024 * 1024;
const MAX_WEIGHT: i64 = 100;
const MAX_WORKERS: i64 = 1024;

pub(super) fn validate(text: &str, file: &str) -> Result<Config, Vec<Diagnostic>> {
    let mut v = Validator {
        text,
        file,
        diagnostics: Vec::new(),
    };
    let raw: raw::Config = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            let span = err.span().unwrap_or(0..0);
            // toml's messages can span lines ("invalid table header\nexpected ..."); a
            // diagnostic is one line.
            let message: Vec<&str> = err
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            v.error(span, message.join(": "));
            return Err(v.diagnostics);
        }
    };
    let config = v.config(raw);
    if v.diagnostics.is_empty() {
        Ok(config)
    } else {
        // In file order, the way an editor walks them.
        v.diagnostics
            .sort_by_key(|d| (d.location.line, d.location.col));
        Err(v.diagnostics)
    }
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        let location = self.locate(span.start);
        self.diagnostics.push(Diagnostic { location, message });
    }

    fn locate(&self, offset: usize) -> Location {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            file: self.file.to_owned(),
            line,
            col: before[line_start..].chars().count() + 1,
        }
    }

    fn config(&mut self, raw: raw::Config) -> Config {
        let workers = match raw.workers {
            None => 0,
            Some(w) if (0..=MAX_WORKERS).contains(w.get_ref()) => *w.get_ref() as usize,
            Some(w) => {
                self.error(
                    w.span(),
                    format!("workers must be between 0 (one per core) and {MAX_WORKERS}"),
                );
                0
            }
        };
        let upstreams = self.upstreams(raw.upstreams);
        Config {
            workers,
            log: self.log(raw.log),
            timeouts: self.timeouts(raw.timeouts),
            limits: self.limits(raw.limits),
            listeners: self.listeners(raw.listeners),
            routes: self.routes(raw.routes, &upstreams),
            upstreams,
        }
    }

    fn log(&mut self, raw: raw::Log) -> Log {
        let level = match raw.level {
            None => "info".to_owned(),
            Some(level) => {
                if let Err(err) = level.get_ref().parse::<tracing_subscriber::EnvFilter>() {
                    self.error(
                        level.span(),
                        format!(
                            "invalid log level {:?}: {err} (e.g. \"info\", \"wsgate=debug\")",
                            level.get_ref()
                        ),
                    );
                }
                level.into_inner()
            }
        };
        Log {
            level,
            access: raw.access.unwrap_or(true),
        }
    }

    fn timeouts(&mut self, raw: raw::Timeouts) -> Timeouts {
        let default = Timeouts::default();
        Timeouts {
            connect: self.duration(raw.connect, default.connect),
            tls_handshake: self.duration(raw.tls_handshake, default.tls_handshake),
            request_header: self.duration(raw.request_header, default.request_header),
            upstream_response_header: self.duration(
                raw.upstream_response_header,
                default.upstream_response_header,
            ),
            upstream_keepalive: self.duration(raw.upstream_keepalive, default.upstream_keepalive),
            websocket_idle: self.duration(raw.websocket_idle, default.websocket_idle),
            websocket_half_closed: self
                .duration(raw.websocket_half_closed, default.websocket_half_closed),
            drain: self.duration(raw.drain, default.drain),
        }
    }

    fn duration(&mut self, raw: Option<Spanned<String>>, default: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(raw.get_ref()) {
            Some(d) if !d.is_zero() => d,
            _ => {
                self.error(
                    raw.span(),
                    format!(
                        "invalid duration {:?}: expected a positive number with a unit, e.g. \"250ms\", \"5s\", \"2m\", \"1h\"",
                        raw.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn limits(&mut self, raw: raw::Limits) -> Limits {
        let mut limits = Limits::default();
        // RFC 9113 §6.9.1: windows are between 65,535 and 2^31-1.
        let window = 65_535..=i64::from(i32::MAX);
        limits.h2_max_concurrent_streams = self.bounded(
            raw.h2_max_concurrent_streams,
            1..=10_000,
            "h2_max_concurrent_streams",
            limits.h2_max_concurrent_streams,
        );
        limits.h2_stream_window = self.bounded(
            raw.h2_stream_window,
            window.clone(),
            "h2_stream_window",
            limits.h2_stream_window,
        );
        limits.h2_connection_window = self.bounded(
            raw.h2_connection_window,
            window,
            "h2_connection_window",
            limits.h2_connection_window,
        );
        if let Some(bytes) = raw.request_header_bytes {
            if (MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(bytes.get_ref()) {
                limits.request_header_bytes = *bytes.get_ref() as usize;
            } else {
                self.error(
                    bytes.span(),
                    format!("request_header_bytes must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}"),
                );
            }
        }
        limits
    }

    fn bounded(
        &mut self,
        raw: Option<Spanned<i64>>,
        range: std::ops::RangeInclusive<i64>,
        what: &str,
        default: u32,
    ) -> u32 {
        match raw {
            None => default,
            Some(value) if range.contains(value.get_ref()) => *value.get_ref() as u32,
            Some(value) => {
                self.error(
                    value.span(),
                    format!(
                        "{what} must be between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn listeners(&mut self, raw: Vec<raw::Listener>) -> Vec<Listener> {
        if raw.is_empty() {
            self.error(
                0..0,
                "no listener: add one, e.g. [[listener]] name = \"http\" bind = \"127.0.0.1:8080\""
                    .to_owned(),
            );
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::with_capacity(raw.len());
        for listener in raw {
            self.unique_name(&mut names, &listener.name, "listener");
            let bind = match listener.bind.get_ref().parse::<SocketAddr>() {
                Ok(bind) => bind,
                Err(_) => {
                    self.error(
                        listener.bind.span(),
                        format!(
                            "invalid bind address {:?}: expected ip:port, e.g. \"127.0.0.1:8080\" or \"[::]:443\"",
                            listener.bind.get_ref()
                        ),
                    );
                    continue;
                }
            };
            if !binds.insert(bind) {
                self.error(
                    listener.bind.span(),
                    format!("bind address {bind} is used by another listener"),
                );
            }
            let has_tls = listener.tls.is_some();
            let tls = listener.tls.and_then(|tls| self.tls(tls));
            let redirect_https = listener.redirect_https.and_then(|redirect| {
                if has_tls {
                    self.error(
                        redirect.span(),
                        "redirect_https belongs on a plain listener, not on a TLS one".to_owned(),
                    );
                    return None;
                }
                self.redirect(redirect.into_inner())
            });
            listeners.push(Listener {
                name: listener.name.into_inner(),
                bind,
                // HTTP/2 is what browsers speak over TLS; h2c is opt-in.
                http2: listener.http2.unwrap_or(tls.is_some()),
                tls,
                redirect_https,
            });
        }
        listeners
    }

    fn redirect(&mut self, raw: raw::RedirectHttps) -> Option<RedirectHttps> {
        let port = match raw.port {
            None => 443,
            Some(port) => match u16::try_from(*port.get_ref()) {
                Ok(p) if p != 0 => p,
                _ => {
                    self.error(
                        port.span(),
                        "redirect_https port must be 1-65535".to_owned(),
                    );
                    return None;
                }
            },
        };
        let mut except = Vec::with_capacity(raw.except.len());
        for prefix in raw.except {
            if !prefix.get_ref().starts_with('/') {
                self.error(
                    prefix.span(),
                    format!(
                        "redirect_https except {:?} must be a path starting with '/'",
                        prefix.get_ref()
                    ),
                );
                continue;
            }
            except.push(prefix.into_inner());
        }
        Some(RedirectHttps { port, except })
    }

    fn client_auth(&mut self, raw: &raw::Tls, base: &std::path::Path) -> Option<ClientAuth> {
        let optional = match raw
            .client_auth
            .as_ref()
            .map(|a| (a.get_ref().as_str(), a.span()))
        {
            None | Some(("required", _)) => false,
            Some(("optional", _)) => true,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("unknown client_auth {other:?} (known: required, optional)"),
                );
                false
            }
        };
        let identity_header = raw.client_identity_header.as_ref().and_then(|header| {
            let valid = http::HeaderName::from_bytes(header.get_ref().as_bytes()).is_ok();
            if !valid {
                self.error(
                    header.span(),
                    format!("invalid header name {:?}", header.get_ref()),
                );
            }
            valid.then(|| header.get_ref().to_ascii_lowercase())
        });
        let Some(ca) = &raw.client_ca else {
            if let Some(span) = raw
                .client_auth
                .as_ref()
                .map(Spanned::span)
                .or_else(|| raw.client_identity_header.as_ref().map(Spanned::span))
            {
                self.error(
                    span,
                    "client certificates need client_ca = \"ca.pem\"".to_owned(),
                );
            }
            return None;
        };
        Some(ClientAuth {
            ca: base.join(ca.get_ref()),
            optional,
            identity_header,
        })
    }

    fn tls(&mut self, raw: raw::Tls) -> Option<Tls> {
        if raw.certificates.get_ref().is_empty() {
            self.error(
                raw.certificates.span(),
                "tls needs at least one certificate: certificates = [{ cert = \"cert.pem\", key = \"key.pem\" }]".to_owned(),
            );
            return None;
        }
        let unknown_sni = match raw
            .unknown_sni
            .as_ref()
            .map(|u| (u.get_ref().as_str(), u.span()))
        {
            None | Some(("default", _)) => UnknownSni::Default,
            Some(("refuse", _)) => UnknownSni::Refuse,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("unknown unknown_sni {other:?} (known: default, refuse)"),
                );
                UnknownSni::Default
            }
        };
        let min_version = match raw
            .min_version
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v.span()))
        {
            None | Some(("1.2", _)) => TlsVersion::V1_2,
            Some(("1.3", _)) => TlsVersion::V1_3,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("unsupported min_version {other:?} (known: \"1.2\", \"1.3\")"),
                );
                TlsVersion::V1_2
            }
        };
        let base = std::path::Path::new(self.file)
            .parent()
            .unwrap_or(std::path::Path::new(""));
        let client_auth = self.client_auth(&raw, base);
        let certificates = raw
            .certificates
            .into_inner()
            .into_iter()
            .map(|c| CertificateFiles {
                cert: base.join(c.cert.get_ref()),
                key: base.join(c.key.get_ref()),
            })
            .collect();
        Some(Tls {
            certificates,
            unknown_sni,
            min_version,
            watch_interval: self.duration(raw.watch_interval, Duration::from_secs(10)),
            hsts: raw.hsts.and_then(|hsts| {
                let valid = hsts.get_ref().contains("max-age=")
                    && http::HeaderValue::from_str(hsts.get_ref()).is_ok();
                if !valid {
                    self.error(
                        hsts.span(),
                        format!("invalid hsts {:?}: expected e.g. \"max-age=31536000; includeSubDomains\"", hsts.get_ref()),
                    );
                }
                valid.then(|| hsts.into_inner())
            }),
            client_auth,
        })
    }

    fn unique_name(&mut self, seen: &mut HashSet<String>, name: &Spanned<String>, what: &str) {
        if name.get_ref().is_empty() {
            self.error(name.span(), format!("{what} name must not be empty"));
        } else if !seen.insert(name.get_ref().clone()) {
            self.error(
                name.span(),
                format!("duplicate {what} name {:?}", name.get_ref()),
            );
        }
    }

    fn routes(&mut self, raw: Vec<raw::Route>, upstreams: &[Upstream]) -> Vec<Route> {
        let mut names = HashSet::new();
        let mut matches = HashSet::new();
        let mut routes = Vec::with_capacity(raw.len());
        for route in raw {
            self.unique_name(&mut names, &route.name, "route");
            let name = route.name.get_ref();
            let hosts: Vec<HostPattern> = route.hosts.iter().filter_map(|h| self.host(h)).collect();
            let path = match &route.path {
                None => "/".to_owned(),
                Some(path) if path.get_ref().starts_with('/') => path.get_ref().clone(),
                Some(path) => {
                    self.error(
                        path.span(),
                        format!(
                            "route {name:?}: path {:?} must start with '/'",
                            path.get_ref()
                        ),
                    );
                    continue;
                }
            };
            let host_keys = if hosts.is_empty() {
                vec![None]
            } else {
                hosts.iter().cloned().map(Some).collect()
            };
            for host in host_keys {
                if !matches.insert((host.clone(), path.clone())) {
                    let span = route.path.as_ref().map_or(route.name.span(), Spanned::span);
                    self.error(
                        span,
                        format!(
                            "route {name:?}: another route already matches {} with path {path:?}",
                            describe_host(&host)
                        ),
                    );
                }
            }
            let action = match (&route.upstream, &route.respond) {
                (Some(upstream), None) => {
                    match upstreams.iter().position(|u| u.name == *upstream.get_ref()) {
                        Some(index) => Action::Proxy { upstream: index },
                        None => {
                            let known: Vec<&str> =
                                upstreams.iter().map(|u| u.name.as_str()).collect();
                            self.error(
                                upstream.span(),
                                format!(
                                    "route {name:?} refers to unknown upstream {:?} (known: {})",
                                    upstream.get_ref(),
                                    if known.is_empty() {
                                        "none".to_owned()
                                    } else {
                                        known.join(", ")
                                    }
                                ),
                            );
                            continue;
                        }
                    }
                }
                (None, Some(respond)) => {
                    let status = respond.get_ref().status.get_ref();
                    if !(200..=599).contains(status) {
                        self.error(
                            respond.get_ref().status.span(),
                            format!("route {name:?}: respond status {status} must be between 200 and 599"),
                        );
                        continue;
                    }
                    Action::Respond {
                        status: *status as u16,
                        body: respond.get_ref().body.clone(),
                    }
                }
                (Some(_), Some(respond)) => {
                    self.error(
                        respond.span(),
                        format!("route {name:?} has both upstream and respond: keep one"),
                    );
                    continue;
                }
                (None, None) => {
                    self.error(
                        route.name.span(),
                        format!("route {name:?} needs upstream = \"name\" or respond = {{ status = 200, body = \"...\" }}"),
                    );
                    continue;
                }
            };
            let mut upgrades = Vec::with_capacity(route.upgrades.len());
            for upgrade in &route.upgrades {
                let protocol = upgrade.get_ref().to_ascii_lowercase();
                if protocol == "websocket" {
                    self.error(
                        upgrade.span(),
                        format!("route {name:?}: websocket upgrades are always allowed; list only other protocols"),
                    );
                } else if protocol.is_empty() || !protocol.bytes().all(is_token_byte) {
                    self.error(
                        upgrade.span(),
                        format!(
                            "route {name:?}: {:?} is not a valid Upgrade protocol token",
                            upgrade.get_ref()
                        ),
                    );
                } else {
                    upgrades.push(protocol);
                }
            }
            routes.push(Route {
                name: route.name.into_inner(),
                hosts,
                path,
                action,
                upgrades,
            });
        }
        routes
    }

    fn host(&mut self, raw: &Spanned<String>) -> Option<HostPattern> {
        let host = raw.get_ref().to_ascii_lowercase();
        let (pattern, name) = match host.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(format!(".{rest}")), rest.to_owned()),
            None => (HostPattern::Exact(host.clone()), host),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            || name.starts_with('[') && name.ends_with(']');
        if valid {
            Some(pattern)
        } else {
            self.error(
                raw.span(),
                format!(
                    "invalid host {:?}: expected a name without port, e.g. \"example.com\" or \"*.example.com\"",
                    raw.get_ref()
                ),
            );
            None
        }
    }

    fn upstreams(&mut self, raw: Vec<raw::Upstream>) -> Vec<Upstream> {
        let mut names = HashSet::new();
        let mut upstreams = Vec::with_capacity(raw.len());
        for upstream in raw {
            self.unique_name(&mut names, &upstream.name, "upstream");
            let name = upstream.name.get_ref();
            let balance = match upstream
                .balance
                .as_ref()
                .map(|b| (b.get_ref().as_str(), b.span()))
            {
                None | Some(("least_connections", _)) => Balance::LeastConnections,
                Some(("round_robin", _)) => Balance::RoundRobin,
                Some((other, span)) => {
                    self.error(
                        span,
                        format!("upstream {name:?}: unknown balance {other:?} (known: least_connections, round_robin)"),
                    );
                    Balance::LeastConnections
                }
            };
            if upstream.servers.get_ref().is_empty() {
                self.error(
                    upstream.servers.span(),
                    format!("upstream {name:?} has no servers: add at least one \"host:port\""),
                );
            }
            let servers = upstream
                .servers
                .get_ref()
                .iter()
                .filter_map(|server| self.server(name, server))
                .collect();
            let tls = upstream
                .tls
                .map(|tls| self.upstream_tls(tls))
                .unwrap_or_default();
            upstreams.push(Upstream {
                name: upstream.name.into_inner(),
                balance,
                servers,
                tls,
            });
        }
        upstreams
    }

    fn upstream_tls(&mut self, raw: raw::UpstreamTls) -> UpstreamTls {
        let base = std::path::Path::new(self.file)
            .parent()
            .unwrap_or(std::path::Path::new(""));
        let client = match (raw.client_cert, raw.client_key) {
            (Some(cert), Some(key)) => Some(CertificateFiles {
                cert: base.join(cert.get_ref()),
                key: base.join(key.get_ref()),
            }),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.error(
                    one.span(),
                    "client_cert and client_key go together".to_owned(),
                );
                None
            }
        };
        UpstreamTls {
            ca: raw.ca.map(|ca| base.join(ca.get_ref())),
            insecure_skip_verify: raw.insecure_skip_verify,
            client,
        }
    }

    fn server(&mut self, upstream: &str, raw: &raw::Server) -> Option<Server> {
        let (address, weight) = match raw.get_ref() {
            toml::Value::String(address) => (address.as_str(), 1),
            toml::Value::Table(table) => {
                if let Some(key) = table
                    .keys()
                    .find(|k| !matches!(k.as_str(), "address" | "weight"))
                {
                    self.error(
                        raw.span(),
                        format!("upstream {upstream:?}: unknown server key `{key}`, expected `address` or `weight`"),
                    );
                    return None;
                }
                let Some(address) = table.get("address").and_then(toml::Value::as_str) else {
                    self.error(
                        raw.span(),
                        format!("upstream {upstream:?}: server needs address = \"host:port\""),
                    );
                    return None;
                };
                let weight = match table.get("weight") {
                    None => 1,
                    Some(toml::Value::Integer(w)) if (1..=MAX_WEIGHT).contains(w) => *w as u32,
                    Some(_) => {
                        self.error(
                            raw.span(),
                            format!("upstream {upstream:?}: weight must be an integer from 1 to {MAX_WEIGHT}"),
                        );
                        return None;
                    }
                };
                (address, weight)
            }
            _ => {
                self.error(
                    raw.span(),
                    format!("upstream {upstream:?}: a server is \"host:port\" or {{ address = \"host:port\", weight = 1 }}"),
                );
                return None;
            }
        };
        // Unknown schemes leave "scheme://" in place, which no address parses.
        let (tls, host_port) = match address.split_once("://") {
            Some(("https" | "wss", rest)) => (true, rest),
            Some(("http" | "ws", rest)) => (false, rest),
            _ => (false, address),
        };
        match parse_server_address(host_port) {
            Some(address) => Some(Server {
                address,
                weight,
                tls,
            }),
            None => {
                self.error(
                    raw.span(),
                    format!("upstream {upstream:?}: invalid server address {address:?}: expected host:port, e.g. \"127.0.0.1:9000\""),
                );
                None
            }
        }
    }
}

fn describe_host(host: &Option<HostPattern>) -> String {
    match host {
        None => "any host".to_owned(),
        Some(HostPattern::Exact(h)) => format!("host {h:?}"),
        Some(HostPattern::Suffix(s)) => format!("host \"*{s}\""),
    }
}

fn parse_server_address(address: &str) -> Option<ServerAddress> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some(ServerAddress::Ip(addr));
    }
    let (host, port) = address.rsplit_once(':')?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    (host_ok && port.parse::<u16>().is_ok_and(|p| p != 0))
        .then(|| ServerAddress::Name(address.to_owned()))
}

/// `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let value: u64 = text[..digits_end].parse().ok()?;
    let millis = match &text[digits_end..] {
        "ms" => value,
        "s" => value.checked_mul(1_000)?,
        "m" => value.checked_mul(60_000)?,
        "h" => value.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match validate(text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(ToString::to_string).collect(),
        }
    }

    const LISTENER: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:8080\"\n";

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "5d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn unknown_upstream_names_the_known_ones_at_its_position() {
        let text = format!(
            "{LISTENER}\n[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9000\"]\n\n[[upstream]]\nname = \"api\"\nservers = [\"127.0.0.1:9001\"]\n\n[[route]]\nname = \"api\"\nupstream = \"ap\"\n"
        );
        assert_eq!(
            errors(&text),
            ["t.toml:15:12: route \"api\" refers to unknown upstream \"ap\" (known: app, api)"]
        );
    }

    #[test]
    fn unknown_key_is_located() {
        let text = format!("{LISTENER}colour = \"red\"\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("t.toml:4:1: unknown field `colour`"),
            "{errs:?}"
        );
    }

    #[test]
    fn every_error_is_collected() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"nowhere\"\n[timeouts]\nconnect = \"5 seconds\"\n[[route]]\nname = \"r\"\npath = \"api\"\nupstream = \"x\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("t.toml:3:8: invalid bind address"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:5:11: invalid duration"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("t.toml:8:8: route \"r\": path \"api\" must start"),
            "{errs:?}"
        );
    }

    #[test]
    fn servers_accept_both_shapes_and_check_weight() {
        let text = format!(
            "{LISTENER}[[upstream]]\nname = \"app\"\nbalance = \"round_robin\"\nservers = [\"127.0.0.1:9000\", {{ address = \"localhost:9001\", weight = 3 }}]\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let servers = &config.upstreams[0].servers;
        assert_eq!(
            servers[0].address,
            ServerAddress::Ip("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            servers[1].address,
            ServerAddress::Name("localhost:9001".into())
        );
        assert_eq!(servers[1].weight, 3);
        assert_eq!(config.upstreams[0].balance, Balance::RoundRobin);

        let text = format!("{LISTENER}[[upstream]]\nname = \"app\"\nservers = [{{ address = \"h:1\", weight = 0 }}, \"nope\"]\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("weight must be an integer from 1 to 100"));
        assert!(errs[1].contains("invalid server address \"nope\""));
    }

    #[test]
    fn routes_need_exactly_one_action_and_unique_matches() {
        let text = format!(
            "{LISTENER}[[route]]\nname = \"a\"\npath = \"/x\"\nrespond = {{ status = 200 }}\n[[route]]\nname = \"b\"\npath = \"/x\"\nrespond = {{ status = 99 }}\n[[route]]\nname = \"c\"\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("another route already matches any host with path \"/x\""));
        assert!(errs[1].contains("respond status 99 must be between 200 and 599"));
        assert!(errs[2].contains("needs upstream = \"name\" or respond"));
    }

    #[test]
    fn hosts_and_upgrades() {
        let text = format!(
            "{LISTENER}[[route]]\nname = \"a\"\nhosts = [\"Example.com\", \"*.example.com\", \"bad host\"]\nupgrades = [\"websocket\", \"h2c\"]\nrespond = {{ status = 204 }}\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("invalid host \"bad host\""));
        assert!(errs[1].contains("websocket upgrades are always allowed"));

        let text = format!(
            "{LISTENER}[[route]]\nname = \"a\"\nhosts = [\"Example.com\", \"*.example.com\"]\nupgrades = [\"H2C\"]\nrespond = {{ status = 204 }}\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let route = &config.routes[0];
        assert_eq!(
            route.hosts,
            [
                HostPattern::Exact("example.com".into()),
                HostPattern::Suffix(".example.com".into())
            ]
        );
        assert_eq!(route.upgrades, ["h2c"]);
    }

    #[test]
    fn tls_settings_are_checked_and_paths_follow_the_config_file() {
        let text = "[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:8443\"\n[listener.tls]\ncertificates = [{ cert = \"c.pem\", key = \"/abs/k.pem\" }]\nunknown_sni = \"refuse\"\nmin_version = \"1.3\"\n";
        let config = validate(text, "/etc/wsgate/gw.toml").unwrap();
        let listener = &config.listeners[0];
        assert!(listener.http2, "HTTP/2 is on by default with TLS");
        let tls = listener.tls.as_ref().unwrap();
        assert_eq!(
            tls.certificates[0].cert,
            std::path::Path::new("/etc/wsgate/c.pem")
        );
        assert_eq!(tls.certificates[0].key, std::path::Path::new("/abs/k.pem"));
        assert_eq!(tls.unknown_sni, UnknownSni::Refuse);
        assert_eq!(tls.min_version, TlsVersion::V1_3);

        let text = "[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:8443\"\nhttp2 = false\n[listener.tls]\ncertificates = []\n";
        assert_eq!(
            errors(text),
            ["t.toml:6:16: tls needs at least one certificate: certificates = [{ cert = \"cert.pem\", key = \"key.pem\" }]"]
        );
        let text = "[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:8443\"\n[listener.tls]\ncertificates = [{ cert = \"c\", key = \"k\" }]\nunknown_sni = \"ignore\"\nmin_version = \"1.1\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("t.toml:6:15: unknown unknown_sni \"ignore\""),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:7:15: unsupported min_version \"1.1\""),
            "{errs:?}"
        );
    }

    #[test]
    fn redirect_and_hsts_are_checked() {
        let text = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:80\"\nredirect_https = { except = [\"/.well-known/acme-challenge/\"] }\n";
        let config = validate(text, "t.toml").unwrap();
        let redirect = config.listeners[0].redirect_https.as_ref().unwrap();
        assert_eq!(redirect.port, 443);
        assert_eq!(redirect.except, ["/.well-known/acme-challenge/"]);

        let text = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:80\"\nredirect_https = { port = 0, except = [\"acme\"] }\n[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:443\"\nredirect_https = {}\n[listener.tls]\ncertificates = [{ cert = \"c\", key = \"k\" }]\nhsts = \"forever\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].contains("redirect_https port must be 1-65535"),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("redirect_https belongs on a plain listener"),
            "{errs:?}"
        );
        assert!(errs[2].contains("invalid hsts \"forever\""), "{errs:?}");

        let text = "[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:443\"\n[listener.tls]\ncertificates = [{ cert = \"c\", key = \"k\" }]\nclient_auth = \"optional\"\n";
        assert_eq!(
            errors(text),
            ["t.toml:6:15: client certificates need client_ca = \"ca.pem\""]
        );
    }

    #[test]
    fn h2_limits_are_bounded() {
        let text = format!("{LISTENER}[limits]\nh2_max_concurrent_streams = 0\nh2_stream_window = 1024\nh2_connection_window = 8388608\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0]
                .starts_with("t.toml:5:29: h2_max_concurrent_streams must be between 1 and 10000"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:6:20: h2_stream_window must be between 65535"),
            "{errs:?}"
        );
    }

    #[test]
    fn missing_listener_is_an_error() {
        assert_eq!(
            errors("workers = 1\n"),
            ["t.toml:1:1: no listener: add one, e.g. [[listener]] name = \"http\" bind = \"127.0.0.1:8080\""]
        );
    }
}
