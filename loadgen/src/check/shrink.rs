//! Shrinking a failing history: try smaller variants (chunks of steps dropped, one consumer's
//! steps dropped, publish counts and sizes halved, the set-up simplified), keep any that
//! still fails with a violation of the same kind, and repeat until nothing smaller fails or
//! the budget of re-runs is spent.
//!
//! Re-runs are real (timing varies), so a variant that fails only sometimes may be missed:
//! the result is the shortest history *found*, each printed step list reproducible with the
//! same seed and set-up.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::exec::{self, Bins};
use super::history::{History, Step};
use super::oracle::{Kind, Violation};

/// How much shrinking may cost.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub runs: u32,
    pub time: Duration,
}

/// The smaller variants of `h`, most aggressive first.
fn variants(h: &History) -> Vec<History> {
    let mut out = Vec::new();
    let n = h.steps.len();
    let mut chunk = n / 2;
    while chunk >= 1 {
        let mut start = 0;
        while start < n {
            let mut v = h.clone();
            v.steps.drain(start..(start + chunk).min(n));
            out.push(v);
            start += chunk;
        }
        chunk /= 2;
    }
    let consumers: BTreeSet<u8> = h.steps.iter().filter_map(Step::consumer).collect();
    for c in consumers {
        let mut v = h.clone();
        v.steps.retain(|s| s.consumer() != Some(c));
        out.push(v);
    }
    let mut halved = h.clone();
    let mut smaller = h.clone();
    for (a, b) in halved.steps.iter_mut().zip(smaller.steps.iter_mut()) {
        if let Step::Publish { count, .. } = a {
            *count = (*count / 2).max(1);
        }
        if let Step::Publish { bytes, .. } = b {
            *bytes = (*bytes / 2).max(20);
        }
    }
    out.push(halved);
    out.push(smaller);
    let mut s = h.clone();
    s.setup.shards = 1;
    out.push(s);
    let mut s = h.clone();
    s.setup.max_messages = None;
    s.setup.retention_s = None;
    s.setup.memory_bytes = None;
    out.push(s);
    let mut s = h.clone();
    s.setup.connections = 1;
    out.push(s);
    out.retain(|v| v != h);
    out
}

/// Returns the shortest failing history found and its violations.
pub async fn shrink(
    original: &History,
    violations: Vec<Violation>,
    bins: &Bins,
    budget: Budget,
    progress: bool,
) -> (History, Vec<Violation>, u32) {
    let kinds: BTreeSet<Kind> = violations.iter().map(|v| v.kind).collect();
    let mut best = original.clone();
    let mut best_violations = violations;
    let started = Instant::now();
    let mut runs = 0;
    'outer: loop {
        for v in variants(&best) {
            if runs >= budget.runs || started.elapsed() >= budget.time {
                break 'outer;
            }
            runs += 1;
            let Ok(outcome) = exec::run(&v, bins).await else {
                continue;
            };
            if outcome.violations.iter().any(|x| kinds.contains(&x.kind)) {
                if progress {
                    eprintln!(
                        "check: shrunk seed {} to {} step(s) ({} re-runs)",
                        v.seed,
                        v.steps.len(),
                        runs
                    );
                }
                best = v;
                best_violations = outcome.violations;
                continue 'outer;
            }
        }
        break;
    }
    (best, best_violations, runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::history::{generate, Pins};

    #[test]
    fn every_variant_is_smaller_or_simpler() {
        let h = generate(7, 30, Pins::default());
        let vs = variants(&h);
        assert!(!vs.is_empty());
        for v in &vs {
            assert!(v.steps.len() <= h.steps.len());
            assert_ne!(v, &h);
        }
        // Single steps are among the candidates: any one step can go.
        assert!(
            vs.iter()
                .filter(|v| v.steps.len() + 1 == h.steps.len())
                .count()
                >= h.steps.len()
        );
    }
}
