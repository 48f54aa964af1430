//! Failures become the right status with a short page, and never stop the gateway from serving
//! the next request: upstream failures, refused requests, bad handshakes, malformed HTTP.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::raw::{exchange, RawResponse};
use crate::support::ws::handshake;
use crate::support::*;

/// A `/healthz` answered by the gateway itself, everything else proxied to a recording backend.
async fn gateway() -> (HttpBackend, TestGateway) {
    let backend = HttpBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"health\"\npath = \"/healthz\"\nrespond = {{ status = 200, body = \"ok\" }}\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    (backend, gw)
}

/// A well-formed request on a fresh connection still gets its answer.
async fn assert_still_serves(gw: &TestGateway) {
    let reply = get(gw.addr, "app.test", "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "ok");
}

/// Sends `bytes` on a fresh connection and reads one response.
async fn send_raw(gw: &TestGateway, bytes: impl AsRef<[u8]>) -> RawResponse {
    exchange(gw.addr, bytes).await
}

#[tokio::test]
async fn refused_upstream_gives_502_naming_the_upstream_but_not_the_address() {
    let (_reserved, dead) = dead_address();
    let gw = TestGateway::start(&proxy_config(&[dead])).await;
    let reply = get(gw.addr, "app.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        reply.text(),
        "502 Bad Gateway: upstream \"app\" is unavailable\n"
    );
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(!reply.text().contains(&dead.port().to_string()));
    assert_eq!(gw.endpoint("app", 0).active(), 0);
}

#[tokio::test]
async fn silent_upstream_gives_504_after_the_response_header_timeout() {
    let mut silent = silent_backend().await;
    let config = format!(
        "[timeouts]\nupstream_response_header = \"500ms\"\n\n{}",
        proxy_config(&[silent.addr])
    );
    let gw = TestGateway::start(&config).await;
    let started = Instant::now();
    let reply = get(gw.addr, "app.test", "/slow").await;
    let waited = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        reply.text(),
        "504 Gateway Timeout: upstream \"app\" did not answer in time\n"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "answered after {waited:?}"
    );
    assert!(silent
        .next_head()
        .await
        .starts_with("GET /slow HTTP/1.1\r\n"));
    // The timed-out exchange gave its lease back.
    assert_eq!(gw.endpoint("app", 0).active(), 0);
}

#[tokio::test]
async fn unmatched_host_or_path_gives_404() {
    let backend = HttpBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"api\"\nhosts = [\"api.test\"]\npath = \"/v1\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "round_robin", &[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    for (host, path) in [
        ("api.test", "/v2"),
        ("other.test", "/v1"),
        ("api.test", "/v10"),
    ] {
        let reply = get(gw.addr, host, path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{host}{path}");
        assert_eq!(
            reply.text(),
            "404 Not Found: no route matches this host and path\n"
        );
    }
    assert_eq!(
        get(gw.addr, "api.test", "/v1/x").await.status,
        StatusCode::OK
    );
    assert_eq!(backend.requests().len(), 1);
}

