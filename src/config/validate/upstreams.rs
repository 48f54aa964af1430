//! `[[upstream]]`: balance, servers in both shapes, and the TLS used to reach them.

use std::collections::HashSet;
use std::net::SocketAddr;

use rustls_pki_types::ServerName;

use super::Validator;
use crate::config::raw;
use crate::config::{Balance, CertificateFiles, Server, ServerAddress, Upstream, UpstreamTls};

const MAX_WEIGHT: i64 = 100;

impl Validator<'_> {
    pub(super) fn upstreams(&mut self, raw: Vec<raw::Upstream>) -> Vec<Upstream> {
        let mut names = HashSet::new();
        let mut upstreams = Vec::with_capacity(raw.len());
        for upstream in raw {
            self.unique_name(&mut names, &upstream.name, "upstream");
            let name = upstream.name.get_ref();
            let balance = self.choice(
                upstream.balance.as_ref(),
                &format!("upstream {name:?}: unknown balance"),
                &[
                    ("least_connections", Balance::LeastConnections),
                    ("round_robin", Balance::RoundRobin),
                ],
                Balance::LeastConnections,
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
            upstreams.push(Upstream {
                name: upstream.name.into_inner(),
                balance,
                servers,
                tls,
            });
        }
        upstreams
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
}
