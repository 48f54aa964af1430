//! Who may open a tunnel, decided at the handshake before any backend is contacted: the
//! route's allowed origins (RFC 6455 §10.2, cross-site WebSocket hijacking), its allowed
//! subprotocols, and per-client-address limits on handshake rate and open tunnels. The first
//! two are pure functions; the limiter is state that outlives config snapshots, bounded.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue, ORIGIN, SEC_WEBSOCKET_PROTOCOL};

use crate::config::{Origin, OriginPattern, Rate};

/// Why a handshake's `Origin` is refused; the caller answers 403 and logs this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OriginRefused {
    #[error("no Origin header, and the route requires one")]
    Missing,
    #[error("more than one Origin header")]
    Repeated,
    #[error("Origin header is not a serialized origin")]
    Malformed,
    #[error("Origin is not in the route's allowed_origins")]
    NotAllowed,
}

/// Checks a handshake's `Origin` against a route's `allowed_origins`. Browsers always send
/// one with a WebSocket handshake; other clients usually send none, which `allow_missing`
/// decides.
pub fn check_origin(
    headers: &HeaderMap,
    allowed: &[OriginPattern],
    allow_missing: bool,
) -> Result<(), OriginRefused> {
    let mut values = headers.get_all(ORIGIN).iter();
    let value = match (values.next(), values.next()) {
        (None, _) if allow_missing => return Ok(()),
        (None, _) => return Err(OriginRefused::Missing),
        (Some(value), None) => value,
        (Some(_), Some(_)) => return Err(OriginRefused::Repeated),
    };
    let text = value.to_str().map_err(|_| OriginRefused::Malformed)?.trim();
    // RFC 6454 §7.3: an opaque origin is sent as the exact string `null`.
    if text == "null" {
        return match allowed.contains(&OriginPattern::Null) {
            true => Ok(()),
            false => Err(OriginRefused::NotAllowed),
        };
    }
    let origin = Origin::parse(text).ok_or(OriginRefused::Malformed)?;
    if allowed.iter().any(|pattern| pattern.matches(&origin)) {
        Ok(())
    } else {
        Err(OriginRefused::NotAllowed)
    }
}

/// A handshake's subprotocol offers after a route's allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subprotocols<'a> {
    /// No `Sec-WebSocket-Protocol`: nothing to filter, forward as is.
    NotOffered,
    /// The allowed offers in the client's order of preference, each once: the request's
    /// `Sec-WebSocket-Protocol` becomes `subprotocol_header(&kept)`.
    Kept(Vec<&'a str>),
    /// Offers were made and none is allowed: the route refuses (400) or forwards the
    /// handshake without the header.
    NoneLeft,
}

/// Keeps the offers of every `Sec-WebSocket-Protocol` line that `allowed` lists. Offers are
/// compared exactly: RFC 6455 §4.1 has a client fail a server's choice that is not one it
/// offered, and browsers compare as sent. An offer that is not a token is never kept.
pub fn filter_subprotocols<'a>(headers: &'a HeaderMap, allowed: &[String]) -> Subprotocols<'a> {
    let mut lines = headers.get_all(SEC_WEBSOCKET_PROTOCOL).iter().peekable();
    if lines.peek().is_none() {
        return Subprotocols::NotOffered;
    }
    let mut kept: Vec<&str> = Vec::new();
    // A line that is not visible ASCII offers nothing that could be allowed.
    let offers = lines
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        // RFC 9110 §5.6.1: optional whitespace around elements, empty elements ignored.
        .map(|offer| offer.trim_matches([' ', '\t']))
        .filter(|offer| !offer.is_empty() && offer.bytes().all(is_token_byte));
    for offer in offers {
        if allowed.iter().any(|a| a == offer) && !kept.contains(&offer) {
            kept.push(offer);
        }
    }
    if kept.is_empty() {
        Subprotocols::NoneLeft
    } else {
        Subprotocols::Kept(kept)
    }
}

/// The one `Sec-WebSocket-Protocol` value that carries `kept` upstream.
pub fn subprotocol_header(kept: &[&str]) -> HeaderValue {
    HeaderValue::from_str(&kept.join(", ")).expect("tokens are visible ASCII")
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether a client address may make a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Over its rate: answer 429 with `Retry-After: retry_after.as_secs()`. Rounded up to
    /// whole seconds, so a client that waits that long finds a token.
    Limited {
        retry_after: Duration,
    },
}

