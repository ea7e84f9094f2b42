//! Valkey Cluster with real processes: three masters with a replica each
//! (`tests/common/cluster.rs`), and a relay configured with nothing but one seed node
//! (`VALKEY_CLUSTER_NODES`).
//!
//! What is checked: topics spread over every master (each stream on the master serving its
//! slot, all of a topic's keys in one slot, as `CLUSTER KEYSLOT` and `CLUSTER COUNTKEYSINSLOT`
//! say), publish, history, resume and WebSocket delivery across them, idempotent publish, a
//! relay restarted over an existing cluster (discovery `SCAN`s every master); under publish and
//! WebSocket load, a slot migration of busy topics (held half-way, so `ASK` is followed, then
//! finished, so `MOVED` is) with no acknowledged message lost and nothing delivered twice or
//! out of order; and `kill -9` of a master under load, with `ack: replicated` (no
//! acknowledged message may be lost) and with `ack: persisted` (losses counted and printed).
//!
//! Each load scenario prints one `CLUSTER ...` line with its counts (`--nocapture` shows
//! them); `docs/scaling.md` quotes them.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cluster::{ClusterOpts, ValkeyCluster};
use common::resuming_consumer::ResumingConsumer;
use common::valkey::{assert_answered, await_ready, PublishLoad, WorkerOutcome};
use common::ws::WsClient;
use common::{eventually, RelayOpts, Server};
use serde_json::{json, Value};

/// Bounds every await of these tests; a failover takes seconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// Short Valkey timeouts so a publish caught in a failover is answered within seconds.
const PERSISTED: &str = "\
valkey:
  connect_timeout: 500ms
  command_timeout: 2s
";

/// As [`PERSISTED`], acknowledging only what the master's replica has too.
const REPLICATED: &str = "\
valkey:
  connect_timeout: 500ms
  command_timeout: 2s
durability:
  ack: replicated
  replicas: 1
  replica_timeout: 500ms
";

/// The stream key of a topic under the cluster-mode default template.
fn stream_key(topic: &str) -> String {
    format!("topic:{{{topic}}}:stream")
}

/// A 2-shard relay that knows only node `seed` of `cluster`; waits until ready.
fn relay_on(cluster: &ValkeyCluster, seed: usize, yaml: &str) -> Server {
    let relay = Server::start_opts(RelayOpts::new(yaml).env("STORAGE_BACKEND", "valkey").env(
        "VALKEY_CLUSTER_NODES",
        &cluster.node(seed).addr().to_string(),
    ));
    await_ready(&relay, PATIENCE);
    relay
}

/// The sum over shards of `relay_valkey_operations_total{op="<op>"}` (0 when absent).
fn operations(relay: &Server, op: &str) -> f64 {
    let series = format!("relay_valkey_operations_total{{op=\"{op}\"}}");
    relay
        .get("/metrics")
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
        .sum()
}

/// The sum over shards of `relay_valkey_errors_total{kind="<kind>"}` (0 when absent).
fn errors(relay: &Server, kind: &str) -> f64 {
    let series = format!("relay_valkey_errors_total{{kind=\"{kind}\"}}");
    relay
        .get("/metrics")
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
        .sum()
}

/// `n` topic names of `prefix` whose slots are served by every master, at least `per` each.
fn topics_on_every_master(cluster: &ValkeyCluster, prefix: &str, per: usize) -> Vec<String> {
    let masters = cluster.masters();
    let mut by_master: HashMap<usize, usize> = HashMap::new();
    let mut names = Vec::new();
    for i in 0.. {
        if masters
            .iter()
            .all(|m| by_master.get(m).copied().unwrap_or(0) >= per)
        {
            return names;
        }
        let name = format!("{prefix}-{i}");
        let owner = cluster.key_owner(&stream_key(&name));
        let n = by_master.entry(owner).or_insert(0);
        if *n < per {
            *n += 1;
            names.push(name);
        }
    }
    unreachable!()
}

/// The stream of `topic` as its slot's master holds it: entry ids.
fn stored_ids(cluster: &ValkeyCluster, topic: &str) -> Vec<String> {
    let key = stream_key(topic);
    let owner = cluster.key_owner(&key);
    cluster
        .node(owner)
        .xrange(&key)
        .into_iter()
        .map(|e| e.id)
        .collect()
}

