//! Whether a server gets new requests. Two judges write one `Health`: active checks (a task
//! per server, sending a GET or a WebSocket handshake every interval) and passive ejection
//! (consecutive connect failures or 5xx answers of real requests). Open tunnels are left alone
//! unless the upstream asks for them to close. The state lives in the `Endpoint`, so it
//! survives a reload that keeps the server; a reload only restarts the check tasks.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::header::{
    CONNECTION, HOST, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE, USER_AGENT,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::Endpoint;
use crate::config::{HealthCheck, Passive};
use crate::telemetry::{error_chain, fields as f};
use crate::websocket::{self, frame};

#[derive(Debug)]
pub struct Health {
    /// The active checks' verdict.
    pub(super) down: AtomicBool,
    /// Whether an active check has reported yet: the first result is taken at once, so that a
    /// server that is dead at start is not tried for `fall` intervals.
    checked: AtomicBool,
    /// Passive: failures in a row, and until when the server is ejected (milliseconds after
    /// `since`; 0 when it never was).
    failures: AtomicU32,
    ejected_until: AtomicU64,
    since: Instant,
}

/// What a passive judgement changed, for the one log line a change gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    Ejected,
    Recovered,
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            down: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1: 0 means "never ejected".
        self.since.elapsed().as_millis() as u64 + 1
    }

    /// Whether new requests and handshakes may go to the server.
    pub fn is_usable(&self) -> bool {
        if self.down.load(Ordering::Relaxed) {
            return false;
        }
        // The clock is read only for a server that was ejected at some point.
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// A connect failure, a timeout or a 5xx answer.
    pub fn failed(&self, passive: &Passive) -> Change {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < passive.fail {
            return Change::None;
        }
        let now = self.now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 && now < until {
            return Change::None;
        }
        let eject = now + passive.eject.as_millis() as u64;
        // Of concurrent failures, one ejects and logs.
        match self.ejected_until.compare_exchange(
            until,
            eject,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => Change::Ejected,
            Err(_) => Change::None,
        }
    }

    /// An answer below 500. An ejection is over only once its time has passed: an answer to a
    /// request sent before it does not cut it short.
    pub fn answered(&self) -> Change {
        self.failures.store(0, Ordering::Relaxed);
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || self.now_ms() < until {
            return Change::None;
        }
        match self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Change::Recovered,
            Err(_) => Change::None,
        }
    }
}

/// Aborts the check tasks of a snapshot's upstream when it is replaced or dropped.
#[derive(Debug, Default)]
pub struct Checks(std::sync::Mutex<Vec<tokio::task::AbortHandle>>);

impl Checks {
    pub fn replace(&self, tasks: Vec<tokio::task::AbortHandle>) {
        let old = std::mem::replace(
            &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()),
            tasks,
        );
        old.iter().for_each(tokio::task::AbortHandle::abort);
    }

    pub fn stop(&self) {
        self.replace(Vec::new());
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a check task needs besides its server.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    pub upstream: Arc<str>,
    pub check: Arc<HealthCheck>,
    /// Close the server's tunnels, over this window, when it goes down.
    pub close_tunnels: Option<Duration>,
}

