//! Classifies a request as plain HTTP, a WebSocket handshake (RFC 6455 §4.2.1) or another
//! allowed Upgrade, and refuses bad handshakes before any backend is contacted. Pure functions.

pub mod tunnel;

use http::header::{HeaderMap, CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{Method, Version};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// Forward as plain HTTP; any `Upgrade` header is dropped (RFC 9110 §7.8 lets a server
    /// ignore an upgrade it does not take).
    Plain,
    /// A valid upgrade: forward with `Upgrade`/`Connection` restored, then tunnel on 101.
    Upgrade(Protocol),
    Reject(HandshakeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    WebSocket,
    /// A protocol the route allows by name; passed through without checks.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a WebSocket handshake must use GET")]
    MethodNotGet,
    #[error("a WebSocket handshake needs HTTP/1.1")]
    HttpVersion,
    #[error("Sec-WebSocket-Version must be 13")]
    UnsupportedVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    InvalidKey,
}

/// `allowed` lists the lowercase non-WebSocket protocols the route passes through.
pub fn classify(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    allowed: &[String],
) -> Classification {
    if !has_token(headers, CONNECTION, "upgrade") {
        return Classification::Plain;
    }
    if has_token(headers, UPGRADE, "websocket") {
        return match validate_websocket(method, version, headers) {
            Ok(()) => Classification::Upgrade(Protocol::WebSocket),
            Err(err) => Classification::Reject(err),
        };
    }
    let allowed_other = allowed
        .iter()
        .any(|protocol| has_token(headers, UPGRADE, protocol));
    if allowed_other && version == Version::HTTP_11 {
        Classification::Upgrade(Protocol::Other)
    } else {
        Classification::Plain
    }
}

fn validate_websocket(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::MethodNotGet);
    }
    if version != Version::HTTP_11 {
        return Err(HandshakeError::HttpVersion);
    }
    let mut versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (None, _) => Err(HandshakeError::MissingKey),
        (Some(key), None) if is_valid_key(key.as_bytes().trim_ascii()) => Ok(()),
        _ => Err(HandshakeError::InvalidKey),
    }
}

/// A base64 encoding of exactly 16 bytes: 22 significant characters and `==`. The last
/// significant character carries 2 data bits, so only `A`, `Q`, `g` and `w` are canonical.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key[..21]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

/// Does the 101 from a backend switch to what the client asked for? `requested` is the
/// client's `Upgrade` value.
pub fn switched_to(
    response: &HeaderMap,
    protocol: Protocol,
    requested: Option<&http::HeaderValue>,
) -> bool {
    match protocol {
        Protocol::WebSocket => has_token(response, UPGRADE, "websocket"),
        Protocol::Other => response
            .get_all(UPGRADE)
            .iter()
            .flat_map(tokens)
            .any(|chosen| {
                requested
                    .into_iter()
                    .flat_map(tokens)
                    .any(|offered| offered.eq_ignore_ascii_case(chosen))
            }),
    }
}

/// Case-insensitive membership in a comma-separated header list, over every field line.
pub fn has_token(headers: &HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(token))
}

fn tokens(value: &http::HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn ws(extra: &[(&str, &str)]) -> HeaderMap {
        let mut pairs = vec![
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ];
        pairs.extend_from_slice(extra);
        headers(&pairs)
    }

    fn get(h: &HeaderMap) -> Classification {
        classify(&Method::GET, Version::HTTP_11, h, &["h2c".to_owned()])
    }

    #[test]
    fn handshake_table() {
        use Classification::*;
        use HandshakeError::*;
        let v13 = ("sec-websocket-version", "13");
        let key = ("sec-websocket-key", KEY);
        let cases: Vec<(HeaderMap, Classification)> = vec![
            (ws(&[v13, key]), Upgrade(Protocol::WebSocket)),
            (ws(&[key]), Reject(UnsupportedVersion)),
            (
                ws(&[("sec-websocket-version", "8"), key]),
                Reject(UnsupportedVersion),
            ),
            (ws(&[v13, v13, key]), Reject(UnsupportedVersion)),
            (ws(&[v13]), Reject(MissingKey)),
            (
                ws(&[v13, ("sec-websocket-key", "short")]),
                Reject(InvalidKey),
            ),
            (
                ws(&[v13, ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZR==")]),
                Reject(InvalidKey),
            ),
            (ws(&[v13, key, key]), Reject(InvalidKey)),
            // Upgrade without Connection: upgrade is plain HTTP.
            (headers(&[("upgrade", "websocket"), v13, key]), Plain),
            // Connection lists spread over several field lines.
            (
                headers(&[
                    ("connection", "keep-alive"),
                    ("connection", "UPGRADE"),
                    ("upgrade", "websocket"),
                    v13,
                    key,
                ]),
                Upgrade(Protocol::WebSocket),
            ),
            (
                headers(&[("connection", "upgrade"), ("upgrade", "h2c")]),
                Upgrade(Protocol::Other),
            ),
            (
                headers(&[("connection", "upgrade"), ("upgrade", "foo")]),
                Plain,
            ),
            (headers(&[]), Plain),
        ];
        for (i, (h, want)) in cases.into_iter().enumerate() {
            assert_eq!(get(&h), want, "case {i}: {h:?}");
        }
    }

    #[test]
    fn handshake_needs_get_over_http11() {
        let h = ws(&[("sec-websocket-version", "13"), ("sec-websocket-key", KEY)]);
        assert_eq!(
            classify(&Method::POST, Version::HTTP_11, &h, &[]),
            Classification::Reject(HandshakeError::MethodNotGet)
        );
        assert_eq!(
            classify(&Method::GET, Version::HTTP_10, &h, &[]),
            Classification::Reject(HandshakeError::HttpVersion)
        );
    }

    #[test]
    fn switch_must_match_the_request() {
        let h2c = http::HeaderValue::from_static("h2c");
        let requested = Some(&h2c);
        let ws = headers(&[("upgrade", "websocket")]);
        assert!(switched_to(&ws, Protocol::WebSocket, None));
        assert!(!switched_to(
            &headers(&[("upgrade", "h2c")]),
            Protocol::WebSocket,
            None
        ));
        assert!(switched_to(
            &headers(&[("upgrade", "H2C")]),
            Protocol::Other,
            requested
        ));
        assert!(!switched_to(
            &headers(&[("upgrade", "foo")]),
            Protocol::Other,
            requested
        ));
    }
}