#[test]
fn topics_spread_over_every_master_with_history_resume_ws_and_idempotency() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    let mut relay = relay_on(&cluster, 0, PERSISTED);
    let names = topics_on_every_master(&cluster, "spread", 3);
    assert_eq!(names.len(), 9);

    // A WebSocket consumer of every topic, subscribed before the publishes.
    let mut ws = WsClient::connect(relay.addr);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    ws.subscribe(&refs, None);

    let mut ids: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..5 {
        for name in &names {
            let v = relay.publish(name, &format!(r#"{{"round":{round}}}"#));
            ids.entry(name.clone())
                .or_default()
                .push(v["message_id"].as_str().expect("id").to_string());
        }
    }
    // Live delivery: every message, per topic in id order.
    let delivered = ws.recv_messages(names.len() * 5);
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for m in &delivered {
        seen.entry(m["topic"].as_str().expect("topic").to_string())
            .or_default()
            .push(m["message_id"].as_str().expect("id").to_string());
    }
    assert_eq!(seen, ids, "WebSocket delivery");

    // Each stream sits on the master serving its slot, with every key of the topic in that
    // slot (the meta hash shares the hash tag).
    let mut masters_used = HashSet::new();
    for name in &names {
        let key = stream_key(name);
        let slot = cluster.keyslot(&key);
        assert_eq!(slot, cluster.keyslot(&format!("topic:{{{name}}}:meta")));
        assert_eq!(
            slot,
            cluster.keyslot(name),
            "the hash tag is the topic name"
        );
        let owner = cluster.key_owner(&key);
        masters_used.insert(owner);
        assert_eq!(
            stored_ids(&cluster, name),
            ids[name],
            "{name} on node {owner}"
        );
        let in_slot = cluster
            .node(owner)
            .cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]);
        assert!(
            in_slot.trim().parse::<u64>().expect("count") >= 2,
            "{name}: stream and meta keys in slot {slot}: {in_slot}"
        );
    }
    assert_eq!(masters_used.len(), 3, "topics spread over every master");

    // History (served by the relay) and a WebSocket resume after the second message.
    let name = &names[4];
    let page = relay.read_topic(name, "order=asc&limit=100");
    let history: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["message_id"].as_str().expect("id"))
        .collect();
    assert_eq!(history, ids[name]);
    let mut resumed = WsClient::connect(relay.addr);
    resumed.subscribe(&[name], Some(json!({ name.as_str(): ids[name][1] })));
    let replay: Vec<String> = resumed
        .recv_messages(3)
        .iter()
        .map(|m| m["message_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(replay, ids[name][2..]);

    // Idempotent publish: a replay answers the first id and stores nothing.
    let body = common::publish_body(name, r#"{"keyed":1}"#);
    let mut conn = relay.connect();
    let keyed = |conn: &mut common::Conn| {
        let resp = conn.request_with(
            "POST",
            "/api/v1/messages",
            &[("Idempotency-Key", "cluster-key-1")],
            Some(body.as_bytes()),
        );
        assert!(resp.status == 201 || resp.status == 200, "{resp:?}");
        resp.json()["message_id"].as_str().expect("id").to_string()
    };
    let first = keyed(&mut conn);
    let again = keyed(&mut conn);
    assert_eq!(first, again, "a replay answers the first message id");
    assert_eq!(
        stored_ids(&cluster, name).len(),
        6,
        "the replay stored nothing"
    );

    // A restarted relay lists every topic (SCAN on every master) and serves their history
    // from the cluster.
    relay.restart();
    await_ready(&relay, PATIENCE);
    let listed = relay.get("/api/v1/topics");
    assert_eq!(listed.status, 200, "{listed:?}");
    let listed = listed.text();
    for name in &names {
        assert!(
            listed.contains(name.as_str()),
            "{name} not listed: {listed}"
        );
    }
    let page = relay.read_topic(&names[7], "order=asc&limit=100");
    assert_eq!(page["messages"].as_array().expect("messages").len(), 5);
    relay.publish(&names[7], r#"{"after":"restart"}"#);
    assert_eq!(stored_ids(&cluster, &names[7]).len(), 6);
}

#[test]
fn a_dead_first_seed_is_skipped_and_a_replica_seed_finds_every_master() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    let replica = cluster.replicas_of(cluster.masters()[1])[0];
    let dead = common::valkey::free_port();
    let seeds = format!("127.0.0.1:{dead},{}", cluster.node(replica).addr());
    let relay = Server::start_opts(
        RelayOpts::new(PERSISTED)
            .env("STORAGE_BACKEND", "valkey")
            .env("VALKEY_CLUSTER_NODES", &seeds),
    );
    await_ready(&relay, PATIENCE);
    for name in topics_on_every_master(&cluster, "seeds", 1) {
        let id = relay.publish(&name, "1")["message_id"]
            .as_str()
            .expect("id")
            .to_string();
        assert_eq!(stored_ids(&cluster, &name), [id], "{name}");
    }
    // Nothing was written to the replica by the relay: it is never a write target.
    let writes = cluster
        .node(replica)
        .info_field("stats", "total_writes_processed")
        .unwrap_or_default();
    let relay_clients = cluster
        .node(replica)
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains("name=pulsar-relay-shard") && !l.contains("-topology"))
        .count();
    assert_eq!(
        relay_clients, 0,
        "data connections to the replica (writes {writes})"
    );
}

#[test]
fn nodes_announcing_host_names_are_reached_by_name_also_after_moved() {
    // As deploy/cluster runs them: `CLUSTER SHARDS` endpoints and `MOVED`/`ASK` name hosts.
    let cluster = ValkeyCluster::start(ClusterOpts {
        extra_args: [
            "--cluster-announce-hostname",
            "localhost",
            "--cluster-preferred-endpoint-type",
            "hostname",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOpts::default()
    });
    let owner = cluster.key_owner("{probe}");
    let other = cluster
        .masters()
        .into_iter()
        .find(|&m| m != owner)
        .expect("another master");
    let moved = cluster.node(other).cli(&["SET", "{probe}", "x"]);
    let expected = format!("localhost:{}", cluster.node(owner).port);
    assert!(
        moved.contains("MOVED") && moved.contains(&expected),
        "redirections name hosts: {moved}"
    );
    let relay = Server::start_opts(
        RelayOpts::new(PERSISTED)
            .env("STORAGE_BACKEND", "valkey")
            .env(
                "VALKEY_CLUSTER_NODES",
                &format!("localhost:{}", cluster.node(0).port),
            ),
    );
    await_ready(&relay, PATIENCE);
    let names = topics_on_every_master(&cluster, "named", 1);
    for name in &names {
        relay.publish(name, "1");
    }
    // A slot moves: the relay learns the new owner from a MOVED naming `localhost:<port>`.
    let slot = cluster.keyslot(&stream_key(&names[0]));
    let from = cluster.slot_owner(slot);
    let to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master");
    cluster.migrate_slot(slot, to);
    relay.publish(&names[0], "2");
    for name in &names {
        let expected = if *name == names[0] { 2 } else { 1 };
        assert_eq!(stored_ids(&cluster, name).len(), expected, "{name}");
    }
    assert!(operations(&relay, "cluster_moved") >= 1.0);
}

/// Acknowledged messages missing from the cluster, and stored messages never acknowledged.
fn audit(cluster: &ValkeyCluster, outcomes: &[WorkerOutcome]) -> (usize, usize) {
    let mut lost = 0;
    let mut stored_unacked = 0;
    for out in outcomes {
        let stored: Vec<String> = stored_ids(cluster, &out.topic);
        let unique: HashSet<&str> = stored.iter().map(String::as_str).collect();
        assert_eq!(
            unique.len(),
            stored.len(),
            "{}: an id stored twice",
            out.topic
        );
        let acked: HashSet<&str> = out.acked.iter().map(|(_, id)| id.as_str()).collect();
        lost += acked.iter().filter(|id| !unique.contains(**id)).count();
        stored_unacked += unique.iter().filter(|id| !acked.contains(**id)).count();
    }
    (lost, stored_unacked)
}

fn sum(outcomes: &[WorkerOutcome], f: fn(&WorkerOutcome) -> u64) -> u64 {
    outcomes.iter().map(f).sum()
}

/// A producer that publishes with an `Idempotency-Key` per logical message and retries a
/// failed attempt (503, lost connection) with the same key until it is answered 201, as
/// `pulsar-relay-client` does. What it acknowledged must be stored exactly once.
struct KeyedPublisher {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<String>, u64)>,
}

impl KeyedPublisher {
    fn start(addr: SocketAddr, topic: &str) -> KeyedPublisher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let topic = topic.to_string();
        let handle = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut retries = 0u64;
            let mut conn: Option<common::Conn> = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let key = format!("keyed-{i}");
                let body = common::publish_body(&topic, &format!(r#"{{"k":{i}}}"#));
                let request = common::build_request(
                    "POST",
                    "/api/v1/messages",
                    &[("Idempotency-Key", &key)],
                    Some(body.as_bytes()),
                );
                // Every attempt of one logical message uses the same key.
                loop {
                    assert!(Instant::now() < deadline, "keyed publish {i} never stored");
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match common::Conn::try_connect(addr) {
                            Ok(c) => conn.insert(c),
                            Err(_) => continue,
                        },
                    };
                    let answer = c
                        .try_send(&request)
                        .ok()
                        .and_then(|()| c.try_read_response(false).ok());
                    match answer {
                        Some(resp) if resp.status == 201 || resp.status == 200 => {
                            let id = resp.json()["message_id"].as_str().expect("id").to_string();
                            acked.push(id);
                            break;
                        }
                        Some(resp) if resp.status == 503 => retries += 1,
                        Some(resp) => panic!("keyed publish {i}: {resp:?}"),
                        None => {
                            retries += 1;
                            conn = None;
                        }
                    }
                }
                i += 1;
            }
            (acked, retries)
        });
        KeyedPublisher { stop, handle }
    }

    /// Stops after the message in progress; (acknowledged ids in order, retried attempts).
    fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("keyed publisher panicked")
    }
}

