//! When each request is sent: the closed-loop and open-loop (fixed-rate) send plans.
//!
//! Owns the arithmetic of a run's phases (warm-up, measured, done) and of the open-loop
//! schedule: ticket `n` is *intended* to go out at `n / rate` after the run starts, whatever
//! happened to earlier tickets. Latency is measured from that intended time, not from when the
//! request actually left, so a stalled relay cannot hide its stall by slowing the generator
//! down ("coordinated omission"). A generator that falls behind sends the overdue tickets back
//! to back (catch-up); none is skipped while the run lasts.
//!
//! Sans-IO: no clock is read here; callers pass the elapsed time since the run's start. Does
//! not own sockets, tasks or the pacing thread (see `publish`), only what they compute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// When the measured phase ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this long of measurement (the warm-up comes on top).
    After(Duration),
    /// After this many measured sends.
    Sends(u64),
}

/// What one send is, decided when a sender takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Sent and completed but not counted: the relay and the connections are warming up.
    Warmup { intended: Duration },
    /// Counted. `index` is the 0-based number among measured sends.
    Measured { index: u64, intended: Duration },
    /// The run is over; the sender stops.
    Done,
}

/// A run's send plan. `rate` is sends per second for an open loop, `None` for a closed loop
/// (every connection sends its next request as soon as the previous one is answered).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub warmup: Duration,
    pub stop: Stop,
    pub rate: Option<f64>,
}

impl Plan {
    /// The measured phase's end, for duration-bound runs.
    pub fn end(&self) -> Option<Duration> {
        match self.stop {
            Stop::After(d) => Some(self.warmup + d),
            Stop::Sends(_) => None,
        }
    }

    /// Open loop: when ticket `n` is meant to be sent. Computed from `n` alone (never by
    /// adding intervals), so rounding cannot drift over a long run.
    pub fn intended(rate: f64, n: u64) -> Duration {
        Duration::from_nanos((n as f64 * 1e9 / rate).round() as u64)
    }

    /// Open loop: the number of tickets whose intended time is `<= elapsed`, i.e. how many
    /// should have been released by now. Monotone in `elapsed`.
    pub fn due_count(rate: f64, elapsed: Duration) -> u64 {
        // Estimate from the inverse, then fix the float error at the boundary exactly with
        // `intended`, which is the definition callers compare against.
        let mut n = (elapsed.as_secs_f64() * rate).floor() as u64;
        while n > 0 && Self::intended(rate, n - 1) > elapsed {
            n -= 1;
        }
        while Self::intended(rate, n) <= elapsed {
            n += 1;
        }
        n
    }

    /// Open loop: the first ticket whose intended time is at or after `at`.
    fn first_at_or_after(rate: f64, at: Duration) -> u64 {
        if at.is_zero() {
            return 0;
        }
        // Tickets strictly before `at` are those due by `at - 1ns`.
        Self::due_count(rate, at - Duration::from_nanos(1))
    }

    /// Open loop: the measured tickets the plan holds, when bounded by time: every ticket
    /// intended inside `[warmup, warmup + duration)`.
    pub fn measured_tickets(&self) -> Option<u64> {
        let rate = self.rate?;
        match self.stop {
            Stop::Sends(n) => Some(n),
            Stop::After(d) => Some(
                Self::first_at_or_after(rate, self.warmup + d)
                    - Self::first_at_or_after(rate, self.warmup),
            ),
        }
    }

    /// Open loop: the total number of tickets (warm-up plus measured).
    pub fn total_tickets(&self) -> Option<u64> {
        let rate = self.rate?;
        let warm = Self::first_at_or_after(rate, self.warmup);
        Some(warm + self.measured_tickets()?)
    }

    /// Open loop: what ticket `n` is.
    pub fn open_slot(&self, rate: f64, n: u64) -> Slot {
        let intended = Self::intended(rate, n);
        if intended < self.warmup {
            return Slot::Warmup { intended };
        }
        let index = n - Self::first_at_or_after(rate, self.warmup);
        let done = match self.stop {
            Stop::After(d) => intended >= self.warmup + d,
            Stop::Sends(limit) => index >= limit,
        };
        if done {
            Slot::Done
        } else {
            Slot::Measured { index, intended }
        }
    }

