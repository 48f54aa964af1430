//! Header surgery as pure functions: hop-by-hop removal (RFC 9110 §7.6.1), the forwarding
//! headers (X-Forwarded-*, RFC 7239 Forwarded), and the upgrade pair for a validated handshake.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, FORWARDED, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Never meaningful beyond one hop. `Trailer` is end-to-end and stays.
static HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes every offer of `extension` from `Sec-WebSocket-Extensions` (RFC 6455 §9.1: a
/// comma-separated list of offers, each `name; params`), keeping the other offers.
pub fn strip_extension(headers: &mut HeaderMap, extension: &str) {
    let name = http::header::SEC_WEBSOCKET_EXTENSIONS;
    if !headers.contains_key(&name) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(&name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|offer| {
            let offered = offer.split(';').next().unwrap_or("").trim();
            !offer.is_empty() && !offered.eq_ignore_ascii_case(extension)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(&name);
    if let Ok(value) = HeaderValue::try_from(kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(name, value);
        }
    }
}

/// Who the request came from, as the forwarding headers tell it upstream.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The peer: the hop that connected to wsgate (or the PROXY header's client).
    pub client: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host the client asked for (Host or the absolute-form authority).
    pub host: Option<&'a HeaderValue>,
}

/// `to_upstream_from` a trusted proxy.
pub fn to_upstream(headers: &mut HeaderMap, forwarding: &Forwarding<'_>, upgrade: bool) {
    to_upstream_from(headers, forwarding, upgrade, true);
}

/// Prepares a request's headers for the upstream. With `upgrade`, the client's `Upgrade` value
/// is kept and `Connection: upgrade` restored, since both are otherwise hop-by-hop. `trusted`:
/// the peer is a trusted proxy, so the forwarding headers it sent are kept and appended to;
/// otherwise they are the client's own word, and are replaced.
pub fn to_upstream_from(
    headers: &mut HeaderMap,
    forwarding: &Forwarding<'_>,
    upgrade: bool,
    trusted: bool,
) {
    let upgrade = if upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(headers);
    headers.remove(&PROXY_AUTHORIZATION);
    // Room for the four forwarding fields at once, rather than a regrowth on the way.
    headers.reserve(4);
    if let Some(protocol) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
    append_forwarded_for(headers, forwarding.client, trusted);
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            &X_FORWARDED_PROTO,
            HeaderValue::from_static(forwarding.proto),
        );
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match forwarding.host {
            Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    append_forwarded(headers, forwarding, trusted);
}

/// The address a request speaks for. From a peer that is not a trusted proxy, the peer; from
/// a trusted one, the rightmost `X-Forwarded-For` hop that is not trusted (the leftmost when
/// all are). A hop that is not an address ends the walk: the last trusted one stands in, since
/// whatever a trusted proxy received it from is unknown.
pub fn client_address(
    peer: IpAddr,
    headers: &HeaderMap,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let lines: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|value| value.to_str().unwrap_or(""))
        .collect();
    for hop in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
        let Some(ip) = hop_address(hop.trim()) else {
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// `192.0.2.7`, `2001:db8::1`, or either with a port (`[2001:db8::1]:443`), as proxies write them.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let ip = match hop.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => hop.parse::<SocketAddr>().ok()?.ip(),
    };
    Some(ip.to_canonical())
}

/// Prepares a response's headers for the client. A relayed 101 keeps its `Upgrade` and
/// `Connection`: they are what the client's handshake waits for.
pub fn to_downstream(headers: &mut HeaderMap, switching: bool) {
    if !switching {
        strip_hop_by_hop(headers);
    }
    headers.remove(&PROXY_AUTHENTICATE);
}

/// Removes the fixed hop-by-hop set and every header that `Connection` names, across all its
/// field lines. `Host` is never removed: routing and the upstream depend on it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds what is there: most messages carry none of these (or only
    // `Connection`), and each removal costs a hash and a probe.
    let mut present = false;
    // Usually `keep-alive`, `close` or `upgrade`; only allocate for unusual names.
    let mut listed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if !HOP_BY_HOP.contains(name) {
            continue;
        }
        present = true;
        if name != CONNECTION {
            continue;
        }
        for token in value.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            let known = token.is_empty()
                || ["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|k| token.eq_ignore_ascii_case(k));
            if known {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if name != HOST {
                    listed.push(name);
                }
            }
        }
    }
    if !present {
        return;
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    for name in listed {
        headers.remove(name);
    }
}

