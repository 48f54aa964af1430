//! HTTP/1.1 on an upstream connection, driven by whoever needs it rather than by a task of its
//! own: the request's task writes the head and body and reads the response head; the response
//! body reads the socket when the client's connection polls it. There is no channel, no second
//! state machine, and an idle connection holds no buffer.
//!
//! Only what a proxy needs: the request head is written from the already-prepared header map,
//! the response head is parsed by httparse (hyper's own parser) straight into an `http`
//! response whose header values share the bytes read, and the body is framed by RFC 9112 §6.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A response head larger than this is refused, as hyper's client would refuse it.
const MAX_HEAD: usize = 64 * 1024;
/// As in hyper's client.
const MAX_HEADERS: usize = 100;
/// First read of a response; reads that fill the buffer double the next one up to `MAX_READ`.
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// A chunk-size line (with extensions) or trailer section longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed before a response")]
    Closed,
    #[error("connection closed before the end of the response")]
    Incomplete,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("connection failed")]
    Io(#[from] io::Error),
    #[error("client request body failed")]
    ClientBody(#[source] BoxError),
}

/// The socket to one server: plain, or TLS (boxed: rustls' state is large, plain is common).
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Tcp(_) => "Stream::Tcp",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Stream::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Stream::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Stream::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(io) => io.is_write_vectored(),
            Stream::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(io) => Pin::new(io).poll_flush(cx),
            Stream::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes (a response without length); the connection ends with it.
    Close,
}

/// One connection to a server, between exchanges or inside one.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    /// Read and not yet used; without capacity between exchanges.
    buf: BytesMut,
    next_read: usize,
    /// The current response's body, as its head framed it.
    body: Decoder,
    /// The exchange so far allows another one on this connection.
    keep_alive: bool,
}

impl super::pool::Reusable for Connection {
    fn is_closed(&mut self) -> bool {
        Connection::is_closed(self)
    }
}

impl Connection {
    pub fn new(stream: Stream) -> Connection {
        Connection {
            stream,
            buf: BytesMut::new(),
            next_read: FIRST_READ,
            body: Decoder::Done,
            keep_alive: true,
        }
    }

    /// Whether an idle connection was closed by its server (or sent something unasked).
    /// Looks without waiting and without a buffer worth the name.
    pub fn is_closed(&mut self) -> bool {
        if let Stream::Tcp(tcp) = &self.stream {
            // Tokio's cached readiness answers without a system call while nothing came.
            return !matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        }
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        !matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// The response was read to its end and nothing stray followed: another request may go.
    pub fn is_reusable(&self) -> bool {
        self.keep_alive && self.body_is_end() && self.buf.is_empty()
    }

    /// Gives the buffer back between exchanges.
    pub fn park(&mut self) {
        self.buf = BytesMut::new();
        self.next_read = FIRST_READ;
    }

    /// After a 101: the socket and whatever the server sent after the head.
    pub fn into_upgraded(self) -> (Stream, Bytes) {
        (self.stream, self.buf.freeze())
    }

    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// Reads once into `buf`; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Tcp(tcp) => loop {
                // Readiness first, so that a connection waiting for a slow answer (a long
                // poll) holds no read buffer meanwhile.
                ready!(tcp.poll_read_ready(cx))?;
                if self.buf.capacity() - self.buf.len() < self.next_read / 2 {
                    self.buf.reserve(self.next_read);
                }
                let spare = self.buf.capacity() - self.buf.len();
                match tcp.try_read_buf(&mut self.buf) {
                    Ok(n) => {
                        if n == spare && self.next_read < MAX_READ {
                            self.next_read *= 2;
                        }
                        return Poll::Ready(Ok(n));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Poll::Ready(Err(err)),
                }
            },
            // rustls may hold decrypted bytes the socket no longer shows as readable, so a TLS
            // stream is read into a scratch buffer and copied.
            Stream::Tls(tls) => {
                let mut scratch = [0u8; FIRST_READ];
                let mut read = ReadBuf::new(&mut scratch);
                ready!(Pin::new(&mut **tls).poll_read(cx, &mut read))?;
                self.buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
        }
    }

