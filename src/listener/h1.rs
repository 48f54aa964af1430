//! Serving one HTTP/1 client connection with hyper, and parking it while it is idle: an idle
//! keep-alive connection is then its socket and this task, without hyper's read and write
//! buffers, header map and timer (about 16 KiB), and it is served afresh when the client sends
//! again. `client_io` tells when hyper has nothing in hand.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::{Connection, GracefulShutdown, Protocols};
use crate::client_io::{Activity, Claimed, ClientIo, Readiness};
use crate::shutdown::Signal;

/// How long a connection stays idle, still held by hyper, before it is parked. Parking itself
/// is cheap, but freeing and re-allocating hyper's buffers between back-to-back requests makes
/// the allocator hand their pages back and fault them in again: measured, 58% more CPU per
/// request on busy keep-alive connections. A client this busy is never parked. Short, because
/// what a burst of new connections holds during the grace stays with the allocator: at 250 ms,
/// 9,900 connections opened 32 at a time kept 7.4 KiB of RSS each, for 2.6 KiB of live heap.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// What serving an HTTP/1 connection until its next idle moment came to.
enum Served<C> {
    /// Finished: closed by either side, upgraded, or failed.
    Done(hyper::Result<()>),
    /// Idle for `PARK_AFTER` since the instant given: hyper can give the socket back.
    Idle(C, Instant),
}

enum Wake {
    Readable,
    /// Nothing came within the request-header timeout.
    Quiet,
    Drained,
}

/// `fresh`: nothing was read from `io` yet, so the connection starts parked until the client
/// sends. An idle connection is closed silently `timeouts.request_header` after its last
/// response, as hyper closes one. On drain: a parked connection closes at once; the request in flight
/// finishes, then the connection closes.
pub(super) async fn serve<T>(
    io: T,
    fresh: bool,
    connection: Arc<Connection>,
    protocols: &Protocols,
    mut drain: Signal,
) -> hyper::Result<()>
where
    T: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static,
{
    let stats = connection.stats.clone();
    let activity = Arc::new(Activity::default());
    let mut io = ClientIo::new(io, activity.clone());
    let mut service = {
        let activity = activity.clone();
        service_fn(move |request: Request<Incoming>| {
            let open = activity.request_started(!request.body().is_end_stream());
            let connection = connection.clone();
            async move {
                let response = connection.proxy.handle(request, &connection.info).await;
                Ok::<_, Infallible>(response.map(|body| Claimed::new(body, open)))
            }
        })
    };
    // One timer for the whole connection: the idle grace while served, the request-header
    // timeout while parked.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    // Parked from the start, or since the instant the connection went idle.
    let mut parked_since = fresh.then(Instant::now);
    loop {
        if let Some(since) = parked_since {
            timer
                .as_mut()
                .reset(since + protocols.timeouts.request_header);
            let wake = parked(&io, timer.as_mut(), &mut drain);
            match counted(&stats.parked, wake).await {
                Wake::Readable => {}
                Wake::Quiet | Wake::Drained => return Ok(()),
            }
        }
        let serving = protocols
            .http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        // Boxed so that a parked connection's task does not carry hyper's connection state.
        match serve_until_idle(Box::pin(serving), &activity, &mut drain, timer.as_mut()).await {
            Served::Done(result) => {
                // hyper answered 431 itself: the service never saw the request.
                if result.as_ref().is_err_and(hyper::Error::is_parse_too_large) {
                    stats.headers_too_large.fetch_add(1, Ordering::Relaxed);
                }
                return result;
            }
            Served::Idle(serving, since) => {
                let parts = serving
                    .into_parts()
                    .expect("an upgraded connection is done");
                io = parts.io.into_inner();
                io.replay(parts.read_buf);
                service = parts.service;
                // Bytes hyper had read of the next request are served at once.
                parked_since = (!io.has_replay()).then_some(since);
            }
        }
    }
}

/// Drives hyper until the connection ends, or until it has been idle (`Activity::is_idle`,
/// and no request started) for `PARK_AFTER`. `timer` is re-armed only when it fires, so a busy
/// connection costs one timer wake per `PARK_AFTER`, not a timer update per request.
async fn serve_until_idle<C>(
    mut serving: Pin<Box<C>>,
    activity: &Activity,
    drain: &mut Signal,
    mut timer: Pin<&mut Sleep>,
) -> Served<C>
where
    C: Future<Output = hyper::Result<()>> + GracefulShutdown + Unpin,
{
    let mut draining = false;
    let mut requests_seen = activity.requests();
    let mut idle_since: Option<Instant> = None;
    timer.as_mut().reset(Instant::now() + PARK_AFTER);
    enum Stop {
        Done(hyper::Result<()>),
        IdleSince(Instant),
    }
    let stop = poll_fn(|cx| {
        if !draining && drain.poll_fired(cx).is_ready() {
            serving.as_mut().graceful_shutdown();
            draining = true;
        }
        if let Poll::Ready(result) = serving.as_mut().poll(cx) {
            return Poll::Ready(Stop::Done(result));
        }
        let requests = activity.requests();
        if draining || requests != requests_seen || !activity.is_idle() {
            requests_seen = requests;
            idle_since = None;
            if draining || !activity.is_idle() {
                return Poll::Pending;
            }
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        let due = since + PARK_AFTER;
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= due {
                return Poll::Ready(Stop::IdleSince(since));
            }
            // Fired for an earlier idle moment: wait for this one's.
            timer.as_mut().reset(due);
        }
    })
    .await;
    match stop {
        Stop::Done(result) => Served::Done(result),
        Stop::IdleSince(since) => Served::Idle(*Pin::into_inner(serving), since),
    }
}

/// Waits for the client's next bytes holding no buffer, until `timer` or the drain fires.
async fn parked<T: Readiness>(
    io: &ClientIo<T>,
    mut timer: Pin<&mut Sleep>,
    drain: &mut Signal,
) -> Wake {
    poll_fn(|cx| {
        if drain.poll_fired(cx).is_ready() {
            return Poll::Ready(Wake::Drained);
        }
        // An error or EOF is hyper's to see: it reads, finds it, and closes.
        if io.poll_read_ready(cx).is_ready() {
            return Poll::Ready(Wake::Readable);
        }
        timer.as_mut().poll(cx).map(|()| Wake::Quiet)
    })
    .await
}

/// `gauge` counts `future` while it is pending.
async fn counted<F: Future>(gauge: &AtomicUsize, future: F) -> F::Output {
    struct Counted<'a>(&'a AtomicUsize);
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    gauge.fetch_add(1, Ordering::Relaxed);
    let _counted = Counted(gauge);
    future.await
}
