//! The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 text and v2 binary) that an L4
//! balancer sends before the client's first byte: recognised incrementally, bounded in length,
//! and read from the socket without taking a byte of what follows it.
//!
//! `ppp` parses the fields; this module owns the framing around it (where a header ends, when
//! to wait and when to give up), because `ppp`'s own partial-input answers for v1 are not
//! reliable: `PROXY TCP4 a b 1 ` (the last port not yet arrived) is a terminal error there, and
//! `PROXY UNKNOWN` with more than four fields never completes. Only a whole line reaches `ppp`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use ppp::{v1, v2};
use tokio::io::{AsyncReadExt, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The spec's bound on a v1 line, CRLF included.
pub const MAX_V1_HEADER: usize = 107;
/// The bound wsgate puts on a v2 header. The spec allows 16 + 65,535 bytes; the largest address
/// block is 216 bytes (AF_UNIX), which leaves 304 bytes for TLVs: room for what balancers send
/// (AWS's VPC endpoint id, Azure's link id, GCP's PSC id, a CRC32c, an ALPN or authority), while
/// a peer cannot make wsgate hold 64 KiB before the first byte of TLS.
pub const MAX_V2_HEADER: usize = 536;
/// Enough to see any header wsgate accepts in one peek.
const MAX_HEADER: usize = MAX_V2_HEADER;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and transport, length.
const V2_FIXED: usize = 16;

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header that may still become valid: read more.
    Incomplete,
    /// No more bytes can make this a valid header.
    Malformed(Fault),
    /// The header is the first `header_len` bytes. `source` is the client's address, or `None`
    /// when the balancer speaks for itself (v2 `LOCAL`, a health check) or does not know
    /// (v1 `UNKNOWN`, v2 `UNSPEC`): the socket's peer is then the client.
    Done {
        header_len: usize,
        source: Option<SocketAddr>,
    },
}

/// Why bytes are not a PROXY header wsgate accepts; the text names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 line has no CRLF within {MAX_V1_HEADER} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("PROXY v2 header of {0} bytes is over wsgate's limit of {MAX_V2_HEADER}")]
    V2TooLong(usize),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("unsupported PROXY v2 address: {0} (only TCP over IPv4 or IPv6 names a client)")]
    Unsupported(&'static str),
}

/// Recognises a PROXY header at the start of `buf`, which may hold only part of it, or the
/// header and the bytes after it.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Parsed::Malformed(Fault::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let seen = buf.len().min(V1_PREFIX.len());
    if buf[..seen] != V1_PREFIX[..seen] {
        return Parsed::Malformed(Fault::NotProxy);
    }
    // The CR must leave room for its LF within the bound.
    let window = &buf[..buf.len().min(MAX_V1_HEADER - 1)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if window.len() == MAX_V1_HEADER - 1 {
            Parsed::Malformed(Fault::V1TooLong)
        } else {
            Parsed::Incomplete
        };
    };
    let header_len = cr + 2;
    if buf.len() < header_len {
        return Parsed::Incomplete;
    }
    let line = &buf[..header_len];
    // The spec has the receiver ignore whatever UNKNOWN is followed by, up to the CRLF.
    if let Some(rest) = line.strip_prefix(b"PROXY UNKNOWN") {
        if matches!(rest.first(), Some(b' ' | b'\r')) && rest.ends_with(b"\r\n") {
            return Parsed::Done {
                header_len,
                source: None,
            };
        }
    }
    match v1::Header::try_from(line) {
        Ok(header) => Parsed::Done {
            header_len,
            source: match header.addresses {
                v1::Addresses::Tcp4(ip) => Some((ip.source_address, ip.source_port).into()),
                v1::Addresses::Tcp6(ip) => Some((ip.source_address, ip.source_port).into()),
                v1::Addresses::Unknown => None,
            },
        },
        Err(err) => Parsed::Malformed(Fault::V1(v1_fault(&err))),
    }
}