/// Limits on one client address's open tunnels, from the current config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Across all routes.
    pub per_client: Option<u32>,
    /// On the route the tunnel is for.
    pub per_client_on_route: Option<u32>,
}

/// Why a tunnel is refused; the caller answers 429 and logs this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunnelRefused {
    #[error("client already has {0} tunnels open, its limit")]
    PerClient(u32),
    #[error("client already has {0} tunnels open on this route, its limit")]
    PerClientOnRoute(u32),
}

/// 32 locks: contention between a few worker threads stays rare, and each shard still holds
/// enough entries for its clock to tell busy addresses from one-off ones.
const SHARDS: usize = 32;

/// Per-client-address state: a handshake token bucket and open-tunnel counts, in total and per
/// route. It lives beside the snapshots (the limits it applies come from the current one with
/// each call), so a reload neither forgets who is over a limit nor resets the counts of
/// tunnels still open.
///
/// Memory is bounded. The addresses are spread over `SHARDS` shards by a keyed hash (a client
/// cannot aim at one), each a map plus a CLOCK ring holding at most `capacity / SHARDS`
/// entries that no tunnel pins. A new address takes the place of the next entry the clock
/// hand finds that is unpinned and either full (a full bucket and no tunnels: it carries
/// nothing a fresh entry would not) or not used since the hand last passed (second chance).
/// So a flood of one-off addresses recycles itself while an address in steady use keeps its
/// state; an address that is evicted anyway starts again with a full bucket, which is never a
/// lower limit for anyone. An entry with open tunnels is pinned by their guards and never
/// evicted, so that counts cannot be lost; pinned entries come on top of the capacity, but
/// there are at most as many of them as open tunnels, which the descriptor limit bounds (each
/// tunnel holds two sockets). When a guard unpins an entry of a shard that is over its
/// capacity, one unpinned entry leaves.
pub struct ClientLimiter {
    shards: Box<[Mutex<Shard>]>,
    /// Picks the shard; each shard's map has its own keys.
    hasher: RandomState,
    shard_capacity: usize,
}

struct Shard {
    index: HashMap<IpAddr, usize>,
    /// The clock's ring, in no particular order.
    entries: Vec<Entry>,
    pinned: usize,
    hand: usize,
    /// The latest `now` a call brought: what a guard's drop judges full buckets by.
    latest: Option<Instant>,
}

struct Entry {
    client: IpAddr,
    /// GCRA's theoretical arrival time: the bucket is full from this instant on, and each
    /// admission moves it one interval later.
    full_at: Instant,
    tunnels: u32,
    /// Routes (by name) with at least one open tunnel of this client.
    per_route: Vec<(Arc<str>, u32)>,
    /// Used since the clock hand last passed. A new entry starts unset, so that addresses seen
    /// once go first.
    referenced: bool,
}

