//! Whole-config reload: new requests follow the new config at once, tunnels in flight keep
//! going, servers that stay keep their counts, removed servers' tunnels close with 1012 spread
//! over a window, listeners come and go, and a broken config changes nothing.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::ws::{next_message, WsStream};
use crate::support::*;

async fn echo(ws: &mut WsStream, text: &str) {
    within(WAIT, ws.send(Message::Text(text.into())))
        .await
        .unwrap();
    assert_eq!(next_message(ws).await, Message::Text(text.into()));
}

/// The close code the gateway sent, skipping keepalive Pings; then reads on, as a client
/// does, which sends tungstenite's answering Close, until the connection ends.
async fn close_code(ws: &mut WsStream) -> u16 {
    let code = match next_message(ws).await {
        Message::Close(Some(frame)) => u16::from(frame.code),
        other => panic!("expected a Close, got {other:?}"),
    };
    for _ in 0..100 {
        if !matches!(within(WAIT, ws.next()).await, Some(Ok(_))) {
            break;
        }
    }
    code
}

#[tokio::test]
async fn new_requests_follow_the_new_routes_while_a_tunnel_keeps_echoing() {
    let ws_backend = WsBackend::start("ws").await;
    let mut http = HttpBackend::start("b").await;
    let first = proxy_config(&[ws_backend.addr]);
    let gw = TestGateway::start(&first).await;
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    echo(&mut ws, "before").await;
    assert_eq!(
        get(gw.addr, "a.test", "/new").await.status,
        502,
        "not routed yet: the ws backend answers no plain HTTP"
    );

    let second = format!(
        "[[route]]\nname = \"new\"\npath = \"/new\"\nupstream = \"other\"\n\n{first}\n{}",
        upstream_config("other", "round_robin", &[http.addr])
    );
    let summary = gw.reload(&second).await.expect("the reload is taken");
    assert_eq!(summary.routes_added, ["new"]);
    assert_eq!(summary.upstreams_added, ["other"]);
    assert_eq!(summary.tunnels_closing, 0);
    let reply = get(gw.addr, "a.test", "/new").await;
    assert_eq!(reply.status, 200);
    assert_eq!(http.next_request().await.uri, "/new");
    echo(&mut ws, "after").await;

    // Back again: the route and the upstream are gone, the tunnel still is not.
    let summary = gw.reload(&first).await.unwrap();
    assert_eq!(summary.routes_removed, ["new"]);
    assert_eq!(summary.upstreams_removed, ["other"]);
    assert_ne!(get(gw.addr, "a.test", "/new").await.status, 200);
    echo(&mut ws, "still").await;
}

#[tokio::test]
async fn a_broken_config_is_refused_whole_and_the_old_one_keeps_serving() {
    let gw =
        TestGateway::start("[[route]]\nname = \"r\"\nrespond = { status = 200, body = \"old\" }\n")
            .await;
    let broken =
        "[timeouts]\nconnect = \"soon\"\n\n[[route]]\nname = \"r\"\nupstream = \"nowhere\"\n";
    let err = gw.reload(broken).await.expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("reload.toml:2:11: invalid duration \"soon\""),
        "{text}"
    );
    assert!(
        text.contains("reload.toml:6:12: route \"r\" refers to unknown upstream \"nowhere\""),
        "{text}"
    );
    assert_eq!(get(gw.addr, "a.test", "/").await.text(), "old");
    // A config that parses but cannot be set up (a CA bundle that is not there) is refused too.
    let unusable = "[[route]]\nname = \"r\"\nupstream = \"u\"\n[[upstream]]\nname = \"u\"\nservers = [\"https://localhost:1\"]\ntls = { ca = \"/nonexistent/ca.pem\" }\n";
    assert!(gw.reload(unusable).await.is_err());
    assert_eq!(get(gw.addr, "a.test", "/").await.text(), "old");
}

