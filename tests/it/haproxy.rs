//! wsgate behind a real HAProxy in TCP mode, the way an L4 balancer fronts it: HAProxy sends a
//! PROXY v1 or v2 header, and the client address HAProxy saw (::1 here: HAProxy binds [::1] and
//! reaches wsgate from its own 127.0.0.1) is the one the backend is told. `.ci/run` installs
//! Debian's haproxy; without /usr/sbin/haproxy the tests print `SKIP haproxy test: ...` and pass.
//!
//! Scale-out (issue 13): HAProxy round robin over three wsgate processes that run one config
//! file, each on a socket passed to it as systemd would.

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::binary::{wait_until_connectable, Gateway, TempFile};
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

/// HAProxy on a free [::1] port, forwarding connections round robin to `gateways` with
/// `send_proxy` (`send-proxy` for v1, `send-proxy-v2`).
async fn haproxy_in_front(gateways: &[SocketAddr], send_proxy: &str) -> Haproxy {
    let port = {
        let probe = std::net::TcpListener::bind("[::1]:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let addr: SocketAddr = (Ipv6Addr::LOCALHOST, port).into();
    let servers: String = gateways
        .iter()
        .enumerate()
        .map(|(i, gateway)| format!("  server gw{i} {gateway} {send_proxy}\n"))
        .collect();
    let config = TempFile::new(
        "haproxy.cfg",
        &format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend edge\n  bind {addr}\n  default_backend wsgate\n\
             backend wsgate\n  balance roundrobin\n{servers}"
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
        let haproxy = haproxy_in_front(&[gw.addr], send_proxy).await;
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
    let haproxy = haproxy_in_front(&[gw.addr], "send-proxy-v2").await;
    let stream = within(WAIT, TcpStream::connect(haproxy.addr))
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

/// The one config every instance runs. `edge` takes the socket passed under that name (its
/// bind address is then unused); the hash on `?user=` is what has to agree across instances.
/// `/end-of-run` is answered by the gateway itself: a last access-log line from each instance.
fn scale_out_config(servers: &[SocketAddr]) -> String {
    behind_haproxy(&format!(
        "[log]\naccess = true\n\n\
         [[route]]\nname = \"end-of-run\"\npath = \"/end-of-run\"\n\
         respond = {{ status = 200, body = \"end\" }}\n\n\
         [[route]]\nname = \"chat\"\nupstream = \"chat\"\n\n\
         {}hash_key = \"query:user\"\n",
        upstream_config("chat", "hash", servers)
    ))
}

/// wsgate on a 127.0.0.1 socket bound here and passed as fd 3 named `edge`: how one config
/// file serves on a different port in each process.
fn spawn_on_own_socket(config: &TempFile) -> (Gateway, SocketAddr) {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a socket to pass");
    let addr = socket.local_addr().expect("its address");
    let mut gateway = Gateway::spawn_with_socket(&config.path, &socket, Some("edge"));
    let line = gateway.wait_for_line("listening");
    assert!(
        line.contains(&format!("address={addr} inherited=true")),
        "not serving the passed socket: {line}"
    );
    (gateway, addr)
}

/// Straight to an instance, whose trusted peer 127.0.0.1 must still send a PROXY header.
const END_OF_RUN: &str = "PROXY UNKNOWN\r\n\
                          GET /end-of-run HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";

/// N in an access-log line for `/chat/vN` (the tunnel's close line names the path too, in its
/// request span).
fn visit_in(line: &str) -> Option<usize> {
    if !line.contains(" event=\"request\"") {
        return None;
    }
    let rest = line.split_once(" path=\"/chat/v")?.1;
    rest.split_once('"')?.0.parse().ok()
}

// Multi-threaded: while a blocking wait reads a process's log, the backends keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_three_wsgates_from_one_config_send_each_key_to_one_backend() {
    if !installed() {
        return;
    }
    const NAMES: [&str; 3] = ["b0", "b1", "b2"];
    const INSTANCES: usize = 3;
    const KEYS: usize = 12;
    // Not a multiple of INSTANCES: otherwise HAProxy hands every instance exactly one visit per
    // key, in lockstep, and the instances' own round robin over the backends would pass too.
    const VISITS_PER_KEY: usize = 4;
    let mut backends = Vec::new();
    for name in NAMES {
        backends.push(WsBackend::start(name).await);
    }
    let servers: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = TempFile::new("scale-out", &scale_out_config(&servers));
    let mut instances: Vec<(Gateway, SocketAddr)> = tokio::task::block_in_place(|| {
        (0..INSTANCES)
            .map(|_| spawn_on_own_socket(&config))
            .collect()
    });
    let addrs: Vec<SocketAddr> = instances.iter().map(|(_, addr)| *addr).collect();
    let haproxy = haproxy_in_front(&addrs, "send-proxy-v2").await;

    // The backend index of each visit (visit = key * VISITS_PER_KEY + n). Key after key, so that
    // HAProxy hands each key to several instances; round after round, 12 keys over 3
    // instances would bring every key back to the instance it had.
    let mut backend_of_visit = Vec::new();
    for key in 0..KEYS {
        for _ in 0..VISITS_PER_KEY {
            let visit = backend_of_visit.len();
            let stream = within(WAIT, TcpStream::connect(haproxy.addr))
                .await
                .expect("connect to haproxy");
            let url = format!("ws://app.test/chat/v{visit}?user=k{key}");
            let (ws, response) = within(WAIT, tokio_tungstenite::client_async(url, stream))
                .await
                .expect("handshake through haproxy and wsgate");
            let name = response
                .headers()
                .get("x-backend")
                .and_then(|v| v.to_str().ok());
            let backend = NAMES
                .iter()
                .position(|n| Some(*n) == name)
                .unwrap_or_else(|| panic!("visit {visit}: x-backend {name:?}"));
            let handshake = backends[backend].next_handshake().await;
            assert_eq!(
                handshake
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok()),
                Some("::1"),
                "visit {visit}: not the client HAProxy saw"
            );
            backend_of_visit.push(backend);
            drop(ws);
        }
    }

    let mut instance_of_visit = vec![None; backend_of_visit.len()];
    for (instance, (gateway, addr)) in instances.iter_mut().enumerate() {
        let mut client = RawClient::connect(*addr).await;
        client.send(END_OF_RUN).await;
        assert_eq!(client.read_response().await.status(), 200);
        // A process writes its log in order: with this line read, so is every earlier one.
        tokio::task::block_in_place(|| gateway.wait_for_line("path=\"/end-of-run\""));
        let served: Vec<usize> = gateway.log.iter().filter_map(|l| visit_in(l)).collect();
        assert!(
            !served.is_empty(),
            "instance {instance} served nothing:\n{}",
            gateway.log.join("\n")
        );
        for visit in served {
            let earlier = instance_of_visit[visit].replace(instance);
            assert_eq!(earlier, None, "visit {visit} logged twice");
        }
    }

    let mut backends_used = BTreeSet::new();
    for key in 0..KEYS {
        let visits = key * VISITS_PER_KEY..(key + 1) * VISITS_PER_KEY;
        let reached: BTreeSet<usize> = visits.clone().map(|v| backend_of_visit[v]).collect();
        let serving: BTreeSet<usize> = visits
            .map(|v| instance_of_visit[v].unwrap_or_else(|| panic!("visit {v} not logged")))
            .collect();
        assert_eq!(
            reached.len(),
            1,
            "k{key}: backends {reached:?} through instances {serving:?}"
        );
        assert!(
            serving.len() >= 2,
            "k{key}: served by instance {serving:?} only, so no instances had to agree"
        );
        backends_used.extend(reached);
    }
    assert!(
        backends_used.len() >= 2,
        "every key hashed to backend {backends_used:?}"
    );
}
