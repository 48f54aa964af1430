//! Idle keep-alive HTTP/1 connections to one server, most recently used first.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A connection that can tell, without waiting, whether its peer has closed it.
pub trait Reusable {
    fn is_closed(&mut self) -> bool;
}

/// Beyond this many idle connections per server, the oldest is closed: enough to absorb a
/// burst, few enough that a quiet proxy does not hold thousands of backend sockets.
const MAX_IDLE_PER_SERVER: usize = 128;

#[derive(Debug)]
pub struct Pool<C> {
    idle: Mutex<Vec<Idle<C>>>,
}

#[derive(Debug)]
struct Idle<C> {
    conn: C,
    since: Instant,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
        }
    }
}

impl<C: Reusable> Pool<C> {
    /// The freshest idle connection younger than `keepalive` whose peer has not closed it.
    pub fn take(&self, keepalive: Duration) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Older entries sit at the front; once one is stale, all before it are too.
        if let Some(fresh_from) = idle.iter().position(|i| now - i.since < keepalive) {
            idle.drain(..fresh_from);
        } else {
            idle.clear();
        }
        while let Some(mut entry) = idle.pop() {
            if !entry.conn.is_closed() {
                return Some(entry.conn);
            }
        }
        None
    }

    pub fn put(&self, conn: C) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE_PER_SERVER {
            idle.remove(0);
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
