//! Fault injection between the relay and Valkey, and crashes under publish + subscribe load.
//!
//! The relay talks to Valkey through [`FaultProxy`], so a test can make Valkey slow, stall the
//! connection without closing it, cut it in the middle of a pipeline's replies, swallow
//! replies, or restart or SIGKILL Valkey itself, while keep-alive publishers and a WebSocket
//! consumer run. Every scenario asserts the same contract:
//! - no request hangs: each is answered within about two command timeouts;
//! - a failed publish is a `503 SERVICE_UNAVAILABLE` JSON error with `Retry-After`;
//! - once the fault heals, the same relay process serves 201s again;
//! - every message answered 201 is in its Valkey stream with the published payload, and the
//!   consumer saw every one of them once, in id order.
//!
//! A publish whose XADD reached Valkey but whose reply did not come back is answered 503 and
//! is in the stream all the same (at-least-once: a producer that retries stores it twice);
//! each scenario prints how many such entries it found. Valkey-side crash and restart without
//! the proxy, and `/ready` during an outage, are in `valkey_resilience.rs`.
//!
//! Owns: the proxy's own tests, the Valkey fault scenarios, and the relay SIGKILL under
//! publish + subscribe load with consumers resuming from their last id.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy};
use common::valkey::{
    assert_acked_in_valkey, await_ready, payloads_by_id, stream_key, PublishLoad, StreamAudit,
    ValkeyOpts, ValkeyServer, WorkerOutcome,
};
use common::ws::{WsClient, WsEvent};
use common::{eventually, parse_id, topics_per_shard, Conn, Server};
use serde_json::{json, Value};

/// Short Valkey timeouts, so a fault turns into 503s within about a second.
const FAULT_CONFIG: &str = "valkey:\n  connect_timeout: 500ms\n  command_timeout: 500ms\n";

/// The longest a publish may take under any fault: queued up to one command timeout, then one
/// round trip bounded by another (see `src/valkey/client.rs`), so about 1 s, plus slack for a
/// 2-core machine running other test binaries (4 s outliers were seen at load average 12). A
/// request left hanging is caught separately: it hits the client's 10 s read timeout.
const MAX_FAULT_LATENCY: Duration = Duration::from_secs(6);

/// Failed publishes a lasting fault must cause before it is healed: two per publisher, so the
/// fault outlasts a first failure and the retry after it.
const LASTING_FAULT_FAILURES: u64 = 8;

/// How long a scenario waits for something that takes milliseconds when things work.
const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The proxy's own tests, against an echo server: a proxy that forwarded nothing, or
// everything regardless of the fault, would make the scenarios below pass vacuously.

/// A TCP echo server on a free port; its threads end when their clients close.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("echo address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the proxy");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// What a read within `within` got: bytes, end of stream, or nothing yet.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Bytes(Vec<u8>),
    Closed,
    Nothing,
}

fn read_within(stream: &mut TcpStream, within: Duration) -> Got {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => Got::Closed,
        Ok(n) => Got::Bytes(buf[..n].to_vec()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Got::Nothing,
        Err(_) => Got::Closed,
    }
}

/// Reads until `n` bytes arrived (or panics after `within`).
fn read_exactly(stream: &mut TcpStream, n: usize, within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {got:?} of {n} bytes within {within:?}"
        );
        match read_within(stream, left) {
            Got::Bytes(b) => got.extend(b),
            Got::Closed => panic!("closed after {got:?}"),
            Got::Nothing => {}
        }
    }
    got
}

