//! A Valkey Cluster for the black-box tests: N masters with R replicas each, every node a real
//! `valkey-server --cluster-enabled yes` child process (a [`ValkeyServer`]: own free port whose
//! bus port, +10000, is free too, own temp directory), joined with `valkey-cli --cluster create`.
//!
//! Owns: forming the cluster, reading its topology (`CLUSTER NODES` as each node sees it), the
//! faults a test injects (kill -9 a node, restart it, migrate a slot) and the awaits after them.
//! Every await polls a condition until it holds or a deadline passes, never sleeps as
//! synchronisation; "healthy" is one condition (see [`ValkeyCluster::await_healthy`]) that the
//! others build on. Does not own: a RESP client or slot-aware routing — the relay will speak
//! Cluster itself; tests compare what it says with what the nodes hold, through `valkey-cli`.
//!
//! The topology is read from `CLUSTER NODES` (one text line per node with its flags, link
//! state and slot ranges) rather than `CLUSTER SHARDS`: the relay will discover the cluster
//! with `CLUSTER SHARDS`, and the tests judge it by an independent source.
//!
//! Nodes are named by their index in the harness (`0..masters * (1 + replicas)`), stable
//! across kills and restarts, as are their cluster ids and ports (a restarted node reloads its
//! `nodes.conf`). Dropping the cluster kills every node by PID and removes its directory (each
//! node is a [`ValkeyServer`]), also when a test panics.
//!
//! Slot migration is done by hand with the protocol of the cluster specification (`SETSLOT
//! IMPORTING` / `MIGRATING`, `GETKEYSINSLOT` + `MIGRATE`, `SETSLOT NODE`) rather than with
//! `valkey-cli --cluster reshard`: reshard moves a number of slots of its own choosing, while a
//! test needs a named slot (the one its topic hashes to), and it runs start to end in one call,
//! while a fault test needs to hold the slot half-migrated (ASK redirections) under load. The
//! three steps are public for that; [`ValkeyCluster::migrate_slot`] runs them in a row.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::valkey::{ValkeyOpts, ValkeyServer};

/// Hash slots of a Valkey Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

/// Forming the cluster, a failover, a rejoin or the end of a migration takes seconds (node
/// timeout, failure reports, an election, gossip); 30 s absorbs a loaded two-core CI machine.
const TOPOLOGY_DEADLINE: Duration = Duration::from_secs(30);

/// `valkey-cli --cluster create` assigns slots, meets the nodes and waits until they agree.
const CREATE_DEADLINE: Duration = Duration::from_secs(60);

/// Keys per `MIGRATE` call: one CLI process per batch, and a batch of small keys moves in
/// milliseconds, so Valkey is never blocked for long.
const MIGRATE_BATCH: usize = 100;

/// `MIGRATE`'s I/O timeout towards the target node (ms), far above a local transfer.
const MIGRATE_TIMEOUT_MS: &str = "10000";

/// Lines of each node's log shown when an await fails.
const LOG_TAIL_LINES: usize = 15;

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// Masters (at least 3: `valkey-cli --cluster create` refuses fewer).
    pub masters: usize,
    pub replicas_per_master: usize,
    /// `cluster-node-timeout`: how long a node may be unreachable before it is suspected; a
    /// failover takes about this plus an election (under a second).
    pub node_timeout: Duration,
    /// `--appendonly` of every node (a restarted master without replicas keeps its data).
    pub appendonly: bool,
    /// Passed to every node after the cluster settings.
    pub extra_args: Vec<String>,
}

impl Default for ClusterOpts {
    /// 3 masters × 1 replica, 2 s node timeout, AOF on. 2 s rather than 1 s: a node of a
    /// loaded two-core machine stalled for a second must not be failed over behind the test's
    /// back; a failover still completes within about 3 s.
    fn default() -> ClusterOpts {
        ClusterOpts {
            masters: 3,
            replicas_per_master: 1,
            node_timeout: Duration::from_millis(2000),
            appendonly: true,
            extra_args: Vec::new(),
        }
    }
}

/// A node's role as the cluster sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterRole {
    Master,
    Replica,
}

