//! A running gateway: binds every listener up front, serves until told to stop, reloads the
//! whole config when asked (SIGHUP, a changed file, or a caller), and drains: stop accepting,
//! let requests finish and tunnels close, then force what is left.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Config};
pub use crate::listener::ListenerStats;
use crate::listener::{Listener, ListenerCtx, Protocols};
use crate::metrics::{ReloadStats, ServingListener};
use crate::proxy::policy::ClientLimiter;
use crate::proxy::Proxy;
use crate::shutdown::{self, Signal, Tracker, Trigger};
use crate::snapshot::{Current, Snapshot};
use crate::sockets;
use crate::telemetry;
use crate::telemetry::fields as f;
use crate::tls::{self, Terminator};
use tokio::sync::Semaphore;

/// After the drain period, how long closed tunnels get to log their last line.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listener {listener:?} cannot bind {address}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
    #[error(transparent)]
    Inherited(#[from] sockets::Error),
    #[error("listener {listener:?}: TLS")]
    Tls {
        listener: String,
        #[source]
        source: tls::Error,
    },
}

/// Why a reload was refused; the config in force keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Setup(#[from] Error),
    #[error("the gateway is shutting down")]
    Stopped,
}

/// What a reload changed, for its log line and for callers.
#[derive(Debug, Default, Clone)]
pub struct ReloadSummary {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
    pub upstreams_added: Vec<String>,
    pub upstreams_removed: Vec<String>,
    pub servers_added: Vec<String>,
    pub servers_removed: Vec<String>,
    /// Tunnels of removed servers, now closing over `reload.close_spread`.
    pub tunnels_closing: usize,
    /// Every listener's bound address after the reload.
    pub listening: Vec<(String, SocketAddr)>,
}

pub struct Server {
    listeners: Vec<Listener>,
    /// `[admin]`: its socket, bound with the others, and who may connect.
    admin: Option<(tokio::net::TcpListener, config::CidrSet)>,
    /// What the admin listener reads besides the snapshot.
    reload_stats: Arc<ReloadStats>,
    serving: Arc<Mutex<Vec<ServingListener>>>,
    draining: Arc<AtomicBool>,
    config: Config,
    /// Where SIGHUP and the file watch read the next config from.
    source: Option<PathBuf>,
    current: Current,
    proxy: Arc<Proxy>,
    certificates: Certificates,
    tunnels: Tracker,
    close_tunnels: Trigger,
    reloads: mpsc::Receiver<ReloadRequest>,
    reloader: Reloader,
}

struct ReloadRequest {
    config: Config,
    reply: oneshot::Sender<Result<ReloadSummary, ReloadError>>,
}

/// Asks the running gateway to reload; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    requests: mpsc::Sender<ReloadRequest>,
    stats: Arc<ReloadStats>,
    source: Option<PathBuf>,
    certificates: Certificates,
}

impl Reloader {
    /// Applies `config` whole, or refuses it whole and keeps the one in force.
    pub async fn reload(&self, config: Config) -> Result<ReloadSummary, ReloadError> {
        let (reply, answer) = oneshot::channel();
        let request = ReloadRequest { config, reply };
        self.requests
            .send(request)
            .await
            .map_err(|_| ReloadError::Stopped)?;
        answer.await.map_err(|_| ReloadError::Stopped)?
    }

    /// Reads and applies the config file the gateway was started from (SIGHUP). Every outcome
    /// is logged; a refused config names each of its problems.
    pub async fn reload_from_source(&self) {
        let Some(path) = &self.source else {
            tracing::warn!(
                { f::EVENT } = f::event::RELOAD,
                { f::OUTCOME } = "rejected",
                "reload asked for, but the config was not read from a file"
            );
            return;
        };
        let result = match config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(err) => {
                // A config that does not parse never reaches the reload loop, which counts the rest.
                self.stats.rejected(telemetry::error_chain(&err));
                Err(err.into())
            }
        };
        if let Err(err) = result {
            // The diagnostics are one per line, each `file:line:col: message`.
            for line in telemetry::error_chain(&err).lines() {
                tracing::warn!(
                    { f::EVENT } = f::event::RELOAD,
                    { f::OUTCOME } = "rejected",
                    { f::PROBLEM } = line,
                    "config reload rejected; still serving the previous config"
                );
            }
        }
    }

    /// Reloads only the TLS listeners' certificates (what a changed certificate file does).
    pub fn reload_certificates(&self) {
        self.certificates.reload_all();
    }

    /// Certificate reloads that failed since start.
    pub fn certificate_failures(&self) -> u64 {
        self.certificates.failures.load(Ordering::Relaxed)
    }
}

