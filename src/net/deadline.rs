//! Connection timeouts for one shard: one sweeper task per shard instead of a glommio timer
//! per read.
//!
//! Owns: the deadline of every connection of the shard that is waiting (for its next request,
//! the rest of one, or a slow reader to take a response), and waking the connections whose
//! deadline has passed. Does not own: what a timeout means (the connection answers 408 or
//! closes; see `super::connection`).
//!
//! Why not `glommio::timer::sleep` per read: a glommio timer is an `Rc` allocation, an insert
//! into the reactor's `BTreeMap` of timers and a removal from it. Armed for every read of
//! every keep-alive connection that was ~1,300 of the ~18,000 instructions of a publish
//! (callgrind). Here a connection owns a slot for its whole life; arming it is one clock read
//! and a store, done only when the operation it bounds did not complete at once. The sweeper
//! sleeps on a single glommio timer until the earliest armed deadline, wakes the connections
//! whose deadline passed, and sleeps again; arming a deadline earlier than the sweeper's plan
//! nudges it. Between two sweeps lie at least [`SWEEP_GAP`], so a connection may time out up
//! to that much late, never early: the deadlines here are keep-alive, header and write-stall
//! timeouts of a second or more, and a sweep scans every slot of the shard.

use std::cell::RefCell;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// Least time between two sweeps, and so the most a timeout fires late.
pub const SWEEP_GAP: Duration = Duration::from_millis(50);

/// The shard's connection deadlines (cheap to clone: one shared table).
#[derive(Clone, Default)]
pub struct Deadlines {
    inner: Rc<RefCell<Table>>,
}

#[derive(Default)]
struct Table {
    slots: Slab<Slot>,
    /// When the sweeper looks next; `None`: nothing is armed that it knows of.
    planned: Option<Instant>,
    /// When it last looked (the next look is at least [`SWEEP_GAP`] later).
    last_sweep: Option<Instant>,
    /// The sweeper task, to nudge when a deadline earlier than `planned` is armed.
    sweeper: Option<Waker>,
    sweeper_started: bool,
}

#[derive(Default)]
struct Slot {
    /// Armed: the operation now waiting must make progress by then.
    when: Option<Instant>,
    /// The sweeper saw `when` pass.
    fired: bool,
    /// The connection's task, kept between operations (a task's waker is the same every time).
    waker: Option<Waker>,
}

impl Table {
    /// Arms `key`; returns the sweeper to nudge if it planned its next look for later (the
    /// caller wakes it once the table is no longer borrowed).
    fn arm(&mut self, key: usize, when: Instant) -> Option<Waker> {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.when = Some(when);
            slot.fired = false;
        }
        if self.planned.is_some_and(|planned| planned <= when) {
            return None;
        }
        let earliest = self
            .last_sweep
            .map_or(when, |last| when.max(last + SWEEP_GAP));
        self.planned = Some(earliest);
        self.sweeper.clone()
    }

    fn disarm(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.when = None;
            slot.fired = false;
        }
    }

    /// Marks every slot whose deadline passed and collects its waker; plans the next sweep.
    fn sweep(&mut self, now: Instant, wake: &mut Vec<Waker>) {
        let mut next: Option<Instant> = None;
        for (_, slot) in self.slots.iter_mut() {
            let Some(when) = slot.when.filter(|_| !slot.fired) else {
                continue;
            };
            if when <= now {
                slot.fired = true;
                wake.extend(slot.waker.clone());
            } else {
                next = Some(next.map_or(when, |n| n.min(when)));
            }
        }
        self.last_sweep = Some(now);
        self.planned = next.map(|n| n.max(now + SWEEP_GAP));
    }
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines::default()
    }

    /// A slot for one connection, released when the returned [`Deadline`] is dropped. Starts
    /// the shard's sweeper on first use (so must be called on the shard's executor).
    pub fn slot(&self) -> Deadline {
        let (key, start) = {
            let mut table = self.inner.borrow_mut();
            let start = !std::mem::replace(&mut table.sweeper_started, true);
            (table.slots.insert(Slot::default()), start)
        };
        if start {
            // Outside the borrow: glommio may run a new task before `spawn_local` returns.
            glommio::spawn_local(sweeper(Rc::downgrade(&self.inner))).detach();
        }
        Deadline {
            table: self.inner.clone(),
            key,
        }
    }

    /// Connections holding a slot (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.borrow().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's deadline. Bounds one operation at a time ([`Deadline::within`]).
