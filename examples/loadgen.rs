//! The WebSocket load generator of the side-by-side benchmark (`benches/compare/`).
//!
//! One thread (a current-thread runtime; `run.sh` pins it to CPU 0 beside the backend), so that
//! it costs as little as possible next to what it measures:
//! - every frame is built and masked once, at start, and written from that one buffer;
//! - the backend (`bench_backend`) echoes raw bytes, so replies are the frames we sent: echo mode
//!   reads them into one buffer and compares, bulk mode only walks frame headers to count
//!   messages (payload bytes are skipped, never copied).
//!
//! Modes: `echo` (ping-pong, msgs/s and latency), `echo_seq` (the ping-pong of one WebSocket:
//! one message in flight, so its latency is the round trip alone), `echo_rate` (the ping-pong
//! paced at `--rate` total messages per second), `bulk` (streams both ways with `--inflight` bytes outstanding per
//! connection), `handshake` (connect + upgrade + close loops), `idle` and `idle_used` (open
//! `--conns` WebSockets, one echo each, then hold them until SIGUSR1 so that the caller can read
//! the proxy's memory), `http_idle` and `long_poll` (the same hold for plain HTTP/1.1
//! connections: after one answered `GET /` each, or with one `GET /hold?ms=N` each still
//! pending), and `h2_echo` (the ping-pong of `echo`, but every WebSocket is an RFC 8441
//! extended-CONNECT stream of ONE TLS HTTP/2 connection). Throughput modes warm up for `--warmup`
//! seconds, then measure a window of `--duration` seconds; the CPU time of `--cpu-pids` (the
//! proxy) is read from `/proc` at both ends of that window. The result is one JSON line on
//! stdout; progress goes to stderr.
//!
//! With `--tls` every connection is TLS (rustls with ring, trusting only `--ca`, SNI `--sni`, ALPN
//! `http/1.1`; `h2_echo` always uses TLS, with ALPN `h2`). Session resumption is off, so each
//! connection is a full handshake: that is what `handshake` measures.
//!
//! ```text
//! cargo run --release --example loadgen -- --mode echo --addr 127.0.0.1:19001 --duration 10
//! cargo run --release --example loadgen -- --mode echo --tls --ca ca.pem --addr 127.0.0.1:19002
//! ```

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::FutureExt as _;
use http::{header, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::ext::Protocol;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsgate::websocket::frame::{self, Event, Tracker};

/// WebSocket load generator for benches/compare (one thread).
#[derive(Debug, Parser)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The proxy's (or, for `direct`, the backend's) address.
    #[arg(long, default_value = "127.0.0.1:19001")]
    addr: SocketAddr,
    /// Request path of the WebSocket upgrade.
    #[arg(long, default_value = "/ws")]
    path: String,
    /// WebSocket connections (for `handshake`: concurrent connect/upgrade/close loops).
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Payload bytes per message [default: 64; bulk 16384; idle_used 65536].
    #[arg(long)]
    size: Option<usize>,
    /// echo_rate: total messages per second over all connections.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// long_poll: how long the backend holds each request (it is sent `/hold?ms=N`).
    #[arg(long, default_value_t = 20_000)]
    hold_ms: u64,
    /// bulk: bytes sent and not yet echoed back, per connection.
    #[arg(long, default_value_t = 256 * 1024)]
    inflight: usize,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds in the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Processes whose CPU time (utime+stime) over the window is charged to the operations.
    #[arg(long, value_delimiter = ',')]
    cpu_pids: Vec<u32>,
    /// Processes whose CPU use over the window is reported for information (the backend).
    #[arg(long, value_delimiter = ',')]
    side_pids: Vec<u32>,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// idle modes: created once every WebSocket is open; they are held until SIGUSR1.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// idle modes: give up holding after this many seconds even without SIGUSR1.
    #[arg(long, default_value_t = 300.0)]
    hold_max: f64,
    /// idle modes: WebSockets being opened at the same time (the burst a reconnect storm makes).
    #[arg(long, default_value_t = 32)]
    open_concurrency: usize,
    /// Speak TLS (ALPN http/1.1; h2_echo always speaks TLS, with ALPN h2).
    #[arg(long)]
    tls: bool,
    /// With TLS: the PEM certificate(s) to trust, and nothing else.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// With TLS: the server name sent as SNI and checked against the certificate.
    #[arg(long, default_value = "localhost")]
    sni: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Echo,
    #[value(name = "echo_seq")]
    EchoSeq,
    #[value(name = "echo_rate")]
    EchoRate,
    Bulk,
    Handshake,
    Idle,
    #[value(name = "idle_used")]
    IdleUsed,
    #[value(name = "http_idle")]
    HttpIdle,
    #[value(name = "long_poll")]
    LongPoll,
    #[value(name = "h2_echo")]
    H2Echo,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::EchoSeq => "echo_seq",
            Mode::EchoRate => "echo_rate",
            Mode::Bulk => "bulk",
            Mode::Handshake => "handshake",
            Mode::Idle => "idle",
            Mode::IdleUsed => "idle_used",
            Mode::HttpIdle => "http_idle",
            Mode::LongPoll => "long_poll",
            Mode::H2Echo => "h2_echo",
        }
    }

    fn default_size(self) -> usize {
        match self {
            Mode::Bulk => 16 * 1024,
            Mode::IdleUsed => 64 * 1024,
            _ => 64,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("loadgen: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run(args)) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("loadgen: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> io::Result<String> {
    let size = args.size.unwrap_or(args.mode.default_size());
    let nofile = nofile_soft_limit();
    let tls = match (args.tls || args.mode == Mode::H2Echo, &args.ca) {
        (false, _) => None,
        (true, None) => return Err(invalid("TLS needs --ca (the certificate to trust)")),
        (true, Some(ca)) => {
            let alpn: &[u8] = if args.mode == Mode::H2Echo {
                b"h2"
            } else {
                b"http/1.1"
            };
            Some(Tls::new(ca, &args.sni, alpn)?)
        }
    };
    let connector = Connector {
        addr: args.addr,
        tls,
        negotiated: RefCell::new(None),
    };
    let upgrade = Rc::new(Upgrade::new(connector, &args.addr.to_string(), &args.path));
    let stats = Rc::new(Stats::default());
    let mut out = Json::new();
    out.str("mode", args.mode.name())
        .num("conns", args.conns as f64)
        .num("size", size as f64);
    if let Some(nofile) = nofile {
        out.num("nofile_soft", nofile as f64);
    }
    match args.mode {
        Mode::EchoSeq if args.conns != 1 => {
            return Err(invalid(
                "echo_seq is one WebSocket (--conns 1); use echo for more",
            ))
        }
        Mode::Echo | Mode::EchoSeq | Mode::EchoRate | Mode::H2Echo => {
            let frame: Rc<[u8]> = binary_frame(size).into();
            // h2_echo: the handle that opened the streams lives as long as they are used.
            let mut _h2 = None;
            let streams = if args.mode == Mode::H2Echo {
                let (sender, streams) = open_h2(&upgrade, args.conns).await?;
                _h2 = Some(sender);
                streams
            } else {
                open_all(&upgrade, args.conns).await?
            };
            let pace = (args.mode == Mode::EchoRate).then(|| {
                let interval = Duration::from_secs_f64(args.conns as f64 / args.rate as f64);
                (Instant::now() + Duration::from_millis(10), interval)
            });
            for (i, stream) in streams.into_iter().enumerate() {
                let pace = pace.map(|(start, interval)| {
                    // Spread the connections' sending slots evenly over one interval.
                    let offset = interval.mul_f64(i as f64 / args.conns as f64);
                    (start + offset, interval)
                });
                let task = echo_conn(stream, frame.clone(), size, stats.clone(), pace);
                spawn_counted(task, stats.clone());
            }
            let window = measure(&args, &stats).await;
            window.report(&mut out, &stats, &args);
            stats.latency_report(&mut out);
            if args.mode == Mode::EchoRate {
                out.num("rate_target", args.rate as f64)
                    .num("late_sends", stats.late.get() as f64);
            }
        }
        Mode::Bulk => {
            let frame_len = binary_frame(size).len();
            let count = (args.inflight / frame_len).max(1);
            let frames: Rc<[u8]> = binary_frame(size).repeat(count).into();
            let streams = open_all(&upgrade, args.conns).await?;
            for stream in streams {
                let task = bulk_conn(
                    stream,
                    frames.clone(),
                    frame_len,
                    size,
                    args.inflight,
                    stats.clone(),
                );
                spawn_counted(task, stats.clone());
            }
            let window = measure(&args, &stats).await;
            window.report(&mut out, &stats, &args);
            out.num("inflight", args.inflight as f64)
                .num("mb_per_s", stats.bytes.get() as f64 / window.secs / 1e6);
        }
        Mode::Handshake => {
            let close: Rc<[u8]> = close_frame().into();
            for _ in 0..args.conns {
                let task = handshake_loop(upgrade.clone(), close.clone(), stats.clone());
                tokio::task::spawn_local(task);
            }
            let window = measure(&args, &stats).await;
            window.report(&mut out, &stats, &args);
            stats.latency_report(&mut out);
        }
        Mode::Idle | Mode::IdleUsed | Mode::HttpIdle | Mode::LongPoll => {
            if let Some(nofile) = nofile {
                if args.conns as u64 + 64 > nofile {
                    return Err(io::Error::other(format!(
                        "--conns {} does not fit RLIMIT_NOFILE {nofile} (soft); raise it with `ulimit -n`",
                        args.conns
                    )));
                }
            }
            hold_idle(&args, &upgrade, size, &stats, &mut out).await?;
        }
    }
    if let Some(negotiated) = upgrade.connector.negotiated.borrow().as_deref() {
        out.str("tls", negotiated);
    }
    if upgrade.connector.tls.is_some() {
        out.num(
            "tls_eof_without_close_notify",
            stats.no_close_notify.get() as f64,
        );
    }
    out.num("errors", stats.errors.get() as f64);
    if let Some(err) = stats.first_error.borrow().as_deref() {
        out.str("first_error", err);
    }
    Ok(out.finish())
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// Everything the connection tasks report; they count only while `recording` is set.
#[derive(Default)]
struct Stats {
    recording: Cell<bool>,
    /// Messages echoed or handshakes completed inside the window.
    ops: Cell<u64>,
    /// Payload bytes echoed inside the window.
    bytes: Cell<u64>,
    /// Nanoseconds per operation inside the window (saturating at 4.29 s).
    latencies: RefCell<Vec<u32>>,
    /// echo_rate: sends that missed their slot by more than one interval.
    late: Cell<u64>,
    /// handshake over TLS: connections the server closed without a TLS close_notify first.
    no_close_notify: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
}

impl Stats {
    fn done(&self, ops: u64, bytes: u64, latency: Option<Duration>) {
        if !self.recording.get() {
            return;
        }
        self.ops.set(self.ops.get() + ops);
        self.bytes.set(self.bytes.get() + bytes);
        if let Some(latency) = latency {
            let nanos = u32::try_from(latency.as_nanos()).unwrap_or(u32::MAX);
            self.latencies.borrow_mut().push(nanos);
        }
    }

    fn error(&self, err: &io::Error) {
        self.errors.set(self.errors.get() + 1);
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            eprintln!("loadgen: first error: {err}");
            *first = Some(err.to_string());
        }
    }

    fn latency_report(&self, out: &mut Json) {
        let mut lat = self.latencies.borrow_mut();
        if lat.is_empty() {
            return;
        }
        lat.sort_unstable();
        let at = |q: f64| {
            let i = ((lat.len() as f64 * q) as usize).min(lat.len() - 1);
            f64::from(lat[i]) / 1e3
        };
        out.num("p50_us", at(0.50))
            .num("p99_us", at(0.99))
            .num("p999_us", at(0.999))
            .num("max_us", at(1.0));
    }
}

struct Window {
    secs: f64,
    /// CPU seconds used by `--cpu-pids`, `--side-pids` and this process over the window.
    cpu: Option<f64>,
    side_cpu: Option<f64>,
    own_cpu: Option<f64>,
}

/// Warms up, then records for `--duration` seconds and reads CPU times at both ends.
async fn measure(args: &Args, stats: &Stats) -> Window {
    sleep(Duration::from_secs_f64(args.warmup)).await;
    let own = [std::process::id()];
    let before = (
        cpu_ticks(&args.cpu_pids),
        cpu_ticks(&args.side_pids),
        cpu_ticks(&own),
    );
    let started = Instant::now();
    stats.recording.set(true);
    sleep(Duration::from_secs_f64(args.duration)).await;
    stats.recording.set(false);
    let secs = started.elapsed().as_secs_f64();
    let after = (
        cpu_ticks(&args.cpu_pids),
        cpu_ticks(&args.side_pids),
        cpu_ticks(&own),
    );
    let tick = 1.0 / args.clk_tck as f64;
    let used = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 * tick);
    Window {
        secs,
        cpu: used(before.0, after.0),
        side_cpu: used(before.1, after.1),
        own_cpu: used(before.2, after.2),
    }
}

impl Window {
    fn report(&self, out: &mut Json, stats: &Stats, args: &Args) {
        let ops = stats.ops.get();
        out.num("duration_s", self.secs)
            .num("ops", ops as f64)
            .num("ops_per_s", ops as f64 / self.secs);
        if let (Some(cpu), false) = (self.cpu, args.cpu_pids.is_empty()) {
            out.num("proxy_cpu_s", cpu);
            if ops > 0 {
                out.num("cpu_us_per_op", cpu * 1e6 / ops as f64);
            }
        }
        if let (Some(cpu), false) = (self.side_cpu, args.side_pids.is_empty()) {
            out.num("backend_cpu_pct", cpu * 100.0 / self.secs);
        }
        if let Some(cpu) = self.own_cpu {
            out.num("loadgen_cpu_pct", cpu * 100.0 / self.secs);
        }
    }
}

/// Sum of utime+stime (in clock ticks) of the processes, from /proc/PID/stat; None if one is gone.
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields are counted after the last ')'.
        let fields = stat.get(stat.rfind(')')? + 1..)?;
        let mut fields = fields.split_whitespace();
        // The first field here is field 3 (state); utime and stime are fields 14 and 15.
        let utime: u64 = fields.nth(11)?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        total += utime + stime;
    }
    Some(total)
}

