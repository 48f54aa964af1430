//! Classifies a request as plain HTTP, a WebSocket handshake (RFC 6455 §4.2.1) or another
//! allowed Upgrade, and refuses bad handshakes before any backend is contacted. Pure functions.

pub mod frame;
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
    /// RFC 8441: an HTTP/2 extended CONNECT stream, bridged to an HTTP/1.1 handshake
    /// upstream whose key wsgate makes and whose accept it checks.
    WebSocketOverH2,
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
    #[error("extended CONNECT supports only the websocket protocol")]
    UnsupportedProtocol,
}

/// `allowed` lists the lowercase non-WebSocket protocols the route passes through;
/// `connect_protocol` is HTTP/2's `:protocol` (RFC 8441), if any.
pub fn classify(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    allowed: &[String],
    connect_protocol: Option<&str>,
) -> Classification {
    if let Some(protocol) = connect_protocol {
        return match () {
            _ if !protocol.eq_ignore_ascii_case("websocket") => {
                Classification::Reject(HandshakeError::UnsupportedProtocol)
            }
            // RFC 8441 §5: the stream carries the version; there is no key to check.
            _ if !is_version_13(headers) => {
                Classification::Reject(HandshakeError::UnsupportedVersion)
            }
            _ => Classification::Upgrade(Protocol::WebSocketOverH2),
        };
    }
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
    if !is_version_13(headers) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (None, _) => Err(HandshakeError::MissingKey),
        (Some(key), None) if is_valid_key(key.as_bytes().trim_ascii()) => Ok(()),
        _ => Err(HandshakeError::InvalidKey),
    }
}

fn is_version_13(headers: &HeaderMap) -> bool {
    let mut versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    matches!(
        (versions.next(), versions.next()),
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13"
    )
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 §4.1).
pub fn new_key() -> http::HeaderValue {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; 16];
    // The system RNG failing is an unusable machine; a fixed nonce would still be a valid key.
    let _ = ring::rand::SystemRandom::new().fill(&mut nonce);
    http::HeaderValue::from_str(&base64(&nonce)).expect("base64 is a valid header value")
}

/// The `Sec-WebSocket-Accept` a server must answer to `key` (RFC 6455 §4.2.2).
pub fn accept_for(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(GUID);
    base64(context.finish().as_ref())
}

/// Standard base64 with padding; handshakes only ever encode 16 or 20 bytes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
        Protocol::WebSocket | Protocol::WebSocketOverH2 => {
            has_token(response, UPGRADE, "websocket")
        }
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

/// The server accepted permessage-deflate (RFC 7692 §5): its frames may then set RSV1.
pub fn deflate_negotiated(response: &HeaderMap) -> bool {
    response
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .flat_map(tokens)
        .any(|extension| {
            let name = extension.split(';').next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("permessage-deflate")
        })
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
        classify(&Method::GET, Version::HTTP_11, h, &["h2c".to_owned()], None)
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
            classify(&Method::POST, Version::HTTP_11, &h, &[], None),
            Classification::Reject(HandshakeError::MethodNotGet)
        );
        assert_eq!(
            classify(&Method::GET, Version::HTTP_10, &h, &[], None),
            Classification::Reject(HandshakeError::HttpVersion)
        );
    }

    #[test]
    fn extended_connect_needs_websocket_and_version_13() {
        let v13 = headers(&[("sec-websocket-version", "13")]);
        let classify_h2 =
            |h: &HeaderMap, p| classify(&Method::CONNECT, Version::HTTP_2, h, &[], Some(p));
        assert_eq!(
            classify_h2(&v13, "websocket"),
            Classification::Upgrade(Protocol::WebSocketOverH2)
        );
        assert_eq!(
            classify_h2(&headers(&[]), "websocket"),
            Classification::Reject(HandshakeError::UnsupportedVersion)
        );
        assert_eq!(
            classify_h2(&v13, "webtransport"),
            Classification::Reject(HandshakeError::UnsupportedProtocol)
        );
    }

    #[test]
    fn keys_and_accepts_follow_rfc_6455() {
        // The example of RFC 6455 §1.3.
        assert_eq!(accept_for(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        let key = new_key();
        assert!(is_valid_key(key.as_bytes()), "{key:?}");
        assert_ne!(key, new_key());
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
