//! Tests of the multi-process harness itself (the relay is only a passenger): a Valkey Cluster
//! forms with every slot covered, serves a key on the node owning its slot, fails over when a
//! master is killed and takes the killed node back; a slot with keys migrates under traffic;
//! a Sentinel set fails over after kill -9 of the master and takes the old master back as a
//! replica; several relays run on one Valkey and one is killed and restarted by PID. The
//! Cluster, Sentinel and multi-relay tests of the relay rely on each of these; when one
//! breaks, this file says whether the harness or the relay is at fault.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{
    parse_cluster_nodes, ClusterOpts, ClusterRole, ValkeyCluster, CLUSTER_SLOTS,
};
use common::fleet::RelayFleet;
use common::sentinel::{SentinelOpts, SentinelSet};
use common::valkey::{stream_key, ValkeyOpts, ValkeyServer};
use serde_json::{json, Value};

/// A key of `prefix` whose slot `cluster` says master `master` serves.
fn key_served_by(cluster: &ValkeyCluster, master: usize, prefix: &str) -> String {
    (0..1000)
        .map(|i| format!("{prefix}:{i}"))
        .find(|k| cluster.key_owner(k) == master)
        .unwrap_or_else(|| panic!("no key of {prefix} lands on node {master}"))
}

/// Sets the flag when dropped: a traffic thread stops even when the test body panics (else
/// the scope would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn cluster_forms_with_every_slot_covered_and_serves_a_key_on_its_owner() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    assert_eq!(cluster.len(), 6);
    let topology = cluster.await_healthy();
    let masters: Vec<_> = topology
        .iter()
        .filter(|n| n.role == ClusterRole::Master)
        .collect();
    assert_eq!(masters.len(), 3, "{topology:#?}");
    // Every slot served exactly once.
    let mut covered = vec![0u8; usize::from(CLUSTER_SLOTS)];
    for m in &masters {
        for slot in m.slots.iter().flat_map(Clone::clone) {
            covered[usize::from(slot)] += 1;
        }
    }
    assert!(covered.iter().all(|&c| c == 1), "{topology:#?}");
    // Every node agrees, seen from each.
    for i in 0..cluster.len() {
        assert_eq!(cluster.topology_seen_by(i), topology, "node {i}'s view");
        assert_ne!(cluster.node(i).port, 6379);
    }

    let key = stream_key("{orders}");
    let slot = cluster.keyslot(&key);
    assert_eq!(slot, cluster.keyslot("{orders}"), "hash tag ignored");
    let owner = cluster.key_owner(&key);
    let id = cluster
        .node(owner)
        .cli(&["XADD", &key, "*", "payload", "{\"a\":1}"]);
    let entries = cluster.node(owner).xrange(&key);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, id.trim());
    // Another master redirects to the owner.
    let other = cluster
        .masters()
        .into_iter()
        .find(|&m| m != owner)
        .expect("a second master");
    let moved = cluster.node(other).cli(&["XLEN", &key]);
    let want = format!("MOVED {slot} 127.0.0.1:{}", cluster.node(owner).port);
    assert_eq!(moved.trim(), want);
}

#[test]
fn cluster_kill9_of_a_master_promotes_its_replica_and_the_master_rejoins_as_replica() {
    let mut cluster = ValkeyCluster::start(ClusterOpts::default());
    let master = cluster.masters()[0];
    let key = key_served_by(&cluster, master, "failover");
    cluster.node(master).cli(&["SET", &key, "kept"]);
    cluster.node(master).await_replicas_in_sync(1);
    let pid = cluster.node(master).pid().expect("master runs");

    let killed = cluster.kill9(master);
    assert_eq!(killed.role, ClusterRole::Master);
    assert!(!cluster.is_running(master));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after kill9"
    );
    let promoted = cluster.await_failover(&killed);
    assert!(killed.replicas.contains(&promoted));
    assert_eq!(cluster.key_owner(&key), promoted);
    assert_eq!(
        cluster.node(promoted).cli_json(&["GET", &key]),
        json!("kept")
    );
    assert_eq!(
        cluster
            .node(promoted)
            .info_field("cluster", "cluster_enabled"),
        Some("1".to_string())
    );

    // Back on its port and nodes.conf: a replica of the node that replaced it.
    let topology = cluster.restart(master);
    let back = topology
        .iter()
        .find(|n| n.index == master)
        .expect("restarted node listed");
    assert_eq!(back.role, ClusterRole::Replica, "{topology:#?}");
    assert_eq!(back.master_id.as_deref(), Some(cluster.node_id(promoted)));
    assert_eq!(back.id, killed.id, "the node id survives the restart");
}

