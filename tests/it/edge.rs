//! At the edge (issue 12): PROXY protocol behind an L4 balancer, trusted forwarding headers,
//! handshake policy (Origin, subprotocols), per-client limits and bounded resources.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::tls::{Issued, Pki};
use crate::support::*;
use crate::support::{raw, ws};

/// Another client than 127.0.0.1: it reaches the gateway through the `edge6` listener.
const SECOND_CLIENT: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// A listener `edge` on 127.0.0.1:0 with `keys`, in front of `rest` (routes, upstreams).
fn listener(keys: &str, rest: &str) -> String {
    format!("{rest}\n[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\n{keys}\n")
}

/// `listener`, plus `edge6` on [::1]:0 with the same `keys`, where SECOND_CLIENT connects.
fn listeners_for_two_clients(keys: &str, rest: &str) -> String {
    format!(
        "{}\n[[listener]]\nname = \"edge6\"\nbind = \"[::1]:0\"\n{keys}\n",
        listener(keys, rest)
    )
}

/// A connection from `from` to the listener of its address family (`edge6` for ::1).
async fn connect_as(gw: &TestGateway, from: IpAddr) -> RawClient {
    let listener = match from {
        IpAddr::V4(_) => gw.addr,
        IpAddr::V6(_) => gw.listener_addr("edge6"),
    };
    RawClient::connect_from(listener, from).await
}

/// PROXY protocol from 127.0.0.1 only, with a short header timeout.
const PROXY_KEYS: &str = "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]\n\
                          proxy_protocol_timeout = \"300ms\"\n";

fn tls_keys(issued: &Issued) -> String {
    format!(
        "\n[listener.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        issued.cert, issued.key
    )
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn v1(client: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} 127.0.0.1 {} 443\r\n",
        client.ip(),
        client.port()
    )
    .into_bytes()
}

fn v2(client: SocketAddr) -> Vec<u8> {
    let IpAddr::V4(ip) = client.ip() else {
        panic!("IPv4 only")
    };
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&ip.octets());
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&443u16.to_be_bytes());
    header
}

fn v2_local() -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x20, 0x00, 0, 0]);
    header
}

fn carried() -> SocketAddr {
    "203.0.113.9:40000".parse().unwrap()
}

/// The connection is closed without an answer (EOF or reset).
async fn assert_closed_unanswered(client: &mut RawClient) {
    let rest = client.read_to_close().await;
    assert!(
        rest.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

async fn proxied_gateway(keys: &str) -> (HttpBackend, TestGateway) {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&listener(keys, &proxy_config(&[backend.addr]))).await;
    (backend, gw)
}

#[tokio::test]
async fn proxy_v1_and_v2_from_a_trusted_peer_carry_the_client_address_upstream() {
    let (mut backend, gw) = proxied_gateway(PROXY_KEYS).await;
    for header in [v1(carried()), v2(carried())] {
        let mut client = RawClient::connect(gw.addr).await;
        let mut bytes = header.clone();
        bytes.extend_from_slice(GET);
        client.send(&bytes).await;
        assert_eq!(client.read_response().await.status(), 200);
        let seen = backend.next_request().await;
        assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));
    }
}

#[tokio::test]
async fn proxy_header_is_read_before_tls() {
    let backend_pki = Pki::new();
    let issued = backend_pki.issue("edge", &["app.test"]);
    let (mut backend, gw) = proxied_gateway(&format!("{PROXY_KEYS}{}", tls_keys(&issued))).await;
    for header in [v1(carried()), v2(carried())] {
        let mut stream = within(WAIT, TcpStream::connect(gw.addr)).await.unwrap();
        within(WAIT, stream.write_all(&header)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("app.test").unwrap();
        let connector = tokio_rustls::TlsConnector::from(backend_pki.client_config(&[b"http/1.1"]));
        let mut tls = within(WAIT, connector.connect(name, stream))
            .await
            .expect("TLS after the PROXY header");
        within(WAIT, tls.write_all(GET)).await.unwrap();
        let mut answer = Vec::new();
        let _ = within(WAIT, tls.read_to_end(&mut answer)).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        let seen = backend.next_request().await;
        assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));
    }
}

