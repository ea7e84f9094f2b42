//! Valkey Cluster: which master serves which slot, and the lane driver that sends a lane's
//! batches to the masters owning its commands' slots, following `MOVED`/`ASK` redirections.
//!
//! Owns: the slot map of one client ([`Topology`]: `CLUSTER SHARDS` asked of the known masters
//! and then the configured seeds, one after the other, until one answers; refreshed
//! periodically, after a `MOVED`, after a lost or refused connection), the key slot of a
//! routed command ([`slot_of`]), splitting a batch by node, redirections, and the per-node
//! connections of a lane (opened lazily, the Function library loaded on each, so a master
//! promoted by a failover gets it on first use).
//!
//! Does not own: queueing, group commit, replies to callers, expiry and shutdown (the client,
//! `client.rs`, whose lanes and queue this driver takes its batches from exactly as the
//! single-node driver does), nor connecting (`connection.rs`).
//!
//! Ordering. A command routed by a topic takes the topic's lane, as with one node; in cluster
//! mode each lane holds one connection per master, and a lane sends one batch at a time: the
//! batch is split by the master owning each command's slot, the parts go out concurrently
//! (one pipeline per master), and the next batch is taken only when every command of this one
//! has its final reply. A command answered `MOVED` or `ASK` is sent again to the named node
//! (with `ASKING` first for `ASK`) *before* the lane takes its next batch, so later commands of
//! the same topic can never overtake a redirected one, whichever node they are routed to
//! meanwhile. Within one batch, the commands of one topic went to one node in order; when a
//! slot moves mid-batch, Valkey answers the redirected command and every later command on
//! the same key with a redirection too (a key that left a node does not come back), so they
//! are re-sent in their original order. A `MULTI` … `EXEC` block is redirected as a whole (its
//! queued commands were answered `MOVED`, so `EXEC` aborted and nothing of it ran). The cost:
//! a lane's batch waits for its slowest master; lanes (`valkey.connections_per_shard`) keep
//! several batches in flight. See `docs/scaling.md` ("Valkey Cluster").
//!
//! `TRYAGAIN` (a multi-key command during a migration, some keys moved and some not) is
//! retried after a short pause, still before the next batch; `CLUSTERDOWN`, a redirection
//! loop, and a node that cannot be reached fail the command with
//! [`ValkeyError::Cluster`]/`Connect`/`ConnectionLost`, which callers answer with 503.
//! Nothing that was written and not answered is sent again: a connection lost in flight
//! fails its commands (they may have been applied), exactly as on one node.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_lite::future::poll_fn;

use super::client::{register, CommandTarget, QueuedGroup, Shared};
use super::codec::{encode_command, Reply};
use super::connection::{ConnectConfig, Connection, Connector};
use super::sentinel::NodeAddr;
use super::{with_timeout, ValkeyError};

/// Slots of a Valkey Cluster.
pub const SLOTS: usize = 16384;

/// How often the slot map is refreshed when nothing suggests it changed: a failover or a
/// resharding that no command of this client ran into is noticed within this.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(5);

/// The least time between two refreshes: a burst of `MOVED` replies (every topic of a moved
/// slot) asks once, not once per reply.
const REFRESH_PAUSE: Duration = Duration::from_millis(100);

/// Rounds of redirections one command may go through before it fails: a slot moves once per
/// resharding step, so more than a few hops means the nodes disagree (a loop).
const MAX_ROUNDS: usize = 8;

/// Pauses before re-sending a command answered `TRYAGAIN`, one per retry; then it fails
/// (503). The lane waits meanwhile (its later commands must not overtake a command that may
/// still run), so every topic of the lane waits too: the retries cover a migration step
/// that is about to end (30 ms in all), not a slot held half-migrated. A keyed publish
/// touches an idempotency key that does not exist yet, which Valkey answers with `TRYAGAIN`
/// for as long as its slot is half-migrated: the producer's retry (same key) gets through
/// once the migration step is over. A failed command needs no ordering: it did not run.
const TRYAGAIN_PAUSES: [Duration; 2] = [Duration::from_millis(10), Duration::from_millis(20)];

/// A node that refused a connection is not tried again for this long: its commands fail at
/// once meanwhile (503), instead of every batch waiting for a connect to a dead master.
const CONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// Settings of cluster mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Any nodes of the cluster; asked for the topology, in order, when no known master
    /// answers.
    pub seeds: Vec<NodeAddr>,
}

/// The cluster slot of a routing key. The relay routes by topic name, and in cluster mode the
/// key templates put `{<topic>}` as the hash tag of every key of the topic (checked at start
/// by the configuration), so this is the slot of all of the topic's keys.
pub fn slot_of(key: &[u8]) -> u16 {
    // `redis-protocol`'s own hash-slot function (CRC16/XMODEM, hash tags honoured), already a
    // dependency for RESP: no second CRC16 crate.
    redis_protocol::redis_keyslot(key)
}

/// Counters of one topology, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyStats {
    /// Slot maps read (successful `CLUSTER SHARDS`).
    pub refreshes: u64,
    /// Attempts no node answered.
    pub refresh_errors: u64,
    /// `MOVED` replies followed.
    pub moved: u64,
    /// `ASK` replies followed.
    pub asked: u64,
    /// `TRYAGAIN` replies retried.
    pub tryagain: u64,
    /// Masters in the current map.
    pub masters: usize,
}