pub struct Deadline {
    table: Rc<RefCell<Table>>,
    key: usize,
}

impl Deadline {
    /// Runs `work`; `None` if it was still waiting `limit` after it first had to wait (the
    /// sweeper noticed: up to [`SWEEP_GAP`] later). `work` completing at once arms nothing.
    /// Dropping the returned future disarms the deadline.
    pub async fn within<F: Future>(&self, limit: Duration, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        let _disarm = Disarm(self);
        let mut armed = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if !armed {
                armed = true;
                let nudge = self
                    .table
                    .borrow_mut()
                    .arm(self.key, Instant::now() + limit);
                if let Some(sweeper) = nudge {
                    sweeper.wake();
                }
            }
            let mut table = self.table.borrow_mut();
            let Some(slot) = table.slots.get_mut(self.key) else {
                // Invariant: the slot lives as long as this `Deadline`.
                return Poll::Pending;
            };
            if slot.fired {
                return Poll::Ready(None);
            }
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.table.borrow_mut().slots.try_remove(self.key);
    }
}

/// Disarms the deadline when the operation it bounds ends, however it ends.
struct Disarm<'a>(&'a Deadline);

impl Drop for Disarm<'_> {
    fn drop(&mut self) {
        self.0.table.borrow_mut().disarm(self.0.key);
    }
}