#[tokio::test]
async fn proxy_v2_local_keeps_the_socket_address() {
    let (mut backend, gw) = proxied_gateway(PROXY_KEYS).await;
    let mut client = RawClient::connect(gw.addr).await;
    let mut bytes = v2_local();
    bytes.extend_from_slice(GET);
    client.send(&bytes).await;
    assert_eq!(client.read_response().await.status(), 200);
    let seen = backend.next_request().await;
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_peer_closes_the_connection_unread() {
    let backend = HttpBackend::start("a").await;
    let config = listeners_for_two_clients(PROXY_KEYS, &proxy_config(&[backend.addr]));
    let gw = TestGateway::start(&config).await;
    let mut client = connect_as(&gw, SECOND_CLIENT).await;
    let mut bytes = v1(carried());
    bytes.extend_from_slice(GET);
    client.send(&bytes).await;
    assert_closed_unanswered(&mut client).await;
    let failures = gw
        .listener_stats("edge6")
        .proxy_header_failures
        .load(Ordering::Relaxed);
    assert_eq!(failures, 1);
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn a_missing_malformed_or_truncated_proxy_header_closes_the_connection() {
    let (backend, gw) = proxied_gateway(PROXY_KEYS).await;
    let malformed: &[&[u8]] = &[
        GET,
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 443\r\n",
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
    ];
    for bytes in malformed {
        let mut client = RawClient::connect(gw.addr).await;
        client.send(bytes).await;
        assert_closed_unanswered(&mut client).await;
    }
    // Truncated: the peer closes its side inside the header.
    for bytes in [&b"PROXY TCP4 1.2.3.4"[..], &v2(carried())[..20]] {
        let mut client = RawClient::connect(gw.addr).await;
        client.send(bytes).await;
        client.shutdown_write().await;
        assert_closed_unanswered(&mut client).await;
    }
    eventually("five failures counted", || {
        gw.listener.proxy_header_failures.load(Ordering::Relaxed) == 5
    })
    .await;
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn a_proxy_header_arriving_byte_by_byte_is_read_whole() {
    let (mut backend, gw) = proxied_gateway(PROXY_KEYS).await;
    for header in [v1(carried()), v2(carried())] {
        let mut client = RawClient::connect(gw.addr).await;
        for byte in &header {
            client.send([*byte]).await;
        }
        client.send(GET).await;
        assert_eq!(client.read_response().await.status(), 200);
        let seen = backend.next_request().await;
        assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));
    }
}

#[tokio::test]
async fn a_proxy_header_that_never_arrives_times_out() {
    let (backend, gw) = proxied_gateway(PROXY_KEYS).await;
    let mut client = RawClient::connect(gw.addr).await;
    // Says nothing: closed after proxy_protocol_timeout (300ms), well within WAIT.
    assert_closed_unanswered(&mut client).await;
    assert_eq!(gw.listener.proxy_header_failures.load(Ordering::Relaxed), 1);
    assert_eq!(backend.connections(), 0);
}

const SPOOFED: &[u8] = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.9\r\n\
X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed.test\r\nForwarded: for=203.0.113.9\r\n\
Connection: close\r\n\r\n";

#[tokio::test]
async fn forwarding_headers_are_replaced_from_an_untrusted_peer_and_kept_from_a_trusted_one() {
    let mut backend = HttpBackend::start("a").await;
    let keys = "trusted_proxies = [\"127.0.0.1/32\"]\n";
    let config = listeners_for_two_clients(keys, &proxy_config(&[backend.addr]));
    let gw = TestGateway::start(&config).await;

    let mut spoofer = connect_as(&gw, SECOND_CLIENT).await;
    spoofer.send(SPOOFED).await;
    assert_eq!(spoofer.read_response().await.status(), 200);
    let seen = backend.next_request().await;
    assert_eq!(seen.header("x-forwarded-for"), Some("::1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.test"));
    // RFC 7239 §6: an IPv6 node is bracketed and quoted.
    assert_eq!(
        seen.header("forwarded"),
        Some("for=\"[::1]\";host=app.test;proto=http")
    );

    let mut proxy = RawClient::connect(gw.addr).await;
    proxy.send(SPOOFED).await;
    assert_eq!(proxy.read_response().await.status(), 200);
    let seen = backend.next_request().await;
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("spoofed.test"));
    assert_eq!(
        seen.header("forwarded"),
        Some("for=203.0.113.9, for=127.0.0.1;host=app.test;proto=http")
    );
}

