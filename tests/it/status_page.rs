//! The admin status page as a browser renders it: headless Chromium, driven over the DevTools
//! protocol, shows the admin listener's `/` while WebSockets open and close through the
//! gateway to a real echo backend; the numbers are read from the page's DOM, never from
//! `/status.json`. Skipped, saying so, when Chromium is not installed; `.ci/run` installs it.

use std::io::Write;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::support::browser::{Chromium, CHROMIUM};
use crate::support::devtools::DevTools;
use crate::support::ws::{next_message, WsStream};
use crate::support::{upstream_config, within, ws_connect, TestGateway, WsBackend, WAIT};

/// The bound for one browser step. Chromium takes seconds to start on a busy 2-core machine,
/// and the page polls every 2 s; a step that waits a minute has failed anyway.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// How many WebSockets the test holds open through the gateway.
const OPEN: usize = 3;

/// What the page shows, read from its DOM.
#[derive(Debug, serde::Deserialize)]
struct Shown {
    /// `#tunnels-open`, as text.
    tunnels: String,
    /// `document.body.dataset.updates`: how many times it has rendered.
    updates: u64,
    /// `#error`: empty while `/status.json` answers.
    error: String,
}

/// Waits in the page, on its own renders, for one after render number `after` that shows
/// `tunnels` open; returns what the last render showed, matching or not, at the bound.
async fn shown(devtools: &mut DevTools, after: u64, tunnels: usize) -> Shown {
    // The page sets the numbers, then bumps `data-updates`: a change of that attribute is a
    // render that has finished. The page-side bound is below `DevTools`' own.
    let limit = (BROWSER_WAIT - Duration::from_secs(10)).as_millis();
    let expression = format!(
        r#"new Promise((resolve) => {{
  const seen = () => ({{
    tunnels: document.getElementById("tunnels-open").textContent,
    updates: Number(document.body.dataset.updates || 0),
    error: document.getElementById("error").textContent,
  }});
  let observer, timer;
  const done = (s) => {{ observer.disconnect(); clearTimeout(timer); resolve(s); }};
  const check = () => {{
    const s = seen();
    if (s.updates > {after} && s.tunnels === "{tunnels}") done(s);
  }};
  observer = new MutationObserver(check);
  timer = setTimeout(() => done(seen()), {limit});
  observer.observe(document.body, {{ attributes: true, attributeFilter: ["data-updates"] }});
  check();
}})"#
    );
    let value = devtools.evaluate(&expression).await;
    serde_json::from_value(value.clone()).unwrap_or_else(|err| panic!("{value}: {err}"))
}

/// The text of every cell of table `id`'s body, row by row.
async fn table(devtools: &mut DevTools, id: &str) -> Vec<Vec<String>> {
    let expression = format!(
        r##"[...document.querySelectorAll("#{id} tbody tr")]
  .map((tr) => [...tr.cells].map((td) => td.textContent))"##
    );
    let value = devtools.evaluate(&expression).await;
    serde_json::from_value(value.clone()).unwrap_or_else(|err| panic!("{value}: {err}"))
}

/// One WebSocket through the gateway, with one echo to show that the tunnel carries.
async fn open_echoed(gw: &TestGateway, i: usize) -> WsStream {
    let (mut ws, _) = ws_connect(gw.addr, "/chat").await;
    let text = format!("hello {i}");
    within(WAIT, ws.send(Message::text(text.clone())))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text(text));
    ws
}