/// One node as one node's `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    /// The harness's index of the node (see [`ValkeyCluster::node`]).
    pub index: usize,
    /// The cluster node id (40 hex characters).
    pub id: String,
    pub port: u16,
    pub role: ClusterRole,
    /// The master's node id, for a replica.
    pub master_id: Option<String>,
    /// Flagged `fail` or `fail?` (suspected) by the node whose view this is.
    pub failing: bool,
    /// Still in the handshake (not yet a full member).
    pub handshake: bool,
    /// The cluster bus link from the viewing node is up (always true for the node itself).
    pub connected: bool,
    /// Slot ranges this node serves (masters only). Importing/migrating markers, which only
    /// the two nodes of a migration show, are left out, so every node's view compares equal.
    pub slots: Vec<RangeInclusive<u16>>,
}

impl ClusterNode {
    /// Whether this node serves `slot`.
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|r| r.contains(&slot))
    }

    /// How many slots this node serves.
    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|r| r.clone().count()).sum()
    }
}

/// What a node was when [`ValkeyCluster::kill9`] killed it.
#[derive(Clone, Debug)]
pub struct KilledNode {
    pub index: usize,
    pub id: String,
    pub role: ClusterRole,
    /// The slots it served (empty for a replica).
    pub slots: Vec<RangeInclusive<u16>>,
    /// Its running replicas at the time (candidates for promotion).
    pub replicas: Vec<usize>,
}

/// A slot migration between [`ValkeyCluster::begin_slot_migration`] and
/// [`ValkeyCluster::finish_slot_migration`]: the source answers `ASK` for keys it no longer
/// holds, the target accepts them after `ASKING`.
#[derive(Clone, Debug)]
pub struct SlotMigration {
    pub slot: u16,
    /// The master that served the slot.
    pub from: usize,
    /// The master that will serve it.
    pub to: usize,
}

/// A running Valkey Cluster; every node is killed and its directory removed when dropped.
pub struct ValkeyCluster {
    /// By harness index; a killed node stays here, stopped, until restarted.
    nodes: Vec<ValkeyServer>,
    /// Cluster node id of each node, by index (read once: `nodes.conf` keeps it on restart).
    ids: Vec<String>,
}

impl ValkeyCluster {
    /// Starts `masters * (1 + replicas_per_master)` nodes, joins them with `valkey-cli
    /// --cluster create`, and waits until the cluster is healthy with the asked shape.
    pub fn start(opts: ClusterOpts) -> ValkeyCluster {
        assert!(
            opts.masters >= 3,
            "valkey-cli --cluster create needs at least 3 masters"
        );
        let total = opts.masters * (1 + opts.replicas_per_master);
        let node_opts = ValkeyOpts {
            appendonly: opts.appendonly,
            extra_args: node_args(&opts),
            ..ValkeyOpts::default()
        };
        // Started one after the other, so a node's ports are bound before the next ones are
        // picked: no two nodes are handed the same port.
        let nodes: Vec<ValkeyServer> = (0..total)
            .map(|_| ValkeyServer::start_on_port_from(node_opts.clone(), free_cluster_port))
            .collect();
        let ids = nodes
            .iter()
            .map(|n| n.cli(&["CLUSTER", "MYID"]).trim().to_string())
            .collect();
        let cluster = ValkeyCluster { nodes, ids };

        let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr().to_string()).collect();
        let replicas = opts.replicas_per_master.to_string();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        let created = cluster.nodes[0].try_cli_within(&args, CREATE_DEADLINE);
        match created {
            Ok(out) if out.contains("[OK] All 16384 slots covered") => {}
            other => panic!(
                "valkey-cli --cluster create failed: {other:?}\n{}",
                cluster.log_tails()
            ),
        }

        let topology = cluster.await_healthy();
        let masters: Vec<&ClusterNode> = topology
            .iter()
            .filter(|n| n.role == ClusterRole::Master)
            .collect();
        assert_eq!(masters.len(), opts.masters, "masters: {topology:#?}");
        for m in masters {
            let replicas = topology
                .iter()
                .filter(|n| n.master_id.as_deref() == Some(m.id.as_str()))
                .count();
            assert_eq!(
                replicas, opts.replicas_per_master,
                "replicas of node {}: {topology:#?}",
                m.index
            );
        }
        cluster
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node with harness index `i` (its `cli`, `port`, `log`, `pid`...).
    pub fn node(&self, i: usize) -> &ValkeyServer {
        &self.nodes[i]
    }

