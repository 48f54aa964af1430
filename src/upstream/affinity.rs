//! What a request says about the server it belongs to: the key an upstream hashes it by, and
//! the sticky cookie naming the server that first answered its client. Pure functions over the
//! request head; the group turns them into a choice.

use std::net::IpAddr;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue, Uri};
use ring::hmac;

use super::balance::stable_hash;
use crate::config::{HashKey, Sticky};

/// Bytes of HMAC output kept in a token: 96 bits cannot be guessed, and the cookie stays short.
const TOKEN_BYTES: usize = 12;

/// What routing a request depends on besides the balance policy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Affinity {
    /// The hash of the request's key, when the upstream hashes and the request has one.
    pub key: Option<u64>,
    /// The server a valid sticky cookie names, by index in the group.
    pub pinned: Option<usize>,
}

/// The hash of what `key` names in the request, or `None` when the request does not carry it
/// (an empty value counts as absent: it would pile every such client onto one server).
pub fn hash_of(key: &HashKey, headers: &HeaderMap, uri: &Uri, client: IpAddr) -> Option<u64> {
    let bytes: &[u8] = match key {
        HashKey::ClientAddress => {
            return Some(match client {
                IpAddr::V4(ip) => stable_hash(&ip.octets()),
                IpAddr::V6(ip) => stable_hash(&ip.octets()),
            })
        }
        HashKey::Header(name) => headers.get(name)?.as_bytes(),
        HashKey::Cookie(name) => cookie(headers, name)?,
        HashKey::Query(name) => query_value(uri, name)?,
    };
    (!bytes.is_empty()).then(|| stable_hash(bytes))
}

/// The value of cookie `name` among the request's `Cookie` headers (RFC 6265 §5.4: pairs split
/// by `;`; HTTP/2 clients may send one header per pair).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
            Some(value)
        })
}

/// The first value of parameter `name` in the query, as sent (not percent-decoded).
fn query_value<'a>(uri: &'a Uri, name: &str) -> Option<&'a [u8]> {
    uri.query()?.split('&').find_map(|pair| {
        let value = pair.strip_prefix(name)?.strip_prefix('=')?;
        Some(value.as_bytes())
    })
}

/// The sticky cookie of one upstream: each server's token, and the `Set-Cookie` that hands it
/// out. A token is an HMAC of the server's configured address under the config's secret: it
/// names no backend, a client cannot make one up for a server it was not given, and every
/// instance with the same config issues and accepts the same ones.
#[derive(Debug)]
pub struct StickyCookie {
    name: String,
    tokens: Vec<String>,
    /// Per server: without and with `Secure` (for TLS listeners).
    set_cookie: Vec<[HeaderValue; 2]>,
}