impl ClientLimiter {
    /// Holds at most `capacity` unpinned entries (rounded down to a multiple of 32, and at
    /// least 32), about 100 bytes each.
    pub fn new(capacity: usize) -> Arc<ClientLimiter> {
        let shard_capacity = (capacity / SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    index: HashMap::new(),
                    entries: Vec::new(),
                    pinned: 0,
                    hand: 0,
                    latest: None,
                })
            })
            .collect();
        Arc::new(ClientLimiter {
            shards,
            hasher: RandomState::new(),
            shard_capacity,
        })
    }

    /// The bound on entries that no tunnel pins.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    /// Entries held, pinned or not.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spends one of `client`'s tokens, if it has one at `now`.
    pub fn admit(&self, client: IpAddr, rate: Rate, now: Instant) -> Admission {
        let mut shard = self.shard(client);
        let at = shard.entry(client, now, self.shard_capacity);
        let entry = &mut shard.entries[at];
        // GCRA: admitting now would move the full instant to `next`; that is over the limit if
        // the bucket would then need more than `burst` intervals to refill.
        let next = entry.full_at.max(now) + rate.interval;
        let depth = rate.interval * rate.burst.get();
        let wait = (next - now).saturating_sub(depth);
        if wait.is_zero() {
            entry.full_at = next;
            Admission::Allowed
        } else {
            Admission::Limited {
                retry_after: whole_seconds_up(wait),
            }
        }
    }

    /// Counts a new tunnel of `client` on `route` unless that puts it over `limits`. The count
    /// is given back when the guard drops.
    pub fn open_tunnel(
        self: &Arc<Self>,
        client: IpAddr,
        route: &Arc<str>,
        limits: TunnelLimits,
        now: Instant,
    ) -> Result<TunnelGuard, TunnelRefused> {
        let mut shard = self.shard(client);
        let at = shard.entry(client, now, self.shard_capacity);
        let entry = &mut shard.entries[at];
        if let Some(limit) = limits.per_client.filter(|&l| entry.tunnels >= l) {
            return Err(TunnelRefused::PerClient(limit));
        }
        let on_route = entry.per_route.iter().position(|(r, _)| r == route);
        let open_on_route = on_route.map_or(0, |i| entry.per_route[i].1);
        if let Some(limit) = limits.per_client_on_route.filter(|&l| open_on_route >= l) {
            return Err(TunnelRefused::PerClientOnRoute(limit));
        }
        match on_route {
            Some(i) => entry.per_route[i].1 += 1,
            None => entry.per_route.push((Arc::clone(route), 1)),
        }
        entry.tunnels += 1;
        if entry.tunnels == 1 {
            shard.pinned += 1;
        }
        Ok(TunnelGuard {
            limiter: Arc::clone(self),
            client,
            route: Arc::clone(route),
        })
    }

    fn shard(&self, client: IpAddr) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.hasher.hash_one(client) as usize % SHARDS])
    }

    fn close_tunnel(&self, client: IpAddr, route: &str) {
        let mut shard = self.shard(client);
        // Pinned entries are never evicted: the guard's entry is there.
        let Some(&at) = shard.index.get(&client) else {
            debug_assert!(false, "a pinned entry left the limiter");
            return;
        };
        let entry = &mut shard.entries[at];
        if let Some(i) = entry.per_route.iter().position(|(r, _)| &**r == route) {
            entry.per_route[i].1 -= 1;
            if entry.per_route[i].1 == 0 {
                entry.per_route.swap_remove(i);
            }
        }
        entry.tunnels -= 1;
        if entry.tunnels == 0 {
            shard.pinned -= 1;
            if shard.entries.len() - shard.pinned > self.shard_capacity {
                // Pinned entries took the shard over its capacity; now one can go.
                if let Some(victim) = shard.victim() {
                    shard.remove(victim);
                }
            }
        }
    }
}

impl Shard {
    /// The index of `client`'s entry, made with a full bucket if it has none, in the place of
    /// the clock's victim if the shard is at capacity.
    fn entry(&mut self, client: IpAddr, now: Instant, capacity: usize) -> usize {
        self.latest = self.latest.max(Some(now));
        if let Some(&at) = self.index.get(&client) {
            self.entries[at].referenced = true;
            return at;
        }
        let fresh = Entry {
            client,
            full_at: now,
            tunnels: 0,
            per_route: Vec::new(),
            referenced: false,
        };
        // At capacity there are `capacity` (at least one) unpinned entries, so a victim exists.
        let victim = match self.entries.len() - self.pinned >= capacity {
            true => self.victim(),
            false => None,
        };
        let at = match victim {
            Some(victim) => {
                self.index.remove(&self.entries[victim].client);
                self.entries[victim] = fresh;
                victim
            }
            None => {
                self.entries.push(fresh);
                self.entries.len() - 1
            }
        };
        self.index.insert(client, at);
        at
    }

    /// CLOCK with second chance over unpinned entries; `None` only if all are pinned.
    fn victim(&mut self) -> Option<usize> {
        // Two turns: the first may only clear reference bits.
        for _ in 0..2 * self.entries.len() {
            let at = self.hand;
            self.hand = (self.hand + 1) % self.entries.len();
            let entry = &mut self.entries[at];
            if entry.tunnels > 0 {
                continue;
            }
            if !entry.referenced || self.latest.is_some_and(|now| entry.full_at <= now) {
                return Some(at);
            }
            entry.referenced = false;
        }
        None
    }

    fn remove(&mut self, at: usize) {
        let removed = self.entries.swap_remove(at);
        self.index.remove(&removed.client);
        if let Some(moved) = self.entries.get(at) {
            self.index.insert(moved.client, at);
        }
        if self.hand >= self.entries.len() {
            self.hand = 0;
        }
    }
}

