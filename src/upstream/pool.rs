//! Idle keep-alive HTTP/1 connections to one server, most recently used first.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Beyond this many idle connections per server, the oldest is closed: enough to absorb a
/// burst, few enough that a quiet proxy does not hold thousands of backend sockets.
const MAX_IDLE_PER_SERVER: usize = 128;

/// What the pool can tell about a connection without driving it.
pub trait Pooled {
    fn is_closed(&self) -> bool;
}

#[derive(Debug)]
pub struct Pool<C> {
    idle: Mutex<Vec<Idle<C>>>,
}

#[derive(Debug)]
struct Idle<C> {
    connection: C,
    since: Instant,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
        }
    }
}

impl<C: Pooled> Pool<C> {
    /// The freshest idle connection younger than `keepalive` not known to be closed.
    pub fn take(&self, keepalive: Duration) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Older entries sit at the front; once one is stale, all before it are too.
        if let Some(fresh_from) = idle.iter().position(|i| now - i.since < keepalive) {
            idle.drain(..fresh_from);
        } else {
            idle.clear();
        }
        while let Some(entry) = idle.pop() {
            if !entry.connection.is_closed() {
                return Some(entry.connection);
            }
        }
        None
    }

    pub fn put(&self, connection: C) {
        if connection.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE_PER_SERVER {
            idle.remove(0);
        }
        idle.push(Idle {
            connection,
            since: Instant::now(),
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