/// Routes `/ws` (origins checked on handshakes), `/strict` (on every request), `/sub`
/// (subprotocols refused when none is left) and `/subfwd` (forwarded without them).
fn policy_config(backend: SocketAddr) -> String {
    let origins = "allowed_origins = [\"https://app.example.com\", \"https://*.example.net\"]";
    format!(
        "[[route]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"app\"\n{origins}\n\
         allow_missing_origin = false\n\n\
         [[route]]\nname = \"strict\"\npath = \"/strict\"\nupstream = \"app\"\n{origins}\n\
         origin_check = \"all\"\n\n\
         [[route]]\nname = \"sub\"\npath = \"/sub\"\nupstream = \"app\"\n\
         subprotocols = [\"chat.v2\", \"chat.v3\"]\n\n\
         [[route]]\nname = \"subfwd\"\npath = \"/subfwd\"\nupstream = \"app\"\n\
         subprotocols = [\"chat.v2\"]\nsubprotocol_unmatched = \"forward\"\n\n{}",
        upstream_config("app", "least_connections", &[backend])
    )
}

/// Sends a handshake for `path` with `extra` lines; the backend (plain HTTP) answers 200,
/// which the gateway relays: enough to see what reached it.
async fn handshake_status(gw: &TestGateway, path: &str, extra: &[&str]) -> u16 {
    let mut client = RawClient::connect(gw.addr).await;
    client.send(ws::handshake("app.test", path, extra)).await;
    client.read_response().await.status()
}

#[tokio::test]
async fn a_handshake_from_another_origin_gets_403_and_never_reaches_the_backend() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&policy_config(backend.addr)).await;
    let refused: &[&[&str]] = &[
        &["Origin: https://evil.example.com"],
        // The wildcard covers subdomains, not the bare domain.
        &["Origin: https://example.net"],
        &["Origin: http://app.example.com"],
        // allow_missing_origin = false.
        &[],
    ];
    for extra in refused {
        assert_eq!(handshake_status(&gw, "/ws", extra).await, 403, "{extra:?}");
    }
    assert_eq!(
        backend.connections(),
        0,
        "the backend saw a refused handshake"
    );

    // Plain HTTP is not checked on a handshake-only route, and is on an "all" one.
    let mut client = RawClient::connect(gw.addr).await;
    client
        .send("GET /ws HTTP/1.1\r\nHost: app.test\r\nOrigin: https://evil.example.com\r\n\r\n")
        .await;
    assert_eq!(client.read_response().await.status(), 200);
    backend.next_request().await;
    client
        .send("GET /strict HTTP/1.1\r\nHost: app.test\r\nOrigin: https://evil.example.com\r\n\r\n")
        .await;
    assert_eq!(client.read_response().await.status(), 403);

    for origin in ["https://app.example.com", "https://a.b.example.net"] {
        let line = format!("Origin: {origin}");
        assert_eq!(handshake_status(&gw, "/ws", &[&line]).await, 200);
        let seen = backend.next_request().await;
        assert_eq!(seen.header("origin"), Some(origin));
    }
}