/// The soft RLIMIT_NOFILE of this process, from /proc/self/limits.
fn nofile_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// WebSocket wire format, prepared once

/// Clients must mask; the key is fixed because the backend never unmasks.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A final masked binary client frame of `len` payload bytes.
fn binary_frame(len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut out = Vec::new();
    frame::encode(&mut out, frame::BINARY, &payload, Some(MASK));
    out
}

/// A masked close frame with status 1000 (normal closure) and no reason.
fn close_frame() -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_close(&mut out, frame::close_code::NORMAL, "", Some(MASK));
    out
}

/// Counts the frames that end in `data`, skipping payloads (the tracker keeps no payload).
fn count_frames(tracker: &mut Tracker, mut data: &[u8]) -> io::Result<u64> {
    let mut frames = 0;
    loop {
        let (taken, event) = tracker.advance(data);
        data = &data[taken..];
        match event {
            // We send no extension, so the backend's echo of our frames never sets one.
            Some(Event::Header(header)) if header.rsv != 0 => {
                return Err(invalid(
                    "echoed frame has reserved bits set: the stream is corrupt",
                ))
            }
            Some(Event::Header(_)) => {}
            Some(Event::FrameEnd) => frames += 1,
            // `advance` returns no event only once it has taken all of `data`.
            None => return Ok(frames),
        }
    }
}