#[test]
fn slot_migration_under_publish_and_ws_load_loses_reorders_and_duplicates_nothing() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    let relay = relay_on(&cluster, 0, PERSISTED);
    let names = topics_on_every_master(&cluster, "migrate", 2);
    let consumer = ResumingConsumer::start(relay.addr, &names, PATIENCE);
    let load = PublishLoad::start(relay.addr, &names, 1_000_000, Duration::from_secs(60));
    // Keyed publishes on a migrating topic: their idempotency keys are new keys, which a
    // half-migrated slot answers with TRYAGAIN (the relay retries, then 503; the producer
    // retries with the same key).
    let keyed = KeyedPublisher::start(relay.addr, &names[0]);
    assert!(
        eventually(PATIENCE, || load.min_acked() >= 30),
        "load did not get going: min acked {}\nstderr:\n{}",
        load.min_acked(),
        relay.stderr()
    );
    // Two busy topics' slots move: each to the next master.
    let masters = cluster.masters();
    let began = Instant::now();
    let mut moved_keys = 0;
    for busy in [&names[0], &names[2]] {
        let slot = cluster.keyslot(&stream_key(busy));
        let from = cluster.slot_owner(slot);
        let to =
            masters[(masters.iter().position(|&m| m == from).expect("master") + 1) % masters.len()];
        // Held half-way under load (the source answers ASK for moved keys), then finished
        // (MOVED from then on).
        let migration = cluster.begin_slot_migration(slot, to);
        let acked = load.min_acked();
        assert!(
            eventually(PATIENCE, || load.min_acked() >= acked + 20),
            "publishes stalled while slot {slot} was migrating"
        );
        moved_keys += cluster.move_slot_keys(&migration);
        let acked = load.min_acked();
        assert!(
            eventually(PATIENCE, || load.min_acked() >= acked + 20),
            "publishes stalled after the keys of slot {slot} moved"
        );
        cluster.finish_slot_migration(&migration);
        assert_eq!(cluster.key_owner(&stream_key(busy)), to);
        let acked = load.min_acked();
        assert!(
            eventually(PATIENCE, || load.min_acked() >= acked + 20),
            "publishes did not resume after slot {slot} moved\nstderr:\n{}",
            relay.stderr()
        );
    }
    let migration_time = began.elapsed();
    let (keyed_acked, keyed_retries) = keyed.finish();
    let mut outcomes = load.finish();
    let (moved, asked) = (
        operations(&relay, "cluster_moved"),
        operations(&relay, "cluster_ask"),
    );
    for out in &outcomes {
        assert_answered(out);
    }
    // Each keyed message acknowledged is stored exactly once, under the id it was answered.
    let key = stream_key(&names[0]);
    let keyed_stored: Vec<String> = cluster
        .node(cluster.key_owner(&key))
        .xrange(&key)
        .into_iter()
        .filter(|e| e.field("payload").is_some_and(|p| p.contains("\"k\"")))
        .map(|e| e.id)
        .collect();
    assert_eq!(
        keyed_stored, keyed_acked,
        "keyed publishes stored exactly once, in order"
    );
    assert!(
        keyed_acked.len() >= 20,
        "keyed publishes: {}",
        keyed_acked.len()
    );
    let tryagain = operations(&relay, "cluster_tryagain");
    outcomes[0]
        .acked
        .extend(keyed_acked.iter().map(|id| (u64::MAX, id.clone())));
    let (lost, stored_unacked) = audit(&cluster, &outcomes);
    let finished = consumer.finish(&outcomes);
    let (delivered, delivered_unacked) = (finished.received.len(), finished.unacked);
    eprintln!(
        "CLUSTER keyed-during-migration  acked {}  retried {keyed_retries}  \
         tryagain-followed {tryagain}",
        keyed_acked.len()
    );
    eprintln!(
        "CLUSTER slot-migration  acked {}  503 {}  conn-errors {}  max-latency {} ms  \
         keys-moved {moved_keys}  acked-lost {lost}  stored-unacked {stored_unacked}  \
         ws-delivered {delivered} ({delivered_unacked} unacknowledged)  migration {} ms  \
         moved-followed {moved}  ask-followed {asked}",
        sum(&outcomes, |o| o.acked.len() as u64),
        sum(&outcomes, |o| o.unavailable),
        sum(&outcomes, |o| o.conn_errors),
        outcomes
            .iter()
            .map(|o| o.max_latency)
            .max()
            .unwrap_or_default()
            .as_millis(),
        migration_time.as_millis(),
    );
    assert_eq!(lost, 0, "acknowledged messages lost in a slot migration");
    assert!(moved_keys >= 2, "the busy topics' keys moved: {moved_keys}");
    assert!(moved >= 1.0, "no MOVED was followed");
    assert!(
        asked >= 1.0,
        "no ASK was followed while the slots were half-migrated"
    );
}

