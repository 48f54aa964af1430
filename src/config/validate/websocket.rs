//! `[websocket]` and a route's `websocket = { ... }`: keepalive, frame limits, strictness,
//! the permessage-deflate policy.

use std::time::Duration;

use toml::Spanned;

use super::Validator;
use crate::config::raw;
use crate::config::{Deflate, WebSocket};

impl Validator<'_> {
    /// `raw`'s keys over `base` (the `[websocket]` defaults, or the built-in ones for them).
    pub(super) fn websocket(&mut self, raw: raw::WebSocket, base: &WebSocket) -> WebSocket {
        let ping_interval = match raw.ping_interval {
            Some(off) if off.get_ref() == "off" => None,
            Some(interval) => {
                Some(self.duration(Some(interval), base.ping_interval.unwrap_or(Duration::MAX)))
            }
            None => base.ping_interval,
        };
        WebSocket {
            ping_interval,
            ping_timeout: self.duration(raw.ping_timeout, base.ping_timeout),
            ping_upstream: raw.ping_upstream.unwrap_or(base.ping_upstream),
            max_frame: self.size(raw.max_frame, "max_frame").or(base.max_frame),
            max_message: self
                .size(raw.max_message, "max_message")
                .or(base.max_message),
            strict: raw.strict.unwrap_or(base.strict),
            permessage_deflate: self.choice(
                raw.permessage_deflate.as_ref(),
                "unknown permessage_deflate",
                &[("pass", Deflate::Pass), ("strip", Deflate::Strip)],
                base.permessage_deflate,
            ),
        }
    }

    pub(super) fn size(&mut self, raw: Option<Spanned<i64>>, what: &str) -> Option<u64> {
        let raw = raw?;
        match u64::try_from(*raw.get_ref()) {
            Ok(bytes) if bytes > 0 => Some(bytes),
            _ => {
                self.error(
                    raw.span(),
                    format!("{what} must be a positive number of bytes, e.g. 1048576"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::validate;
    use super::*;

    const LISTENER: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:8080\"\n";

    fn errors(text: &str) -> Vec<String> {
        match validate(text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn routes_inherit_the_defaults_and_override_single_keys() {
        let text = format!(
            "{LISTENER}[websocket]\nping_interval = \"10s\"\nmax_message = 1000\n\n[[route]]\nname = \"a\"\npath = \"/a\"\nrespond = {{ status = 204 }}\n\n[[route]]\nname = \"b\"\npath = \"/b\"\nrespond = {{ status = 204 }}\nwebsocket = {{ ping_interval = \"off\", strict = true, permessage_deflate = \"strip\" }}\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let (a, b) = (&config.routes[0].websocket, &config.routes[1].websocket);
        assert_eq!(a.ping_interval, Some(Duration::from_secs(10)));
        assert_eq!(a.max_message, Some(1000));
        assert!(!a.strict);
        assert_eq!(a.permessage_deflate, Deflate::Pass);
        assert_eq!(b.ping_interval, None);
        assert_eq!(b.max_message, Some(1000));
        assert!(b.strict);
        assert_eq!(b.permessage_deflate, Deflate::Strip);
    }

    #[test]
    fn shipped_defaults_ping_every_30s() {
        let config = validate(LISTENER, "t.toml").unwrap();
        assert_eq!(
            WebSocket::default().ping_interval,
            Some(Duration::from_secs(30))
        );
        assert!(config.routes.is_empty());
    }

    #[test]
    fn bad_values_are_located() {
        let text = format!(
            "{LISTENER}[websocket]\nping_interval = \"never\"\nmax_frame = 0\npermessage_deflate = \"zip\"\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("t.toml:5:17: invalid duration \"never\""),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:6:13: max_frame must be a positive number"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with(
                "t.toml:7:22: unknown permessage_deflate \"zip\" (known: pass, strip)"
            ),
            "{errs:?}"
        );
    }
}