/// The HTTP/1.1 upgrade request, written as prepared bytes, and how to reach the server.
struct Upgrade {
    connector: Connector,
    request: Vec<u8>,
    /// `Sec-WebSocket-Accept` the `101` must carry.
    accept: String,
    /// h2_echo: the target of the extended CONNECT.
    uri: String,
}

impl Upgrade {
    fn new(connector: Connector, host: &str, path: &str) -> Self {
        // A fixed key (RFC 6455 asks for a fresh random one per connection; servers cannot tell).
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        Upgrade {
            connector,
            request: request.into_bytes(),
            accept: derive_accept_key(key.as_bytes()),
            uri: format!("https://{host}{path}"),
        }
    }

    /// Connects and upgrades; the stream returned is positioned at the first WebSocket byte.
    async fn open(&self) -> io::Result<Stream> {
        let mut stream = self.connector.connect().await?;
        stream.write_all(&self.request).await?;
        stream.flush().await?;
        let mut head = [0u8; 2048];
        let mut len = 0;
        let end = loop {
            if len == head.len() {
                return Err(invalid("response head larger than 2 KiB"));
            }
            let n = stream.read(&mut head[len..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
            len += n;
            if let Some(at) = find(&head[..len], b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = &head[..len];
        if !head.starts_with(b"HTTP/1.1 101") {
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            return Err(invalid(&format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(line)
            )));
        }
        if find(&head[..end], self.accept.as_bytes()).is_none() {
            return Err(invalid("101 without the expected Sec-WebSocket-Accept"));
        }
        if end != len {
            return Err(invalid("bytes after the 101 before any message was sent"));
        }
        Ok(stream)
    }
}

// ---------------------------------------------------------------------------------------------
// Transport: plain TCP, TLS, or a stream of an HTTP/2 connection

/// A client's TLS setup: one rustls config for every connection of the run.
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Tls {
    /// Trusts only the certificates in `ca`; offers one ALPN protocol; never resumes a session,
    /// so that every connection is a full handshake.
    fn new(ca: &Path, sni: &str, alpn: &[u8]) -> io::Result<Tls> {
        let pem_error = |err| io::Error::other(format!("{}: {err}", ca.display()));
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(pem_error)? {
            roots
                .add(cert.map_err(pem_error)?)
                .map_err(io::Error::other)?;
        }
        if roots.is_empty() {
            return Err(invalid(&format!("{}: no certificate", ca.display())));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = Resumption::disabled();
        let name = ServerName::try_from(sni.to_owned())
            .map_err(|_| invalid(&format!("--sni {sni}: not a server name")))?;
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

struct Connector {
    addr: SocketAddr,
    tls: Option<Tls>,
    /// What the first TLS handshake settled (version, cipher suite, group, ALPN), for the JSON.
    negotiated: RefCell<Option<String>>,
}

impl Connector {
    async fn connect(&self) -> io::Result<Stream> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Tcp(stream));
        };
        let stream = tls.connector.connect(tls.name.clone(), stream).await?;
        if self.negotiated.borrow().is_none() {
            let conn = stream.get_ref().1;
            let text = format!(
                "{:?} {:?} {:?} alpn {}",
                conn.protocol_version(),
                conn.negotiated_cipher_suite().map(|s| s.suite()),
                conn.negotiated_key_exchange_group().map(|g| g.name()),
                conn.alpn_protocol()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default(),
            );
            *self.negotiated.borrow_mut() = Some(text.replace("Some(", "").replace(')', ""));
        }
        Ok(Stream::Tls(Box::new(stream)))
    }
}

/// One WebSocket's byte stream, whatever carries it.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// An RFC 8441 extended-CONNECT stream of an HTTP/2 connection.
    H2(TokioIo<Upgraded>),
}

impl Stream {
    /// Whether the peer has closed (or broken) the stream, without waiting.
    fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 64];
        if let Stream::Tcp(stream) = self {
            return !matches!(stream.try_read(&mut scratch),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock);
        }
        // Anything but "nothing to read yet" (EOF, an error, or unexpected bytes) counts.
        self.read(&mut scratch).now_or_never().is_some()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::H2(s) => Pin::new(s).poll_read(cx, buf),
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
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::H2(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::H2(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::H2(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One TLS connection with ALPN h2, then `n` WebSockets on it as extended-CONNECT streams
/// (RFC 8441). Returns the connection's request handle too: the caller keeps it while the
/// streams are used.
async fn open_h2(
    upgrade: &Upgrade,
    n: usize,
) -> io::Result<(SendRequest<Empty<Bytes>>, Vec<Stream>)> {
    let Stream::Tls(tls) = upgrade.connector.connect().await? else {
        return Err(invalid("h2_echo needs TLS"));
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(invalid("the server did not choose h2 by ALPN"));
    }
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(*tls))
        .await
        .map_err(io::Error::other)?;
    // Drive the connection until the server's SETTINGS allow extended CONNECT (RFC 8441 §3).
    let mut connection = Box::pin(connection);
    let settings = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            return Poll::Ready(Err(match result {
                Ok(()) => invalid("the HTTP/2 connection ended at once"),
                Err(err) => io::Error::other(err),
            }));
        }
        match connection.is_extended_connect_protocol_enabled() {
            true => Poll::Ready(Ok(())),
            false => Poll::Pending,
        }
    });
    tokio::time::timeout(Duration::from_secs(5), settings)
        .await
        .map_err(|_| {
            invalid(
                "no SETTINGS_ENABLE_CONNECT_PROTOCOL from the server: no WebSockets over HTTP/2",
            )
        })??;
    tokio::task::spawn_local(async move {
        if let Err(err) = connection.await {
            eprintln!("loadgen: the HTTP/2 connection failed: {err}");
        }
    });
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(&upgrade.uri)
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .extension(Protocol::from_static("websocket"))
            .body(Empty::new())
            .map_err(io::Error::other)?;
        sender.ready().await.map_err(io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        if response.status() != StatusCode::OK {
            return Err(invalid(&format!(
                "extended CONNECT answered {}",
                response.status()
            )));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(io::Error::other)?;
        streams.push(Stream::H2(TokioIo::new(upgraded)));
    }
    Ok((sender, streams))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The modes

/// Opens `n` WebSockets one after the other; any failure fails the run.
async fn open_all(upgrade: &Upgrade, n: usize) -> io::Result<Vec<Stream>> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(upgrade.open().await?);
    }
    Ok(streams)
}

/// Runs a connection task; its error (a connection that stopped) is counted.
fn spawn_counted(
    task: impl std::future::Future<Output = io::Result<()>> + 'static,
    stats: Rc<Stats>,
) -> JoinHandle<()> {
    tokio::task::spawn_local(async move {
        if let Err(err) = task.await {
            stats.error(&err);
        }
    })
}

/// Ping-pong: one message out, wait for its echo, again; paced to a slot per interval if asked.
async fn echo_conn(
    mut stream: Stream,
    frame: Rc<[u8]>,
    payload: usize,
    stats: Rc<Stats>,
    pace: Option<(Instant, Duration)>,
) -> io::Result<()> {
    // Larger than a reply, so that reading one whole reply is a short read: tokio then forgets
    // the socket's readiness and waits for epoll, instead of trying a read that would block.
    let mut reply = vec![0u8; frame.len() + 4096];
    let mut slot = pace.map(|(start, _)| start);
    loop {
        if let (Some(at), Some((_, interval))) = (slot.as_mut(), pace) {
            sleep_until(*at).await;
            let now = Instant::now();
            // An echo slower than a whole interval makes us miss slots: count it and carry on
            // from now rather than send a catch-up burst.
            if now > *at + interval {
                if stats.recording.get() {
                    stats.late.set(stats.late.get() + 1);
                }
                *at = now;
            }
            *at += interval;
        }
        let sent = Instant::now();
        stream.write_all(&frame).await?;
        // TLS: records the socket did not take at once are written by the flush (TCP: no-op).
        stream.flush().await?;
        let mut got = 0;
        while got < frame.len() {
            match stream.read(&mut reply[got..]).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        if reply[..got] != frame[..] {
            return Err(invalid("echo differs from the message sent"));
        }
        stats.done(1, payload as u64, Some(sent.elapsed()));
    }
}

/// Streams frames both ways with at most `inflight` bytes sent and not yet echoed.
async fn bulk_conn(
    stream: Stream,
    frames: Rc<[u8]>,
    frame_len: usize,
    payload: usize,
    inflight: usize,
    stats: Rc<Stats>,
) -> io::Result<()> {
    // TCP splits into borrowed halves at no cost; TLS needs tokio's lock-guarded split.
    match stream {
        Stream::Tcp(mut tcp) => {
            let (rd, wr) = tcp.split();
            bulk_both(rd, wr, &frames, frame_len, payload, inflight, &stats).await
        }
        other => {
            let (rd, wr) = tokio::io::split(other);
            bulk_both(rd, wr, &frames, frame_len, payload, inflight, &stats).await
        }
    }
}

async fn bulk_both(
    rd: impl AsyncRead + Unpin,
    wr: impl AsyncWrite + Unpin,
    frames: &[u8],
    frame_len: usize,
    payload: usize,
    inflight: usize,
    stats: &Stats,
) -> io::Result<()> {
    let flow = Flow {
        sent: Cell::new(0),
        received: Cell::new(0),
        room: Notify::new(),
    };
    let min_write = frame_len.min(inflight) as u64;
    tokio::try_join!(
        bulk_write(wr, frames, inflight as u64, min_write, &flow),
        bulk_read(rd, payload as u64, &flow, stats),
    )?;
    Ok(())
}

struct Flow {
    sent: Cell<u64>,
    received: Cell<u64>,
    /// Signalled by the reader when echoed bytes make room in the window.
    room: Notify,
}

async fn bulk_write(
    mut wr: impl AsyncWrite + Unpin,
    frames: &[u8],
    inflight: u64,
    min_write: u64,
    flow: &Flow,
) -> io::Result<()> {
    loop {
        let room = inflight.saturating_sub(flow.sent.get() - flow.received.get());
        if room < min_write {
            flow.room.notified().await;
            continue;
        }
        // `frames` holds whole frames back to back, so cycling through it is a valid stream.
        let at = (flow.sent.get() % frames.len() as u64) as usize;
        let end = frames.len().min(at + room as usize);
        let n = wr.write(&frames[at..end]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        flow.sent.set(flow.sent.get() + n as u64);
        // TLS: push out the records the socket did not take, before waiting for room (TCP: no-op).
        wr.flush().await?;
    }
}

async fn bulk_read(
    mut rd: impl AsyncRead + Unpin,
    payload: u64,
    flow: &Flow,
    stats: &Stats,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tracker = Tracker::new();
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let frames = count_frames(&mut tracker, &buf[..n])?;
        flow.received.set(flow.received.get() + n as u64);
        stats.done(frames, frames * payload, None);
        flow.room.notify_one();
    }
}

/// Connect, upgrade, close handshake, wait for the server to close the connection; again.
async fn handshake_loop(upgrade: Rc<Upgrade>, close: Rc<[u8]>, stats: Rc<Stats>) {
    let mut reply = vec![0u8; close.len()];
    loop {
        let started = Instant::now();
        match handshake_once(&upgrade, &close, &mut reply, &stats).await {
            Ok(()) => stats.done(1, 0, Some(started.elapsed())),
            Err(err) => {
                stats.error(&err);
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handshake_once(
    upgrade: &Upgrade,
    close: &[u8],
    reply: &mut [u8],
    stats: &Stats,
) -> io::Result<()> {
    let mut stream = upgrade.open().await?;
    stream.write_all(close).await?;
    stream.flush().await?;
    stream.read_exact(reply).await?;
    if reply != close {
        return Err(invalid("close frame echo differs"));
    }
    // As RFC 6455 (7.1.1) asks, the server closes the TCP connection first (bench_backend does,
    // and the proxy passes its FIN on), so TIME_WAIT does not pile up on the client's ports. The
    // tunnel's teardown is part of the loop.
    // Over TLS, the end is a close_notify (read as EOF) and then the FIN. A FIN without a
    // close_notify is counted, not failed: the WebSocket's own close already ended the exchange.
    // The client then just closes its socket, as over plain TCP, without a close_notify of its own.
    let mut rest = [0u8; 16];
    match stream.read(&mut rest).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(invalid("bytes after the close frame")),
        Err(err)
            if err.kind() == io::ErrorKind::UnexpectedEof && upgrade.connector.tls.is_some() =>
        {
            if stats.recording.get() {
                stats.no_close_notify.set(stats.no_close_notify.get() + 1);
            }
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// Opens `--conns` WebSockets (one echo of `size` bytes each) or HTTP/1.1 connections (one
/// request each: answered for `http_idle`, pending for `long_poll`), signals readiness, holds
/// them until SIGUSR1 (or SIGTERM/SIGINT, or `--hold-max`), then reports how many survived.
async fn hold_idle(
    args: &Args,
    upgrade: &Rc<Upgrade>,
    size: usize,
    stats: &Rc<Stats>,
    out: &mut Json,
) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut release = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let frame: Rc<[u8]> = binary_frame(size).into();
    let path = match args.mode {
        Mode::LongPoll => format!("/hold?ms={}", args.hold_ms),
        _ => "/".to_owned(),
    };
    let request: Rc<[u8]> = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", args.addr)
        .into_bytes()
        .into();
    let held = Rc::new(RefCell::new(Vec::with_capacity(args.conns)));
    let next = Rc::new(Cell::new(0usize));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.open_concurrency.max(1) {
        let (upgrade, frame, request, held, next, stats) = (
            upgrade.clone(),
            frame.clone(),
            request.clone(),
            held.clone(),
            next.clone(),
            stats.clone(),
        );
        let (conns, mode) = (args.conns, args.mode);
        workers.push(tokio::task::spawn_local(async move {
            while next.get() < conns {
                next.set(next.get() + 1);
                match open_held(mode, &upgrade, &frame, &request).await {
                    Ok(stream) => held.borrow_mut().push(stream),
                    Err(err) => stats.error(&err),
                }
            }
        }));
    }
    for worker in workers {
        worker.await.map_err(io::Error::other)?;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let open = held.borrow().len();
    eprintln!(
        "loadgen: {open} of {} connections open in {open_secs:.1} s; holding until SIGUSR1",
        args.conns
    );
    if args.mode == Mode::LongPoll && (args.hold_ms as f64) < (open_secs + 2.0) * 1e3 {
        // The first requests are answered before the caller reads the proxy's memory.
        eprintln!(
            "loadgen: --hold-ms {} is shorter than opening + 2 s",
            args.hold_ms
        );
    }
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{open}\n"))?;
    }
    let held_secs = Instant::now();
    tokio::select! {
        _ = release.recv() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = sleep(Duration::from_secs_f64(args.hold_max)) => {}
    }
    // A WebSocket the proxy closed while idle reads as EOF (or an error) now; so does an idle
    // HTTP connection, and a long-poll request reads its answer (or EOF) if the hold ran out.
    let mut closed = 0;
    for stream in held.borrow_mut().iter_mut() {
        if stream.closed() {
            closed += 1;
        }
    }
    out.num("conns_open", open as f64)
        .num("open_concurrency", args.open_concurrency.max(1) as f64)
        .num("open_s", open_secs)
        .num("held_s", held_secs.elapsed().as_secs_f64())
        .num("closed_while_held", f64::from(closed));
    if args.mode == Mode::LongPoll {
        out.num("hold_ms", args.hold_ms as f64);
    }
    Ok(())
}

/// One connection to hold: a WebSocket after one echo, or an HTTP/1.1 connection after
/// writing `request` (and, for `http_idle`, reading its whole answer).
async fn open_held(
    mode: Mode,
    upgrade: &Upgrade,
    frame: &[u8],
    request: &[u8],
) -> io::Result<Stream> {
    if !matches!(mode, Mode::HttpIdle | Mode::LongPoll) {
        return open_and_echo(upgrade, frame).await;
    }
    let mut stream = upgrade.connector.connect().await?;
    stream.write_all(request).await?;
    stream.flush().await?;
    if mode == Mode::HttpIdle {
        read_response(&mut stream).await?;
    }
    Ok(stream)
}

/// Reads one small `200` answer whole (Content-Length or chunked) and checks that the
/// connection stays open for another request.
async fn read_response(stream: &mut Stream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut len = 0;
    let mut body_len = None;
    loop {
        if len == buf.len() {
            return Err(invalid("response larger than 4 KiB"));
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the whole response",
            ));
        }
        len += n;
        let Some(end) = find(&buf[..len], b"\r\n\r\n").map(|at| at + 4) else {
            continue;
        };
        let body = &buf[end..len];
        let head = body_len.get_or_insert_with(|| parse_head(&buf[..end]));
        let done = match head {
            Err(err) => return Err(invalid(err)),
            Ok(Some(content_length)) => body.len() >= *content_length,
            // Chunked: a small body ends with the last, empty chunk (no trailers expected).
            Ok(None) => body.ends_with(b"0\r\n\r\n"),
        };
        if done {
            return Ok(());
        }
    }
}

/// A response head's body length: `Some(Content-Length)`, or `None` for chunked.
fn parse_head(head: &[u8]) -> Result<Option<usize>, &'static str> {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err("the response is not HTTP/1.1 200");
    }
    let mut length = None;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match (name.trim(), value.trim()) {
            ("connection", v) if v.split(',').any(|t| t.trim() == "close") => {
                return Err("the server closes the connection after one request: no keep-alive")
            }
            ("content-length", v) => length = v.parse().ok(),
            ("transfer-encoding", v) => chunked = v.ends_with("chunked"),
            _ => {}
        }
    }
    match (length, chunked) {
        (_, true) => Ok(None),
        (Some(length), false) => Ok(Some(length)),
        (None, false) => Err("a response with neither Content-Length nor chunked"),
    }
}

async fn open_and_echo(upgrade: &Upgrade, frame: &[u8]) -> io::Result<Stream> {
    let stream = upgrade.open().await?;
    let mut reply = vec![0u8; frame.len()];
    // Write and read at once: a 64 KiB message need not fit the socket buffers.
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        wr.write_all(frame).await?;
        wr.flush().await
    };
    tokio::try_join!(write, rd.read_exact(&mut reply))?;
    if reply != frame {
        return Err(invalid("echo differs from the message sent"));
    }
    Ok(rd.unsplit(wr))
}

// ---------------------------------------------------------------------------------------------
// Output

/// One flat JSON object, built by hand (numbers and strings only).
struct Json(String);

impl Json {
    fn new() -> Self {
        Json(String::from("{"))
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "\"{key}\":");
    }

