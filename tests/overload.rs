//! Publish load above what the relay (or its Valkey) can take: answers stay well-formed
//! (201, or 503 JSON with `Retry-After`), nothing hangs or crashes, memory stays bounded by
//! `valkey.max_pending` rather than growing with the backlog, every acknowledged message is
//! stored, and the relay returns to 201s when Valkey catches up.
//!
//! "Valkey slower than the producers" is made real with `CLIENT PAUSE <ms> WRITE` in a cycle:
//! Valkey serves writes a fraction of the time, so the relay's per-shard queue fills and the
//! surplus must be refused, not buffered.
//!
//! Memory is asserted as a safety bound (a generous ceiling over the baseline), never as a
//! speed or efficiency figure: those belong to loadgen.
//!
//! Owns: overload behaviour of the publish path. Does not own: outages (Valkey down, relay
//! killed: `valkey_resilience.rs`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::valkey::{
    assert_acked_in_valkey, assert_answered, PublishLoad, ValkeyOpts, ValkeyServer, WorkerOutcome,
};
use common::{assert_spans_shards, eventually, rss_kib, topics, Server};

/// A small queue, so a few dozen producers overflow it. The command timeout is ten times a
/// pause (below), so a paused write completes rather than times out even on a starved
/// machine: the 503s come from the queue bound, and a buffered write-behind is not failed
/// by a timeout. Twice the timeout (queue + round trip) stays below the load worker's 10 s
/// read timeout, which would count a request as hung.
const SMALL_QUEUE: &str =
    "valkey:\n  max_pending: 8\n  command_timeout: 4s\n  connect_timeout: 1s\n";

/// Producers: far more than the queue holds on either shard.
const PRODUCERS: usize = 48;

/// Generous: the relay idles at a few MiB; the bound catches growth with the backlog (48
/// producers refused thousands of times per second would buffer hundreds of MiB if refused
/// publishes were kept), not allocator noise.
const RSS_MARGIN_KIB: u64 = 128 * 1024;

/// Runs `during` while Valkey's writes are paused for `pause` out of every `period`: a Valkey
/// that serves writes a fraction of the time, i.e. slower than the producers. Lifts the
/// pause afterwards; returns `during`'s result and the number of pauses.
fn with_slow_valkey<T>(
    valkey: &ValkeyServer,
    pause: Duration,
    period: Duration,
    during: impl FnOnce() -> T,
) -> (T, u32) {
    let stop = AtomicBool::new(false);
    let pause_ms = pause.as_millis().to_string();
    let outcome = std::thread::scope(|s| {
        let pauser = s.spawn(|| {
            let mut cycles = 0;
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                valkey.cli(&["CLIENT", "PAUSE", &pause_ms, "WRITE"]);
                cycles += 1;
                std::thread::sleep(period.saturating_sub(began.elapsed()));
            }
            cycles
        });
        let outcome = during();
        stop.store(true, Ordering::Relaxed);
        (outcome, pauser.join().expect("pauser panicked"))
    });
    valkey.cli(&["CLIENT", "UNPAUSE"]);
    outcome
}

/// Every answer was a 201 or a well-formed 503 (checked by the load worker), none hung, no
/// connection failed; returns the 503 count.
fn assert_well_formed(outcomes: &[WorkerOutcome]) -> u64 {
    for out in outcomes {
        assert_answered(out);
        assert_eq!(out.conn_errors, 0, "{}: connection errors", out.topic);
    }
    outcomes.iter().map(|o| o.unavailable).sum()
}