#[test]
fn proxy_passes_delays_stalls_and_drops_as_told() {
    let proxy = FaultProxy::start(echo_server());
    let mut client = connect(proxy.addr);
    client.write_all(b"ping").expect("write");
    assert_eq!(read_exactly(&mut client, 4, PATIENCE), b"ping");
    // The counters move after each write, so possibly just after the echo arrived.
    assert!(eventually(PATIENCE, || proxy.bytes_to_client() == 4
        && proxy.bytes_to_upstream() == 4));
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.open_connections(), 1);

    // Delay: held both ways, so the echo takes at least twice the delay.
    let delay = Duration::from_millis(200);
    proxy.set(Fault::Delay(delay));
    let sent = Instant::now();
    client.write_all(b"slow").expect("write");
    assert_eq!(read_exactly(&mut client, 4, PATIENCE), b"slow");
    assert!(
        sent.elapsed() >= 2 * delay,
        "echo took {:?}",
        sent.elapsed()
    );

    // Stall: nothing moves, nothing closes; healing delivers what was held.
    proxy.set(Fault::Stall);
    client.write_all(b"held").expect("write");
    assert_eq!(
        read_within(&mut client, Duration::from_millis(300)),
        Got::Nothing
    );
    assert_eq!(proxy.bytes_to_upstream(), 8);
    proxy.set(Fault::Pass);
    assert_eq!(read_exactly(&mut client, 4, PATIENCE), b"held");

    // DropReplies: the request reaches upstream, its answer is thrown away.
    proxy.set(Fault::DropReplies);
    client.write_all(b"lost").expect("write");
    assert!(eventually(PATIENCE, || proxy.bytes_dropped() == 4));
    assert_eq!(
        read_within(&mut client, Duration::from_millis(100)),
        Got::Nothing
    );
    proxy.set(Fault::Pass);
    client.write_all(b"back").expect("write");
    assert_eq!(read_exactly(&mut client, 4, PATIENCE), b"back");
}

#[test]
fn proxy_cuts_connections_and_refuses_without_upstream() {
    let proxy = FaultProxy::start(echo_server());
    let mut first = connect(proxy.addr);
    let mut second = connect(proxy.addr);
    for c in [&mut first, &mut second] {
        c.write_all(b"hi").expect("write");
        assert_eq!(read_exactly(c, 2, PATIENCE), b"hi");
    }
    assert_eq!(proxy.cut(), 2);
    for c in [&mut first, &mut second] {
        assert_eq!(read_within(c, PATIENCE), Got::Closed);
    }
    assert_eq!(proxy.open_connections(), 0);

    // A cut in the middle of a reply: part of it arrives, then the end of the stream.
    let mut third = connect(proxy.addr);
    proxy.cut_mid_reply();
    third.write_all(&[b'x'; 100]).expect("write");
    let mut got = 0;
    loop {
        match read_within(&mut third, PATIENCE) {
            Got::Bytes(b) => got += b.len(),
            Got::Closed => break,
            Got::Nothing => panic!("no close after a mid-reply cut"),
        }
    }
    assert!(got < 100, "the whole reply ({got} bytes) got through");
    assert_eq!(proxy.cuts(), 3);
    // New connections work after cuts.
    let mut fourth = connect(proxy.addr);
    fourth.write_all(b"ok").expect("write");
    assert_eq!(read_exactly(&mut fourth, 2, PATIENCE), b"ok");

    // Upstream gone: a client is closed at once, not left hanging.
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let orphan = FaultProxy::start(gone);
    let mut c = connect(orphan.addr);
    assert_eq!(read_within(&mut c, PATIENCE), Got::Closed);
    assert_eq!(orphan.upstream_refused(), 1);
}

// ---------------------------------------------------------------------------------------------
// Consumers that survive a relay crash: they reconnect and resume from the last id they saw.

/// One delivered message.
#[derive(Clone, Debug)]
struct Delivered {
    topic: String,
    id: String,
    payload: Value,
}

/// What a consumer thread shares with the test.
#[derive(Default)]
struct ConsumerState {
    received: Mutex<Vec<Delivered>>,
    /// Connections (or polls) that failed and were started again with the last ids seen.
    resumes: AtomicU64,
    /// `gap` signals (never expected here: nothing is trimmed).
    gaps: Mutex<Vec<Value>>,
    /// Set once the first subscription is confirmed.
    subscribed: AtomicBool,
    stop: AtomicBool,
}

impl ConsumerState {
    fn last_ids(&self) -> HashMap<String, String> {
        let mut last = HashMap::new();
        for d in self.received.lock().expect("consumer lock").iter() {
            last.insert(d.topic.clone(), d.id.clone());
        }
        last
    }

    fn record(&self, m: &Value) {
        self.received
            .lock()
            .expect("consumer lock")
            .push(Delivered {
                topic: m["topic"].as_str().expect("topic").to_string(),
                id: m["message_id"].as_str().expect("message_id").to_string(),
                payload: m["payload"].clone(),
            });
    }
}

/// A consumer thread (WebSocket or long-poll) over some topics.
struct Consumer {
    kind: &'static str,
    state: Arc<ConsumerState>,
    handle: Option<JoinHandle<()>>,
}