#[tokio::test]
async fn subprotocol_offers_outside_the_allowlist_are_removed_or_refused() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&policy_config(backend.addr)).await;
    let offers = "Sec-WebSocket-Protocol: x.evil, chat.v3";
    let more = "Sec-WebSocket-Protocol: chat.v2";
    assert_eq!(handshake_status(&gw, "/sub", &[offers, more]).await, 200);
    let seen = backend.next_request().await;
    assert_eq!(
        seen.header("sec-websocket-protocol"),
        Some("chat.v3, chat.v2")
    );

    // Nothing offered: untouched.
    assert_eq!(handshake_status(&gw, "/sub", &[]).await, 200);
    let seen = backend.next_request().await;
    assert_eq!(seen.header("sec-websocket-protocol"), None);

    // Offers, none allowed: refused, or forwarded without the header.
    let none = "Sec-WebSocket-Protocol: x.evil";
    assert_eq!(handshake_status(&gw, "/sub", &[none]).await, 400);
    assert_eq!(
        backend.connections(),
        1,
        "only the accepted handshakes' connection"
    );
    assert_eq!(handshake_status(&gw, "/subfwd", &[none]).await, 200);
    let seen = backend.next_request().await;
    assert_eq!(seen.header("sec-websocket-protocol"), None);
}

/// Routes `one` (at most one tunnel per client) and `two`, to a WebSocket echo backend.
fn limits_config(limits: &str, backend: SocketAddr) -> String {
    format!(
        "[limits.per_client]\n{limits}\n\n\
         [[route]]\nname = \"one\"\npath = \"/one\"\nupstream = \"app\"\nmax_tunnels_per_client = 1\n\n\
         [[route]]\nname = \"two\"\npath = \"/two\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "least_connections", &[backend])
    )
}

/// A bucket of one token per 10 s was empty: whole seconds until the next, 1 to 10.
fn assert_retry_after_within_10_s(head: &raw::Head) {
    let retry: u64 = head
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!((1..=10).contains(&retry), "Retry-After: {retry}");
}

/// A handshake for `path` from `from`; the connection is returned open (a tunnel, on 101).
async fn open_handshake(gw: &TestGateway, from: IpAddr, path: &str) -> (raw::Head, RawClient) {
    let mut client = connect_as(gw, from).await;
    client.send(ws::handshake("app.test", path, &[])).await;
    (client.read_head().await, client)
}

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[tokio::test]
async fn handshakes_over_the_rate_get_429_with_retry_after_while_another_client_is_served() {
    let backend = WsBackend::start("ws").await;
    // One token per 10 s, two in the bucket: the third handshake at once is over the rate.
    let config = limits_config(
        "handshakes_per_second = 0.1\nhandshake_burst = 2",
        backend.addr,
    );
    let gw = TestGateway::start(&listeners_for_two_clients("", &config)).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let (head, client) = open_handshake(&gw, LOCAL, "/two").await;
        assert_eq!(head.status, 101);
        open.push(client);
    }
    let (head, _) = open_handshake(&gw, LOCAL, "/two").await;
    assert_eq!(head.status, 429);
    assert_retry_after_within_10_s(&head);
    // Plain HTTP does not spend handshake tokens.
    let mut client = RawClient::connect(gw.addr).await;
    client.send(GET).await;
    assert_ne!(client.read_response().await.status(), 429);

    let (head, _other) = open_handshake(&gw, SECOND_CLIENT, "/two").await;
    assert_eq!(
        head.status, 101,
        "another client address has its own bucket"
    );
}