#[test]
fn two_relays_on_a_cluster_deliver_each_others_publishes_across_a_slot_migration() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    let publisher = relay_on(&cluster, 0, PERSISTED);
    let follower = relay_on(&cluster, 1, PERSISTED);
    let names = topics_on_every_master(&cluster, "cross", 2);
    // The consumer follows the topics on the relay that publishes none of them: everything
    // it gets came through the cluster (SPUBLISH on the slot's master, SSUBSCRIBE there).
    let consumer = ResumingConsumer::start(follower.addr, &names, PATIENCE);
    let load = PublishLoad::start(publisher.addr, &names, 1_000_000, Duration::from_secs(60));
    assert!(
        eventually(PATIENCE, || load.min_acked() >= 30),
        "load did not get going\nstderr:\n{}",
        publisher.stderr()
    );
    let delivered_before = consumer.received_len();
    assert!(
        eventually(PATIENCE, || consumer.received_len()
            >= delivered_before + 50),
        "the follower relay delivers nothing published on the other\nstderr:\n{}",
        follower.stderr()
    );
    // The follower subscribes every topic's feed channel on the master owning its slot.
    for name in &names {
        let channel = format!("{}:feed", stream_key(name));
        let owner = cluster.key_owner(&channel);
        assert!(
            eventually(PATIENCE, || shard_subscribers(&cluster, owner, &channel)
                >= 1),
            "{channel} not subscribed on its master {owner}"
        );
    }
    // A busy topic's slot moves: its feed channel moves with it (Valkey unsubscribes the
    // follower on the old master; it subscribes again on the new one).
    let busy = &names[1];
    let slot = cluster.keyslot(&stream_key(busy));
    let from = cluster.slot_owner(slot);
    let to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master");
    cluster.migrate_slot(slot, to);
    let acked = load.min_acked();
    assert!(
        eventually(PATIENCE, || load.min_acked() >= acked + 50),
        "publishes stalled after the migration"
    );
    let outcomes = load.finish();
    for out in &outcomes {
        assert_answered(out);
    }
    let (lost, _) = audit(&cluster, &outcomes);
    assert_eq!(lost, 0);
    // Every acknowledged message reaches the follower's consumer, in order, once.
    let finished = consumer.finish(&outcomes);
    let (delivered, delivered_unacked) = (finished.received.len(), finished.unacked);
    let channel = format!("{}:feed", stream_key(busy));
    eprintln!(
        "CLUSTER cross-relay  acked {}  delivered-by-the-other-relay {delivered} \
         ({delivered_unacked} unacknowledged)  subscribers-on-the-new-owner {}",
        sum(&outcomes, |o| o.acked.len() as u64),
        shard_subscribers(&cluster, to, &channel),
    );
    // The subscriptions moved with the slot.
    assert!(
        eventually(PATIENCE, || shard_subscribers(&cluster, to, &channel) >= 1),
        "nobody subscribes {channel} on its new owner"
    );
    assert_eq!(shard_subscribers(&cluster, from, &channel), 0);
}

