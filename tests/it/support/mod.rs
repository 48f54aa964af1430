//! The harness: one gateway per test on 127.0.0.1:0, real backends beside it, and `within`, so
//! that no await can hang the run. Readiness is never waited for by sleeping: every socket is
//! bound (and listening) before its address is handed out.

pub mod backend;
pub mod binary;
pub mod browser;
pub mod client;
pub mod devtools;
pub mod health;
pub mod pattern;
pub mod raw;
pub mod tls;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::Location;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wsgate::router::RouteStats;
use wsgate::server::{ListenerStats, ReloadError, ReloadSummary};
use wsgate::snapshot::{Current, Snapshot};
use wsgate::upstream::Endpoint;
use wsgate::Server;

pub use backend::HttpBackend;
pub use client::{empty, full, get, request, Client};
pub use raw::{
    dead_address, raw_backend, read_request_head, silent_backend, upgraded_backend, RawClient,
};
pub use ws::{ws_connect, ws_connect_with, WsBackend};

/// The bound for one step of a test. Generous: CI is a noisy 2-core machine, and a test that
/// waits this long has failed anyway.
pub const WAIT: Duration = Duration::from_secs(15);

/// Awaits `fut`, or panics naming the caller's line once `limit` has passed.
#[track_caller]
pub fn within<F: Future>(limit: Duration, fut: F) -> impl Future<Output = F::Output> {
    let caller = Location::caller();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(out) => out,
            Err(_) => panic!("timed out after {limit:?} waiting at {caller}"),
        }
    }
}

/// Polls `condition` until it holds, for counters that change just after the event a test can
/// observe. Bounded in iterations and in time; the short pause between polls keeps a waiting
/// test from spinning a core that the gateway under test needs.
#[track_caller]
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) -> impl Future<Output = ()> {
    const POLL: Duration = Duration::from_millis(2);
    let caller = Location::caller();
    let what = what.to_owned();
    async move {
        let deadline = Instant::now() + WAIT;
        let max_polls = WAIT.as_millis() / POLL.as_millis();
        for _ in 0..max_polls {
            if condition() {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("{what}: still false after {WAIT:?} at {caller}");
    }
}

/// `toml` with a listener on 127.0.0.1:0 when it has none.
fn with_test_listener(toml: &str) -> String {
    let mut text = toml.to_owned();
    if !text.contains("[[listener]]") {
        text.push_str("\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n");
    }
    text
}

/// A route `app` for every path, proxied to upstream `app` over `servers`.
pub fn proxy_config(servers: &[SocketAddr]) -> String {
    format!(
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n\n{}",
        upstream_config("app", "least_connections", servers)
    )
}

/// One `[[upstream]]` table.
pub fn upstream_config(name: &str, balance: &str, servers: &[SocketAddr]) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[upstream]]\nname = \"{name}\"\nbalance = \"{balance}\"\nservers = [{}]\n",
        servers.join(", ")
    )
}

/// A gateway running in this test's runtime, stopped by a oneshot-driven shutdown future.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    /// The (first) listener's counters.
    pub listener: Arc<ListenerStats>,
    /// Every listener: its name, bound address and counters.
    listeners: Vec<(String, SocketAddr, Arc<ListenerStats>)>,
    /// Reloads the TLS listeners' certificates, as SIGHUP does.
    pub reloader: wsgate::server::Reloader,
    current: Current,
    drain: Duration,
    stop: Option<oneshot::Sender<()>>,
    /// Resolves once `run` has seen its shutdown future complete.
    stopping: Option<oneshot::Receiver<()>>,
    run: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Parses `toml` (adding a listener on 127.0.0.1:0 when it has none), binds, and serves.
    /// The listener is bound when this returns, so the gateway is ready.
    pub async fn start(toml: &str) -> TestGateway {
        let text = with_test_listener(toml);
        let config = wsgate::config::parse(&text, "test.toml")
            .unwrap_or_else(|err| panic!("test config is invalid:\n{err}\n--- config ---\n{text}"));
        let server = within(WAIT, Server::bind(&config, None))
            .await
            .expect("gateway binds 127.0.0.1:0");
        let listeners: Vec<_> = server
            .local_addrs()
            .into_iter()
            .map(|(name, addr)| {
                let stats = server.listener_stats(&name).expect("the listener exists");
                (name, addr, stats)
            })
            .collect();
        let (_, addr, listener) = listeners[0].clone();
        let admin = server.admin_addr();
        let reloader = server.reloader();
        let current = server.current();
        let (stop, stop_signal) = oneshot::channel::<()>();
        let (stopping_tx, stopping) = oneshot::channel::<()>();
        let run = tokio::spawn(server.run(async move {
            // A dropped sender (the test ended without shutting down) also stops the gateway.
            let _ = stop_signal.await;
            let _ = stopping_tx.send(());
        }));
        TestGateway {
            addr,
            admin,
            listener,
            listeners,
            reloader,
            current,
            drain: config.timeouts.drain,
            stop: Some(stop),
            stopping: Some(stopping),
            run: Some(run),
        }
    }

    /// Reloads the running gateway with `toml` (given the same test listener as `start`, which
    /// therefore stays); a config that does not parse is refused like any other reload.
    pub async fn reload(&self, toml: &str) -> Result<ReloadSummary, ReloadError> {
        let config = wsgate::config::parse(&with_test_listener(toml), "reload.toml")?;
        within(WAIT, self.reloader.reload(config)).await
    }

    /// The bound address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        self.named_listener(name).1
    }

    /// The counters of the listener called `name`.
    pub fn listener_stats(&self, name: &str) -> Arc<ListenerStats> {
        self.named_listener(name).2.clone()
    }

    fn named_listener(&self, name: &str) -> &(String, SocketAddr, Arc<ListenerStats>) {
        self.listeners
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name:?}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The configuration in force (a reload swaps it).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The live counters of the route called `name`.
    pub fn route_stats(&self, name: &str) -> Arc<RouteStats> {
        let snapshot = self.snapshot();
        let route = snapshot.router.routes().iter().find(|r| &*r.name == name);
        route
            .unwrap_or_else(|| panic!("no route {name:?}"))
            .stats
            .clone()
    }

    /// Server `index` of the upstream called `upstream`.
    pub fn endpoint(&self, upstream: &str, index: usize) -> Arc<Endpoint> {
        let snapshot = self.snapshot();
        let group = snapshot.upstreams.iter().find(|u| &*u.name == upstream);
        group
            .unwrap_or_else(|| panic!("no upstream {upstream:?}"))
            .endpoints()[index]
            .clone()
    }

    /// Fires the shutdown and returns once `run` has taken it (it is draining from then on).
    pub async fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(stopping) = self.stopping.take() {
            within(WAIT, stopping)
                .await
                .expect("run() consumed its shutdown future");
        }
    }

    /// Waits for `run` to return: at most the drain period plus `WAIT`.
    pub async fn finish_shutdown(&mut self) {
        let run = self.run.take().expect("gateway still running");
        within(self.drain + WAIT, run)
            .await
            .expect("run() did not panic");
    }

    pub async fn shutdown(mut self) {
        self.begin_shutdown().await;
        self.finish_shutdown().await;
    }

    /// True once `run` has returned.
    pub fn is_stopped(&self) -> bool {
        self.run.as_ref().is_none_or(JoinHandle::is_finished)
    }
}
