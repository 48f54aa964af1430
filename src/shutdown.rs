//! Drain primitives: a `Trigger` that tells everyone to stop, and a `Tracker` whose drop-guards
//! count what is still running so that shutdown waits on events, never on a fixed sleep.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

/// Fires a `Signal` once; every clone of the signal sees it. Dropping it unfired completes
/// the signal too: nobody can fire it any more, and waiting forever would hide a bug as a hang.
#[derive(Debug)]
pub struct Trigger(Arc<Inner>);

/// Waits for a `Trigger`. Polling one costs an atomic load once registered, and a waiting
/// signal holds no future of its own (a waker in the trigger's list), so that the 10,000s of
/// open tunnels that each wait on a few signals stay small.
#[derive(Debug)]
pub struct Signal {
    inner: Arc<Inner>,
    /// This signal's slot in the trigger's waker list, once it has waited.
    slot: Option<u32>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Set once, by `fire` or by the trigger's drop.
    done: AtomicBool,
    /// A value given with the firing (`fire_with`), read by whoever the signal wakes.
    value: AtomicU64,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<u32>,
}

pub fn channel() -> (Trigger, Signal) {
    let trigger = Trigger(Arc::default());
    let signal = trigger.signal();
    (trigger, signal)
}

impl Trigger {
    pub fn fire(&self) {
        self.0.finish();
    }

    /// Fires, handing `value` to every signal (read with `Signal::value`).
    pub fn fire_with(&self, value: u64) {
        self.0.value.store(value, Ordering::Relaxed);
        self.0.finish();
    }

    pub fn signal(&self) -> Signal {
        Signal {
            inner: self.0.clone(),
            slot: None,
        }
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Inner {
    fn finish(&self) {
        // Release pairs with the Acquire in `poll_fired`: `value` is visible once `done` is.
        self.done.store(true, Ordering::Release);
        let wakers: Vec<Waker> = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters.slots.iter_mut().filter_map(Option::take).collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl Signal {
    /// Completes once the trigger fired (or was dropped without firing).
    pub async fn fired(&mut self) {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await;
    }

    /// Ready once fired. The first pending poll registers the task's waker; later polls only
    /// look at the flag, so a signal must be polled from one task (as each owner does).
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if self.slot.is_some() {
            return Poll::Pending;
        }
        let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Checked again under the lock: `finish` takes the wakers under it.
        if self.inner.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let waker = Some(cx.waker().clone());
        let slot = match waiters.free.pop() {
            Some(slot) => {
                waiters.slots[slot as usize] = waker;
                slot
            }
            None => {
                waiters.slots.push(waker);
                (waiters.slots.len() - 1) as u32
            }
        };
        self.slot = Some(slot);
        Poll::Pending
    }

    /// The value the trigger was fired with (0 for a plain `fire`).
    pub fn value(&self) -> u64 {
        self.inner.value.load(Ordering::Relaxed)
    }
}

impl Clone for Signal {
    fn clone(&self) -> Signal {
        Signal {
            inner: self.inner.clone(),
            slot: None,
        }
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters.slots[slot as usize] = None;
            waiters.free.push(slot);
        }
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

    #[tokio::test]
    async fn a_waiting_signal_dropped_frees_its_slot_and_values_reach_the_woken() {
        let (trigger, signal) = channel();
        for _ in 0..3 {
            let mut waiting = signal.clone();
            let polled = std::future::poll_fn(|cx| Poll::Ready(waiting.poll_fired(cx))).await;
            assert!(polled.is_pending());
            drop(waiting);
        }
        assert_eq!(
            trigger.0.waiters.lock().unwrap().slots.len(),
            1,
            "slots are reused"
        );
        let mut waiting = signal.clone();
        let woken = tokio::spawn(async move {
            waiting.fired().await;
            waiting.value()
        });
        tokio::task::yield_now().await;
        trigger.fire_with(30_000);
        let value = tokio::time::timeout(Duration::from_secs(10), woken).await;
        assert_eq!(value.expect("woken").unwrap(), 30_000);
    }
}
