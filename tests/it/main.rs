//! wsgate's integration tests: one test binary (linking is the slow part on 2 cores), one
//! module per area. Every socket is real and on 127.0.0.1:0, every await is bounded.

mod support;

mod admin;
mod browser;
mod config;
mod deploy;
mod edge;
mod errors;
mod frames;
mod haproxy;
mod health;
mod http;
mod keepalive;
mod logs;
mod oneliner;
mod reload;
mod shutdown;
mod socketio;
mod sockets;
mod status_page;
mod sticky;
mod tls;
mod upstream_http1;
mod upstream_tls;
mod websocket;