#[test]
fn cluster_slot_with_keys_migrates_under_traffic() {
    let cluster = ValkeyCluster::start(ClusterOpts::default());
    let tag = "{migrating}";
    let slot = cluster.keyslot(tag);
    let from = cluster.slot_owner(slot);
    let to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("a second master");
    // More keys than one MIGRATE batch, and a stream like the relay's.
    let keys: Vec<String> = (0..250).map(|i| format!("{tag}:k{i}")).collect();
    // One MSET (the keys share a slot, so the cluster accepts it) instead of a CLI per key.
    let mut mset = vec!["MSET"];
    for k in &keys {
        mset.extend([k.as_str(), k.as_str()]);
    }
    assert_eq!(cluster.node(from).cli_json(&mset), json!("OK"));
    let stream = stream_key(tag);
    for i in 0..10 {
        cluster
            .node(from)
            .cli(&["XADD", &stream, "*", "i", &i.to_string()]);
    }

    // Traffic through the migration: a cluster-mode CLI (it follows MOVED and ASK)
    // incrementing a counter in the slot; every acknowledged increment must survive.
    let counter = format!("{tag}:counter");
    let stop = AtomicBool::new(false);
    let (acked, moved) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut acked = 0u64;
            let mut failures = Vec::new();
            // Bounded in time too, in case the test body never gets to stop it.
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                match cluster.node(from).try_cli(&["-c", "INCR", &counter]) {
                    // `-c` prints "-> Redirected ..." before the reply when redirected.
                    Ok(out) => match out.lines().last().map(|l| l.trim().parse::<u64>()) {
                        Some(Ok(n)) => {
                            acked += 1;
                            assert_eq!(n, acked, "INCR answered out of sequence");
                        }
                        _ => failures.push(out),
                    },
                    Err(e) => failures.push(e),
                }
            }
            assert!(failures.is_empty(), "INCR failures: {failures:?}");
            acked
        });
        let _stop = StopOnDrop(&stop);
        // Let the traffic start before the slot starts moving.
        assert!(common::eventually(Duration::from_secs(10), || {
            cluster
                .node(from)
                .try_cli_json(&["GET", &counter])
                .is_ok_and(|v| v.is_string())
        }));
        let migration = cluster.begin_slot_migration(slot, to);
        // Half-migrated: a key the source does not hold is asked for on the target.
        let ask = cluster.node(from).cli(&["GET", &format!("{tag}:absent")]);
        let want = format!("ASK {slot} 127.0.0.1:{}", cluster.node(to).port);
        assert_eq!(ask.trim(), want);
        let moved = cluster.move_slot_keys(&migration);
        cluster.finish_slot_migration(&migration);
        drop(_stop);
        (traffic.join().expect("traffic thread"), moved)
    });

    // The keys, the stream and the counter (created before the migration began).
    assert_eq!(moved, keys.len() + 2);
    assert!(acked > 0, "no traffic ran during the migration");
    for i in 0..cluster.len() {
        let view = cluster.topology_seen_by(i);
        let owner = view
            .iter()
            .find(|n| n.role == ClusterRole::Master && n.owns(slot))
            .map(|n| n.index);
        assert_eq!(
            owner,
            Some(to),
            "node {i} sees slot {slot} served by {owner:?}"
        );
    }
    let count = |node: usize| -> Value {
        cluster
            .node(node)
            .cli_json(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
    };
    assert_eq!(count(from), json!(0));
    assert_eq!(count(to), json!(keys.len() + 2));
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    assert_eq!(cluster.node(to).cli_json(&mget), json!(keys));
    assert_eq!(cluster.node(to).xlen(&stream), 10);
    assert_eq!(
        cluster.node(to).cli_json(&["GET", &counter]),
        json!(acked.to_string())
    );
    let redirect = cluster.node(from).cli(&["GET", &keys[0]]);
    assert_eq!(
        redirect.trim(),
        format!("MOVED {slot} 127.0.0.1:{}", cluster.node(to).port)
    );
}