/// The shard's sweeper: sleeps until the planned sweep (forever while nothing is armed),
/// re-planning whenever nudged, then wakes the connections whose deadline passed. Ends when
/// the table is gone (the shard dropped it).
async fn sweeper(table: Weak<RefCell<Table>>) {
    let mut timer: Option<(Instant, glommio::timer::Timer)> = None;
    let mut wake = Vec::new();
    loop {
        let due = std::future::poll_fn(|cx| {
            let Some(table) = table.upgrade() else {
                return Poll::Ready(false);
            };
            let mut table = table.borrow_mut();
            if !table
                .sweeper
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                table.sweeper = Some(cx.waker().clone());
            }
            let Some(planned) = table.planned else {
                timer = None;
                return Poll::Pending;
            };
            let now = Instant::now();
            if now >= planned {
                return Poll::Ready(true);
            }
            if timer.as_ref().is_none_or(|(at, _)| *at != planned) {
                timer = Some((planned, glommio::timer::Timer::new(planned - now)));
            }
            match timer.as_mut() {
                Some((_, t)) => std::pin::Pin::new(t).poll(cx).map(|_| true),
                None => Poll::Pending,
            }
        })
        .await;
        let Some(table) = table.upgrade().filter(|_| due) else {
            return;
        };
        timer = None;
        table.borrow_mut().sweep(Instant::now(), &mut wake);
        for waker in wake.drain(..) {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;

    /// Runs `test` on its own executor; a test still running after 20 s fails (a sweeper
    /// that sleeps through a deadline would otherwise hang it).
    fn run<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
        LocalExecutorBuilder::default()
            .spawn(move || async move {
                let bound = glommio::timer::sleep(Duration::from_secs(20));
                let test = std::pin::pin!(test());
                if let futures::future::Either::Right(_) =
                    futures::future::select(test, std::pin::pin!(bound)).await
                {
                    panic!("the test did not finish within 20 s");
                }
            })
            .expect("executor")
            .join()
            .expect("join");
    }

    #[test]
    fn work_that_completes_at_once_arms_nothing() {
        run(|| async {
            let deadlines = Deadlines::new();
            let deadline = deadlines.slot();
            assert_eq!(
                deadline.within(Duration::from_millis(1), async { 7 }).await,
                Some(7)
            );
            assert!(deadlines.inner.borrow().planned.is_none());
            drop(deadline);
            assert!(deadlines.is_empty());
        });
    }

    #[test]
    fn a_stuck_operation_times_out_never_early() {
        run(|| async {
            let deadlines = Deadlines::new();
            let deadline = deadlines.slot();
            for limit in [1, 20, 60] {
                let limit = Duration::from_millis(limit);
                let started = Instant::now();
                let out = deadline
                    .within(limit, futures::future::pending::<()>())
                    .await;
                assert_eq!(out, None);
                assert!(started.elapsed() >= limit, "{limit:?} fired early");
            }
        });
    }

    #[test]
    fn work_that_finishes_in_time_is_not_cut_and_leaves_nothing_armed() {
        run(|| async {
            let deadlines = Deadlines::new();
            let deadline = deadlines.slot();
            let slow = glommio::timer::sleep(Duration::from_millis(10));
            let out = deadline.within(Duration::from_secs(5), slow).await;
            assert!(out.is_some());
            let table = deadlines.inner.borrow();
            assert!(table
                .slots
                .iter()
                .all(|(_, s)| s.when.is_none() && !s.fired));
        });
    }

    #[test]
    fn an_earlier_deadline_nudges_a_sweeper_planned_for_later() {
        run(|| async {
            let deadlines = Deadlines::new();
            let long = deadlines.slot();
            let short = deadlines.slot();
            // The long one is armed first: the sweeper plans for it, an hour away.
            let waiting = glommio::spawn_local(async move {
                long.within(Duration::from_secs(3600), futures::future::pending::<()>())
                    .await
            });
            glommio::executor().yield_task_queue_now().await;
            let started = Instant::now();
            let out = short.within(Duration::from_millis(30), futures::future::pending::<()>());
            let bound = glommio::timer::sleep(Duration::from_secs(10));
            match futures::future::select(std::pin::pin!(out), std::pin::pin!(bound)).await {
                futures::future::Either::Left((out, _)) => assert_eq!(out, None),
                futures::future::Either::Right(_) => {
                    panic!("the sweeper slept past the 30 ms deadline")
                }
            }
            assert!(started.elapsed() >= Duration::from_millis(30));
            // The hour-long one is still armed and waiting.
            assert!(deadlines.inner.borrow().planned.is_some());
            drop(waiting);
        });
    }

    #[test]
    fn many_connections_each_time_out_at_its_own_deadline() {
        run(|| async {
            let deadlines = Deadlines::new();
            let mut tasks = Vec::new();
            // Both sides of the sweep gap: limits closer together than it and farther apart.
            for (i, ms) in [5u64, 7, 9, 30, 31, 80, 200, 5, 120, 61]
                .into_iter()
                .enumerate()
            {
                let deadline = deadlines.slot();
                tasks.push(glommio::spawn_local(async move {
                    let limit = Duration::from_millis(ms);
                    let started = Instant::now();
                    let out = deadline
                        .within(limit, futures::future::pending::<()>())
                        .await;
                    (i, out.is_none(), started.elapsed() >= limit)
                }));
            }
            // One connection whose work finishes before its deadline.
            let finishing = deadlines.slot();
            let done = finishing
                .within(
                    Duration::from_secs(10),
                    glommio::timer::sleep(Duration::from_millis(40)),
                )
                .await;
            assert!(done.is_some());
            for task in tasks {
                let (i, timed_out, not_early) = task.await;
                assert!(timed_out && not_early, "connection {i}");
            }
        });
    }

    #[test]
    fn dropping_the_operation_disarms_and_dropping_the_deadline_frees_its_slot() {
        run(|| async {
            let deadlines = Deadlines::new();
            let deadline = deadlines.slot();
            {
                let op =
                    deadline.within(Duration::from_millis(1), futures::future::pending::<()>());
                let mut op = std::pin::pin!(op);
                assert!(futures::poll!(op.as_mut()).is_pending());
                assert!(deadlines.inner.borrow().slots[deadline.key].when.is_some());
            }
            assert!(deadlines.inner.borrow().slots[deadline.key].when.is_none());
            // A later operation on the same slot starts afresh.
            let out = deadline
                .within(
                    Duration::from_secs(5),
                    glommio::timer::sleep(Duration::from_millis(5)),
                )
                .await;
            assert!(out.is_some());
            drop(deadline);
            assert!(deadlines.is_empty());
        });
    }
}
