//! Bytes on a socket, for what a well-behaved client library will not send or a well-behaved
//! server will not do: a raw TCP client, and misbehaving backends (silent, refused, scripted).

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use wsgate::websocket::frame;

use super::ws::switching_protocols;
use super::{within, WAIT};

/// Heads larger than this are a harness bug, not something to wait for.
const MAX_HEAD: usize = 1024 * 1024;

/// A response head as text, parsed just enough to assert on.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub raw: String,
}

impl Head {
    fn parse(raw: String) -> Head {
        let mut lines = raw.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line");
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        Head {
            status,
            headers,
            raw,
        }
    }

    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

#[derive(Debug)]
pub struct RawResponse {
    pub head: Head,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A TCP client that writes exactly the bytes it is given.
pub struct RawClient {
    stream: TcpStream,
    /// Read but not yet consumed.
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect");
        let _ = stream.set_nodelay(true);
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects from `local` (::1 beside 127.0.0.1 is another client).
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> RawClient {
        RawClient {
            stream: connect_from(addr, local).await,
            buf: Vec::new(),
        }
    }

    /// Writes all of `bytes` in one write call (one segment on loopback, for small writes).
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within(WAIT, self.stream.write_all(bytes.as_ref()))
            .await
            .expect("write");
    }

    /// Closes our write side only.
    pub async fn shutdown_write(&mut self) {
        within(WAIT, self.stream.shutdown())
            .await
            .expect("shutdown(Write)");
    }

    /// Reads more into `buf`; `false` at EOF. A reset counts as EOF: the peer has gone.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match within(WAIT, self.stream.read(&mut chunk)).await {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(err) if err.kind() == ErrorKind::ConnectionReset => false,
            Err(err) => panic!("read: {err}"),
        }
    }

    /// The next response head; bytes after it stay buffered.
    pub async fn read_head(&mut self) -> Head {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let text = String::from_utf8(head).expect("ASCII head");
                return Head::parse(text.trim_end().to_owned());
            }
            assert!(self.buf.len() < MAX_HEAD, "head too large");
            if !self.fill().await {
                panic!(
                    "connection closed before a full head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// The next whole WebSocket frame: its header and its payload, unmasked.
    pub async fn read_frame(&mut self) -> (frame::Header, Vec<u8>) {
        loop {
            if let Some((header, len)) = frame::Header::parse(&self.buf) {
                let mut payload = self.read_exact(len + header.payload_len as usize).await;
                payload.drain(..len);
                if let Some(key) = header.mask {
                    frame::apply_mask(&mut payload, key, 0);
                }
                return (header, payload);
            }
            if !self.fill().await {
                panic!("connection closed before a whole frame header");
            }
        }
    }

    /// Exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if !self.fill().await {
                panic!(
                    "connection closed after {} of {n} bytes: {:?}",
                    self.buf.len(),
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Everything until the peer closes.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// A head and its body: by Content-Length, chunked, or until close.
    pub async fn read_response(&mut self) -> RawResponse {
        let head = self.read_head().await;
        let body = if let Some(len) = head.header("content-length") {
            let len = len.parse().expect("numeric Content-Length");
            self.read_exact(len).await
        } else if head
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            self.read_chunked().await
        } else if head.status == 101 || head.status == 204 || head.status == 304 {
            Vec::new()
        } else {
            self.read_to_close().await
        };
        RawResponse { head, body }
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await, "connection closed inside a chunked body");
        }
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).expect("chunk size");
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line().await.is_empty() {}
                return body;
            }
            body.extend(self.read_exact(size).await);
            assert_eq!(self.read_exact(2).await, b"\r\n", "chunk terminator");
        }
    }
}