#[tokio::test]
async fn requests_over_the_rate_get_429_with_retry_after_while_another_client_is_served() {
    let backend = HttpBackend::start("a").await;
    // Plain requests have their own bucket: one token per 10 s, two at once.
    let config = limits_config(
        "requests_per_second = 0.1\nrequest_burst = 2\nhandshakes_per_second = 100",
        backend.addr,
    );
    let gw = TestGateway::start(&listeners_for_two_clients("", &config)).await;
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    for _ in 0..2 {
        let mut client = RawClient::connect_from(gw.addr, LOCAL).await;
        client.send(get("/two")).await;
        assert_eq!(client.read_response().await.status(), 200);
    }
    let mut client = RawClient::connect_from(gw.addr, LOCAL).await;
    client.send(get("/two/over")).await;
    let refused = client.read_response().await;
    assert_eq!(refused.status(), 429, "{}", refused.head.raw);
    assert_retry_after_within_10_s(&refused.head);
    assert!(
        backend.requests().iter().all(|r| r.uri != "/two/over"),
        "the refused request reached the backend"
    );
    let mut other = connect_as(&gw, SECOND_CLIENT).await;
    other.send(get("/two")).await;
    assert_eq!(
        other.read_response().await.status(),
        200,
        "another client address has its own bucket"
    );
}

#[tokio::test]
async fn open_tunnels_per_client_are_limited_per_route_and_in_total() {
    let backend = WsBackend::start("ws").await;
    let config = limits_config("max_tunnels = 2", backend.addr);
    let gw = TestGateway::start(&listeners_for_two_clients("", &config)).await;
    let (head, _first) = open_handshake(&gw, LOCAL, "/one").await;
    assert_eq!(head.status, 101);
    let (head, _) = open_handshake(&gw, LOCAL, "/one").await;
    assert_eq!(head.status, 429, "max_tunnels_per_client on route one");
    let (head, _second) = open_handshake(&gw, LOCAL, "/two").await;
    assert_eq!(head.status, 101);
    let (head, _) = open_handshake(&gw, LOCAL, "/two").await;
    assert_eq!(head.status, 429, "max_tunnels in total");
    let (head, _other) = open_handshake(&gw, SECOND_CLIENT, "/one").await;
    assert_eq!(head.status, 101, "another client address is still served");

    // A closed tunnel gives its place back.
    drop(_first);
    eventually("route one's tunnel closed", || {
        gw.route_stats("one").tunnels_open.load(Ordering::Relaxed) == 1
    })
    .await;
    let (head, _again) = open_handshake(&gw, LOCAL, "/one").await;
    assert_eq!(head.status, 101);
}