    fn num(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.0, "{}", (value * 1000.0).round() / 1000.0);
        } else {
            self.0.push_str("null");
        }
        self
    }

    fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.0.push('"');
        for c in value.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", u32::from(c));
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
        self
    }

    fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_finds_frames_split_anywhere() {
        let mut stream = binary_frame(64);
        stream.extend(binary_frame(16 * 1024));
        stream.extend(binary_frame(70_000));
        stream.extend(close_frame());
        for chunk in [1, 3, 7, 1000, stream.len()] {
            let mut tracker = Tracker::new();
            let frames: u64 = stream
                .chunks(chunk)
                .map(|c| count_frames(&mut tracker, c).unwrap())
                .sum();
            assert_eq!(frames, 4, "chunk size {chunk}");
        }
    }

    #[test]
    fn response_heads_give_the_body_length_or_refuse() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n";
        assert_eq!(parse_head(ok), Ok(Some(6)));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked), Ok(None));
        let close = b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 6\r\n\r\n";
        assert!(parse_head(close).is_err());
        assert!(parse_head(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn counter_refuses_reserved_bits_however_the_header_is_cut() {
        let mut stream = binary_frame(64);
        let corrupt = stream.len();
        stream.extend(binary_frame(300));
        stream[corrupt] |= 0x40;
        for chunk in [1, 2, 5, stream.len()] {
            let mut tracker = Tracker::new();
            let failed = stream
                .chunks(chunk)
                .map(|c| count_frames(&mut tracker, c))
                .find_map(Result::err);
            assert!(failed.is_some(), "chunk size {chunk}");
        }
    }
}