#[test]
fn two_relays_on_a_cluster_keep_delivering_across_kill9_of_a_master() {
    let mut cluster = ValkeyCluster::start(ClusterOpts::default());
    let names = topics_on_every_master(&cluster, "crosskill", 2);
    let victim = cluster.key_owner(&stream_key(&names[0]));
    let seeds: Vec<usize> = cluster
        .masters()
        .into_iter()
        .filter(|&m| m != victim)
        .collect();
    // `ack: replicated`: nothing acknowledged may be lost, so the follower must deliver every
    // 201 the publisher gave.
    let publisher = relay_on(&cluster, seeds[0], REPLICATED);
    let follower = relay_on(&cluster, seeds[1], REPLICATED);
    let consumer = ResumingConsumer::start(follower.addr, &names, PATIENCE);
    let load = PublishLoad::start(publisher.addr, &names, 1_000_000, Duration::from_secs(60));
    assert!(
        eventually(PATIENCE, || load.min_acked() >= 30),
        "load did not get going\nstderr:\n{}",
        publisher.stderr()
    );
    let channel = format!("{}:feed", stream_key(&names[0]));
    assert!(
        eventually(PATIENCE, || shard_subscribers(&cluster, victim, &channel)
            >= 1),
        "{channel} not subscribed on its master {victim}"
    );
    let promoted = cluster.kill9_master_and_await_failover(victim);
    // The promoted master has no replica until the old one rejoins: 503s until then.
    cluster.restart(victim);
    let acked = load.min_acked();
    assert!(
        eventually(PATIENCE, || load.min_acked() >= acked + 30),
        "publishes did not resume after the failover\nstderr:\n{}",
        publisher.stderr()
    );
    // The follower's subscription followed the slot to the promoted master.
    assert!(
        eventually(PATIENCE, || shard_subscribers(&cluster, promoted, &channel)
            >= 1),
        "{channel} not subscribed on the promoted master {promoted}\nstderr:\n{}",
        follower.stderr()
    );
    let outcomes = load.finish();
    for out in &outcomes {
        assert_answered(out);
    }
    let (lost, stored_unacked) = audit(&cluster, &outcomes);
    let finished = consumer.finish(&outcomes);
    let (delivered, delivered_unacked) = (finished.received.len(), finished.unacked);
    eprintln!(
        "CLUSTER cross-relay-kill9  acked {}  503 {}  acked-lost {lost}  stored-unacked \
         {stored_unacked}  delivered-by-the-other-relay {delivered} ({delivered_unacked} \
         unacknowledged)",
        sum(&outcomes, |o| o.acked.len() as u64),
        sum(&outcomes, |o| o.unavailable),
    );
    assert_eq!(lost, 0, "acknowledged messages lost with ack: replicated");
}

