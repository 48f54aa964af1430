//! Idle keep-alive HTTP/1 connections to one server, most recently used first.

use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

/// Beyond this many idle connections per server, the oldest is closed: enough to absorb a
/// burst, few enough that a quiet proxy does not hold thousands of backend sockets.
const MAX_IDLE_PER_SERVER: usize = 128;

#[derive(Debug)]
pub struct Pool<B> {
    idle: Mutex<Vec<Idle<B>>>,
}

#[derive(Debug)]
struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
        }
    }
}

impl<B> Pool<B> {
    /// The freshest idle connection younger than `keepalive` whose peer has not closed it.
    pub fn take(&self, keepalive: Duration) -> Option<SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Older entries sit at the front; once one is stale, all before it are too.
        if let Some(fresh_from) = idle.iter().position(|i| now - i.since < keepalive) {
            idle.drain(..fresh_from);
        } else {
            idle.clear();
        }
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    pub fn put(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE_PER_SERVER {
            idle.remove(0);
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
