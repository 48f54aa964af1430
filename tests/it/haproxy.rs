//! wsgate behind a real HAProxy in TCP mode, the way an L4 balancer fronts it: HAProxy sends a
//! PROXY v1 or v2 header, and the client address HAProxy saw (::1 here: HAProxy binds [::1] and
//! reaches wsgate from its own 127.0.0.1) is the one the backend is told. `.ci/run` installs
//! Debian's haproxy; without /usr/sbin/haproxy the tests print `SKIP haproxy test: ...` and pass.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::binary::{wait_until_connectable, TempFile};
use crate::support::raw::RawClient;
use crate::support::ws::WsBackend;
use crate::support::*;

const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy in the foreground, killed when dropped.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _config: TempFile,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed() -> bool {
    let there = Path::new(HAPROXY).exists();
    if !there {
        eprintln!("SKIP haproxy test: {HAPROXY} is not installed (apt-get install haproxy)");
    }
    there
}

/// HAProxy on a free [::1] port, forwarding every connection to `gateway` with
/// `send_proxy` (`send-proxy` for v1, `send-proxy-v2`).
async fn haproxy_in_front(gateway: SocketAddr, send_proxy: &str) -> Haproxy {
    let port = {
        let probe = std::net::TcpListener::bind("[::1]:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let addr: SocketAddr = (Ipv6Addr::LOCALHOST, port).into();
    let config = TempFile::new(
        "haproxy.cfg",
        &format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend edge\n  bind {addr}\n  default_backend wsgate\n\
             backend wsgate\n  server gw {gateway} {send_proxy}\n"
        ),
    );
    let child = Command::new(HAPROXY)
        .args(["-db", "-f"])
        .arg(&config.path)
        .stdin(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let haproxy = Haproxy {
        child,
        addr,
        _config: config,
    };
    within(
        WAIT,
        tokio::task::spawn_blocking(move || wait_until_connectable(addr)),
    )
    .await
    .expect("haproxy accepts");
    haproxy
}

fn behind_haproxy(rest: &str) -> String {
    format!(
        "{rest}\n[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\n\
         proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]\n"
    )
}

#[tokio::test]
async fn behind_haproxy_the_backend_sees_the_client_haproxy_saw_with_v1_and_v2() {
    if !installed() {
        return;
    }
    let mut backend = HttpBackend::start("a").await;
    let gw = TestGateway::start(&behind_haproxy(&proxy_config(&[backend.addr]))).await;
    for send_proxy in ["send-proxy", "send-proxy-v2"] {
        let haproxy = haproxy_in_front(gw.addr, send_proxy).await;
        let mut client = RawClient::connect(haproxy.addr).await;
        client
            .send("GET /through-haproxy HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            .await;
        let response = client.read_response().await;
        assert_eq!(
            response.status(),
            200,
            "{send_proxy}: {}",
            response.head.raw
        );
        let seen = backend.next_request().await;
        assert_eq!(seen.header("x-forwarded-for"), Some("::1"), "{send_proxy}");
        // RFC 7239 §6: an IPv6 node is bracketed and quoted.
        assert_eq!(
            seen.header("forwarded"),
            Some("for=\"[::1]\";host=app.test;proto=http"),
            "{send_proxy}"
        );
    }
}

#[tokio::test]
async fn a_websocket_through_haproxy_and_wsgate_echoes_and_its_backend_sees_the_client() {
    if !installed() {
        return;
    }
    let mut backend = WsBackend::start("ws").await;
    let gw = TestGateway::start(&behind_haproxy(&proxy_config(&[backend.addr]))).await;
    let haproxy = haproxy_in_front(gw.addr, "send-proxy-v2").await;
    let stream = within(WAIT, tokio::net::TcpStream::connect(haproxy.addr))
        .await
        .expect("connect to haproxy");
    let (mut ws, response) = within(
        WAIT,
        tokio_tungstenite::client_async("ws://app.test/chat", stream),
    )
    .await
    .expect("handshake through haproxy");
    assert_eq!(response.status(), 101);
    let handshake = backend.next_handshake().await;
    assert_eq!(
        handshake
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok()),
        Some("::1")
    );
    within(WAIT, ws.send(Message::text("through two proxies")))
        .await
        .expect("send");
    let echo = within(WAIT, ws.next())
        .await
        .expect("an echo")
        .expect("a message");
    assert_eq!(echo, Message::text("through two proxies"));
}