    /// The cluster node id of node `i`.
    pub fn node_id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Every node's address, running or not (seed addresses for a cluster client).
    /// The environment pointing a relay at this cluster, every node a seed (as the compose
    /// stack's `VALKEY_CLUSTER_NODES`).
    pub fn relay_env(&self) -> Vec<(String, String)> {
        let nodes: Vec<String> = self.addrs().iter().map(|a| a.to_string()).collect();
        vec![
            ("STORAGE_BACKEND".to_string(), "valkey".to_string()),
            ("VALKEY_CLUSTER_NODES".to_string(), nodes.join(",")),
        ]
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(ValkeyServer::addr).collect()
    }

    /// The topology as the first running node sees it, sorted by index. Panics when that node
    /// does not answer; use [`ValkeyCluster::await_healthy`] for an agreed view.
    pub fn topology(&self) -> Vec<ClusterNode> {
        let i = self.any_running();
        self.topology_seen_by(i)
    }

    /// The topology as node `i` sees it, sorted by index.
    pub fn topology_seen_by(&self, i: usize) -> Vec<ClusterNode> {
        self.try_view(i)
            .unwrap_or_else(|e| panic!("CLUSTER NODES on node {i}: {e}"))
    }

    /// Running masters serving slots (per [`ValkeyCluster::topology`]), by index.
    pub fn masters(&self) -> Vec<usize> {
        self.topology()
            .iter()
            .filter(|n| n.role == ClusterRole::Master && !n.slots.is_empty())
            .filter(|n| self.is_running(n.index))
            .map(|n| n.index)
            .collect()
    }

    /// Replicas of master `i` (per [`ValkeyCluster::topology`]), running or not.
    pub fn replicas_of(&self, i: usize) -> Vec<usize> {
        let id = self.node_id(i);
        self.topology()
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(id))
            .map(|n| n.index)
            .collect()
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn keyslot(&self, key: &str) -> u16 {
        let v = self.nodes[self.any_running()].cli_json(&["CLUSTER", "KEYSLOT", key]);
        v.as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or_else(|| panic!("CLUSTER KEYSLOT {key}: {v}"))
    }

    /// The master serving `slot` (per [`ValkeyCluster::topology`]).
    pub fn slot_owner(&self, slot: u16) -> usize {
        owner_in(&self.topology(), slot)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {:#?}", self.topology()))
    }

    /// The master serving `key`'s slot.
    pub fn key_owner(&self, key: &str) -> usize {
        self.slot_owner(self.keyslot(key))
    }

    /// Waits until the cluster is healthy and returns the topology every running node agrees
    /// on. Healthy: every running node says `cluster_state:ok` with all 16384 slots assigned
    /// and ok and every node known; its `CLUSTER NODES` shows every running node connected,
    /// not failing and past the handshake, every slot served by a running master, and the
    /// same roles, masters and slot ranges as every other running node's view; every running
    /// replica's replication link is up.
    pub fn await_healthy(&self) -> Vec<ClusterNode> {
        self.await_topology("healthy", |topology| Ok(topology.to_vec()))
    }

    /// SIGKILLs node `i` and returns what it was (from a running node's view just before).
    pub fn kill9(&mut self, i: usize) -> KilledNode {
        let topology = self.topology();
        let me = find(&topology, i)
            .unwrap_or_else(|| panic!("node {i} is not in the topology: {topology:#?}"))
            .clone();
        let replicas = topology
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(me.id.as_str()))
            .filter(|n| self.is_running(n.index))
            .map(|n| n.index)
            .collect();
        self.nodes[i].kill9();
        KilledNode {
            index: i,
            id: me.id,
            role: me.role,
            slots: me.slots,
            replicas,
        }
    }

    /// Waits until one of the killed master's replicas serves every slot it served and the
    /// cluster is healthy again; returns the promoted replica.
    pub fn await_failover(&self, killed: &KilledNode) -> usize {
        assert!(
            killed.role == ClusterRole::Master && !killed.slots.is_empty(),
            "test bug: node {} was not a master serving slots: {killed:?}",
            killed.index
        );
        assert!(
            !killed.replicas.is_empty(),
            "test bug: node {} had no running replica to promote",
            killed.index
        );
        let what = format!("failover of node {}", killed.index);
        self.await_topology(&what, |topology| {
            killed
                .replicas
                .iter()
                .copied()
                .find(|&r| {
                    find(topology, r).is_some_and(|n| {
                        n.role == ClusterRole::Master
                            && killed
                                .slots
                                .iter()
                                .flat_map(Clone::clone)
                                .all(|s| n.owns(s))
                    })
                })
                .ok_or_else(|| {
                    format!(
                        "none of replicas {:?} serves the slots of node {}",
                        killed.replicas, killed.index
                    )
                })
        })
    }