/// `PUBSUB SHARDNUMSUB channel` on node `i`: its subscribers there.
fn shard_subscribers(cluster: &ValkeyCluster, i: usize, channel: &str) -> u64 {
    let reply = cluster
        .node(i)
        .cli_json(&["PUBSUB", "SHARDNUMSUB", channel]);
    reply
        .as_array()
        .and_then(|a| a.get(1))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("PUBSUB SHARDNUMSUB {channel}: {reply}"))
}

/// Kills the master serving the first topic under load, awaits the promotion and the
/// publishes' return, audits the new owners' streams; returns (acked lost, 503s). With
/// `restart_old`, the killed node is restarted after the failover (it rejoins as the promoted
/// master's replica): with `ack: replicated` and one replica required, the promoted master
/// alone cannot acknowledge anything (its `WAIT` counts 0 replicas: 503) until it has one.
fn kill9_master_under_load(scenario: &str, yaml: &str, restart_old: bool) -> (usize, u64) {
    master_fault_under_load(scenario, yaml, Fault::Kill9 { restart_old })
}

/// How a master goes away.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `kill -9`; with `restart_old`, restarted after the promotion (it rejoins as a replica).
    Kill9 { restart_old: bool },
    /// `CLUSTER FAILOVER` on its replica: the live master hands over and becomes a replica;
    /// the relay's open connections to it get `MOVED` from then on.
    Manual,
}