/// HTTP/2 may split `Cookie` into one field per pair (RFC 9113 §8.2.3); an HTTP/1.1 upstream
/// expects one line joined with "; ".
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr, trusted: bool) {
    let mut value = match trusted {
        true => joined(headers, &X_FORWARDED_FOR),
        false => String::with_capacity(64),
    };
    if !value.is_empty() {
        value.push_str(", ");
    }
    push_ip(&mut value, client);
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
}

fn append_forwarded(headers: &mut HeaderMap, forwarding: &Forwarding<'_>, trusted: bool) {
    let mut value = match trusted {
        true => joined(headers, &FORWARDED),
        false => String::with_capacity(64),
    };
    if !value.is_empty() {
        value.push_str(", ");
    }
    // RFC 7239 §6: IPv6 nodes are bracketed and quoted; values outside `token` are quoted.
    match forwarding.client {
        IpAddr::V4(_) => {
            value.push_str("for=");
            push_ip(&mut value, forwarding.client);
        }
        IpAddr::V6(_) => {
            value.push_str("for=\"[");
            push_ip(&mut value, forwarding.client);
            value.push_str("]\"");
        }
    }
    if let Some(host) = forwarding.host.and_then(|h| h.to_str().ok()) {
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            value.push_str(";host=");
            value.push_str(host);
        } else if !host.contains(['"', '\\']) {
            value.push_str(";host=\"");
            value.push_str(host);
            value.push('"');
        }
    }
    value.push_str(";proto=");
    value.push_str(forwarding.proto);
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(FORWARDED, value);
    }
}

