//! `loadgen check`: a randomized model checker of the relay's delivery promise.
//!
//! Each history is generated from a seed ([`history`]): a relay set-up (memory or Valkey
//! backend, 1–2 shards, 1–4 Valkey connections per shard, `ack: persisted` or `buffered`,
//! count/age/memory retention, the slow-consumer bound) and a list of steps (single, parallel
//! and bulk publishes of tens of bytes to hundreds of KB with and without ttl, trims, deletes,
//! WebSocket/SSE/long-poll consumers subscribing, disconnecting, pausing and resuming from
//! their last id, an older id or the start, Valkey `kill -9` and SIGSTOP outages).
//! [`exec`] runs it against freshly started processes ([`procs`]) over real sockets
//! ([`consumer`]); [`oracle`] states and checks the invariant; [`shrink`] looks for the
//! shortest failing variant. History `i` of a run uses seed `--seed + i`, so any one history
//! reproduces alone with `--seed` and `--histories 1`.
//!
//! Exit status: 0 no violation, 1 violations found, 2 the run could not be set up.

pub mod consumer;
pub mod exec;
pub mod group;
pub mod history;
pub mod oracle;
pub mod procs;
pub mod shrink;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use exec::Bins;
use history::{History, Pins};
use oracle::Violation;

/// What `loadgen check` was asked to do.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    pub seed: u64,
    /// Histories to run (with `duration`: at most this many).
    pub histories: Option<u64>,
    /// Run histories until this much time has passed.
    pub duration: Option<Duration>,
    pub steps: usize,
    pub shrink: shrink::Budget,
    pub bins: Bins,
    pub pins: Pins,
    pub quiet: bool,
}

/// One failing history.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub seed: u64,
    pub violations: Vec<String>,
    /// The shortest failing history found, as printed steps.
    pub shortest: String,
    pub shortest_violations: Vec<String>,
    pub shrink_runs: u32,
}

/// The run's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub histories: u64,
    pub published: u64,
    pub acked: u64,
    pub ambiguous: u64,
    pub rejected: u64,
    pub deliveries_checked: u64,
    pub gaps_seen: u64,
    pub resumes: u64,
    pub valkey_restarts: u64,
    pub violations: u64,
    /// Consumer groups run (histories with groups have one or two).
    pub groups: u64,
    /// Acknowledged publishes owed to a group (per group).
    pub group_owed: u64,
    pub group_deliveries: u64,
    pub group_redeliveries: u64,
    /// Ids in `acked` answers.
    pub group_acks: u64,
    pub dead_letters: u64,
    /// Workers that dropped their connection holding messages, on purpose.
    pub group_crashes: u64,
    /// Histories that could not be set up (a process did not start).
    pub setup_errors: Vec<String>,
    pub failures: Vec<Failure>,
    /// Relay closes, error frames, failed connects, by kind.
    pub events: BTreeMap<String, u64>,
    pub elapsed_s: f64,
}

impl Summary {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "check: {} histories in {:.0} s: {} published ({} acked, {} ambiguous, {} rejected), \
             {} deliveries checked, {} gaps seen, {} resumes, {} valkey restarts, {} violation(s) \
             in {} failing histor{}",
            self.histories,
            self.elapsed_s,
            self.published,
            self.acked,
            self.ambiguous,
            self.rejected,
            self.deliveries_checked,
            self.gaps_seen,
            self.resumes,
            self.valkey_restarts,
            self.violations,
            self.failures.len(),
            if self.failures.len() == 1 { "y" } else { "ies" }
        );
        if self.groups > 0 {
            let _ = writeln!(
                s,
                "  consumer groups: {} groups, {} acknowledged publishes owed to them, {} \
                 deliveries ({} redeliveries), {} acknowledged, {} dead-lettered, {} worker \
                 crashes",
                self.groups,
                self.group_owed,
                self.group_deliveries,
                self.group_redeliveries,
                self.group_acks,
                self.dead_letters,
                self.group_crashes
            );
        }
        if !self.events.is_empty() {
            let ev: Vec<String> = self
                .events
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(s, "  relay events: {}", ev.join(", "));
        }
        for e in &self.setup_errors {
            let _ = writeln!(s, "  setup error: {e}");
        }
        for f in &self.failures {
            let _ = writeln!(
                s,
                "\nFAILED seed {} ({} violation(s)):",
                f.seed,
                f.violations.len()
            );
            for v in f.violations.iter().take(5) {
                let _ = writeln!(s, "  {v}");
            }
            let _ = writeln!(
                s,
                "shortest failing history found ({} shrink re-runs):\n{}",
                f.shrink_runs, f.shortest
            );
            for v in f.shortest_violations.iter().take(5) {
                let _ = writeln!(s, "  {v}");
            }
        }
        s
    }
}