struct TopologyState {
    /// Masters, indexed by the slot map.
    nodes: Vec<NodeAddr>,
    /// Per slot, an index into `nodes`; `u16::MAX`: no master serves it.
    slots: Vec<u16>,
    /// Bumped on every change of the map (a refresh, or a `MOVED`).
    generation: u64,
    /// A refresh was asked for.
    wanted: bool,
    refresher: Option<Waker>,
    /// Lanes waiting for the first map or a change of it.
    waiters: Vec<Waker>,
    stats: TopologyStats,
}

/// The slot → master map of one client, shared by its lanes and kept fresh by one task.
pub struct Topology {
    seeds: Vec<NodeAddr>,
    /// Without the Function library: topology questions may go to any node.
    connector: Connector,
    state: RefCell<TopologyState>,
    client_name: String,
    /// The node that answered the last `CLUSTER SHARDS`: asked first next time, so a dead
    /// master early in the list (a connect timeout each) does not delay every refresh.
    last_answered: RefCell<Option<NodeAddr>>,
}

const UNASSIGNED: u16 = u16::MAX;

impl Topology {
    pub fn new(config: &ClusterConfig, connect: &ConnectConfig) -> Result<Topology, ValkeyError> {
        if config.seeds.is_empty() {
            return Err(ValkeyError::Config(
                "no Valkey Cluster seed node".to_owned(),
            ));
        }
        if connect.db != 0 {
            return Err(ValkeyError::Config(
                "Valkey Cluster has only database 0".to_owned(),
            ));
        }
        let connector = Connector::new(ConnectConfig {
            library: None,
            verify_master: false,
            client_name: format!("{}-topology", connect.client_name),
            ..connect.clone()
        })?;
        Ok(Topology {
            seeds: config.seeds.clone(),
            connector,
            state: RefCell::new(TopologyState {
                nodes: Vec::new(),
                slots: vec![UNASSIGNED; SLOTS],
                generation: 0,
                wanted: true,
                refresher: None,
                waiters: Vec::new(),
                stats: TopologyStats::default(),
            }),
            client_name: connect.client_name.clone(),
            last_answered: RefCell::new(None),
        })
    }

    pub fn stats(&self) -> TopologyStats {
        let state = self.state.borrow();
        TopologyStats {
            masters: state.nodes.len(),
            ..state.stats.clone()
        }
    }

    /// The master serving `slot`, if the map names one.
    pub fn node_of(&self, slot: u16) -> Option<NodeAddr> {
        let state = self.state.borrow();
        let index = *state.slots.get(usize::from(slot))?;
        state.nodes.get(usize::from(index)).cloned()
    }

    /// Every master of the map, in the order `CLUSTER SHARDS` listed them.
    pub fn masters(&self) -> Vec<NodeAddr> {
        self.state.borrow().nodes.clone()
    }

    pub fn generation(&self) -> u64 {
        self.state.borrow().generation
    }

    /// Asks the refresh task for a new map soon (rate-limited to one per 100 ms).
    pub fn request_refresh(&self) {
        let mut state = self.state.borrow_mut();
        state.wanted = true;
        if let Some(waker) = state.refresher.take() {
            waker.wake();
        }
    }

    /// A `MOVED <slot> <addr>` reply: `slot` is served by `addr` now. Updates the map at once
    /// (so the next batches go there) and asks for a full refresh, as one moved slot usually
    /// comes with others (a resharding or a failover).
    pub(super) fn moved(&self, slot: u16, addr: &NodeAddr) {
        {
            let mut state = self.state.borrow_mut();
            state.stats.moved += 1;
            let index = match state.nodes.iter().position(|n| n == addr) {
                Some(i) => i,
                None => {
                    state.nodes.push(addr.clone());
                    state.nodes.len() - 1
                }
            };
            if let (Some(entry), Ok(index)) =
                (state.slots.get_mut(usize::from(slot)), u16::try_from(index))
            {
                if *entry != index {
                    *entry = index;
                    state.generation += 1;
                    for waker in state.waiters.drain(..) {
                        waker.wake();
                    }
                }
            }
        }
        self.request_refresh();
    }