impl Consumer {
    /// A WebSocket consumer. Subscribes with `"earliest"` for topics it has seen nothing of
    /// and with the last id for the others, again after every lost connection.
    fn websocket(addr: SocketAddr, topics: &[String]) -> Consumer {
        let state = Arc::new(ConsumerState::default());
        let topics = topics.to_vec();
        let shared = state.clone();
        let handle = std::thread::spawn(move || ws_consume(addr, &topics, &shared));
        Consumer::started("websocket", state, handle)
    }

    /// A long-poll consumer: `since` holds the last id seen per topic.
    fn long_poll(addr: SocketAddr, topics: &[String]) -> Consumer {
        let state = Arc::new(ConsumerState::default());
        let topics = topics.to_vec();
        let shared = state.clone();
        let handle = std::thread::spawn(move || poll_consume(addr, &topics, &shared));
        Consumer::started("long-poll", state, handle)
    }

    fn started(kind: &'static str, state: Arc<ConsumerState>, handle: JoinHandle<()>) -> Consumer {
        let consumer = Consumer {
            kind,
            state,
            handle: Some(handle),
        };
        assert!(
            eventually(PATIENCE, || consumer
                .state
                .subscribed
                .load(Ordering::Relaxed)),
            "{kind} consumer did not subscribe"
        );
        consumer
    }

