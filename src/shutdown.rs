//! Drain primitives: a `Trigger` that tells everyone to stop, and a `Tracker` whose drop-guards
//! count what is still running so that shutdown waits on events, never on a fixed sleep.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// Fires a `Signal` once; every clone of the signal sees it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Signal {
    /// Completes once the trigger fired, or once it was dropped without firing (nobody can
    /// fire it any more, and waiting forever would hide a bug as a hang).
    pub async fn fired(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

/// Counts live guards; `idle()` completes when there are none.
#[derive(Debug, Clone, Default)]
pub struct Tracker(Arc<TrackerInner>);

#[derive(Debug, Default)]
struct TrackerInner {
    live: AtomicUsize,
    became_idle: Notify,
}

#[derive(Debug)]
pub struct Guard(Arc<TrackerInner>);

impl Tracker {
    pub fn guard(&self) -> Guard {
        self.0.live.fetch_add(1, Ordering::Relaxed);
        Guard(self.0.clone())
    }

    pub fn live(&self) -> usize {
        self.0.live.load(Ordering::Acquire)
    }

    pub async fn idle(&self) {
        loop {
            let notified = self.0.became_idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a guard dropped in between still wakes us.
            notified.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.became_idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let tracker = Tracker::default();
        let a = tracker.guard();
        let b = tracker.guard();
        assert_eq!(tracker.live(), 2);
        let waiter = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("idle() did not complete")
            .unwrap();
    }

    #[tokio::test]
    async fn signal_fires_for_every_clone_and_on_drop() {
        let within = |signal: &Signal| {
            let mut signal = signal.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), signal.fired())
                    .await
                    .expect("the signal completes")
            }
        };
        let (trigger, a) = channel();
        let waiting = tokio::spawn(within(&a));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing fired yet");
        trigger.fire();
        waiting.await.unwrap();
        within(&a).await;

        // A dropped trigger can never fire; waiting on it must not hang.
        let (trigger, signal) = channel();
        drop(trigger);
        within(&signal).await;
    }
}
