//! Every loadgen scenario, ~2 s each (churn: two rounds of ~8 s), against a real relay: the accounting adds up
//! (`sent = acknowledged + failed`, failures by kind sum to `failed`) and a healthy relay
//! loses, duplicates and reorders nothing.
//!
//! The relay binary: `PULSAR_RELAY_BIN` if set; else `target/{debug,release}/pulsar-relay`
//! (or under `CARGO_TARGET_DIR`) if newer than the relay's sources; else it is built with
//! `cargo build --bin pulsar-relay` into `target/loadgen-relay` (a separate target directory,
//! so this does not wait on the lock of the `cargo test` that runs us). If none of that
//! works, or the relay cannot start here (no io_uring), the test fails and says why.
//!
//! One test function runs the scenarios in sequence against one relay: run side by side on a
//! small machine they would measure each other.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Newest modification time of the relay's sources.
fn sources_mtime(root: &Path) -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(m) = entry.metadata().and_then(|m| m.modified()) {
                *newest = Some(newest.map_or(m, |n: SystemTime| n.max(m)));
            }
        }
    }
    let mut newest = None;
    walk(&root.join("src"), &mut newest);
    for file in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(m) = std::fs::metadata(root.join(file)).and_then(|m| m.modified()) {
            newest = Some(newest.map_or(m, |n: SystemTime| n.max(m)));
        }
    }
    newest
}