    /// Reads until a final response head (interim 1xx answers other than 101 are skipped)
    /// and sets up its body. `read_any` turns true once any byte of a response arrived.
    pub fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        read_any: &mut bool,
    ) -> Poll<Result<http::Response<()>, Error>> {
        loop {
            if !self.buf.is_empty() {
                *read_any = true;
                match self.parse_head(method)? {
                    Parsed::Head(response) => return Poll::Ready(Ok(response)),
                    Parsed::Interim => continue,
                    Parsed::Partial => {}
                }
                if self.buf.len() >= MAX_HEAD {
                    return Poll::Ready(Err(Error::HeadTooLarge));
                }
                // A partial head: the buffer may be one a TLS read filled to the byte.
                if self.buf.capacity() == self.buf.len() {
                    self.buf.reserve(self.next_read);
                }
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(if *read_any {
                    Error::Incomplete
                } else {
                    Error::Closed
                }));
            }
        }
    }

    fn parse_head(&mut self, method: &Method) -> Result<Parsed, Error> {
        // Uninitialised: zeroing 100 fields (3 KiB) cost more than parsing a small head.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len =
            match config.parse_response_with_uninit_headers(&mut parsed, &self.buf, &mut fields) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Error::Invalid("too many headers"))
                }
                Err(_) => return Err(Error::Invalid("malformed head")),
            };
        let code = parsed.code.unwrap_or_default();
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Invalid("status out of range"))?;
        let version = match parsed.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let reason = parsed.reason.unwrap_or_default();
        let odd_reason = !reason.is_empty() && Some(reason) != status.canonical_reason();
        // Where each name and value sits, so that the values can share the bytes read.
        let base = self.buf.as_ptr() as usize;
        let mut places = [const { MaybeUninit::<Place>::uninit() }; MAX_HEADERS];
        let count = parsed.headers.len();
        for (place, field) in places.iter_mut().zip(parsed.headers.iter()) {
            place.write(Place {
                name: (field.name.as_ptr() as usize - base) as u32,
                name_len: field.name.len() as u32,
                value: (field.value.as_ptr() as usize - base) as u32,
                value_len: field.value.len() as u32,
            });
        }
        // SAFETY: the loop above wrote the first `count` places.
        let places =
            unsafe { &*(&places[..count] as *const [MaybeUninit<Place>] as *const [Place]) };
        let reason = odd_reason.then(|| Bytes::copy_from_slice(reason.as_bytes()));
        let head = self.buf.split_to(len).freeze();
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Parsed::Interim);
        }
        let mut headers = HeaderMap::with_capacity(count);
        for place in places {
            let (name, value) = (place.name as usize, place.value as usize);
            let name = HeaderName::from_bytes(&head[name..name + place.name_len as usize])
                .map_err(|_| Error::Invalid("header name"))?;
            let value =
                HeaderValue::from_maybe_shared(head.slice(value..value + place.value_len as usize))
                    .map_err(|_| Error::Invalid("header value"))?;
            headers.append(name, value);
        }
        self.body = Decoder::new(framing(method, status, version, &mut headers)?);
        self.keep_alive = keeps_alive(version, &headers) && self.body.framing() != Framing::Close;
        let mut response = http::Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some(reason) = reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok()) {
            response.extensions_mut().insert(reason);
        }
        Ok(Parsed::Head(response))
    }

    /// The current response body's next frame; `None` at its end.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match self.body.step(&mut self.buf) {
                Step::Frame(frame) => return Poll::Ready(Some(Ok(frame))),
                Step::End => return Poll::Ready(None),
                Step::Invalid(what) => {
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(Error::Invalid(what))));
                }
                Step::More => {}
            }
            let n = match ready!(self.poll_fill(cx)) {
                Ok(n) => n,
                Err(err) => {
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(Error::Io(err))));
                }
            };
            if n == 0 {
                self.keep_alive = false;
                if self.body.framing() == Framing::Close {
                    self.body = Decoder::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(Error::Incomplete)));
            }
        }
    }

    pub fn body_is_end(&self) -> bool {
        matches!(self.body, Decoder::Done | Decoder::Length(0))
    }

    pub fn body_size_hint(&self) -> http_body::SizeHint {
        match self.body {
            Decoder::Done => http_body::SizeHint::with_exact(0),
            Decoder::Length(left) => http_body::SizeHint::with_exact(left),
            _ => http_body::SizeHint::default(),
        }
    }

    /// One request without a body, and its response head (health checks).
    pub async fn request(
        &mut self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
    ) -> Result<http::Response<()>, Error> {
        let head = encode_head(method, target, headers, BodyFraming::None);
        let mut upload = Upload::<http_body_util::Empty<Bytes>>::new(head, None, BodyFraming::None);
        std::future::poll_fn(|cx| upload.poll_write(&mut self.stream, cx)).await?;
        let mut read_any = false;
        std::future::poll_fn(|cx| self.poll_response(cx, method, &mut read_any)).await
    }

    /// Marks the connection as not to be reused (the exchange was abandoned midway).
    pub fn abandon(&mut self) {
        self.keep_alive = false;
    }
}