    /// Kills master `i`, waits for its replica's promotion, returns the promoted replica.
    pub fn kill9_master_and_await_failover(&mut self, i: usize) -> usize {
        let killed = self.kill9(i);
        self.await_failover(&killed)
    }

    /// Restarts a killed node on its port and directory (it reloads `nodes.conf`, so it rejoins
    /// as the member it was; a replaced master comes back as a replica of its successor) and
    /// waits until the cluster is healthy with it.
    pub fn restart(&mut self, i: usize) -> Vec<ClusterNode> {
        self.nodes[i].restart();
        self.await_healthy()
    }

    /// Moves `slot` to master `to` with its keys; returns how many keys moved. Safe under
    /// traffic from clients that follow `ASK` and `MOVED`.
    pub fn migrate_slot(&self, slot: u16, to: usize) -> usize {
        let migration = self.begin_slot_migration(slot, to);
        let moved = self.move_slot_keys(&migration);
        self.finish_slot_migration(&migration);
        moved
    }

    /// Step 1 of a migration, on a healthy cluster: `SETSLOT IMPORTING` on the target, then
    /// `MIGRATING` on the source (that order, so no `ASK` points at a node not yet importing).
    pub fn begin_slot_migration(&self, slot: u16, to: usize) -> SlotMigration {
        let topology = self.await_healthy();
        let from = owner_in(&topology, slot)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {topology:#?}"));
        assert_ne!(from, to, "test bug: node {to} already serves slot {slot}");
        assert!(
            find(&topology, to).is_some_and(|n| n.role == ClusterRole::Master),
            "test bug: node {to} is not a master: {topology:#?}"
        );
        let slot_arg = slot.to_string();
        self.expect_ok(
            to,
            &[
                "CLUSTER",
                "SETSLOT",
                &slot_arg,
                "IMPORTING",
                self.node_id(from),
            ],
        );
        self.expect_ok(
            from,
            &[
                "CLUSTER",
                "SETSLOT",
                &slot_arg,
                "MIGRATING",
                self.node_id(to),
            ],
        );
        SlotMigration { slot, from, to }
    }

    /// Step 2: `MIGRATE`s every key the source holds in the slot to the target, in batches,
    /// until `GETKEYSINSLOT` finds none (new keys of the slot are created on the target through
    /// `ASK`, so the loop ends); returns how many keys moved.
    pub fn move_slot_keys(&self, m: &SlotMigration) -> usize {
        let source = &self.nodes[m.from];
        let slot_arg = m.slot.to_string();
        let batch_arg = MIGRATE_BATCH.to_string();
        let port_arg = self.nodes[m.to].port.to_string();
        let mut moved = 0;
        loop {
            let keys = source.cli_json(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, &batch_arg]);
            let keys: Vec<&str> = keys
                .as_array()
                .unwrap_or_else(|| panic!("GETKEYSINSLOT {}: {keys}", m.slot))
                .iter()
                .map(|k| {
                    k.as_str()
                        .unwrap_or_else(|| panic!("key is not a string: {k}"))
                })
                .collect();
            if keys.is_empty() {
                return moved;
            }
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &port_arg,
                "",
                "0",
                MIGRATE_TIMEOUT_MS,
                "KEYS",
            ];
            args.extend(&keys);
            // NOKEY: every key of the batch expired or was deleted since GETKEYSINSLOT.
            match source.try_cli_json(&args) {
                Ok(Value::String(r)) if r == "OK" || r == "NOKEY" => {}
                other => panic!("MIGRATE of slot {} keys: {other:?}", m.slot),
            }
            moved += keys.len();
        }
    }

    /// Step 3: `SETSLOT NODE <target>` on the target, the source, then every other running
    /// master, and waits until every running node sees the target serving the slot.
    pub fn finish_slot_migration(&self, m: &SlotMigration) {
        let slot_arg = m.slot.to_string();
        let to_id = self.node_id(m.to).to_string();
        let set_node = ["CLUSTER", "SETSLOT", slot_arg.as_str(), "NODE", &to_id];
        self.expect_ok(m.to, &set_node);
        self.expect_ok(m.from, &set_node);
        for i in self.masters() {
            if i != m.to && i != m.from {
                self.expect_ok(i, &set_node);
            }
        }
        let what = format!("slot {} served by node {}", m.slot, m.to);
        self.await_topology(&what, |topology| match owner_in(topology, m.slot) {
            Some(owner) if owner == m.to => Ok(()),
            owner => Err(format!("slot {} served by {owner:?}", m.slot)),
        });
    }

    // --- internals ---

    fn any_running(&self) -> usize {
        (0..self.len())
            .find(|&i| self.is_running(i))
            .expect("no cluster node is running")
    }

    /// Runs a command on node `i` that must answer OK.
    fn expect_ok(&self, i: usize, args: &[&str]) {
        match self.nodes[i].try_cli_json(args) {
            Ok(Value::String(r)) if r == "OK" => {}
            other => panic!("{args:?} on node {i}: {other:?}"),
        }
    }

    /// Node `i`'s `CLUSTER NODES`, parsed and sorted by index.
    fn try_view(&self, i: usize) -> Result<Vec<ClusterNode>, String> {
        let text = self.nodes[i].try_cli(&["CLUSTER", "NODES"])?;
        let ports: HashMap<u16, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.port, i))
            .collect();
        let mut view = parse_cluster_nodes(&text, &ports)?;
        view.sort_by_key(|n| n.index);
        Ok(view)
    }

    /// `CLUSTER INFO` or `INFO <section>` of node `i` as `name -> value`.
    fn try_info(&self, i: usize, args: &[&str]) -> Result<HashMap<String, String>, String> {
        let text = self.nodes[i].try_cli(args)?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// The topology every running node agrees on, if the cluster is healthy (see
    /// [`ValkeyCluster::await_healthy`]); otherwise the first thing found wrong.
    fn healthy_topology(&self) -> Result<Vec<ClusterNode>, String> {
        let slots = CLUSTER_SLOTS.to_string();
        let known = self.len().to_string();
        let expected_info = [
            ("cluster_state", "ok"),
            ("cluster_slots_assigned", slots.as_str()),
            ("cluster_slots_ok", slots.as_str()),
            ("cluster_known_nodes", known.as_str()),
        ];
        // (node, its whole view, the running nodes of it as compared).
        let mut agreed: Option<(usize, Vec<ClusterNode>, Vec<ClusterNode>)> = None;
        for i in (0..self.len()).filter(|&i| self.is_running(i)) {
            let info = self.try_info(i, &["CLUSTER", "INFO"])?;
            for (name, want) in expected_info {
                let got = info.get(name).map_or("(missing)", String::as_str);
                if got != want {
                    return Err(format!("node {i}: {name}:{got}, want {want}"));
                }
            }
            let view = self.try_view(i)?;
            for n in &view {
                if !self.is_running(n.index) {
                    if !n.slots.is_empty() {
                        return Err(format!(
                            "node {i} sees stopped node {} serving slots",
                            n.index
                        ));
                    }
                    continue;
                }
                if n.failing || n.handshake || !n.connected {
                    return Err(format!("node {i} sees node {}: {n:?}", n.index));
                }
            }
            let me = find(&view, i).ok_or_else(|| format!("node {i} does not list itself"))?;
            if me.role == ClusterRole::Replica {
                let master = me
                    .master_id
                    .as_deref()
                    .and_then(|id| view.iter().find(|n| n.id == id))
                    .ok_or_else(|| format!("replica {i} has no known master"))?;
                if !self.is_running(master.index) {
                    return Err(format!("replica {i} follows stopped node {}", master.index));
                }
                let repl = self.try_info(i, &["INFO", "replication"])?;
                let link = repl
                    .get("master_link_status")
                    .map_or("(missing)", String::as_str);
                if link != "up" {
                    return Err(format!("replica {i}: master_link_status:{link}"));
                }
            }
            let running_view: Vec<ClusterNode> = view
                .iter()
                .filter(|n| self.is_running(n.index))
                .map(|n| ClusterNode {
                    // Link and failure flags were checked above; compare the membership.
                    connected: true,
                    ..n.clone()
                })
                .collect();
            match &agreed {
                None => agreed = Some((i, view, running_view)),
                Some((first, _, first_view)) => {
                    if first_view != &running_view {
                        return Err(format!(
                            "nodes {first} and {i} disagree:\n{first_view:#?}\nvs\n{running_view:#?}"
                        ));
                    }
                }
            }
        }
        let (_, view, _) = agreed.ok_or("no node is running")?;
        Ok(view)
    }

    /// Polls until the cluster is healthy (see [`ValkeyCluster::await_healthy`]) and `cond`
    /// holds for the agreed topology; returns what `cond` returned. `cond` says why not with
    /// `Err`. Panics after 30 s with the last reason and the end of every node's log.
    pub fn await_topology<T>(
        &self,
        what: &str,
        mut cond: impl FnMut(&[ClusterNode]) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + TOPOLOGY_DEADLINE;
        loop {
            let last = match self.healthy_topology().and_then(|t| {
                let v = cond(&t)?;
                Ok((v, t))
            }) {
                Ok((v, _)) => return v,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "cluster not {what} within {TOPOLOGY_DEADLINE:?}; last: {last}\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of every node's log, for failure messages.
    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| n.log_tail(&format!("node {i}"), LOG_TAIL_LINES))
            .collect()
    }
}

/// The cluster settings of every node. Replica validity factor 0: a replica whose link was
/// down for a while (a stalled CI machine) may still be promoted, so a failover never waits
/// for a replica that is "too old". Replica migration off: replicas stay with the master the
/// test saw them with, so a test's expectations do not shift under it. No diskless sync delay:
/// a master otherwise waits 5 s for more replicas before the first full sync of each.
fn node_args(opts: &ClusterOpts) -> Vec<String> {
    let timeout_ms = opts.node_timeout.as_millis().to_string();
    let mut args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        // Relative to `--dir`: each node's own data directory.
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        &timeout_ms,
        "--cluster-replica-validity-factor",
        "0",
        "--cluster-allow-replica-migration",
        "no",
        "--cluster-require-full-coverage",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(opts.extra_args.iter().cloned());
    args
}

/// A free port whose cluster bus port (port + 10000) is free too. Ports above 55535 have no
/// bus port; 6379 is never used.
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if port != 6379 && TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("found no free port with a free port + 10000 in 1000 tries");
}

