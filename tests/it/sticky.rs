//! Sticky routing without shared state: `balance = "hash"` on each kind of key, and the sticky
//! cookie, over real sockets. Each request below opens a fresh connection, as a reconnecting
//! client does, so that nothing but the key or cookie can keep it on its server.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use http::StatusCode;

use crate::support::client::Reply;
use crate::support::*;

const SECRET: &str = "a shared secret of some length";

fn hashed(key: &str, servers: &[SocketAddr]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n[[upstream]]\nname = \"app\"\n\
         balance = \"hash\"\nhash_key = \"{key}\"\nservers = [{}]\n",
        list.join(", ")
    )
}

fn sticky(balance: &str, servers: &[SocketAddr]) -> String {
    format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}sticky = {{ cookie = \"srv\", secret = \"{SECRET}\" }}\n",
        upstream_config("app", balance, servers)
    )
}

/// The backend that answers `GET path` with `headers`, on a fresh connection, and the reply.
async fn fetch_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = request("GET", "app.test", path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let reply = Client::connect(addr)
        .await
        .fetch(builder.body(empty()).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    reply
}

async fn backend_for(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let reply = fetch_with(addr, path, headers).await;
    reply.header("x-backend").expect("x-backend").to_owned()
}

async fn three_backends() -> [HttpBackend; 3] {
    [
        HttpBackend::start("a").await,
        HttpBackend::start("b").await,
        HttpBackend::start("c").await,
    ]
}

#[tokio::test]
async fn hash_on_a_query_key_keeps_every_key_on_one_server() {
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let gw = TestGateway::start(&hashed("query:user", &addrs)).await;
    let mut owners = HashMap::new();
    for round in 0..3 {
        for k in 0..20 {
            let path = format!("/socket.io/?EIO=4&user=u{k}&t={round}");
            let server = backend_for(gw.addr, &path, &[]).await;
            let first = owners.entry(k).or_insert_with(|| server.clone());
            assert_eq!(*first, server, "key u{k} moved in round {round}");
        }
    }
    let used: HashSet<&String> = owners.values().collect();
    assert!(used.len() >= 2, "20 keys all on {used:?}");
}

#[tokio::test]
async fn hash_on_a_header_a_cookie_and_the_client_address() {
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    for (key, header) in [("header:X-User", "x-user"), ("cookie:uid", "cookie")] {
        let gw = TestGateway::start(&hashed(key, &addrs)).await;
        let mut used = HashSet::new();
        for k in 0..15 {
            let value = match header {
                "cookie" => format!("theme=dark; uid=user{k}"),
                _ => format!("user{k}"),
            };
            let first = backend_for(gw.addr, "/", &[(header, &value)]).await;
            for _ in 0..2 {
                let again = backend_for(gw.addr, "/", &[(header, &value)]).await;
                assert_eq!(again, first, "{key}: user{k}");
            }
            used.insert(first);
        }
        assert!(used.len() >= 2, "{key}: 15 keys all on {used:?}");
    }
    // The client address is the one a trusted proxy names, so clients behind it spread.
    let config = format!(
        "{}\n[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        hashed("client_address", &addrs)
    );
    let gw = TestGateway::start(&config).await;
    let mut used = HashSet::new();
    for k in 1..16 {
        let client = format!("198.51.100.{k}");
        let first = backend_for(gw.addr, "/", &[("x-forwarded-for", &client)]).await;
        let again = backend_for(gw.addr, "/other", &[("x-forwarded-for", &client)]).await;
        assert_eq!(again, first, "client {client}");
        used.insert(first);
    }
    assert!(used.len() >= 2, "15 clients all on {used:?}");
}

#[tokio::test]
async fn two_gateways_with_one_config_choose_the_same_server_for_each_key() {
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = hashed("query:room", &addrs);
    let one = TestGateway::start(&config).await;
    let two = TestGateway::start(&config).await;
    for k in 0..30 {
        let path = format!("/?room=r{k}");
        let a = backend_for(one.addr, &path, &[]).await;
        let b = backend_for(two.addr, &path, &[]).await;
        assert_eq!(a, b, "room r{k}");
    }
}

#[tokio::test]
async fn a_request_without_the_key_goes_to_the_least_loaded_server() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let gw = TestGateway::start(&hashed("query:user", &[a.addr, b.addr])).await;
    // One keyless request held open on whichever server it got...
    let mut held = Client::connect(gw.addr).await;
    let held_reply = tokio::spawn(async move {
        held.fetch(
            request("GET", "app.test", "/held")
                .header("x-reply-hold", "1")
                .body(empty())
                .unwrap(),
        )
        .await
    });
    let busy = tokio::select! {
        r = async { let mut a = a; let r = a.next_request().await; (a, r) } => { let (back, r) = r; assert_eq!(r.uri, "/held"); drop(back); "a" }
        r = async { let mut b = b; let r = b.next_request().await; (b, r) } => { let (back, r) = r; assert_eq!(r.uri, "/held"); drop(back); "b" }
    };
    // ...so the next keyless ones go to the other, with no open request.
    for _ in 0..3 {
        let server = backend_for(gw.addr, "/?other=1", &[]).await;
        assert_ne!(server, busy, "a keyless request went to the busy server");
    }
    held_reply.abort();
}

