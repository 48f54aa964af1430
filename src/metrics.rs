//! The gateway's numbers in Prometheus' text format. Counters live where their event happens
//! (route stats, servers, listeners, the proxy, the reload loop) as plain atomics that the hot
//! path bumps without a lookup; this module only reads them, once per scrape, and encodes them
//! with prometheus-client. Every label value comes from the config (route, upstream, server and
//! listener names) or from a fixed set defined here, never from a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::listener::ListenerStats;
use crate::proxy::ProxyStats;
use crate::snapshot::Current;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the upstream response-head latency buckets, in seconds.
pub const RESPONSE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds of the tunnel duration buckets, in seconds: WebSockets live for minutes to days.
pub const TUNNEL_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

/// A histogram of durations with fixed buckets, recorded with two atomic adds and no lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last slot is +Inf.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let slot = self.bounds.partition_point(|&bound| bound < seconds);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    /// Adds this histogram's counts into `into` (per bucket), returning its sum and count.
    fn add_to(&self, into: &mut [u64]) -> (f64, u64) {
        let mut count = 0;
        for (total, slot) in into.iter_mut().zip(self.counts.iter()) {
            let n = slot.load(Ordering::Relaxed);
            *total += n;
            count += n;
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count)
    }
}

/// Close codes one side of WebSockets sent: 1000 to 1015 each, anything else, and no code
/// (a Close without one, or no Close at all).
#[derive(Debug, Default)]
pub struct CloseCodes {
    counts: [AtomicU64; 18],
}

const OTHER_CODE: usize = 16;
const NO_CODE: usize = 17;

impl CloseCodes {
    pub fn record(&self, code: Option<u16>) {
        let slot = match code {
            Some(code @ 1000..=1015) => usize::from(code - 1000),
            Some(_) => OTHER_CODE,
            None => NO_CODE,
        };
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
    }

    fn each(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        self.counts.iter().enumerate().map(|(slot, n)| {
            let label = match slot {
                OTHER_CODE => "other".to_owned(),
                NO_CODE => "none".to_owned(),
                _ => (1000 + slot).to_string(),
            };
            (label, n.load(Ordering::Relaxed))
        })
    }
}

/// Status classes, for `requests_total{class}`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Answers by status class.
#[derive(Debug, Default)]
pub struct StatusCounts([AtomicU64; 5]);

impl StatusCounts {
    pub fn record(&self, status: http::StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.0[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, class: usize) -> u64 {
        self.0[class].load(Ordering::Relaxed)
    }
}

/// How many reloads the status page lists.
const RECENT_RELOADS: usize = 10;

/// The reasons `wsgate_handshake_refusals_total` counts (431, which hyper answers itself, is
/// counted by the listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Origin,
    UpgradeRequired,
    RateLimited,
}

const REFUSALS: [(Refusal, &str); 4] = [
    (Refusal::BadRequest, "bad_request"),
    (Refusal::Origin, "origin"),
    (Refusal::UpgradeRequired, "upgrade_required"),
    (Refusal::RateLimited, "rate_limited"),
];

#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; 4]);

impl Refusals {
    pub fn record(&self, refusal: Refusal) {
        self.0[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each reason's label and count.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REFUSALS.iter().map(|(refusal, label)| {
            let n = self.0[*refusal as usize].load(Ordering::Relaxed);
            (*label, n)
        })
    }
}

/// Reloads, counted by the reload loop.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub rejected: AtomicU64,
    /// Unix seconds of the last good config (the start counts as one).
    pub last_success: AtomicU64,
    /// The latest reloads, newest last: (Unix seconds, "ok" or "rejected", what it said).
    recent: Mutex<std::collections::VecDeque<(u64, &'static str, String)>>,
}

impl ReloadStats {
    /// The config the gateway started with counts as the first good one.
    pub fn started() -> ReloadStats {
        let stats = ReloadStats::default();
        stats.last_success.store(unix_now(), Ordering::Relaxed);
        stats
    }

    pub fn succeeded(&self, detail: String) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.last_success.store(unix_now(), Ordering::Relaxed);
        self.remember("ok", detail);
    }

    pub fn rejected(&self, detail: String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.remember("rejected", detail);
    }

    fn remember(&self, result: &'static str, detail: String) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_RELOADS {
            recent.pop_front();
        }
        recent.push_back((unix_now(), result, detail));
    }

    pub fn recent(&self) -> Vec<serde_json::Value> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .map(|(at, result, detail)| {
                serde_json::json!({ "at_unix": at, "result": result, "detail": detail })
            })
            .collect()
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A listener that is accepting, as the server registers it.
#[derive(Debug, Clone)]
pub struct ServingListener {
    pub name: Arc<str>,
    pub address: std::net::SocketAddr,
    pub tls: bool,
    pub stats: Arc<ListenerStats>,
}

/// What a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub current: Current,
    /// The listeners serving now; the server updates it on reload.
    pub listeners: Arc<Mutex<Vec<ServingListener>>>,
    pub proxy: Arc<ProxyStats>,
    pub reloads: Arc<ReloadStats>,
}