/// `ppp`'s verdict on a whole line. "Missing" errors are final here: the line has ended.
fn v1_fault(err: &v1::BinaryParseError) -> &'static str {
    use v1::ParseError as E;
    match err {
        v1::BinaryParseError::InvalidUtf8(_) => "not ASCII text",
        v1::BinaryParseError::Parse(err) => match err {
            E::InvalidProtocol | E::MissingProtocol => "protocol is not TCP4, TCP6 or UNKNOWN",
            E::MissingSourceAddress | E::InvalidSourceAddress(_) => "invalid source address",
            E::MissingDestinationAddress | E::InvalidDestinationAddress(_) => {
                "invalid destination address"
            }
            E::MissingSourcePort | E::InvalidSourcePort(_) => "invalid source port",
            E::MissingDestinationPort | E::InvalidDestinationPort(_) => "invalid destination port",
            E::MissingNewLine | E::InvalidSuffix => "no CRLF right after the destination port",
            E::InvalidPrefix | E::MissingPrefix | E::Partial | E::HeaderTooLong => {
                "not a PROXY line"
            }
        },
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let seen = buf.len().min(V2_SIGNATURE.len());
    if buf[..seen] != V2_SIGNATURE[..seen] {
        return Parsed::Malformed(Fault::NotProxy);
    }
    if buf.len() < V2_FIXED {
        return Parsed::Incomplete;
    }
    // The fixed part decides the rest, so a bad field is reported before waiting for the body.
    match v2::Header::try_from(&buf[..V2_FIXED]) {
        Ok(_) | Err(v2::ParseError::Partial(..)) => {}
        Err(err) => return Parsed::Malformed(v2_fault(&err)),
    }
    let header_len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if header_len > MAX_V2_HEADER {
        return Parsed::Malformed(Fault::V2TooLong(header_len));
    }
    if buf.len() < header_len {
        return Parsed::Incomplete;
    }
    let header = match v2::Header::try_from(&buf[..header_len]) {
        Ok(header) => header,
        Err(err) => return Parsed::Malformed(v2_fault(&err)),
    };
    // LOCAL: the balancer's own connection; the spec has the receiver ignore the addresses.
    if header.command == v2::Command::Local {
        return Parsed::Done {
            header_len,
            source: None,
        };
    }
    let source = match (header.addresses, header.protocol) {
        // The spec lets a receiver take an unspecified family and use the socket's addresses.
        (v2::Addresses::Unspecified, _) => None,
        (v2::Addresses::IPv4(ip), v2::Protocol::Stream) => {
            Some((ip.source_address, ip.source_port).into())
        }
        (v2::Addresses::IPv6(ip), v2::Protocol::Stream) => {
            Some((ip.source_address, ip.source_port).into())
        }
        (v2::Addresses::Unix(_), _) => return Parsed::Malformed(Fault::Unsupported("AF_UNIX")),
        (_, v2::Protocol::Datagram) => return Parsed::Malformed(Fault::Unsupported("UDP")),
        (_, v2::Protocol::Unspecified) => {
            return Parsed::Malformed(Fault::Unsupported("unspecified transport"))
        }
    };
    Parsed::Done { header_len, source }
}

fn v2_fault(err: &v2::ParseError) -> Fault {
    use v2::ParseError as E;
    Fault::V2(match err {
        E::Version(_) => "version is not 2",
        E::Command(_) => "command is not LOCAL or PROXY",
        E::AddressFamily(_) => "unknown address family",
        E::Protocol(_) => "unknown transport protocol",
        E::InvalidAddresses(..) => "length is shorter than its addresses",
        E::Incomplete(_) | E::Partial(..) | E::Prefix | E::InvalidTLV(..) | E::Leftovers(_) => {
            "inconsistent length"
        }
    })
}

/// Why no client address came from a connection that must start with a PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a PROXY header")]
    Closed,
    #[error("connection closed after {0} bytes of an incomplete PROXY header")]
    Truncated(usize),
    #[error(transparent)]
    Malformed(#[from] Fault),
    #[error("reading a PROXY header")]
    Io(#[source] io::Error),
}

/// Reads the PROXY header that must open `stream`, and nothing after it: the TLS ClientHello or
/// HTTP request behind it stays in the socket for the next reader. The whole read, however the
/// header arrives, is bounded by `timeout`. `Ok(None)`: the socket's peer is the client.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_header_unbounded(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read_header_unbounded(
    stream: &mut TcpStream,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut seen = 0;
    loop {
        seen = match peek_more(stream, &mut buf, seen).await {
            Ok(n) if n > seen => n,
            Ok(0) => return Err(ProxyHeaderError::Closed),
            Ok(n) => return Err(ProxyHeaderError::Truncated(n)),
            Err(err) => return Err(ProxyHeaderError::Io(err)),
        };
        match parse(&buf[..seen]) {
            Parsed::Incomplete => continue,
            Parsed::Malformed(fault) => return Err(fault.into()),
            Parsed::Done { header_len, source } => {
                // Already in the socket's buffer: this read does not wait.
                stream
                    .read_exact(&mut buf[..header_len])
                    .await
                    .map_err(ProxyHeaderError::Io)?;
                return Ok(source);
            }
        }
    }
}

