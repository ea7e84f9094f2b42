//! Several relays on one Valkey behave as one relay (issue 12, item 1), with real processes:
//! three relays on one `valkey-server`, producers publishing to random relays, WebSocket, SSE
//! and long-poll consumers on every relay (some staying on one, some resuming on another relay
//! each time they reconnect), and the faults: a relay killed with `kill -9` under load and
//! started again, the pub/sub connections cut (`CLIENT KILL TYPE pubsub`), a writer that never
//! notifies (`valkey-cli XADD`), and `ack: buffered` on two relays writing one topic.
//!
//! The invariant, per consumer and topic: the ids received are exactly the topic's stream
//! entries, in stream order, each once (nothing is retained away in these tests, so the stream
//! holds every acknowledged message, plus any publish answered with an error whose XADD Valkey
//! applied anyway); every acknowledged message is in the stream with its acknowledged id; and
//! a history read from any relay returns the stream.
//!
//! Randomized from one seed (`MULTI_RELAY_SEED` replays a run); every wait awaits a condition.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::fleet::RelayFleet;
use common::sse::{SseClient, SseItem, SseRead};
use common::valkey::{stream_key, ValkeyOpts, ValkeyServer};
use common::ws::{WsClient, WsEvent};
use common::{eventually, Conn};
use serde_json::{json, Value};

/// How long every consumer may take to catch up with the streams once publishing stopped (a
/// loaded 2-core machine running three relays in debug builds).
const CATCH_UP: Duration = Duration::from_secs(60);