#[tokio::test]
async fn least_connections_after_a_reload_counts_the_tunnels_opened_before_it() {
    let a = WsBackend::start("a").await;
    let b = WsBackend::start("b").await;
    let gw = TestGateway::start(&proxy_config(&[a.addr])).await;
    let mut before = Vec::new();
    for _ in 0..2 {
        let (ws, response) = ws_connect(gw.addr, "/").await;
        assert_eq!(response.headers()["x-backend"], "a");
        before.push(ws);
    }
    gw.reload(&proxy_config(&[a.addr, b.addr])).await.unwrap();
    assert_eq!(
        gw.endpoint("app", 0).tunnels(),
        2,
        "server a kept its count"
    );
    for _ in 0..2 {
        let (_ws, response) = ws_connect(gw.addr, "/").await;
        assert_eq!(
            response.headers()["x-backend"],
            "b",
            "a still has 2 open tunnels"
        );
        before.push(_ws);
    }
    for ws in &mut before {
        echo(ws, "all open").await;
    }
}

#[tokio::test]
async fn a_removed_server_closes_its_tunnels_with_1012_spread_over_the_window() {
    const PER_SERVER: usize = 10;
    let mut a = WsBackend::start("a").await;
    let b = WsBackend::start("b").await;
    let both = format!(
        "[reload]\nclose_spread = \"2s\"\n\n[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "round_robin", &[a.addr, b.addr])
    );
    let gw = TestGateway::start(&both).await;
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..2 * PER_SERVER {
        let (ws, response) = ws_connect(gw.addr, "/").await;
        match response.headers()["x-backend"].to_str().unwrap() {
            "a" => on_a.push(ws),
            _ => on_b.push(ws),
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (PER_SERVER, PER_SERVER));

    let only_b = both.replace(&format!("\"{}\", ", a.addr), "");
    let reloaded = Instant::now();
    let summary = gw.reload(&only_b).await.unwrap();
    assert_eq!(summary.servers_removed, [format!("app/{}", a.addr)]);
    assert_eq!(summary.tunnels_closing, PER_SERVER);
    // Each tunnel closes at its own moment; wait for all of them together.
    let closes = on_a.iter_mut().map(|ws| async {
        let code = close_code(ws).await;
        (code, reloaded.elapsed())
    });
    let closes = within(WAIT, futures_util::future::join_all(closes)).await;
    let mut moments: Vec<Duration> = closes
        .iter()
        .map(|(code, at)| {
            assert_eq!(*code, 1012, "Service Restart");
            *at
        })
        .collect();
    moments.sort();
    let spread = moments[PER_SERVER - 1] - moments[0];
    assert!(
        spread >= Duration::from_millis(300),
        "all closed within {spread:?}: no spread"
    );
    for _ in 0..PER_SERVER {
        let close = a.next_close().await.expect("a close code");
        assert_eq!(u16::from(close.code), 1001, "the server hears Going Away");
    }
    for ws in &mut on_b {
        echo(ws, "b stays").await;
    }
    let (_ws, response) = ws_connect(gw.addr, "/").await;
    assert_eq!(
        response.headers()["x-backend"],
        "b",
        "a gets no new tunnels"
    );
}

#[tokio::test]
async fn listeners_come_and_go_and_a_removed_one_closes_its_websockets_with_1001() {
    let backend = WsBackend::start("a").await;
    let base = proxy_config(&[backend.addr]);
    let gw = TestGateway::start(&base).await;
    let with_second = format!(
        "{base}\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\n"
    );
    let summary = gw.reload(&with_second).await.unwrap();
    assert_eq!(summary.listeners_added, ["second"]);
    let second = summary
        .listening
        .iter()
        .find(|(name, _)| name == "second")
        .map(|(_, addr)| *addr)
        .expect("second is listening");
    assert!(
        summary
            .listening
            .iter()
            .any(|(name, addr)| name == "test" && *addr == gw.addr),
        "the first listener kept its socket"
    );
    let (mut ws, _) = ws_connect(second, "/").await;
    echo(&mut ws, "on the second listener").await;

    let summary = gw.reload(&base).await.unwrap();
    assert_eq!(summary.listeners_removed, ["second"]);
    assert_eq!(close_code(&mut ws).await, 1001);
    let refused = within(WAIT, tokio::net::TcpStream::connect(second)).await;
    assert!(refused.is_err(), "the removed listener still accepts");
    let (mut ws, _) = ws_connect(gw.addr, "/").await;
    echo(&mut ws, "the first one serves on").await;
    let stats = gw.route_stats("app");
    eventually("the closed tunnel is gone", || {
        stats.tunnels_open.load(SeqCst) == 1
    })
    .await;
}

/// The soak's size: `benches/reload_soak.sh` runs it with 1,000 tunnels in a release build;
/// the suite keeps it small enough for a debug build on 2 cores.
fn soak_tunnels() -> usize {
    std::env::var("WSGATE_SOAK_TUNNELS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// The real binary, reloaded with SIGHUP ten times while every tunnel sends a numbered message
/// every 100 ms and checks its echo: each reload adds a route to another backend and adds or
/// removes an unrelated upstream. No tunnel drops, no message is lost, doubled or reordered,
/// new requests follow each new config, and the gateway's open files return to their start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_survive_ten_reloads_without_losing_a_message() {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use crate::support::binary::{self, Gateway, TempFile};

    const RELOADS: usize = 10;
    let tunnels = soak_tunnels();
    let ws_backend = WsBackend::start("ws").await;
    let http = HttpBackend::start("b").await;
    let config = |k: usize| {
        let mut text = format!(
            "[log]\naccess = false\n\n[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n{}",
            proxy_config(&[ws_backend.addr])
        );
        if k > 0 {
            text.push_str(&format!(
                "\n[[route]]\nname = \"new{k}\"\npath = \"/new{k}\"\nupstream = \"other\"\n\n{}",
                upstream_config("other", "round_robin", &[http.addr])
            ));
        }
        if k % 2 == 1 {
            text.push_str("\n[[upstream]]\nname = \"spare\"\nservers = [\"127.0.0.1:9\"]\n");
        }
        text
    };
    let file = TempFile::new("soak", &config(0));
    let mut gateway = Gateway::spawn(&file.path);
    let addr = tokio::task::block_in_place(|| gateway.listening_address());
    let files_at_start = open_files(gateway.pid());

    let exchanged = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut clients = Vec::with_capacity(tunnels);
    for id in 0..tunnels {
        let (mut ws, _) = ws_connect(addr, "/").await;
        let exchanged = exchanged.clone();
        let mut stopped = stopped.clone();
        clients.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut sent = 0u64;
            // Bounded: a soak of this size ends long before a million ticks.
            for _ in 0..1_000_000 {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let text = format!("{id}:{sent}");
                echo(&mut ws, &text).await;
                sent += 1;
                exchanged.fetch_add(1, SeqCst);
            }
            within(WAIT, ws.close(None)).await.unwrap();
            for _ in 0..100 {
                if !matches!(within(WAIT, ws.next()).await, Some(Ok(_))) {
                    break;
                }
            }
            sent
        }));
    }
    let wait_for_messages = |at_least: u64| {
        let exchanged = exchanged.clone();
        eventually("every tunnel keeps echoing", move || {
            exchanged.load(SeqCst) >= at_least
        })
    };
    wait_for_messages(2 * tunnels as u64).await;

    for k in 1..=RELOADS {
        std::fs::write(&file.path, config(k)).unwrap();
        gateway.signal("HUP");
        tokio::task::block_in_place(|| gateway.wait_for_line("config reloaded"));
        let answer = tokio::task::block_in_place(|| binary::get(addr, &format!("/new{k}")));
        assert!(
            answer.contains("backend=b"),
            "reload {k}: /new{k} not routed: {answer}"
        );
        if k > 1 {
            let old = tokio::task::block_in_place(|| binary::get(addr, &format!("/new{}", k - 1)));
            assert!(
                !old.contains("backend=b"),
                "reload {k}: the old route is still there"
            );
        }
        // Every tunnel exchanges about one more message before the next reload.
        wait_for_messages(exchanged.load(SeqCst) + tunnels as u64).await;
    }

    stop.send_replace(true);
    let mut messages = 0;
    for client in clients {
        messages += within(WAIT, client).await.expect("a tunnel failed");
    }
    // The last config has no upstream "other": its pooled connections go with it.
    std::fs::write(&file.path, config(0)).unwrap();
    gateway.signal("HUP");
    tokio::task::block_in_place(|| gateway.wait_for_line("config reloaded"));
    let pid = gateway.pid();
    eventually("the gateway's open files are back to their start", || {
        open_files(pid) == files_at_start
    })
    .await;
    eprintln!(
        "soak: {tunnels} tunnels, {messages} messages echoed in order, {RELOADS} reloads, 0 dropped"
    );
    gateway.signal("TERM");
    let status = tokio::task::block_in_place(|| gateway.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_listener_that_stays_takes_its_new_policy_at_once() {
    let gw =
        TestGateway::start("[[route]]\nname = \"r\"\nrespond = { status = 200, body = \"ok\" }\n")
            .await;
    assert_eq!(get(gw.addr, "a.test", "/x").await.status, 200);
    let redirecting = "[[route]]\nname = \"r\"\nrespond = { status = 200, body = \"ok\" }\n\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\nredirect_https = {}\n";
    let summary = gw.reload(redirecting).await.unwrap();
    assert!(summary.listeners_added.is_empty() && summary.listeners_removed.is_empty());
    let reply = get(gw.addr, "a.test", "/x").await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.headers["location"], "https://a.test/x");
}

