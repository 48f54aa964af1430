//! The backend of the side-by-side benchmark (`benches/compare/`): the cheapest server that
//! answers what the load generators send, so that the proxy in front of it is what gets measured.
//!
//! - `GET /big` answers 1 MiB; any other request answers a 6-byte body (keep-alive, HTTP/1.1).
//! - `GET /hold?ms=N` answers that 6-byte body after N ms (at most 10 minutes): a long-poll
//!   request, as socket.io's and SignalR's polling transports hold them open.
//! - A WebSocket upgrade on any path gets its `101` and then a raw byte echo: the client's masked
//!   frames come back unchanged. The proxies under test are not frame-aware, and the load
//!   generator only counts frame boundaries, so decoding frames here would only add cost. Frame
//!   headers are watched (payloads skipped) for one thing: after echoing a close frame the
//!   backend closes the TCP connection first, as RFC 6455 section 7.1.1 asks of servers, so that
//!   TIME_WAIT stays on the server side and the handshake loop does not run out of client ports.
//!
//! - With `--tls-listen` (and `--cert`, `--key`) it also terminates TLS itself, with ALPN `h2` and
//!   `http/1.1`: the `direct` target of the TLS rows talks to it there, so that the client does
//!   the same TLS work with or without a proxy. Over HTTP/2 it accepts WebSockets as RFC 8441
//!   extended CONNECT streams. Over TLS every upgraded stream is echoed through a buffer of its
//!   own (the one-buffer trick needs a raw socket); only the `direct` rows use this.
//!
//! One thread (a current-thread runtime); `run.sh` pins it to CPU 0 beside the load generator.
//!
//! ```text
//! cargo run --release --example bench_backend -- --listen 127.0.0.1:19000
//! cargo run --release --example bench_backend -- --tls-listen 127.0.0.1:19003 --cert c.pem --key k.pem
//! ```

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsgate::websocket::frame::{self, Event, Tracker};

/// Minimal HTTP + WebSocket echo backend for benches/compare.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (plain HTTP/1.1).
    #[arg(long, default_value = "127.0.0.1:19000")]
    listen: SocketAddr,
    /// Also listen here with TLS (ALPN h2 and http/1.1); needs --cert and --key.
    #[arg(long, requires_all = ["cert", "key"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long)]
    key: Option<PathBuf>,
}

const SMALL_BODY: &[u8] = b"hello\n";
const BIG_BODY_LEN: usize = 1 << 20;
/// `/hold` without `ms`, and the most it holds: a typo must not park a request for hours.
const HOLD_DEFAULT: Duration = Duration::from_secs(20);
const HOLD_MAX: Duration = Duration::from_secs(600);
/// One read buffer for every tunnel on this thread: an echo needs no per-connection buffer
/// except for what the socket would not take back at once.
const ECHO_BUF_LEN: usize = 64 * 1024;

thread_local! {
    static ECHO_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; ECHO_BUF_LEN].into_boxed_slice());
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let tls = match (args.tls_listen, &args.cert, &args.key) {
        (Some(addr), Some(cert), Some(key)) => Some((addr, tls_acceptor(cert, key)?)),
        _ => None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let big = Bytes::from(vec![b'x'; BIG_BODY_LEN]);
            let plain = TcpListener::bind(args.listen).await?;
            eprintln!("bench_backend listening on http://{}", args.listen);
            let Some((addr, acceptor)) = tls else {
                return serve(plain, None, big).await;
            };
            let secure = TcpListener::bind(addr).await?;
            eprintln!("bench_backend listening on https://{addr}");
            tokio::try_join!(
                serve(plain, None, big.clone()),
                serve(secure, Some(acceptor), big)
            )?;
            Ok(())
        })
}

/// rustls (ring) with the one certificate, ALPN h2 and http/1.1: what the proxies offer too.
fn tls_acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let pem_error = |path: &Path| {
        let path = path.display().to_string();
        move |err| io::Error::other(format!("{path}: {err}"))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_error(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(io::Error::other)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, big: Bytes) -> io::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and friends: wait for connections to close instead of spinning.
                eprintln!("accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let big = big.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, big.clone()));
            let Some(acceptor) = tls else {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                return;
            };
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ = http2::Builder::new(TokioExecutor::new())
                    .enable_connect_protocol()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            } else {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            }
        });
    }
}

async fn respond(
    mut req: Request<Incoming>,
    big: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // A WebSocket over HTTP/2 (RFC 8441): extended CONNECT, answered 200, then the stream echoes.
    if req.method() == Method::CONNECT {
        if req.extensions().get::<Protocol>().map(Protocol::as_str) != Some("websocket") {
            return Ok(status(StatusCode::NOT_IMPLEMENTED));
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let _ = echo_stream(TokioIo::new(upgraded)).await;
            }
        });
        return Ok(status(StatusCode::OK));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        let body = match req.uri().path() {
            "/big" => big,
            "/hold" => {
                // Only this request's task waits: each connection is a task of its own.
                tokio::time::sleep(hold_for(req.uri().query())).await;
                Bytes::from_static(SMALL_BODY)
            }
            _ => Bytes::from_static(SMALL_BODY),
        };
        return Ok(Response::new(Full::new(body)));
    };
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Ok(accept) = HeaderValue::try_from(derive_accept_key(key.as_bytes())) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    if !upgrade {
        return Ok(status(StatusCode::BAD_REQUEST));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let _ = echo(upgraded).await;
        }
    });
    let mut resp = status(StatusCode::SWITCHING_PROTOCOLS);
    let headers = resp.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(resp)
}