    /// Closed loop: what a send taken at `now` is. `measured_taken` counts measured sends
    /// across all senders; it is advanced only for a measured slot.
    pub fn closed_slot(&self, now: Duration, measured_taken: &AtomicU64) -> Slot {
        if now < self.warmup {
            return Slot::Warmup { intended: now };
        }
        if let Stop::After(d) = self.stop {
            if now >= self.warmup + d {
                return Slot::Done;
            }
        }
        let index = measured_taken.fetch_add(1, Ordering::Relaxed);
        if let Stop::Sends(limit) = self.stop {
            if index >= limit {
                return Slot::Done;
            }
        }
        Slot::Measured {
            index,
            intended: now,
        }
    }
}

/// The open-loop pacer's bookkeeping: how many tickets to release at each wake-up. A pacer
/// that wakes late (a descheduled thread, a loaded host) releases every overdue ticket at
/// once; the senders then send them back to back and their latency, measured from the
/// intended times, shows the stall.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    released: u64,
    /// Stop releasing past this many tickets (the plan's total), if bounded.
    limit: Option<u64>,
    /// Stop releasing tickets intended at or after this time, if bounded.
    end: Option<Duration>,
}

/// What the pacer does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacerStep {
    /// Release `release` tickets now, then sleep until `next`.
    Continue { release: u64, next: Duration },
    /// Release `release` tickets now; no more follow.
    Finished { release: u64 },
}

impl Pacer {
    pub fn new(plan: &Plan, rate: f64) -> Pacer {
        Pacer {
            rate,
            released: 0,
            limit: plan.total_tickets(),
            end: plan.end(),
        }
    }

    /// Tickets released so far.
    #[cfg(test)]
    pub fn released(&self) -> u64 {
        self.released
    }

