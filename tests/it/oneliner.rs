//! `wsgate proxy --from .. --to ..`, the config-free one-liner, through the real binary: HTTP and
//! WebSockets reach every `--to` server, `--tls-cert/--tls-key` serve HTTPS and wss, and a bad or
//! hostile value is a config error named by its flag (exit 2), never extra config.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::binary::{self, Gateway};
use crate::support::tls::{http1_over_tls, tls_connect, wss_connect, Pki};
use crate::support::*;

/// `wsgate proxy --from 127.0.0.1:0 ARGS`, and the address its `listening` line announces.
fn proxy(args: &[&str]) -> (Gateway, SocketAddr) {
    let mut all = vec!["proxy", "--from", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut gateway = Gateway::spawn_args(&all);
    let addr = tokio::task::block_in_place(|| gateway.listening_address());
    (gateway, addr)
}

/// SIGTERM, as for a config file: a drain, then exit 0.
fn stop(mut gateway: Gateway) {
    tokio::task::block_in_place(|| {
        gateway.wait_for_signal_handlers();
        gateway.signal("TERM");
        let status = gateway.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "log:\n{}", gateway.log.join("\n"));
    });
}

/// Sends `text` and expects it back (pings and pongs skipped, boundedly).
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    within(WAIT, ws.send(Message::Text(text.to_owned())))
        .await
        .expect("send");
    for _ in 0..100 {
        let message = within(WAIT, ws.next())
            .await
            .expect("an echo")
            .expect("a message");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            assert_eq!(message, Message::Text(text.to_owned()));
            return;
        }
    }
    panic!("no echo of {text:?}, only pings and pongs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_reach_every_to_server() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let (gateway, addr) = proxy(&["--to", &a_addr, "--to", &b_addr]);
    let mut answered_by = BTreeSet::new();
    // Least connections rotates its ties, so one request at a time takes turns.
    for i in 0..20 {
        let reply = get(addr, "app.test", &format!("/one/{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        answered_by.insert(reply.header("x-backend").expect("x-backend").to_owned());
        if answered_by.len() == 2 {
            break;
        }
    }
    assert_eq!(
        answered_by,
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
    for backend in [&a, &b] {
        let seen = &backend.requests()[0];
        assert!(seen.uri.path().starts_with("/one/"), "{:?}", seen.uri);
        assert_eq!(seen.header("host"), Some("app.test"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    }
    stop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_reach_every_to_server() {
    let a = WsBackend::start("a").await;
    let b = WsBackend::start("b").await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let (gateway, addr) = proxy(&["--to", &a_addr, "--to", &b_addr]);
    let (mut first, first_answer) = ws_connect(addr, "/chat").await;
    echo(&mut first, "to the first").await;
    // The open tunnel counts against its server, so least connections picks the other.
    let (mut second, second_answer) = ws_connect(addr, "/chat").await;
    echo(&mut second, "to the second").await;
    echo(&mut first, "first, still open").await;
    let served_by: BTreeSet<&str> = [&first_answer, &second_answer]
        .iter()
        .map(|answer| answer.headers()["x-backend"].to_str().unwrap())
        .collect();
    assert_eq!(served_by, BTreeSet::from(["a", "b"]));
    within(WAIT, first.close(None)).await.unwrap();
    within(WAIT, second.close(None)).await.unwrap();
    stop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_flags_serve_https_and_wss() {
    let pki = Pki::new();
    let site = pki.issue("site", &["a.test"]);
    let (cert, key) = (site.cert.to_str().unwrap(), site.key.to_str().unwrap());
    let mut backend = HttpBackend::start("a").await;
    let backend_addr = backend.addr.to_string();
    let (gateway, addr) = proxy(&["--to", &backend_addr, "--tls-cert", cert, "--tls-key", key]);

    // HTTP/2 is offered, as a TLS listener in a file offers it by default.
    let h2 = tls_connect(addr, "a.test", pki.client_config(&[b"h2", b"http/1.1"]))
        .await
        .expect("TLS handshake");
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(h2);
    let mut sender = http1_over_tls(addr, "a.test", &pki).await;
    let request = Request::get("/secure")
        .header("host", "a.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within(WAIT, sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = within(WAIT, response.into_body().collect()).await.unwrap();
    assert!(
        body.to_bytes()
            .starts_with(b"backend=a method=GET uri=/secure"),
        "the backend's answer"
    );
    let seen = backend.next_request().await;
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    stop(gateway);

    let ws_backend = WsBackend::start("ws").await;
    let ws_addr = ws_backend.addr.to_string();
    let (gateway, addr) = proxy(&["--to", &ws_addr, "--tls-cert", cert, "--tls-key", key]);
    let (mut ws, response) = wss_connect(addr, "a.test", &pki, "wss://a.test/chat").await;
    assert_eq!(response.status(), 101);
    echo(&mut ws, "over wss").await;
    within(WAIT, ws.close(None)).await.unwrap();
    stop(gateway);
}

/// `wsgate proxy ARGS` to its end: exit code and stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["proxy", "--from", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let output = binary::run(&all);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        !stderr.contains("listening"),
        "it must not start:\n{stderr}"
    );
    (output.status.code(), stderr)
}

#[test]
fn a_bad_to_exits_2_naming_the_flag_and_value() {
    let (code, stderr) = refused(&["--to", "127.0.0.1:9000", "--to", "nope"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "--to \"nope\": invalid server address \"nope\": expected host:port, e.g. \"127.0.0.1:9000\"\n"
    );
    let (code, stderr) = refused(&["--to", "127.0.0.1:9000", "--log-level", "wsgate=loud"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("--log-level \"wsgate=loud\": invalid log level"),
        "{stderr}"
    );
}

#[test]
fn a_to_that_tries_to_write_config_is_one_bad_value() {
    // Pasted into a template as `servers = ["{to}"]`, this would add an open route.
    let injected = "127.0.0.1:1\"]\n[[route]]\nname = \"open\"\npath = \"/open\"\n\
                    respond = { status = 200, body = \"injected\" }\n#";
    let (code, stderr) = refused(&["--to", injected]);
    assert_eq!(code, Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [format!(
            "--to {injected:?}: invalid server address {injected:?}: expected host:port, e.g. \"127.0.0.1:9000\""
        )]
    );
}

#[test]
fn flags_that_do_not_fit_are_usage_errors() {
    let (code, stderr) = refused(&["--to", "127.0.0.1:9000", "--tls-cert", "site.pem"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key <FILE>"), "{stderr}");
    let (code, stderr) = refused(&["--to", "127.0.0.1:9000", "--tls-key", "site.key"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert <FILE>"), "{stderr}");
    let (code, stderr) = refused(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--to <SERVER>"), "{stderr}");
    let output = binary::run(&[
        "--config",
        "x.toml",
        "proxy",
        "--from",
        "127.0.0.1:0",
        "--to",
        "127.0.0.1:9000",
    ]);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("takes no --config"), "{stderr}");
}

#[test]
fn help_explains_it_in_one_screen() {
    let output = binary::run(&["proxy", "--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "--from <IP:PORT>",
        "--to <SERVER>",
        "--tls-cert <FILE>",
        "--tls-key <FILE>",
        "Examples:",
    ] {
        assert!(help.contains(needle), "{needle:?} in:\n{help}");
    }
    let rows: usize = help
        .lines()
        .map(|line| line.len().div_ceil(80).max(1))
        .sum();
    assert!(rows <= 45, "{rows} rows at 80 columns:\n{help}");
}