#[test]
fn sentinel_fails_over_after_kill9_and_the_old_master_rejoins_as_replica() {
    let mut set = SentinelSet::start(SentinelOpts::default());
    assert_eq!(set.current_master(), 0);
    for s in 0..set.sentinel_len() {
        assert_eq!(set.master_addr_from(s), Some(set.data_node(0).addr()));
    }
    assert_eq!(set.role(0), "master");
    assert_eq!(set.role(1), "slave");
    set.data_node(0).cli(&["SET", "k", "kept"]);
    set.data_node(0).await_replicas_in_sync(1);

    let new_master = set.kill9_master_and_await_failover();
    assert_eq!(new_master, 1);
    assert_eq!(set.role(1), "master");
    for s in 0..set.sentinel_len() {
        assert_eq!(set.master_addr_from(s), Some(set.data_node(1).addr()));
    }
    assert_eq!(set.data_node(1).cli_json(&["GET", "k"]), json!("kept"));

    // The old master comes back as it was configured, a master with its AOF; the sentinels
    // turn it into a replica of the new one.
    let master = set.restart_data(0);
    assert_eq!(master, 1);
    assert_eq!(set.role(0), "slave");
    assert_eq!(
        set.data_node(0).info_field("replication", "master_port"),
        Some(set.data_node(1).port.to_string())
    );
    set.data_node(1).cli(&["SET", "k2", "after"]);
    set.data_node(1).await_replicas_in_sync(1);
    assert_eq!(set.data_node(0).cli_json(&["GET", "k2"]), json!("after"));
}

#[test]
fn several_relays_run_on_one_valkey_and_one_is_killed_and_restarted() {
    let valkey = ValkeyServer::start(ValkeyOpts::default());
    let mut fleet = RelayFleet::start(&valkey, 3, "", &[]);
    let addrs = fleet.addrs();
    assert_eq!(addrs.iter().collect::<HashSet<_>>().len(), 3, "{addrs:?}");
    for i in 0..fleet.len() {
        let health = fleet.relay(i).health();
        assert_eq!(health["storage"]["connected"], true, "{health}");
        assert_eq!(health["storage"]["port"], valkey.port, "{health}");
        let topic = format!("fleet-{i}");
        fleet.relay(i).publish(&topic, "{\"relay\":1}");
        assert_eq!(valkey.xlen(&stream_key(&topic)), 1);
    }

    let pid = fleet.relay(1).pid().expect("relay 1 runs");
    fleet.kill9(1);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after kill9"
    );
    assert_eq!(fleet.running_addrs(), vec![addrs[0], addrs[2]]);
    assert!(common::eventually(Duration::from_secs(5), || {
        TcpStream::connect_timeout(&addrs[1], Duration::from_millis(200)).is_err()
    }));
    fleet.await_all_ready();

    fleet.restart(1);
    assert_eq!(fleet.addrs(), addrs, "a restarted relay keeps its address");
    assert_eq!(fleet.running_addrs(), addrs);
    fleet.relay(1).publish("fleet-1", "{\"relay\":1}");
    assert_eq!(valkey.xlen(&stream_key("fleet-1")), 2);
}

#[test]
fn cluster_nodes_parser_reads_roles_flags_and_slots_and_skips_migration_markers() {
    let text = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 [5461-<-b2]\n\
b2 127.0.0.1:30002@40002,host-b master,fail - 1 2 2 disconnected 5461 5462-10922 [100->-a1]\n\
c3 127.0.0.1:30003@40003 slave,fail? a1 0 3 1 connected\n\
d4 127.0.0.1:30004@40004 handshake,master - 0 0 0 connected\n";
    let ports: HashMap<u16, usize> = (0..4).map(|i| (30001 + i as u16, i)).collect();
    let nodes = parse_cluster_nodes(text, &ports).expect("parses");
    assert_eq!(nodes.len(), 4);
    assert_eq!(nodes[0].id, "a1");
    assert_eq!(nodes[0].role, ClusterRole::Master);
    assert_eq!(nodes[0].slots, vec![0..=5460]);
    assert!(nodes[0].connected && !nodes[0].failing);
    assert_eq!(nodes[1].index, 1);
    assert_eq!(nodes[1].port, 30002);
    assert_eq!(nodes[1].slots, vec![5461..=5461, 5462..=10922]);
    assert_eq!(nodes[1].slot_count(), 5462);
    assert!(nodes[1].failing && !nodes[1].connected);
    assert_eq!(nodes[2].role, ClusterRole::Replica);
    assert_eq!(nodes[2].master_id.as_deref(), Some("a1"));
    assert!(nodes[2].failing && nodes[2].slots.is_empty());
    assert!(nodes[3].handshake);
    // A node on a port the harness did not start is an error, not a silent skip.
    let stranger = "e5 127.0.0.1:39999@49999 master - 0 0 0 connected\n";
    assert!(parse_cluster_nodes(stranger, &ports).is_err());
}
