//! An HTTP/1.1 client on hyper's connection API (one TCP connection per `Client`), so a test
//! decides exactly which requests share a connection.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{within, WAIT};

/// The body type of every request and backend response in the harness.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn empty() -> Body {
    Empty::new().boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A request builder with its Host header set (hyper's client never adds one).
pub fn request(method: &str, host: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }
}

pub struct Client {
    sender: SendRequest<Body>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = within(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect to the gateway");
        let (sender, connection) = within(WAIT, http1::handshake(TokioIo::new(stream)))
            .await
            .expect("HTTP/1.1 client handshake");
        tokio::spawn(connection);
        Client { sender }
    }

    /// Sends and returns the response head; the body is the caller's to read.
    pub async fn send(&mut self, request: Request<Body>) -> Response<Incoming> {
        within(WAIT, self.sender.ready())
            .await
            .expect("connection is usable");
        within(WAIT, self.sender.send_request(request))
            .await
            .expect("response from the gateway")
    }

    /// Sends and reads the whole response.
    pub async fn fetch(&mut self, request: Request<Body>) -> Reply {
        let response = self.send(request).await;
        let (parts, body) = response.into_parts();
        let body = within(WAIT, body.collect())
            .await
            .expect("response body")
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// True once the gateway closed this connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// `GET path` with this Host on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    let mut client = Client::connect(addr).await;
    client
        .fetch(request("GET", host, path).body(empty()).unwrap())
        .await
}
