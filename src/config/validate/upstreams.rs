//! `[[upstream]]`: balance, servers in both shapes, and the TLS used to reach them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue};
use rustls_pki_types::ServerName;
use toml::Spanned;

use super::helpers::is_token_byte;
use super::Validator;
use crate::config::raw;
use crate::config::{
    Balance, CertificateFiles, HashKey, HealthCheck, Passive, Server, ServerAddress, Sticky,
    Upstream, UpstreamTls,
};

const MAX_WEIGHT: i64 = 100;
/// Short enough to guess in no useful time; HMAC keys below its output size lose strength.
const MIN_SECRET_BYTES: usize = 16;

#[derive(Clone, Copy, PartialEq)]
enum BalanceName {
    RoundRobin,
    LeastConnections,
    Hash,
}

impl Validator<'_> {
    pub(super) fn upstreams(&mut self, raw: Vec<raw::Upstream>) -> Vec<Upstream> {
        let mut names = HashSet::new();
        let mut upstreams = Vec::with_capacity(raw.len());
        for upstream in raw {
            self.unique_name(&mut names, &upstream.name, "upstream");
            let name = upstream.name.get_ref();
            let balance_name = self.choice(
                upstream.balance.as_ref(),
                &format!("upstream {name:?}: unknown balance"),
                &[
                    ("hash", BalanceName::Hash),
                    ("least_connections", BalanceName::LeastConnections),
                    ("round_robin", BalanceName::RoundRobin),
                ],
                BalanceName::LeastConnections,
            );
            let balance = self.balance(
                name,
                balance_name,
                upstream.balance.as_ref(),
                upstream.hash_key.as_ref(),
            );
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
            let sticky = upstream.sticky.map(|sticky| self.sticky(name, sticky));
            let health = upstream
                .health
                .map(|health| self.health_check(name, health));
            let passive = upstream.passive.map(|passive| self.passive(passive));
            upstreams.push(Upstream {
                name: upstream.name.into_inner(),
                balance,
                servers,
                tls,
                sticky: sticky.flatten(),
                health: health.flatten(),
                passive,
                close_tunnels_on_unhealthy: upstream.close_tunnels_on_unhealthy,
            });
        }
        upstreams
    }

    fn balance(
        &mut self,
        upstream: &str,
        name: BalanceName,
        raw_balance: Option<&Spanned<String>>,
        raw_key: Option<&Spanned<String>>,
    ) -> Balance {
        const KEYS: &str = "\"client_address\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"";
        match (name, raw_key) {
            (BalanceName::RoundRobin, None) => Balance::RoundRobin,
            (BalanceName::LeastConnections, None) => Balance::LeastConnections,
            (BalanceName::Hash, None) => {
                let span = raw_balance.map_or(0..0, Spanned::span);
                self.error(
                    span,
                    format!("upstream {upstream:?}: balance = \"hash\" needs hash_key = {KEYS}"),
                );
                Balance::LeastConnections
            }
            (BalanceName::Hash, Some(key)) => match self.hash_key(upstream, key, KEYS) {
                Some(key) => Balance::Hash(key),
                None => Balance::LeastConnections,
            },
            (_, Some(key)) => {
                self.error(
                    key.span(),
                    format!("upstream {upstream:?}: hash_key is used only with balance = \"hash\""),
                );
                Balance::LeastConnections
            }
        }
    }

    fn hash_key(&mut self, upstream: &str, raw: &Spanned<String>, keys: &str) -> Option<HashKey> {
        let text = raw.get_ref();
        let key = match text.split_once(':') {
            None if text == "client_address" => Some(HashKey::ClientAddress),
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(HashKey::Header),
            Some(("cookie", name)) if is_token(name) => Some(HashKey::Cookie(name.to_owned())),
            // Compared with the parameter names as sent, so no byte that would need escaping.
            Some(("query", name))
                if !name.is_empty() && !name.bytes().any(|b| b"&=#% ".contains(&b)) =>
            {
                Some(HashKey::Query(name.to_owned()))
            }
            _ => None,
        };
        if key.is_none() {
            self.error(
                raw.span(),
                format!("upstream {upstream:?}: invalid hash_key {text:?}: expected {keys}"),
            );
        }
        key
    }

    fn sticky(&mut self, upstream: &str, raw: Spanned<raw::Sticky>) -> Option<Sticky> {
        let span = raw.span();
        let raw = raw.into_inner();
        let cookie = raw.cookie.get_ref();
        if !is_token(cookie) {
            self.error(
                raw.cookie.span(),
                format!(
                    "upstream {upstream:?}: sticky cookie {cookie:?} is not a valid cookie name"
                ),
            );
            return None;
        }
        let Some(secret) = raw.secret else {
            self.error(
                span,
                format!("upstream {upstream:?}: sticky needs secret = \"...\" (at least {MIN_SECRET_BYTES} random characters, the same on every instance)"),
            );
            return None;
        };
        if secret.get_ref().len() < MIN_SECRET_BYTES {
            self.error(
                secret.span(),
                format!("upstream {upstream:?}: sticky secret must be at least {MIN_SECRET_BYTES} bytes long"),
            );
            return None;
        }
        Some(Sticky {
            cookie: cookie.clone(),
            secret: secret.into_inner().into_bytes(),
        })
    }

    fn health_check(
        &mut self,
        upstream: &str,
        raw: Spanned<raw::HealthCheck>,
    ) -> Option<HealthCheck> {
        let span = raw.span();
        let raw = raw.into_inner();
        let interval = self.duration(raw.interval, Duration::from_secs(5));
        let timeout = self.duration(raw.timeout, Duration::from_secs(2));
        let rise = self.count(raw.rise, "health.rise").unwrap_or(2);
        let fall = self.count(raw.fall, "health.fall").unwrap_or(3);
        let status = match raw.status {
            None => 200..=399,
            Some(text) => match parse_status_range(text.get_ref()) {
                Some(range) => range,
                None => {
                    self.error(
                        text.span(),
                        format!("upstream {upstream:?}: health.status {:?}: expected a status or a range from 100 to 599, e.g. \"200\" or \"200-399\"", text.get_ref()),
                    );
                    200..=399
                }
            },
        };
        let host = raw.host.and_then(|host| {
            let value = HeaderValue::from_str(host.get_ref()).ok();
            if value.is_none() {
                self.error(
                    host.span(),
                    format!(
                        "upstream {upstream:?}: health.host {:?} is not a valid Host",
                        host.get_ref()
                    ),
                );
            }
            value
        });
        let Some(path) = raw.path else {
            self.error(
                span,
                format!(
                    "upstream {upstream:?}: health needs path = \"/...\", the path that is checked"
                ),
            );
            return None;
        };
        let parsed = path
            .get_ref()
            .starts_with('/')
            .then(|| path.get_ref().parse::<PathAndQuery>().ok())
            .flatten();
        let Some(parsed) = parsed else {
            self.error(
                path.span(),
                format!(
                    "upstream {upstream:?}: health.path {:?} must be a path starting with /",
                    path.get_ref()
                ),
            );
            return None;
        };
        Some(HealthCheck {
            path: parsed,
            websocket: raw.websocket,
            interval,
            timeout,
            rise,
            fall,
            status,
            host,
        })
    }

    fn passive(&mut self, raw: raw::Passive) -> Passive {
        Passive {
            fail: self.count(raw.fail, "passive.fail").unwrap_or(3),
            eject: self.duration(raw.eject, Duration::from_secs(30)),
        }
    }

    pub(super) fn upstream_tls(&mut self, raw: raw::UpstreamTls) -> UpstreamTls {
        let base = self.config_dir();
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

    pub(super) fn server(&mut self, upstream: &str, raw: &raw::Server) -> Option<Server> {
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
        let Some(parsed) = parse_server_address(host_port) else {
            self.error(
                raw.span(),
                format!("upstream {upstream:?}: invalid server address {address:?}: expected host:port, e.g. \"127.0.0.1:9000\""),
            );
            return None;
        };
        let tls = if tls {
            match tls_server_name(&parsed) {
                Ok(name) => Some(name),
                Err(host) => {
                    self.error(
                        raw.span(),
                        format!("upstream {upstream:?}: server {address:?}: {host:?} is not a valid TLS server name (use a DNS name or an IP address)"),
                    );
                    return None;
                }
            }
        } else {
            None
        };
        Some(Server {
            address: parsed,
            weight,
            tls,
        })
    }
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_token_byte)
}