    /// Resolves once the map is newer than `generation` (0: once there is a first map).
    pub fn changed(&self, generation: u64) -> impl std::future::Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            let mut state = self.state.borrow_mut();
            if state.generation > generation {
                Poll::Ready(())
            } else {
                register(&mut state.waiters, cx);
                Poll::Pending
            }
        })
    }

    fn install(&self, nodes: Vec<NodeAddr>, slots: Vec<u16>) {
        let mut state = self.state.borrow_mut();
        state.stats.refreshes += 1;
        if state.nodes != nodes || state.slots != slots {
            if state.generation > 0 {
                tracing::info!(client = %self.client_name, masters = nodes.len(), "Valkey Cluster topology changed");
            } else {
                tracing::info!(client = %self.client_name, masters = nodes.len(), "Valkey Cluster topology discovered");
            }
            state.nodes = nodes;
            state.slots = slots;
            state.generation += 1;
            for waker in state.waiters.drain(..) {
                waker.wake();
            }
        }
    }

    /// Asks the known masters, then the seeds, for `CLUSTER SHARDS` until one answers.
    async fn refresh(&self) -> Result<(), ValkeyError> {
        let mut candidates: Vec<NodeAddr> = self.last_answered.borrow().iter().cloned().collect();
        for master in self.masters() {
            if !candidates.contains(&master) {
                candidates.push(master);
            }
        }
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut last = ValkeyError::Connect("no Valkey Cluster node to ask".to_owned());
        for node in candidates {
            let asked = async {
                let mut connection = self.connector.connect_to(&node.host, node.port).await?;
                connection.call(&[b"CLUSTER", b"SHARDS"]).await
            };
            match asked.await {
                Ok(Reply::Error(message)) => last = ValkeyError::Server(message),
                Ok(reply) => match parse_shards(&reply, &node) {
                    Ok((nodes, slots)) => {
                        self.install(nodes, slots);
                        *self.last_answered.borrow_mut() = Some(node);
                        return Ok(());
                    }
                    Err(why) => last = ValkeyError::Server(format!("{node}: {why}")),
                },
                Err(error) => last = error,
            }
        }
        self.state.borrow_mut().stats.refresh_errors += 1;
        Err(last)
    }

    /// The refresh task: at start, then whenever asked (at most one per 100 ms) or
    /// every [`REFRESH_PERIOD`].
    pub async fn run_refresher(self: Rc<Self>) {
        let mut failures = 0u32;
        loop {
            let asked = {
                let mut state = self.state.borrow_mut();
                std::mem::replace(&mut state.wanted, false)
            };
            if !asked {
                let wanted = poll_fn(|cx| {
                    let mut state = self.state.borrow_mut();
                    if state.wanted {
                        state.wanted = false;
                        Poll::Ready(())
                    } else {
                        state.refresher = Some(cx.waker().clone());
                        Poll::Pending
                    }
                });
                futures_lite::future::or(wanted, glommio::timer::sleep(REFRESH_PERIOD)).await;
            }
            match self.refresh().await {
                Ok(()) => failures = 0,
                Err(error) => {
                    if failures == 0 {
                        tracing::warn!(client = %self.client_name, %error, "cannot read the Valkey Cluster topology; retrying");
                    }
                    failures = failures.saturating_add(1);
                    self.state.borrow_mut().wanted = true;
                }
            }
            glommio::timer::sleep(REFRESH_PAUSE).await;
        }
    }
}

/// Parses a `CLUSTER SHARDS` reply (RESP2: per shard a flat `[name, value, ...]` list with
/// `slots` as a flat list of range bounds and `nodes` as a list of flat maps) into the masters
/// and the slot map. A shard's master is its node with role `master` and health `online`
/// (a failed master can still be listed as `master` until the failover completes). `asked` is
/// where the reply came from: a node without an address of its own (`ip` `?`) is that one.
pub fn parse_shards(reply: &Reply, asked: &NodeAddr) -> Result<(Vec<NodeAddr>, Vec<u16>), String> {
    fn field<'a>(map: &'a [Reply], name: &str) -> Option<&'a Reply> {
        map.chunks(2)
            .find(|pair| pair.first().and_then(Reply::as_str) == Some(name))
            .and_then(|pair| pair.get(1))
    }
    fn text(reply: Option<&Reply>) -> Option<String> {
        reply.and_then(Reply::as_str).map(str::to_owned)
    }
    let shards = reply.as_array().ok_or("CLUSTER SHARDS: not an array")?;
    let mut nodes: Vec<NodeAddr> = Vec::new();
    let mut slots = vec![UNASSIGNED; SLOTS];
    for shard in shards {
        let shard = shard.as_array().ok_or("a shard is not an array")?;
        let Some(ranges) = field(shard, "slots").and_then(Reply::as_array) else {
            continue;
        };
        if ranges.is_empty() {
            continue;
        }
        let members = field(shard, "nodes")
            .and_then(Reply::as_array)
            .ok_or("a shard without nodes")?;
        let mut master = None;
        for member in members {
            let Some(member) = member.as_array() else {
                continue;
            };
            let role = text(field(member, "role")).unwrap_or_default();
            let health = text(field(member, "health")).unwrap_or_default();
            if role != "master" {
                continue;
            }
            let port = field(member, "port")
                .and_then(Reply::as_int)
                .or_else(|| field(member, "tls-port").and_then(Reply::as_int))
                .and_then(|p| u16::try_from(p).ok());
            let host = text(field(member, "endpoint"))
                .filter(|h| !h.is_empty() && h != "?")
                .or_else(|| text(field(member, "ip")).filter(|h| !h.is_empty() && h != "?"))
                .unwrap_or_else(|| asked.host.clone());
            let Some(port) = port else { continue };
            let addr = NodeAddr { host, port };
            // An online master wins over one that is not (yet) known to have failed over.
            if health == "online" || master.is_none() {
                master = Some(addr);
            }
        }
        let Some(master) = master else { continue };
        let index = match nodes.iter().position(|n| *n == master) {
            Some(i) => i,
            None => {
                nodes.push(master);
                nodes.len() - 1
            }
        };
        let index = u16::try_from(index).map_err(|_| "too many masters")?;
        for bounds in ranges.chunks(2) {
            let [start, end] = bounds else {
                return Err("an odd number of slot bounds".to_owned());
            };
            let (Some(start), Some(end)) = (start.as_int(), end.as_int()) else {
                return Err("a slot bound is not an integer".to_owned());
            };
            let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
                return Err("a negative slot bound".to_owned());
            };
            if start > end || end >= SLOTS {
                return Err(format!("slot range {start}-{end} out of bounds"));
            }
            for slot in &mut slots[start..=end] {
                *slot = index;
            }
        }
    }
    if nodes.is_empty() {
        return Err("no master serves any slot".to_owned());
    }
    Ok((nodes, slots))
}