/// The counter `relay_valkey_errors_total{kind="<kind>"}` from /metrics (0 if absent).
fn valkey_errors(relay: &Server, kind: &str) -> u64 {
    let text = relay.get("/metrics").text();
    let prefix = format!("relay_valkey_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn overload_with_slow_valkey(ack: &str) {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let config = format!("{SMALL_QUEUE}durability:\n  ack: {ack}\n");
    let relay = valkey.start_relay(&config, &[]);
    let pid = relay.pid().expect("relay running");
    let names = topics(&format!("overload-{ack}"), PRODUCERS);
    assert_spans_shards(&names, 2);

    let load = PublishLoad::start(relay.addr, &names, u64::MAX, Duration::from_secs(40));
    assert!(
        eventually(Duration::from_secs(15), || load.min_acked() >= 3),
        "load did not get going: min acked {}, failures {}",
        load.min_acked(),
        load.failures()
    );
    let (baseline_kib, _) = rss_kib(pid);

    // Valkey takes writes 20% of the time until the relay has refused plenty.
    let refused_before = load.failures();
    let mut peak_kib = baseline_kib;
    let (overloaded, cycles) = with_slow_valkey(
        &valkey,
        Duration::from_millis(400),
        Duration::from_millis(500),
        || {
            eventually(Duration::from_secs(20), || {
                peak_kib = peak_kib.max(rss_kib(pid).0);
                load.failures() >= refused_before + 1000
            })
        },
    );
    assert!(
        overloaded,
        "a slow Valkey did not make the relay refuse publishes ({} failures, {cycles} pauses)",
        load.failures() - refused_before
    );

    // Valkey keeps up again: every producer gets 201s.
    let acked = load.min_acked();
    let failures = load.failures();
    assert!(
        eventually(Duration::from_secs(15), || load.min_acked() >= acked + 5),
        "publishes did not recover after Valkey caught up (min acked {} -> {}, failures {} \
         -> {}); relay log: {}",
        acked,
        load.min_acked(),
        failures,
        load.failures(),
        relay.stderr()
    );
    let outcomes = load.finish();
    let (_, hwm_kib) = rss_kib(pid);
    let refused = assert_well_formed(&outcomes);
    let acknowledged: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    eprintln!(
        "overload ({ack}): {acknowledged} acknowledged, {refused} refused with 503, \
         RSS baseline {baseline_kib} KiB, sampled peak {peak_kib} KiB, high-water {hwm_kib} KiB"
    );
    assert!(
        hwm_kib <= baseline_kib + RSS_MARGIN_KIB,
        "relay memory grew with the backlog: {baseline_kib} KiB -> peak {hwm_kib} KiB"
    );
    assert!(
        valkey_errors(&relay, "backpressure") > 0,
        "the 503s did not come from the max_pending bound"
    );
    // A buffered message whose write-behind failed is logged; show them if any is missing.
    let log = relay.stderr();
    let not_persisted = log.lines().filter(|l| l.contains("not persisted")).count();
    if not_persisted > 0 {
        eprintln!("relay log: {not_persisted} write-behind failure(s):\n{log}");
    }
    assert_acked_in_valkey(&valkey, &outcomes);
    assert!(relay.health()["status"].is_string(), "relay still answers");
}

#[test]
fn valkey_slower_than_the_producers_gets_503s_not_memory_growth() {
    overload_with_slow_valkey("persisted");
}

/// Regression: with `ack: buffered` a full queue used to be discovered only by the
/// write-behind, after the producer had its 201: the message was then dropped (logged). Now
/// the queue is checked before the acknowledgement.
#[test]
fn buffered_publishes_are_refused_not_dropped_when_valkey_lags() {
    overload_with_slow_valkey("buffered");
}

#[test]
fn memory_backend_publish_load_above_capacity_stays_well_formed() {
    let relay = Server::start("");
    let pid = relay.pid().expect("relay running");
    let names = topics("overload-memory", 64);
    let (baseline_kib, _) = rss_kib(pid);
    // Closed loop on 64 connections: more than 2 shards on a small machine can serve, so
    // requests queue in sockets and latency rises; bounded by time, not count.
    let load = PublishLoad::start(relay.addr, &names, u64::MAX, Duration::from_secs(30));
    // The load phase's length, not a synchronisation: the workers run until told to stop.
    std::thread::sleep(Duration::from_secs(3));
    let outcomes = load.finish();
    let refused = assert_well_formed(&outcomes);
    let acknowledged: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    let (rss_after, hwm_kib) = rss_kib(pid);
    eprintln!(
        "memory backend overload: {acknowledged} acknowledged, {refused} refused, \
         RSS {baseline_kib} -> {rss_after} KiB (high-water {hwm_kib} KiB)"
    );
    assert!(acknowledged > 0, "nothing was acknowledged");
    for out in &outcomes {
        assert!(!out.acked.is_empty(), "{}: starved", out.topic);
        // What was acknowledged is readable, in the acknowledged order.
        let stored = relay.read_topic(&out.topic, "order=asc&limit=1000");
        let total = stored["total"].as_u64().expect("total");
        assert_eq!(total as usize, out.acked.len(), "{}", out.topic);
        let first = stored["messages"][0]["message_id"].as_str();
        assert_eq!(first, out.acked.first().map(|(_, id)| id.as_str()));
    }
    assert!(relay.health()["status"].is_string(), "relay still answers");
}

/// Regression: the queue refused any group larger than `valkey.max_pending`, even when empty:
/// with `max_pending: 0` (documented as "refuse at once while Valkey is unreachable") every
/// first publish to a topic (XADD + HSETNX) and every bulk publish got 503, forever.
#[test]
fn max_pending_zero_publishes_while_valkey_is_up_and_refuses_at_once_while_down() {
    let mut valkey = ValkeyServer::start(ValkeyOpts::default());
    let relay = valkey.start_relay("valkey:\n  max_pending: 0\n  command_timeout: 5s\n", &[]);
    let ack = relay.publish("zero-pending", r#"{"n":1}"#);
    assert!(ack["message_id"].is_string(), "{ack}");
    let items: Vec<String> = (0..20)
        .map(|i| common::publish_body("zero-pending-bulk", &format!(r#"{{"i":{i}}}"#)))
        .collect();
    let bulk = relay.post_json(
        "/api/v1/messages/bulk",
        &format!(r#"{{"messages":[{}]}}"#, items.join(",")),
    );
    assert_eq!(bulk.status, 207, "{bulk:?}");
    assert_eq!(bulk.json()["summary"]["accepted"], 20, "{bulk:?}");

    valkey.stop();
    // Once the relay has noticed, a publish is refused without waiting for a connection.
    let refused_at_once = eventually(Duration::from_secs(10), || {
        let began = Instant::now();
        let resp = relay.post_json(
            "/api/v1/messages",
            &common::publish_body("zero-pending", r#"{"n":2}"#),
        );
        resp.status == 503 && began.elapsed() < Duration::from_secs(1)
    });
    assert!(
        refused_at_once,
        "publishes waited for Valkey despite max_pending: 0"
    );
}