/// The `ms=N` of a `/hold` query, bounded by `HOLD_MAX`.
fn hold_for(query: Option<&str>) -> Duration {
    let ms = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("ms=")?.parse().ok());
    ms.map_or(HOLD_DEFAULT, Duration::from_millis).min(HOLD_MAX)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = code;
    resp
}

/// Echoes every byte back until the client closes, then closes too.
async fn echo(upgraded: Upgraded) -> io::Result<()> {
    let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => parts,
        // Not a plain TCP socket: TLS (the direct target of the TLS rows).
        Err(upgraded) => return echo_stream(TokioIo::new(upgraded)).await,
    };
    let mut stream = parts.io.into_inner();
    // Bytes the client sent right behind its request head were read by hyper already.
    let early = parts.read_buf;
    if !early.is_empty() {
        stream.write_all(&early).await?;
    }
    let mut watch = CloseWatch::default();
    let mut closed = watch.feed(&early);
    drop(early);
    let mut unwritten = Vec::new();
    loop {
        if !unwritten.is_empty() {
            stream.write_all(&unwritten).await?;
            unwritten = Vec::new();
        }
        if closed {
            // The close frame went back: close first (our FIN), then let the socket go.
            return stream.shutdown().await;
        }
        // Read into the shared buffer and write straight back; keep only what the socket refused.
        // `poll_read` rather than `readable` + `try_read`: after a short read, tokio forgets the
        // readiness, which saves a read that would block on every message.
        let read = poll_fn(|cx| {
            ECHO_BUF.with(|buf| {
                let buf = &mut buf.borrow_mut()[..];
                let mut filled = ReadBuf::new(buf);
                ready!(Pin::new(&mut stream).poll_read(cx, &mut filled))?;
                let n = filled.filled().len();
                let written = match stream.try_write(&buf[..n]) {
                    Ok(written) => written,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(err) => return Poll::Ready(Err(err)),
                };
                unwritten.extend_from_slice(&buf[written..n]);
                closed = watch.feed(&buf[..n]);
                Poll::Ready(Ok(n))
            })
        })
        .await?;
        if read == 0 {
            return stream.shutdown().await;
        }
    }
}

/// Echoes any byte stream (TLS, an HTTP/2 stream) through a buffer of its own, until the client
/// closes or a close frame has gone back; then closes (TLS close_notify, or END_STREAM) first.
async fn echo_stream(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut watch = CloseWatch::default();
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        let closed = watch.feed(&buf[..n]);
        stream.write_all(&buf[..n]).await?;
        stream.flush().await?;
        if closed {
            return stream.shutdown().await;
        }
    }
}

/// Follows the client's frames through its byte stream, skipping payloads, to notice a close
/// frame; the tracker keeps at most a header cut across two reads.
#[derive(Default)]
struct CloseWatch(Tracker);

impl CloseWatch {
    /// Returns true once a whole close frame has gone by.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        loop {
            let closing = self.0.current().is_some_and(|h| h.opcode == frame::CLOSE);
            let (taken, event) = self.0.advance(data);
            data = &data[taken..];
            match event {
                Some(Event::FrameEnd) if closing => return true,
                Some(_) => {}
                // `advance` returns no event only once it has taken all of `data`.
                None => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_watch_sees_the_close_frame_only() {
        // A masked 64-byte binary frame, a masked 300-byte one, an empty ping, then a masked
        // close (status 1000).
        let key = Some([1, 2, 3, 4]);
        let mut stream = Vec::new();
        frame::encode(&mut stream, frame::BINARY, &[0u8; 64], key);
        frame::encode(&mut stream, frame::BINARY, &[0x88; 300], key);
        frame::encode(&mut stream, frame::PING, b"", key);
        let close_at = stream.len();
        frame::encode_close(&mut stream, frame::close_code::NORMAL, "", key);
        for chunk in [1, 2, 5, 100, stream.len()] {
            let mut watch = CloseWatch::default();
            let mut seen = 0;
            let mut end = None;
            for piece in stream.chunks(chunk) {
                seen += piece.len();
                if watch.feed(piece) {
                    end.get_or_insert(seen);
                }
            }
            assert_eq!(end, Some(stream.len()), "chunk size {chunk}");
            assert!(end.unwrap() > close_at);
        }
    }

    #[test]
    fn hold_reads_ms_and_stays_bounded() {
        assert_eq!(hold_for(Some("ms=250")), Duration::from_millis(250));
        assert_eq!(hold_for(Some("x=1&ms=7")), Duration::from_millis(7));
        assert_eq!(hold_for(None), HOLD_DEFAULT);
        assert_eq!(hold_for(Some("ms=oops")), HOLD_DEFAULT);
        assert_eq!(hold_for(Some("ms=99999999999")), HOLD_MAX);
    }

    #[test]
    fn close_watch_sees_an_empty_close() {
        let mut stream = Vec::new();
        frame::encode(&mut stream, frame::CLOSE, b"", Some([9, 9, 9, 9]));
        for chunk in [1, stream.len()] {
            let mut watch = CloseWatch::default();
            assert!(stream.chunks(chunk).any(|piece| watch.feed(piece)));
        }
    }
}
