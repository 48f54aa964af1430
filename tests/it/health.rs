//! The health of upstream servers over real sockets: active checks (GET and WebSocket) take a
//! server out and bring it back, passive ejection follows connect failures and 5xx answers,
//! a group with no healthy server still serves (fail open), tunnels close with 1012 only when
//! asked, health carries over a reload, and each change is logged once.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

use crate::support::binary::{Gateway, TempFile};
use crate::support::health::HealthBackend;
use crate::support::ws::WsStream;
use crate::support::*;

/// Quick checks, so that a state change takes a fraction of a second.
const CHECKS: &str = "[upstream.health]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n";

fn checked(balance: &str, servers: &[SocketAddr], extra: &str) -> String {
    format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}{extra}",
        upstream_config("app", balance, servers)
    )
}

async fn backend_of(gw: &TestGateway) -> String {
    let reply = get(gw.addr, "app.test", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.header("x-backend").expect("x-backend").to_owned()
}

#[tokio::test]
async fn active_checks_take_a_silent_server_out_and_bring_it_back() {
    let a = HealthBackend::start("a").await;
    let b = HealthBackend::start("b").await;
    let gw = TestGateway::start(&checked("round_robin", &[a.addr, b.addr], CHECKS)).await;
    let server_a = gw.endpoint("app", 0);
    eventually("both servers are checked", || {
        a.checks() >= 2 && b.checks() >= 2
    })
    .await;
    assert!(server_a.health.is_usable());

    a.fall_silent();
    eventually("a is down", || server_a.health.is_down()).await;
    let requests_before = a.requests();
    for _ in 0..6 {
        // A request sent to the silent server would hang until `within` gives up.
        assert_eq!(backend_of(&gw).await, "b");
    }
    assert_eq!(a.requests(), requests_before, "a got nothing while down");

    a.answer_checks_with(200);
    eventually("a is back", || !server_a.health.is_down()).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(backend_of(&gw).await);
    }
    assert!(seen.iter().any(|s| s == "a"), "a serves again: {seen:?}");
}

#[tokio::test]
async fn a_status_outside_the_expected_range_fails_the_check() {
    let a = HealthBackend::start("a").await;
    let b = HealthBackend::start("b").await;
    let config = checked(
        "round_robin",
        &[a.addr, b.addr],
        &CHECKS.replace("fall = 2\n", "fall = 2\nstatus = \"200-204\"\n"),
    );
    let gw = TestGateway::start(&config).await;
    let server_a = gw.endpoint("app", 0);
    eventually("a is checked", || a.checks() >= 2).await;
    // 299 would pass the default range; this upstream only takes 200-204.
    a.answer_checks_with(299);
    eventually("a is down", || server_a.health.is_down()).await;
    for _ in 0..4 {
        assert_eq!(backend_of(&gw).await, "b");
    }
    a.answer_checks_with(204);
    eventually("a is back", || !server_a.health.is_down()).await;
}

#[tokio::test]
async fn a_websocket_check_passes_on_101_and_fails_on_anything_else() {
    let ws_only = WsBackend::start("ws").await;
    let http_only = HttpBackend::start("http").await;
    let config = checked(
        "round_robin",
        &[ws_only.addr, http_only.addr],
        &CHECKS.replace(
            "path = \"/healthz\"\n",
            "path = \"/live\"\nwebsocket = true\n",
        ),
    );
    let gw = TestGateway::start(&config).await;
    let (ws_server, http_server) = (gw.endpoint("app", 0), gw.endpoint("app", 1));
    // The HTTP backend answers the handshake with a 200: down from its first check.
    eventually("the HTTP-only server is down", || {
        http_server.health.is_down()
    })
    .await;
    eventually("checks keep passing on the WebSocket server", || {
        http_only.requests().len() >= 3
    })
    .await;
    assert!(!ws_server.health.is_down());
    let (mut ws, response) = ws_connect(gw.addr, "/chat").await;
    assert_eq!(response.headers()["x-backend"], "ws");
    echo(&mut ws, "over a checked server").await;
}

#[tokio::test]
async fn passive_ejection_follows_connect_failures_and_ends_when_its_time_is_up() {
    let (_reserved, dead) = dead_address();
    let live = HttpBackend::start("live").await;
    let config = checked(
        "round_robin",
        &[dead, live.addr],
        "[upstream.passive]\nfail = 2\neject = \"1s\"\n",
    );
    let gw = TestGateway::start(&config).await;
    let dead_server = gw.endpoint("app", 0);
    // Round robin offers the dead server every other request; each fails over to the live one.
    for _ in 0..4 {
        assert_eq!(backend_of(&gw).await, "live");
        if dead_server.health.is_ejected() {
            break;
        }
    }
    assert!(
        dead_server.health.is_ejected(),
        "ejected after two refused connects"
    );
    eventually("the ejection ends", || dead_server.health.is_usable()).await;
}