/// The byte ranges of the commands in a batch (each a RESP array of bulk strings, as checked
/// when queued).
fn command_spans(batch: &[u8]) -> Option<Vec<Range<usize>>> {
    fn number(bytes: &[u8], at: &mut usize) -> Option<usize> {
        let start = *at;
        while *bytes.get(*at)? != b'\r' {
            *at += 1;
        }
        let n = std::str::from_utf8(bytes.get(start..*at)?)
            .ok()?
            .parse()
            .ok()?;
        *at += 2;
        Some(n)
    }
    let mut spans = Vec::new();
    let mut at = 0;
    while at < batch.len() {
        let start = at;
        if batch[at] != b'*' {
            return None;
        }
        at += 1;
        let args = number(batch, &mut at)?;
        for _ in 0..args {
            if *batch.get(at)? != b'$' {
                return None;
            }
            at += 1;
            let len = number(batch, &mut at)?;
            at = at.checked_add(len)?.checked_add(2)?;
        }
        if at > batch.len() {
            return None;
        }
        spans.push(start..at);
    }
    Some(spans)
}

/// The command name of an encoded command, upper-cased, when short (MULTI, EXEC).
fn is_named(command: &[u8], name: &[u8]) -> bool {
    // `*<n>\r\n$<len>\r\n<name>\r\n`
    let Some(first) = command.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let rest = &command[first + 1..];
    let Some(second) = rest.iter().position(|&b| b == b'\n') else {
        return false;
    };
    rest.get(second + 1..second + 1 + name.len())
        .is_some_and(|n| n.eq_ignore_ascii_case(name))
        && rest.get(second + 1 + name.len()) == Some(&b'\r')
}

/// What a reply says about where its command must go.
pub(super) enum Redirect {
    Moved(u16, NodeAddr),
    Ask(NodeAddr),
    TryAgain,
}

pub(super) fn redirect_of(reply: &Reply) -> Option<Redirect> {
    let message = reply.as_error()?;
    if message.starts_with("TRYAGAIN") {
        return Some(Redirect::TryAgain);
    }
    let mut words = message.split(' ');
    let kind = words.next()?;
    let slot: u16 = words.next()?.parse().ok()?;
    let addr = words.next()?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let node = NodeAddr {
        // An empty host means "the node you asked" (`MOVED 3999 :6380`): unknown here, so the
        // command fails after the rounds; Valkey sends it only when no endpoint is configured.
        host: host.to_owned(),
        port: port.parse().ok()?,
    };
    match kind {
        "MOVED" => Some(Redirect::Moved(slot, node)),
        "ASK" => Some(Redirect::Ask(node)),
        _ => None,
    }
}

/// A run of commands that is sent and redirected as one: one command, or a `MULTI` … `EXEC`
/// block.
struct Unit {
    commands: Range<usize>,
    node: Option<NodeAddr>,
    asking: bool,
    /// `TRYAGAIN` answers so far.
    tries: usize,
}

/// One lane's connections, one per master it has sent to.
struct LaneConnections {
    open: HashMap<NodeAddr, Connection>,
    /// Nodes whose last connect failed, and when.
    refused: HashMap<NodeAddr, (Instant, ValkeyError)>,
}

/// One lane in cluster mode, forever: waits for work, sends each batch split by master,
/// follows redirections, completes the callers. Stopped by cancelling its task.
pub(super) async fn run_lane(shared: Rc<Shared>, topology: Rc<Topology>, index: usize) {
    let mut connections = LaneConnections {
        open: HashMap::new(),
        refused: HashMap::new(),
    };
    let mut groups: Vec<QueuedGroup> = Vec::new();
    topology.changed(0).await;
    let mut generation = topology.generation();
    shared.set_lane_connected(index, true);
    loop {
        // Idle: wait for work, a connection that dies (closed by a dying master: drop it and
        // ask for the topology), or a new map (drop connections to nodes no longer masters).
        enum Idle {
            Work,
            Closed(NodeAddr, ValkeyError),
            Changed,
        }
        let idle = futures_lite::future::or(
            async {
                shared.work_available(index).await;
                Idle::Work
            },
            futures_lite::future::or(
                async {
                    let (node, error) = any_closed(&mut connections.open).await;
                    Idle::Closed(node, error)
                },
                async {
                    topology.changed(generation).await;
                    Idle::Changed
                },
            ),
        )
        .await;
        match idle {
            Idle::Work => {}
            Idle::Closed(node, error) => {
                tracing::warn!(client = %shared.config.connect.client_name, connection = index, %node, %error, "lost a Valkey Cluster connection");
                connections.open.remove(&node);
                shared.note_lost();
                topology.request_refresh();
                continue;
            }
            Idle::Changed => {
                generation = topology.generation();
                let masters = topology.masters();
                connections.open.retain(|node, _| masters.contains(node));
                continue;
            }
        }
        let (batch, commands, wait) = shared.take_batch(index, &mut groups);
        let results = send_batch(
            &shared,
            &topology,
            &mut connections,
            &batch,
            commands,
            wait,
            &groups,
        )
        .await;
        drop(batch);
        shared.finish_cluster_batch(index, &mut groups, results, commands);
    }
}