/// `reload.watch`: the binary notices its config file change, takes a good one, and refuses a
/// broken one naming each problem, still serving the last good config.
#[test]
fn the_binary_reloads_a_changed_file_and_logs_every_problem_of_a_broken_one() {
    use crate::support::binary::{self, Gateway, TempFile};

    let config = |body: &str| {
        format!(
            "[reload]\nwatch = true\nwatch_interval = \"50ms\"\n\n[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n[[route]]\nname = \"r\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        )
    };
    let file = TempFile::new("watched", &config("one"));
    // As an editor or a deploy tool should: a whole new file renamed over the old one, so
    // that the watch never reads a half-written config.
    let replace = |text: &str| {
        let next = file.path.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &file.path).unwrap();
    };
    let mut gateway = Gateway::spawn(&file.path);
    let addr = gateway.listening_address();
    assert!(binary::get(addr, "/").ends_with("one"));
    replace(&config("two, a longer body"));
    gateway.wait_for_line("config reloaded");
    assert!(binary::get(addr, "/").ends_with("two, a longer body"));

    let broken = config("three").replace(
        "watch_interval = \"50ms\"",
        "watch_interval = \"50ms\"\nclose_spread = \"often\"",
    ) + "[[route]]\nname = \"s\"\npath = \"/s\"\nupstream = \"nowhere\"\n";
    replace(&broken);
    let first = gateway.wait_for_line("config reload rejected");
    let second = gateway.wait_for_line("config reload rejected");
    let path = file.display();
    assert!(
        first.contains(&format!("{path}:4:16: invalid duration")),
        "{first}"
    );
    assert!(
        second.contains(&format!("{path}:16:12: route ")),
        "{second}"
    );
    assert!(second.contains("refers to unknown upstream"), "{second}");
    assert!(
        binary::get(addr, "/").ends_with("two, a longer body"),
        "the last good config serves"
    );
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
}