#[tokio::test]
async fn a_route_s_response_timeout_overrides_the_global_one() {
    let mut backend = HttpBackend::start("a").await;
    let config = format!(
        "[timeouts]\nupstream_response_header = \"300ms\"\n\n\
         [[route]]\nname = \"export\"\npath = \"/export\"\nupstream = \"app\"\n\
         timeouts = {{ upstream_response_header = \"30s\" }}\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let held = |path: &str| {
        request("GET", "app.test", path)
            .header("x-reply-hold", "1")
            .body(empty())
            .unwrap()
    };
    let mut export = Client::connect(gw.addr).await;
    let slow_export = tokio::spawn(async move { export.fetch(held("/export")).await.status });
    backend.next_request().await;
    // The same slow backend on another route: the global 300ms applies there...
    let mut api = Client::connect(gw.addr).await;
    assert_eq!(api.fetch(held("/api")).await.status, 504);
    backend.next_request().await;
    // ...while the export, held all that time, still gets its answer.
    backend.release();
    backend.release();
    let status = within(WAIT, slow_export).await.expect("export task");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn max_connections_holds_under_silent_tls_clients_and_serves_once_they_time_out() {
    let pki = Pki::new();
    let issued = pki.issue("edge", &["app.test"]);
    let backend = HttpBackend::start("a").await;
    let keys = format!("max_connections = 2\n{}", tls_keys(&issued));
    let config = format!(
        "[timeouts]\ntls_handshake = \"300ms\"\n\n{}",
        listener(&keys, &proxy_config(&[backend.addr]))
    );
    let gw = TestGateway::start(&config).await;
    // Five clients that never say hello: two are served (and time out), three wait unaccepted.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(within(WAIT, TcpStream::connect(gw.addr)).await.unwrap());
    }
    let stream = within(WAIT, TcpStream::connect(gw.addr)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(&[b"http/1.1"]));
    let mut tls = within(WAIT, connector.connect(name, stream))
        .await
        .expect("served once the silent clients time out");
    // Accepted only after two rounds of two silent clients timed out.
    assert!(gw.listener.tls_failures.load(Ordering::Relaxed) >= 4);
    within(WAIT, tls.write_all(GET)).await.unwrap();
    let mut answer = Vec::new();
    let _ = within(WAIT, tls.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn a_body_over_the_route_s_max_request_body_gets_413() {
    let mut backend = HttpBackend::start("a").await;
    let config = format!(
        "[[route]]\nname = \"upload\"\npath = \"/upload\"\nupstream = \"app\"\n\
         max_request_body = 1024\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    // A declared length is refused before any backend is contacted.
    let reply = raw::exchange(
        gw.addr,
        "POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2048\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status(), 413);
    assert_eq!(backend.connections(), 0);

    // Within the limit, and on another route, bodies pass.
    let mut client = Client::connect(gw.addr).await;
    let ok = request("POST", "app.test", "/upload")
        .body(full(vec![b'a'; 1024]))
        .unwrap();
    assert_eq!(client.fetch(ok).await.status, 200);
    backend.next_request().await;
    let other = request("POST", "app.test", "/other")
        .body(full(vec![b'a'; 4096]))
        .unwrap();
    assert_eq!(client.fetch(other).await.status, 200);
    backend.next_request().await;

    // A chunked body is cut where it crosses the limit.
    let mut chunked =
        b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                        400\r\n"
            .to_vec();
    chunked.extend_from_slice(&[b'a'; 1024]);
    chunked.extend_from_slice(b"\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n");
    let reply = raw::exchange(gw.addr, chunked).await;
    assert_eq!(reply.status(), 413);
    assert!(reply.text().starts_with("413 "), "{}", reply.text());
}

#[tokio::test]
async fn a_backend_choosing_a_subprotocol_outside_the_allowlist_gets_502() {
    let (addr, _upgraded) = raw::upgraded_backend("Sec-WebSocket-Protocol: x.evil").await;
    let gw = TestGateway::start(&policy_config(addr)).await;
    let offer = "Sec-WebSocket-Protocol: chat.v2";
    assert_eq!(handshake_status(&gw, "/sub", &[offer]).await, 502);
}

#[tokio::test]
async fn a_reload_keeps_the_clients_tunnel_counts() {
    let backend = WsBackend::start("ws").await;
    let config = limits_config("max_tunnels = 1", backend.addr);
    let gw = TestGateway::start(&config).await;
    let (head, _open) = open_handshake(&gw, LOCAL, "/two").await;
    assert_eq!(head.status, 101);
    gw.reload(&config).await.expect("same config reloads");
    let (head, _) = open_handshake(&gw, LOCAL, "/two").await;
    assert_eq!(
        head.status, 429,
        "the tunnel opened before the reload still counts"
    );
}

#[tokio::test]
async fn limits_count_the_address_a_proxy_header_carried() {
    let backend = WsBackend::start("ws").await;
    let rest = limits_config(
        "handshakes_per_second = 0.1\nhandshake_burst = 1",
        backend.addr,
    );
    let gw = TestGateway::start(&listener(PROXY_KEYS, &rest)).await;
    let other: SocketAddr = "198.51.100.4:1234".parse().unwrap();
    let mut open = Vec::new();
    for (client, expected) in [(carried(), 101), (carried(), 429), (other, 101)] {
        let mut connection = RawClient::connect(gw.addr).await;
        let mut bytes = v1(client);
        bytes.extend_from_slice(ws::handshake("app.test", "/two", &[]).as_bytes());
        connection.send(&bytes).await;
        assert_eq!(connection.read_head().await.status, expected, "{client}");
        open.push(connection);
    }
}
