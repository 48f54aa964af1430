//! Plain HTTP through the gateway: what reaches the backend, what comes back, routing,
//! streaming, connection reuse and server choice.

use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use http::{StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::oneshot;

use crate::support::pattern::{self, Check, MIB};
use crate::support::raw::exchange;
use crate::support::*;

#[tokio::test]
async fn get_round_trip_keeps_method_target_headers_and_host() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = Client::connect(gw.addr).await;
    let reply = client
        .fetch(
            request("GET", "app.test:8080", "/items/7?color=red&size=2")
                .header("x-request-id", "abc-123")
                .header("cookie", "a=b; c=d")
                .header("accept", "text/plain")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-backend"), Some("a"));
    assert_eq!(
        reply.text(),
        "backend=a method=GET uri=/items/7?color=red&size=2 body_len=0\n"
    );

    let seen = backend.next_request().await;
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/items/7?color=red&size=2");
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.header("host"), Some("app.test:8080"));
    assert_eq!(seen.header("x-request-id"), Some("abc-123"));
    assert_eq!(seen.header("cookie"), Some("a=b; c=d"));
    assert_eq!(seen.header("accept"), Some("text/plain"));
    assert_eq!(gw.route_stats("app").requests.load(SeqCst), 1);
}

#[tokio::test]
async fn post_body_and_response_status_and_headers_round_trip() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = Client::connect(gw.addr).await;
    let reply = client
        .fetch(
            request("POST", "app.test", "/submit")
                .header("content-type", "application/json")
                .header("x-reply-status", "201")
                .header("x-reply-header", "etag: \"v1\"")
                .header("x-reply-header", "set-cookie: s=1")
                .body(full(r#"{"hello":"world"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.header("etag"), Some("\"v1\""));
    assert_eq!(reply.header("set-cookie"), Some("s=1"));
    assert_eq!(
        reply.text(),
        "backend=a method=POST uri=/submit body_len=17\n"
    );

    let seen = backend.next_request().await;
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body, Bytes::from_static(br#"{"hello":"world"}"#));
    assert_eq!(seen.header("content-length"), Some("17"));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("host"), Some("app.test"));
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = Client::connect(gw.addr).await;

    // Without trusted_proxies, what a client says about its own address is not believed
    // (edge.rs has a trusted proxy's chain extended).
    let reply = client
        .fetch(
            request("GET", "app.test", "/")
                .header("x-forwarded-for", "203.0.113.9")
                .header("x-forwarded-for", "198.51.100.7")
                .header("forwarded", "for=203.0.113.9")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "spoofed.test")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = backend.next_request().await;
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.test"));
    assert_eq!(
        seen.header("forwarded"),
        Some("for=127.0.0.1;host=app.test;proto=http")
    );

    // A direct client, and a host with a port: RFC 7239 quotes it.
    client
        .fetch(request("GET", "app.test:8443", "/").body(empty()).unwrap())
        .await;
    let seen = backend.next_request().await;
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.test:8443"));
    assert_eq!(
        seen.header("forwarded"),
        Some("for=127.0.0.1;host=\"app.test:8443\";proto=http")
    );
    assert_eq!(seen.header("host"), Some("app.test:8443"));
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_in_both_directions() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let response = exchange(
        gw.addr,
        "GET /hop HTTP/1.1\r\n\
         Host: app.test\r\n\
         Connection: keep-alive, X-Custom\r\n\
         Connection: x-second\r\n\
         X-Custom: secret\r\n\
         X-Second: 2\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Upgrade: h2c\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         Authorization: Bearer end-to-end\r\n\
         X-End-To-End: kept\r\n\
         x-reply-header: Connection: x-down\r\n\
         x-reply-header: X-Down: hop\r\n\
         x-reply-header: Keep-Alive: timeout=9\r\n\
         x-reply-header: Proxy-Connection: keep-alive\r\n\
         x-reply-header: Proxy-Authenticate: Basic realm=\"p\"\r\n\
         x-reply-header: Upgrade: h2c\r\n\
         x-reply-header: X-End-Down: kept\r\n\
         \r\n",
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);

    let seen = backend.next_request().await;
    for hop in [
        "connection",
        "x-custom",
        "x-second",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            !seen.headers.contains_key(hop),
            "backend saw hop-by-hop {hop}: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("authorization"), Some("Bearer end-to-end"));
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    assert_eq!(seen.header("host"), Some("app.test"));

    let head = &response.head;
    for hop in [
        "connection",
        "x-down",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "upgrade",
    ] {
        assert!(!head.has(hop), "client saw hop-by-hop {hop}:\n{}", head.raw);
    }
    assert_eq!(head.header("x-end-down"), Some("kept"));
    assert_eq!(head.header("x-backend"), Some("a"));
}

#[tokio::test]
async fn absolute_form_target_is_routed_by_authority_and_sent_in_origin_form() {
    let mut backend = HttpBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nhosts = [\"app.test\"]\nupstream = \"app\"\n\n\
         [[route]]\nname = \"other\"\nrespond = {{ status = 200, body = \"fallback\" }}\n\n{}",
        upstream_config("app", "round_robin", &[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let response = exchange(
        gw.addr,
        "GET http://app.test:9999/abs/path?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.head.header("x-backend"), Some("a"));
    let seen = backend.next_request().await;
    assert_eq!(seen.uri, "/abs/path?q=1");
    assert_eq!(seen.header("host"), Some("app.test:9999"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.test:9999"));

    // The same Host in origin-form chooses the fallback: the authority won above.
    let response = exchange(
        gw.addr,
        "GET /abs/path HTTP/1.1\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert_eq!(response.text(), "fallback");
    // And an authority naming no route's host wins over a Host that would match one.
    let request = format!("GET {} HTTP/1.1\r\nHost: app.test\r\n\r\n", gw.url("/abs"));
    let response = exchange(gw.addr, request).await;
    assert_eq!(response.text(), "fallback");
}

fn respond_route(name: &str, hosts: &str, path: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nhosts = [{hosts}]\npath = \"{path}\"\n\
         respond = {{ status = 200, body = \"{name}\" }}\n\n"
    )
}

#[tokio::test]
async fn hosts_route_exact_then_longest_wildcard_then_any_host() {
    let config = [
        respond_route("exact", "\"www.example.test\"", "/"),
        respond_route("wild", "\"*.example.test\"", "/"),
        respond_route("deep", "\"*.eu.example.test\"", "/"),
        respond_route("any", "", "/"),
    ]
    .concat();
    let gw = TestGateway::start(&config).await;
    let cases = [
        ("www.example.test", "exact"),
        ("WWW.Example.TEST:8080", "exact"),
        ("api.example.test", "wild"),
        ("a.b.example.test", "wild"),
        ("x.eu.example.test", "deep"),
        // A wildcard needs at least one more label.
        ("example.test", "any"),
        ("other.test", "any"),
    ];
    for (host, want) in cases {
        let reply = get(gw.addr, host, "/").await;
        assert_eq!(reply.text(), want, "Host: {host}");
    }
    // HTTP/1.0 may omit Host: only a route without hosts can match.
    let response = exchange(gw.addr, "GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text(), "any");

    assert_eq!(gw.route_stats("exact").requests.load(SeqCst), 2);
    assert_eq!(gw.route_stats("wild").requests.load(SeqCst), 2);
    assert_eq!(gw.route_stats("deep").requests.load(SeqCst), 1);
    assert_eq!(gw.route_stats("any").requests.load(SeqCst), 3);
}

#[tokio::test]
async fn longest_path_prefix_wins_on_segment_boundaries() {
    let config = [
        respond_route("root", "", "/"),
        respond_route("api", "", "/api"),
        respond_route("v2", "", "/api/v2/"),
    ]
    .concat();
    let gw = TestGateway::start(&config).await;
    let cases = [
        ("/", "root"),
        ("/ap", "root"),
        ("/apix", "root"),
        ("/api", "api"),
        ("/api/", "api"),
        ("/api/users?x=1", "api"),
        ("/api/v2", "api"),
        ("/api/v2x", "api"),
        ("/api/v2/", "v2"),
        ("/api/v2/things", "v2"),
    ];
    for (path, want) in cases {
        let reply = get(gw.addr, "any.test", path).await;
        assert_eq!(reply.text(), want, "path {path}");
    }
}

#[tokio::test]
async fn respond_route_answers_without_contacting_the_upstream() {
    let backend = HttpBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"teapot\"\npath = \"/tea\"\nrespond = {{ status = 418, body = \"short and stout\\n\" }}\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let reply = get(gw.addr, "app.test", "/tea/pot").await;
    assert_eq!(reply.status.as_u16(), 418);
    assert_eq!(reply.text(), "short and stout\n");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(backend.connections(), 0);
    assert_eq!(gw.route_stats("teapot").requests.load(SeqCst), 1);

    let reply = get(gw.addr, "app.test", "/other").await;
    assert_eq!(reply.header("x-backend"), Some("a"));
}

const BIG: u64 = 64 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_64_mib_streams_through_without_buffering() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;

    // The client sends 1 MiB, then stops until the backend has seen that first MiB: a
    // gateway that buffered the body before forwarding it would stall here.
    let (resume, resumed) = oneshot::channel::<()>();
    let wait: pattern::Pause = Box::pin(async move {
        let _ = resumed.await;
    });
    let body = StreamBody::new(pattern::frames(BIG, Some((MIB, wait)))).boxed_unsync();
    let upload = request("PUT", "app.test", "/upload")
        .header("x-notify-at-bytes", MIB.to_string())
        .body(body)
        .unwrap();
    let mut client = Client::connect(gw.addr).await;
    let sending = tokio::spawn(async move { client.fetch(upload).await });
    backend.body_reached().await;
    resume.send(()).unwrap();

    let reply = within(WAIT, sending).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let seen = backend.next_request().await;
    assert!(!seen.body_error);
    assert!(
        seen.body_check.is_pattern_of(BIG),
        "backend got {:?}",
        seen.body_check
    );
    // Unknown length from the client: chunked on both hops, never a guessed Content-Length.
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.header("content-length"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_64_mib_streams_through_without_buffering() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = Client::connect(gw.addr).await;
    let response = client
        .send(
            request("GET", "app.test", "/download")
                .header("x-reply-stream", BIG.to_string())
                .header("x-reply-stream-pause-at", MIB.to_string())
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    // The backend stops after 1 MiB until the client has received it: a gateway that buffered
    // the response would never deliver that first MiB.
    let mut body = response.into_body();
    let mut check = Check::default();
    let mut released = false;
    while let Some(frame) = within(WAIT, body.frame()).await {
        let frame = frame.expect("body frame");
        if let Ok(data) = frame.into_data() {
            check.feed(&data);
        }
        if !released && check.len >= MIB {
            backend.release();
            released = true;
        }
    }
    assert!(check.is_pattern_of(BIG), "client got {check:?}");
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    const REQUESTS: usize = 5;
    for i in 0..REQUESTS {
        // A new client connection each time: reuse is the gateway's, not the client's.
        let reply = get(gw.addr, "app.test", &format!("/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let connections: Vec<usize> = backend.requests().iter().map(|r| r.connection).collect();
    assert_eq!(connections.len(), REQUESTS);
    assert_eq!(
        backend.connections(),
        1,
        "sequential requests should share one upstream connection: {connections:?}"
    );
    assert!(gw.endpoint("app", 0).idle_connections() >= 1);
    assert_eq!(gw.endpoint("app", 0).active(), 0);
}

#[tokio::test]
async fn round_robin_alternates_between_servers() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "round_robin", &[a.addr, b.addr])
    );
    let gw = TestGateway::start(&config).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        let reply = get(gw.addr, "app.test", "/").await;
        order.push(reply.header("x-backend").unwrap().to_owned());
    }
    assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
    assert_eq!(a.requests().len(), 3);
    assert_eq!(b.requests().len(), 3);
}

#[tokio::test]
async fn refused_server_fails_over_to_the_next_one() {
    let (_reserved, dead) = dead_address();
    let live = HttpBackend::start("live").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "round_robin", &[dead, live.addr])
    );
    let gw = TestGateway::start(&config).await;
    // Round robin starts with the dead server, and then alternates: both orders are covered.
    for i in 0..4 {
        let mut client = Client::connect(gw.addr).await;
        let reply = client
            .fetch(
                request("POST", "app.test", &format!("/{i}"))
                    .body(full("must not be lost"))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
        assert_eq!(reply.header("x-backend"), Some("live"));
    }
    let seen = live.requests();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|r| r.body == "must not be lost"));
}

#[tokio::test]
async fn least_connections_sends_the_next_tunnel_to_the_less_loaded_server() {
    let a = WsBackend::start("a").await;
    let b = WsBackend::start("b").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "least_connections", &[a.addr, b.addr])
    );
    let gw = TestGateway::start(&config).await;
    let snapshot = gw.snapshot();
    let servers = snapshot.upstreams[0].endpoints();
    let names = ["a", "b"];
    let mut tunnels = Vec::new();
    for i in 0..5 {
        let load = [servers[0].tunnels(), servers[1].tunnels()];
        let (ws, response) = ws_connect(gw.addr, "/").await;
        let chosen = response.headers()["x-backend"].to_str().unwrap().to_owned();
        let index = names.iter().position(|n| *n == chosen).unwrap();
        assert!(
            load[index] <= load[1 - index],
            "tunnel {i} went to {chosen} with load {load:?}"
        );
        tunnels.push(ws);
    }
    // 5 tunnels over 2 servers by least connections: 3 and 2, never 4 and 1.
    let mut load = [servers[0].tunnels(), servers[1].tunnels()];
    load.sort_unstable();
    assert_eq!(load, [2, 3]);
    assert_eq!(gw.route_stats("app").tunnels_open.load(SeqCst), 5);
}

#[tokio::test]
async fn upgrade_websocket_without_connection_upgrade_is_plain_http() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let response = exchange(
        gw.addr,
        format!(
            "GET /chat HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n\r\n",
            ws::KEY
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    let seen = backend.next_request().await;
    assert!(!seen.headers.contains_key("upgrade"), "{:?}", seen.headers);
    assert!(!seen.headers.contains_key("connection"));
    assert_eq!(seen.header("sec-websocket-key"), Some(ws::KEY));
}

#[tokio::test]
async fn upgrade_to_a_protocol_the_route_does_not_allow_is_plain_http() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let response = exchange(
        gw.addr,
        "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    assert_eq!(response.status(), 200);
    let seen = backend.next_request().await;
    assert!(!seen.headers.contains_key("upgrade"), "{:?}", seen.headers);
    assert!(!seen.headers.contains_key("connection"));
}

/// RFC 9112 section 3.2: every HTTP/1.1 request carries Host (empty when there is no
/// authority). The gateway upgrades an HTTP/1.0 request without Host to HTTP/1.1 upstream, so
/// it must add one; strict backends (nginx) answer 400 otherwise.
#[tokio::test]
async fn http10_request_without_host_reaches_the_backend_with_a_host_header() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let response = exchange(gw.addr, "GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status(), 200);
    let seen = backend.next_request().await;
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(
        seen.headers.get_all("host").iter().count(),
        1,
        "an HTTP/1.1 request needs exactly one Host: {:?}",
        seen.headers
    );
}

#[tokio::test]
async fn head_response_has_no_body_and_frees_the_connection_for_reuse() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = Client::connect(gw.addr).await;
    let reply = client
        .fetch(request("HEAD", "app.test", "/doc").body(empty()).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(backend.next_request().await.method, "HEAD");
    let reply = client
        .fetch(request("GET", "app.test", "/doc").body(empty()).unwrap())
        .await;
    assert_eq!(reply.text(), "backend=a method=GET uri=/doc body_len=0\n");
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn client_abandoning_a_download_gives_the_lease_back() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let server = gw.endpoint("app", 0);
    let mut client = Client::connect(gw.addr).await;
    let response = client
        .send(
            request("GET", "app.test", "/download")
                .header("x-reply-stream", BIG.to_string())
                .header("x-reply-stream-pause-at", MIB.to_string())
                .body(empty())
                .unwrap(),
        )
        .await;
    let mut body = response.into_body();
    let mut check = Check::default();
    while check.len < MIB {
        let frame = within(WAIT, body.frame()).await.expect("more body");
        check.feed(&frame.expect("frame").into_data().unwrap_or_default());
    }
    assert_eq!(server.active(), 1);
    // The backend is stalled mid-body; the client hangs up.
    drop(body);
    drop(client);
    eventually("lease returned", || server.active() == 0).await;
    // A half-read response cannot be reused: that connection is not pooled.
    assert_eq!(server.idle_connections(), 0);
    assert_eq!(
        get(gw.addr, "app.test", "/next").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn backend_closing_connections_after_each_response_never_fails_a_request() {
    // One answers with `Connection: close`, the other just hangs up after each response.
    let polite = HttpBackend::start("polite").await;
    let abrupt = raw_backend(|mut stream| async move {
        let (head, _) = read_request_head(&mut stream).await;
        let path = head.split(' ').nth(1).unwrap_or("?").to_owned();
        let body = format!("abrupt {path}");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await;
    })
    .await;
    let config = format!(
        "[[route]]\nname = \"polite\"\npath = \"/polite\"\nupstream = \"polite\"\n\n\
         [[route]]\nname = \"abrupt\"\npath = \"/abrupt\"\nupstream = \"abrupt\"\n\n{}\n{}",
        upstream_config("polite", "round_robin", &[polite.addr]),
        upstream_config("abrupt", "round_robin", &[abrupt])
    );
    let gw = TestGateway::start(&config).await;
    let mut client = Client::connect(gw.addr).await;
    for i in 0..10 {
        let reply = client
            .fetch(
                request("GET", "app.test", &format!("/polite/{i}"))
                    .header("x-reply-header", "connection: close")
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "polite {i}: {}", reply.text());
        let reply = client
            .fetch(
                request("GET", "app.test", &format!("/abrupt/{i}"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "abrupt {i}: {}", reply.text());
        assert_eq!(reply.text(), format!("abrupt /abrupt/{i}"));
    }
    assert_eq!(polite.connections(), 10);
}

#[tokio::test]
async fn upstream_named_by_host_name_is_resolved() {
    let backend = HttpBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nservers = [\"localhost:{}\"]\n",
        backend.addr.port()
    );
    let gw = TestGateway::start(&config).await;
    let reply = get(gw.addr, "app.test", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        *gw.endpoint("app", 0).label,
        format!("localhost:{}", backend.addr.port())
    );
}

#[tokio::test]
async fn weighted_round_robin_follows_the_weights() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbalance = \"round_robin\"\n\
         servers = [{{ address = \"{}\", weight = 2 }}, \"{}\"]\n",
        a.addr, b.addr
    );
    let gw = TestGateway::start(&config).await;
    let mut order = String::new();
    for _ in 0..6 {
        order.push_str(
            get(gw.addr, "app.test", "/")
                .await
                .header("x-backend")
                .unwrap(),
        );
    }
    // Smooth weighted round robin interleaves instead of sending runs.
    assert_eq!(order, "abaaba");
}
