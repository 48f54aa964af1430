//! Web origins (RFC 6454) as a route's `allowed_origins` names them and as a browser sends them
//! in `Origin`: scheme, host and port, compared case-insensitively, with a default port the
//! same as none (`https://a.example` is `https://a.example:443`).

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// A serialized origin, `scheme://host[:port]`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    /// The scheme's default when none is written; `None` only for a scheme without one.
    port: Option<u16>,
}

impl Origin {
    /// `None` for anything but `scheme://host[:port]`: no path, no user, no empty port.
    pub fn parse(text: &str) -> Option<Origin> {
        let (scheme, authority) = text.split_once("://")?;
        let mut chars = scheme.chars();
        let valid_scheme = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid_scheme {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = match authority.strip_prefix('[') {
            Some(rest) => {
                let (address, after) = rest.split_once(']')?;
                address.parse::<Ipv6Addr>().ok()?;
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':')?),
                };
                (&authority[..address.len() + 2], port)
            }
            None => {
                let (host, port) = match authority.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (authority, None),
                };
                let valid = !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
                if !valid {
                    return None;
                }
                (host, port)
            }
        };
        let port = match port {
            // Digits only: `u16::from_str` would take "+80".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse::<u16>().ok().filter(|&p| p != 0)?)
            }
            Some(_) => return None,
            None => default_port(&scheme),
        };
        Some(Origin {
            host: host.to_ascii_lowercase(),
            scheme,
            port,
        })
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        match self.port {
            Some(port) if Some(port) != default_port(&self.scheme) => write!(f, ":{port}"),
            _ => Ok(()),
        }
    }
}

/// One entry of `allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// The literal `null`: the opaque origin of sandboxed frames, `file:` pages and some
    /// redirects. Anyone can produce it, so it is allowed only when listed.
    Null,
    Exact(Origin),
    /// `scheme://*.example.com[:port]`: any subdomain at any depth, not `example.com` itself.
    Subdomains {
        scheme: String,
        /// `.example.com`, lowercased.
        suffix: String,
        port: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OriginPatternError {
    #[error("expected an origin such as \"https://app.example.com\", \"https://*.example.com\" or \"null\"")]
    Syntax,
    #[error("an origin has no path: write only scheme://host[:port]")]
    Path,
    #[error("a wildcard must be the whole first label, as in \"https://*.example.com\"")]
    Wildcard,
}

impl OriginPattern {
    /// Does a request's (parsed, non-`null`) `Origin` fall under this entry?
    pub fn matches(&self, origin: &Origin) -> bool {
        match self {
            OriginPattern::Null => false,
            OriginPattern::Exact(allowed) => allowed == origin,
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                *scheme == origin.scheme
                    && *port == origin.port
                    && origin.host.len() > suffix.len()
                    && origin.host.ends_with(suffix.as_str())
            }
        }
    }
}

impl FromStr for OriginPattern {
    type Err = OriginPatternError;

    fn from_str(text: &str) -> Result<OriginPattern, OriginPatternError> {
        if text == "null" {
            return Ok(OriginPattern::Null);
        }
        let Some((scheme, authority)) = text.split_once("://") else {
            return Err(OriginPatternError::Syntax);
        };
        if authority.contains(['/', '?', '#']) {
            return Err(OriginPatternError::Path);
        }
        let Some(domain) = authority.strip_prefix("*.") else {
            if authority.contains('*') {
                return Err(OriginPatternError::Wildcard);
            }
            return Origin::parse(text)
                .map(OriginPattern::Exact)
                .ok_or(OriginPatternError::Syntax);
        };
        if domain.contains('*') {
            return Err(OriginPatternError::Wildcard);
        }
        if domain.starts_with('[') {
            return Err(OriginPatternError::Syntax);
        }
        let origin =
            Origin::parse(&format!("{scheme}://{domain}")).ok_or(OriginPatternError::Syntax)?;
        Ok(OriginPattern::Subdomains {
            scheme: origin.scheme,
            suffix: format!(".{}", origin.host),
            port: origin.port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_to_lowercase_with_the_default_port() {
        let cases = [
            ("https://app.example.com", Some("https://app.example.com")),
            (
                "HTTPS://App.Example.COM:443",
                Some("https://app.example.com"),
            ),
            ("http://localhost:8080", Some("http://localhost:8080")),
            ("http://localhost:80", Some("http://localhost")),
            ("http://[::1]:3000", Some("http://[::1]:3000")),
            ("http://[::1]", Some("http://[::1]")),
            (
                "chrome-extension://abcdef",
                Some("chrome-extension://abcdef"),
            ),
            ("https://app.example.com/", None),
            ("https://app.example.com/path", None),
            ("https://user@app.example.com", None),
            ("https://app.example.com:", None),
            ("https://app.example.com:0", None),
            ("https://app.example.com:65536", None),
            ("https://app.example.com:+443", None),
            ("https://", None),
            ("app.example.com", None),
            ("1http://a", None),
            ("http://[::1", None),
            ("http://[zz]", None),
            ("http://[::1]x", None),
            ("http://a b", None),
            ("null", None),
        ];
        for (text, want) in cases {
            let got = Origin::parse(text).map(|o| o.to_string());
            assert_eq!(got.as_deref(), want, "{text}");
        }
    }

    #[test]
    fn patterns_match_exactly_or_by_subdomain() {
        let cases = [
            ("https://app.example.com", "https://app.example.com", true),
            (
                "https://app.example.com",
                "https://APP.example.com:443",
                true,
            ),
            (
                "https://app.example.com:443",
                "https://app.example.com",
                true,
            ),
            ("https://app.example.com", "http://app.example.com", false),
            (
                "https://app.example.com",
                "https://app.example.com:8443",
                false,
            ),
            (
                "https://app.example.com",
                "https://app.example.com.evil",
                false,
            ),
            ("http://localhost:8080", "http://localhost:8080", true),
            ("http://localhost:8080", "http://localhost", false),
            ("https://*.example.com", "https://a.example.com", true),
            ("https://*.example.com", "https://a.b.example.com", true),
            ("HTTPS://*.Example.com", "https://A.EXAMPLE.COM", true),
            ("https://*.example.com", "https://example.com", false),
            ("https://*.example.com", "https://evilexample.com", false),
            ("https://*.example.com", "https://a.example.com.evil", false),
            ("https://*.example.com", "http://a.example.com", false),
            ("https://*.example.com", "https://a.example.com:8443", false),
            (
                "https://*.example.com:8443",
                "https://a.example.com:8443",
                true,
            ),
            ("null", "https://a.example.com", false),
        ];
        for (pattern, origin, want) in cases {
            let pattern: OriginPattern = pattern.parse().unwrap();
            let origin = Origin::parse(origin).unwrap();
            assert_eq!(pattern.matches(&origin), want, "{pattern:?} {origin}");
        }
    }

    #[test]
    fn bad_patterns_say_why() {
        use OriginPatternError::*;
        let cases = [
            ("app.example.com", Syntax),
            ("*", Syntax),
            ("https://app.example.com/", Path),
            ("https://*.example.com/app", Path),
            ("https://app.*.example.com", Wildcard),
            ("https://*example.com", Wildcard),
            ("https://*.*.example.com", Wildcard),
            ("https://*.[::1]", Syntax),
            ("https://*.", Syntax),
            ("https://app.example.com:99999", Syntax),
            ("Null", Syntax),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<OriginPattern>(), Err(want), "{text}");
        }
    }
}
