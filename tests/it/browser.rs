//! A real browser through wsgate: headless Chromium loads a page over https (HTTP/2 by ALPN),
//! opens `wss://` back to the same origin, and reports what it saw to the backend. Skipped,
//! saying so, when Chromium is not installed; `.ci/run` installs it.

use std::io::Write;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crate::support::browser::{Chromium, PageBackend, Report, CHROMIUM};
use crate::support::tls::Pki;
use crate::support::{eventually, proxy_config, TestGateway, WAIT};

/// From starting Chromium to the page's first report. Chromium takes seconds to start on a
/// busy 2-core machine, and a test that waits a minute has failed anyway.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// Sends text (with a non-ASCII one and an empty one) and binary messages, the last two larger
/// than HTTP/2's 64 KiB initial flow-control window; checks every echo in order; reports
/// `stage=echoed` and closes; reports `stage=closed` with the close event. Any WebSocket
/// error reports `stage=error` at once.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>wsgate browser test</title>
<script>
"use strict";
const report = (fields) => {
  const nav = performance.getEntriesByType("navigation")[0];
  fields.page = nav ? nav.nextHopProtocol : "none";
  return fetch("/report?" + new URLSearchParams(fields), { cache: "no-store" });
};
const sent = [
  "hello 1",
  "héllo ✓ 2",
  "",
  new Uint8Array(256).map((_, i) => i),
  "x".repeat(100000),
  new Uint8Array(200000).map((_, i) => (i * 7) & 255),
];
const same = (expected, got) => {
  if (typeof expected === "string") return expected === got;
  if (!(got instanceof ArrayBuffer)) return false;
  const bytes = new Uint8Array(got);
  return bytes.length === expected.length && bytes.every((b, i) => b === expected[i]);
};
let echoes = 0, mismatches = 0;
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.binaryType = "arraybuffer";
ws.onopen = () => sent.forEach((message) => ws.send(message));
ws.onmessage = (event) => {
  if (same(sent[echoes + mismatches], event.data)) echoes++; else mismatches++;
  if (echoes + mismatches === sent.length) {
    report({ stage: "echoed", echoes, mismatches, expected: sent.length })
      .finally(() => ws.close(1000, "done"));
  }
};
ws.onerror = () => report({ stage: "error", echoes, mismatches, expected: sent.length });
ws.onclose = (event) => report({ stage: "closed", code: event.code, clean: event.wasClean });
</script>
"#;

#[tokio::test]
async fn chromium_echoes_over_wss_as_an_rfc8441_stream_of_its_h2_connection() {
    if !Chromium::installed() {
        // Straight to stderr: the test harness captures `eprintln!`, and a skip must show.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP browser test: {CHROMIUM} not installed (.ci/run installs it)"
        );
        return;
    }
    let mut backend = PageBackend::start(PAGE).await;
    let pki = Pki::new();
    let cert = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    // A TLS listener as tls.rs writes it; HTTP/2 is on by default with TLS.
    let config = format!(
        "{}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n\n[listener.tls]\n\
         certificates = [{{ cert = {:?}, key = {:?} }}]\n",
        proxy_config(&[backend.addr]),
        cert.cert,
        cert.key
    );
    let gw = TestGateway::start(&config).await;
    let started = Instant::now();
    let mut chromium = Chromium::open(&format!("https://localhost:{}/", gw.addr.port()));

    let echoed = next_report(&mut backend, &mut chromium, BROWSER_WAIT).await;
    let took = started.elapsed();
    assert_eq!(echoed.get("stage"), "echoed", "{echoed:?}");
    assert_eq!(echoed.get("expected"), "6", "{echoed:?}");
    assert_eq!(
        echoed.get("echoes"),
        "6",
        "every echo came back intact: {echoed:?}"
    );
    assert_eq!(echoed.get("mismatches"), "0", "{echoed:?}");
    assert_eq!(
        echoed.get("page"),
        "h2",
        "the page came over HTTP/2: {echoed:?}"
    );

    // The one WebSocket was an extended CONNECT stream on the page's connection.
    let stats = gw.route_stats("app");
    assert_eq!(stats.tunnels_total.load(SeqCst), 1);
    assert_eq!(
        stats.tunnels_over_h2.load(SeqCst),
        1,
        "Chromium did not use RFC 8441"
    );

    let closed = next_report(&mut backend, &mut chromium, WAIT).await;
    assert_eq!(closed.get("stage"), "closed", "{closed:?}");
    assert_eq!(closed.get("code"), "1000", "{closed:?}");
    assert_eq!(closed.get("clean"), "true", "a clean close: {closed:?}");
    eventually("the tunnel ended", || stats.tunnels_open.load(SeqCst) == 0).await;
    println!(
        "Chromium reported its echoes {:.1}s after it started",
        took.as_secs_f64()
    );
}

/// The page's next report, or a panic with Chromium's log when it exits or `limit` passes.
async fn next_report(
    backend: &mut PageBackend,
    chromium: &mut Chromium,
    limit: Duration,
) -> Report {
    const POLL: Duration = Duration::from_millis(100);
    let deadline = Instant::now() + limit;
    for _ in 0..=limit.as_millis() / POLL.as_millis() {
        if let Some(report) = backend.next_report(POLL).await {
            return report;
        }
        if let Some(status) = chromium.exited() {
            panic!(
                "Chromium exited ({status}) before the page reported; its log:\n{}",
                chromium.log_tail()
            );
        }
        if Instant::now() > deadline {
            break;
        }
    }
    panic!(
        "no report from the page within {limit:?}; Chromium's log:\n{}",
        chromium.log_tail()
    );
}