fn master_fault_under_load(scenario: &str, yaml: &str, fault: Fault) -> (usize, u64) {
    let mut cluster = ValkeyCluster::start(ClusterOpts::default());
    // The seed is a master that survives: the relay must find the others through it.
    let names = topics_on_every_master(&cluster, scenario, 2);
    let victim = cluster.key_owner(&stream_key(&names[0]));
    let seed = cluster
        .masters()
        .into_iter()
        .find(|&m| m != victim)
        .expect("another master");
    let relay = relay_on(&cluster, seed, yaml);
    let consumer = ResumingConsumer::start(relay.addr, &names, PATIENCE);
    let load = PublishLoad::start(relay.addr, &names, 1_000_000, Duration::from_secs(60));
    assert!(
        eventually(PATIENCE, || load.min_acked() >= 30),
        "{scenario}: load did not get going: min acked {}\nstderr:\n{}",
        load.min_acked(),
        relay.stderr()
    );
    let delivered_before = consumer.received_len();
    let began = Instant::now();
    let promoted = match fault {
        Fault::Kill9 { restart_old } => {
            let promoted = cluster.kill9_master_and_await_failover(victim);
            if restart_old && yaml.contains("replicated") {
                // The promoted master has no replica yet: its WAIT counts 0, so what it
                // stores is answered 503, never 201.
                assert!(
                    eventually(PATIENCE, || errors(&relay, "replication_short") >= 1.0),
                    "{scenario}: no publish reached the promoted master before its replica"
                );
            }
            if restart_old {
                cluster.restart(victim);
                assert!(cluster.replicas_of(promoted).contains(&victim));
            }
            promoted
        }
        Fault::Manual => {
            let replica = cluster.replicas_of(victim)[0];
            assert_eq!(
                cluster.node(replica).cli(&["CLUSTER", "FAILOVER"]).trim(),
                "OK"
            );
            cluster.await_topology("manual failover", |_| {
                if cluster.masters().contains(&replica) {
                    Ok(())
                } else {
                    Err(format!("node {replica} is not a master yet"))
                }
            });
            replica
        }
    };
    let acked_now = load.min_acked();
    assert!(
        eventually(PATIENCE, || load.min_acked() >= acked_now + 30),
        "{scenario}: publishes did not resume after the failover (min acked {acked_now} then \
         {})\nstderr:\n{}",
        load.min_acked(),
        relay.stderr()
    );
    let recovery = began.elapsed();
    let outcomes = load.finish();
    for out in &outcomes {
        assert_answered(out);
    }
    assert_eq!(cluster.key_owner(&stream_key(&names[0])), promoted);
    let (lost, stored_unacked) = audit(&cluster, &outcomes);
    let finished = consumer.finish(&outcomes);
    let (delivered, delivered_unacked) = (finished.received.len(), finished.unacked);
    let unavailable = sum(&outcomes, |o| o.unavailable);
    eprintln!(
        "CLUSTER {scenario:<22} acked {}  503 {unavailable}  conn-errors {}  max-latency {} ms  \
         acked-lost {lost}  stored-unacked {stored_unacked}  back-to-201 {} ms  \
         ws-delivered {delivered} ({} after the fault, {delivered_unacked} unacknowledged)  \
         moved-followed {}",
        sum(&outcomes, |o| o.acked.len() as u64),
        sum(&outcomes, |o| o.conn_errors),
        outcomes
            .iter()
            .map(|o| o.max_latency)
            .max()
            .unwrap_or_default()
            .as_millis(),
        recovery.as_millis(),
        delivered - delivered_before,
        operations(&relay, "cluster_moved"),
    );
    if fault == Fault::Manual {
        assert!(
            operations(&relay, "cluster_moved") >= 1.0,
            "the demoted master's MOVED was not followed"
        );
    }
    assert!(relay.is_running());
    (lost, unavailable)
}

#[test]
fn kill9_of_a_master_with_replicated_ack_loses_nothing_acknowledged() {
    let (lost, _) = kill9_master_under_load("kill9-replicated", REPLICATED, true);
    assert_eq!(lost, 0, "acknowledged messages lost with ack: replicated");
}

#[test]
fn manual_failover_of_a_live_master_is_followed_through_moved_and_loses_nothing() {
    // A coordinated failover: the master stops taking writes until its replica caught up.
    let (lost, _) = master_fault_under_load("manual-failover", PERSISTED, Fault::Manual);
    assert_eq!(lost, 0, "acknowledged messages lost in a manual failover");
}