impl StickyCookie {
    /// `servers`: each server's configured address, in the group's order.
    pub fn new<'a>(sticky: &Sticky, servers: impl Iterator<Item = &'a str>) -> StickyCookie {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &sticky.secret);
        let tokens: Vec<String> = servers
            .map(|server| {
                let tag = hmac::sign(&key, server.as_bytes());
                hex(&tag.as_ref()[..TOKEN_BYTES])
            })
            .collect();
        let set_cookie = tokens
            .iter()
            .map(|token| {
                let base = format!("{}={token}; Path=/; HttpOnly; SameSite=Lax", sticky.cookie);
                let secure = format!("{base}; Secure");
                [base, secure].map(|text| {
                    HeaderValue::from_str(&text).expect("a token cookie is a valid header value")
                })
            })
            .collect();
        StickyCookie {
            name: sticky.cookie.clone(),
            tokens,
            set_cookie,
        }
    }

    /// The server the request's cookie names; a forged, stale or foreign token names none.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        let sent = cookie(headers, &self.name)?;
        // Every token is compared in full, so that timing tells nothing about a near miss.
        let mut found = None;
        for (i, token) in self.tokens.iter().enumerate() {
            if constant_time_eq(sent, token.as_bytes()) {
                found = Some(i);
            }
        }
        found
    }

    pub fn set_cookie(&self, server: usize, tls: bool) -> &HeaderValue {
        &self.set_cookie[server][usize::from(tls)]
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for c in cookies {
            map.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        map
    }

    fn sticky(secret: &str) -> Sticky {
        Sticky {
            cookie: "srv".into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    const SERVERS: [&str; 3] = ["127.0.0.1:9001", "127.0.0.1:9002", "https://b.internal:443"];

    fn token_of(cookie: &HeaderValue) -> String {
        let text = cookie.to_str().unwrap();
        let pair = text.split(';').next().unwrap();
        pair.strip_prefix("srv=").unwrap().to_owned()
    }

    #[test]
    fn a_cookie_handed_out_pins_its_server_and_names_no_backend() {
        let jar = StickyCookie::new(&sticky("0123456789abcdef"), SERVERS.into_iter());
        for (i, server) in SERVERS.iter().enumerate() {
            let cookie = jar.set_cookie(i, false);
            let token = token_of(cookie);
            assert_eq!(token.len(), 2 * TOKEN_BYTES);
            assert!(!token.contains(server) && !cookie.to_str().unwrap().contains("9001"));
            let sent = headers(&[&format!("a=1; srv={token}; b=2")]);
            assert_eq!(jar.pinned(&sent), Some(i));
        }
        assert_eq!(
            jar.set_cookie(0, false).to_str().unwrap(),
            format!(
                "srv={}; Path=/; HttpOnly; SameSite=Lax",
                token_of(jar.set_cookie(0, false))
            )
        );
        assert!(jar
            .set_cookie(1, true)
            .to_str()
            .unwrap()
            .ends_with("; SameSite=Lax; Secure"));
    }

    #[test]
    fn forged_and_foreign_tokens_are_ignored() {
        let jar = StickyCookie::new(&sticky("0123456789abcdef"), SERVERS.into_iter());
        let other = StickyCookie::new(&sticky("another secret!!"), SERVERS.into_iter());
        let real = token_of(jar.set_cookie(1, false));
        let mut flipped = real.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let forged = [
            String::from_utf8(flipped).unwrap(),
            real[..real.len() - 1].to_owned(),
            format!("{real}0"),
            "127.0.0.1:9002".to_owned(),
            token_of(other.set_cookie(1, false)),
            String::new(),
        ];
        for token in forged {
            assert_eq!(
                jar.pinned(&headers(&[&format!("srv={token}")])),
                None,
                "{token:?}"
            );
        }
        // A cookie whose name merely starts with the sticky one's is another cookie.
        assert_eq!(jar.pinned(&headers(&[&format!("srvx={real}")])), None);
        // HTTP/2 clients may split cookies over several headers.
        assert_eq!(
            jar.pinned(&headers(&["a=1", &format!("srv={real}")])),
            Some(1)
        );
    }

    #[test]
    fn two_instances_with_one_secret_issue_the_same_tokens() {
        let a = StickyCookie::new(&sticky("shared secret 123"), SERVERS.into_iter());
        let b = StickyCookie::new(&sticky("shared secret 123"), SERVERS.into_iter());
        for i in 0..SERVERS.len() {
            assert_eq!(a.set_cookie(i, true), b.set_cookie(i, true));
        }
    }

    #[test]
    fn keys_come_from_where_the_config_says() {
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let uri: Uri = "/socket.io/?EIO=4&client=alice&transport=polling"
            .parse()
            .unwrap();
        let mut map = headers(&["sid=s1; room=r9"]);
        map.insert("x-user", HeaderValue::from_static("u42"));
        let hash = |key: HashKey, uri: &Uri| hash_of(&key, &map, uri, client);
        assert_eq!(
            hash(HashKey::Query("client".into()), &uri),
            Some(stable_hash(b"alice"))
        );
        assert_eq!(
            hash(HashKey::Query("EIO".into()), &uri),
            Some(stable_hash(b"4"))
        );
        assert_eq!(hash(HashKey::Query("lient".into()), &uri), None);
        assert_eq!(
            hash(HashKey::Cookie("room".into()), &uri),
            Some(stable_hash(b"r9"))
        );
        assert_eq!(hash(HashKey::Cookie("oom".into()), &uri), None);
        let user = HashKey::Header(http::HeaderName::from_static("x-user"));
        assert_eq!(hash(user, &uri), Some(stable_hash(b"u42")));
        assert_eq!(
            hash(HashKey::ClientAddress, &uri),
            Some(stable_hash(&[192, 0, 2, 7]))
        );
        let empty: Uri = "/?client=&x=1".parse().unwrap();
        assert_eq!(hash(HashKey::Query("client".into()), &empty), None);
        let bare: Uri = "/".parse().unwrap();
        assert_eq!(hash(HashKey::Query("client".into()), &bare), None);
    }
}