/// The whole exposition, in Prometheus' text format (version 0.0.4).
pub fn render(sources: &Sources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Gateway(sources.clone())));
    let mut text = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

#[derive(Debug)]
struct Gateway(Sources);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor once, then a sample per label set.
fn family<'l, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Labels<'l>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

/// A histogram family: each sample is the sum of the histograms given for its label set.
fn histograms<'l, 'h>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    bounds: &[f64],
    samples: impl IntoIterator<Item = (Labels<'l>, Vec<&'h Histogram>)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, parts) in samples {
        let mut counts = vec![0u64; bounds.len() + 1];
        let (mut sum, mut count) = (0.0, 0);
        for part in parts {
            let (s, c) = part.add_to(&mut counts);
            sum += s;
            count += c;
        }
        // Per bucket: the encoder accumulates them into Prometheus' cumulative `le` buckets.
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        metric
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
    }
    Ok(())
}

impl Collector for Gateway {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = &self.0;
        let snapshot = sources.current.load_full();
        let routes = snapshot.router.routes();
        let listeners = sources
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let e = &mut encoder;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        family(
            e,
            "wsgate_build_info",
            "The running wsgate's version.",
            MetricType::Gauge,
            [(vec![("version", env!("CARGO_PKG_VERSION"))], gauge(1))],
        )?;

        let mut requests = Vec::new();
        for route in routes {
            for (i, class) in STATUS_CLASSES.iter().enumerate() {
                let labels = vec![("route", &*route.name), ("class", *class)];
                requests.push((labels, counter(route.stats.statuses.get(i))));
            }
        }
        for (i, class) in STATUS_CLASSES.iter().enumerate() {
            let labels = vec![("route", "-"), ("class", *class)];
            requests.push((labels, counter(sources.proxy.unrouted.get(i))));
        }
        family(
            e,
            "wsgate_requests",
            "Requests answered, by route (\"-\": none matched) and status class.",
            MetricType::Counter,
            requests,
        )?;

        histograms(
            e,
            "wsgate_upstream_response_seconds",
            "From sending a request upstream to its response head, by upstream.",
            RESPONSE_BUCKETS,
            snapshot.upstreams.iter().map(|group| {
                let parts = group.endpoints().iter().map(|e| &e.response_time).collect();
                (vec![("upstream", &*group.name)], parts)
            }),
        )?;

        family(
            e,
            "wsgate_connections_open",
            "Client connections open, by listener; one that became a tunnel counts in wsgate_tunnels_open instead.",
            MetricType::Gauge,
            listeners
                .iter()
                .map(|l| (vec![("listener", &*l.name)], gauge(l.stats.open() as u64))),
        )?;
        family(
            e,
            "wsgate_connections",
            "Client connections accepted, by listener.",
            MetricType::Counter,
            listeners.iter().map(|l| {
                (
                    vec![("listener", &*l.name)],
                    counter(load(&l.stats.accepted)),
                )
            }),
        )?;

        let mut tunnels = Vec::new();
        for route in routes {
            let stats = &route.stats;
            let h2 = load(&stats.tunnels_open_h2);
            let all = load(&stats.tunnels_open);
            for (protocol, n) in [("http1", all.saturating_sub(h2)), ("h2", h2)] {
                let labels = vec![("route", &*route.name), ("protocol", protocol)];
                tunnels.push((labels, gauge(n)));
            }
        }
        family(
            e,
            "wsgate_tunnels_open",
            "WebSockets (and other upgrades) open, by route and client protocol.",
            MetricType::Gauge,
            tunnels,
        )?;

        let mut server_tunnels = Vec::new();
        for group in &snapshot.upstreams {
            for server in group.endpoints() {
                let (all, h2) = (server.tunnels(), server.tunnels_over_h2());
                for (protocol, n) in [("http1", all.saturating_sub(h2)), ("h2", h2)] {
                    let labels = vec![
                        ("upstream", &*group.name),
                        ("server", &*server.label),
                        ("protocol", protocol),
                    ];
                    server_tunnels.push((labels, gauge(n as u64)));
                }
            }
        }
        family(
            e,
            "wsgate_server_tunnels_open",
            "Tunnels open, by upstream server and client protocol.",
            MetricType::Gauge,
            server_tunnels,
        )?;

        histograms(
            e,
            "wsgate_tunnel_duration_seconds",
            "How long closed tunnels lived, by route.",
            TUNNEL_BUCKETS,
            routes.iter().map(|route| {
                (
                    vec![("route", &*route.name)],
                    vec![&route.stats.tunnel.duration],
                )
            }),
        )?;

        let mut bytes = Vec::new();
        for route in routes {
            let tunnel = &route.stats.tunnel;
            for (direction, n) in [
                ("client_to_upstream", &tunnel.bytes_up),
                ("upstream_to_client", &tunnel.bytes_down),
            ] {
                let labels = vec![("route", &*route.name), ("direction", direction)];
                bytes.push((labels, counter(load(n))));
            }
        }
        family(
            e,
            "wsgate_tunnel_bytes",
            "Bytes through closed tunnels, by route and direction.",
            MetricType::Counter,
            bytes,
        )?;

