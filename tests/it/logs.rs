//! Log output of the real binary: plain text when stderr is not a terminal, and JSON lines with
//! the documented fields.

use std::io::{Read, Write};
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;
use wsgate::telemetry::fields;

use crate::support::binary::{self, TempFile};
use crate::support::ws::{handshake, next_message};
use crate::support::{dead_address, within, ws_connect, HttpBackend, WsBackend, WAIT};

const CONFIG: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
                      [[route]]\nname = \"health\"\nrespond = { status = 200, body = \"up\" }\n";

/// A file, journald or a pipe gets no colour codes, with `NO_COLOR` unset (the support code
/// removes it), so it is wsgate that notices stderr is not a terminal.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let config = TempFile::new("plain-logs", CONFIG);
    let mut gateway = binary::Gateway::spawn(&config.path);
    gateway.wait_for_line("listening");
    gateway.wait_for_signal_handlers();
    gateway.signal("TERM");
    gateway.wait_for_line("drained");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
    let log = gateway.log.join("\n");
    assert!(gateway.log.len() >= 3, "{log}");
    assert!(log.contains(" INFO "), "levels are plain words: {log}");
    assert!(
        !log.contains("\x1b["),
        "colour codes in a piped log:\n{log:?}"
    );
}

/// An invalid `RUST_LOG` is said, not silently replaced by the configured level.
#[test]
fn an_invalid_rust_log_is_reported_and_the_config_level_used() {
    let config = TempFile::new("bad-rust-log", CONFIG);
    let mut gateway = binary::Gateway::spawn_with_env(&config.path, &[("RUST_LOG", "wsgate=[")]);
    let warning = gateway.wait_for_line("RUST_LOG is not a valid filter");
    assert!(warning.contains("wsgate=["), "{warning}");
    // The configured level (info by default) is in force.
    gateway.wait_for_line("listening");
    gateway.wait_for_signal_handlers();
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
}

