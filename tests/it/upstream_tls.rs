//! An upstream server written `https://` or `wss://` is only ever spoken to over TLS: every
//! spelling that validation accepts starts with a ClientHello, and a spelling that names no TLS
//! server (`127.1`, which getaddrinfo reads as 127.0.0.1) is a config error, not plaintext.

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::support::binary::{self, TempFile};
use crate::support::raw::exchange;
use crate::support::tls::Pki;
use crate::support::ws::handshake;
use crate::support::{get, within, TestGateway, WAIT};

/// A TLS record header (content type 0x16 handshake, version 3.x, two length bytes), then
/// handshake type 1: a ClientHello. Six bytes of any HTTP request line look nothing like it.
fn is_client_hello(head: &[u8; 6]) -> bool {
    head[0] == 0x16 && head[1] == 0x03 && head[5] == 0x01
}

/// Sends one request through a gateway whose only server is `server`, reads the first bytes
/// the gateway sends to `listener`, hangs up, and returns them with the client's status.
async fn first_bytes_to_server(
    server: &str,
    listener: &TcpListener,
    ca: &str,
    websocket: bool,
) -> ([u8; 6], u16) {
    let config = format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nservers = [\"{server}\"]\ntls = {{ ca = {ca:?} }}\n"
    );
    let gw = TestGateway::start(&config).await;
    let addr = gw.addr;
    let client = tokio::spawn(async move {
        if websocket {
            exchange(addr, handshake("app.test", "/chat", &[]))
                .await
                .status()
        } else {
            get(addr, "app.test", "/").await.status.as_u16()
        }
    });
    let (mut stream, _) = within(WAIT, listener.accept())
        .await
        .expect("the gateway connects to the server");
    let mut head = [0u8; 6];
    within(WAIT, stream.read_exact(&mut head))
        .await
        .expect("the gateway sends something first");
    drop(stream);
    let status = within(WAIT, client).await.expect("the client task");
    (head, status)
}

#[tokio::test]
async fn https_and_wss_servers_get_a_client_hello_on_every_accepted_spelling() {
    let pki = Pki::new();
    let ca = pki.ca_file().display().to_string();
    let v4 = within(WAIT, TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let v6 = match within(WAIT, TcpListener::bind("[::1]:0")).await {
        Ok(listener) => Some(listener),
        Err(err) => {
            eprintln!("SKIP the [::1] cases: ::1 cannot be bound here: {err}");
            None
        }
    };
    let port = |listener: &TcpListener| listener.local_addr().unwrap().port();
    let mut cases: Vec<(String, &TcpListener)> = Vec::new();
    for scheme in ["https", "wss"] {
        cases.push((format!("{scheme}://localhost:{}", port(&v4)), &v4));
        cases.push((format!("{scheme}://127.0.0.1:{}", port(&v4)), &v4));
        if let Some(v6) = &v6 {
            cases.push((format!("{scheme}://[::1]:{}", port(v6)), v6));
        }
    }
    for (server, listener) in cases {
        let websocket = server.starts_with("wss://");
        let (head, status) = first_bytes_to_server(&server, listener, &ca, websocket).await;
        assert!(
            is_client_hello(&head),
            "{server}: the gateway's first bytes are {head:02x?} ({:?}), not a TLS ClientHello",
            String::from_utf8_lossy(&head)
        );
        // The stand-in hung up mid-handshake: a failed connect, never a plaintext answer.
        assert_eq!(status, 502, "{server}");
    }
}

#[test]
fn check_refuses_tls_servers_without_a_server_name_with_exit_2() {
    let file = TempFile::new(
        "tls-names",
        "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
         [[route]]\nname = \"app\"\nupstream = \"a\"\n\n\
         [[upstream]]\nname = \"a\"\nservers = [\"https://127.1:29991\", \"http://127.1:29991\"]\n\n\
         [[upstream]]\nname = \"b\"\nservers = [{ address = \"wss://1.2.3:29992\" }]\n",
    );
    let output = binary::run(&["check", "--config", &file.display()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let path = file.display();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{path}:11:12: upstream \"a\": server \"https://127.1:29991\": \"127.1\" is not a valid TLS server name (use a DNS name or an IP address)"),
            format!("{path}:15:12: upstream \"b\": server \"wss://1.2.3:29992\": \"1.2.3\" is not a valid TLS server name (use a DNS name or an IP address)"),
            format!("{path}: 2 problem(s)"),
        ],
        "the plain http://127.1 server is not among them"
    );
}

#[test]
fn check_accepts_plain_servers_that_only_getaddrinfo_understands() {
    let file = TempFile::new(
        "plain-shorthand",
        "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"a\"\nservers = [\"http://127.1:29991\", \"ws://127.1:29992\"]\n",
    );
    let output = binary::run(&["check", "--config", &file.display()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