#[test]
fn kill9_of_a_master_with_persisted_ack_recovers_and_counts_losses() {
    // Asynchronous replication may lose the tail: counted and printed, not asserted zero.
    let _ = kill9_master_under_load("kill9-persisted", PERSISTED, false);
}

/// Work queues on a cluster: groups on topics of every master, shared by two relays that each
/// know a different seed node. Every message goes to exactly one consumer of the group (a
/// WebSocket worker on one relay, an HTTP poller on the other), is acknowledged once, and
/// what a worker held when it vanished is redelivered to the other after the ack timeout.
#[test]
fn consumer_groups_on_every_master_are_shared_by_two_relays() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    let a = relay_on(&cluster, 0, PERSISTED);
    let b = relay_on(&cluster, 1, PERSISTED);
    let names = topics_on_every_master(&cluster, "work", 1);
    for name in &names {
        let created = a.post_json(
            &format!("/api/v1/topics/{name}/groups"),
            r#"{"group":"pool","start":"earliest","ack_timeout":1,"max_deliveries":5}"#,
        );
        assert_eq!(created.status, 201, "{created:?}");
        // The group is the cluster's, not relay a's: b sees it at once.
        let seen = b.get(&format!("/api/v1/topics/{name}/groups/pool"));
        assert_eq!(seen.status, 200, "{seen:?}");
    }
    let mut published: HashSet<(String, String)> = HashSet::new();
    for round in 0..20 {
        for name in &names {
            let via = if round % 2 == 0 { &a } else { &b };
            let v = via.publish(name, &format!(r#"{{"round":{round}}}"#));
            published.insert((name.clone(), v["message_id"].as_str().expect("id").into()));
        }
    }
    // A WebSocket worker on a that takes 4 of each topic and never acknowledges, then drops.
    let mut ws = WsClient::connect(a.addr);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    ws.send_json(
        &json!({"type": "subscribe", "topics": refs, "group": "pool",
                         "consumer": "ws-worker", "max_in_flight": 4}),
    );
    ws.recv_type("subscribed");
    let held: Vec<Value> = ws.recv_messages(4 * names.len());
    let held_ids: HashSet<(String, String)> = held
        .iter()
        .map(|m| {
            assert_eq!(m["group"], "pool");
            assert_eq!(m["delivery_count"], 1);
            (
                m["topic"].as_str().expect("topic").into(),
                m["message_id"].as_str().expect("id").into(),
            )
        })
        .collect();
    assert_eq!(held_ids.len(), 4 * names.len(), "nothing handed out twice");
    assert!(
        ws.try_recv(Duration::from_millis(300)).is_none(),
        "max_in_flight exceeded"
    );
    drop(ws);
    // An HTTP poller on b drains the rest and, after the ack timeout, what the worker held.
    let mut acked: HashMap<(String, String), u64> = HashMap::new();
    let deadline = Instant::now() + PATIENCE;
    while acked.len() < published.len() && Instant::now() < deadline {
        for name in &names {
            let got = b.post_json(
                &format!("/api/v1/topics/{name}/groups/pool/poll"),
                r#"{"consumer":"poller","max":50,"timeout":0.2}"#,
            );
            assert_eq!(got.status, 200, "{got:?}");
            let got = got.json();
            let ids: Vec<String> = got["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    let key = (
                        name.clone(),
                        m["message_id"].as_str().expect("id").to_string(),
                    );
                    let count = m["delivery_count"].as_u64().expect("count");
                    assert_eq!(
                        count,
                        if held_ids.contains(&key) { 2 } else { 1 },
                        "{key:?}"
                    );
                    key.1
                })
                .collect();
            if ids.is_empty() {
                continue;
            }
            let answer = b
                .post_json(
                    &format!("/api/v1/topics/{name}/groups/pool/ack"),
                    &json!({ "ids": ids }).to_string(),
                )
                .json();
            assert_eq!(answer["acked"].as_u64(), Some(ids.len() as u64), "{answer}");
            for id in ids {
                *acked.entry((name.clone(), id)).or_default() += 1;
            }
        }
    }
    let acked_set: HashSet<(String, String)> = acked.keys().cloned().collect();
    assert_eq!(acked_set, published, "every message acknowledged");
    assert!(acked.values().all(|&n| n == 1), "acknowledged twice");
    for name in &names {
        let info = a.get(&format!("/api/v1/topics/{name}/groups/pool")).json();
        assert_eq!(info["pending"], 0, "{info}");
        assert_eq!(info["lag"], 0, "{info}");
    }
}