fn find(topology: &[ClusterNode], index: usize) -> Option<&ClusterNode> {
    topology.iter().find(|n| n.index == index)
}

/// The master serving `slot` in `topology`.
fn owner_in(topology: &[ClusterNode], slot: u16) -> Option<usize> {
    topology
        .iter()
        .find(|n| n.role == ClusterRole::Master && n.owns(slot))
        .map(|n| n.index)
}

/// Parses `CLUSTER NODES`: one line per node,
/// `<id> <ip:port@cport[,hostname]> <flags> <master|-> <ping> <pong> <epoch> <link> <slot>...`
/// where a slot is `n`, `a-b`, or `[n->-id]` / `[n-<-id]` (migrating / importing; skipped).
/// `ports` maps the harness's ports to node indexes; a node on another port is an error.
pub fn parse_cluster_nodes(
    text: &str,
    ports: &HashMap<u16, usize>,
) -> Result<Vec<ClusterNode>, String> {
    let mut nodes = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!("short CLUSTER NODES line: {line:?}"));
        }
        let addr = fields[1].split([',', '@']).next().unwrap_or_default();
        let port: u16 = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| format!("bad address in {line:?}"))?;
        let index = *ports
            .get(&port)
            .ok_or_else(|| format!("node on a port the harness did not start: {line:?}"))?;
        let flags: Vec<&str> = fields[2].split(',').collect();
        let role = if flags.contains(&"master") {
            ClusterRole::Master
        } else if flags.contains(&"slave") {
            ClusterRole::Replica
        } else {
            return Err(format!("node neither master nor replica: {line:?}"));
        };
        let mut slots = Vec::new();
        for token in &fields[8..] {
            if token.starts_with('[') {
                continue;
            }
            let range = match token.split_once('-') {
                Some((a, b)) => a.parse().ok().zip(b.parse().ok()).map(|(a, b)| a..=b),
                None => token.parse().ok().map(|s| s..=s),
            };
            slots.push(range.ok_or_else(|| format!("bad slot {token:?} in {line:?}"))?);
        }
        nodes.push(ClusterNode {
            index,
            id: fields[0].to_string(),
            port,
            role,
            master_id: (fields[3] != "-").then(|| fields[3].to_string()),
            failing: flags.iter().any(|f| *f == "fail" || *f == "fail?"),
            handshake: flags.contains(&"handshake"),
            connected: flags.contains(&"myself") || fields[7] == "connected",
            slots,
        });
    }
    Ok(nodes)
}