#[tokio::test]
async fn the_status_page_counts_open_tunnels_live_as_chromium_renders_it() {
    if !Chromium::installed() {
        // Straight to stderr: the test harness captures `eprintln!`, and a skip must show.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP browser test: {CHROMIUM} not installed (.ci/run installs it)"
        );
        return;
    }
    let backend = WsBackend::start("echo").await;
    let config = format!(
        "[[route]]\nname = \"chat\"\npath = \"/chat\"\nupstream = \"echo\"\n\n{}\n\
         [[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n",
        upstream_config("echo", "round_robin", &[backend.addr]),
    );
    let gw = TestGateway::start(&config).await;
    let admin = gw.admin.expect("the admin listener");

    let started = Instant::now();
    let mut chromium = Chromium::with_devtools();
    let mut devtools = DevTools::connect(&mut chromium, BROWSER_WAIT).await;
    // `localhost`, the one name its resolver rules leave (they refuse even IP literals).
    let page = format!("http://localhost:{}/", admin.port());
    devtools.open_page(&page).await;
    let loaded = started.elapsed();
    // Survives only if the page is never reloaded: what follows is the page updating itself.
    devtools
        .evaluate("window.wsgateTestMark = 'the first load'")
        .await;

    let idle = shown(&mut devtools, 0, 0).await;
    assert_eq!(idle.tunnels, "0", "before any WebSocket: {idle:?}");
    assert_eq!(idle.error, "", "{idle:?}");

    let mut sockets = Vec::new();
    for i in 0..OPEN {
        sockets.push(open_echoed(&gw, i).await);
    }
    let opened = Instant::now();
    let all = shown(&mut devtools, idle.updates, OPEN).await;
    let took_open = opened.elapsed();
    assert_eq!(
        all.tunnels,
        OPEN.to_string(),
        "with {OPEN} WebSockets open: {all:?}"
    );
    assert_eq!(all.error, "", "{all:?}");

    // The tables, rendered from the config's names and the live counters.
    let routes = table(&mut devtools, "routes").await;
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0][0], "chat", "{routes:?}");
    assert_eq!(routes[0][5], OPEN.to_string(), "tunnels open: {routes:?}");
    let servers = table(&mut devtools, "servers").await;
    let server = backend.addr.to_string();
    let open = OPEN.to_string();
    assert_eq!(
        servers,
        [["echo", server.as_str(), "up", "0", open.as_str(), "0"]],
        "upstream, server, health, requests open, tunnels open, connect failures"
    );
    let health_class = devtools
        .evaluate(r##"document.querySelector("#servers tbody td:nth-child(3)").className"##)
        .await;
    assert_eq!(health_class, "up");
    let listeners = table(&mut devtools, "listeners").await;
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    assert_eq!(
        listeners[0][..3],
        ["main", gw.addr.to_string().as_str(), "no"],
        "{listeners:?}"
    );

    // Everything it loaded came from the admin listener itself.
    let loads = devtools
        .evaluate(
            r#"({
  html: document.documentElement.outerHTML,
  external: [...document.querySelectorAll("script[src], link[href], img[src], iframe[src]")]
    .map((e) => e.outerHTML),
  resources: performance.getEntriesByType("resource").map((e) => e.name),
  origin: location.origin,
})"#,
        )
        .await;
    let html = loads["html"].as_str().expect("the DOM as HTML");
    assert!(html.contains("id=\"tunnels-open\""), "{html}");
    assert!(!html.contains("src=\"http"), "an external script: {html}");
    assert_eq!(loads["external"], serde_json::json!([]), "{loads}");
    let origin = format!("{}/", loads["origin"].as_str().expect("an origin"));
    assert_eq!(origin, page);
    let resources = loads["resources"].as_array().expect("resource entries");
    assert!(!resources.is_empty(), "it fetched /status.json: {loads}");
    for resource in resources {
        let url = resource.as_str().unwrap_or_default();
        assert!(
            url.starts_with(&origin),
            "{url} is not the admin listener's"
        );
    }

    // One closes; the same page, still polling, follows.
    let mut closing = sockets.pop().expect("a socket");
    within(WAIT, closing.close(None)).await.expect("close");
    // The close handshake ends with the stream.
    for _ in 0..8 {
        match within(WAIT, closing.next()).await {
            None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        }
    }
    drop(closing);
    let closed = Instant::now();
    let fewer = shown(&mut devtools, all.updates, OPEN - 1).await;
    let took_close = closed.elapsed();
    assert_eq!(
        fewer.tunnels,
        (OPEN - 1).to_string(),
        "after one of {OPEN} closed: {fewer:?}"
    );
    assert_eq!(fewer.error, "", "{fewer:?}");
    let mark: Value = devtools.evaluate("window.wsgateTestMark").await;
    assert_eq!(
        mark, "the first load",
        "the page updated itself, without a reload"
    );
    assert!(
        idle.updates < all.updates && all.updates < fewer.updates,
        "{idle:?} {all:?} {fewer:?}"
    );
    assert!(
        chromium.exited().is_none(),
        "Chromium exited: {}",
        chromium.log_tail()
    );
    println!(
        "the page loaded {:.1}s after Chromium started; it showed {OPEN} tunnels {:.1}s after \
         they opened and {} {:.1}s after one closed ({} renders)",
        loaded.as_secs_f64(),
        took_open.as_secs_f64(),
        OPEN - 1,
        took_close.as_secs_f64(),
        fewer.updates
    );
}