/// Checks `endpoint` every interval until it is dropped (or the task aborted).
pub async fn run(endpoint: Weak<Endpoint>, plan: CheckPlan) {
    let mut ticks = tokio::time::interval(plan.check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Results in a row that disagree with the current verdict.
    let mut streak = 0;
    loop {
        ticks.tick().await;
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        let result = probe(&endpoint, &plan.check).await;
        let health = &endpoint.health;
        let passed = result.is_ok();
        if !health.checked.swap(true, Ordering::Relaxed) {
            health.down.store(!passed, Ordering::Relaxed);
            if let Err(reason) = &result {
                went_down(&endpoint, &plan, reason, "its first check");
            }
            continue;
        }
        let down = health.down.load(Ordering::Relaxed);
        if passed != down {
            streak = 0;
            continue;
        }
        streak += 1;
        let needed = if down {
            plan.check.rise
        } else {
            plan.check.fall
        };
        if streak < needed {
            continue;
        }
        streak = 0;
        health.down.store(!down, Ordering::Relaxed);
        match result {
            Ok(()) => tracing::info!(
                { f::EVENT } = f::event::HEALTH_CHANGE,
                { f::UPSTREAM } = %plan.upstream,
                { f::SERVER } = %endpoint.label,
                { f::STATE } = "up",
                { f::CHECK } = "active",
                { f::CHECKS } = needed,
                "upstream server is up: it passed its health checks"
            ),
            Err(reason) => went_down(&endpoint, &plan, &reason, "its health checks"),
        }
    }
}

fn went_down(endpoint: &Endpoint, plan: &CheckPlan, reason: &str, what: &str) {
    let closing = plan.close_tunnels.map_or(0, |_| endpoint.tunnels());
    tracing::warn!(
        { f::EVENT } = f::event::HEALTH_CHANGE,
        { f::UPSTREAM } = %plan.upstream,
        { f::SERVER } = %endpoint.label,
        { f::STATE } = "down",
        { f::CHECK } = "active",
        { f::REASON } = reason,
        { f::TUNNELS_CLOSING } = closing,
        "upstream server is down: it failed {what}"
    );
    if let Some(spread) = plan.close_tunnels {
        endpoint.close_tunnels(spread);
    }
}

/// One check; the error is the reason it failed, for the log.
async fn probe(endpoint: &Endpoint, check: &HealthCheck) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, exchange(endpoint, check)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn exchange(endpoint: &Endpoint, check: &HealthCheck) -> Result<(), String> {
    let mut conn = endpoint
        .connect(check.timeout)
        .await
        .map_err(|err| error_chain(&err))?;
    let host = match &check.host {
        Some(host) => host.clone(),
        None => HeaderValue::from_str(&endpoint.address.to_string())
            .map_err(|_| "the server address is not a valid Host".to_owned())?,
    };
    let mut headers = HeaderMap::with_capacity(6);
    headers.insert(HOST, host);
    headers.insert(USER_AGENT, HeaderValue::from_static("wsgate-health-check"));
    if check.websocket {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(SEC_WEBSOCKET_KEY, websocket::new_key());
    } else {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let response = conn
        .request(&Method::GET, check.path.as_str(), &headers)
        .await
        .map_err(|err| error_chain(&err))?;
    let status = response.status();
    if !check.websocket {
        return if check.status.contains(&status.as_u16()) {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        };
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!(
            "status {} to a WebSocket handshake",
            status.as_u16()
        ));
    }
    // A polite end, so the backend logs a normal close rather than a dropped connection.
    let (mut io, _) = conn.into_upgraded();
    let mut close = Vec::with_capacity(8);
    frame::encode_close(&mut close, 1001, "", Some(rand_mask()));
    let _ = io.write_all(&close).await;
    let _ = io.shutdown().await;
    Ok(())
}

fn rand_mask() -> [u8; 4] {
    use ring::rand::SecureRandom;
    let mut mask = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut mask);
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive(fail: u32, eject_ms: u64) -> Passive {
        Passive {
            fail,
            eject: Duration::from_millis(eject_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn passive_ejection_after_fail_in_a_row_and_back_when_its_time_is_up() {
        let health = Health::new();
        let rule = passive(3, 10_000);
        assert_eq!(health.failed(&rule), Change::None);
        assert_eq!(health.failed(&rule), Change::None);
        // An answer between failures starts the count again.
        assert_eq!(health.answered(), Change::None);
        assert_eq!(health.failed(&rule), Change::None);
        assert_eq!(health.failed(&rule), Change::None);
        assert!(health.is_usable());
        assert_eq!(health.failed(&rule), Change::Ejected);
        assert!(!health.is_usable() && health.is_ejected());
        // Further failures during the ejection change nothing, nor does a late answer.
        assert_eq!(health.failed(&rule), Change::None);
        assert_eq!(health.answered(), Change::None);
        assert!(!health.is_usable());
        tokio::time::advance(Duration::from_millis(10_001)).await;
        assert!(health.is_usable());
        assert_eq!(health.answered(), Change::Recovered);
        assert_eq!(health.answered(), Change::None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_fails_again_after_its_ejection_is_ejected_again_at_once() {
        let health = Health::new();
        let rule = passive(2, 1_000);
        health.failed(&rule);
        assert_eq!(health.failed(&rule), Change::Ejected);
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(health.is_usable());
        // Still failing: no need to wait for `fail` more failures.
        assert_eq!(health.failed(&rule), Change::Ejected);
        assert!(!health.is_usable());
    }
}
