//! Wake-ups an upstream connection causes to its own task, served by polling again.
//!
//! An upstream connection is driven in the client's task, so most of its wake-ups come from
//! that very task: sending the request wakes hyper's connection, its answer wakes the response,
//! a body chunk wakes the body. A plain wake reschedules the task, which then polls the client
//! connection's whole state machine again for nothing: two of four task polls per request,
//! measured. `Inline` polls with a waker of its own: a wake that comes while it is polling makes
//! it poll again before returning, and only a wake from outside (the socket, another thread)
//! reaches the task.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Rounds of polling before yielding to the runtime, so that a connection that keeps waking
/// itself cannot starve the other tasks of its thread.
const MAX_ROUNDS: usize = 8;

pub struct Inline {
    state: Arc<State>,
    /// `state` as a waker, made once: hyper's channels and the socket keep clones of it.
    waker: Waker,
}

#[derive(Default)]
struct State {
    polling: AtomicBool,
    woken: AtomicBool,
    /// The task to wake for what comes from outside; `None` while the connection is pooled.
    task: Mutex<Option<Waker>>,
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Stored before `polling` is read, and read by `poll` after it clears `polling`
        // (both SeqCst): at least one side sees the other, so no wake is lost.
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(task) = task.as_ref() {
                task.wake_by_ref();
            }
        }
    }
}

impl Default for Inline {
    fn default() -> Self {
        let state = Arc::new(State::default());
        Inline {
            waker: Waker::from(state.clone()),
            state,
        }
    }
}

impl Inline {
    /// Polls `f` until it is ready or nothing it did woke it.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        {
            let mut task = self.state.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut inner = Context::from_waker(&self.waker);
        for _ in 0..MAX_ROUNDS {
            self.state.woken.store(false, SeqCst);
            self.state.polling.store(true, SeqCst);
            let poll = f(&mut inner);
            self.state.polling.store(false, SeqCst);
            if poll.is_ready() || !self.state.woken.load(SeqCst) {
                return poll;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The connection goes idle in the pool: whatever happens to it wakes no task.
    pub fn forget_task(&self) {
        *self.state.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn task() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn a_wake_while_polling_polls_again_instead_of_waking_the_task() {
        let inline = Inline::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut rounds = 0;
        let poll = inline.poll(&mut cx, |cx| {
            rounds += 1;
            if rounds < 3 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(rounds)
            }
        });
        assert_eq!(poll, Poll::Ready(3));
        assert_eq!(count.0.load(SeqCst), 0, "the task was not woken");
    }

    #[test]
    fn a_wake_after_polling_reaches_the_task_unless_forgotten() {
        let inline = Inline::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut kept = None;
        let poll: Poll<()> = inline.poll(&mut cx, |cx| {
            kept = Some(cx.waker().clone());
            Poll::Pending
        });
        assert!(poll.is_pending());
        let kept = kept.expect("polled");
        kept.wake_by_ref();
        assert_eq!(count.0.load(SeqCst), 1);
        inline.forget_task();
        kept.wake_by_ref();
        assert_eq!(count.0.load(SeqCst), 1, "a pooled connection wakes nobody");
    }

    #[test]
    fn a_connection_that_keeps_waking_itself_yields_after_max_rounds() {
        let inline = Inline::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut rounds = 0;
        let poll: Poll<()> = inline.poll(&mut cx, |cx| {
            rounds += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(poll.is_pending());
        assert_eq!(rounds, MAX_ROUNDS);
        assert_eq!(count.0.load(SeqCst), 1, "yielded once, to be polled again");
    }
}
