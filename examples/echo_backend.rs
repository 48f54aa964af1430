//! The quick start's demo backend on 127.0.0.1:9000: `/` serves a page whose script opens a
//! WebSocket back to the same origin, `/ws` echoes every message it receives.
//!
//! Run it with `cargo run --release --example echo_backend`, start wsgate, then open
//! http://127.0.0.1:8080/ and watch the messages come back through the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>wsgate echo</title>
<h1>wsgate echo</h1>
<p id="state">connecting…</p>
<form id="form"><input id="text" value="hello through wsgate" size="40"> <button>send</button></form>
<ul id="log"></ul>
<script>
  const log = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    document.getElementById("log").prepend(li);
  };
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.onopen = () => {
    document.getElementById("state").textContent = "connected";
    let n = 0;
    setInterval(() => ws.send(`tick ${++n}`), 1000);
  };
  ws.onmessage = (event) => log(`echo: ${event.data}`);
  ws.onclose = (event) => {
    document.getElementById("state").textContent = `closed (${event.code})`;
  };
  document.getElementById("form").onsubmit = (event) => {
    event.preventDefault();
    ws.send(document.getElementById("text").value);
  };
</script>
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = ([127, 0, 0, 1], 9000).into();
    let listener = TcpListener::bind(addr).await?;
    println!("echo backend on http://{addr}/ (WebSocket echo at /ws)");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(handle);
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(err) = conn.await {
                eprintln!("connection error: {err}");
            }
        });
    }
}

async fn handle(mut request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/ws" {
        let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, "text/html; charset=utf-8".parse().unwrap());
        return Ok(response);
    }
    let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY) else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"WebSocket only\n")));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(response);
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Runs until the stream ends, so that tungstenite can answer a close frame.
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, "upgrade".parse().unwrap());
    headers.insert(UPGRADE, "websocket".parse().unwrap());
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept.parse().unwrap());
    Ok(response)
}
