//! A running gateway: binds every listener up front, then serves until told to stop, and
//! drains: stop accepting, let requests finish and tunnels close, then force what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{self, Config};
use crate::listener::{Listener, Protocols};
use crate::proxy::{HttpsRedirect, ListenerPolicy, Proxy, Snapshot};
use crate::shutdown::{self, Signal, Tracker, Trigger};
use crate::sockets;
use crate::telemetry;
use crate::tls::{self, Terminator};

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

pub struct Server {
    listeners: Vec<Listener>,
    reloader: Reloader,
    proxy: Arc<Proxy>,
    tunnels: Tracker,
    /// Shutdown has begun: listeners stop accepting, WebSocket tunnels send Close 1001.
    drain_start: Trigger,
    drain_signal: Signal,
    close_tunnels: Trigger,
    drain: Duration,
}

/// Loads what each TLS listener serves (certificates, keys), so that `check` and `bind` fail
/// on the same problems.
fn terminators(config: &Config) -> Result<Vec<Option<Arc<Terminator>>>, Error> {
    config
        .listeners
        .iter()
        .map(|listener| {
            let Some(tls) = &listener.tls else {
                return Ok(None);
            };
            let terminator = Terminator::new(tls, listener.http2).map_err(|source| Error::Tls {
                listener: listener.name.clone(),
                source,
            })?;
            Ok(Some(Arc::new(terminator)))
        })
        .collect()
}

fn policy(listener: &config::Listener) -> ListenerPolicy {
    ListenerPolicy {
        redirect: listener.redirect_https.as_ref().map(|r| HttpsRedirect {
            port: r.port,
            except: r.except.clone(),
        }),
        hsts: listener.tls.as_ref().and_then(|tls| tls.hsts.clone()),
        client_identity_header: listener
            .tls
            .as_ref()
            .and_then(|tls| tls.client_auth.as_ref()?.identity_header.clone()),
    }
}

/// Reloads the certificates of every TLS listener: on SIGHUP, and when their files change.
#[derive(Clone)]
pub struct Reloader {
    terminators: Arc<[(String, Arc<Terminator>)]>,
    failures: Arc<AtomicU64>,
}

impl Reloader {
    /// Reloads every TLS listener; one that fails keeps its previous certificates.
    pub fn reload(&self) {
        for (listener, terminator) in self.terminators.iter() {
            self.reload_one(listener, terminator);
        }
    }

    /// Reloads that failed since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
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
        let Some(interval) = self
            .terminators
            .iter()
            .map(|(_, t)| t.watch_interval())
            .min()
        else {
            return;
        };
        loop {
            tokio::select! {
                () = stop.fired() => return,
                () = tokio::time::sleep(interval) => {}
            }
            for (listener, terminator) in self.terminators.iter() {
                if terminator.files_changed() {
                    self.reload_one(listener, terminator);
                }
            }
        }
    }
}

impl Server {
    /// Checks what a config needs beyond its own text (certificate and key files), without
    /// binding anything.
    pub fn check(config: &Config) -> Result<(), Error> {
        terminators(config)?;
        Snapshot::new(config)?;
        Ok(())
    }

    /// Binds every listener, so that a port already in use fails before anything serves.
    pub async fn bind(config: &Config) -> Result<Server, Error> {
        let terminators = terminators(config)?;
        let mut inherited = sockets::Inherited::from_env()?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut reloadable = Vec::new();
        for (listener, terminator) in config.listeners.iter().zip(terminators) {
            if let Some(terminator) = &terminator {
                reloadable.push((listener.name.clone(), terminator.clone()));
            }
            let socket =
                sockets::listen(listener, &mut inherited).map_err(|source| Error::Bind {
                    listener: listener.name.clone(),
                    address: listener.bind,
                    source,
                })?;
            listeners.push(Listener {
                name: listener.name.as_str().into(),
                socket: socket.listener,
                inherited: socket.inherited,
                protocols: Arc::new(Protocols::new(
                    &config.timeouts,
                    &config.limits,
                    listener.http2,
                )),
                tls: terminator.map(|t| t.acceptor.clone()),
                policy: Arc::new(policy(listener)),
                tls_failures: Arc::default(),
            });
        }
        inherited.warn_unclaimed();
        let tunnels = Tracker::default();
        let (close_tunnels, close_signal) = shutdown::channel();
        let (drain_start, drain_signal) = shutdown::channel();
        let snapshot = Arc::new(Snapshot::new(config)?);
        let signals = crate::websocket::tunnel::Signals {
            drain: drain_signal.clone(),
            close: close_signal,
        };
        Ok(Server {
            listeners,
            reloader: Reloader {
                terminators: reloadable.into(),
                failures: Arc::default(),
            },
            proxy: Arc::new(Proxy::new(snapshot, tunnels.clone(), signals)),
            tunnels,
            drain_start,
            drain_signal,
            close_tunnels,
            drain: config.timeouts.drain,
        })
    }

    /// What reloads the TLS listeners' certificates (for SIGHUP).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Failed TLS handshakes (and plain HTTP sent) on the listener named `name`.
    pub fn tls_failures(&self, name: &str) -> Option<Arc<AtomicU64>> {
        self.listeners
            .iter()
            .find(|l| &*l.name == name)
            .map(|l| l.tls_failures.clone())
    }

    /// The bound address of each listener, by name (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name.to_string(), l.socket.local_addr().ok()?)))
            .collect()
    }

    /// The live configuration with its counters.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.proxy.snapshot().clone()
    }

    /// Serves until `shutdown` completes, then drains for at most the configured period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        for listener in &self.listeners {
            if let Ok(address) = listener.socket.local_addr() {
                let inherited = listener.inherited;
                tracing::info!(listener = %listener.name, %address, inherited, "listening");
            }
        }
        let drain_signal = self.drain_signal;
        let connections = Tracker::default();
        tokio::spawn(self.reloader.clone().watch(drain_signal.clone()));
        for listener in self.listeners {
            tokio::spawn(listener.serve(
                self.proxy.clone(),
                drain_signal.clone(),
                connections.clone(),
            ));
        }
        shutdown.await;
        tracing::info!(
            connections = connections.live(),
            tunnels = self.tunnels.live(),
            drain_s = self.drain.as_secs_f64(),
            "shutting down: no new connections, draining"
        );
        self.drain_start.fire();
        let drained = async {
            // Tunnels start from connections, so none can appear once connections are done.
            connections.idle().await;
            self.tunnels.idle().await;
        };
        if tokio::time::timeout(self.drain, drained).await.is_ok() {
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
}