#[tokio::test]
async fn passive_ejection_follows_5xx_answers() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let config = checked(
        "round_robin",
        &[a.addr, b.addr],
        "[upstream.passive]\nfail = 2\neject = \"60s\"\n",
    );
    let gw = TestGateway::start(&config).await;
    let server_a = gw.endpoint("app", 0);
    // Round robin: a, b, a answer 503; a's second one ejects it, b has one failure.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(gw.addr).await;
        let reply = client
            .fetch(
                request("GET", "app.test", "/")
                    .header("x-reply-status", "503")
                    .body(empty())
                    .unwrap(),
            )
            .await;
        statuses.push(reply.status);
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "5xx answers are relayed"
    );
    assert!(server_a.health.is_ejected());
    let b_before = b.requests().len();
    for _ in 0..4 {
        assert_eq!(backend_of(&gw).await, "b");
    }
    assert_eq!(b.requests().len(), b_before + 4);
    // b answered 200 since its one 503: its count started again.
    assert!(!gw.endpoint("app", 1).health.is_ejected());
}

#[tokio::test]
async fn with_every_server_unhealthy_requests_are_still_tried() {
    let a = HealthBackend::start("a").await;
    let b = HealthBackend::start("b").await;
    a.answer_checks_with(503);
    b.answer_checks_with(503);
    let gw = TestGateway::start(&checked("least_connections", &[a.addr, b.addr], CHECKS)).await;
    let (server_a, server_b) = (gw.endpoint("app", 0), gw.endpoint("app", 1));
    eventually("both are down", || {
        server_a.health.is_down() && server_b.health.is_down()
    })
    .await;
    // Failing open: the checks may be wrong, and an answer beats a certain 502.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(backend_of(&gw).await);
    }
    assert!(
        seen.contains(&"a".to_owned()) && seen.contains(&"b".to_owned()),
        "{seen:?}"
    );
}

async fn echo(ws: &mut WsStream, text: &str) {
    within(WAIT, ws.send(Message::text(text)))
        .await
        .expect("send");
    let reply = within(WAIT, ws.next())
        .await
        .expect("a reply")
        .expect("a message");
    assert_eq!(reply, Message::text(text));
}

async fn close_code(ws: &mut WsStream) -> u16 {
    for _ in 0..16 {
        match within(WAIT, ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code.into(),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return 0,
            Some(Ok(_)) => continue,
        }
    }
    panic!("no close frame among 16 messages");
}

#[tokio::test]
async fn an_unhealthy_server_s_tunnels_close_with_1012_only_when_the_upstream_asks() {
    for close in [true, false] {
        let a = HealthBackend::start("a").await;
        let b = HealthBackend::start("b").await;
        let extra = format!("close_tunnels_on_unhealthy = {close}\n{CHECKS}");
        let config = format!(
            "[reload]\nclose_spread = \"200ms\"\n\n{}",
            checked("round_robin", &[a.addr, b.addr], &extra)
        );
        let gw = TestGateway::start(&config).await;
        eventually("a is checked", || a.checks() >= 2).await;
        let (mut on_a, first) = ws_connect(gw.addr, "/").await;
        let (mut on_b, second) = ws_connect(gw.addr, "/").await;
        assert_eq!(first.headers()["x-backend"], "a");
        assert_eq!(second.headers()["x-backend"], "b");
        a.answer_checks_with(503);
        let server_a = gw.endpoint("app", 0);
        eventually("a is down", || server_a.health.is_down()).await;
        if close {
            assert_eq!(close_code(&mut on_a).await, 1012, "Service Restart");
        } else {
            echo(&mut on_a, "a's tunnel stays").await;
        }
        echo(&mut on_b, "b's tunnel stays").await;
        // Back up, a takes new tunnels that a later check does not close.
        a.answer_checks_with(200);
        eventually("a is back", || !server_a.health.is_down()).await;
        let (mut later, response) = ws_connect(gw.addr, "/").await;
        let later_server = response.headers()["x-backend"].to_str().unwrap().to_owned();
        let checks = a.checks();
        eventually("a few more checks", || a.checks() >= checks + 4).await;
        echo(&mut later, &format!("{later_server} after the recovery")).await;
    }
}

