//! TLS termination and HTTP/2 to clients: certificates by SNI, ALPN, wss through TLS, the
//! plain-HTTP answer, the handshake timeout, certificate problems at start, h2c.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::binary::{self, TempFile};
use crate::support::tls::{served_certificate, tls_connect, wss_connect, Issued, Pki};
use crate::support::{
    eventually, proxy_config, within, HttpBackend, RawClient, TestGateway, WsBackend, WAIT,
};

/// A TLS listener serving `certificates` (the first is the default), with `extra` TLS keys.
fn tls_config(certificates: &[&Issued], extra: &str, rest: &str) -> String {
    let list: Vec<String> = certificates
        .iter()
        .map(|c| format!("{{ cert = {:?}, key = {:?} }}", c.cert, c.key))
        .collect();
    format!(
        "{rest}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n\n[listener.tls]\ncertificates = [{}]\n{extra}\n",
        list.join(", ")
    )
}

struct Site {
    pki: Pki,
    default: Issued,
    exact: Issued,
    wildcard: Issued,
}

fn site() -> Site {
    let pki = Pki::new();
    Site {
        default: pki.issue("default", &["default.test", "127.0.0.1"]),
        exact: pki.issue("exact", &["a.test"]),
        wildcard: pki.issue("wildcard", &["*.wild.test"]),
        pki,
    }
}