/// A limiter shard stays usable after a panic elsewhere: its counts are updated in single
/// steps that a panic cannot leave half done.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `Retry-After` takes whole seconds (RFC 9110 §10.2.3); rounding down would send a client
/// back before its token.
fn whole_seconds_up(wait: Duration) -> Duration {
    Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
}

/// One open tunnel, counted against its client until dropped.
pub struct TunnelGuard {
    limiter: Arc<ClientLimiter>,
    client: IpAddr,
    route: Arc<str>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.limiter.close_tunnel(self.client, &self.route);
    }
}

impl std::fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimiter")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TunnelGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelGuard")
            .field("client", &self.client)
            .field("route", &self.route)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::num::NonZeroU32;

    use http::HeaderName;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn origin_table() {
        use OriginRefused::*;
        let allowed: Vec<OriginPattern> = [
            "https://app.example.com",
            "http://localhost:8080",
            "https://*.example.org",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, Result<(), OriginRefused>);
        let cases: [Case; 14] = [
            (&[("origin", "https://app.example.com")], false, Ok(())),
            (&[("origin", "HTTPS://APP.EXAMPLE.COM:443")], false, Ok(())),
            (&[("origin", " https://app.example.com ")], false, Ok(())),
            (&[("origin", "http://localhost:8080")], false, Ok(())),
            (&[("origin", "https://a.b.example.org")], false, Ok(())),
            (&[("origin", "https://example.org")], false, Err(NotAllowed)),
            (
                &[("origin", "https://evil.example")],
                false,
                Err(NotAllowed),
            ),
            (
                &[("origin", "http://app.example.com")],
                false,
                Err(NotAllowed),
            ),
            (&[("origin", "null")], false, Err(NotAllowed)),
            (
                &[("origin", "https://app.example.com/")],
                false,
                Err(Malformed),
            ),
            (&[("origin", "")], false, Err(Malformed)),
            (
                &[
                    ("origin", "https://app.example.com"),
                    ("origin", "https://evil.example"),
                ],
                true,
                Err(Repeated),
            ),
            (&[], true, Ok(())),
            (&[], false, Err(Missing)),
        ];
        for (pairs, allow_missing, want) in cases {
            assert_eq!(
                check_origin(&headers(pairs), &allowed, allow_missing),
                want,
                "{pairs:?} allow_missing={allow_missing}"
            );
        }
        let with_null = [OriginPattern::Null];
        assert_eq!(
            check_origin(&headers(&[("origin", "null")]), &with_null, false),
            Ok(())
        );
        assert_eq!(
            check_origin(&headers(&[("origin", "Null")]), &with_null, false),
            Err(Malformed)
        );
    }

    #[test]
    fn subprotocol_table() {
        use Subprotocols::*;
        let allowed = [
            "graphql-ws".to_owned(),
            "v2.chat".to_owned(),
            "mqtt".to_owned(),
        ];
        let cases: [(&[&str], Subprotocols); 9] = [
            (&[], NotOffered),
            (&["graphql-ws"], Kept(vec!["graphql-ws"])),
            // The client's order, not the allowlist's.
            (&["mqtt, graphql-ws"], Kept(vec!["mqtt", "graphql-ws"])),
            (
                &["soap , v2.chat", "\tmqtt,,x-private"],
                Kept(vec!["v2.chat", "mqtt"]),
            ),
            (&["mqtt, mqtt", "mqtt"], Kept(vec!["mqtt"])),
            (&["soap, wamp"], NoneLeft),
            // Exact comparison; a non-token offer is never kept.
            (&["GraphQL-WS"], NoneLeft),
            (&["mqtt v3", "v2.chat;q=1"], NoneLeft),
            (&[""], NoneLeft),
        ];
        for (lines, want) in cases {
            let pairs: Vec<(&str, &str)> = lines
                .iter()
                .map(|line| ("sec-websocket-protocol", *line))
                .collect();
            let headers = headers(&pairs);
            assert_eq!(filter_subprotocols(&headers, &allowed), want, "{lines:?}");
        }
        assert_eq!(subprotocol_header(&["mqtt", "v2.chat"]), "mqtt, v2.chat");
        let mut opaque = HeaderMap::new();
        opaque.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_bytes(b"mqtt\xff").unwrap(),
        );
        assert_eq!(filter_subprotocols(&opaque, &allowed), NoneLeft);
    }

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate {
            interval: Duration::from_secs(1) / per_second,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn client(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const LIMITED_1S: Admission = Admission::Limited {
        retry_after: Duration::from_secs(1),
    };

    #[test]
    fn bucket_allows_a_burst_then_refills_at_the_rate() {
        let limiter = ClientLimiter::new(1024);
        let rate = rate(2, 3);
        let t0 = Instant::now();
        let a = client(1);
        for _ in 0..3 {
            assert_eq!(limiter.admit(a, rate, t0), Admission::Allowed);
        }
        assert_eq!(limiter.admit(a, rate, t0), LIMITED_1S);
        assert_eq!(limiter.admit(a, rate, t0 + ms(499)), LIMITED_1S);
        // One token every 500 ms.
        assert_eq!(limiter.admit(a, rate, t0 + ms(500)), Admission::Allowed);
        assert_eq!(limiter.admit(a, rate, t0 + ms(500)), LIMITED_1S);
        assert_eq!(limiter.admit(a, rate, t0 + ms(1000)), Admission::Allowed);
        // Another address has its own bucket.
        assert_eq!(limiter.admit(client(2), rate, t0), Admission::Allowed);
        // Idle long enough, the bucket is full again, and never fuller than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.admit(a, rate, later), Admission::Allowed);
        }
        assert_eq!(limiter.admit(a, rate, later), LIMITED_1S);
    }

    #[test]
    fn retry_after_is_rounded_up_to_whole_seconds() {
        for (wait, secs) in [(1, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3)] {
            assert_eq!(
                whole_seconds_up(ms(wait)),
                Duration::from_secs(secs),
                "{wait}"
            );
        }
        // One token every 10 s: a refused request is told how long until the next one.
        let limiter = ClientLimiter::new(1024);
        let slow = Rate {
            interval: Duration::from_secs(10),
            burst: NonZeroU32::new(1).unwrap(),
        };
        let t0 = Instant::now();
        assert_eq!(limiter.admit(client(1), slow, t0), Admission::Allowed);
        let limited = |secs| Admission::Limited {
            retry_after: Duration::from_secs(secs),
        };
        assert_eq!(limiter.admit(client(1), slow, t0 + ms(1)), limited(10));
        assert_eq!(limiter.admit(client(1), slow, t0 + ms(8500)), limited(2));
        assert_eq!(
            limiter.admit(client(1), slow, t0 + ms(10_000)),
            Admission::Allowed
        );
        // A reload that lowers the burst: the tokens already spent still count.
        let spent = rate(1, 10);
        for _ in 0..10 {
            assert_eq!(limiter.admit(client(2), spent, t0), Admission::Allowed);
        }
        assert_eq!(limiter.admit(client(2), rate(1, 2), t0), limited(9));
    }

    #[test]
    fn tunnel_guards_count_and_give_back() {
        let limiter = ClientLimiter::new(1024);
        let chat: Arc<str> = Arc::from("chat");
        let limits = TunnelLimits {
            per_client: Some(2),
            per_client_on_route: None,
        };
        let now = Instant::now();
        let first = limiter.open_tunnel(client(1), &chat, limits, now).unwrap();
        let second = limiter.open_tunnel(client(1), &chat, limits, now).unwrap();
        assert_eq!(
            limiter
                .open_tunnel(client(1), &chat, limits, now)
                .unwrap_err(),
            TunnelRefused::PerClient(2)
        );
        // Someone else is not affected.
        let other = limiter.open_tunnel(client(2), &chat, limits, now).unwrap();
        drop(first);
        let third = limiter.open_tunnel(client(1), &chat, limits, now).unwrap();
        drop((second, third, other));
        // All given back: two more fit, as at the start.
        let again = [
            limiter.open_tunnel(client(1), &chat, limits, now).unwrap(),
            limiter.open_tunnel(client(1), &chat, limits, now).unwrap(),
        ];
        drop(again);
        let unlimited = TunnelLimits::default();
        let many: Vec<_> = (0..100)
            .map(|_| {
                limiter
                    .open_tunnel(client(1), &chat, unlimited, now)
                    .unwrap()
            })
            .collect();
        assert_eq!(many.len(), 100);
        assert_eq!(
            format!("{:?}", many[0]),
            "TunnelGuard { client: 10.0.0.1, route: \"chat\" }"
        );
    }

    #[test]
    fn per_route_and_total_limits_are_separate() {
        let limiter = ClientLimiter::new(1024);
        let (chat, feed): (Arc<str>, Arc<str>) = (Arc::from("chat"), Arc::from("feed"));
        let limits = TunnelLimits {
            per_client: Some(3),
            per_client_on_route: Some(2),
        };
        let now = Instant::now();
        let open = |route: &Arc<str>| limiter.open_tunnel(client(1), route, limits, now);
        let chat_tunnels = [open(&chat).unwrap(), open(&chat).unwrap()];
        assert_eq!(open(&chat).unwrap_err(), TunnelRefused::PerClientOnRoute(2));
        let feed_tunnel = open(&feed).unwrap();
        // Three open in all: the total refuses before the route's own limit is reached.
        assert_eq!(open(&feed).unwrap_err(), TunnelRefused::PerClient(3));
        drop(feed_tunnel);
        let _feed_again = open(&feed).unwrap();
        drop(chat_tunnels);
        let _chat_again = open(&chat).unwrap();
        assert_eq!(
            TunnelRefused::PerClientOnRoute(2).to_string(),
            "client already has 2 tunnels open on this route, its limit"
        );
    }

    #[test]
    fn memory_stays_bounded_under_100_000_addresses() {
        let limiter = ClientLimiter::new(1024);
        assert_eq!(limiter.capacity(), 1024);
        let strict = rate(1, 1);
        let route: Arc<str> = Arc::from("chat");
        let one_tunnel = TunnelLimits {
            per_client: Some(1),
            per_client_on_route: None,
        };
        let t0 = Instant::now();
        let busy = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(limiter.admit(busy, strict, t0), Admission::Allowed);
        let tunnel_holder = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let _tunnel = limiter
            .open_tunnel(tunnel_holder, &route, one_tunnel, t0)
            .unwrap();
        for n in 0..100_000u32 {
            // Distinct addresses within one second: none has its token back yet.
            let now = t0 + Duration::from_micros(u64::from(n) * 9);
            let flood = IpAddr::V6((0x2001_0db8_u128 << 96 | u128::from(n)).into());
            // A new address starts with a full bucket: the flood lowers no one's limit.
            assert_eq!(limiter.admit(flood, strict, now), Admission::Allowed);
            if n % 8 == 0 {
                assert_eq!(limiter.admit(busy, strict, now), LIMITED_1S, "{n}");
            }
            if n % 1000 == 0 {
                assert!(
                    limiter.len() <= limiter.capacity() + 1,
                    "{n}: {}",
                    limiter.len()
                );
            }
        }
        assert!(limiter.len() <= limiter.capacity() + 1);
        // The pinned entry kept its count through the flood.
        assert_eq!(
            limiter
                .open_tunnel(tunnel_holder, &route, one_tunnel, t0)
                .unwrap_err(),
            TunnelRefused::PerClient(1)
        );
    }

    #[test]
    fn an_evicted_address_starts_again_with_a_full_bucket() {
        let limiter = ClientLimiter::new(32);
        let strict = rate(1, 1);
        let t0 = Instant::now();
        let target = client(0);
        assert_eq!(limiter.admit(target, strict, t0), Admission::Allowed);
        assert_eq!(limiter.admit(target, strict, t0), LIMITED_1S);
        // Left alone, it is evicted once others need its place...
        let mut n = 1;
        while limiter.tracks(target) {
            assert_eq!(limiter.admit(client(n), strict, t0), Admission::Allowed);
            n += 1;
            assert!(n < 10_000, "never evicted");
        }
        // ...and comes back with a full bucket, not a lower limit.
        assert_eq!(limiter.admit(target, strict, t0), Admission::Allowed);
        assert_eq!(limiter.admit(target, strict, t0), LIMITED_1S);
    }

    #[test]
    fn pinned_entries_go_over_capacity_and_leave_when_unpinned() {
        let limiter = ClientLimiter::new(32);
        let route: Arc<str> = Arc::from("chat");
        let now = Instant::now();
        let guards: Vec<TunnelGuard> = (0..200)
            .map(|n| {
                limiter
                    .open_tunnel(client(n), &route, TunnelLimits::default(), now)
                    .unwrap()
            })
            .collect();
        assert_eq!(limiter.len(), 200, "a tunnel's entry is never evicted");
        drop(guards);
        assert!(limiter.len() <= limiter.capacity(), "{}", limiter.len());
    }

    impl ClientLimiter {
        fn tracks(&self, client: IpAddr) -> bool {
            self.shard(client).index.contains_key(&client)
        }
    }
}
