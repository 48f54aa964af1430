//! Where a listener's socket comes from: bound here, optionally with SO_REUSEPORT.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

use crate::config;

/// The accept queue length asked of the kernel; what tokio's `TcpListener::bind` uses too
/// (Linux caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

/// A listener's socket, and whether it was inherited rather than bound.
pub struct Socket {
    pub listener: TcpListener,
    pub inherited: bool,
}

/// The socket `listener` serves on.
pub fn listen(listener: &config::Listener) -> io::Result<Socket> {
    Ok(Socket {
        listener: bind(listener.bind, listener.reuse_port)?,
        inherited: false,
    })
}

fn bind(address: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As tokio's `TcpListener::bind` does: a restart can bind while the previous process's
    // connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if reuse_port {
        // Every socket in the group needs it, the running one too: that is why it is opt-in
        // per listener, set before the first process starts.
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    socket.listen(BACKLOG)
}
