//! Route lookup cost for a realistic table: exact hosts, wildcards and path prefixes.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use wsgate::router::Router;

const CONFIG: &str = r#"
[[listener]]
name = "http"
bind = "127.0.0.1:8080"

[[route]]
name = "status"
path = "/wsgate/status"
respond = { status = 200 }

[[route]]
name = "api"
hosts = ["api.example.com"]
path = "/v1"
upstream = "app"

[[route]]
name = "api-v2"
hosts = ["api.example.com"]
path = "/v2/"
upstream = "app"

[[route]]
name = "tenants"
hosts = ["*.tenants.example.com"]
upstream = "app"

[[route]]
name = "ws"
path = "/ws"
upstream = "app"

[[route]]
name = "static"
path = "/static"
upstream = "app"

[[route]]
name = "default"
upstream = "app"

[[upstream]]
name = "app"
servers = ["127.0.0.1:9000"]
"#;

fn lookups(c: &mut Criterion) {
    let config = wsgate::config::parse(CONFIG, "bench.toml").expect("valid config");
    let router = Router::new(&config.routes, None);
    let mut group = c.benchmark_group("route");
    for (name, host, path) in [
        ("exact_host", "api.example.com", "/v2/users/42"),
        (
            "wildcard_host",
            "acme.tenants.example.com:8443",
            "/dashboard",
        ),
        ("path_prefix", "www.example.com", "/ws/chat"),
        ("fallback", "www.example.com", "/index.html"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                router
                    .route(black_box(host), black_box(path))
                    .map(|r| r.name.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