fn strings(v: &[Violation]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

/// Runs the histories `spec` asks for.
pub async fn run(spec: &CheckSpec) -> Summary {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut i = 0u64;
    loop {
        if spec.histories.is_some_and(|n| i >= n) {
            break;
        }
        if spec.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if spec.histories.is_none() && spec.duration.is_none() && i >= 1 {
            break;
        }
        let seed = spec.seed.wrapping_add(i);
        i += 1;
        let history = history::generate(seed, spec.steps, spec.pins);
        if !spec.quiet {
            let mut relays = if spec.bins.relays > 1 {
                format!(", {} relays", spec.bins.relays)
            } else {
                String::new()
            };
            if spec.bins.cluster {
                relays.push_str(&format!(
                    ", a Valkey Cluster of {} masters",
                    procs::CLUSTER_MASTERS
                ));
            }
            eprintln!("check: seed {seed}: {}{relays}", history.setup);
        }
        let outcome = match exec::run(&history, &spec.bins).await {
            Ok(o) => o,
            Err(e) => {
                summary.setup_errors.push(format!("seed {seed}: {e}"));
                continue;
            }
        };
        summary.histories += 1;
        summary.published += outcome.published;
        summary.acked += outcome.acked;
        summary.ambiguous += outcome.ambiguous;
        summary.rejected += outcome.rejected;
        summary.deliveries_checked += outcome.deliveries;
        summary.gaps_seen += outcome.gaps;
        summary.resumes += outcome.resumes;
        summary.valkey_restarts += outcome.restarts;
        summary.violations += outcome.violations.len() as u64;
        summary.groups += history.groups.len() as u64;
        summary.group_owed += outcome.group_owed;
        summary.group_deliveries += outcome.group_deliveries;
        summary.group_redeliveries += outcome.group_redeliveries;
        summary.group_acks += outcome.group_acks;
        summary.dead_letters += outcome.dead_letters;
        summary.group_crashes += outcome.group_crashes;
        for (k, v) in &outcome.events {
            *summary.events.entry(k.clone()).or_default() += v;
        }
        if !spec.quiet {
            let groups = if history.groups.is_empty() {
                String::new()
            } else {
                format!(
                    ", groups: {} owed, {} acked, {} dead-lettered",
                    outcome.group_owed, outcome.group_acks, outcome.dead_letters
                )
            };
            eprintln!(
                "check: seed {seed}: {} published, {} deliveries, {} gaps{groups}, {} violation(s), {:.1} s",
                outcome.published,
                outcome.deliveries,
                outcome.gaps,
                outcome.violations.len(),
                outcome.elapsed.as_secs_f64()
            );
        }
        if !outcome.violations.is_empty() {
            summary
                .failures
                .push(fail(spec, &history, outcome.violations).await);
        }
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary
}

async fn fail(spec: &CheckSpec, history: &History, violations: Vec<Violation>) -> Failure {
    if !spec.quiet {
        eprint!("check: seed {} FAILED:\n{history}", history.seed);
        for v in violations.iter().take(5) {
            eprintln!("  {v}");
        }
    }
    let (shortest, shortest_violations, runs) = if spec.shrink.runs > 0 {
        shrink::shrink(
            history,
            violations.clone(),
            &spec.bins,
            spec.shrink,
            !spec.quiet,
        )
        .await
    } else {
        (history.clone(), violations.clone(), 0)
    };
    Failure {
        seed: history.seed,
        violations: strings(&violations),
        shortest: shortest.to_string(),
        shortest_violations: strings(&shortest_violations),
        shrink_runs: runs,
    }
}