#[tokio::test]
async fn the_sticky_cookie_pins_a_client_to_the_server_that_answered_first() {
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    // Round robin would send each request elsewhere: only the cookie keeps it in place.
    let gw = TestGateway::start(&sticky("round_robin", &addrs)).await;
    let mut pinned = HashSet::new();
    for client in 0..6 {
        let first = fetch_with(gw.addr, "/", &[]).await;
        let set_cookie = first
            .header("set-cookie")
            .expect("a first answer sets the cookie");
        let (pair, attributes) = set_cookie.split_once("; ").expect("attributes");
        assert_eq!(
            attributes, "Path=/; HttpOnly; SameSite=Lax",
            "no Secure on plain HTTP"
        );
        let token = pair.strip_prefix("srv=").expect("the configured name");
        assert!(
            !addrs.iter().any(|a| token.contains(&a.port().to_string())),
            "the token names no backend: {token}"
        );
        let server = first.header("x-backend").unwrap().to_owned();
        for _ in 0..4 {
            let again = fetch_with(gw.addr, "/", &[("cookie", &format!("lang=en; {pair}"))]).await;
            assert_eq!(
                again.header("x-backend"),
                Some(server.as_str()),
                "client {client}"
            );
            assert_eq!(
                again.header("set-cookie"),
                None,
                "a valid cookie is not set again"
            );
        }
        pinned.insert(server);
    }
    assert_eq!(
        pinned.len(),
        3,
        "six new clients spread over the three servers"
    );
}

#[tokio::test]
async fn a_forged_cookie_is_ignored_and_replaced() {
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let gw = TestGateway::start(&sticky("round_robin", &addrs)).await;
    let mut seen = HashSet::new();
    for forged in ["srv=000000000000000000000000", "srv=127.0.0.1", "srv="] {
        for _ in 0..3 {
            let reply = fetch_with(gw.addr, "/", &[("cookie", forged)]).await;
            assert!(
                reply.header("set-cookie").is_some(),
                "{forged}: a fresh cookie"
            );
            seen.insert(reply.header("x-backend").unwrap().to_owned());
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "forged cookies pin nothing: round robin goes on"
    );
}

#[tokio::test]
async fn the_sticky_cookie_is_secure_on_a_tls_listener() {
    let backend = HttpBackend::start("a").await;
    let pki = tls::Pki::new();
    let leaf = pki.issue("leaf", &["app.test"]);
    let config = format!(
        "{}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n[listener.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        sticky("least_connections", &[backend.addr]),
        leaf.cert,
        leaf.key
    );
    let gw = TestGateway::start(&config).await;
    let mut sender = tls::http1_over_tls(gw.addr, "app.test", &pki).await;
    let response = within(
        WAIT,
        sender.send_request(request("GET", "app.test", "/").body(empty()).unwrap()),
    )
    .await
    .expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{cookie}"
    );
}

#[tokio::test]
async fn a_client_pinned_to_a_server_that_is_gone_moves_on_with_a_new_cookie() {
    let (_reserved, dead) = dead_address();
    let live = HttpBackend::start("live").await;
    let gw = TestGateway::start(&sticky("round_robin", &[dead, live.addr])).await;
    // The cookie a client got from the server before it went away.
    let snapshot = gw.snapshot();
    let group = &snapshot.upstreams[0];
    let dead_cookie = group
        .sticky_cookie(&Default::default(), &group.endpoints()[0], false)
        .expect("a cookie for the dead server")
        .to_str()
        .unwrap()
        .split("; ")
        .next()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        let moved = fetch_with(gw.addr, "/", &[("cookie", &dead_cookie)]).await;
        assert_eq!(moved.header("x-backend"), Some("live"));
        let fresh = moved
            .header("set-cookie")
            .expect("a cookie for the new server");
        let pair = fresh.split("; ").next().unwrap();
        assert_ne!(pair, dead_cookie);
        let again = fetch_with(gw.addr, "/", &[("cookie", pair)]).await;
        assert_eq!(again.header("x-backend"), Some("live"));
        assert_eq!(again.header("set-cookie"), None);
    }
}