/// Resolves when one of `open` turns out to be dead; never when there is none.
async fn any_closed(open: &mut HashMap<NodeAddr, Connection>) -> (NodeAddr, ValkeyError) {
    if open.is_empty() {
        return std::future::pending().await;
    }
    let watches = open
        .iter_mut()
        .map(|(node, connection)| {
            Box::pin(async move {
                let error = connection.closed().await;
                (node.clone(), error)
            })
        })
        .collect::<Vec<_>>();
    futures::future::select_all(watches).await.0
}

/// A command's final outcome and, with `wait`, the `WAIT` reply of the pipeline it ran in.
pub(super) type Outcome = (
    Result<Reply, ValkeyError>,
    Option<Result<Reply, ValkeyError>>,
);

/// Sends one batch and follows redirections until every command has its final reply.
async fn send_batch(
    shared: &Shared,
    topology: &Topology,
    connections: &mut LaneConnections,
    batch: &[u8],
    commands: usize,
    wait: bool,
    groups: &[QueuedGroup],
) -> Vec<Outcome> {
    let lost = |why: &str| ValkeyError::Protocol(super::ProtocolError::Malformed(why.to_owned()));
    let Some(spans) = command_spans(batch).filter(|s| s.len() == commands) else {
        return (0..commands)
            .map(|_| (Err(lost("batch not split into commands")), None))
            .collect();
    };
    // Where each command goes first: its slot's master; an unrouted one rides with the
    // routed command before it in its group (or, first, after it), else any master.
    let mut first_node: Vec<Option<NodeAddr>> = Vec::with_capacity(commands);
    for group in groups {
        let slots: Vec<Option<NodeAddr>> = group
            .targets
            .iter()
            .map(|target| match target {
                CommandTarget::Slot(slot) => topology.node_of(*slot),
                CommandTarget::Node(node) => Some(node.clone()),
                CommandTarget::Any => None,
            })
            .collect();
        let fallback = slots
            .iter()
            .flatten()
            .next()
            .cloned()
            .or_else(|| topology.masters().into_iter().next());
        let mut current = fallback;
        for (i, node) in slots.into_iter().enumerate() {
            if group
                .targets
                .get(i)
                .is_some_and(|t| !matches!(t, CommandTarget::Any))
            {
                current = node.clone();
            }
            first_node.push(current.clone());
        }
    }
    first_node.resize(commands, None);
    // Units: single commands, and MULTI … EXEC blocks as one.
    let mut units = Vec::new();
    let mut i = 0;
    while i < commands {
        let mut end = i + 1;
        if is_named(&batch[spans[i].clone()], b"MULTI") {
            while end < commands && !is_named(&batch[spans[end - 1].clone()], b"EXEC") {
                end += 1;
            }
        }
        units.push(Unit {
            commands: i..end,
            node: first_node[i].clone(),
            asking: false,
            tries: 0,
        });
        i = end;
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; commands];
    let mut pending: Vec<Unit> = units;
    for _ in 0..MAX_ROUNDS {
        if pending.is_empty() {
            break;
        }
        // Per node, its units in batch order.
        let mut by_node: Vec<(NodeAddr, Vec<Unit>)> = Vec::new();
        for unit in pending.drain(..) {
            let Some(node) = unit.node.clone() else {
                let error = ValkeyError::Cluster("no master serves the slot".to_owned());
                for c in unit.commands.clone() {
                    outcomes[c] = Some((Err(error.clone()), None));
                }
                topology.request_refresh();
                continue;
            };
            match by_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, list)) => list.push(unit),
                None => by_node.push((node, vec![unit])),
            }
        }
        let mut trips = Vec::with_capacity(by_node.len());
        for (node, units) in by_node {
            let mut bytes = BytesMut::new();
            let mut expected = 0;
            for unit in &units {
                if unit.asking {
                    encode_command(&mut bytes, &[b"ASKING"]);
                    expected += 1;
                }
                for c in unit.commands.clone() {
                    bytes.put_slice(&batch[spans[c].clone()]);
                    expected += 1;
                }
            }
            if wait {
                if let Some(command) = shared.wait_command() {
                    bytes.put_slice(command);
                    expected += 1;
                }
            }
            let connection = connections.open.remove(&node);
            let refused = connections
                .refused
                .get(&node)
                .filter(|(at, _)| at.elapsed() < CONNECT_BACKOFF)
                .map(|(_, e)| e.clone());
            trips.push(async move {
                let mut replies = Vec::with_capacity(expected);
                let mut connection = match (connection, refused) {
                    (Some(c), _) => c,
                    (None, Some(error)) => return (node, units, None, replies, Some(error), None),
                    (None, None) => {
                        match shared.connector().connect_to(&node.host, node.port).await {
                            Ok(c) => {
                                shared.note_connected(&node);
                                c
                            }
                            Err(error) => {
                                return (
                                    node,
                                    units,
                                    None,
                                    replies,
                                    Some(error.clone()),
                                    Some(error),
                                )
                            }
                        }
                    }
                };
                let result = connection.round_trip(&bytes, expected, &mut replies).await;
                let failure = result.err();
                (node, units, Some(connection), replies, failure, None)
            });
        }
        let finished = futures::future::join_all(trips).await;
        let mut retry_after: Option<Duration> = None;
        for (node, units, connection, replies, failure, connect_error) in finished {
            match connect_error {
                Some(error) => {
                    connections
                        .refused
                        .insert(node.clone(), (Instant::now(), error));
                    shared.note_connect_failed(&node);
                    topology.request_refresh();
                }
                // Connected (or had a connection): the node takes connections again.
                None if connection.is_some() => {
                    connections.refused.remove(&node);
                }
                // Still within the backoff of an earlier refusal.
                None => {}
            }
            let mut demoted = false;
            if let Some(connection) = connection {
                if failure.is_none() {
                    connections.open.insert(node.clone(), connection);
                } else {
                    shared.note_lost();
                    topology.request_refresh();
                }
            }
            let has_wait = wait && shared.wait_command().is_some();
            let mut replies = replies.into_iter();
            let missing = failure.unwrap_or_else(|| lost("reply missing"));
            // Replies in send order: [ASKING] unit commands ..., then WAIT.
            let mut unit_replies: Vec<(Unit, Vec<Option<Reply>>)> = Vec::new();
            for unit in units {
                if unit.asking {
                    let _ = replies.next();
                }
                let got: Vec<Option<Reply>> =
                    unit.commands.clone().map(|_| replies.next()).collect();
                unit_replies.push((unit, got));
            }
            let wait_reply = if has_wait {
                Some(match replies.next() {
                    Some(Reply::Error(m)) => Err(super::client::error_reply(m)),
                    Some(reply) => Ok(reply),
                    None => Err(missing.clone()),
                })
            } else {
                None
            };
            for (unit, got) in unit_replies {
                let redirect = got.iter().flatten().find_map(redirect_of).filter(|r| {
                    !matches!(r, Redirect::TryAgain) || unit.tries < TRYAGAIN_PAUSES.len()
                });
                match redirect {
                    Some(Redirect::Moved(slot, to)) => {
                        topology.moved(slot, &to);
                        pending.push(Unit {
                            node: Some(to),
                            asking: false,
                            ..unit
                        });
                    }
                    Some(Redirect::Ask(to)) => {
                        topology.state.borrow_mut().stats.asked += 1;
                        pending.push(Unit {
                            node: Some(to),
                            asking: true,
                            ..unit
                        });
                    }
                    Some(Redirect::TryAgain) => {
                        topology.state.borrow_mut().stats.tryagain += 1;
                        let pause = TRYAGAIN_PAUSES[unit.tries.min(TRYAGAIN_PAUSES.len() - 1)];
                        retry_after = Some(retry_after.map_or(pause, |p| p.max(pause)));
                        pending.push(Unit {
                            node: Some(node.clone()),
                            tries: unit.tries + 1,
                            ..unit
                        });
                    }
                    None => {
                        for (c, reply) in unit.commands.clone().zip(got) {
                            let result = match reply {
                                Some(Reply::Error(m)) => {
                                    let error = super::client::error_reply(m);
                                    if matches!(error, ValkeyError::NotMaster(_)) {
                                        demoted = true;
                                    }
                                    Err(error)
                                }
                                Some(reply) => Ok(reply),
                                None => Err(missing.clone()),
                            };
                            outcomes[c] = Some((result, wait_reply.clone()));
                        }
                    }
                }
            }
            if demoted {
                // A node that answers READONLY is a replica now: forget its connection.
                connections.open.remove(&node);
                topology.request_refresh();
            }
        }
        // Redirected units keep their batch order within each node.
        pending.sort_by_key(|unit| unit.commands.start);
        if let Some(pause) = retry_after {
            glommio::timer::sleep(pause).await;
        }
    }
    let exhausted = ValkeyError::Cluster(
        "too many redirections (the cluster is being reconfigured)".to_owned(),
    );
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| (Err(exhausted.clone()), None)))
        .collect()
}