    /// One wake-up at `now` (elapsed since the run's start).
    pub fn step(&mut self, now: Duration) -> PacerStep {
        // Nothing intended at or after the end is ever released; at the end the pacer
        // finishes. Senders stop at the wall-clock end too, so tickets still overdue then are
        // never sent and are reported as behind schedule (the run stays bounded in time).
        let horizon = match self.end {
            Some(end) if now >= end => end.saturating_sub(Duration::from_nanos(1)),
            _ => now,
        };
        let mut due = Plan::due_count(self.rate, horizon);
        if let Some(limit) = self.limit {
            due = due.min(limit);
        }
        let release = due.saturating_sub(self.released);
        self.released = self.released.max(due);
        let finished = self.limit.is_some_and(|l| self.released >= l)
            || self.end.is_some_and(|end| now >= end);
        if finished {
            PacerStep::Finished { release }
        } else {
            PacerStep::Continue {
                release,
                next: Plan::intended(self.rate, self.released),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn plan(rate: f64, warmup_ms: u64, stop: Stop) -> Plan {
        Plan {
            warmup: MS * warmup_ms as u32,
            stop,
            rate: Some(rate),
        }
    }

    #[test]
    fn intended_times_are_exact_multiples_without_drift() {
        assert_eq!(Plan::intended(1000.0, 0), Duration::ZERO);
        assert_eq!(Plan::intended(1000.0, 1), MS);
        assert_eq!(Plan::intended(1000.0, 1000), Duration::from_secs(1));
        // 3/s does not divide a second evenly; the millionth ticket is still on time.
        assert_eq!(
            Plan::intended(3.0, 3_000_000),
            Duration::from_secs(1_000_000)
        );
        assert_eq!(Plan::intended(3.0, 1), Duration::from_nanos(333_333_333));
    }

    #[test]
    fn due_count_counts_tickets_at_or_before_now() {
        assert_eq!(Plan::due_count(1000.0, Duration::ZERO), 1);
        assert_eq!(Plan::due_count(1000.0, MS - Duration::from_nanos(1)), 1);
        assert_eq!(Plan::due_count(1000.0, MS), 2);
        assert_eq!(Plan::due_count(1000.0, Duration::from_secs(1)), 1001);
        // Monotone and consistent with `intended` at every boundary of an awkward rate.
        let rate = 7.3;
        let mut last = 0;
        for n in 0..200u64 {
            let t = Plan::intended(rate, n);
            let due = Plan::due_count(rate, t);
            assert_eq!(due, n + 1, "ticket {n} at {t:?}");
            assert!(due >= last);
            last = due;
            if !t.is_zero() {
                assert_eq!(Plan::due_count(rate, t - Duration::from_nanos(1)), n);
            }
        }
    }

    #[test]
    fn open_slots_split_warmup_measured_and_done_by_intended_time() {
        // 100/s, 50 ms warm-up, 100 ms measured: tickets 0..5 warm up, 5..15 measured.
        let p = plan(100.0, 50, Stop::After(MS * 100));
        assert_eq!(
            p.open_slot(100.0, 0),
            Slot::Warmup {
                intended: Duration::ZERO
            }
        );
        assert_eq!(p.open_slot(100.0, 4), Slot::Warmup { intended: MS * 40 });
        assert_eq!(
            p.open_slot(100.0, 5),
            Slot::Measured {
                index: 0,
                intended: MS * 50
            }
        );
        assert_eq!(
            p.open_slot(100.0, 14),
            Slot::Measured {
                index: 9,
                intended: MS * 140
            }
        );
        assert_eq!(p.open_slot(100.0, 15), Slot::Done);
        assert_eq!(p.measured_tickets(), Some(10));
        assert_eq!(p.total_tickets(), Some(15));
    }

    #[test]
    fn open_slots_stop_after_a_send_count() {
        let p = plan(1000.0, 2, Stop::Sends(3));
        assert!(matches!(p.open_slot(1000.0, 1), Slot::Warmup { .. }));
        assert!(matches!(
            p.open_slot(1000.0, 2),
            Slot::Measured { index: 0, .. }
        ));
        assert!(matches!(
            p.open_slot(1000.0, 4),
            Slot::Measured { index: 2, .. }
        ));
        assert_eq!(p.open_slot(1000.0, 5), Slot::Done);
        assert_eq!(p.total_tickets(), Some(5));
    }

    #[test]
    fn closed_slots_count_only_measured_sends() {
        let counter = AtomicU64::new(0);
        let p = Plan {
            warmup: MS * 10,
            stop: Stop::Sends(2),
            rate: None,
        };
        assert_eq!(
            p.closed_slot(MS * 5, &counter),
            Slot::Warmup { intended: MS * 5 }
        );
        assert_eq!(counter.load(Ordering::Relaxed), 0, "warm-up is not counted");
        assert_eq!(
            p.closed_slot(MS * 10, &counter),
            Slot::Measured {
                index: 0,
                intended: MS * 10
            }
        );
        assert!(matches!(
            p.closed_slot(MS * 11, &counter),
            Slot::Measured { index: 1, .. }
        ));
        assert_eq!(p.closed_slot(MS * 12, &counter), Slot::Done);

        let timed = Plan {
            warmup: Duration::ZERO,
            stop: Stop::After(MS * 100),
            rate: None,
        };
        assert!(matches!(
            timed.closed_slot(MS * 99, &counter),
            Slot::Measured { .. }
        ));
        assert_eq!(timed.closed_slot(MS * 100, &counter), Slot::Done);
    }

    #[test]
    fn pacer_releases_on_time_and_catches_up_after_a_stall() {
        let p = plan(1000.0, 0, Stop::After(Duration::from_secs(1)));
        let mut pacer = Pacer::new(&p, 1000.0);
        // At the start, ticket 0 is due; the next wake-up is ticket 1's intended time.
        assert_eq!(
            pacer.step(Duration::ZERO),
            PacerStep::Continue {
                release: 1,
                next: MS
            }
        );
        // Woken on time: one more.
        assert_eq!(
            pacer.step(MS),
            PacerStep::Continue {
                release: 1,
                next: MS * 2
            }
        );
        // Stalled for 100 ms: every overdue ticket (2..=101) goes at once, none skipped.
        assert_eq!(
            pacer.step(MS * 101),
            PacerStep::Continue {
                release: 100,
                next: MS * 102
            }
        );
        assert_eq!(pacer.released(), 102);
        // Woken early (spurious): nothing to release, same next time.
        assert_eq!(
            pacer.step(MS * 101 + Duration::from_micros(500)),
            PacerStep::Continue {
                release: 0,
                next: MS * 102
            }
        );
        // Past the end: the rest up to the last measured ticket (999) and no more.
        assert_eq!(
            pacer.step(Duration::from_secs(5)),
            PacerStep::Finished { release: 898 }
        );
        assert_eq!(pacer.released(), 1000);
        assert_eq!(p.total_tickets(), Some(1000));
    }

    #[test]
    fn pacer_stops_at_the_ticket_limit_of_a_counted_run() {
        let p = plan(100.0, 0, Stop::Sends(3));
        let mut pacer = Pacer::new(&p, 100.0);
        assert!(matches!(
            pacer.step(Duration::ZERO),
            PacerStep::Continue { release: 1, .. }
        ));
        assert_eq!(
            pacer.step(Duration::from_secs(10)),
            PacerStep::Finished { release: 2 }
        );
    }
}