/// Peeks at what `stream` holds once it holds more than `seen` bytes (or `buf` is full), or
/// once the peer has closed its side: then no more will come, and the count is `seen` or less.
///
/// A plain `peek` returns at once while any byte is buffered, so waiting for the next byte of a
/// header arriving piecemeal would spin. Instead, a peek that finds nothing new reports
/// WouldBlock inside `try_io`, which clears the socket's readiness unless an event arrived
/// since it was taken, and `ready` then sleeps until the next one.
async fn peek_more(stream: &TcpStream, buf: &mut [u8], seen: usize) -> io::Result<usize> {
    let waker = Waker::from(Arc::new(Unwoken));
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            // Made here, not held across the await: a `Context` is not `Send`.
            let mut cx = Context::from_waker(&waker);
            let mut read_buf = ReadBuf::new(buf);
            match stream.poll_peek(&mut cx, &mut read_buf) {
                Poll::Ready(Ok(n)) if n > seen || n == read_buf.capacity() => Ok(n),
                Poll::Ready(Ok(n)) if ready.is_read_closed() => Ok(n),
                Poll::Ready(Ok(_)) | Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                Poll::Ready(Err(err)) => Err(err),
            }
        });
        match peeked {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// `poll_peek` inside `try_io` needs a context; the task is woken by `ready` instead.
struct Unwoken;

impl Wake for Unwoken {
    fn wake(self: Arc<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const V1_TCP4: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n";
    const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 443\r\n";
    /// What follows the header: the start of a TLS ClientHello.
    const AFTER: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

    /// A v2 header: `command` 0x20 LOCAL or 0x21 PROXY, `family` e.g. 0x11 TCP over IPv4.
    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(command);
        header.push(family);
        header.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        header.extend_from_slice(body);
        header
    }

    fn v2_tcp4() -> Vec<u8> {
        // 192.0.2.7:56324 -> 198.51.100.1:443, then a 5-byte NOOP TLV (type 0x04).
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1, 0xdc, 0x04, 0x01, 0xbb];
        body.extend_from_slice(&[0x04, 0x00, 0x02, 0x00, 0x00]);
        v2(0x21, 0x11, &body)
    }

    fn v2_tcp6() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        body.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        body.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        v2(0x21, 0x21, &body)
    }

    fn done(header: &[u8], source: Option<&str>) -> Parsed {
        Parsed::Done {
            header_len: header.len(),
            source: source.map(|s| s.parse().unwrap()),
        }
    }

    fn valid_headers() -> Vec<(Vec<u8>, Option<&'static str>)> {
        vec![
            (V1_TCP4.to_vec(), Some("192.0.2.7:56324")),
            (V1_TCP6.to_vec(), Some("[2001:db8::7]:56324")),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (
                b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535 and more\r\n".to_vec(),
                None,
            ),
            (v2_tcp4(), Some("192.0.2.7:56324")),
            (v2_tcp6(), Some("[2001:db8::7]:56324")),
            // LOCAL, from the balancer's health check: with or without addresses.
            (v2(0x20, 0x00, &[]), None),
            (v2(0x20, 0x11, &v2_tcp4()[16..]), None),
            // PROXY with an unspecified family: use the socket's addresses.
            (v2(0x21, 0x00, &[]), None),
        ]
    }

    #[test]
    fn valid_headers_give_their_length_and_source() {
        for (header, source) in valid_headers() {
            assert_eq!(parse(&header), done(&header, source), "{header:?}");
            let mut followed = header.clone();
            followed.extend_from_slice(AFTER);
            assert_eq!(parse(&followed), done(&header, source), "{header:?}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_header_is_incomplete() {
        for (header, _) in valid_headers() {
            for end in 0..header.len() {
                assert_eq!(
                    parse(&header[..end]),
                    Parsed::Incomplete,
                    "{:?}",
                    &header[..end]
                );
            }
        }
    }

    #[test]
    fn malformed_headers_name_their_fault() {
        let long_v1 = [b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat();
        let cases: Vec<(Vec<u8>, Fault)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), Fault::NotProxy),
            (b"POST / HTTP/1.1\r\n".to_vec(), Fault::NotProxy),
            (AFTER.to_vec(), Fault::NotProxy),
            (b"\r\n\r\n\0\r\nQUIX".to_vec(), Fault::NotProxy),
            (long_v1, Fault::V1TooLong),
            (
                b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                Fault::V1("protocol is not TCP4, TCP6 or UNKNOWN"),
            ),
            (
                b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n".to_vec(),
                Fault::V1("invalid source address"),
            ),
            (
                b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n".to_vec(),
                Fault::V1("invalid source address"),
            ),
            (
                b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n".to_vec(),
                Fault::V1("invalid destination address"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
                Fault::V1("invalid source port"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n".to_vec(),
                Fault::V1("invalid destination port"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
                Fault::V1("invalid destination port"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
                Fault::V1("no CRLF right after the destination port"),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX".to_vec(),
                Fault::V1("no CRLF right after the destination port"),
            ),
            (
                b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n".to_vec(),
                Fault::V1("not ASCII text"),
            ),
            (v2(0x11, 0x11, &[0; 12]), Fault::V2("version is not 2")),
            (
                v2(0x22, 0x11, &[0; 12]),
                Fault::V2("command is not LOCAL or PROXY"),
            ),
            (
                v2(0x21, 0x41, &[0; 12]),
                Fault::V2("unknown address family"),
            ),
            (
                v2(0x21, 0x13, &[0; 12]),
                Fault::V2("unknown transport protocol"),
            ),
            (
                v2(0x21, 0x21, &[0; 12]),
                Fault::V2("length is shorter than its addresses"),
            ),
            (v2(0x21, 0x31, &[0; 216]), Fault::Unsupported("AF_UNIX")),
            (v2(0x21, 0x12, &[0; 12]), Fault::Unsupported("UDP")),
            (
                v2(0x21, 0x10, &[0; 12]),
                Fault::Unsupported("unspecified transport"),
            ),
        ];
        for (input, fault) in cases {
            assert_eq!(parse(&input), Parsed::Malformed(fault), "{input:?}");
        }
    }

    #[test]
    fn a_long_v2_header_is_refused_before_its_body_arrives() {
        let mut fixed = v2(0x21, 0x11, &[]);
        fixed[14..16].copy_from_slice(&521u16.to_be_bytes());
        assert_eq!(parse(&fixed), Parsed::Malformed(Fault::V2TooLong(537)));
        let at_limit = v2(0x21, 0x11, &[0; MAX_V2_HEADER - 16]);
        assert_eq!(
            parse(&at_limit),
            done(&at_limit, Some("0.0.0.0:0")),
            "the limit itself is accepted"
        );
    }

    #[test]
    fn fault_text_names_the_problem() {
        assert_eq!(
            Fault::V1("invalid source port").to_string(),
            "malformed PROXY v1 header: invalid source port"
        );
        assert_eq!(
            Fault::V2TooLong(600).to_string(),
            "PROXY v2 header of 600 bytes is over wsgate's limit of 536"
        );
        assert_eq!(
            ProxyHeaderError::Malformed(Fault::NotProxy).to_string(),
            "not a PROXY protocol header"
        );
        assert_eq!(
            ProxyHeaderError::Truncated(14).to_string(),
            "connection closed after 14 bytes of an incomplete PROXY header"
        );
    }

    /// A connected pair on loopback: (client, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        (client, server)
    }

    /// What the next reader finds after the header: everything the client sent after it.
    async fn rest(server: &mut TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        rest
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn reads_the_header_and_leaves_what_follows() {
        for (header, source) in valid_headers() {
            let (mut client, mut server) = pair().await;
            client
                .write_all(&[header.as_slice(), AFTER].concat())
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            let read = read_header(&mut server, TIMEOUT).await.unwrap();
            assert_eq!(read, source.map(|s| s.parse().unwrap()), "{header:?}");
            assert_eq!(rest(&mut server).await, AFTER, "{header:?}");
        }
    }

    #[tokio::test]
    async fn reads_a_header_arriving_byte_by_byte() {
        let cases = [
            (V1_TCP4.to_vec(), "192.0.2.7:56324"),
            (v2_tcp6(), "[2001:db8::7]:56324"),
        ];
        for (header, source) in cases {
            let (mut client, mut server) = pair().await;
            let sender = tokio::spawn(async move {
                for byte in header {
                    client.write_all(&[byte]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                client.write_all(AFTER).await.unwrap();
            });
            let read = read_header(&mut server, TIMEOUT).await.unwrap();
            assert_eq!(read, Some(source.parse().unwrap()));
            sender.await.unwrap();
            assert_eq!(rest(&mut server).await, AFTER);
        }
    }

    #[tokio::test]
    async fn a_truncated_header_then_close_is_reported() {
        let (mut client, mut server) = pair().await;
        client.write_all(&V1_TCP4[..14]).await.unwrap();
        client.shutdown().await.unwrap();
        let err = read_header(&mut server, TIMEOUT).await.unwrap_err();
        assert!(matches!(err, ProxyHeaderError::Truncated(14)), "{err}");

        let (client, mut server) = pair().await;
        drop(client);
        let err = read_header(&mut server, TIMEOUT).await.unwrap_err();
        assert!(matches!(err, ProxyHeaderError::Closed), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_refused_at_once() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let err = read_header(&mut server, TIMEOUT).await.unwrap_err();
        assert!(
            matches!(err, ProxyHeaderError::Malformed(Fault::NotProxy)),
            "{err}"
        );
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_that_never_completes_times_out() {
        let (mut client, mut server) = pair().await;
        client.write_all(&V1_TCP4[..20]).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyHeaderError::Timeout(_)), "{err}");
        assert_eq!(err.to_string(), "no complete PROXY header within 5s");
        assert!(started.elapsed() >= Duration::from_secs(5));
        drop(client);
    }
}
