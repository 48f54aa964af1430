//! Cost of the header transforms applied to every proxied request and response.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use wsgate::proxy::headers::{self, Forwarding};

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

fn transforms(c: &mut Criterion) {
    let browser_request = map(&[
        ("host", "www.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
        ("x-forwarded-for", "203.0.113.7"),
    ]);
    let handshake = map(&[
        ("host", "www.example.com"),
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        (
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        ),
        ("origin", "https://www.example.com"),
    ]);
    let response = map(&[
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", "5120"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("cache-control", "no-cache"),
        ("date", "Wed, 25 Nov 2026 00:00:00 GMT"),
    ]);
    let host = HeaderValue::from_static("www.example.com");
    let forwarding = Forwarding {
        client: "198.51.100.23".parse().unwrap(),
        proto: "http",
        host: Some(&host),
    };

    let mut group = c.benchmark_group("headers");
    group.bench_function("to_upstream_request", |b| {
        b.iter_batched_ref(
            || browser_request.clone(),
            |h| headers::to_upstream(h, black_box(&forwarding), false),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("to_upstream_handshake", |b| {
        b.iter_batched_ref(
            || handshake.clone(),
            |h| headers::to_upstream(h, black_box(&forwarding), true),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("to_downstream_response", |b| {
        b.iter_batched_ref(
            || response.clone(),
            |h| headers::to_downstream(h, false),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("classify_handshake", |b| {
        b.iter(|| {
            wsgate::websocket::classify(
                &http::Method::GET,
                http::Version::HTTP_11,
                black_box(&handshake),
                &[],
                None,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, transforms);
criterion_main!(benches);
