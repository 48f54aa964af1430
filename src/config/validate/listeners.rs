//! `[[listener]]` and `[listener.tls]`: bind addresses, redirects, certificates, mTLS, HSTS,
//! the PROXY protocol and trusted proxies, the connection limit.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use toml::Spanned;

use super::Validator;
use crate::config::raw;
use crate::config::{
    CertificateFiles, ClientAuth, Listener, ProxyProtocol, RedirectHttps, Tls, TlsVersion,
    UnknownSni,
};

impl Validator<'_> {
    /// `[admin]`. Never reachable through a proxy listener (its own address), and never open to
    /// the world by accident: a bind beyond loopback must say who may connect.
    pub(super) fn admin(
        &mut self,
        raw: toml::Spanned<raw::Admin>,
        listeners: &[crate::config::Listener],
    ) -> Option<crate::config::Admin> {
        let span = raw.span();
        let raw = raw.into_inner();
        let Ok(bind) = raw.bind.get_ref().parse::<SocketAddr>() else {
            self.error(
                raw.bind.span(),
                format!(
                    "admin: invalid bind address {:?}: expected ip:port, e.g. \"127.0.0.1:9100\"",
                    raw.bind.get_ref()
                ),
            );
            return None;
        };
        if let Some(listener) = listeners
            .iter()
            .find(|l| l.bind == bind && bind.port() != 0)
        {
            self.error(
                raw.bind.span(),
                format!(
                    "admin: bind address {bind} is listener {:?}'s: the admin listener needs its own",
                    listener.name
                ),
            );
        }
        let allow = self.cidrs(&raw.allow, "admin.allow");
        if !bind.ip().is_loopback() && raw.allow.is_empty() {
            self.error(
                span,
                format!("admin: bind {bind} is reachable beyond this machine: add allow = [\"10.0.0.0/8\", ...] naming who may read metrics and status, or bind 127.0.0.1"),
            );
        }
        Some(crate::config::Admin {
            bind,
            allow,
            reuse_port: raw.reuse_port,
        })
    }

    pub(super) fn listeners(&mut self, raw: Vec<raw::Listener>) -> Vec<Listener> {
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
            // Port 0 asks the system for a free port: every such listener gets its own.
            if bind.port() != 0 && !binds.insert(bind) {
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
            let proxy_protocol = self.proxy_protocol(
                listener.proxy_protocol,
                listener.proxy_protocol_from,
                listener.proxy_protocol_timeout,
            );
            listeners.push(Listener {
                name: listener.name.into_inner(),
                bind,
                // HTTP/2 is what browsers speak over TLS; h2c is opt-in.
                http2: listener.http2.unwrap_or(tls.is_some()),
                reuse_port: listener.reuse_port.unwrap_or(false),
                tls,
                redirect_https,
                proxy_protocol,
                trusted_proxies: self.cidrs(&listener.trusted_proxies, "trusted_proxies"),
                max_connections: self.count(listener.max_connections, "max_connections"),
            });
        }
        listeners
    }

    /// `proxy_protocol = true` needs the balancers' ranges. The other two keys without
    /// `proxy_protocol` are likely a forgotten line; `proxy_protocol = false` keeps them unused.
    fn proxy_protocol(
        &mut self,
        enabled: Option<Spanned<bool>>,
        from: Option<Spanned<Vec<Spanned<String>>>>,
        timeout: Option<Spanned<String>>,
    ) -> Option<ProxyProtocol> {
        let forgotten = enabled.is_none();
        let Some(enabled) = enabled.filter(|on| *on.get_ref()) else {
            for span in [from.map(|f| f.span()), timeout.map(|t| t.span())]
                .into_iter()
                .flatten()
                .filter(|_| forgotten)
            {
                self.error(
                    span,
                    "proxy_protocol_from and proxy_protocol_timeout need proxy_protocol = true"
                        .to_owned(),
                );
            }
            return None;
        };
        let Some(from) = from else {
            self.error(
                enabled.span(),
                "proxy_protocol = true needs proxy_protocol_from = [\"10.0.0.0/8\"], the balancers' addresses".to_owned(),
            );
            return None;
        };
        if from.get_ref().is_empty() {
            self.error(
                from.span(),
                "proxy_protocol_from must name at least one address range".to_owned(),
            );
            return None;
        }
        Some(ProxyProtocol {
            from: self.cidrs(from.get_ref(), "proxy_protocol_from"),
            // Balancers send the header with the connection's first packet; a peer that
            // has not sent it in seconds is not a balancer.
            timeout: self.duration(timeout, Duration::from_secs(5)),
        })
    }

    pub(super) fn redirect(&mut self, raw: raw::RedirectHttps) -> Option<RedirectHttps> {
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

    pub(super) fn client_auth(
        &mut self,
        raw: &raw::Tls,
        base: &std::path::Path,
    ) -> Option<ClientAuth> {
        let optional = self.choice(
            raw.client_auth.as_ref(),
            "unknown client_auth",
            &[("required", false), ("optional", true)],
            false,
        );
        let identity_header = raw.client_identity_header.as_ref().and_then(|header| {
            // Lowercased, as HTTP/2 requires.
            match HeaderName::from_bytes(header.get_ref().as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => {
                    self.error(
                        header.span(),
                        format!("invalid header name {:?}", header.get_ref()),
                    );
                    None
                }
            }
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

    pub(super) fn tls(&mut self, raw: raw::Tls) -> Option<Tls> {
        if raw.certificates.get_ref().is_empty() {
            self.error(
                raw.certificates.span(),
                "tls needs at least one certificate: certificates = [{ cert = \"cert.pem\", key = \"key.pem\" }]".to_owned(),
            );
            return None;
        }
        let unknown_sni = self.choice(
            raw.unknown_sni.as_ref(),
            "unknown unknown_sni",
            &[
                ("default", UnknownSni::Default),
                ("refuse", UnknownSni::Refuse),
            ],
            UnknownSni::Default,
        );
        let min_version = self.choice(
            raw.min_version.as_ref(),
            "unsupported min_version",
            &[("1.2", TlsVersion::V1_2), ("1.3", TlsVersion::V1_3)],
            TlsVersion::V1_2,
        );
        let base = self.config_dir();
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
            hsts: raw.hsts.and_then(|hsts| match HeaderValue::from_str(hsts.get_ref()) {
                Ok(value) if hsts.get_ref().contains("max-age=") => Some(value),
                _ => {
                    self.error(
                        hsts.span(),
                        format!("invalid hsts {:?}: expected e.g. \"max-age=31536000; includeSubDomains\"", hsts.get_ref()),
                    );
                    None
                }
            }),
            client_auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::errors;
    use super::super::validate;
    use super::*;

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
    fn reuse_port_is_opt_in() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:81\"\nreuse_port = true\n";
        let config = validate(text, "t.toml").unwrap();
        assert!(!config.listeners[0].reuse_port);
        assert!(config.listeners[1].reuse_port);

        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\nreuse_port = \"yes\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("t.toml:4:14: invalid type"), "{errs:?}");
    }

    #[test]
    fn proxy_protocol_needs_its_balancers() {
        let text = "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:80\"\nproxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n";
        let config = validate(text, "t.toml").unwrap();
        let proxy = config.listeners[0].proxy_protocol.as_ref().unwrap();
        assert_eq!(proxy.timeout, Duration::from_secs(5));
        assert!(proxy.from.contains("10.1.2.3".parse().unwrap()));
        assert!(proxy.from.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!proxy.from.contains("192.0.2.1".parse().unwrap()));

        let text = "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:80\"\nproxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\"]\nproxy_protocol_timeout = \"250ms\"\n";
        let config = validate(text, "t.toml").unwrap();
        let proxy = config.listeners[0].proxy_protocol.as_ref().unwrap();
        assert_eq!(proxy.timeout, Duration::from_millis(250));

        // Off, explicitly: the other keys are kept for later, unused.
        let text = "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:80\"\nproxy_protocol = false\nproxy_protocol_from = [\"10.0.0.0/8\"]\n";
        assert!(validate(text, "t.toml").unwrap().listeners[0]
            .proxy_protocol
            .is_none());

        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\nproxy_protocol = true\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:81\"\nproxy_protocol = true\nproxy_protocol_from = []\n[[listener]]\nname = \"c\"\nbind = \"127.0.0.1:82\"\nproxy_protocol_from = [\"10.0.0.0/8\"]\nproxy_protocol_timeout = \"5s\"\n[[listener]]\nname = \"d\"\nbind = \"127.0.0.1:83\"\nproxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/33\", \"10.0.0.1/8\"]\nproxy_protocol_timeout = \"soon\"\n";
        assert_eq!(
            errors(text),
            [
                "t.toml:4:18: proxy_protocol = true needs proxy_protocol_from = [\"10.0.0.0/8\"], the balancers' addresses",
                "t.toml:9:23: proxy_protocol_from must name at least one address range",
                "t.toml:13:23: proxy_protocol_from and proxy_protocol_timeout need proxy_protocol = true",
                "t.toml:14:26: proxy_protocol_from and proxy_protocol_timeout need proxy_protocol = true",
                "t.toml:19:24: proxy_protocol_from: 10.0.0.0/33: prefix length must be at most 32",
                "t.toml:19:39: proxy_protocol_from: 10.0.0.1/8: bits are set past the prefix length; the range is 10.0.0.0/8",
                "t.toml:20:26: invalid duration \"soon\": expected a positive number with a unit, e.g. \"250ms\", \"5s\", \"2m\", \"1h\"",
            ]
        );
    }

    #[test]
    fn trusted_proxies_and_max_connections() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\ntrusted_proxies = [\"192.0.2.7\", \"10.0.0.0/8\"]\nmax_connections = 10000\n";
        let config = validate(text, "t.toml").unwrap();
        let listener = &config.listeners[0];
        assert_eq!(listener.trusted_proxies.ranges().len(), 2);
        assert!(listener
            .trusted_proxies
            .contains("192.0.2.7".parse().unwrap()));
        assert_eq!(listener.max_connections, Some(10_000));

        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n";
        let config = validate(text, "t.toml").unwrap();
        assert!(config.listeners[0].trusted_proxies.is_empty());
        assert_eq!(config.listeners[0].max_connections, None);
        assert!(config.listeners[0].proxy_protocol.is_none());

        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\ntrusted_proxies = [\"proxy.internal\"]\nmax_connections = 0\n";
        assert_eq!(
            errors(text),
            [
                "t.toml:4:20: trusted_proxies: proxy.internal: not an IP address, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"",
                "t.toml:5:19: max_connections must be between 1 and 1000000",
            ]
        );
    }
}
