//! wsgate: a reverse proxy whose core is WebSocket passthrough.
//!
//! # Layout
//!
//! - `config`: the TOML file, validated once into the typed values every other module shares.
//! - `quick`: the config a `wsgate proxy --from .. --to ..` command line stands for, as TOML
//!   text that `config` validates like a file.
//! - `server`: binds the listeners, serves, reloads the whole config, turns a shutdown into a
//!   drain.
//! - `sockets`: where a listener's socket comes from: systemd (socket activation), or bound
//!   here, with SO_REUSEPORT on request.
//! - `listener`: the accept loop, the TLS step, and the hyper connection for each client.
//! - `tls`: certificates by SNI, rustls server configs, the bounded handshake.
//! - `proxy`: one request's life: route, classify, forward, relay or tunnel.
//! - `snapshot`: one configuration as requests read it, swapped whole by a reload.
//! - `router`: host and path to a route.
//! - `upstream`: server choice, connections (HTTP/1.1 of its own, driven by the request) and
//!   pooling, the lease that counts load.
//! - `websocket`: handshake validation, RFC 6455 frames, and the frame-aware tunnel that
//!   splices upgraded connections.
//! - `shutdown`: the drain signal and the trackers that count what is still running.
//! - `telemetry`: logging setup.
//!
//! `ARCHITECTURE.md` at the repository root has who uses whom, the life of a request and of a
//! tunnel, and the rules that hold everywhere (config is parsed in one place, once).

pub mod admin;
mod client_io;
pub mod config;
mod listener;
pub mod metrics;
pub mod proxy;
pub mod quick;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod snapshot;
mod sockets;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod websocket;

/// Public for the fuzz target; the listener reads it before TLS.
pub use listener::proxy_protocol;

pub use config::Config;
pub use server::Server;