type NamedTerminator = (String, Arc<Terminator>);

/// The terminator of each TLS listener in force, for certificate reloads between config
/// reloads; a config reload replaces the whole list.
#[derive(Clone, Default)]
struct Certificates {
    terminators: Arc<ArcSwap<Vec<NamedTerminator>>>,
    failures: Arc<AtomicU64>,
    /// A config reload replaced the list: the watch looks at its intervals again.
    replaced: Arc<tokio::sync::Notify>,
}

impl Certificates {
    /// The TLS listeners of `config`, in its order.
    fn replace(&self, config: &Config, terminators: &HashMap<String, Arc<Terminator>>) {
        let named = config
            .listeners
            .iter()
            .filter_map(|l| Some((l.name.clone(), terminators.get(&l.name)?.clone())))
            .collect();
        self.terminators.store(Arc::new(named));
        self.replaced.notify_one();
    }

    fn reload_all(&self) {
        for (listener, terminator) in self.terminators.load().iter() {
            self.reload_one(listener, terminator);
        }
    }

    fn reload_one(&self, listener: &str, terminator: &Terminator) {
        match terminator.reload() {
            Ok(()) => tracing::info!(listener, "certificates reloaded"),
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    listener,
                    error = %telemetry::error_chain(&err),
                    "certificate reload failed; still serving the previous certificates"
                );
            }
        }
    }

    /// Looks at the certificate files every `watch_interval` and reloads a listener whose
    /// files changed, until `stop` fires.
    async fn watch(self, mut stop: Signal) {
        loop {
            let interval = self
                .terminators
                .load()
                .iter()
                .map(|(_, t)| t.watch_interval())
                .min()
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                () = stop.fired() => return,
                () = self.replaced.notified() => continue,
                () = tokio::time::sleep(interval) => {}
            }
            for (listener, terminator) in self.terminators.load().iter() {
                if terminator.files_changed() {
                    self.reload_one(listener, terminator);
                }
            }
        }
    }
}

/// Loads what each TLS listener serves (certificates, keys), so that `check`, `bind` and a
/// reload fail on the same problems.
fn terminators(config: &Config) -> Result<HashMap<String, Arc<Terminator>>, Error> {
    let mut terminators = HashMap::new();
    for listener in &config.listeners {
        let Some(tls) = &listener.tls else { continue };
        let terminator = Terminator::new(tls, listener.http2).map_err(|source| Error::Tls {
            listener: listener.name.clone(),
            source,
        })?;
        terminators.insert(listener.name.clone(), Arc::new(terminator));
    }
    Ok(terminators)
}

fn listener_ctx(
    config: &Config,
    listener: &config::Listener,
    terminators: &HashMap<String, Arc<Terminator>>,
) -> ListenerCtx {
    ListenerCtx {
        protocols: Arc::new(Protocols::new(
            &config.timeouts,
            &config.limits,
            listener.http2,
        )),
        tls: terminators
            .get(&listener.name)
            .map(|terminator| terminator.acceptor.clone()),
        proxy_protocol: listener.proxy_protocol.clone(),
        connections: listener
            .max_connections
            .map(|n| Arc::new(Semaphore::new(n as usize))),
    }
}

/// The listener's socket: inherited from systemd (at start only), or bound.
fn listen(
    listener: &config::Listener,
    inherited: &mut sockets::Inherited,
) -> Result<sockets::Socket, Error> {
    sockets::listen(listener, inherited).map_err(|source| Error::Bind {
        listener: listener.name.clone(),
        address: listener.bind,
        source,
    })
}

/// One listener as the running gateway knows it.
struct Running {
    bind: SocketAddr,
    local: SocketAddr,
    tls: bool,
    stats: Arc<ListenerStats>,
    ctx: Arc<ArcSwap<ListenerCtx>>,
    /// Stops this listener alone (a reload removed it), or with all the others on shutdown.
    stop: Trigger,
}