fn relay_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("PULSAR_RELAY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let root = workspace();
    let mut targets = vec![root.join("target")];
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.insert(0, PathBuf::from(dir));
    }
    let sources = sources_mtime(&root);
    let fresh = targets
        .iter()
        .flat_map(|t| [t.join("debug"), t.join("release")])
        .map(|d| d.join("pulsar-relay"))
        .filter_map(|bin| {
            let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok()?;
            (sources.is_none_or(|s| built >= s)).then_some((built, bin))
        })
        .max();
    if let Some((_, bin)) = fresh {
        return Ok(bin);
    }
    let target_dir = root.join("target").join("loadgen-relay");
    eprintln!(
        "loadgen tests: building pulsar-relay into {}",
        target_dir.display()
    );
    let status = Command::new(env!("CARGO"))
        .args(["build", "--bin", "pulsar-relay"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build --bin pulsar-relay` failed ({status})"
        ));
    }
    Ok(target_dir.join("debug").join("pulsar-relay"))
}

/// The relay process, killed when dropped.
struct Relay {
    child: Child,
    url: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_relay(bin: &Path) -> Result<Relay, String> {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("pulsar-relay ready: ") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let mut relay = Relay {
        child,
        url: String::new(),
    };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(url) => {
            relay.url = url;
            Ok(relay)
        }
        Err(_) => Err("the relay did not report ready within 30 s (io_uring unavailable?)".into()),
    }
}

/// Runs loadgen with `--json --quiet`; returns its exit code and report.
fn loadgen(url: &str, args: &[&str]) -> (i32, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(args).args(["--url", url, "--json", "--quiet"]);
    let out = cmd.output().expect("loadgen runs");
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "loadgen {args:?}: no JSON report ({e}); exit {code}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The invariants every report must hold.
fn assert_accounting(name: &str, r: &Value) {
    let (sent, acked, failed) = (n(r, "sent"), n(r, "acknowledged"), n(r, "failed"));
    assert_eq!(
        sent,
        acked + failed,
        "{name}: sent = acknowledged + failed: {r}"
    );
    let by_kind: u64 = r["failures"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(
        by_kind, failed,
        "{name}: failures by kind sum to failed: {r}"
    );
    assert!(sent > 0, "{name}: nothing sent: {r}");
    assert_eq!(failed, 0, "{name}: a healthy relay fails nothing: {r}");
}

fn assert_clean_delivery(name: &str, r: &Value) {
    let d = &r["delivery"];
    let c = &d["check"];
    assert_eq!(d["drained"], true, "{name}: drained: {d}");
    assert_eq!(n(c, "lost"), 0, "{name}: lost: {d}");
    assert_eq!(n(c, "duplicated"), 0, "{name}: duplicated: {d}");
    assert_eq!(n(c, "reordered"), 0, "{name}: reordered: {d}");
    assert_eq!(n(c, "foreign"), 0, "{name}: foreign: {d}");
    assert_eq!(d["missed"], false, "{name}: {d}");
    assert_eq!(
        n(d, "subscribers_ready"),
        n(d, "subscribers"),
        "{name}: every subscriber subscribed: {d}"
    );
    // Everything acknowledged (warm-up included) times the subscribers was owed and came.
    assert_eq!(n(c, "expected"), n(c, "delivered"), "{name}: {d}");
    assert!(
        n(d, "deliveries") >= n(r, "acknowledged") * n(d, "subscribers"),
        "{name}: every measured message reached every subscriber: {r}"
    );
}

/// A fresh relay, or `None` (said loudly) if there is no binary or it cannot start here.
fn test_relay() -> Relay {
    match relay_binary().and_then(|bin| start_relay(&bin)) {
        Ok(relay) => relay,
        Err(why) => panic!("loadgen scenario tests need a running relay: {why}"),
    }
}

#[test]
fn every_scenario_accounts_exactly_against_a_healthy_relay() {
    let relay = test_relay();
    let url = relay.url.as_str();
    let short = ["--duration", "1500ms", "--warmup", "500ms"];

    let (code, r) = loadgen(
        url,
        &[&["publish", "--connections", "8"][..], &short].concat(),
    );
    assert_eq!(code, 0);
    assert_accounting("publish closed", &r);
    assert_eq!(r["mode"], "closed");
    assert_eq!(n(&r, "requests"), n(&r, "sent"));
    assert!(n(&r["latency"], "count") == n(&r, "acknowledged"));

    let (code, r) = loadgen(
        url,
        &[
            &["publish", "--connections", "4", "--rate", "400"][..],
            &short,
        ]
        .concat(),
    );
    assert_eq!(code, 0);
    assert_accounting("publish open", &r);
    // 400/s for 1.5 s: exactly 600 tickets were measured, all sent (none behind).
    assert_eq!(n(&r, "sent") + n(&r, "behind_schedule"), 600, "{r}");
    assert!(r["service_time"].is_object());

    let (code, r) = loadgen(
        url,
        &[
            "publish",
            "--connections",
            "4",
            "--messages",
            "500",
            "--warmup",
            "0s",
        ],
    );
    assert_eq!(code, 0);
    assert_accounting("publish counted", &r);
    assert_eq!(
        n(&r, "sent"),
        500,
        "a counted run sends exactly that many: {r}"
    );

    let (code, r) = loadgen(
        url,
        &[&["bulk", "--connections", "2", "--batch", "20"][..], &short].concat(),
    );
    assert_eq!(code, 0);
    assert_accounting("bulk", &r);
    assert_eq!(n(&r, "sent"), n(&r, "requests") * 20, "{r}");

    for transport in ["ws", "longpoll", "sse"] {
        let (code, r) = loadgen(
            url,
            &[
                &[
                    "e2e",
                    "--transport",
                    transport,
                    "--subscribers",
                    "3",
                    "--topics",
                    "2",
                    "--connections",
                    "4",
                    "--rate",
                    "500",
                    "--verify",
                ][..],
                &short,
            ]
            .concat(),
        );
        let name = format!("e2e {transport}");
        assert_eq!(code, 0, "{name}: --verify passes: {r}");
        assert_accounting(&name, &r);
        assert_clean_delivery(&name, &r);
    }

    // Full speed: closed-loop publishers, one WebSocket subscriber, every message verified.
    let (code, r) = loadgen(
        url,
        &[
            &[
                "e2e",
                "--subscribers",
                "1",
                "--connections",
                "8",
                "--closed-loop",
                "--verify",
            ][..],
            &short,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "e2e closed loop: --verify passes: {r}");
    assert_eq!(r["mode"], "closed");
    assert_accounting("e2e closed loop", &r);
    assert_clean_delivery("e2e closed loop", &r);

    let (code, r) = loadgen(
        url,
        &[
            &[
                "fanout",
                "--subscribers",
                "50",
                "--rate",
                "200",
                "--connections",
                "4",
            ][..],
            &short,
        ]
        .concat(),
    );
    assert_eq!(code, 0);
    assert_accounting("fanout", &r);
    assert_clean_delivery("fanout", &r);

    let pid = relay.child.id().to_string();
    let (code, r) = loadgen(
        url,
        &[
            "connections",
            "--subscribers",
            "100",
            "--hold",
            "1s",
            "--relay-pid",
            &pid,
        ],
    );
    assert_eq!(code, 0);
    assert_accounting("connections", &r);
    let held = &r["held"];
    assert_eq!(n(held, "established"), 100, "{r}");
    assert_eq!(n(held, "dropped"), 0, "{r}");
    assert!(held["rss_after_kib"].as_u64().is_some_and(|k| k > 0), "{r}");

    // Subscribers of every transport drop their connections every ~300 ms and resume.
    let (code, r) = loadgen(
        url,
        &[
            "soak",
            "--duration",
            "2s",
            "--topics",
            "2",
            "--rate",
            "300",
            "--connections",
            "4",
            "--reconnect-every",
            "300ms",
            "--report-every",
            "1s",
            "--relay-pid",
            &pid,
        ],
    );
    assert_eq!(code, 0, "soak: clean across reconnects: {r}");
    assert_accounting("soak", &r);
    let soak = &r["soak"];
    for t in soak["transports"].as_array().expect("transports") {
        let c = &t["check"];
        assert_eq!(t["drained"], true, "soak: {t}");
        assert_eq!(
            n(c, "lost") + n(c, "duplicated") + n(c, "reordered"),
            0,
            "{t}"
        );
        assert_eq!(n(c, "expected"), n(c, "delivered"), "{t}");
        assert!(n(t, "reconnects") > 0, "soak: subscribers reconnected: {t}");
    }
    assert!(n(&soak["relay_rss"], "samples") > 0, "{r}");
}

/// The hard `RLIMIT_NOFILE` of this process (inherited by the relay and loadgen).
fn hard_open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// Churn: thousands of WebSocket connections come and go while a publisher runs; afterwards
/// the relay's connection, session and subscriber counts are back at the baseline, and a
/// second identical round does not grow its memory (a leak would grow with every round; the
/// allocator keeping freed pages does not).
#[test]
fn churn_returns_the_relay_to_its_baseline() {
    let relay = test_relay();
    let pid = relay.child.id().to_string();
    // Each side holds one descriptor per connection (both raise their soft limit to the
    // hard one): stay below the hard limit with room for everything else.
    let concurrent = hard_open_files_limit()
        .map_or(2000, |hard| 2000.min(hard.saturating_sub(256)))
        .to_string();
    let churn = || {
        let (code, r) = loadgen(
            &relay.url,
            &[
                "churn",
                "--concurrent",
                &concurrent,
                "--topics",
                "8",
                "--rate",
                "100",
                "--connections",
                "2",
                "--duration",
                "6s",
                "--life-min",
                "500ms",
                "--life-max",
                "2s",
                "--settle-timeout",
                "20s",
                "--relay-pid",
                &pid,
            ],
        );
        assert_eq!(code, 0, "churn: the relay's counts settled: {r}");
        let c = r["churn"].clone();
        assert_eq!(c["settled"], true, "{c}");
        assert_eq!(c["after"], c["baseline"], "{c}");
        assert_eq!(n(&c["baseline"], "websocket_sessions"), 0, "{c}");
        assert_eq!(n(&c["baseline"], "subscribers"), 0, "{c}");
        assert!(n(&c, "connects") >= 2000, "churned: {c}");
        assert!(n(&c, "peak_open") >= 500, "many connections at once: {c}");
        assert_eq!(n(&c, "dropped"), 0, "the relay ended no connection: {c}");
        assert!(
            c["errors"].as_object().is_some_and(|e| e.is_empty()),
            "no connect or subscribe failed: {c}"
        );
        assert!(n(&c, "messages_received") > 0, "{c}");
        c
    };
    let first = churn();
    let second = churn();
    let (before, after_first, after_second) = (
        n(&first, "rss_before_kib"),
        n(&first, "rss_after_kib"),
        n(&second, "rss_after_kib"),
    );
    eprintln!(
        "churn: RSS {before} KiB before, {after_first} KiB after round 1, {after_second} KiB \
         after round 2 ({} and {} connects)",
        n(&first, "connects"),
        n(&second, "connects")
    );
    // Generous: allocator noise and fragmentation, not a per-connection leak (round 2 makes
    // thousands of connections; leaking even 1 KiB each would show).
    assert!(
        after_second <= after_first + 16 * 1024,
        "relay memory grew from round to round: {after_first} -> {after_second} KiB"
    );
    assert!(
        after_first <= before + 256 * 1024,
        "relay memory after churn: {before} -> {after_first} KiB"
    );
}

/// The model checker's fixed CI set: one history per entry, together covering both backends,
/// 1 and 2 shards, 1 and 4 Valkey connections per shard, both ack modes, all three
/// transports, three relays on one Valkey, a Valkey Cluster (one relay and three), and
/// authentication on. Each
/// entry is `loadgen check` with pins; a failure names the seed and the flags that replay it
/// (`loadgen check --seed S --histories 1 <pins>`), with the violations. Shrinking is off here (it re-runs histories); run the printed command to shrink.
const CHECK_SET: &[(u64, &[&str])] = &[
    (
        11,
        &["--backend", "memory", "--shards", "1", "--transport", "ws"],
    ),
    (
        12,
        &["--backend", "memory", "--shards", "2", "--transport", "sse"],
    ),
    (
        13,
        &[
            "--backend",
            "memory",
            "--shards",
            "2",
            "--transport",
            "longpoll",
        ],
    ),
    (
        14,
        &["--backend", "memory", "--shards", "1", "--transport", "sse"],
    ),
    (
        15,
        &["--backend", "memory", "--shards", "2", "--transport", "ws"],
    ),
    (
        16,
        &[
            "--backend",
            "valkey",
            "--shards",
            "1",
            "--valkey-connections",
            "1",
            "--ack",
            "persisted",
            "--transport",
            "ws",
        ],
    ),
    (
        17,
        &[
            "--backend",
            "valkey",
            "--shards",
            "2",
            "--valkey-connections",
            "4",
            "--ack",
            "persisted",
            "--transport",
            "sse",
        ],
    ),
    (
        18,
        &[
            "--backend",
            "valkey",
            "--shards",
            "2",
            "--valkey-connections",
            "4",
            "--ack",
            "buffered",
            "--transport",
            "longpoll",
        ],
    ),
    (
        19,
        &[
            "--backend",
            "valkey",
            "--shards",
            "1",
            "--valkey-connections",
            "4",
            "--ack",
            "buffered",
            "--transport",
            "ws",
        ],
    ),
    (
        20,
        &[
            "--backend",
            "valkey",
            "--shards",
            "1",
            "--valkey-connections",
            "1",
            "--ack",
            "persisted",
            "--transport",
            "longpoll",
        ],
    ),
    (
        21,
        &[
            "--backend",
            "valkey",
            "--shards",
            "2",
            "--valkey-connections",
            "1",
            "--ack",
            "buffered",
            "--transport",
            "sse",
        ],
    ),
    (
        22,
        &[
            "--backend",
            "valkey",
            "--shards",
            "2",
            "--valkey-connections",
            "4",
            "--ack",
            "persisted",
            "--transport",
            "ws",
        ],
    ),
    (23, &["--backend", "memory"]),
    (24, &["--backend", "valkey"]),
    // `ack: buffered` with count retention (50 and 300 messages a topic): the class where the
    // checker found resumes skipping messages trimmed mid-read (seeds 7006, 7015, 7061).
    (27, &["--backend", "valkey", "--ack", "buffered"]),
    (31, &["--backend", "valkey", "--ack", "buffered"]),
    // Three relays on one Valkey (issue 12): publishes of a topic through different relays,
    // consumers resuming on another relay each time, Valkey outages, trims and deletes.
    (202, &["--relays", "3"]),
    (210, &["--relays", "3"]),
    // Three relays, count retention 50 and age retention 2 s: where a relay's stream sync
    // skipped entries already due when it read them, with no gap (seed 12019 at 40 steps).
    (12019, &["--relays", "3"]),
    // A Valkey Cluster of three masters (issue 12), each Valkey outage taking one master:
    // `ack: buffered` with count retention 50, `ack: persisted` with 4 connections per shard
    // over 2 shards, and three relays on the cluster.
    (15000, &["--cluster"]),
    (15002, &["--cluster"]),
    (16024, &["--cluster", "--relays", "3"]),
    // Built-in authentication on (issue 13): every request and stream carries a token and the
    // topics live in the user's namespace; memory, Valkey with buffered acks, three relays
    // sharing the users on one Valkey. (Other entries draw authentication for about a third
    // of their seeds too.)
    (
        1,
        &["--auth", "on", "--backend", "memory", "--transport", "sse"],
    ),
    (
        3,
        &["--auth", "on", "--backend", "valkey", "--ack", "buffered"],
    ),
    (4001, &["--auth", "on", "--relays", "3"]),
    // Consumer groups (issue 14, docs/work-queues.md): WebSocket and HTTP workers that crash
    // holding messages, acknowledge late, nack and let messages time out; every acknowledged
    // publish acknowledged or dead-lettered exactly once, max_in_flight, delivery_count.
    // Memory with two groups; Valkey through an outage; three relays on one Valkey.
    (115, &["--groups", "on", "--backend", "memory"]),
    (100, &["--groups", "on", "--backend", "valkey"]),
    (300, &["--groups", "on", "--relays", "3"]),
];

#[test]
fn model_checker_fixed_seeds_find_no_violation() {
    let bin =
        relay_binary().unwrap_or_else(|why| panic!("the model checker needs the relay: {why}"));
    let mut failures = Vec::new();
    for (seed, pins) in CHECK_SET {
        let seed = seed.to_string();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
        cmd.args([
            "check",
            "--seed",
            &seed,
            "--histories",
            "1",
            "--steps",
            "30",
        ])
        .args(["--shrink-runs", "0", "--quiet", "--json"])
        .arg("--relay-bin")
        .arg(&bin)
        .args(*pins);
        let out = cmd.output().expect("loadgen runs");
        let code = out.status.code().unwrap_or(-1);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --seed {seed}: no JSON summary ({e}); exit {code}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(
            n(&report, "histories"),
            1,
            "seed {seed} {pins:?} did not run: {report}"
        );
        if code != 0 {
            failures.push(format!(
                "seed {seed} {}: {}",
                pins.join(" "),
                report["failures"][0]["violations"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixed histories failed:\n{}",
        failures.len(),
        CHECK_SET.len(),
        failures.join("\n")
    );
}

/// `length` of a topic on a relay (`GET /api/v1/topics/{topic}`), 0 if it has none.
fn topic_length(url: &str, topic: &str) -> u64 {
    use std::io::{Read, Write};
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(authority).expect("connect to the relay");
    write!(
        conn,
        "GET /api/v1/topics/{topic} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["length"].as_u64())
        .unwrap_or(0)
}

/// `--publish-url`: publishes go to those relays (closed loop: connections spread over
/// them), subscribers stay on `--url`, and with several, delivery latency is split by the URL
/// each message was published through (open loop: messages alternate between them).
#[test]
fn publish_urls_spread_publishes_and_split_delivery_latency() {
    let (a, b) = (test_relay(), test_relay());
    let topic_prefix = format!("spread-{}", std::process::id());
    let both = format!("{},{}", a.url, b.url);
    let short = ["--duration", "1s", "--warmup", "300ms"];
    let (code, r) = loadgen(
        &a.url,
        &[
            &[
                "publish",
                "--publish-url",
                &both,
                "--connections",
                "4",
                "--topic-prefix",
                &topic_prefix,
            ][..],
            &short,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "publish over two relays: {r}");
    assert_accounting("publish over two relays", &r);
    assert_eq!(r["publish_urls"].as_array().map(Vec::len), Some(2), "{r}");
    let topic = format!("{topic_prefix}-0");
    let (on_a, on_b) = (topic_length(&a.url, &topic), topic_length(&b.url, &topic));
    assert!(
        on_a > 0 && on_b > 0,
        "both relays got publishes: {on_a}, {on_b}"
    );
    assert!(on_a + on_b >= n(&r, "acknowledged"), "{on_a} + {on_b}: {r}");

    // Delivery split by publish URL: the same relay under two spellings, so every message
    // reaches the subscriber (memory relays share nothing).
    let same_relay_twice = format!("{0},{0}/", a.url);
    let (code, r) = loadgen(
        &a.url,
        &[
            &[
                "e2e",
                "--publish-url",
                &same_relay_twice,
                "--subscribers",
                "2",
                "--rate",
                "400",
                "--connections",
                "4",
                "--verify",
            ][..],
            &short,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "e2e over two publish URLs: {r}");
    assert_accounting("e2e over two publish URLs", &r);
    assert_clean_delivery("e2e over two publish URLs", &r);
    let d = &r["delivery"];
    let by_url = d["latency_by_publish_url"]
        .as_array()
        .unwrap_or_else(|| panic!("per-URL latency: {d}"));
    assert_eq!(by_url.len(), 2, "{d}");
    let counts: Vec<u64> = by_url.iter().map(|u| n(&u["latency"], "count")).collect();
    // Messages alternate exactly, so the two halves differ by at most one per subscriber.
    assert!(
        counts[0].abs_diff(counts[1]) <= 2 && counts[0] > 0,
        "{counts:?}: {d}"
    );
    assert_eq!(
        counts[0] + counts[1],
        n(&d["latency"], "count"),
        "the split covers every measured delivery: {d}"
    );
}