        let mut closes: Vec<(String, &'static str, &str, u64)> = Vec::new();
        for route in routes {
            let tunnel = &route.stats.tunnel;
            for (side, codes) in [
                ("client", &tunnel.client_closes),
                ("upstream", &tunnel.upstream_closes),
            ] {
                for (code, n) in codes.each() {
                    closes.push((code, side, &*route.name, n));
                }
            }
        }
        family(
            e,
            "wsgate_websocket_closes",
            "Close codes each side of closed WebSockets sent, by route.",
            MetricType::Counter,
            closes.iter().map(|(code, side, route, n)| {
                (
                    vec![("route", *route), ("side", *side), ("code", code.as_str())],
                    counter(*n),
                )
            }),
        )?;

        let too_large: u64 = listeners
            .iter()
            .map(|l| load(&l.stats.headers_too_large))
            .sum();
        let mut refusals = Vec::new();
        for route in routes {
            for (reason, n) in route.stats.refusals.each() {
                refusals.push((
                    vec![("route", &*route.name), ("reason", reason)],
                    counter(n),
                ));
            }
        }
        // 431 is answered by hyper before any route is known.
        for (reason, n) in sources
            .proxy
            .refusals
            .each()
            .chain([("headers_too_large", too_large)])
        {
            refusals.push((vec![("route", "-"), ("reason", reason)], counter(n)));
        }
        family(
            e,
            "wsgate_handshake_refusals",
            "Requests and handshakes refused before any backend was asked, by route (\"-\": none known) and reason.",
            MetricType::Counter,
            refusals,
        )?;

        let mut tls = Vec::new();
        for l in listeners.iter().filter(|l| l.tls) {
            for (kind, n) in l.stats.tls_failure_kinds() {
                tls.push((vec![("listener", &*l.name), ("kind", kind)], counter(n)));
            }
        }
        family(
            e,
            "wsgate_tls_handshake_failures",
            "Failed TLS handshakes, by listener and kind.",
            MetricType::Counter,
            tls,
        )?;

        let servers = || {
            snapshot
                .upstreams
                .iter()
                .flat_map(|group| group.endpoints().iter().map(move |e| (&*group.name, e)))
        };
        family(
            e,
            "wsgate_upstream_connect_failures",
            "Failed connects (refused, timed out, TLS) to upstream servers.",
            MetricType::Counter,
            servers().map(|(upstream, server)| {
                (
                    vec![("upstream", upstream), ("server", &*server.label)],
                    counter(server.connect_failures()),
                )
            }),
        )?;
        family(
            e,
            "wsgate_upstream_server_healthy",
            "1 while the server gets new requests: not down by its health checks, not ejected.",
            MetricType::Gauge,
            servers().map(|(upstream, server)| {
                (
                    vec![("upstream", upstream), ("server", &*server.label)],
                    gauge(u64::from(server.health.is_usable())),
                )
            }),
        )?;

        let reloads = &sources.reloads;
        family(
            e,
            "wsgate_config_reloads",
            "Config reloads, by result.",
            MetricType::Counter,
            [
                (vec![("result", "ok")], counter(load(&reloads.ok))),
                (
                    vec![("result", "rejected")],
                    counter(load(&reloads.rejected)),
                ),
            ],
        )?;
        family(
            e,
            "wsgate_config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (start or reload), in Unix seconds.",
            MetricType::Gauge,
            [(Vec::new(), gauge(load(&reloads.last_success)))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [5, 10, 11, 100, 2_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut counts = vec![0; 4];
        let (sum, count) = h.add_to(&mut counts);
        // 10 ms is within "le=0.01": buckets are inclusive upper bounds.
        assert_eq!(counts, [2, 2, 0, 1]);
        assert_eq!(count, 5);
        assert!((sum - 2.126).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn close_codes_are_a_bounded_set() {
        let codes = CloseCodes::default();
        for code in [
            Some(1000),
            Some(1000),
            Some(1015),
            Some(4000),
            Some(999),
            None,
        ] {
            codes.record(code);
        }
        let seen: Vec<(String, u64)> = codes.each().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            seen,
            [
                ("1000".to_owned(), 2),
                ("1015".to_owned(), 1),
                ("other".to_owned(), 2),
                ("none".to_owned(), 1)
            ]
        );
        assert_eq!(codes.each().count(), 18);
    }

    #[test]
    fn statuses_fall_into_their_class() {
        let counts = StatusCounts::default();
        for status in [101, 200, 204, 301, 404, 429, 502] {
            counts.record(http::StatusCode::from_u16(status).unwrap());
        }
        let classes: Vec<u64> = (0..5).map(|i| counts.get(i)).collect();
        assert_eq!(classes, [1, 2, 1, 2, 1]);
    }
}