    /// Waits until every acked id was delivered, then stops the thread and asserts, per
    /// topic: ids strictly increasing (so none twice), every acknowledged id among them, and
    /// each delivered message in the stream with the payload delivered. Returns how many
    /// messages were delivered.
    fn finish(mut self, outcomes: &[WorkerOutcome], valkey: &ValkeyServer) -> usize {
        let acked: HashSet<&str> = outcomes
            .iter()
            .flat_map(|o| o.acked.iter().map(|(_, id)| id.as_str()))
            .collect();
        let all_in = eventually(PATIENCE, || {
            let received = self.state.received.lock().expect("consumer lock");
            let seen: HashSet<&str> = received.iter().map(|d| d.id.as_str()).collect();
            acked.iter().all(|id| seen.contains(id))
        });
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        let received = self.state.received.lock().expect("consumer lock").clone();
        let gaps = self.state.gaps.lock().expect("consumer lock").clone();
        assert!(gaps.is_empty(), "{}: unexpected gaps {gaps:?}", self.kind);
        for out in outcomes {
            let mine: Vec<&Delivered> = received.iter().filter(|d| d.topic == out.topic).collect();
            for pair in mine.windows(2) {
                assert!(
                    parse_id(&pair[0].id) < parse_id(&pair[1].id),
                    "{} consumer of {}: {} then {} (duplicate or out of order)",
                    self.kind,
                    out.topic,
                    pair[0].id,
                    pair[1].id
                );
            }
            let ids: HashSet<&str> = mine.iter().map(|d| d.id.as_str()).collect();
            let missing: Vec<&String> = out
                .acked
                .iter()
                .map(|(_, id)| id)
                .filter(|id| !ids.contains(id.as_str()))
                .collect();
            assert!(
                all_in && missing.is_empty(),
                "{} consumer of {}: {} of {} acknowledged messages never delivered, first {:?}",
                self.kind,
                out.topic,
                missing.len(),
                out.acked.len(),
                missing.first()
            );
            let stored = payloads_by_id(&valkey.xrange(&stream_key(&out.topic)));
            for d in &mine {
                assert_eq!(
                    stored.get(&d.id),
                    Some(&d.payload),
                    "{} consumer of {}: delivered {} is not in the stream as delivered",
                    self.kind,
                    out.topic,
                    d.id
                );
            }
        }
        received.len()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

fn ws_consume(addr: SocketAddr, topics: &[String], state: &ConsumerState) {
    let mut first = true;
    while !state.stop.load(Ordering::Relaxed) {
        let Ok(mut ws) = WsClient::try_connect_with(addr, &[], None) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if !first {
            state.resumes.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let last = state.last_ids();
        let offset: serde_json::Map<String, Value> = topics
            .iter()
            .map(|t| {
                let from = last.get(t).map_or("earliest", String::as_str);
                (t.clone(), json!(from))
            })
            .collect();
        let subscribe = json!({"type": "subscribe", "topics": topics, "offset": offset});
        if ws
            .socket
            .send(tungstenite::Message::text(subscribe.to_string()))
            .is_err()
        {
            continue;
        }
        while !state.stop.load(Ordering::Relaxed) {
            match ws.next_event(Duration::from_millis(50)) {
                WsEvent::Json(v) => match v["type"].as_str() {
                    Some("message") => state.record(&v),
                    Some("subscribed") => state.subscribed.store(true, Ordering::Relaxed),
                    Some("gap") => state.gaps.lock().expect("consumer lock").push(v),
                    _ => panic!("unexpected frame {v}"),
                },
                WsEvent::Ping | WsEvent::Timeout => {}
                WsEvent::Close(_) | WsEvent::Gone(_) => break,
            }
        }
    }
}

fn poll_consume(addr: SocketAddr, topics: &[String], state: &ConsumerState) {
    let mut conn: Option<Conn> = None;
    let mut failed = false;
    while !state.stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::try_connect(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        // Topics without an id in `since` start at their oldest message.
        let body = json!({"topics": topics, "since": state.last_ids(), "timeout": 1});
        match c.try_request("POST", "/messages/poll", Some(body.to_string().as_bytes())) {
            Ok(resp) if resp.status == 200 => {
                if failed {
                    state.resumes.fetch_add(1, Ordering::Relaxed);
                    failed = false;
                }
                state.subscribed.store(true, Ordering::Relaxed);
                for m in resp.json()["messages"].as_array().expect("messages") {
                    state.record(m);
                }
            }
            // A 503 while the relay starts, or a dead connection: poll again.
            Ok(_) | Err(_) => {
                failed = true;
                conn = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fault scenarios.

/// The relay's connections to Valkey: per shard (2), one pipelined connection and the
/// pub/sub connection of the cross-relay feed.
const RELAY_CONNECTIONS: usize = 4;

/// Valkey, the proxy in front of it, and a relay that reaches Valkey only through the proxy.
struct Rig {
    valkey: ValkeyServer,
    proxy: FaultProxy,
    relay: Server,
}

impl Rig {
    fn start(valkey_opts: ValkeyOpts) -> Rig {
        let valkey = ValkeyServer::start(valkey_opts);
        let upstream: SocketAddr = format!("{}:{}", valkey.host(), valkey.port)
            .parse()
            .expect("valkey address");
        let proxy = FaultProxy::start(upstream);
        let port = proxy.port().to_string();
        let relay = valkey.start_relay(FAULT_CONFIG, &[("VALKEY_PORT", &port)]);
        // One pipelined and one pub/sub connection per shard, all through the proxy.
        assert!(
            eventually(PATIENCE, || proxy.open_connections() == RELAY_CONNECTIONS),
            "the relay's shards did not connect through the proxy"
        );
        Rig {
            valkey,
            proxy,
            relay,
        }
    }
}

/// Four topic names, two owned by each of the relay's two shards.
fn four_topics(prefix: &str) -> Vec<String> {
    let mut names = topics_per_shard(&format!("{prefix}-a"), 2);
    names.extend(topics_per_shard(&format!("{prefix}-b"), 2));
    names
}

/// What one scenario observed, printed as a row of the report's table.
struct Observed {
    fault: &'static str,
    outcomes: Vec<WorkerOutcome>,
    audits: Vec<StreamAudit>,
    /// From healing the fault until every publisher had 201s again.
    recovery: Duration,
    delivered: usize,
}

impl Observed {
    fn print(&self) {
        let sum = |f: fn(&WorkerOutcome) -> u64| self.outcomes.iter().map(f).sum::<u64>();
        let max_latency = self
            .outcomes
            .iter()
            .map(|o| o.max_latency)
            .max()
            .unwrap_or_default();
        eprintln!(
            "FAULT {:<22} acked {:>6}  503 {:>4}  conn-errors {:>3}  max-latency {:>5} ms  \
             in-stream {:>6}  applied-unacked {:>3}  duplicates {}  recovery {:>5} ms  \
             ws-delivered {}",
            self.fault,
            sum(|o| o.acked.len() as u64),
            sum(|o| o.unavailable),
            sum(|o| o.conn_errors),
            max_latency.as_millis(),
            self.audits.iter().map(|a| a.entries).sum::<usize>(),
            self.audits.iter().map(|a| a.applied_unacked).sum::<usize>(),
            self.audits.iter().map(|a| a.duplicates).sum::<usize>(),
            self.recovery.as_millis(),
            self.delivered,
        );
    }
}

/// Runs a publish load and a WebSocket consumer through `rig`, applies `inject` once the load
/// flows, waits for `min_failures` publishes to fail, applies `heal`, waits for every publisher to get 201s
/// again, and checks the contract of the module doc.
fn fault_scenario(
    fault: &'static str,
    valkey_opts: ValkeyOpts,
    min_failures: u64,
    inject: impl FnOnce(&mut Rig),
    heal: impl FnOnce(&mut Rig),
) -> Observed {
    let mut rig = Rig::start(valkey_opts);
    let names = four_topics(&format!("fault-{}", fault.replace(' ', "-")));
    let consumer = Consumer::websocket(rig.relay.addr, &names);
    let load = PublishLoad::start(rig.relay.addr, &names, 1_000_000, Duration::from_secs(60));
    assert!(
        eventually(PATIENCE, || load.min_acked() >= 20),
        "{fault}: load did not get going: min acked {}",
        load.min_acked()
    );

    let failures_before = load.failures();
    inject(&mut rig);
    assert!(
        eventually(PATIENCE, || load.failures()
            >= failures_before + min_failures),
        "{fault}: publishes kept succeeding ({} failures)",
        load.failures() - failures_before
    );

    heal(&mut rig);
    let healed = Instant::now();
    let acked_at_heal = load.min_acked();
    assert!(
        eventually(PATIENCE, || load.min_acked() > acked_at_heal + 10),
        "{fault}: publishes did not recover (min acked {} at heal, {} now)\nstderr:\n{}",
        acked_at_heal,
        load.min_acked(),
        rig.relay.stderr()
    );
    let recovery = healed.elapsed();
    let outcomes = load.finish();
    assert!(rig.relay.is_running(), "the relay was restarted");
    for out in &outcomes {
        assert!(
            out.max_latency < MAX_FAULT_LATENCY,
            "{fault}: {}: a request took {:?}\nstderr:\n{}",
            out.topic,
            out.max_latency,
            rig.relay.stderr()
        );
    }
    // `assert_acked_in_valkey` also asserts no request hung and every 503 was well formed.
    let audits = assert_acked_in_valkey(&rig.valkey, &outcomes);
    let delivered = consumer.finish(&outcomes, &rig.valkey);
    let observed = Observed {
        fault,
        outcomes,
        audits,
        recovery,
        delivered,
    };
    observed.print();
    observed
}

fn total_unavailable(observed: &Observed) -> u64 {
    observed.outcomes.iter().map(|o| o.unavailable).sum()
}

#[test]
fn valkey_slow_beyond_command_timeout_gives_503_then_recovers() {
    let observed = fault_scenario(
        "slow",
        ValkeyOpts::default(),
        LASTING_FAULT_FAILURES,
        |rig| {
            // Slower than usual but within the command timeout: publishes still succeed.
            rig.proxy.set(Fault::Delay(Duration::from_millis(50)));
            let before = rig.proxy.bytes_to_client();
            assert!(eventually(PATIENCE, || rig.proxy.bytes_to_client() > before + 1000));
            // Slower than the command timeout: they time out.
            rig.proxy.set(Fault::Delay(Duration::from_millis(800)));
        },
        |rig| rig.proxy.set(Fault::Pass),
    );
    assert!(total_unavailable(&observed) > 0, "no publish timed out");
}

#[test]
fn valkey_stalled_without_closing_times_out_then_recovers() {
    let observed = fault_scenario(
        "stall",
        ValkeyOpts::default(),
        LASTING_FAULT_FAILURES,
        |rig| rig.proxy.set(Fault::Stall),
        |rig| rig.proxy.set(Fault::Pass),
    );
    assert!(total_unavailable(&observed) > 0, "no publish timed out");
}

#[test]
fn connection_cut_mid_pipeline_loses_no_acknowledged_message() {
    fault_scenario(
        "cut mid-pipeline",
        ValkeyOpts::default(),
        // A cut fails only what is in flight at that instant.
        1,
        |rig| {
            // One cut inside a pipeline's replies, then every connection at once, twice.
            let cuts = rig.proxy.cuts();
            rig.proxy.cut_mid_reply();
            assert!(eventually(PATIENCE, || rig.proxy.cuts() > cuts));
            for _ in 0..2 {
                assert!(eventually(PATIENCE, || {
                    rig.proxy.open_connections() == RELAY_CONNECTIONS
                }));
                let before = rig.proxy.bytes_to_client();
                assert!(eventually(PATIENCE, || rig.proxy.bytes_to_client() > before));
                rig.proxy.cut();
            }
        },
        |_| {},
    );
}

#[test]
fn valkey_replies_dropped_give_503_and_no_acknowledged_loss() {
    let observed = fault_scenario(
        "drop replies",
        ValkeyOpts::default(),
        LASTING_FAULT_FAILURES,
        // From the next publish (a `pulsar_append` call) on: a pipeline in flight at that
        // instant may hold only the relay's probes and reads, whose loss proves nothing about
        // appends.
        |rig| rig.proxy.drop_replies_from_next(b"pulsar_append"),
        |rig| rig.proxy.set(Fault::Pass),
    );
    assert!(total_unavailable(&observed) > 0, "no publish failed");
    // The XADDs whose replies were dropped were applied all the same.
    let applied: usize = observed.audits.iter().map(|a| a.applied_unacked).sum();
    assert!(applied > 0, "no unacknowledged XADD reached Valkey");
}

#[test]
fn valkey_restarted_behind_the_proxy_then_recovers() {
    fault_scenario(
        "valkey restart",
        ValkeyOpts::default(),
        LASTING_FAULT_FAILURES,
        |rig| rig.valkey.stop(),
        |rig| rig.valkey.restart(),
    );
}

#[test]
fn valkey_kill9_with_fsync_always_loses_no_acknowledged_message() {
    fault_scenario(
        "valkey kill -9",
        ValkeyOpts {
            fsync_always: true,
            ..ValkeyOpts::default()
        },
        LASTING_FAULT_FAILURES,
        |rig| rig.valkey.kill9(),
        |rig| rig.valkey.restart(),
    );
}

// ---------------------------------------------------------------------------------------------
// The relay crashing.

#[test]
fn relay_kill9_under_publish_and_subscribe_load_resumes_exactly_once() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut relay = valkey.start_relay("", &[]);
    let names = four_topics("relay-crash");
    let ws = Consumer::websocket(relay.addr, &names);
    let poll = Consumer::long_poll(relay.addr, &names);
    let load = PublishLoad::start(relay.addr, &names, 1_000_000, Duration::from_secs(60));
    assert!(
        eventually(PATIENCE, || load.min_acked() >= 100),
        "load did not get going: min acked {}",
        load.min_acked()
    );
    relay.kill9();
    // Each worker notices the crash (a failed request or connect) before the restart.
    assert!(
        eventually(PATIENCE, || load.failures() >= 4 * 2),
        "the load did not notice the relay crash"
    );
    let acked_at_crash = load.min_acked();
    relay.start_again();
    await_ready(&relay, PATIENCE);
    assert!(
        eventually(PATIENCE, || load.min_acked() > acked_at_crash + 50),
        "publishes did not resume after the restart"
    );
    let outcomes = load.finish();
    let audits = assert_acked_in_valkey(&valkey, &outcomes);
    for consumer in [ws, poll] {
        let kind = consumer.kind;
        let resumes = consumer.state.resumes.load(Ordering::Relaxed);
        assert!(resumes >= 1, "the {kind} consumer never resumed");
        let delivered = consumer.finish(&outcomes, &valkey);
        eprintln!(
            "FAULT relay kill -9 ({kind}): acked {}  in-stream {}  applied-unacked {}  \
             delivered {delivered}  resumes {resumes}",
            outcomes.iter().map(|o| o.acked.len()).sum::<usize>(),
            audits.iter().map(|a| a.entries).sum::<usize>(),
            audits.iter().map(|a| a.applied_unacked).sum::<usize>(),
        );
    }
}

/// Regression: a WebSocket replay that failed (Valkey stalled) left the topic followed with
/// its live messages held back forever, and the resubscribe the error frame asks for was a
/// no-op (the topic was still followed): the consumer got nothing more for that topic.
#[test]
fn ws_resubscribe_after_replay_failed_replays_and_goes_live() {
    let mut rig = Rig::start(ValkeyOpts::default());
    let topic = "replay-fail";
    let mut conn = rig.relay.connect();
    let history: Vec<String> = (0..5)
        .map(|i| common::id_of(&conn.publish(topic, &format!(r#"{{"i":{i}}}"#))))
        .collect();
    drop(conn);
    // Restarted, the relay holds no history in memory: a replay must read Valkey.
    rig.relay.restart();
    await_ready(&rig.relay, PATIENCE);
    assert!(eventually(PATIENCE, || {
        rig.proxy.open_connections() == RELAY_CONNECTIONS
    }));

    rig.proxy.set(Fault::Stall);
    // History reads and long-polls that need Valkey fail within the command timeout.
    for (method, path, body) in [
        (
            "GET",
            format!("/api/v1/topics/{topic}/messages?order=asc"),
            None,
        ),
        (
            "POST",
            "/messages/poll".to_string(),
            Some(format!(
                r#"{{"topics":["{topic}"],"since":{{"{topic}":"0-0"}},"timeout":1}}"#
            )),
        ),
    ] {
        let started = Instant::now();
        let resp = rig
            .relay
            .connect()
            .request(method, &path, body.as_deref().map(str::as_bytes));
        common::valkey::assert_unavailable(&resp);
        assert!(
            started.elapsed() < MAX_FAULT_LATENCY,
            "{path}: {:?}",
            started.elapsed()
        );
    }
    let mut ws = WsClient::connect(rig.relay.addr);
    ws.subscribe(&[topic], Some(json!("earliest")));
    let failed = ws
        .try_recv(MAX_FAULT_LATENCY)
        .expect("no answer to a replay during the stall");
    assert_eq!(failed["type"], "error", "{failed}");
    assert_eq!(failed["code"], "REPLAY_FAILED", "{failed}");

    rig.proxy.set(Fault::Pass);
    await_ready(&rig.relay, PATIENCE);
    // As the error frame says: resubscribe (from the last id seen: none) to retry.
    ws.subscribe(&[topic], Some(json!("earliest")));
    let replayed: Vec<String> = ws.recv_messages(5).iter().map(common::id_of).collect();
    assert_eq!(replayed, history);
    let live = common::id_of(&rig.relay.publish(topic, r#"{"live":true}"#));
    assert_eq!(common::id_of(&ws.recv_type("message")), live);
}

/// A bulk publish whose pipeline's replies are cut halfway: the 207 accepts the messages
/// whose replies arrived (each in its stream with its payload) and rejects the rest with 503
/// results, on the same keep-alive connection; nothing hangs.
#[test]
fn bulk_publish_cut_mid_reply_accepts_only_what_is_stored() {
    let rig = Rig::start(ValkeyOpts::default());
    let names = four_topics("bulk-cut");
    let mut conn = rig.relay.connect();
    let mut accepted: HashMap<String, Vec<(String, Value)>> = HashMap::new();
    let mut rejected = 0;
    for round in 0..6 {
        let items: Vec<(String, Value)> = (0..200)
            .map(|i| (names[i % 4].clone(), json!({"r": round, "i": i})))
            .collect();
        let messages: Vec<Value> = items
            .iter()
            .map(|(t, p)| json!({"topic": t, "payload": p}))
            .collect();
        let body = json!({ "messages": messages }).to_string();
        if round % 2 == 1 {
            // On the connection carrying this bulk's appends, not whichever reads a reply first.
            rig.proxy.cut_mid_reply_after_next(b"pulsar_append");
        }
        let resp = conn.request("POST", "/api/v1/messages/bulk", Some(body.as_bytes()));
        assert_eq!(resp.status, 207, "{resp:?}");
        let results = resp.json()["results"].clone();
        let results = results.as_array().expect("results");
        assert_eq!(results.len(), items.len());
        for ((topic, payload), result) in items.into_iter().zip(results) {
            if result["status"] == "accepted" {
                let id = common::id_of(result);
                accepted.entry(topic).or_default().push((id, payload));
            } else {
                assert_eq!(result["error"], "SERVICE_UNAVAILABLE", "{result}");
                rejected += 1;
            }
        }
    }
    assert!(rejected > 0, "no cut landed inside a bulk's replies");
    for (topic, acked) in &accepted {
        let stored = payloads_by_id(&rig.valkey.xrange(&stream_key(topic)));
        for (id, payload) in acked {
            assert_eq!(
                stored.get(id),
                Some(payload),
                "{topic}: accepted {id} not stored"
            );
        }
    }
}