/// Waits up to `within` for a first slot map.
pub async fn wait_for_map(topology: &Topology, within: Duration) -> bool {
    with_timeout(within, "", async {
        topology.changed(0).await;
        Ok(())
    })
    .await
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> NodeAddr {
        NodeAddr {
            host: "127.0.0.1".to_owned(),
            port,
        }
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    fn member(port: i64, role: &str, health: &str) -> Reply {
        Reply::Array(vec![
            bulk("id"),
            bulk("abc"),
            bulk("port"),
            Reply::Integer(port),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("health"),
            bulk(health),
        ])
    }

    /// A stand-in for a master that lost its slots: answers the handshake, `CLUSTER SHARDS`
    /// (first naming itself as the owner of every slot, after its first redirection naming
    /// `real`), `MULTI` with `+OK`, `EXEC` with `-EXECABORT`, commands on `{u}` keys with
    /// `ASK` to `real`, and everything else with `MOVED` to `real`, as Valkey does after a
    /// migration. Returns its port and the number of redirections it sent.
    fn start_moved_node(real: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let redirected = std::sync::Arc::new(AtomicU64::new(0));
        let count = redirected.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk) else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let mut out = Vec::new();
                        while let Ok(Some((frame, used))) =
                            redis_protocol::resp2::decode::decode(&buf)
                        {
                            buf.drain(..used);
                            use redis_protocol::resp2::types::OwnedFrame;
                            let OwnedFrame::Array(args) = frame else {
                                return;
                            };
                            let args: Vec<Vec<u8>> = args
                                .into_iter()
                                .filter_map(|a| match a {
                                    OwnedFrame::BulkString(b) => Some(b),
                                    _ => None,
                                })
                                .collect();
                            let name = args
                                .first()
                                .map(|a| String::from_utf8_lossy(a).to_uppercase())
                                .unwrap_or_default();
                            let owner = if count.load(Ordering::Relaxed) == 0 {
                                port
                            } else {
                                real
                            };
                            let reply = match name.as_str() {
                                "PING" => "+PONG\r\n".to_owned(),
                                "CLIENT" | "AUTH" | "SELECT" | "MULTI" => "+OK\r\n".to_owned(),
                                "EXEC" => "-EXECABORT Transaction discarded because of previous errors.\r\n".to_owned(),
                                "CLUSTER" => format!(
                                    "*1\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n*10\r\n$4\r\nport\r\n:{owner}\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$6\r\nhealth\r\n$6\r\nonline\r\n"
                                ),
                                _ => {
                                    count.fetch_add(1, Ordering::Relaxed);
                                    let asked = args.iter().any(|a| a.windows(3).any(|w| w == b"{u}"));
                                    if asked {
                                        format!("-ASK {} 127.0.0.1:{real}\r\n", slot_of(b"u"))
                                    } else {
                                        format!("-MOVED {} 127.0.0.1:{real}\r\n", slot_of(b"t"))
                                    }
                                }
                            };
                            out.extend_from_slice(reply.as_bytes());
                        }
                        if stream.write_all(&out).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, redirected)
    }

    /// A one-node cluster serving every slot, on a real `valkey-server`.
    fn start_one_node_cluster() -> crate::valkey::testing::ValkeyServer {
        let server = crate::valkey::testing::ValkeyServer::start(&["--cluster-enabled", "yes"]);
        let mut probe = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        use std::io::{Read, Write};
        probe
            .write_all(b"*4\r\n$7\r\nCLUSTER\r\n$13\r\nADDSLOTSRANGE\r\n$1\r\n0\r\n$5\r\n16383\r\n")
            .expect("write");
        let mut reply = [0u8; 5];
        probe.read_exact(&mut reply).expect("read");
        assert_eq!(&reply, b"+OK\r\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            probe
                .write_all(b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n")
                .expect("write");
            let mut text = [0u8; 4096];
            let n = probe.read(&mut text).expect("read");
            if String::from_utf8_lossy(&text[..n]).contains("cluster_state:ok") {
                return server;
            }
            assert!(Instant::now() < deadline, "one-node cluster not ok");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn moved_and_ask_are_followed_in_order_and_multi_blocks_move_whole() {
        let real = start_one_node_cluster();
        let (stale, redirected) = start_moved_node(real.port);
        let config = crate::valkey::ClientConfig {
            connect: ConnectConfig {
                port: stale,
                ..real.config()
            },
            cluster: Some(ClusterConfig {
                seeds: vec![node(stale)],
            }),
            ..crate::valkey::ClientConfig::default()
        };
        crate::valkey::testing::run_local(move || async move {
            use crate::valkey::{Client, Command};
            let client = Client::start(config).expect("start");
            assert!(client.wait_topology(Duration::from_secs(5)).await);
            let on = |topic: &str, args: &[&[u8]]| {
                Command::new(args)
                    .expect("command")
                    .routed(topic.as_bytes())
            };
            // One batch: a transaction and two appends on `t` (all answered MOVED by the
            // stale node), ASKed commands on `u`, and, queued behind, a read of `t` that
            // must see all of it.
            let many = client.submit(&[
                on("t", &[b"MULTI"]),
                on("t", &[b"SET", b"{t}k", b"v"]),
                on("t", &[b"INCR", b"{t}n"]),
                on("t", &[b"EXEC"]),
                on("t", &[b"RPUSH", b"{t}l", b"1"]),
                on("u", &[b"RPUSH", b"{u}l", b"a"]),
                on("t", &[b"RPUSH", b"{t}l", b"2"]),
                on("u", &[b"RPUSH", b"{u}l", b"b"]),
            ]);
            let read = client.submit(&[on("t", &[b"LRANGE", b"{t}l", b"0", b"-1"])]);
            let replies = many.await;
            let exec = replies[3]
                .as_ref()
                .expect("EXEC")
                .as_array()
                .expect("array")
                .to_vec();
            assert_eq!(exec.len(), 2, "the transaction ran whole: {exec:?}");
            assert_eq!(exec[1], Reply::Integer(1));
            assert_eq!(replies[4], Ok(Reply::Integer(1)));
            assert_eq!(replies[5], Ok(Reply::Integer(1)));
            assert_eq!(replies[6], Ok(Reply::Integer(2)));
            assert_eq!(replies[7], Ok(Reply::Integer(2)));
            let list = read.await.remove(0).expect("LRANGE");
            let items: Vec<&str> = list
                .as_array()
                .expect("array")
                .iter()
                .filter_map(Reply::as_str)
                .collect();
            assert_eq!(items, ["1", "2"]);
            let stats = client.cluster_stats().expect("cluster mode");
            assert!(stats.moved >= 1 && stats.asked >= 2, "{stats:?}");
            // MOVED updated the map: `t` goes to the real node directly now; `u` (ASK only)
            // still asks the stale node first.
            let before = redirected.load(std::sync::atomic::Ordering::Relaxed);
            let direct = client
                .call_routed(b"t", &[b"GET", b"{t}k"])
                .await
                .expect("GET");
            assert_eq!(direct.as_str(), Some("v"));
            assert_eq!(
                redirected.load(std::sync::atomic::Ordering::Relaxed),
                before
            );
            client.shutdown().await;
        });
    }

    #[test]
    fn slot_of_honours_hash_tags_and_matches_valkey() {
        // `CLUSTER KEYSLOT` of these, from the cluster specification and valkey-cli.
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"topic:{orders}:stream"), slot_of(b"orders"));
        assert_eq!(slot_of(b"topic:{orders}:meta"), slot_of(b"orders"));
    }

    #[test]
    fn shards_reply_gives_online_masters_and_their_slots() {
        let reply = Reply::Array(vec![
            Reply::Array(vec![
                bulk("slots"),
                Reply::Array(vec![Reply::Integer(0), Reply::Integer(5460)]),
                bulk("nodes"),
                Reply::Array(vec![
                    member(7001, "master", "fail"),
                    member(7004, "master", "online"),
                ]),
            ]),
            Reply::Array(vec![
                bulk("slots"),
                Reply::Array(vec![
                    Reply::Integer(5461),
                    Reply::Integer(10922),
                    Reply::Integer(10923),
                    Reply::Integer(16383),
                ]),
                bulk("nodes"),
                Reply::Array(vec![
                    member(7002, "master", "online"),
                    member(7005, "replica", "online"),
                ]),
            ]),
            // A shard without slots (an empty master) is not routed to.
            Reply::Array(vec![
                bulk("slots"),
                Reply::Array(vec![]),
                bulk("nodes"),
                Reply::Array(vec![member(7003, "master", "online")]),
            ]),
        ]);
        let (nodes, slots) = parse_shards(&reply, &node(7001)).expect("parsed");
        assert_eq!(nodes, vec![node(7004), node(7002)]);
        assert_eq!(slots[0], 0);
        assert_eq!(slots[5460], 0);
        assert_eq!(slots[5461], 1);
        assert_eq!(slots[16383], 1);
        assert!(parse_shards(&Reply::Array(vec![]), &node(1)).is_err());
    }

    #[test]
    fn redirections_are_parsed() {
        let moved = Reply::Error("MOVED 3999 127.0.0.1:6381".to_owned());
        assert!(matches!(redirect_of(&moved), Some(Redirect::Moved(3999, n)) if n == node(6381)));
        let ask = Reply::Error("ASK 3999 127.0.0.1:6382".to_owned());
        assert!(matches!(redirect_of(&ask), Some(Redirect::Ask(n)) if n == node(6382)));
        let again =
            Reply::Error("TRYAGAIN Multiple keys request during rehashing of slot".to_owned());
        assert!(matches!(redirect_of(&again), Some(Redirect::TryAgain)));
        assert!(redirect_of(&Reply::Error("ERR wrong".to_owned())).is_none());
    }

    #[test]
    fn batches_split_into_commands_and_multi_is_recognised() {
        let mut batch = BytesMut::new();
        encode_command(&mut batch, &[b"MULTI"]);
        encode_command(&mut batch, &[b"XADD", b"k", b"*", b"f", b"v\r\n"]);
        encode_command(&mut batch, &[b"exec"]);
        let spans = command_spans(&batch).expect("spans");
        assert_eq!(spans.len(), 3);
        assert!(is_named(&batch[spans[0].clone()], b"MULTI"));
        assert!(!is_named(&batch[spans[1].clone()], b"MULTI"));
        assert!(is_named(&batch[spans[2].clone()], b"EXEC"));
        assert!(command_spans(b"*1\r\n$4\r\nPIN").is_none());
    }
}