#[tokio::test]
async fn an_ejected_server_s_tunnels_close_with_1012_when_the_upstream_asks() {
    let a = HealthBackend::start("a").await;
    let b = HealthBackend::start("b").await;
    let config = format!(
        "[reload]\nclose_spread = \"200ms\"\n\n{}",
        checked(
            "round_robin",
            &[a.addr, b.addr],
            "close_tunnels_on_unhealthy = true\n[upstream.passive]\nfail = 1\neject = \"60s\"\n"
        )
    );
    let gw = TestGateway::start(&config).await;
    let (mut on_a, response) = ws_connect(gw.addr, "/").await;
    assert_eq!(response.headers()["x-backend"], "a");
    let (mut on_b, response) = ws_connect(gw.addr, "/").await;
    assert_eq!(response.headers()["x-backend"], "b");
    // Round robin's next request is a's: its 500 ejects it.
    let mut client = Client::connect(gw.addr).await;
    let reply = client
        .fetch(
            request("GET", "app.test", "/")
                .header("x-reply-status", "500")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.header("x-backend"), Some("a"));
    assert!(gw.endpoint("app", 0).health.is_ejected());
    assert_eq!(close_code(&mut on_a).await, 1012, "Service Restart");
    echo(&mut on_b, "b's tunnel stays").await;
}

#[tokio::test]
async fn a_key_whose_server_is_down_goes_to_the_next_in_its_hash_order_and_comes_back() {
    use wsgate::upstream::balance::{rendezvous_order, stable_hash};
    let backends = [
        HealthBackend::start("a").await,
        HealthBackend::start("b").await,
        HealthBackend::start("c").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = checked("round_robin", &addrs, CHECKS).replace(
        "balance = \"round_robin\"",
        "balance = \"hash\"\nhash_key = \"query:room\"",
    );
    let gw = TestGateway::start(&config).await;
    // Each server is hashed by its configured address, as every instance would.
    let servers: Vec<(u64, u32)> = addrs
        .iter()
        .map(|a| (stable_hash(a.to_string().as_bytes()), 1))
        .collect();
    let order = rendezvous_order(stable_hash(b"lobby"), &servers);
    let names = ["a", "b", "c"];
    let (owner, next) = (order[0], order[1]);
    let room = |gw: &TestGateway| {
        let addr = gw.addr;
        async move {
            let reply = get(addr, "app.test", "/?room=lobby").await;
            reply.header("x-backend").expect("x-backend").to_owned()
        }
    };
    assert_eq!(room(&gw).await, names[owner]);
    eventually("the owner is checked", || backends[owner].checks() >= 2).await;
    backends[owner].answer_checks_with(503);
    let owner_server = gw.endpoint("app", owner);
    eventually("the owner is down", || owner_server.health.is_down()).await;
    for _ in 0..3 {
        assert_eq!(room(&gw).await, names[next], "the next in the key's order");
    }
    backends[owner].answer_checks_with(200);
    eventually("the owner is back", || !owner_server.health.is_down()).await;
    assert_eq!(room(&gw).await, names[owner], "the key returns");
}

#[tokio::test]
async fn health_carries_over_a_reload_for_servers_that_stay() {
    let a = HealthBackend::start("a").await;
    let b = HealthBackend::start("b").await;
    let config = checked("round_robin", &[a.addr, b.addr], CHECKS);
    let gw = TestGateway::start(&config).await;
    a.answer_checks_with(503);
    let server_a = gw.endpoint("app", 0);
    eventually("a is down", || server_a.health.is_down()).await;
    // Slower checks after the reload: a stays down from the start, not healthy until checked.
    let slower = config.replace("interval = \"50ms\"", "interval = \"1h\"");
    gw.reload(&slower).await.expect("reload");
    let kept = gw.endpoint("app", 0);
    assert!(
        std::sync::Arc::ptr_eq(&kept, &server_a),
        "the server carried over"
    );
    assert!(kept.health.is_down());
    for _ in 0..4 {
        assert_eq!(backend_of(&gw).await, "b");
    }
}

#[test]
fn a_server_going_down_and_up_is_logged_once_each_way_with_the_reason() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let a = runtime.block_on(HealthBackend::start("a"));
    let config = TempFile::new(
        "health.toml",
        &format!(
            "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n\n{}",
            checked("round_robin", &[a.addr], CHECKS)
        ),
    );
    let mut gateway = Gateway::spawn(&config.path);
    gateway.listening_address();
    a.answer_checks_with(503);
    let down = gateway.wait_for_line("upstream server is down");
    assert!(down.contains("status 503"), "{down}");
    assert!(down.contains(&a.addr.to_string()), "{down}");
    // Many more failing checks, then the recovery: still one line for the fall.
    let checks = a.checks();
    runtime.block_on(eventually("ten more checks", || a.checks() >= checks + 10));
    a.answer_checks_with(200);
    let up = gateway.wait_for_line("upstream server is up");
    assert!(up.contains(&a.addr.to_string()), "{up}");
    let downs = gateway
        .log
        .iter()
        .filter(|l| l.contains("upstream server is down"))
        .count();
    assert_eq!(downs, 1, "{:#?}", gateway.log);
}