/// A TCP connection to `addr` from `local`, with TCP_NODELAY.
async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> TcpStream {
    let socket = match local {
        std::net::IpAddr::V4(_) => TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind the client address");
    let stream = within(WAIT, socket.connect(addr)).await.expect("connect");
    let _ = stream.set_nodelay(true);
    stream
}

/// Connects, sends `bytes`, and reads one response.
pub async fn exchange(addr: SocketAddr, bytes: impl AsRef<[u8]>) -> RawResponse {
    let mut client = RawClient::connect(addr).await;
    client.send(bytes).await;
    client.read_response().await
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads a request head off `stream`: the head as text and whatever followed it.
pub async fn read_request_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).expect("ASCII head"), rest);
        }
        assert!(buf.len() < MAX_HEAD, "request head too large");
        let n = within(WAIT, stream.read(&mut chunk))
            .await
            .expect("read a request head");
        assert!(n > 0, "closed before a full request head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in a raw head (case-insensitive), if present.
pub fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A backend running `handler` on every connection it accepts; listening when this returns.
pub async fn raw_backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = within(WAIT, TcpListener::bind("127.0.0.1:0"))
        .await
        .expect("backend binds");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handler(stream));
            }
        }
    });
    addr
}

/// A backend that reads each request head, reports it, and never answers (it keeps the
/// connection open until the gateway closes it).
pub struct SilentBackend {
    pub addr: SocketAddr,
    heads: mpsc::UnboundedReceiver<String>,
}

impl SilentBackend {
    /// The next request head it received.
    pub async fn next_head(&mut self) -> String {
        within(WAIT, self.heads.recv())
            .await
            .expect("backend running")
    }
}

pub async fn silent_backend() -> SilentBackend {
    let (tx, heads) = mpsc::unbounded_channel();
    let addr = raw_backend(move |mut stream| {
        let tx = tx.clone();
        async move {
            let (head, _) = read_request_head(&mut stream).await;
            let _ = tx.send(head);
            let mut sink = [0u8; 4096];
            // Until the gateway hangs up; nothing is ever written.
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        }
    })
    .await;
    SilentBackend { addr, heads }
}

/// A backend that answers each WebSocket handshake with its 101 and, in the same write,
/// `early` bytes (as if the server spoke first), then holds the connection open.
pub async fn early_data_backend(early: Vec<u8>) -> SocketAddr {
    raw_backend(move |mut stream| {
        let early = early.clone();
        async move {
            let (head, _) = read_request_head(&mut stream).await;
            let mut answer = switching_protocols(&head).into_bytes();
            answer.extend_from_slice(&early);
            let _ = stream.write_all(&answer).await;
            let _ = stream.read(&mut [0u8; 1024]).await;
        }
    })
    .await
}

/// A WebSocket backend the test drives byte by byte: each handshake is answered with its 101
/// (plus `extra` header lines), then the head and the connection are handed to the test.
pub async fn upgraded_backend(
    extra: &'static str,
) -> (SocketAddr, mpsc::UnboundedReceiver<(String, RawClient)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = raw_backend(move |mut stream| {
        let tx = tx.clone();
        async move {
            let (head, rest) = read_request_head(&mut stream).await;
            let mut answer = switching_protocols(&head);
            if !extra.is_empty() {
                // Before the blank line that ends the head.
                answer.truncate(answer.len() - 2);
                answer.push_str(extra);
                answer.push_str("\r\n\r\n");
            }
            if stream.write_all(answer.as_bytes()).await.is_ok() {
                let _ = stream.set_nodelay(true);
                let _ = tx.send((head, RawClient { stream, buf: rest }));
            }
        }
    })
    .await;
    (addr, rx)
}

/// The response `refusing_backend` gives to everything.
pub const FORBIDDEN: &str =
    "HTTP/1.1 403 Forbidden\r\nContent-Length: 20\r\nX-Reason: policy\r\n\r\nforbidden by backend";

/// A backend that refuses every request, handshakes included, with `FORBIDDEN`. Several
/// requests may arrive on one (pooled) connection.
pub async fn refusing_backend() -> SocketAddr {
    raw_backend(|mut stream| async move {
        while next_request_head(&mut stream).await.is_some() {
            if stream.write_all(FORBIDDEN.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// The next request head on a connection, or `None` once the peer has closed it.
async fn next_request_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.truncate(end);
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An address that refuses connections: the port stays bound (so nothing else takes it) but
/// never listens. Keep the socket alive as long as the address is in use.
pub fn dead_address() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind without listening");
    let addr = socket.local_addr().expect("bound address");
    (socket, addr)
}