impl Server {
    /// Checks what a config needs beyond its own text (certificate and key files), without
    /// binding anything.
    pub fn check(config: &Config) -> Result<(), Error> {
        terminators(config)?;
        Snapshot::build(config, None)?;
        Ok(())
    }

    /// Binds every listener, so that a port already in use fails before anything serves.
    /// `source`: the file the config came from, which SIGHUP and `reload.watch` read again.
    pub async fn bind(config: &Config, source: Option<PathBuf>) -> Result<Server, Error> {
        let terminators = terminators(config)?;
        let snapshot = Snapshot::build(config, None)?;
        let mut inherited = sockets::Inherited::from_env()?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let socket = listen(listener, &mut inherited)?;
            listeners.push(Listener {
                name: listener.name.as_str().into(),
                socket: socket.listener,
                inherited: socket.inherited,
                ctx: Arc::new(ArcSwap::from_pointee(listener_ctx(
                    config,
                    listener,
                    &terminators,
                ))),
                stats: Arc::default(),
            });
        }
        // Like a listener's: inherited from systemd (named "admin") or bound, with reuse_port
        // when asked, so that restarts and upgrades keep it too.
        let admin = match &config.admin {
            None => None,
            Some(admin) => {
                let socket =
                    sockets::listen_at("admin", admin.bind, admin.reuse_port, &mut inherited)
                        .map_err(|source| Error::Bind {
                            listener: "admin".to_owned(),
                            address: admin.bind,
                            source,
                        })?;
                Some((socket.listener, admin.allow.clone()))
            }
        };
        inherited.warn_unclaimed();
        let certificates = Certificates::default();
        certificates.replace(config, &terminators);
        let tunnels = Tracker::default();
        let (close_tunnels, close_signal) = shutdown::channel();
        let current: Current = Arc::new(ArcSwap::from_pointee(snapshot));
        let (requests, reloads) = mpsc::channel(4);
        let reload_stats = Arc::new(ReloadStats::started());
        Ok(Server {
            listeners,
            admin,
            serving: Arc::default(),
            draining: Arc::default(),
            config: config.clone(),
            reloader: Reloader {
                requests,
                stats: reload_stats.clone(),
                source: source.clone(),
                certificates: certificates.clone(),
            },
            source,
            // Created once: a reload keeps every client's tokens and tunnel counts (and
            // the capacity it started with).
            proxy: Arc::new(Proxy::new(
                current.clone(),
                ClientLimiter::new(config.limits.per_client.tracked_clients),
                tunnels.clone(),
                close_signal,
            )),
            current,
            certificates,
            tunnels,
            close_tunnels,
            reloads,
            reload_stats,
        })
    }

    /// What reloads the config or the certificates.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The counters of the listener named `name`.
    pub fn listener_stats(&self, name: &str) -> Option<Arc<ListenerStats>> {
        self.listeners
            .iter()
            .find(|l| &*l.name == name)
            .map(|l| l.stats.clone())
    }

    /// Where the admin listener is bound, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref()?.0.local_addr().ok()
    }

    /// The bound address of each listener, by name (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name.to_string(), l.socket.local_addr().ok()?)))
            .collect()
    }

    /// The configuration in force, with its counters; a reload swaps it.
    pub fn current(&self) -> Current {
        self.current.clone()
    }

    /// Serves until `shutdown` completes, then drains for at most the configured period.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let connections = Tracker::default();
        let (stop_watching, watch_signal) = shutdown::channel();
        tokio::spawn(self.certificates.clone().watch(watch_signal));
        self.current.load().start_health_checks();
        let mut running = HashMap::new();
        for listener in std::mem::take(&mut self.listeners) {
            let config = self
                .config
                .listeners
                .iter()
                .find(|l| *l.name == *listener.name);
            let Some(config) = config else { continue };
            let Ok(local) = listener.socket.local_addr() else {
                continue;
            };
            let inherited = listener.inherited;
            tracing::info!(listener = %listener.name, address = %local, inherited, "listening");
            running.insert(
                config.name.clone(),
                self.spawn_listener(listener, config.bind, local, &connections),
            );
        }
        self.register(&running);
        let (stop_admin, admin_signal) = shutdown::channel();
        if let Some((socket, allow)) = self.admin.take() {
            let local = socket.local_addr().ok();
            tracing::info!(address = ?local, "admin listening");
            let state = crate::admin::State {
                sources: self.metric_sources(),
                draining: self.draining.clone(),
                started: std::time::Instant::now(),
            };
            tokio::spawn(crate::admin::serve(socket, allow, state, admin_signal));
        }
        let mut file = FileWatch::new(self.source.clone(), &self.config.reload);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(request) = self.reloads.recv() => {
                    let result = self.apply(request.config, &mut running, &connections).await;
                    self.register(&running);
                    match &result {
                        Ok(summary) => {
                            self.reload_stats.succeeded(summary.describe());
                            file = file.renewed(self.source.clone(), &self.config.reload);
                        }
                        Err(err) => self.reload_stats.rejected(telemetry::error_chain(err)),
                    }
                    let _ = request.reply.send(result);
                }
                () = file.changed(), if file.enabled() => {
                    // The loop stays free for shutdown while the file is read and parsed.
                    let reloader = self.reloader.clone();
                    tokio::spawn(async move { reloader.reload_from_source().await });
                }
            }
        }
        // First, so that balancers polling /readyz stop sending while tunnels close politely.
        self.draining.store(true, Ordering::Relaxed);
        let drain = self.config.timeouts.drain;
        tracing::info!(
            connections = connections.live(),
            tunnels = self.tunnels.live(),
            drain_s = drain.as_secs_f64(),
            "shutting down: no new connections, draining"
        );
        // Stops accepting, drains every connection, closes every WebSocket with 1001.
        for listener in running.values() {
            listener.stop.fire();
        }
        stop_watching.fire();
        let drained = async {
            // Tunnels start from connections, so none can appear once connections are done.
            connections.idle().await;
            self.tunnels.idle().await;
        };
        // The admin listener answers (503 on /readyz) until everything has drained.
        let _stop_admin = stop_admin;
        if tokio::time::timeout(drain, drained).await.is_ok() {
            tracing::info!("drained");
            return;
        }
        tracing::warn!(
            connections = connections.live(),
            tunnels = self.tunnels.live(),
            "drain period over: closing what is left"
        );
        self.close_tunnels.fire();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.tunnels.idle()).await;
    }

    /// What `/metrics` and the status page read.
    pub fn metric_sources(&self) -> crate::metrics::Sources {
        crate::metrics::Sources {
            current: self.current.clone(),
            listeners: self.serving.clone(),
            proxy: self.proxy.stats.clone(),
            reloads: self.reload_stats.clone(),
        }
    }

    /// The listeners accepting now, for the admin listener.
    fn register(&self, running: &HashMap<String, Running>) {
        let mut serving: Vec<ServingListener> = running
            .iter()
            .map(|(name, r)| ServingListener {
                name: name.as_str().into(),
                address: r.local,
                tls: r.tls,
                stats: r.stats.clone(),
            })
            .collect();
        serving.sort_by(|a, b| a.name.cmp(&b.name));
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = serving;
    }

    fn spawn_listener(
        &self,
        listener: Listener,
        bind: SocketAddr,
        local: SocketAddr,
        connections: &Tracker,
    ) -> Running {
        let (stop, stop_signal) = shutdown::channel();
        let running = Running {
            bind,
            local,
            tls: listener.ctx.load().tls.is_some(),
            stats: listener.stats.clone(),
            ctx: listener.ctx.clone(),
            stop,
        };
        tokio::spawn(listener.serve(self.proxy.clone(), stop_signal, connections.clone()));
        running
    }

    /// Builds everything the new config needs first (certificates, upstream TLS, new sockets);
    /// any failure refuses the whole config. Then publishes it: new requests see it at once,
    /// requests and tunnels in flight keep what they started with.
    async fn apply(
        &mut self,
        config: Config,
        running: &mut HashMap<String, Running>,
        connections: &Tracker,
    ) -> Result<ReloadSummary, ReloadError> {
        let terminators = terminators(&config)?;
        let previous = self.current.load_full();
        let snapshot = Snapshot::build(&config, Some(&previous)).map_err(Error::from)?;
        // A listener stays when its name and address stay; otherwise it is replaced.
        let stays = |l: &config::Listener| running.get(&l.name).is_some_and(|r| r.bind == l.bind);
        let mut fresh = Vec::new();
        for listener in config.listeners.iter().filter(|l| !stays(l)) {
            // On failure, what was bound so far is dropped: the old config keeps serving.
            let socket = listen(listener, &mut sockets::Inherited::default())?;
            fresh.push((listener, socket));
        }

        let mut summary = diff(&self.config, &config, &previous, &snapshot);
        for listener in config.listeners.iter().filter(|l| stays(l)) {
            if let Some(r) = running.get(&listener.name) {
                let mut ctx = listener_ctx(&config, listener, &terminators);
                // The same limit keeps its semaphore, so open connections still count.
                let before = r.ctx.load();
                if let (Some(old), Some(_)) = (&before.connections, &ctx.connections) {
                    let same = self.config.listeners.iter().any(|l| {
                        l.name == listener.name && l.max_connections == listener.max_connections
                    });
                    if same {
                        ctx.connections = Some(old.clone());
                    }
                }
                r.ctx.store(Arc::new(ctx));
            }
        }
        let removed: Vec<String> = running
            .iter()
            .filter(|(name, r)| {
                !config
                    .listeners
                    .iter()
                    .any(|l| l.name == **name && l.bind == r.bind)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &removed {
            if let Some(r) = running.remove(name) {
                tracing::info!(listener = %name, address = %r.local, "listener removed: draining");
                r.stop.fire();
            }
        }
        self.certificates.replace(&config, &terminators);
        self.current.store(Arc::new(snapshot));
        // Health state lives in the servers, which carry over; only the checking moves.
        previous.stop_health_checks();
        self.current.load().start_health_checks();

        // Servers the new snapshot no longer has get no new requests; their tunnels close.
        let current = self.current.load();
        for endpoint in previous.upstreams.iter().flat_map(|u| u.endpoints()) {
            let kept = current
                .upstreams
                .iter()
                .flat_map(|u| u.endpoints())
                .any(|e| Arc::ptr_eq(e, endpoint));
            if !kept {
                summary.tunnels_closing += endpoint.tunnels();
                endpoint.retire(config.reload.close_spread);
            }
        }
        for (listener, socket) in fresh {
            let local = socket.listener.local_addr().unwrap_or(listener.bind);
            tracing::info!(listener = %listener.name, address = %local, inherited = false, "listening");
            let ctx = listener_ctx(&config, listener, &terminators);
            let serving = Listener {
                name: listener.name.as_str().into(),
                socket: socket.listener,
                inherited: false,
                ctx: Arc::new(ArcSwap::from_pointee(ctx)),
                stats: Arc::default(),
            };
            let started = self.spawn_listener(serving, listener.bind, local, connections);
            running.insert(listener.name.clone(), started);
        }
        summary.listening = config
            .listeners
            .iter()
            .filter_map(|l| Some((l.name.clone(), running.get(&l.name)?.local)))
            .collect();
        log_reload(&summary);
        self.config = config;
        Ok(summary)
    }
}

/// Names added and removed between two configs and their snapshots.
fn diff(before: &Config, after: &Config, old: &Snapshot, new: &Snapshot) -> ReloadSummary {
    fn changes<'a>(
        before: impl Iterator<Item = &'a str> + Clone,
        after: impl Iterator<Item = &'a str> + Clone,
    ) -> (Vec<String>, Vec<String>) {
        let added = after
            .clone()
            .filter(|a| !before.clone().any(|b| b == *a))
            .map(str::to_owned)
            .collect();
        let removed = before
            .filter(|b| !after.clone().any(|a| a == *b))
            .map(str::to_owned)
            .collect();
        (added, removed)
    }
    let (listeners_added, listeners_removed) = changes(
        before.listeners.iter().map(|l| l.name.as_str()),
        after.listeners.iter().map(|l| l.name.as_str()),
    );
    let (routes_added, routes_removed) = changes(
        before.routes.iter().map(|r| r.name.as_str()),
        after.routes.iter().map(|r| r.name.as_str()),
    );
    let (upstreams_added, upstreams_removed) = changes(
        before.upstreams.iter().map(|u| u.name.as_str()),
        after.upstreams.iter().map(|u| u.name.as_str()),
    );
    let servers = |snapshot: &Snapshot| -> Vec<(String, Arc<crate::upstream::Endpoint>)> {
        snapshot
            .upstreams
            .iter()
            .flat_map(|u| {
                u.endpoints()
                    .iter()
                    .map(|e| (format!("{}/{}", u.name, e.label), e.clone()))
            })
            .collect()
    };
    let (old_servers, new_servers) = (servers(old), servers(new));
    let carried = |e: &Arc<crate::upstream::Endpoint>,
                   among: &[(String, Arc<crate::upstream::Endpoint>)]| {
        among.iter().any(|(_, other)| Arc::ptr_eq(e, other))
    };
    ReloadSummary {
        listeners_added,
        listeners_removed,
        routes_added,
        routes_removed,
        upstreams_added,
        upstreams_removed,
        servers_added: new_servers
            .iter()
            .filter(|(_, e)| !carried(e, &old_servers))
            .map(|(label, _)| label.clone())
            .collect(),
        servers_removed: old_servers
            .iter()
            .filter(|(_, e)| !carried(e, &new_servers))
            .map(|(label, _)| label.clone())
            .collect(),
        tunnels_closing: 0,
        listening: Vec::new(),
    }
}