/// Where a header field sits in the head (a head is under 4 GiB: `MAX_HEAD`).
#[derive(Clone, Copy)]
struct Place {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

enum Parsed {
    Head(http::Response<()>),
    /// Not complete yet.
    Partial,
    /// A 1xx answer other than 101, now skipped.
    Interim,
}

/// RFC 9112 §6.3, for a response to `method`. `Content-Length` beside `Transfer-Encoding` is
/// removed, as the latter wins.
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &mut HeaderMap,
) -> Result<Framing, Error> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(CONTENT_LENGTH);
        let chunked_last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked_last && version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| Error::Invalid("content-length"))?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::Invalid("content-length"));
            }
            let n: u64 = part.parse().map_err(|_| Error::Invalid("content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    match version {
        Version::HTTP_11 => !has("close"),
        _ => has("keep-alive"),
    }
}

/// Where a response body is.
#[derive(Debug)]
enum Decoder {
    Done,
    Length(u64),
    Close,
    /// Before a chunk-size line.
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

enum Step {
    Frame(Frame<Bytes>),
    End,
    /// Needs more bytes.
    More,
    Invalid(&'static str),
}

impl Decoder {
    fn new(framing: Framing) -> Decoder {
        match framing {
            Framing::Empty => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::Close => Decoder::Close,
        }
    }

    fn framing(&self) -> Framing {
        match self {
            Decoder::Done => Framing::Empty,
            Decoder::Length(n) => Framing::Length(*n),
            Decoder::Close => Framing::Close,
            _ => Framing::Chunked,
        }
    }

    /// Takes what it can from `buf`.
    fn step(&mut self, buf: &mut BytesMut) -> Step {
        loop {
            match self {
                Decoder::Done => return Step::End,
                Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Step::End;
                }
                Decoder::Length(left) | Decoder::ChunkData(left) => {
                    if buf.is_empty() {
                        return Step::More;
                    }
                    let take = (*left).min(buf.len() as u64);
                    *left -= take;
                    let data = buf.split_to(take as usize).freeze();
                    match self {
                        Decoder::ChunkData(0) => *self = Decoder::ChunkEnd,
                        Decoder::Length(0) => *self = Decoder::Done,
                        _ => {}
                    }
                    return Step::Frame(Frame::data(data));
                }
                Decoder::Close => {
                    if buf.is_empty() {
                        return Step::More;
                    }
                    return Step::Frame(Frame::data(buf.split().freeze()));
                }
                Decoder::ChunkSize => {
                    let Some(end) = find(buf, b"\r\n") else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Step::Invalid("chunk size line too long")
                        } else {
                            Step::More
                        };
                    };
                    let line = &buf[..end];
                    let digits = line
                        .iter()
                        .position(|&b| b == b';' || b == b' ' || b == b'\t')
                        .unwrap_or(line.len());
                    let Some(size) = parse_hex(&line[..digits]) else {
                        return Step::Invalid("chunk size");
                    };
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Decoder::Trailers
                    } else {
                        Decoder::ChunkData(size)
                    };
                }
                Decoder::ChunkEnd => {
                    if buf.len() < 2 {
                        return Step::More;
                    }
                    if &buf[..2] != b"\r\n" {
                        return Step::Invalid("chunk data not followed by CRLF");
                    }
                    buf.advance(2);
                    *self = Decoder::ChunkSize;
                }
                Decoder::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Decoder::Done;
                        return Step::End;
                    }
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Step::Invalid("trailer section too long")
                        } else {
                            Step::More
                        };
                    };
                    let section = buf.split_to(end + 4);
                    *self = Decoder::Done;
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let Ok(httparse::Status::Complete((_, fields))) =
                        httparse::parse_headers(&section, &mut fields)
                    else {
                        return Step::Invalid("trailer section");
                    };
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for field in fields {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(field.name.as_bytes()),
                            HeaderValue::from_bytes(field.value),
                        ) {
                            trailers.append(name, value);
                        }
                    }
                    return Step::Frame(Frame::trailers(trailers));
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = (b as char).to_digit(16)?;
        Some(size << 4 | u64::from(digit))
    })
}

