//! The admin listener: `/metrics` read by Prometheus' own Python parser after a known sequence
//! of requests, refusals and tunnels (exact counts, bounded labels), `/readyz` at drain, the
//! read-only rule, and the bind rule. `.ci/run` installs Debian's python3-prometheus-client;
//! without it the metrics tests print `SKIP admin metrics test: ...` and pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::binary::{run, TempFile};
use crate::support::raw::{exchange, RawClient};
use crate::support::*;

const PYTHON: &str = "/usr/bin/python3";

/// Prints one JSON object per sample: what Prometheus' client library reads from the text.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": sample.name,
                          "labels": sample.labels, "value": sample.value}))
"#;

fn parser_installed() -> bool {
    let ok = Path::new(PYTHON).exists()
        && Command::new(PYTHON)
            .args(["-c", "import prometheus_client.parser"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIP admin metrics test: {PYTHON} with prometheus_client is missing (apt-get install python3-prometheus-client)"
        );
    }
    ok
}

#[derive(Debug, serde::Deserialize)]
struct Sample {
    family: String,
    #[serde(rename = "type")]
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Scrapes `/metrics` and has Prometheus' parser read it.
async fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let reply = get(admin, "admin", "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = reply.text().to_owned();
    let parsed = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(PYTHON)
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .expect("write the exposition");
        let out = child.wait_with_output().expect("python3 ends");
        assert!(
            out.status.success(),
            "Prometheus' parser refused the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    });
    let lines = within(WAIT, parsed).await.expect("parser thread");
    lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a sample"))
        .collect()
}

/// The value of sample `name` with exactly these labels.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == wanted)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0].value
}

fn admin_config(rest: &str) -> String {
    format!("{rest}\n[admin]\nbind = \"127.0.0.1:0\"\n")
}

/// Closes with `code`, reads to the end, and drops the socket, as a client library does.
async fn close_with(mut ws: crate::support::ws::WsStream, code: u16) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: "done".into(),
    };
    within(WAIT, ws.close(Some(frame))).await.expect("close");
    // The close handshake ends with the stream.
    for _ in 0..8 {
        match within(WAIT, ws.next()).await {
            None | Some(Err(_)) => return,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn metrics_count_a_known_sequence_exactly() {
    if !parser_installed() {
        return;
    }
    let http = HttpBackend::start("http").await;
    let ws = WsBackend::start("ws").await;
    let (_reserved, dead) = dead_address();
    let config = admin_config(&format!(
        "[[route]]\nname = \"api\"\npath = \"/api\"\nupstream = \"api\"\n\n\
         [[route]]\nname = \"chat\"\npath = \"/chat\"\nupstream = \"chat\"\nallowed_origins = [\"https://app.test\"]\n\n\
         [[route]]\nname = \"gone\"\npath = \"/gone\"\nupstream = \"gone\"\n\n\
         {}{}{}\n[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n",
        upstream_config("api", "round_robin", &[http.addr]),
        upstream_config("chat", "round_robin", &[ws.addr]),
        upstream_config("gone", "round_robin", &[dead]),
    ));
    let gw = TestGateway::start(&config).await;
    let admin = gw.admin.expect("the admin listener");

    for _ in 0..3 {
        assert_eq!(
            get(gw.addr, "a.test", "/api/ok").await.status,
            StatusCode::OK
        );
    }
    let mut client = Client::connect(gw.addr).await;
    let failed = client
        .fetch(
            request("GET", "a.test", "/api/fail")
                .header("x-reply-status", "503")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        get(gw.addr, "a.test", "/nowhere").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(gw.addr, "a.test", "/gone").await.status,
        StatusCode::BAD_GATEWAY
    );
    let bad_version = exchange(
        gw.addr,
        "GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Origin: https://app.test\r\n\r\n",
    )
    .await;
    assert_eq!(bad_version.status(), 426);
    let foreign = exchange(
        gw.addr,
        "GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Origin: https://evil.test\r\n\r\n",
    )
    .await;
    assert_eq!(foreign.status(), 403);
    let too_large = exchange(
        gw.addr,
        format!(
            "GET /api HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        ),
    )
    .await;
    assert_eq!(too_large.status(), 431);

    let open = |gw: &TestGateway| {
        let request = ws_request(gw.addr, "/chat", "https://app.test");
        ws_connect_with(gw.addr, request)
    };
    let (kept, _) = open(&gw).await;
    let (mut closed, _) = open(&gw).await;
    within(WAIT, closed.send(Message::text("12345")))
        .await
        .expect("send");
    let echo = within(WAIT, closed.next())
        .await
        .expect("echo")
        .expect("a message");
    assert_eq!(echo, Message::text("12345"));
    close_with(closed, 4001).await;
    // The route's count drops before the server's lease does: wait for both.
    let chat_server = gw.endpoint("chat", 0);
    eventually("the closed tunnel is counted", || {
        let route = gw.route_stats("chat");
        route
            .tunnels_open
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
            && chat_server.tunnels() == 1
    })
    .await;
    gw.reload(&config)
        .await
        .expect("an identical config reloads");
    // Valid text whose CA bundle cannot be read: refused by the gateway itself.
    let unreadable = config.replace(
        &format!("servers = [\"{dead}\"]"),
        &format!("servers = [\"https://{dead}\"]\ntls = {{ ca = \"/nonexistent/ca.pem\" }}"),
    );
    assert!(gw.reload(&unreadable).await.is_err());
    drop(client);

    let samples = scrape(admin).await;
    let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(
        v(
            "wsgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        v(
            "wsgate_requests_total",
            &[("route", "api"), ("class", "2xx")]
        ),
        3.0
    );
    assert_eq!(
        v(
            "wsgate_requests_total",
            &[("route", "api"), ("class", "5xx")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "wsgate_requests_total",
            &[("route", "gone"), ("class", "5xx")]
        ),
        1.0
    );
    assert_eq!(
        v("wsgate_requests_total", &[("route", "-"), ("class", "4xx")]),
        1.0
    );
    // Two refusals and two tunnels (their 101s).
    assert_eq!(
        v(
            "wsgate_requests_total",
            &[("route", "chat"), ("class", "4xx")]
        ),
        2.0
    );
    assert_eq!(
        v(
            "wsgate_requests_total",
            &[("route", "chat"), ("class", "1xx")]
        ),
        2.0
    );
    let refusals = |route: &str, reason: &str| {
        let labels = [("route", route), ("reason", reason)];
        value(&samples, "wsgate_handshake_refusals_total", &labels)
    };
    assert_eq!(refusals("chat", "upgrade_required"), 1.0);
    assert_eq!(refusals("chat", "origin"), 1.0);
    assert_eq!(refusals("chat", "rate_limited"), 0.0);
    assert_eq!(refusals("api", "origin"), 0.0);
    assert_eq!(refusals("-", "headers_too_large"), 1.0);
    assert_eq!(
        v(
            "wsgate_tunnels_open",
            &[("route", "chat"), ("protocol", "http1")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "wsgate_tunnels_open",
            &[("route", "chat"), ("protocol", "h2")]
        ),
        0.0
    );
    let ws_server = ws.addr.to_string();
    let on_ws = [("upstream", "chat"), ("server", ws_server.as_str())];
    assert_eq!(
        v(
            "wsgate_server_tunnels_open",
            &[on_ws[0], on_ws[1], ("protocol", "http1")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "wsgate_websocket_closes_total",
            &[("route", "chat"), ("side", "client"), ("code", "other")]
        ),
        1.0
    );
    // The echo backend answers a Close with the same code.
    assert_eq!(
        v(
            "wsgate_websocket_closes_total",
            &[("route", "chat"), ("side", "upstream"), ("code", "other")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "wsgate_websocket_closes_total",
            &[("route", "chat"), ("side", "client"), ("code", "1000")]
        ),
        0.0
    );
    assert_eq!(
        v("wsgate_tunnel_duration_seconds_count", &[("route", "chat")]),
        1.0
    );
    // "12345" in a masked frame (2 + 4 + 5) and the Close; the echo and the answering Close.
    assert!(
        v(
            "wsgate_tunnel_bytes_total",
            &[("route", "chat"), ("direction", "client_to_upstream")]
        ) >= 11.0
    );
    assert!(
        v(
            "wsgate_tunnel_bytes_total",
            &[("route", "chat"), ("direction", "upstream_to_client")]
        ) >= 7.0
    );
    let dead_server = dead.to_string();
    assert_eq!(
        v(
            "wsgate_upstream_connect_failures_total",
            &[("upstream", "gone"), ("server", dead_server.as_str())]
        ),
        1.0
    );
    assert_eq!(
        v(
            "wsgate_upstream_server_healthy",
            &[("upstream", "gone"), ("server", dead_server.as_str())]
        ),
        1.0,
        "no checks, no ejection"
    );
    assert_eq!(
        v(
            "wsgate_upstream_response_seconds_count",
            &[("upstream", "api")]
        ),
        4.0
    );
    assert_eq!(
        v(
            "wsgate_upstream_response_seconds_bucket",
            &[("upstream", "api"), ("le", "+Inf")]
        ),
        4.0
    );
    assert_eq!(v("wsgate_config_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(
        v("wsgate_config_reloads_total", &[("result", "rejected")]),
        1.0
    );
    assert!(v("wsgate_config_last_reload_success_timestamp_seconds", &[]) > 1.7e9);
    assert!(v("wsgate_connections_total", &[("listener", "main")]) >= 9.0);
    // The kept WebSocket's connection is a tunnel now, counted there and not here.
    assert_eq!(v("wsgate_connections_open", &[("listener", "main")]), 0.0);
    let types: BTreeMap<&str, &str> = samples
        .iter()
        .map(|s| (s.family.as_str(), s.kind.as_str()))
        .collect();
    assert_eq!(types["wsgate_requests"], "counter");
    assert_eq!(types["wsgate_upstream_response_seconds"], "histogram");
    assert_eq!(types["wsgate_tunnels_open"], "gauge");
    close_with(kept, 1000).await;
}

fn ws_request(
    addr: SocketAddr,
    path: &str,
    origin: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("origin", origin.parse().expect("an origin"));
    request
}

#[tokio::test]
async fn label_sets_stay_bounded_under_1000_distinct_paths_and_hosts() {
    if !parser_installed() {
        return;
    }
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&admin_config(&proxy_config(&[backend.addr]))).await;
    let admin = gw.admin.expect("admin");
    let _ = get(gw.addr, "warm.test", "/").await;
    let keys = |samples: &[Sample]| -> BTreeSet<String> {
        samples
            .iter()
            .map(|s| format!("{}{:?}", s.name, s.labels))
            .collect()
    };
    let before = keys(&scrape(admin).await);
    let mut client = Client::connect(gw.addr).await;
    for i in 0..1_000 {
        let reply = client
            .fetch(
                request("GET", &format!("h{i}.test"), &format!("/p/{i}?q={i}"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let after = scrape(admin).await;
    assert_eq!(keys(&after), before, "no label came from a request");
    assert_eq!(
        value(
            &after,
            "wsgate_requests_total",
            &[("route", "app"), ("class", "2xx")]
        ),
        1_001.0
    );
}

#[tokio::test]
async fn readyz_turns_503_the_moment_the_drain_starts_while_healthz_stays_200() {
    let mut backend = HttpBackend::start("a").await;
    let mut gw = TestGateway::start(&admin_config(&proxy_config(&[backend.addr]))).await;
    let admin = gw.admin.expect("admin");
    assert_eq!(get(admin, "admin", "/readyz").await.text(), "ready\n");
    // A request in flight keeps the drain going while readiness is asked.
    let mut client = Client::connect(gw.addr).await;
    let held = tokio::spawn(async move {
        client
            .fetch(
                request("GET", "a.test", "/slow")
                    .header("x-reply-hold", "1")
                    .body(empty())
                    .unwrap(),
            )
            .await
    });
    backend.next_request().await;
    gw.begin_shutdown().await;
    let ready = get(admin, "admin", "/readyz").await;
    assert_eq!(
        (ready.status, ready.text()),
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    );
    assert_eq!(get(admin, "admin", "/healthz").await.status, StatusCode::OK);
    let status = get(admin, "admin", "/status.json").await;
    let status: serde_json::Value = serde_json::from_str(status.text()).expect("JSON");
    assert_eq!(status["ready"], false);
    backend.release();
    let reply = within(WAIT, held).await.expect("the held request");
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the request in flight finished"
    );
}

#[tokio::test]
async fn the_admin_endpoints_are_read_only_and_never_on_a_proxy_listener() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&admin_config(&proxy_config(&[backend.addr]))).await;
    let admin = gw.admin.expect("admin");
    let mut client = Client::connect(admin).await;
    let post = client
        .fetch(
            request("POST", "admin", "/metrics")
                .body(full("x"))
                .unwrap(),
        )
        .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    // On the proxy listener, /metrics is the backend's path like any other.
    let proxied = get(gw.addr, "a.test", "/metrics").await;
    assert_eq!(proxied.header("x-backend"), Some("a"));
    let page = get(admin, "admin", "/").await;
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.text().contains("id=\"tunnels-open\""));
    assert!(!page.text().contains("src=\"http"), "no external script");
}

#[test]
fn a_public_admin_bind_without_allow_is_a_config_error() {
    let config = TempFile::new(
        "admin",
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:8080\"\n\n[admin]\nbind = \"0.0.0.0:9100\"\n",
    );
    let out = run(&["check", "--config", &config.display()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "admin.toml:5:1: admin: bind 0.0.0.0:9100 is reachable beyond this machine: add allow"
        ),
        "{stderr}"
    );
    let allowed = TempFile::new(
        "admin-allowed",
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:8080\"\n\n[admin]\nbind = \"0.0.0.0:9100\"\nallow = [\"10.0.0.0/8\"]\n",
    );
    let out = run(&["check", "--config", &allowed.display()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tls_handshake_failures_are_counted_by_listener_and_kind() {
    if !parser_installed() {
        return;
    }
    let backend = HttpBackend::start("a").await;
    let pki = crate::support::tls::Pki::new();
    let leaf = pki.issue("leaf", &["app.test"]);
    let config = admin_config(&format!(
        "{}\n[[listener]]\nname = \"secure\"\nbind = \"127.0.0.1:0\"\n[listener.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n",
        proxy_config(&[backend.addr]),
        leaf.cert,
        leaf.key
    ));
    let gw = TestGateway::start(&config).await;
    let plain = exchange(gw.addr, "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(
        plain.status(),
        400,
        "plain HTTP on the TLS port is answered"
    );
    let mut garbage = RawClient::connect(gw.addr).await;
    garbage.send([0u8, 1, 2, 3]).await;
    let _ = garbage.read_to_close().await;
    let mut silent = RawClient::connect(gw.addr).await;
    silent.shutdown_write().await;
    let _ = silent.read_to_close().await;
    let ok =
        crate::support::tls::tls_connect(gw.addr, "app.test", pki.client_config(&[b"http/1.1"]))
            .await;
    assert!(ok.is_ok(), "a good handshake is not a failure");
    eventually("three failures counted", || {
        gw.listener
            .tls_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            == 3
    })
    .await;
    let samples = scrape(gw.admin.expect("admin")).await;
    let v = |kind: &str| {
        value(
            &samples,
            "wsgate_tls_handshake_failures_total",
            &[("listener", "secure"), ("kind", kind)],
        )
    };
    assert_eq!(
        (
            v("plain_http"),
            v("not_tls"),
            v("closed"),
            v("handshake"),
            v("timeout")
        ),
        (1.0, 1.0, 1.0, 0.0, 0.0)
    );
    assert!(
        !samples
            .iter()
            .any(|s| s.name == "wsgate_tls_handshake_failures_total"
                && s.labels["listener"] == "plain"),
        "a plain listener has no TLS series"
    );
    assert_eq!(
        value(
            &samples,
            "wsgate_connections_total",
            &[("listener", "plain")]
        ),
        0.0
    );
}
