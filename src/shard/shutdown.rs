//! The shard's shutdown signal: a one-shot, shard-local broadcast.
//!
//! Idle connections (waiting for their next keep-alive request) and the accept loop wait on it
//! so shutdown reaches them at once instead of after their timeouts. It is `!Send` and
//! lock-free: wakers live in a slab owned by the shard, each waiter removes its entry when
//! dropped, so a connection that waits on it for every request leaves nothing behind.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use slab::Slab;

#[derive(Default)]
pub struct ShutdownSignal {
    triggered: Cell<bool>,
    waiters: RefCell<Slab<Waker>>,
}

impl ShutdownSignal {
    pub fn new() -> ShutdownSignal {
        ShutdownSignal::default()
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.get()
    }

    /// Wakes every waiter; later waits resolve at once.
    pub fn trigger(&self) {
        self.triggered.set(true);
        for waker in self.waiters.borrow_mut().drain() {
            waker.wake();
        }
    }

    /// A future that resolves once [`ShutdownSignal::trigger`] has been called.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            signal: self,
            key: None,
        }
    }
}

pub struct Wait<'a> {
    signal: &'a ShutdownSignal,
    key: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.triggered.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        match self.key {
            Some(key) if waiters.contains(key) => {
                if let Some(w) = waiters.get_mut(key) {
                    w.clone_from(cx.waker());
                }
            }
            _ => {
                let key = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.key = Some(key);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut waiters = self.signal.waiters.borrow_mut();
            if waiters.contains(key) {
                waiters.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn trigger_resolves_pending_and_later_waits() {
        let signal = ShutdownSignal::new();
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut w = Box::pin(signal.wait());
        assert!(w.as_mut().poll(&mut cx).is_pending());
        assert_eq!(signal.waiters.borrow().len(), 1);
        signal.trigger();
        assert!(w.as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(signal.wait()).as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn dropped_waiters_leave_nothing_behind() {
        let signal = ShutdownSignal::new();
        let mut cx = Context::from_waker(noop_waker_ref());
        for _ in 0..100 {
            let mut w = Box::pin(signal.wait());
            assert!(w.as_mut().poll(&mut cx).is_pending());
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(signal.waiters.borrow().len(), 0);
    }
}