/// `"200"` or `"200-399"`, within 100..=599.
fn parse_status_range(text: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high) = (
        low.trim().parse::<u16>().ok()?,
        high.trim().parse::<u16>().ok()?,
    );
    ((100..=599).contains(&low) && (low..=599).contains(&high)).then_some(low..=high)
}

/// `ip:port`, `[ipv6]:port` or `name:port`. A name is anything getaddrinfo may resolve,
/// `127.1` included; only TLS asks more of it (`tls_server_name`).
fn parse_server_address(address: &str) -> Option<ServerAddress> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some(ServerAddress::Ip(addr));
    }
    let (host, port) = address.rsplit_once(':')?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    host_ok.then(|| ServerAddress::Name {
        host: host.to_owned(),
        port,
    })
}

/// The name a TLS server is sent as SNI and verified against: an IP literal as it is, a host
/// name if it is a valid DNS name. rustls refuses all-numeric names such as `127.1` or
/// `1.2.3`, which getaddrinfo would read as IPv4 shorthand; the host is returned then.
fn tls_server_name(address: &ServerAddress) -> Result<ServerName<'static>, &str> {
    match address {
        ServerAddress::Ip(addr) => Ok(ServerName::from(addr.ip())),
        ServerAddress::Name { host, .. } => {
            ServerName::try_from(host.clone()).map_err(|_| host.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, LISTENER};
    use super::super::validate;
    use super::*;

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
            ServerAddress::Name {
                host: "localhost".into(),
                port: 9001
            }
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
    fn tls_servers_carry_their_server_name_and_refuse_what_is_not_one() {
        let text = format!(
            "{LISTENER}[[upstream]]\nname = \"app\"\nservers = [\"https://LocalHost:1\", \"wss://127.0.0.1:2\", \"https://[::1]:3\", \"http://127.1:4\", \"127.1:5\"]\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let names: Vec<_> = config.upstreams[0]
            .servers
            .iter()
            .map(|s| s.tls.clone())
            .collect();
        assert_eq!(
            names,
            [
                Some(ServerName::try_from("LocalHost").unwrap()),
                Some(ServerName::from(
                    "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
                )),
                Some(ServerName::from("::1".parse::<std::net::IpAddr>().unwrap())),
                None,
                None,
            ]
        );
        // Plain servers may use any name getaddrinfo resolves, IPv4 shorthand included.
        assert_eq!(
            config.upstreams[0].servers[3].address,
            ServerAddress::Name {
                host: "127.1".into(),
                port: 4
            }
        );

        let text = format!(
            "{LISTENER}[[upstream]]\nname = \"app\"\nservers = [\"https://127.1:29991\", {{ address = \"wss://1.2.3:1\" }}]\n"
        );
        assert_eq!(
            errors(&text),
            [
                "t.toml:6:12: upstream \"app\": server \"https://127.1:29991\": \"127.1\" is not a valid TLS server name (use a DNS name or an IP address)",
                "t.toml:6:35: upstream \"app\": server \"wss://1.2.3:1\": \"1.2.3\" is not a valid TLS server name (use a DNS name or an IP address)",
            ]
        );
    }

    #[test]
    fn hash_sticky_health_and_passive_are_typed_with_their_defaults() {
        let text = format!(
            "{LISTENER}[[upstream]]\nname = \"app\"\nbalance = \"hash\"\nhash_key = \"query:room\"\nservers = [\"127.0.0.1:9000\"]\nsticky = {{ cookie = \"srv\", secret = \"0123456789abcdef\" }}\nclose_tunnels_on_unhealthy = true\n[upstream.health]\npath = \"/healthz\"\nstatus = \"200-299\"\n[upstream.passive]\neject = \"5s\"\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let upstream = &config.upstreams[0];
        assert_eq!(
            upstream.balance,
            Balance::Hash(HashKey::Query("room".into()))
        );
        let sticky = upstream.sticky.as_ref().unwrap();
        assert_eq!(
            (sticky.cookie.as_str(), &sticky.secret[..]),
            ("srv", &b"0123456789abcdef"[..])
        );
        assert!(
            !format!("{sticky:?}").contains("0123"),
            "the secret stays out of logs"
        );
        let health = upstream.health.as_ref().unwrap();
        assert_eq!(health.path, "/healthz");
        assert_eq!(
            (health.rise, health.fall, health.status.clone()),
            (2, 3, 200..=299)
        );
        assert_eq!(
            (health.interval, health.timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert!(!health.websocket && health.host.is_none());
        assert_eq!(
            upstream.passive,
            Some(Passive {
                fail: 3,
                eject: Duration::from_secs(5)
            })
        );
        assert!(upstream.close_tunnels_on_unhealthy);

        for (key, expected) in [
            ("client_address", HashKey::ClientAddress),
            (
                "header:X-User",
                HashKey::Header(HeaderName::from_static("x-user")),
            ),
            ("cookie:sid", HashKey::Cookie("sid".into())),
        ] {
            let text = format!("{LISTENER}[[upstream]]\nname = \"app\"\nbalance = \"hash\"\nhash_key = \"{key}\"\nservers = [\"127.0.0.1:9000\"]\n");
            assert_eq!(
                validate(&text, "t.toml").unwrap().upstreams[0].balance,
                Balance::Hash(expected)
            );
        }
    }

    #[test]
    fn stickiness_and_health_mistakes_are_located() {
        let up = |rest: &str| {
            format!(
                "{LISTENER}[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9000\"]\n{rest}"
            )
        };
        let cases = [
            ("balance = \"hash\"\n", "t.toml:7:11: upstream \"app\": balance = \"hash\" needs hash_key = \"client_address\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""),
            ("hash_key = \"query:a\"\n", "t.toml:7:12: upstream \"app\": hash_key is used only with balance = \"hash\""),
            ("balance = \"hash\"\nhash_key = \"query:a&b\"\n", "t.toml:8:12: upstream \"app\": invalid hash_key \"query:a&b\": expected \"client_address\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""),
            ("balance = \"hash\"\nhash_key = \"path\"\n", "t.toml:8:12: upstream \"app\": invalid hash_key \"path\": expected \"client_address\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""),
            ("sticky = { cookie = \"srv\" }\n", "t.toml:7:10: upstream \"app\": sticky needs secret = \"...\" (at least 16 random characters, the same on every instance)"),
            ("sticky = { cookie = \"srv\", secret = \"short\" }\n", "t.toml:7:37: upstream \"app\": sticky secret must be at least 16 bytes long"),
            ("sticky = { cookie = \"a b\", secret = \"0123456789abcdef\" }\n", "t.toml:7:21: upstream \"app\": sticky cookie \"a b\" is not a valid cookie name"),
            ("[upstream.health]\ninterval = \"5s\"\n", "t.toml:7:1: upstream \"app\": health needs path = \"/...\", the path that is checked"),
            ("[upstream.health]\npath = \"healthz\"\n", "t.toml:8:8: upstream \"app\": health.path \"healthz\" must be a path starting with /"),
            ("[upstream.health]\npath = \"/\"\nstatus = \"600\"\n", "t.toml:9:10: upstream \"app\": health.status \"600\": expected a status or a range from 100 to 599, e.g. \"200\" or \"200-399\""),
            ("[upstream.health]\npath = \"/\"\nfall = 0\n", "t.toml:9:8: health.fall must be between 1 and 1000000"),
            ("[upstream.passive]\neject = \"soon\"\n", "t.toml:8:9: invalid duration \"soon\": expected a positive number with a unit, e.g. \"250ms\", \"5s\", \"2m\", \"1h\""),
        ];
        for (rest, expected) in cases {
            assert_eq!(errors(&up(rest)), [expected], "{rest}");
        }
    }
}