/// How a request body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    /// As the request's own `Content-Length` says.
    Length,
    Chunked,
}

/// The request head as bytes. Framing as hyper's client chose it: the request's
/// `Content-Length` when it has one, otherwise chunked for a body of unknown length (the
/// client's own `Transfer-Encoding` is hop-by-hop and already gone).
pub fn encode_head(method: &Method, target: &str, headers: &HeaderMap, body: BodyFraming) -> Bytes {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + method.as_str().len()
        + target.len()
        + 64;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if body == BodyFraming::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.into()
}

/// Writes a request: its head, then its body (if any) as `framing` says. Limits are the
/// body's own business (`RequestBody` counts against `max_request_body`).
pub struct Upload<B> {
    staged: VecDeque<Bytes>,
    body: Option<B>,
    chunked: bool,
    /// The body yielded its first frame (after which the request cannot be sent again).
    pub started: bool,
}

impl<B> Upload<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(head: Bytes, body: Option<B>, framing: BodyFraming) -> Upload<B> {
        let mut staged = VecDeque::with_capacity(4);
        staged.push_back(head);
        Upload {
            staged,
            body: body.filter(|_| framing != BodyFraming::None),
            chunked: framing == BodyFraming::Chunked,
            started: false,
        }
    }

    /// Ready once the whole request is written. A failure of the client's body is
    /// `Error::ClientBody`; of the socket, `Error::Io`.
    pub fn poll_write(
        &mut self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            while !self.staged.is_empty() {
                let mut slices = [IoSlice::new(&[]); 4];
                let mut count = 0;
                for (slice, bytes) in slices.iter_mut().zip(&self.staged) {
                    *slice = IoSlice::new(bytes);
                    count += 1;
                }
                let mut n =
                    ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count]))?;
                if n == 0 {
                    return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
                }
                while n > 0 {
                    let front = self
                        .staged
                        .front_mut()
                        .expect("written from what is staged");
                    if n >= front.len() {
                        n -= front.len();
                        self.staged.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    if self.chunked {
                        self.staged.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                Some(Err(err)) => {
                    self.body = None;
                    return Poll::Ready(Err(Error::ClientBody(err.into())));
                }
                Some(Ok(frame)) => {
                    self.started = true;
                    match frame.into_data() {
                        Ok(data) if data.is_empty() => {}
                        Ok(data) if self.chunked => {
                            self.staged
                                .push_back(format!("{:x}\r\n", data.len()).into());
                            self.staged.push_back(data);
                            self.staged.push_back(Bytes::from_static(b"\r\n"));
                        }
                        Ok(data) => self.staged.push_back(data),
                        Err(frame) => {
                            // Trailers end a chunked body; a fixed-length one has no room.
                            if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                                let mut end = b"0\r\n".to_vec();
                                for (name, value) in &trailers {
                                    end.extend_from_slice(name.as_str().as_bytes());
                                    end.extend_from_slice(b": ");
                                    end.extend_from_slice(value.as_bytes());
                                    end.extend_from_slice(b"\r\n");
                                }
                                end.extend_from_slice(b"\r\n");
                                self.staged.push_back(end.into());
                                self.body = None;
                                self.chunked = false;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Nothing of the body has been taken yet: the request can go again on a new connection.
    pub fn restart(self, head: Bytes) -> Upload<B> {
        Upload {
            staged: VecDeque::from([head]),
            body: self.body,
            chunked: self.chunked,
            started: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(framing: Framing, wire: &[&[u8]]) -> (Vec<u8>, Option<HeaderMap>, bool) {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let (mut body, mut trailers) = (Vec::new(), None);
        for piece in wire {
            buf.extend_from_slice(piece);
            loop {
                match decoder.step(&mut buf) {
                    Step::Frame(frame) => match frame.into_data() {
                        Ok(data) => body.extend_from_slice(&data),
                        Err(frame) => trailers = frame.into_trailers().ok(),
                    },
                    Step::End => return (body, trailers, true),
                    Step::More => break,
                    Step::Invalid(what) => panic!("invalid: {what}"),
                }
            }
        }
        (body, trailers, false)
    }

    #[test]
    fn chunked_bodies_decode_across_any_split_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 9\r\n\r\n";
        for split in 0..wire.len() {
            let (a, b) = wire.split_at(split);
            let (body, trailers, done) = decode(Framing::Chunked, &[a, b]);
            assert!(done, "split at {split}");
            assert_eq!(body, b"hello, world");
            assert_eq!(trailers.unwrap()["x-sum"], "9");
        }
        let (body, trailers, done) = decode(Framing::Chunked, &[b"3\r\nabc\r\n0\r\n\r\n"]);
        assert_eq!(
            (body.as_slice(), trailers.is_none(), done),
            (&b"abc"[..], true, true)
        );
    }

    #[test]
    fn bad_chunk_framing_is_invalid_not_guessed() {
        for wire in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"12345678901234567\r\n"] {
            let mut decoder = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(wire);
            let outcome = loop {
                match decoder.step(&mut buf) {
                    Step::Frame(_) => continue,
                    other => break other,
                }
            };
            assert!(matches!(outcome, Step::Invalid(_)), "{wire:?}");
        }
    }

    #[test]
    fn a_fixed_length_body_ends_at_its_length() {
        let (body, _, done) = decode(Framing::Length(5), &[b"he", b"llo"]);
        assert_eq!((body.as_slice(), done), (&b"hello"[..], true));
    }

    fn framing_of(method: Method, status: u16, headers: &[(&str, &str)]) -> Result<Framing, Error> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        framing(
            &method,
            StatusCode::from_u16(status).unwrap(),
            Version::HTTP_11,
            &mut map,
        )
    }

    #[test]
    fn response_framing_follows_rfc_9112_section_6_3() {
        use Framing::*;
        let get = || Method::GET;
        assert_eq!(
            framing_of(Method::HEAD, 200, &[("content-length", "10")]).unwrap(),
            Empty
        );
        assert_eq!(framing_of(get(), 204, &[]).unwrap(), Empty);
        assert_eq!(
            framing_of(get(), 304, &[("content-length", "10")]).unwrap(),
            Empty
        );
        assert_eq!(
            framing_of(get(), 200, &[("content-length", "10")]).unwrap(),
            Length(10)
        );
        assert_eq!(
            framing_of(get(), 200, &[("content-length", "10, 10")]).unwrap(),
            Length(10)
        );
        assert_eq!(
            framing_of(
                get(),
                200,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ]
            )
            .unwrap(),
            Chunked
        );
        assert_eq!(
            framing_of(get(), 200, &[("transfer-encoding", "gzip")]).unwrap(),
            Close
        );
        assert_eq!(framing_of(get(), 200, &[]).unwrap(), Close);
        for bad in ["abc", "-1", "", "1 0"] {
            assert!(
                framing_of(get(), 200, &[("content-length", bad)]).is_err(),
                "{bad:?}"
            );
        }
        assert!(framing_of(
            get(),
            200,
            &[("content-length", "1"), ("content-length", "2")]
        )
        .is_err());
    }

    #[test]
    fn the_request_head_is_written_from_the_map_with_chunked_added_only_when_asked() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "a.test".parse().unwrap());
        headers.append("x-two", "1".parse().unwrap());
        headers.append("x-two", "2".parse().unwrap());
        let head = encode_head(&Method::POST, "/p?q=1", &headers, BodyFraming::Chunked);
        assert_eq!(
            &head[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: a.test\r\nx-two: 1\r\nx-two: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let head = encode_head(&Method::GET, "/", &headers, BodyFraming::None);
        assert!(!head.windows(8).any(|w| w == b"transfer"));
    }
}