#[tokio::test]
async fn sni_picks_the_exact_then_the_wildcard_then_the_default_certificate() {
    let backend = HttpBackend::start("a").await;
    let site = site();
    let config = tls_config(
        &[&site.default, &site.exact, &site.wildcard],
        "",
        &proxy_config(&[backend.addr]),
    );
    let gw = TestGateway::start(&config).await;
    let client = site.pki.client_config(&[b"http/1.1"]);
    for (name, expected) in [
        ("a.test", &site.exact),
        ("x.wild.test", &site.wildcard),
        ("default.test", &site.default),
        // An IP literal sends no SNI: the default certificate answers.
        ("127.0.0.1", &site.default),
    ] {
        let stream = tls_connect(gw.addr, name, client.clone())
            .await
            .unwrap_or_else(|err| panic!("handshake for {name}: {err}"));
        assert_eq!(served_certificate(&stream), expected.der, "{name}");
    }
    // A name no certificate covers gets the default, which the client rightly rejects.
    let err = tls_connect(gw.addr, "b.other.test", client)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn unknown_sni_can_be_refused() {
    let site = site();
    let config = tls_config(&[&site.exact], "unknown_sni = \"refuse\"", "");
    let gw = TestGateway::start(&config).await;
    let client = site.pki.client_config(&[]);
    assert!(tls_connect(gw.addr, "a.test", client.clone()).await.is_ok());
    assert!(tls_connect(gw.addr, "127.0.0.1", client).await.is_err());
    eventually("failure counted", || {
        gw.listener.tls_failures.load(SeqCst) >= 1
    })
    .await;
}

#[tokio::test]
async fn alpn_selects_http11_or_h2_and_h2_requests_reach_an_http11_backend() {
    let mut backend = HttpBackend::start("a").await;
    let site = site();
    let config = tls_config(&[&site.exact], "", &proxy_config(&[backend.addr]));
    let gw = TestGateway::start(&config).await;

    let h1 = tls_connect(gw.addr, "a.test", site.pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    let h2 = tls_connect(
        gw.addr,
        "a.test",
        site.pki.client_config(&[b"h2", b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = within(
        WAIT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2)),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::get("https://a.test/over/h2?x=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within(WAIT, sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let body = within(WAIT, response.into_body().collect()).await.unwrap();
    assert!(!body.to_bytes().is_empty());

    let seen = backend.next_request().await;
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.uri, "/over/h2?x=1");
    assert_eq!(seen.header("host"), Some("a.test"));
    assert_eq!(seen.header("cookie"), Some("a=1; b=2"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn wss_echo_through_tls_termination() {
    let backend = WsBackend::start("a").await;
    let site = site();
    let config = tls_config(&[&site.exact], "", &proxy_config(&[backend.addr]));
    let gw = TestGateway::start(&config).await;
    let (mut ws, response) = wss_connect(gw.addr, "a.test", &site.pki, "wss://a.test/chat").await;
    assert_eq!(response.status(), 101);
    for size in [0usize, 125, 126, 65_536, 1 << 20] {
        let payload = vec![(size % 251) as u8; size];
        within(WAIT, ws.send(Message::Binary(payload.clone())))
            .await
            .unwrap();
        let echoed = within(WAIT, ws.next()).await.expect("an echo").unwrap();
        assert_eq!(echoed, Message::Binary(payload), "{size} bytes");
    }
    within(WAIT, ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_readable_400() {
    let site = site();
    let gw = TestGateway::start(&tls_config(&[&site.exact], "", "")).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let answer = String::from_utf8(client.read_to_close().await).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("plain HTTP was sent to an HTTPS port; use https://\n"),
        "{answer}"
    );
    // The gateway still serves TLS.
    assert!(tls_connect(gw.addr, "a.test", site.pki.client_config(&[]))
        .await
        .is_ok());
}

#[tokio::test]
async fn a_silent_client_is_cut_at_the_handshake_timeout() {
    let site = site();
    let config = tls_config(
        &[&site.exact],
        "",
        "[timeouts]\ntls_handshake = \"300ms\"\n",
    );
    let gw = TestGateway::start(&config).await;
    let mut silent = within(WAIT, TcpStream::connect(gw.addr)).await.unwrap();
    let mut buf = [0u8; 16];
    let read = within(WAIT, silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    eventually("failure counted", || {
        gw.listener.tls_failures.load(SeqCst) == 1
    })
    .await;
    assert!(tls_connect(gw.addr, "a.test", site.pki.client_config(&[]))
        .await
        .is_ok());
}

#[tokio::test]
async fn missing_files_and_mismatched_keys_fail_at_start_naming_the_files() {
    let site = site();
    let missing = Issued {
        cert: site.exact.cert.with_file_name("nowhere.pem"),
        key: site.exact.key.clone(),
        der: site.exact.der.clone(),
    };
    let mismatched = Issued {
        cert: site.exact.cert.clone(),
        key: site.wildcard.key.clone(),
        der: site.exact.der.clone(),
    };
    let expired = site.pki.issue_expired("expired", &["a.test"]);
    for (case, expected) in [
        (
            &expired,
            format!(
                "the certificate in {} expired (not after 2020-01-01 00:00:00 UTC)",
                expired.cert.display()
            ),
        ),
        (
            &missing,
            format!("cannot read certificates from {}", missing.cert.display()),
        ),
        (
            &mismatched,
            format!(
                "the key in {} does not match the certificate in {}",
                mismatched.key.display(),
                mismatched.cert.display()
            ),
        ),
    ] {
        let text = tls_config(&[case], "", "");
        let config = wsgate::config::parse(&text, "test.toml").expect("valid text");
        let err = match wsgate::Server::bind(&config, None).await {
            Ok(_) => panic!("started with {expected}"),
            Err(err) => wsgate::telemetry::error_chain(&err),
        };
        assert!(err.contains(&expected), "{err}");

        // `wsgate check` reports the same, with exit status 2.
        let file = TempFile::new("tls-check", &text);
        let output = binary::run(&["check", "--config", &file.display()]);
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&expected), "{stderr}");
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_and_http11_share_a_plain_listener() {
    let mut backend = HttpBackend::start("a").await;
    let config = format!(
        "{}\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nhttp2 = true\n",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let stream = within(WAIT, TcpStream::connect(gw.addr)).await.unwrap();
    let (mut sender, connection) = within(
        WAIT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(connection);
    let request = Request::get("http://app.test/h2c")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within(WAIT, sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = backend.next_request().await;
    assert_eq!(seen.uri, "/h2c");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));

    let reply = crate::support::get(gw.addr, "app.test", "/h1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(backend.next_request().await.uri, "/h1");
}

/// RFC 8441: WebSockets as extended CONNECT streams of one HTTP/2 connection, each bridged to
/// an HTTP/1.1 handshake with the backend (key made and accept checked by wsgate).
#[tokio::test]
async fn websockets_over_one_http2_connection() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    let mut backend = WsBackend::start("a").await;
    let site = site();
    let config = tls_config(&[&site.exact], "", &proxy_config(&[backend.addr]));
    let gw = TestGateway::start(&config).await;
    let stream = tls_connect(gw.addr, "a.test", site.pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let mut sender = h2_with_extended_connect(stream).await;

    let mut sockets = Vec::new();
    for i in 0..3 {
        let mut request = extended_connect("/chat", "websocket");
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "chat, superchat".parse().unwrap());
        let mut response = within(WAIT, sender.send_request(request))
            .await
            .unwrap_or_else(|err| panic!("stream {i}: {err}"));
        assert_eq!(response.status(), 200, "stream {i}");
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "superchat",
            "stream {i}"
        );
        assert!(!response.headers().contains_key("sec-websocket-accept"));
        let upgraded = within(WAIT, hyper::upgrade::on(&mut response))
            .await
            .expect("stream upgraded");
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        sockets.push(ws);
        let handshake = backend.next_handshake().await;
        assert_eq!(handshake["upgrade"], "websocket");
        assert_eq!(handshake["host"], "a.test");
        assert_eq!(handshake["x-forwarded-proto"], "https");
    }
    assert_eq!(gw.route_stats("app").tunnels_open.load(SeqCst), 3);
    assert_eq!(gw.route_stats("app").tunnels_over_h2.load(SeqCst), 3);
    // What wsgate_tunnels_open{protocol="h2"} and wsgate_server_tunnels_open read.
    assert_eq!(gw.route_stats("app").tunnels_open_h2.load(SeqCst), 3);
    assert_eq!(gw.endpoint("app", 0).tunnels_over_h2(), 3);
    // Interleaved traffic: every stream gets its own echoes back.
    for round in 0..3 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            let text = format!("stream {i} round {round}");
            within(WAIT, ws.send(Message::Text(text.clone())))
                .await
                .unwrap();
            let echo = within(WAIT, ws.next()).await.expect("an echo").unwrap();
            assert_eq!(echo, Message::Text(text));
        }
    }
    for mut ws in sockets {
        within(WAIT, ws.close(None)).await.unwrap();
        while let Some(Ok(_)) = within(WAIT, ws.next()).await {}
    }
    let stats = gw.route_stats("app");
    let server = gw.endpoint("app", 0);
    // The route's count drops before the server's lease does: wait for both.
    eventually("tunnels closed", || {
        stats.tunnels_open.load(SeqCst) == 0 && server.tunnels_over_h2() == 0
    })
    .await;
    assert_eq!(stats.tunnels_open_h2.load(SeqCst), 0);
}

/// Shutdown closes a WebSocket that is an HTTP/2 stream the way it closes one over HTTP/1.1:
/// Close 1001 to the client on its stream and to the backend, then the close handshakes.
#[tokio::test]
async fn shutdown_sends_close_1001_to_websockets_over_http2() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    let mut backend = WsBackend::start("a").await;
    let site = site();
    let rest = format!(
        "[timeouts]\ndrain = \"60s\"\n\n{}",
        proxy_config(&[backend.addr])
    );
    let mut gw = TestGateway::start(&tls_config(&[&site.exact], "", &rest)).await;
    let stream = tls_connect(gw.addr, "a.test", site.pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let mut sender = h2_with_extended_connect(stream).await;
    let request = extended_connect("/chat", "websocket");
    let mut response = within(WAIT, sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 200);
    let upgraded = within(WAIT, hyper::upgrade::on(&mut response))
        .await
        .expect("stream upgraded");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    within(WAIT, ws.send(Message::Text("before".into())))
        .await
        .unwrap();
    let echo = within(WAIT, ws.next()).await.expect("an echo").unwrap();
    assert_eq!(echo, Message::Text("before".into()));

    let started = std::time::Instant::now();
    gw.begin_shutdown().await;
    let close = loop {
        match within(WAIT, ws.next()).await {
            Some(Ok(Message::Ping(_))) => continue,
            other => break other,
        }
    };
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected Close 1001 on the stream, got {other:?}"),
    }
    let backend_close = backend.next_close().await.expect("a close code");
    assert_eq!(u16::from(backend_close.code), 1001);
    let end = within(WAIT, ws.next()).await;
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
    drop(ws);
    drop(sender);
    gw.finish_shutdown().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[tokio::test]
async fn extended_connect_for_another_protocol_gets_501() {
    let backend = WsBackend::start("a").await;
    let site = site();
    let config = tls_config(&[&site.exact], "", &proxy_config(&[backend.addr]));
    let gw = TestGateway::start(&config).await;
    let stream = tls_connect(gw.addr, "a.test", site.pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let mut sender = h2_with_extended_connect(stream).await;
    let request = extended_connect("/x", "webtransport");
    let response = within(WAIT, sender.send_request(request)).await.unwrap();
    assert_eq!(response.status(), 501);
}

/// An RFC 8441 extended CONNECT for `path` on a.test with `:protocol` = `protocol`.
fn extended_connect(path: &str, protocol: &'static str) -> Request<Empty<Bytes>> {
    let mut request = Request::connect(format!("https://a.test{path}"))
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    request
}

/// An HTTP/2 client connection whose server has enabled extended CONNECT. The server's
/// SETTINGS arrive just after the handshake; the connection task reports when they have.
async fn h2_with_extended_connect(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let (sender, mut connection) = within(
        WAIT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .expect("h2 handshake");
    let (enabled_tx, enabled) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // The setting is read by hyper's own h2 task, which does not wake this one: look
        // again every few milliseconds, for at most WAIT.
        let mut enabled_tx = Some(enabled_tx);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let watching = enabled_tx.is_some() && std::time::Instant::now() < deadline;
            tokio::select! {
                _ = &mut connection => break,
                () = tokio::time::sleep(std::time::Duration::from_millis(2)), if watching => {
                    if connection.is_extended_connect_protocol_enabled() {
                        if let Some(tx) = enabled_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        }
    });
    within(WAIT, enabled)
        .await
        .expect("the server enables extended CONNECT");
    sender
}

/// Connects (bounded in count and time) until the listener at `addr` serves `der` to a.test:
/// a watched certificate file is picked up within its interval.
async fn until_served(
    addr: std::net::SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    der: &rustls::pki_types::CertificateDer<'static>,
) {
    let deadline = std::time::Instant::now() + WAIT;
    for _ in 0..1_000 {
        let stream = tls_connect(addr, "a.test", client.clone()).await.unwrap();
        if served_certificate(&stream) == *der {
            return;
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the renewed certificate never served");
}

/// A TLS listener added by a config reload is served at once, and its certificate files are
/// watched like those of a listener that was there from the start.
#[tokio::test]
async fn a_tls_listener_added_by_a_reload_serves_and_watches_its_certificates() {
    let site = site();
    let routes = "[[route]]\nname = \"r\"\nrespond = { status = 200, body = \"ok\" }\n";
    let gw = TestGateway::start(routes).await;
    // Served once first, so that the certificate watch is already waiting when the reload
    // comes (with no TLS listener it has nothing to look at for an hour).
    assert_eq!(
        crate::support::get(gw.addr, "a.test", "/").await.status,
        200
    );
    let with_tls = tls_config(
        &[&site.exact],
        "watch_interval = \"50ms\"",
        &format!("{routes}\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n"),
    );
    let summary = gw.reload(&with_tls).await.expect("reloaded");
    assert_eq!(summary.listeners_added, ["tls"]);
    let tls_addr = summary
        .listening
        .iter()
        .find(|(name, _)| name == "tls")
        .map(|(_, addr)| *addr)
        .unwrap();
    let client = site.pki.client_config(&[b"http/1.1"]);
    let stream = tls_connect(tls_addr, "a.test", client.clone())
        .await
        .unwrap();
    assert_eq!(served_certificate(&stream), site.exact.der);

    let renewed = site.pki.reissue(&site.exact, &["a.test"]);
    until_served(tls_addr, &client, &renewed.der).await;
}

/// Renewed certificate files are picked up without a restart: a live wss tunnel keeps
/// working, new handshakes get the new certificate, and a broken renewal (a key that does not
/// match) keeps the previous certificate serving.
#[tokio::test]
async fn certificates_reload_when_their_files_change_without_dropping_a_tunnel() {
    let backend = WsBackend::start("a").await;
    let site = site();
    let config = tls_config(
        &[&site.exact],
        "watch_interval = \"50ms\"",
        &proxy_config(&[backend.addr]),
    );
    let gw = TestGateway::start(&config).await;
    let client = site.pki.client_config(&[b"http/1.1"]);
    let stream = tls_connect(gw.addr, "a.test", client.clone())
        .await
        .unwrap();
    assert_eq!(served_certificate(&stream), site.exact.der);
    let (mut ws, _) = within(
        WAIT,
        tokio_tungstenite::client_async("wss://a.test/", stream),
    )
    .await
    .expect("wss handshake");

    let renewed = site.pki.reissue(&site.exact, &["a.test"]);
    assert_ne!(renewed.der, site.exact.der);
    until_served(gw.addr, &client, &renewed.der).await;
    within(WAIT, ws.send(Message::Text("still here".into())))
        .await
        .unwrap();
    let echo = within(WAIT, ws.next()).await.expect("an echo").unwrap();
    assert_eq!(echo, Message::Text("still here".into()));

    // A renewal gone wrong: the key no longer matches. The renewed certificate stays.
    let failures_before = gw.reloader.certificate_failures();
    std::fs::copy(&site.wildcard.key, &renewed.key).unwrap();
    eventually("failed reload counted", || {
        gw.reloader.certificate_failures() > failures_before
    })
    .await;
    let stream = tls_connect(gw.addr, "a.test", client.clone())
        .await
        .unwrap();
    assert_eq!(served_certificate(&stream), renewed.der);

    // An expired renewal is refused the same way.
    let failures_before = gw.reloader.certificate_failures();
    let expired = site.pki.issue_expired("expired", &["a.test"]);
    std::fs::copy(&expired.key, &renewed.key).unwrap();
    std::fs::copy(&expired.cert, &renewed.cert).unwrap();
    gw.reloader.reload_certificates();
    assert!(gw.reloader.certificate_failures() > failures_before);
    let stream = tls_connect(gw.addr, "a.test", client.clone())
        .await
        .unwrap();
    assert_eq!(served_certificate(&stream), renewed.der);

    // SIGHUP's path: an explicit reload once the files are whole again.
    let again = site.pki.reissue(&site.exact, &["a.test"]);
    gw.reloader.reload_certificates();
    let stream = tls_connect(gw.addr, "a.test", client).await.unwrap();
    assert_eq!(served_certificate(&stream), again.der);
}

#[test]
fn sighup_reloads_certificates_in_the_binary() {
    let site = site();
    let config = TempFile::new(
        "sighup",
        &tls_config(
            &[&site.exact],
            "watch_interval = \"1h\"",
            "[log]\nlevel = \"info\"\n",
        ),
    );
    let mut gateway = binary::Gateway::spawn(&config.path);
    gateway.listening_address();
    gateway.wait_for_signal_handlers();
    gateway.signal("HUP");
    gateway.wait_for_line("config reloaded");
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
}

#[tokio::test]
async fn plain_listener_redirects_to_https_except_acme_challenges() {
    let mut backend = HttpBackend::start("a").await;
    let config = format!(
        "{}\n[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\
         redirect_https = {{ port = 8443, except = [\"/.well-known/acme-challenge/\"] }}\n",
        proxy_config(&[backend.addr])
    );
    let gw = TestGateway::start(&config).await;
    let reply = crate::support::get(gw.addr, "site.test:8080", "/a/b?c=1").await;
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.header("location"),
        Some("https://site.test:8443/a/b?c=1")
    );
    let reply =
        crate::support::get(gw.addr, "site.test", "/.well-known/acme-challenge/token").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        backend.next_request().await.uri,
        "/.well-known/acme-challenge/token"
    );
    assert_eq!(
        backend.requests().len(),
        1,
        "only the challenge reached the backend"
    );

    // On the default port, Location names no port.
    let config = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\nredirect_https = {}\n";
    let gw = TestGateway::start(config).await;
    let reply = crate::support::get(gw.addr, "site.test", "/x").await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.header("location"), Some("https://site.test/x"));
}

#[tokio::test]
async fn hsts_is_added_to_every_response_of_a_tls_listener() {
    let backend = HttpBackend::start("a").await;
    let site = site();
    let routes = format!(
        "[[route]]\nname = \"app\"\nhosts = [\"a.test\"]\nupstream = \"app\"\n\n{}",
        crate::support::upstream_config("app", "round_robin", &[backend.addr])
    );
    let config = tls_config(
        &[&site.exact],
        "hsts = \"max-age=31536000; includeSubDomains\"",
        &routes,
    );
    let gw = TestGateway::start(&config).await;
    for (host, status) in [("a.test", 200), ("unrouted.test", 404)] {
        let stream = tls_connect(gw.addr, "a.test", site.pki.client_config(&[b"http/1.1"]))
            .await
            .unwrap();
        let (mut sender, connection) = within(
            WAIT,
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let request = Request::get("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = within(WAIT, sender.send_request(request)).await.unwrap();
        assert_eq!(response.status(), status, "{host}");
        assert_eq!(
            response.headers()["strict-transport-security"],
            "max-age=31536000; includeSubDomains",
            "{host}"
        );
    }
}

/// mTLS: a verified client certificate's names reach the backend in the configured header,
/// a client's own header of that name never does, and a missing certificate is refused
/// unless client certificates are optional.
#[tokio::test]
async fn client_certificates_are_verified_and_their_identity_forwarded() {
    let mut backend = HttpBackend::start("a").await;
    let site = site();
    let client_cert = site.pki.issue("client", &["client.test"]);
    let stranger_pki = Pki::new();
    let stranger = stranger_pki.issue("stranger", &["stranger.test"]);
    for optional in [false, true] {
        let extra = format!(
            "client_ca = {:?}\nclient_auth = \"{}\"\nclient_identity_header = \"X-Client-Identity\"",
            site.pki.ca_file(),
            if optional { "optional" } else { "required" }
        );
        let config = tls_config(&[&site.exact], &extra, &proxy_config(&[backend.addr]));
        let gw = TestGateway::start(&config).await;
        let addr = gw.addr;
        let request = |client: Arc<rustls::ClientConfig>| async move {
            let stream = tls_connect(addr, "a.test", client).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            let request = Request::get("/who")
                .header("host", "a.test")
                .header("x-client-identity", "DNS:spoofed.test")
                .body(Empty::<Bytes>::new())
                .unwrap();
            within(WAIT, sender.send_request(request))
                .await
                .map_err(std::io::Error::other)
        };

        let response = request(site.pki.client_config_as(&[], Some(&client_cert)))
            .await
            .expect("a client with a valid certificate gets through");
        assert_eq!(response.status(), 200);
        let seen = backend.next_request().await;
        assert_eq!(seen.header("x-client-identity"), Some("DNS:client.test"));

        // A certificate from another CA is refused either way.
        assert!(request(stranger_pki.client_config_as(&[], Some(&stranger)))
            .await
            .is_err());

        let anonymous = request(site.pki.client_config(&[])).await;
        if optional {
            assert_eq!(anonymous.expect("optional lets it in").status(), 200);
            let seen = backend.next_request().await;
            assert_eq!(
                seen.header("x-client-identity"),
                None,
                "the spoofed header is removed"
            );
        } else {
            assert!(
                anonymous.is_err(),
                "required refuses a client without a certificate"
            );
        }
    }
}

/// `https://` and `wss://` upstream servers: verified against the configured CA with the
/// server's name as SNI, refused (502) when they do not verify, reachable with
/// insecure_skip_verify, and given a client certificate when they ask for one.
#[tokio::test]
async fn https_upstreams_are_verified_and_carry_requests_and_websockets() {
    use crate::support::tls::tls_front;
    use crate::support::ws_connect;

    let mut backend = HttpBackend::start("a").await;
    let ws_backend = WsBackend::start("w").await;
    let site = site();
    let upstream_cert = site.pki.issue("upstream", &["localhost"]);
    let https = tls_front(&upstream_cert, backend.addr, None).await;
    let wss = tls_front(&upstream_cert, ws_backend.addr, None).await;
    let stranger_pki = Pki::new();
    let stranger_cert = stranger_pki.issue("stranger", &["localhost"]);
    let stranger = tls_front(&stranger_cert, backend.addr, None).await;
    let client_cert = site.pki.issue("proxy-client", &["proxy.test"]);
    let picky = tls_front(&upstream_cert, backend.addr, Some(site.pki.ca_der())).await;
    let ca = site.pki.ca_file();
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
         [[route]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"ws\"\n\n\
         [[route]]\nname = \"stranger\"\npath = \"/stranger\"\nupstream = \"stranger\"\n\n\
         [[route]]\nname = \"trusting\"\npath = \"/trusting\"\nupstream = \"trusting\"\n\n\
         [[route]]\nname = \"picky\"\npath = \"/picky\"\nupstream = \"picky\"\n\n\
         [[upstream]]\nname = \"app\"\nservers = [\"https://localhost:{}\"]\ntls = {{ ca = {ca:?} }}\n\n\
         [[upstream]]\nname = \"ws\"\nservers = [\"wss://localhost:{}\"]\ntls = {{ ca = {ca:?} }}\n\n\
         [[upstream]]\nname = \"stranger\"\nservers = [\"https://localhost:{}\"]\ntls = {{ ca = {ca:?} }}\n\n\
         [[upstream]]\nname = \"trusting\"\nservers = [\"https://localhost:{}\"]\ntls = {{ insecure_skip_verify = true }}\n\n\
         [[upstream]]\nname = \"picky\"\nservers = [\"https://localhost:{}\"]\n\
         tls = {{ ca = {ca:?}, client_cert = {:?}, client_key = {:?} }}\n",
        https.port(),
        wss.port(),
        stranger.port(),
        stranger.port(),
        picky.port(),
        client_cert.cert,
        client_cert.key,
    );
    let gw = TestGateway::start(&config).await;

    let reply = crate::support::get(gw.addr, "app.test", "/hello").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = backend.next_request().await;
    assert_eq!(seen.uri, "/hello");
    assert_eq!(seen.header("host"), Some("app.test"));

    let (mut ws, _) = ws_connect(gw.addr, "/ws").await;
    within(WAIT, ws.send(Message::Text("over wss upstream".into())))
        .await
        .unwrap();
    let echo = within(WAIT, ws.next()).await.expect("an echo").unwrap();
    assert_eq!(echo, Message::Text("over wss upstream".into()));

    let reply = crate::support::get(gw.addr, "app.test", "/stranger").await;
    assert_eq!(reply.status, 502, "an unverifiable upstream is refused");

    let reply = crate::support::get(gw.addr, "app.test", "/trusting").await;
    assert_eq!(reply.status, 200, "insecure_skip_verify reaches it");
    assert_eq!(backend.next_request().await.uri, "/trusting");

    let reply = crate::support::get(gw.addr, "app.test", "/picky").await;
    assert_eq!(reply.status, 200, "the client certificate is presented");
    assert_eq!(backend.next_request().await.uri, "/picky");
}

#[tokio::test]
async fn min_version_refuses_older_clients() {
    let site = site();
    let tls12_only = |pki: &Pki| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    };
    let default = TestGateway::start(&tls_config(&[&site.exact], "", "")).await;
    let stream = tls_connect(default.addr, "a.test", tls12_only(&site.pki))
        .await
        .expect("TLS 1.2 is accepted by default");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let strict = TestGateway::start(&tls_config(&[&site.exact], "min_version = \"1.3\"", "")).await;
    assert!(tls_connect(strict.addr, "a.test", tls12_only(&site.pki))
        .await
        .is_err());
    let stream = tls_connect(strict.addr, "a.test", site.pki.client_config(&[]))
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}