/// The seed of the randomized choices; `MULTI_RELAY_SEED=<n>` replays a failing run.
fn seed() -> u64 {
    std::env::var("MULTI_RELAY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

// ---------------------------------------------------------------------------------------
// Producers

/// What producers were told, by the tag each payload carries (`{"tag":"p<i>-<n>"}`).
#[derive(Default)]
struct Ledger {
    /// tag → (topic, acknowledged id).
    acked: Mutex<HashMap<String, (String, String)>>,
    /// Tags whose publish got no answer (the connection died) or a 503: stored or not.
    ambiguous: Mutex<HashSet<String>>,
}

impl Ledger {
    fn acked_count(&self) -> usize {
        self.acked.lock().expect("ledger").len()
    }
}

/// Producer threads publishing `per_producer` messages each to random `topics` through random
/// relays of `addrs`, one request at a time; a relay that refuses the connection is skipped.
struct Producers {
    ledger: Arc<Ledger>,
    handles: Vec<JoinHandle<()>>,
}

impl Producers {
    fn start(
        addrs: &[SocketAddr],
        topics: &[String],
        producers: usize,
        per_producer: usize,
        seed: u64,
    ) -> Producers {
        let ledger = Arc::new(Ledger::default());
        let handles = (0..producers)
            .map(|p| {
                let addrs = addrs.to_vec();
                let topics = topics.to_vec();
                let ledger = ledger.clone();
                std::thread::spawn(move || produce(p, &addrs, &topics, per_producer, seed, &ledger))
            })
            .collect();
        Producers { ledger, handles }
    }

    fn join(self) -> Arc<Ledger> {
        for handle in self.handles {
            handle.join().expect("producer thread");
        }
        self.ledger
    }
}

fn produce(
    p: usize,
    addrs: &[SocketAddr],
    topics: &[String],
    count: usize,
    seed: u64,
    ledger: &Ledger,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (p as u64).wrapping_mul(0x9e37_79b9));
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    for n in 0..count {
        let tag = format!("p{p}-{n}");
        let topic = &topics[rng.usize(..topics.len())];
        let body = common::publish_body(topic, &format!(r#"{{"tag":"{tag}"}}"#));
        let mut refused = 0;
        loop {
            let relay = rng.usize(..addrs.len());
            if let std::collections::hash_map::Entry::Vacant(slot) = conns.entry(relay) {
                match Conn::try_connect(addrs[relay]) {
                    Ok(conn) => {
                        slot.insert(conn);
                    }
                    Err(_) => {
                        // Down (killed): nothing was sent; try another relay.
                        refused += 1;
                        assert!(refused < 2_000, "no relay takes connections");
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                }
            }
            let conn = conns.get_mut(&relay).expect("just inserted");
            match conn.try_request("POST", "/api/v1/messages", Some(body.as_bytes())) {
                Ok(resp) if resp.status == 201 => {
                    let id = resp.json()["message_id"]
                        .as_str()
                        .expect("message_id")
                        .to_string();
                    ledger
                        .acked
                        .lock()
                        .expect("ledger")
                        .insert(tag.clone(), (topic.clone(), id));
                }
                Ok(resp) if resp.status == 503 => {
                    ledger.ambiguous.lock().expect("ledger").insert(tag.clone());
                }
                Ok(resp) => panic!("publish answered {}: {resp:?}", resp.status),
                Err(_) => {
                    // Sent, and the relay died: stored or not.
                    conns.remove(&relay);
                    ledger.ambiguous.lock().expect("ledger").insert(tag.clone());
                }
            }
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Consumers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    WebSocket,
    Sse,
    LongPoll,
}

/// What one consumer saw.
#[derive(Default, Debug)]
struct ConsumerLog {
    /// Per topic, (id, tag) in arrival order.
    received: BTreeMap<String, Vec<(String, String)>>,
    gaps: Vec<Value>,
    /// Streams (or polls) it opened.
    connections: usize,
    relays_used: HashSet<usize>,
    /// WebSocket close codes it was sent.
    close_codes: Vec<u16>,
}

impl ConsumerLog {
    fn record(&mut self, message: &Value) {
        let topic = message["topic"].as_str().expect("topic").to_string();
        let id = message["message_id"].as_str().expect("id").to_string();
        let tag = message["payload"]["tag"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.received.entry(topic).or_default().push((id, tag));
    }

    fn last_ids(&self) -> BTreeMap<String, String> {
        self.received
            .iter()
            .filter_map(|(t, v)| v.last().map(|(id, _)| (t.clone(), id.clone())))
            .collect()
    }
}

/// A consumer thread (see [`Consumer::start`]).
struct Consumer {
    name: String,
    log: Arc<Mutex<ConsumerLog>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// Where a consumer connects.
#[derive(Clone)]
struct Route {
    addrs: Vec<SocketAddr>,
    home: usize,
    /// After this many messages on one connection it leaves and resumes on the next relay.
    hop_every: Option<usize>,
}

impl Consumer {
    /// Starts a consumer of `topics` (from their beginning) and returns once it is registered
    /// (its first subscription confirmed, stream head read, or first poll answered), so
    /// everything published afterwards is owed to it.
    fn start(name: &str, transport: Transport, route: Route, topics: &[String]) -> Consumer {
        let log = Arc::new(Mutex::new(ConsumerLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = {
            let (log, stop, topics) = (log.clone(), stop.clone(), topics.to_vec());
            std::thread::spawn(move || match transport {
                Transport::WebSocket => consume_ws(&route, &topics, &log, &stop, ready_tx),
                Transport::Sse => consume_sse(&route, &topics, &log, &stop, ready_tx),
                Transport::LongPoll => consume_poll(&route, &topics, &log, &stop, ready_tx),
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("consumer {name} did not register"));
        Consumer {
            name: name.to_string(),
            log,
            stop,
            handle: Some(handle),
        }
    }

    fn count(&self, topic: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .received
            .get(topic)
            .map_or(0, Vec::len)
    }

    fn stop(mut self) -> (String, ConsumerLog) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            handle.join().expect("consumer thread");
        }
        let log = std::mem::take(&mut *self.log.lock().expect("log"));
        (self.name.clone(), log)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The next relay after `relay` for a hopping consumer, else `relay`.
fn next_relay(route: &Route, relay: usize, hop: bool) -> usize {
    if hop {
        (relay + 1) % route.addrs.len()
    } else {
        relay
    }
}

fn consume_ws(
    route: &Route,
    topics: &[String],
    log: &Mutex<ConsumerLog>,
    stop: &AtomicBool,
    ready: mpsc::Sender<()>,
) {
    let mut relay = route.home;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut ws) = WsClient::try_connect_with(route.addrs[relay], &[], None) else {
            // The relay is down: wait for it to come back (a retry pause, not a sync point).
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let last = {
            let mut log = log.lock().expect("log");
            log.connections += 1;
            log.relays_used.insert(relay);
            log.last_ids()
        };
        let offset: serde_json::Map<String, Value> = topics
            .iter()
            .map(|t| {
                let at = last.get(t).cloned().unwrap_or_else(|| "earliest".into());
                (t.clone(), Value::String(at))
            })
            .collect();
        ws.send_json(&json!({"type": "subscribe", "topics": topics, "offset": offset}));
        let mut on_this = 0usize;
        let hop = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match ws.next_event(Duration::from_millis(300)) {
                WsEvent::Json(v) => match v["type"].as_str() {
                    Some("subscribed") => {
                        let _ = ready.send(());
                    }
                    Some("message") => {
                        log.lock().expect("log").record(&v);
                        on_this += 1;
                        if route.hop_every.is_some_and(|n| on_this >= n) {
                            ws.close(1000, "hop");
                            break true;
                        }
                    }
                    Some("gap") => log.lock().expect("log").gaps.push(v),
                    Some("error") => panic!("error frame: {v}"),
                    _ => {}
                },
                WsEvent::Ping | WsEvent::Timeout => {}
                WsEvent::Close(code) => {
                    if let Some((code, _)) = code {
                        log.lock().expect("log").close_codes.push(code);
                    }
                    break false;
                }
                WsEvent::Gone(_) => break false,
            }
        };
        relay = next_relay(route, relay, hop);
    }
}

fn consume_sse(
    route: &Route,
    topics: &[String],
    log: &Mutex<ConsumerLog>,
    stop: &AtomicBool,
    ready: mpsc::Sender<()>,
) {
    let mut relay = route.home;
    let path = format!("/api/v1/events?topics={}", topics.join(","));
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        // Resume per topic from the last id seen (`0-0`: from its oldest), as EventSource
        // would with the last event id.
        let position = if first {
            None
        } else {
            let last = log.lock().expect("log").last_ids();
            Some(
                topics
                    .iter()
                    .map(|t| format!("{t}={}", last.get(t).map_or("0-0", String::as_str)))
                    .collect::<Vec<_>>()
                    .join(","),
            )
        };
        let headers: Vec<(&str, &str)> = position
            .as_deref()
            .map(|p| vec![("Last-Event-ID", p)])
            .unwrap_or_default();
        // `SseClient::open` panics on a refused connection: ask first (a relay killed in
        // between is still caught).
        let up = Conn::try_connect(route.addrs[relay]).is_ok();
        let opened = up
            .then(|| {
                std::panic::catch_unwind(|| SseClient::open(route.addrs[relay], &path, &headers))
                    .ok()
            })
            .flatten();
        let mut client = match opened {
            Some(Ok((client, _))) => client,
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        first = false;
        {
            let mut log = log.lock().expect("log");
            log.connections += 1;
            log.relays_used.insert(relay);
        }
        let _ = ready.send(());
        let mut on_this = 0usize;
        let hop = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match client.next_item(Duration::from_millis(300)) {
                SseRead::Item(SseItem::Event { event, data, .. }) => {
                    let v: Value = serde_json::from_str(&data).expect("event data is JSON");
                    match event.as_deref() {
                        Some("gap") => log.lock().expect("log").gaps.push(v),
                        _ => {
                            log.lock().expect("log").record(&v);
                            on_this += 1;
                            if route.hop_every.is_some_and(|n| on_this >= n) {
                                break true;
                            }
                        }
                    }
                }
                SseRead::Item(_) | SseRead::Timeout => {}
                SseRead::Eof => break false,
            }
        };
        relay = next_relay(route, relay, hop);
    }
}

fn consume_poll(
    route: &Route,
    topics: &[String],
    log: &Mutex<ConsumerLog>,
    stop: &AtomicBool,
    ready: mpsc::Sender<()>,
) {
    let mut relay = route.home;
    let mut since: BTreeMap<String, String> = BTreeMap::new();
    let mut polls = 0usize;
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        let body = json!({"topics": topics, "since": since, "timeout": 1, "limit": 100});
        let answer = Conn::try_connect(route.addrs[relay])
            .ok()
            .and_then(|mut conn| {
                conn.try_request("POST", "/messages/poll", Some(body.to_string().as_bytes()))
                    .ok()
            });
        {
            let mut log = log.lock().expect("log");
            log.connections += 1;
            log.relays_used.insert(relay);
        }
        polls += 1;
        let hop = route
            .hop_every
            .is_some_and(|n| polls.is_multiple_of(n.max(1)));
        match answer {
            Some(resp) if resp.status == 200 => {
                let v = resp.json();
                let mut log = log.lock().expect("log");
                for m in v["messages"].as_array().expect("messages") {
                    log.record(m);
                }
                for g in v["gaps"].as_array().into_iter().flatten() {
                    log.gaps.push(g.clone());
                }
                for (t, id) in v["next_offset"].as_object().expect("next_offset") {
                    since.insert(t.clone(), id.as_str().expect("offset id").to_string());
                }
            }
            Some(resp) if resp.status == 503 => {}
            Some(resp) => panic!("poll answered {}: {resp:?}", resp.status),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
        relay = next_relay(route, relay, hop);
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// A topic's stream as (id, tag), oldest first.
fn stream_of(valkey: &ValkeyServer, topic: &str) -> Vec<(String, String)> {
    valkey
        .xrange(&stream_key(topic))
        .into_iter()
        .map(|e| {
            let payload: Value =
                serde_json::from_str(e.field("payload").expect("payload field")).expect("json");
            let tag = payload["tag"].as_str().unwrap_or_default().to_string();
            (e.id, tag)
        })
        .collect()
}

/// Every acknowledged message is in its stream under its acknowledged id; every stream entry
/// was acknowledged or is an ambiguous publish (or, with `extra`, one written around the relays).
fn assert_streams_hold_the_acked(
    valkey: &ValkeyServer,
    topics: &[String],
    ledger: &Ledger,
    extra: &HashSet<String>,
) -> HashMap<String, Vec<(String, String)>> {
    let acked = ledger.acked.lock().expect("ledger");
    let ambiguous = ledger.ambiguous.lock().expect("ledger");
    let mut streams = HashMap::new();
    let mut stored: HashMap<String, (String, String)> = HashMap::new();
    for topic in topics {
        let stream = stream_of(valkey, topic);
        for (id, tag) in &stream {
            assert!(
                acked.contains_key(tag) || ambiguous.contains(tag) || extra.contains(tag),
                "{topic}: entry {id} ({tag}) was never published"
            );
            assert!(
                stored
                    .insert(tag.clone(), (topic.clone(), id.clone()))
                    .is_none(),
                "{tag} stored twice"
            );
        }
        streams.insert(topic.clone(), stream);
    }
    for (tag, (topic, id)) in acked.iter() {
        assert_eq!(
            stored.get(tag),
            Some(&(topic.clone(), id.clone())),
            "acknowledged {tag} ({topic} {id}) is not in its stream with that id"
        );
    }
    streams
}

/// Awaits every consumer holding as many messages of each topic as its stream, then stops
/// them and asserts each received exactly the stream, in order, once; no gap.
fn assert_consumers_got_the_streams(
    consumers: Vec<Consumer>,
    streams: &HashMap<String, Vec<(String, String)>>,
) -> Vec<(String, ConsumerLog)> {
    let caught_up = eventually(CATCH_UP, || {
        consumers
            .iter()
            .all(|c| streams.iter().all(|(t, s)| c.count(t) >= s.len()))
    });
    let logs: Vec<(String, ConsumerLog)> = consumers.into_iter().map(Consumer::stop).collect();
    for (name, log) in &logs {
        assert!(
            log.gaps.is_empty(),
            "{name}: unexpected gaps {:?}",
            log.gaps
        );
        for (topic, stream) in streams {
            let got = log.received.get(topic).cloned().unwrap_or_default();
            if got != *stream {
                let got_ids: Vec<&String> = got.iter().map(|(id, _)| id).collect();
                let want: Vec<&String> = stream.iter().map(|(id, _)| id).collect();
                let missing: Vec<&&String> =
                    want.iter().filter(|id| !got_ids.contains(id)).collect();
                let seen: HashSet<&&String> = got_ids.iter().collect();
                panic!(
                    "{name} on {topic} (caught up: {caught_up}; {} connections, relays {:?}, \
                     closes {:?}): {} received, {} in the stream ({} distinct received); \
                     missing {missing:?}\nreceived {got_ids:?}\nstream {want:?}",
                    log.connections,
                    log.relays_used,
                    log.close_codes,
                    got.len(),
                    stream.len(),
                    seen.len(),
                );
            }
        }
    }
    logs
}

/// Every relay's history of each topic, read oldest first page by page, is the stream (awaited:
/// a relay learns of another's publishes within a notification's travel).
fn assert_history_complete_everywhere(
    fleet: &RelayFleet,
    streams: &HashMap<String, Vec<(String, String)>>,
) {
    for i in 0..fleet.len() {
        let relay = fleet.relay(i);
        for (topic, stream) in streams {
            let want: Vec<String> = stream.iter().map(|(_, tag)| tag.clone()).collect();
            let mut got = Vec::new();
            let complete = eventually(Duration::from_secs(15), || {
                got = relay
                    .all_payloads(topic)
                    .iter()
                    .map(|p| p["tag"].as_str().unwrap_or_default().to_string())
                    .collect();
                got == want
            });
            assert!(
                complete,
                "relay {i}, {topic}: history {got:?}\nstream {want:?}"
            );
            // The newest page, newest first, as memory or Valkey serves it.
            let page = relay.read_topic(topic, "limit=10");
            let newest: Vec<String> = page["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| m["message_id"].as_str().unwrap_or_default().to_string())
                .collect();
            let want_newest: Vec<String> = stream
                .iter()
                .rev()
                .take(10)
                .map(|(id, _)| id.clone())
                .collect();
            assert_eq!(newest, want_newest, "relay {i}, {topic}: newest page");
        }
    }
}

/// One line per test run for the record: what was published and what the relays did.
fn report(fleet: &RelayFleet, ledger: &Ledger, logs: &[(String, ConsumerLog)]) {
    let deliveries: usize = logs
        .iter()
        .map(|(_, l)| l.received.values().map(Vec::len).sum::<usize>())
        .sum();
    let connections: usize = logs.iter().map(|(_, l)| l.connections).sum();
    let mut sync = BTreeMap::new();
    for i in 0..fleet.len() {
        if !fleet.relay(i).is_running() {
            continue;
        }
        for (name, n) in valkey_counters(fleet.relay(i)) {
            if name.contains("sync_") || name.contains("pubsub") || name.contains("spublish") {
                *sync.entry(name).or_insert(0) += n;
            }
        }
    }
    eprintln!(
        "seed {}: {} acknowledged, {} ambiguous; {} consumers, {deliveries} deliveries checked, \
         {connections} connections/polls; relays: {sync:?}",
        seed(),
        ledger.acked_count(),
        ledger.ambiguous.lock().expect("ledger").len(),
        logs.len(),
    );
}

/// `relay_valkey_*` counters of one relay, summed over its shards: `name{label="value"}` → n.
fn valkey_counters(relay: &common::Server) -> HashMap<String, u64> {
    let text = relay.get("/metrics").text();
    text.lines()
        .filter(|l| l.starts_with("relay_valkey_"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Every relay has a pub/sub connection open, and Valkey lists the same connections.
fn all_subscribed(valkey: &ValkeyServer, fleet: &RelayFleet) -> bool {
    let open: Vec<u64> = (0..fleet.len())
        .map(|i| pubsub_connections(fleet.relay(i)))
        .collect();
    let listed = valkey.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]);
    let listed = listed.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    open.iter().all(|n| *n >= 1) && listed == open.iter().sum::<u64>()
}

/// How many pub/sub connections to Valkey the relay has open now (over its shards): those
/// it made less those it lost.
fn pubsub_connections(relay: &common::Server) -> u64 {
    let counters = valkey_counters(relay);
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    count("relay_valkey_operations_total{op=\"pubsub_connect\"}")
        .saturating_sub(count("relay_valkey_errors_total{kind=\"pubsub_lost\"}"))
}

fn consumers_on_every_relay(
    addrs: &[SocketAddr],
    topics: &[String],
    hop_every: Option<usize>,
) -> Vec<Consumer> {
    let mut consumers = Vec::new();
    for (i, _) in addrs.iter().enumerate() {
        for transport in [Transport::WebSocket, Transport::Sse, Transport::LongPoll] {
            let route = Route {
                addrs: addrs.to_vec(),
                home: i,
                hop_every,
            };
            let hopping = if hop_every.is_some() { "hopping " } else { "" };
            consumers.push(Consumer::start(
                &format!("{hopping}{transport:?} from relay {i}"),
                transport,
                route,
                topics,
            ));
        }
    }
    consumers
}

// ---------------------------------------------------------------------------------------
// Tests

/// Three relays, producers on random relays; a WebSocket, an SSE and a long-poll consumer on
/// each relay, and as many that leave and resume on the next relay every few messages: each
/// gets every message of its topics exactly once, in stream order; every relay's history is
/// complete.
fn every_consumer_on_every_relay_gets_every_message(shards: usize) {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start_with_shards(&valkey, 3, shards, "", &[]);
    let addrs = fleet.addrs();
    let topics = common::topics(&format!("everywhere-{shards}"), 4);
    common::assert_spans_shards(&topics, shards as u64);
    let mut consumers = consumers_on_every_relay(&addrs, &topics, None);
    consumers.extend(consumers_on_every_relay(&addrs, &topics, Some(37)));
    let ledger = Producers::start(&addrs, &topics, 3, 200, seed()).join();
    assert!(ledger.ambiguous.lock().expect("ledger").is_empty());
    let streams = assert_streams_hold_the_acked(&valkey, &topics, &ledger, &HashSet::new());
    let logs = assert_consumers_got_the_streams(consumers, &streams);
    report(&fleet, &ledger, &logs);
    for (name, log) in &logs {
        if name.starts_with("hopping") {
            assert!(log.relays_used.len() > 1, "{name} never hopped: {log:?}");
        }
    }
    assert_history_complete_everywhere(&fleet, &streams);
}

#[test]
fn every_consumer_on_every_relay_gets_every_message_with_one_shard_each() {
    every_consumer_on_every_relay_gets_every_message(1);
}

#[test]
fn every_consumer_on_every_relay_gets_every_message_with_two_shards_each() {
    every_consumer_on_every_relay_gets_every_message(2);
}

/// A relay killed with `kill -9` under publish and subscribe load, then started again: the
/// consumers on the other relays are unaffected (every message once, in order), its own
/// consumers resume (on it, once it is back) with nothing lost or repeated, and publishes it
/// had in flight are the only ambiguous ones.
#[test]
fn kill9_of_one_relay_under_load_loses_nothing_anywhere() {
    let valkey = ValkeyServer::start(ValkeyOpts {
        fsync_always: true,
        ..ValkeyOpts::default()
    });
    let mut fleet = RelayFleet::start(&valkey, 3, "", &[]);
    let addrs = fleet.addrs();
    let topics = common::topics("kill9", 3);
    let consumers = consumers_on_every_relay(&addrs, &topics, None);
    let producers = Producers::start(&addrs, &topics, 3, 400, seed());
    let ledger = producers.ledger.clone();
    assert!(
        eventually(Duration::from_secs(30), || ledger.acked_count() >= 300),
        "load did not start"
    );
    fleet.kill9(1);
    let before = ledger.acked_count();
    assert!(
        eventually(Duration::from_secs(30), || ledger.acked_count()
            >= before + 200),
        "the other relays stopped taking publishes"
    );
    fleet.restart(1);
    let ledger = producers.join();
    let streams = assert_streams_hold_the_acked(&valkey, &topics, &ledger, &HashSet::new());
    let logs = assert_consumers_got_the_streams(consumers, &streams);
    report(&fleet, &ledger, &logs);
    let reconnected: usize = logs
        .iter()
        .filter(|(name, _)| name.contains("relay 1") && !name.contains("LongPoll"))
        .map(|(_, log)| log.connections)
        .sum();
    assert!(
        reconnected >= 4,
        "relay 1's consumers did not reconnect: {reconnected}"
    );
    assert_history_complete_everywhere(&fleet, &streams);
}

/// Notifications lost: the pub/sub connections of every relay are cut (`CLIENT KILL TYPE
/// pubsub`) three times while producers publish, and a writer that never notifies appends
/// with `valkey-cli XADD`. Every consumer still gets every entry (repaired on reconnect, and by
/// the safety net for the silent writer).
#[test]
fn lost_notifications_are_repaired() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 3, "", &[]);
    let addrs = fleet.addrs();
    let topics = common::topics("lost", 3);
    let consumers = consumers_on_every_relay(&addrs, &topics, None);
    let producers = Producers::start(&addrs, &topics, 2, 300, seed());
    let ledger = producers.ledger.clone();
    for round in 1..=3 {
        assert!(eventually(Duration::from_secs(30), || ledger.acked_count()
            >= round * 120));
        // Every relay is subscribed again after the last cut (its reconnect waits a backoff)
        // and Valkey sees the same connections, so this cut is a loss for each relay.
        assert!(
            eventually(Duration::from_secs(30), || all_subscribed(&valkey, &fleet)),
            "round {round}: a relay has no pub/sub connection to cut"
        );
        let killed = valkey.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert_ne!(killed.trim(), "0", "no pub/sub connection to cut");
    }
    let ledger = producers.join();
    // A writer that does not notify (the Python relay during a migration, a script): only the
    // safety net can find its entry. So first every relay subscribes again and its consumers
    // hold the stream: the repair a new subscription starts must not be what finds it.
    assert!(
        eventually(Duration::from_secs(30), || all_subscribed(&valkey, &fleet)),
        "a relay did not subscribe again"
    );
    let acked = assert_streams_hold_the_acked(&valkey, &topics, &ledger, &HashSet::new());
    assert!(
        eventually(CATCH_UP, || consumers
            .iter()
            .all(|c| acked.iter().all(|(t, s)| c.count(t) >= s.len()))),
        "the consumers did not catch up before the silent writes"
    );
    let mut extra = HashSet::new();
    for topic in &topics {
        let tag = format!("silent-{topic}");
        valkey.cli(&[
            "XADD",
            &stream_key(topic),
            "*",
            "payload",
            &format!(r#"{{"tag":"{tag}"}}"#),
            "timestamp",
            &common::valkey::rfc3339_now(),
        ]);
        extra.insert(tag);
    }
    let streams = assert_streams_hold_the_acked(&valkey, &topics, &ledger, &extra);
    let logs = assert_consumers_got_the_streams(consumers, &streams);
    report(&fleet, &ledger, &logs);
    for i in 0..fleet.len() {
        let counters = valkey_counters(fleet.relay(i));
        assert!(
            counters
                .get("relay_valkey_errors_total{kind=\"pubsub_lost\"}")
                .is_some_and(|n| *n >= 3),
            "relay {i}: {counters:?}"
        );
    }
    let finds: u64 = (0..fleet.len())
        .filter_map(|i| {
            valkey_counters(fleet.relay(i))
                .get("relay_valkey_operations_total{op=\"sync_safety_net_find\"}")
                .copied()
        })
        .sum();
    assert!(finds >= 1, "the safety net found nothing");
}

/// A topic written elsewhere is readable and followable at once on a relay that never saw it
/// (no waiting for the next SCAN): a WebSocket consumer subscribed from "last" on relay 0 gets
/// what relay 1 publishes next, and relay 0 lists and reads it.
#[test]
fn a_topic_written_elsewhere_is_followable_at_once() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 2, "", &[]);
    fleet.relay(1).publish("elsewhere", r#"{"tag":"first"}"#);
    let page = fleet.relay(0).read_topic("elsewhere", "order=asc");
    assert_eq!(page["messages"][0]["payload"]["tag"], "first", "{page}");
    let mut ws = WsClient::connect(fleet.addrs()[0]);
    ws.subscribe(&["elsewhere"], Some(json!("last")));
    let ack = fleet.relay(1).publish("elsewhere", r#"{"tag":"second"}"#);
    let got = ws.recv_type("message");
    assert_eq!(got["message_id"], ack["message_id"], "{got}");
    assert_eq!(got["payload"]["tag"], "second");
    let stats = fleet.relay(0).get("/api/v1/topics/elsewhere");
    assert_eq!(stats.status, 200, "{stats:?}");
    assert_eq!(stats.json()["length"], 2);
}

/// `ack: buffered` on two relays writing one topic: each chooses ids locally, which another
/// writer breaks. The relays notice (another relay's notification, a refused id), say so in an
/// error log line and `relay_valkey_errors_total{kind="buffered_other_writer"}`, and publish
/// the topic through the persisted path from then on. No acknowledged message is lost (one
/// whose id the other writer took first is stored under a new one, counted as
/// `buffered_reassigned`); after the degrade every 201 names the id the message is stored under.
#[test]
fn buffered_on_two_relays_writing_one_topic_degrades_to_persisted() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 2, "durability:\n  ack: buffered\n", &[]);
    let addrs = fleet.addrs();
    let topics = vec!["shared-buffered".to_string()];
    let ledger = Producers::start(&addrs, &topics, 4, 150, seed()).join();
    let degraded = |i: usize| {
        valkey_counters(fleet.relay(i))
            .get("relay_valkey_errors_total{kind=\"buffered_other_writer\"}")
            .copied()
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(20), || degraded(0) + degraded(1) >= 1),
        "neither relay noticed the other writer"
    );
    let noticed: Vec<usize> = (0..2).filter(|&i| degraded(i) >= 1).collect();
    for &i in &noticed {
        assert!(
            fleet
                .relay(i)
                .stderr()
                .contains("another writer on a topic this relay publishes with ack: buffered"),
            "relay {i} did not log the degrade"
        );
    }
    // Every acknowledged message is stored; one whose id was taken first under a new id.
    let reassigned: u64 = (0..2)
        .filter_map(|i| {
            valkey_counters(fleet.relay(i))
                .get("relay_valkey_errors_total{kind=\"buffered_reassigned\"}")
                .copied()
        })
        .sum();
    let stream = stream_of(&valkey, &topics[0]);
    let stored: HashMap<&str, &str> = stream
        .iter()
        .map(|(id, t)| (t.as_str(), id.as_str()))
        .collect();
    let acked = ledger.acked.lock().expect("ledger");
    let mut moved = 0u64;
    for (tag, (_, id)) in acked.iter() {
        let at = stored
            .get(tag.as_str())
            .unwrap_or_else(|| panic!("acknowledged {tag} ({id}) is not stored: LOST"));
        if at != id {
            moved += 1;
        }
    }
    assert_eq!(stream.len(), stored.len(), "a message stored twice");
    assert_eq!(moved, reassigned, "ids moved vs buffered_reassigned");
    eprintln!(
        "buffered, two writers: {} acknowledged, {} ambiguous, {} stored, degraded on relays \
         {noticed:?}, {reassigned} stored under a new id",
        acked.len(),
        ledger.ambiguous.lock().expect("ledger").len(),
        stream.len()
    );
    drop(acked);
    // From now on a degraded relay's 201s name the stored id.
    for &i in &noticed {
        for n in 0..20 {
            let tag = format!("after-{i}-{n}");
            let ack = fleet
                .relay(i)
                .publish(&topics[0], &format!(r#"{{"tag":"{tag}"}}"#));
            let id = ack["message_id"].as_str().expect("id").to_string();
            let stream = stream_of(&valkey, &topics[0]);
            assert!(
                stream.iter().any(|(sid, t)| *sid == id && *t == tag),
                "relay {i}: 201 for {tag} as {id}, which is not stored (yet)"
            );
        }
    }
}

/// The harness's `fleet` counters are per relay: make sure both relays of a pair report the
/// cross-relay machinery at work (a smoke test of the metrics the other tests read).
#[test]
fn sync_counters_move_with_cross_relay_traffic() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 2, "", &[]);
    let mut ws = WsClient::connect(fleet.addrs()[1]);
    ws.subscribe(&["counted"], Some(json!("last")));
    for n in 0..5 {
        fleet
            .relay(0)
            .publish("counted", &format!(r#"{{"tag":"{n}"}}"#));
    }
    assert_eq!(ws.recv_messages(5).len(), 5);
    // Each publish is one `pulsar_publish` call, which notifies the feed channel itself.
    let sent = valkey_counters(fleet.relay(0));
    assert!(
        sent.get("relay_valkey_operations_total{op=\"fcall\"}")
            .is_some_and(|n| *n >= 5),
        "{sent:?}"
    );
    let received = valkey_counters(fleet.relay(1));
    assert!(
        received
            .get("relay_valkey_operations_total{op=\"sync_repaired_message\"}")
            .is_some_and(|n| *n >= 5),
        "{received:?}"
    );
}

/// Not a check but the measurement of `docs/scaling.md`: publish→delivery latency to a
/// WebSocket consumer on the relay that accepted the publish (same relay) and on the other
/// one (cross relay), over the same messages in one run. Publishes alternate between the two
/// relays at a steady rate; latency runs from just before the request is sent to the frame's
/// arrival. Run in release:
/// `cargo nextest run --release --test multi_relay --run-ignored only --no-capture latency`.
#[test]
#[ignore]
fn cross_relay_delivery_latency_vs_same_relay() {
    let count: usize = std::env::var("LATENCY_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let rate: f64 = std::env::var("LATENCY_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500.0);
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 2, "", &[]);
    let addrs = fleet.addrs();
    let topic = "latency";
    let sent: Arc<Mutex<HashMap<usize, (usize, std::time::Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // One subscriber per relay; each records (message n, arrival).
    type Arrivals = Arc<Mutex<Vec<(usize, std::time::Instant)>>>;
    let arrivals: Vec<Arrivals> = addrs.iter().map(|_| Arrivals::default()).collect();
    let subscribers: Vec<JoinHandle<()>> = addrs
        .iter()
        .zip(&arrivals)
        .map(|(addr, got)| {
            let mut ws = WsClient::connect(*addr);
            ws.subscribe(&[topic], Some(json!("last")));
            let (stop, got) = (stop.clone(), got.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let WsEvent::Json(v) = ws.next_event(Duration::from_millis(200)) {
                        if v["type"] == "message" {
                            let n = v["payload"]["n"].as_u64().expect("n") as usize;
                            let at = std::time::Instant::now();
                            got.lock().expect("arrivals").push((n, at));
                        }
                    }
                }
            })
        })
        .collect();
    let mut conns: Vec<Conn> = addrs.iter().map(|a| Conn::connect(*a)).collect();
    let start = std::time::Instant::now();
    for n in 0..count {
        let at = start + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = at.checked_duration_since(std::time::Instant::now()) {
            // Pacing the open-loop publisher, not waiting for anything to happen.
            std::thread::sleep(wait);
        }
        let relay = n % 2;
        sent.lock()
            .expect("sent")
            .insert(n, (relay, std::time::Instant::now()));
        conns[relay].publish(topic, &format!(r#"{{"n":{n}}}"#));
    }
    let all_arrived = eventually(Duration::from_secs(30), || {
        arrivals
            .iter()
            .all(|got| got.lock().expect("arrivals").len() >= count)
    });
    stop.store(true, Ordering::Relaxed);
    for handle in subscribers {
        handle.join().expect("subscriber");
    }
    let arrivals: Vec<Vec<(usize, std::time::Instant)>> = arrivals
        .iter()
        .map(|got| std::mem::take(&mut *got.lock().expect("arrivals")))
        .collect();
    let sent = sent.lock().expect("sent");
    let mut same = Vec::new();
    let mut cross = Vec::new();
    for (subscriber_relay, got) in arrivals.iter().enumerate() {
        for (n, at) in got {
            let (published_on, sent_at) = sent[n];
            let micros = at.duration_since(sent_at).as_micros() as u64;
            if published_on == subscriber_relay {
                same.push(micros);
            } else {
                cross.push(micros);
            }
        }
    }
    let pct = |v: &mut Vec<u64>, p: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p) as usize]
    };
    let (s50, s99) = (pct(&mut same, 0.5), pct(&mut same, 0.99));
    let (c50, c99) = (pct(&mut cross, 0.5), pct(&mut cross, 0.99));
    eprintln!(
        "{count} messages at {rate}/s alternating over 2 relays: same relay p50 {s50} µs p99 \
         {s99} µs ({} deliveries); cross relay p50 {c50} µs p99 {c99} µs ({} deliveries); \
         cross/same p50 {:.2} p99 {:.2}",
        same.len(),
        cross.len(),
        c50 as f64 / s50 as f64,
        c99 as f64 / s99 as f64
    );
    assert!(all_arrived, "deliveries missing");
    assert_eq!(same.len() + cross.len(), 2 * count);
}

/// Messages another relay published and count retention trimmed before this relay read them:
/// this relay's consumers of the topic are made to resume (WebSocket close 4009, the SSE
/// stream ends, a parked long-poll is answered empty), and the resume reports the gap, as any
/// resume over trimmed messages does.
#[test]
fn messages_trimmed_before_another_relay_read_them_reach_its_consumers_as_gaps() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let config = "storage:\n  max_messages_per_topic: 20\n";
    let fleet = RelayFleet::start(&valkey, 2, config, &[]);
    let (a, b) = (fleet.relay(0), fleet.relay(1));
    let topic = "trimmed-away";
    let first = common::id_of(&a.publish(topic, r#"{"tag":"first"}"#));
    let mut ws = WsClient::connect(b.addr);
    ws.subscribe(&[topic], Some(json!({ topic: first })));
    let mut sse = SseClient::open_ok(
        b.addr,
        &format!("/api/v1/topics/{topic}/events"),
        &[("Last-Event-ID", &first)],
    );
    let poll = {
        let addr = b.addr;
        let since = first.clone();
        std::thread::spawn(move || {
            let body = json!({"topics": [topic], "since": {topic: since}, "timeout": 20});
            Conn::connect(addr).request("POST", "/messages/poll", Some(body.to_string().as_bytes()))
        })
    };
    // The poll is parked once relay B counts it.
    assert!(eventually(Duration::from_secs(10), || {
        b.get("/messages/poll/stats").json()["active_polls"] == 1
    }));
    // One bulk publish of 500 through relay A: `MAXLEN ~ 20` trims `first` and hundreds after
    // it before relay B reads them.
    let items: Vec<Value> = (0..500)
        .map(|n| json!({"topic": topic, "payload": {"tag": format!("bulk-{n}")}}))
        .collect();
    let resp = a.post_json(
        "/api/v1/messages/bulk",
        &json!({"messages": items}).to_string(),
    );
    assert_eq!(resp.status, 207, "{resp:?}");
    // WebSocket: closed with 4009 (after whatever was queued before it).
    let (code, _) = ws.expect_close(Duration::from_secs(20), 1000);
    assert_eq!(code, 4009);
    let mut ws = WsClient::connect(b.addr);
    ws.subscribe(&[topic], Some(json!({ topic: first })));
    let gap = ws.recv_type("gap");
    assert_eq!(gap["requested"], first.as_str(), "{gap}");
    assert_eq!(gap["reason"], "trimmed", "{gap}");
    let next = ws.recv_type("message");
    assert_eq!(
        next["message_id"], gap["oldest_available"],
        "{gap} then {next}"
    );
    // SSE: the stream ends; resumed from the same id it opens with the gap event.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ended = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match sse.next_item(left) {
            SseRead::Eof => break true,
            SseRead::Timeout => break false,
            SseRead::Item(_) => {}
        }
    };
    assert!(ended, "the SSE stream did not end");
    let mut sse = SseClient::open_ok(
        b.addr,
        &format!("/api/v1/topics/{topic}/events"),
        &[("Last-Event-ID", &first)],
    );
    let (_, event, data) = sse.next_event();
    assert_eq!(event, "gap", "{data}");
    assert_eq!(data["reason"], "trimmed", "{data}");
    // Long-poll: answered (without messages), and the poll from the same `since` gets the gap.
    let answered = poll.join().expect("poll thread");
    assert_eq!(answered.status, 200, "{answered:?}");
    let body = json!({"topics": [topic], "since": {topic: first}, "timeout": 1});
    let again = b.post_json("/messages/poll", &body.to_string()).json();
    assert_eq!(again["gaps"][0]["reason"], "trimmed", "{again}");
    let resyncs = valkey_counters(b)
        .get("relay_valkey_operations_total{op=\"sync_resync\"}")
        .copied();
    assert!(resyncs.is_some_and(|n| n >= 1), "{resyncs:?}");
}

/// Epochs (issue 12, item 5): a stream that loses its end behind the relays' back (here
/// `FLUSHALL`; a failover to a replica that missed the newest entries is the same for the
/// relays, see `valkey_sentinel.rs`) is never a silent rewind. The relay whose consumer saw the
/// lost messages cuts it off (4009); resumed, on either relay, from an id that vanished, the
/// consumer gets a gap with reason `rewound` and then what was published since, and new ids
/// never reuse the lost ones.
#[test]
fn a_stream_that_lost_its_end_is_reported_as_rewound_on_every_relay() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 2, "", &[]);
    let (a, b) = (fleet.relay(0), fleet.relay(1));
    let topic = "rewound";
    let mut ws = WsClient::connect(a.addr);
    ws.subscribe(&[topic], Some(json!("last")));
    let old: Vec<String> = (0..5)
        .map(|n| common::id_of(&a.publish(topic, &format!(r#"{{"tag":"old-{n}"}}"#))))
        .collect();
    let seen: Vec<String> = ws
        .recv_messages(5)
        .iter()
        .map(|m| m["message_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(seen, old);
    assert_eq!(valkey.cli(&["FLUSHALL"]).trim(), "OK");
    // The next publish (through the other relay) lands in a stream that does not hold what
    // the consumer saw.
    let fresh = common::id_of(&b.publish(topic, r#"{"tag":"new-0"}"#));
    let (code, _) = ws.expect_close(Duration::from_secs(20), 1000);
    assert_eq!(code, 4009, "the consumer of relay A must resume");
    for relay in [a, b] {
        let mut ws = WsClient::connect(relay.addr);
        ws.subscribe(&[topic], Some(json!({ topic: old[4] })));
        let gap = ws.recv_type("gap");
        assert_eq!(gap["reason"], "rewound", "{gap}");
        assert_eq!(gap["requested"], old[4].as_str(), "{gap}");
        let next = ws.recv_type("message");
        assert_eq!(next["message_id"], fresh.as_str(), "{gap} then {next}");
    }
    // History from before the loss tells the same; ids after it never go back.
    let later = common::id_of(&a.publish(topic, r#"{"tag":"new-1"}"#));
    assert!(common::parse_id(&later) > common::parse_id(&old[4]));
    assert!(common::parse_id(&fresh) > common::parse_id(&old[4]));
}

/// Bug (model checker seed 12019, three relays, retention 2 s): the stream sync skipped an
/// entry that was already due for removal when it read it (its ttl or the age retention ran
/// out before this relay learnt of it), with no gap: its live consumers went straight on to
/// the next entry. Now the consumers resume from their last id, where the catch-up reports
/// the expired gap. Here the entry comes from a writer that does not notify (only the safety
/// net finds it, seconds later) and carries a ttl that ran out before it was written.
#[test]
fn an_entry_due_before_a_relay_read_it_reaches_its_consumers_as_an_expired_gap() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let fleet = RelayFleet::start(&valkey, 1, "", &[]);
    let relay = fleet.relay(0);
    let topic = "due-unread";
    let first = common::id_of(&relay.publish(topic, r#"{"tag":"first"}"#));
    let mut ws = WsClient::connect(relay.addr);
    ws.subscribe(&[topic], Some(json!({ topic: first })));
    let ten_seconds_ago = common::valkey::rfc3339_from_ms(
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("ms")
            - 10_000,
    );
    let xadd = |tag: &str, timestamp: &str, ttl: Option<&str>| {
        let payload = format!(r#"{{"tag":"{tag}"}}"#);
        let mut args = vec![
            "XADD",
            "topic:due-unread:stream",
            "*",
            "payload",
            &payload,
            "timestamp",
            timestamp,
        ];
        if let Some(ttl) = ttl {
            args.extend(["ttl", ttl]);
        }
        valkey.cli(&args).trim().to_owned()
    };
    let due = xadd("due", &ten_seconds_ago, Some("1"));
    let after = xadd("after", &common::valkey::rfc3339_now(), None);
    assert!(common::parse_id(&due) < common::parse_id(&after));
    // Before the fix: `after` arrived live, `due` silently skipped.
    let (code, _) = ws.expect_close(Duration::from_secs(20), 1000);
    assert_eq!(
        code, 4009,
        "the consumer must resume over the expired entry"
    );
    let mut ws = WsClient::connect(relay.addr);
    ws.subscribe(&[topic], Some(json!({ topic: first })));
    let gap = ws.recv_type("gap");
    assert_eq!(gap["reason"], "expired", "{gap}");
    assert_eq!(gap["requested"], first.as_str(), "{gap}");
    let next = ws.recv_type("message");
    assert_eq!(next["message_id"], after.as_str(), "{gap} then {next}");
}