/// `[log] format = "json"`: after a proxied request, a WebSocket that opens and closes, a
/// refused handshake, a request whose servers are both dead (a failover, two ejections, a
/// 502) and a reload, every stderr line is one JSON object, and each event's line carries its
/// documented fields (`telemetry::fields::EVENTS`): the request's with the connection span's
/// (listener, peer), the failover's and the ejections' with the request span's too, the
/// tunnel's naming its connection and request itself.
#[test]
fn json_lines_carry_each_event_s_documented_fields_and_the_span_fields() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let http = runtime.block_on(HttpBackend::start("b"));
    let ws = runtime.block_on(WsBackend::start("w"));
    let (_dead_a, dead_a) = dead_address();
    let (_dead_b, dead_b) = dead_address();
    let config = TempFile::new(
        "json-logs",
        &format!(
            "[log]\nformat = \"json\"\n\n\
             [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
             [[route]]\nname = \"chat\"\npath = \"/ws\"\nupstream = \"ws\"\n\n\
             [[route]]\nname = \"gone\"\npath = \"/gone\"\nupstream = \"dead\"\n\n\
             [[route]]\nname = \"app\"\npath = \"/\"\nupstream = \"app\"\n\n\
             [[upstream]]\nname = \"ws\"\nservers = [\"{}\"]\n\n\
             [[upstream]]\nname = \"app\"\nservers = [\"{}\"]\n\n\
             [[upstream]]\nname = \"dead\"\nservers = [\"{dead_a}\", \"{dead_b}\"]\n\
             [upstream.passive]\nfail = 1\n",
            ws.addr, http.addr
        ),
    );
    let mut gateway = binary::Gateway::spawn(&config.path);
    let listening = parse(&gateway.wait_for_line("\"listening\""));
    let addr: SocketAddr = text(&listening, "address").parse().expect("an address");

    assert!(binary::get(addr, "/hello?x=1").starts_with("HTTP/1.1 200"));
    gateway.wait_for_line("\"event\":\"request\"");

    runtime.block_on(async {
        let (mut socket, _) = ws_connect(addr, "/ws/room").await;
        within(WAIT, socket.send(Message::text("hi")))
            .await
            .unwrap();
        assert_eq!(next_message(&mut socket).await, Message::text("hi"));
        within(WAIT, socket.close(None)).await.unwrap();
        for _ in 0..100 {
            if !matches!(within(WAIT, socket.next()).await, Some(Ok(_))) {
                break;
            }
        }
    });
    gateway.wait_for_line("\"event\":\"tunnel_closed\"");

    let refused = raw_exchange(
        addr,
        &handshake("a.test", "/ws/room", &[]).replace("Version: 13", "Version: 8"),
    );
    assert!(refused.starts_with("HTTP/1.1 426"), "{refused}");
    gateway.wait_for_line("\"event\":\"refused\"");

    assert!(binary::get(addr, "/gone").starts_with("HTTP/1.1 502"));
    gateway.wait_for_line("\"event\":\"upstream_failure\"");

    gateway.wait_for_signal_handlers();
    gateway.signal("HUP");
    gateway.wait_for_line("\"event\":\"reload\"");
    gateway.signal("TERM");
    gateway.wait_for_line("\"drained\"");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));

    let lines: Vec<Map<String, Value>> = gateway.log.iter().map(|line| parse(line)).collect();
    let events = |event: &str| -> Vec<&Map<String, Value>> {
        lines
            .iter()
            .filter(|line| line.get(fields::EVENT).and_then(Value::as_str) == Some(event))
            .collect()
    };
    for (event, names) in fields::EVENTS {
        for line in events(event) {
            for name in *names {
                assert!(line.contains_key(*name), "{event}: no {name} in {line:?}");
            }
        }
    }
    let one = |event: &str| -> &Map<String, Value> {
        match events(event).as_slice() {
            [line] => line,
            other => panic!("{} {event} lines: {other:#?}", other.len()),
        }
    };
    // The plain request's, then the handshake's (101).
    let [request, handshake] = events(fields::event::REQUEST)[..] else {
        panic!("{:#?}", events(fields::event::REQUEST));
    };
    assert_eq!(handshake[fields::STATUS], 101);
    assert_eq!(text(handshake, fields::ROUTE), "chat");
    assert_eq!(text(request, fields::LISTENER), "http");
    assert_eq!(text(request, fields::ROUTE), "app");
    assert_eq!(text(request, fields::METHOD), "GET");
    assert_eq!(text(request, fields::PATH), "/hello", "no query");
    assert_eq!(request[fields::STATUS], 200);
    assert_eq!(text(request, fields::SERVER), http.addr.to_string());
    let peer = text(request, fields::PEER);
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    assert_eq!(text(request, fields::CLIENT), peer);

    let tunnel = one(fields::event::TUNNEL_CLOSED);
    assert_eq!(text(tunnel, "message"), "websocket closed");
    assert_eq!(text(tunnel, fields::LISTENER), "http");
    assert!(text(tunnel, fields::PEER).starts_with("127.0.0.1:"));
    assert_eq!(text(tunnel, fields::METHOD), "GET");
    assert_eq!(text(tunnel, fields::HOST), addr.to_string());
    assert_eq!(text(tunnel, fields::PATH), "/ws/room");
    assert_eq!(text(tunnel, fields::ROUTE), "chat");
    assert_eq!(text(tunnel, fields::UPSTREAM), "ws");
    assert_eq!(tunnel[fields::MESSAGES_UP], 1);
    assert!(
        !tunnel.contains_key(fields::CLIENT_CLOSE_CODE),
        "a Close without a code: {tunnel:?}"
    );

    let refused = one(fields::event::REFUSED);
    assert_eq!(refused[fields::STATUS], 426);
    assert_eq!(text(refused, fields::FAILURE), "bad_handshake");
    assert_eq!(text(refused, fields::ROUTE), "chat");
    assert_eq!(text(refused, fields::LISTENER), "http");

    let failed = one(fields::event::UPSTREAM_FAILURE);
    assert_eq!(failed[fields::STATUS], 502);
    assert_eq!(text(failed, fields::FAILURE), "connect");
    assert_eq!(text(failed, fields::UPSTREAM), "dead");
    assert_eq!(text(failed, fields::ROUTE), "gone");
    assert_eq!(text(failed, fields::LISTENER), "http");
    assert_eq!(level(failed), "WARN");
    // The first server's failure moved the request on; the passive rule ejected both.
    let failover = one(fields::event::FAILOVER);
    assert_eq!(
        text(failover, fields::PATH),
        "/gone",
        "inside the request span"
    );
    assert_eq!(
        text(failover, fields::LISTENER),
        "http",
        "and the connection's"
    );
    let ejections = events(fields::event::HEALTH_CHANGE);
    assert_eq!(ejections.len(), 2, "{ejections:#?}");
    for line in ejections {
        assert_eq!(text(line, fields::STATE), "down");
        assert_eq!(text(line, fields::CHECK), "passive");
        assert_eq!(text(line, fields::ROUTE), "gone", "inside the request span");
    }

    let reload = one(fields::event::RELOAD);
    assert_eq!(text(reload, fields::OUTCOME), "applied");
    assert!(reload.contains_key(fields::SERVERS_ADDED), "{reload:?}");
}

/// One JSON object, or the test fails naming the line.
fn parse(line: &str) -> Map<String, Value> {
    match serde_json::from_str(line) {
        Ok(Value::Object(object)) => object,
        _ => panic!("not one JSON object: {line}"),
    }
}

fn text<'a>(line: &'a Map<String, Value>, key: &str) -> &'a str {
    line.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no text {key} in {line:?}"))
}

fn level(line: &Map<String, Value>) -> &str {
    text(line, "level")
}

/// Writes `request` on a new connection and returns what comes back up to the end of the
/// response head (bounded in time and size).
fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}
