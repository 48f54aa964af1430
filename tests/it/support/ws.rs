//! WebSocket on both ends: a tokio-tungstenite echo backend that records each handshake and
//! close frame, picks a subprotocol and answers an extension offer; a client; and the raw
//! frame and handshake bytes for tests that must control every byte.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
use tokio_tungstenite::WebSocketStream;

use super::raw::head_header;
use super::{within, WAIT};

pub type WsStream = WebSocketStream<TcpStream>;

/// The extension answer the echo backend gives to any permessage-deflate offer.
pub const DEFLATE_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_max_window_bits=10";

/// Big enough for the 16 MiB messages (tungstenite's default frame limit is exactly 16 MiB).
pub fn config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..WebSocketConfig::default()
    }
}

/// A text message `close:CODE` makes the backend close with that code and reason
/// `backend bye`; anything else text or binary is echoed.
pub struct WsBackend {
    pub addr: SocketAddr,
    handshakes: mpsc::UnboundedReceiver<HeaderMap>,
    closes: mpsc::UnboundedReceiver<Option<CloseFrame<'static>>>,
}

impl WsBackend {
    pub async fn start(name: &str) -> WsBackend {
        let listener = within(WAIT, TcpListener::bind("127.0.0.1:0"))
            .await
            .expect("backend binds");
        let addr = listener.local_addr().expect("backend address");
        let (handshake_tx, handshakes) = mpsc::unbounded_channel();
        let (close_tx, closes) = mpsc::unbounded_channel();
        let name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(echo(
                    stream,
                    name.clone(),
                    handshake_tx.clone(),
                    close_tx.clone(),
                ));
            }
        });
        WsBackend {
            addr,
            handshakes,
            closes,
        }
    }

    /// The request headers of the next handshake it accepted.
    pub async fn next_handshake(&mut self) -> HeaderMap {
        within(WAIT, self.handshakes.recv())
            .await
            .expect("backend running")
    }

    /// The next close frame a client sent it (`None`: a close frame without a code).
    pub async fn next_close(&mut self) -> Option<CloseFrame<'static>> {
        within(WAIT, self.closes.recv())
            .await
            .expect("backend running")
    }
}

async fn echo(
    stream: TcpStream,
    name: String,
    handshakes: mpsc::UnboundedSender<HeaderMap>,
    closes: mpsc::UnboundedSender<Option<CloseFrame<'static>>>,
) {
    // tungstenite's callback signature returns its (large) error response by value.
    #[allow(clippy::result_large_err)]
    let callback = |request: &server::Request, mut response: server::Response| {
        let _ = handshakes.send(request.headers().clone());
        let headers = response.headers_mut();
        headers.insert("x-backend", HeaderValue::from_str(&name).unwrap());
        // Prefer `superchat`, else the first protocol offered.
        let offered: Vec<String> = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        let chosen = offered
            .iter()
            .find(|p| *p == "superchat")
            .or(offered.first());
        if let Some(chosen) = chosen {
            headers.insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(chosen).unwrap(),
            );
        }
        let deflate = request
            .headers()
            .get("sec-websocket-extensions")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("permessage-deflate"));
        if deflate {
            headers.insert(
                "sec-websocket-extensions",
                HeaderValue::from_static(DEFLATE_ANSWER),
            );
        }
        Ok(response)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config())).await
    else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(text) if text.starts_with("close:") => {
                let code: u16 = text["close:".len()..].parse().expect("close:CODE");
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "backend bye".into(),
                };
                let _ = ws.close(Some(frame)).await;
            }
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(message).await.is_err() {
                    return;
                }
            }
            Message::Close(frame) => {
                let _ = closes.send(frame.map(CloseFrame::into_owned));
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// A WebSocket client through the gateway at `addr`, for `path`.
pub async fn ws_connect(addr: SocketAddr, path: &str) -> (WsStream, Response) {
    let request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("ws URL");
    ws_connect_with(addr, request).await
}

/// Like `ws_connect`, with a prepared handshake request.
pub async fn ws_connect_with(addr: SocketAddr, request: Request) -> (WsStream, Response) {
    let stream = within(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect to the gateway");
    within(
        WAIT,
        tokio_tungstenite::client_async_with_config(request, stream, Some(config())),
    )
    .await
    .expect("WebSocket handshake through the gateway")
}

/// The next message that is not a ping or pong.
pub async fn next_message(ws: &mut WsStream) -> Message {
    loop {
        let message = within(WAIT, ws.next())
            .await
            .expect("stream ended before a message")
            .expect("message");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

/// The RFC 6455 sample key: valid, and its accept value is well known.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A WebSocket handshake request head, with `extra` header lines (`Name: value`).
pub fn handshake(host: &str, path: &str, extra: &[&str]) -> String {
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// The 101 a server answers to request `head`.
pub fn switching_protocols(head: &str) -> String {
    let key = head_header(head, "sec-websocket-key").expect("a handshake");
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}

pub use wsgate::websocket::frame::TEXT;

/// One final frame; client frames are masked (RFC 6455 §5.3), server frames are not.
pub fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mask = masked.then_some([0x37, 0xfa, 0x21, 0x3d]);
    wsgate::websocket::frame::encode(&mut out, opcode, payload, mask);
    out
}

/// A handshake offering `protocols`, e.g. `chat,superchat` (tungstenite's client splits the
/// offer on `,` without trimming, so no spaces).
pub fn request_with_protocols(addr: SocketAddr, path: &str, protocols: &str) -> Request {
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("ws URL");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(protocols).unwrap(),
    );
    request
}
