//! Client keep-alive connections between requests. wsgate parks an idle HTTP/1 connection
//! (hyper's buffers are dropped, the socket kept) and serves it afresh when the client sends
//! again; the client must not be able to tell: pipelining, requests and bodies split across a
//! pause, upgrades, TLS, and the idle timeout all behave as on a connection never parked.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};

use crate::support::raw::RawClient;
use crate::support::tls::{http1_over_tls, Pki};
use crate::support::ws::{frame, handshake, WsBackend, TEXT};
use crate::support::*;

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n")
}

fn answer(path: &str) -> String {
    format!("backend=a method=GET uri={path} body_len=0\n")
}

async fn parked(gw: &TestGateway, count: usize) {
    eventually(&format!("{count} connections parked"), || {
        gw.listener.parked.load(SeqCst) == count
    })
    .await;
}

/// A full exchange on a connection of its own: once it is answered, the gateway has run past
/// whatever another connection sent before it.
async fn exchange_elsewhere(gw: &TestGateway) {
    let mut other = RawClient::connect(gw.addr).await;
    other.send(get("/elsewhere")).await;
    assert_eq!(other.read_response().await.text(), answer("/elsewhere"));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_parked_and_served_again() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut client = RawClient::connect(gw.addr).await;
        let path = format!("/first/{i}");
        client.send(get(&path)).await;
        let response = client.read_response().await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_ne!(response.head.header("connection"), Some("close"));
        assert_eq!(response.text(), answer(&path));
        clients.push(client);
    }
    parked(&gw, 20).await;
    for round in 0..3 {
        for (i, client) in clients.iter_mut().enumerate() {
            let path = format!("/again/{i}/{round}");
            client.send(get(&path)).await;
            assert_eq!(client.read_response().await.text(), answer(&path));
        }
        parked(&gw, 20).await;
    }
    drop(clients);
    parked(&gw, 0).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_partial_one_waits_for_its_rest() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = RawClient::connect(gw.addr).await;
    let third = get("/3");
    let (start, rest) = third.split_at(10);
    client.send(get("/1") + &get("/2") + start).await;
    assert_eq!(client.read_response().await.text(), answer("/1"));
    assert_eq!(client.read_response().await.text(), answer("/2"));
    exchange_elsewhere(&gw).await;
    client.send(rest).await;
    assert_eq!(client.read_response().await.text(), answer("/3"));
    client.send(get("/4")).await;
    assert_eq!(client.read_response().await.text(), answer("/4"));
}

#[tokio::test]
async fn a_request_head_split_across_a_pause_is_served_on_a_fresh_and_on_a_parked_connection() {
    let backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = RawClient::connect(gw.addr).await;
    for path in ["/fresh", "/after-a-park"] {
        let request = get(path);
        let (start, rest) = request.split_at(request.len() / 2);
        client.send(start).await;
        exchange_elsewhere(&gw).await;
        client.send(rest).await;
        assert_eq!(client.read_response().await.text(), answer(path));
        parked(&gw, 1).await;
    }
}

#[tokio::test]
async fn a_request_body_split_across_a_pause_arrives_whole_and_the_connection_goes_on() {
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&proxy_config(&[backend.addr])).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(get("/before")).await;
    assert_eq!(client.read_response().await.text(), answer("/before"));
    parked(&gw, 1).await;
    client
        .send("POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\n01234")
        .await;
    exchange_elsewhere(&gw).await;
    client.send("56789").await;
    let response = client.read_response().await;
    assert_eq!(
        response.text(),
        "backend=a method=POST uri=/upload body_len=10\n"
    );
    let recorded = loop {
        let recorded = backend.next_request().await;
        if recorded.uri == "/upload" {
            break recorded;
        }
    };
    assert_eq!(recorded.body, Bytes::from_static(b"0123456789"));
    client.send(get("/after")).await;
    assert_eq!(client.read_response().await.text(), answer("/after"));
    parked(&gw, 1).await;
}

#[tokio::test]
async fn a_websocket_handshake_on_a_parked_connection_opens_a_tunnel_with_its_early_bytes() {
    let backend = HttpBackend::start("a").await;
    let ws = WsBackend::start("ws").await;
    let config = format!(
        "[[route]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"ws\"\n\n\
         [[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}\n{}",
        upstream_config("ws", "round_robin", &[ws.addr]),
        upstream_config("app", "round_robin", &[backend.addr]),
    );
    let gw = TestGateway::start(&config).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(get("/")).await;
    assert_eq!(client.read_response().await.text(), answer("/"));
    parked(&gw, 1).await;
    let mut bytes = handshake("app.test", "/ws", &[]).into_bytes();
    bytes.extend(frame(TEXT, b"sent with the handshake", true));
    client.send(bytes).await;
    let head = client.read_head().await;
    assert_eq!(head.status, 101, "{}", head.raw);
    let echo = frame(TEXT, b"sent with the handshake", false);
    assert_eq!(client.read_exact(echo.len()).await, echo);
    client.send(frame(TEXT, b"and after it", true)).await;
    let echo = frame(TEXT, b"and after it", false);
    assert_eq!(client.read_exact(echo.len()).await, echo);
    // A tunnel is not an idle HTTP connection.
    assert_eq!(gw.listener.parked.load(SeqCst), 0);
}

#[tokio::test]
async fn a_parked_connection_is_closed_silently_after_the_request_header_timeout() {
    let backend = HttpBackend::start("a").await;
    let config = format!(
        "[timeouts]\nrequest_header = \"1s\"\n\n{}",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(get("/")).await;
    assert_eq!(client.read_response().await.text(), answer("/"));
    let idle_from = Instant::now();
    parked(&gw, 1).await;
    assert_eq!(
        client.read_to_close().await,
        b"",
        "no bytes before the close"
    );
    assert!(
        idle_from.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the 1 s timeout",
        idle_from.elapsed()
    );
    parked(&gw, 0).await;
}

#[tokio::test]
async fn tls_keep_alive_connections_are_parked_and_served_again() {
    let backend = HttpBackend::start("a").await;
    let pki = Pki::new();
    let issued = pki.issue("a", &["a.test"]);
    let config = format!(
        "{}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n\n[listener.tls]\n\
         certificates = [{{ cert = {:?}, key = {:?} }}]\n",
        proxy_config(&[backend.addr]),
        issued.cert,
        issued.key
    );
    let gw = TestGateway::start(&config).await;
    let mut sender = http1_over_tls(gw.addr, "a.test", &pki).await;
    for round in 0..3 {
        let path = format!("/tls/{round}");
        let request = Request::get(&path)
            .header("host", "a.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = within(WAIT, sender.send_request(request)).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = within(WAIT, response.into_body().collect()).await.unwrap();
        assert_eq!(body.to_bytes(), answer(&path));
        parked(&gw, 1).await;
    }
}
