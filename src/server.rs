//! A running gateway: binds every listener up front, then serves until told to stop, and
//! drains: stop accepting, let requests finish and tunnels close, then force what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::listener::{self, Listener};
use crate::proxy::{Proxy, Snapshot};
use crate::shutdown::{self, Tracker, Trigger};

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
}

pub struct Server {
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    tunnels: Tracker,
    close_tunnels: Trigger,
    drain: Duration,
}

impl Server {
    /// Binds every listener, so that a port already in use fails before anything serves.
    pub async fn bind(config: &Config) -> Result<Server, Error> {
        let http = Arc::new(listener::http1_builder(&config.timeouts, &config.limits));
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let socket = TcpListener::bind(listener.bind)
                .await
                .map_err(|source| Error::Bind {
                    listener: listener.name.clone(),
                    address: listener.bind,
                    source,
                })?;
            listeners.push(Listener {
                name: listener.name.as_str().into(),
                socket,
                http: http.clone(),
            });
        }
        let tunnels = Tracker::default();
        let (close_tunnels, close_signal) = shutdown::channel();
        let snapshot = Arc::new(Snapshot::new(config));
        Ok(Server {
            listeners,
            proxy: Arc::new(Proxy::new(snapshot, tunnels.clone(), close_signal)),
            tunnels,
            close_tunnels,
            drain: config.timeouts.drain,
        })
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
        for (name, address) in self.local_addrs() {
            tracing::info!(listener = %name, %address, "listening");
        }
        let (stop_accepting, drain_signal) = shutdown::channel();
        let connections = Tracker::default();
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
        stop_accepting.fire();
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