impl ReloadSummary {
    /// One line for the status page: what was added and removed.
    pub fn describe(&self) -> String {
        let parts = [
            ("listeners +", &self.listeners_added),
            ("listeners -", &self.listeners_removed),
            ("routes +", &self.routes_added),
            ("routes -", &self.routes_removed),
            ("upstreams +", &self.upstreams_added),
            ("upstreams -", &self.upstreams_removed),
            ("servers +", &self.servers_added),
            ("servers -", &self.servers_removed),
        ];
        let changes: Vec<String> = parts
            .iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(what, names)| format!("{what}{}", names.join(",")))
            .collect();
        if changes.is_empty() {
            "no listener, route, upstream or server changed".to_owned()
        } else {
            changes.join("; ")
        }
    }
}

fn log_reload(summary: &ReloadSummary) {
    let list = |names: &[String]| names.join(",");
    tracing::info!(
        { f::EVENT } = f::event::RELOAD,
        { f::OUTCOME } = "applied",
        { f::LISTENERS_ADDED } = list(&summary.listeners_added),
        { f::LISTENERS_REMOVED } = list(&summary.listeners_removed),
        { f::ROUTES_ADDED } = list(&summary.routes_added),
        { f::ROUTES_REMOVED } = list(&summary.routes_removed),
        { f::UPSTREAMS_ADDED } = list(&summary.upstreams_added),
        { f::UPSTREAMS_REMOVED } = list(&summary.upstreams_removed),
        { f::SERVERS_ADDED } = list(&summary.servers_added),
        { f::SERVERS_REMOVED } = list(&summary.servers_removed),
        { f::TUNNELS_CLOSING } = summary.tunnels_closing,
        "config reloaded"
    );
}

/// `reload.watch`: notices when the config file's modification time or size changes.
struct FileWatch {
    path: Option<PathBuf>,
    interval: Duration,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    fn new(source: Option<PathBuf>, reload: &config::Reload) -> FileWatch {
        let path = source.filter(|_| reload.watch);
        let seen = path.as_deref().and_then(stamp);
        FileWatch {
            path,
            interval: reload.watch_interval,
            seen,
        }
    }

    /// The watch after a reload, with the new config's settings. What it last saw is kept: a
    /// change made while the reload ran (after the file was read) is still a change, which
    /// a fresh look would take as the baseline and miss.
    fn renewed(self, source: Option<PathBuf>, reload: &config::Reload) -> FileWatch {
        let fresh = FileWatch::new(source, reload);
        match (&self.path, &fresh.path) {
            (Some(before), Some(now)) if before == now => FileWatch {
                seen: self.seen,
                ..fresh
            },
            _ => fresh,
        }
    }

    fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Completes once a look finds the file changed since the last one.
    async fn changed(&mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            let now = self.path.as_deref().and_then(stamp);
            if now.is_some() && now != self.seen {
                self.seen = now;
                return;
            }
        }
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}