/// IPv4 without `core::fmt`, which is most of what building these two headers cost.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(ip) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// All field lines of `name` as one comma-separated list (RFC 9110 §5.3), with room for what
/// the caller appends.
fn joined(headers: &HeaderMap, name: &HeaderName) -> String {
    let mut out = String::with_capacity(64);
    for value in headers.get_all(name) {
        if let Ok(text) = value.to_str() {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let mut ips: Vec<IpAddr> = (0..=255u8)
            .map(|o| IpAddr::from([o, 255 - o, o / 3, o / 17]))
            .collect();
        ips.extend(
            ["::1", "2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"]
                .map(|ip| ip.parse::<IpAddr>().unwrap()),
        );
        for ip in ips {
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn strips_fixed_and_listed_hop_by_hop_headers_case_insensitively() {
        let mut headers = map(&[
            ("Connection", "Keep-Alive, X-Hop"),
            ("connection", "x-other , host"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("X-HOP", "1"),
            ("x-other", "2"),
            ("host", "example.com"),
            ("cookie", "a=b"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["cookie", "host"]);
    }

    #[test]
    fn upstream_gets_forwarding_headers_appended() {
        let host = HeaderValue::from_static("example.com:8080");
        let mut headers = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("proxy-authorization", "Basic eA=="),
        ]);
        let forwarding = Forwarding {
            client: "2001:db8::1".parse().unwrap(),
            proto: "http",
            host: Some(&host),
        };
        to_upstream(&mut headers, &forwarding, false);
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.9, 198.51.100.1, 2001:db8::1"
        );
        // Kept from a trusted proxy; set where it sent none.
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "example.com:8080");
        assert_eq!(
            headers["forwarded"],
            "for=203.0.113.9, for=\"[2001:db8::1]\";host=\"example.com:8080\";proto=http"
        );
        assert!(!headers.contains_key("proxy-authorization"));

        let mut headers = HeaderMap::new();
        let forwarding = Forwarding {
            client: "192.0.2.7".parse().unwrap(),
            proto: "http",
            host: None,
        };
        to_upstream(&mut headers, &forwarding, false);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(headers["forwarded"], "for=192.0.2.7;proto=http");
    }

    #[test]
    fn an_untrusted_peer_s_forwarding_headers_are_replaced() {
        let host = HeaderValue::from_static("app.test");
        let mut headers = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("X-Forwarded-For", "198.51.100.1"),
            ("forwarded", "for=203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed.test"),
        ]);
        let forwarding = Forwarding {
            client: "192.0.2.7".parse().unwrap(),
            proto: "http",
            host: Some(&host),
        };
        to_upstream_from(&mut headers, &forwarding, false, false);
        assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(
            headers["forwarded"],
            "for=192.0.2.7;host=app.test;proto=http"
        );
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "app.test");
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let trusted = |ip: IpAddr| match ip {
            IpAddr::V4(ip) => ip.octets()[0] == 10,
            IpAddr::V6(_) => false,
        };
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let untrusted_peer: IpAddr = "192.0.2.7".parse().unwrap();
        let cases: &[(&[&str], IpAddr, &str)] = &[
            (&[], untrusted_peer, "192.0.2.7"),
            (&["203.0.113.9"], untrusted_peer, "192.0.2.7"),
            (&[], peer, "10.0.0.1"),
            (&["203.0.113.9"], peer, "203.0.113.9"),
            (
                &["198.51.100.1, 203.0.113.9, 10.0.0.2"],
                peer,
                "203.0.113.9",
            ),
            (
                &["198.51.100.1", "203.0.113.9 , 10.0.0.2"],
                peer,
                "203.0.113.9",
            ),
            (&["10.0.0.3, 10.0.0.2"], peer, "10.0.0.3"),
            (&["[2001:db8::1]:443"], peer, "2001:db8::1"),
            (&["203.0.113.9:80"], peer, "203.0.113.9"),
            (&["::ffff:203.0.113.9"], peer, "203.0.113.9"),
            (&["203.0.113.9, unknown, 10.0.0.2"], peer, "10.0.0.2"),
            (&["garbage"], peer, "10.0.0.1"),
        ];
        for (lines, peer, expected) in cases {
            let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("x-forwarded-for", *l)).collect();
            let headers = map(&pairs);
            let client = client_address(*peer, &headers, trusted);
            assert_eq!(client.to_string(), *expected, "{lines:?} via {peer}");
        }
    }

    #[test]
    fn upgrade_pair_is_restored_only_for_a_handshake() {
        let base = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("origin", "http://example.com"),
        ];
        let forwarding = Forwarding {
            client: "127.0.0.1".parse().unwrap(),
            proto: "http",
            host: None,
        };
        let mut headers = map(&base);
        to_upstream(&mut headers, &forwarding, true);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "WebSocket");
        assert_eq!(headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(headers["origin"], "http://example.com");

        let mut headers = map(&base);
        to_upstream(&mut headers, &forwarding, false);
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("upgrade"));
    }

    #[test]
    fn split_cookies_are_joined_for_http11() {
        let mut headers = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookies(&mut headers);
        assert_eq!(headers.get_all("cookie").iter().count(), 1);
        assert_eq!(headers["cookie"], "a=1; b=2; c=3");
        let mut headers = map(&[("cookie", "a=1; b=2")]);
        join_cookies(&mut headers);
        assert_eq!(headers["cookie"], "a=1; b=2");
    }

    #[test]
    fn downstream_keeps_a_switch_intact() {
        let pairs = [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("proxy-authenticate", "Basic"),
        ];
        let mut headers = map(&pairs);
        to_downstream(&mut headers, true);
        assert_eq!(
            names(&headers),
            ["connection", "sec-websocket-accept", "upgrade"]
        );
        let mut headers = map(&pairs);
        to_downstream(&mut headers, false);
        assert_eq!(names(&headers), ["sec-websocket-accept"]);
    }

    #[test]
    fn strip_extension_removes_every_offer_of_it_and_keeps_the_rest() {
        let mut headers = HeaderMap::new();
        headers.append(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate; client_max_window_bits, x-foo"),
        );
        headers.append(
            "sec-websocket-extensions",
            HeaderValue::from_static("Permessage-Deflate"),
        );
        strip_extension(&mut headers, "permessage-deflate");
        assert_eq!(
            headers.get_all("sec-websocket-extensions").iter().count(),
            1
        );
        assert_eq!(headers["sec-websocket-extensions"], "x-foo");

        let mut headers = HeaderMap::new();
        headers.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate"),
        );
        strip_extension(&mut headers, "permessage-deflate");
        assert!(!headers.contains_key("sec-websocket-extensions"));
    }
}