#[tokio::test]
async fn connect_method_gives_405_with_allow() {
    let (backend, gw) = gateway().await;
    let response = send_raw(
        &gw,
        "CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n",
    )
    .await;
    assert_eq!(response.status(), 405);
    assert!(response
        .head
        .header("allow")
        .is_some_and(|a| a.contains("GET")));
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn invalid_websocket_handshakes_get_400_without_contacting_the_backend() {
    let (mut backend, gw) = gateway().await;
    let no_key =
        "GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Version: 13\r\n\r\n";
    let bad_key =
        "GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n";
    let post = handshake("app.test", "/ws", &[]).replacen("GET", "POST", 1);
    for (what, request, page) in [
        ("no key", no_key.to_owned(), "missing Sec-WebSocket-Key"),
        (
            "bad key",
            bad_key.to_owned(),
            "Sec-WebSocket-Key must be 16 bytes",
        ),
        ("POST", post, "must use GET"),
    ] {
        let response = send_raw(&gw, request).await;
        assert_eq!(response.status(), 400, "{what}: {}", response.head.raw);
        assert!(
            response.text().contains(page),
            "{what}: {}",
            response.text()
        );
    }
    // The first request the backend ever sees is this one.
    assert_eq!(get(gw.addr, "app.test", "/after").await.status, 200);
    assert_eq!(backend.next_request().await.uri, "/after");
    assert_eq!(backend.requests().len(), 1);
}

#[tokio::test]
async fn websocket_version_other_than_13_gets_426_naming_version_13() {
    let (backend, gw) = gateway().await;
    let request = handshake("app.test", "/ws", &[])
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let response = send_raw(&gw, request).await;
    assert_eq!(response.status(), 426, "{}", response.head.raw);
    assert_eq!(response.head.header("sec-websocket-version"), Some("13"));
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn garbage_bytes_get_400_and_the_gateway_keeps_serving() {
    let (_backend, gw) = gateway().await;
    // The start of a TLS ClientHello, sent to a plain HTTP port.
    let response = send_raw(&gw, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").await;
    assert_eq!(response.status(), 400);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn bad_request_lines_get_400_and_the_gateway_keeps_serving() {
    let (backend, gw) = gateway().await;
    for line in [
        "G@T / HTTP/1.1",
        "GET / HTTP/9.9",
        "GET /a b HTTP/1.1",
        "GET",
    ] {
        let response = send_raw(&gw, format!("{line}\r\nHost: app.test\r\n\r\n")).await;
        assert_eq!(response.status(), 400, "{line:?}: {}", response.head.raw);
    }
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn http09_request_gets_400() {
    let (backend, gw) = gateway().await;
    let response = send_raw(&gw, "GET /\r\n").await;
    assert_eq!(response.status(), 400, "{}", response.head.raw);
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn request_head_over_the_limit_gets_431() {
    let (backend, gw) = gateway().await;
    // Default limit 32 KiB; hyper answers 431 (RFC 6585), not 400.
    let big = "x".repeat(64 * 1024);
    let response = send_raw(
        &gw,
        format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\n\r\n"),
    )
    .await;
    assert_eq!(response.status(), 431, "{}", response.head.raw);
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn content_length_with_chunked_cannot_smuggle_a_request() {
    let (mut backend, gw) = gateway().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";
    // By Content-Length the body is the smuggled request; by Transfer-Encoding it is empty.
    let body = format!("0\r\n\r\n{smuggled}");
    let length = format!("Content-Length: {}", body.len());
    let chunked = "Transfer-Encoding: chunked";
    for (first, second) in [(length.as_str(), chunked), (chunked, length.as_str())] {
        let mut client = RawClient::connect(gw.addr).await;
        client
            .send(format!(
                "POST /front HTTP/1.1\r\nHost: app.test\r\n{first}\r\n{second}\r\n\r\n{body}"
            ))
            .await;
        let response = client.read_response().await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.text(),
            "backend=a method=POST uri=/front body_len=0\n"
        );
        // RFC 9112 section 6.3: such a connection is closed after the response, so whatever
        // followed the chunked body is never read as a request.
        let rest = client.read_to_close().await;
        assert!(
            rest.is_empty(),
            "more after the response: {:?}",
            String::from_utf8_lossy(&rest)
        );

        let front = backend.next_request().await;
        assert_eq!(front.uri, "/front");
        assert_eq!(front.header("content-length"), None);
        assert_eq!(front.header("transfer-encoding"), Some("chunked"));
        assert!(front.body.is_empty());
    }
    assert_eq!(get(gw.addr, "app.test", "/after").await.status, 200);
    assert_eq!(backend.next_request().await.uri, "/after");
    let uris: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| r.uri.to_string())
        .collect();
    assert_eq!(uris, ["/front", "/front", "/after"]);
}

#[tokio::test]
async fn http11_request_without_host_gets_400() {
    let (backend, gw) = gateway().await;
    let response = send_raw(&gw, "GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.text(),
        "400 Bad Request: missing, repeated or invalid Host header\n"
    );
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn two_host_headers_get_400() {
    let (backend, gw) = gateway().await;
    let response = send_raw(
        &gw,
        "GET / HTTP/1.1\r\nHost: app.test\r\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(backend.connections(), 0);
    assert_still_serves(&gw).await;
}
