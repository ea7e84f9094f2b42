//! The Valkey Streams persistent tier: what the hot tier sits in front of with
//! `STORAGE_BACKEND=valkey`.
//!
//! Owns the mapping between the relay's model and Valkey's: one stream per topic (key from
//! `valkey.stream_key`), one entry per message with the fields `payload`, `timestamp`, and
//! optionally `metadata` and `ttl` (seconds); the entry id is the message id; one
//! idempotency key per keyed publish (`valkey.idempotency_key` + the client's key, expiring
//! after `idempotency.window`). It builds the commands, parses the replies, discovers topics
//! with `SCAN`, and runs the retention sweep. Every append goes through one Valkey Function,
//! `pulsar_publish` (`publish.lua`), which checks idempotency keys and appends atomically.
//! It does not own the connection (that is [`crate::valkey::Client`], which batches whatever
//! the shard's tasks queue into one pipeline: the group commit) nor the hot tier (owned by
//! [`super::Storage`], which decides when a read can be served from memory).
//!
//! This file holds [`ValkeyTier`] itself: its state (what it caches about each topic: known
//! topics, lengths, in-flight publishes, the buffered backlog), its metrics snapshot, and the
//! command helpers every part shares. The operations live beside it, one concern a file:
//! - `entry.rs`: the stream entry format read back as messages (also entries the Python
//!   relay wrote), and the field texts the append writes.
//! - `function.rs` + `publish.lua`: the `pulsar` Function library and the `pulsar_publish`
//!   call both publish paths make: a batch of one topic's entries, each appended atomically
//!   with its idempotency check, then the cross-relay feed notification.
//! - `publish.rs`: `ack: persisted` publishes and the per-topic reorder queue.
//! - `replicated.rs`: `ack: replicated`: the `WAIT` that ends a publish's batch, and the
//!   answer when it counted too few replicas.
//! - `behind.rs`: `ack: buffered`: ids chosen here, the write-behind backlog and its writer,
//!   and the hold that keeps a topic in id order while a keyed publish awaits its decision.
//! - `read.rs`: page reads (range reads with an adaptive COUNT, skipping expired entries).
//! - `removal.rs`: exact head cuts and topic deletes, the removal record they leave in the
//!   topic's meta hash, and the gap verdict read from it.
//! - `retention.rs`: count, age and ttl retention: the trim endpoint and the sweep.
//! - `discovery.rs`: which of this shard's topics exist (`SCAN`) and their stats (`XINFO`).
//! - `server.rs`: `INFO`, and the server settings that could lose acknowledged messages.
//! - `group.rs`: consumer groups (work queues) as Valkey Streams consumer groups.
//! - `feed.rs`: the cross-relay feed: the notification after each publish batch, and the
//!   reads that keep a hot tier a cache of the stream (seed, probe, repair, safety net).
//!
//! Ordering: every command touching a topic's keys is [routed](crate::valkey::Command::routed)
//! by the topic, so all of them travel over one connection of the shard's client (however
//! many it has) in submission order, and Valkey assigns ids in arrival order: a topic's
//! replies come back in id order, and explicit ids (`ack: buffered`) arrive increasing. The
//! per-topic reorder queue (`publish.rs`) makes the hot tier see them in that order even
//! though the publishing tasks resume in whatever order the executor picks. A `MULTI`/`EXEC`
//! block is routed by its topic as a whole, so it never straddles connections.
//!
//! Gap detection: Valkey's `max-deleted-entry-id` moves only on `XDEL`, so the relay records
//! what it removes itself in the topic's meta hash and removes heads by exact cuts;
//! [`ValkeyTier::gap_after`] compares that record with `XINFO STREAM` (`removal.rs` says
//! where that is exact and where conservative).
//!
//! `ack = buffered`: acknowledged messages wait in a bounded write-behind backlog that one
//! writer task per shard sends oldest first, retrying failed batches with the same ids.
//! Publishes with an idempotency key travel the same backlog but are answered only once
//! Valkey decided them (stored or a duplicate), holding their topic meanwhile (`behind.rs`).

mod behind;
mod discovery;
mod entry;
mod feed;
mod function;
mod group;
mod publish;
mod read;
mod removal;
mod replicated;
mod retention;
mod server;

pub use behind::{BehindDecision, TopicHold};
pub use entry::{parse_entries, parse_entry};
pub use feed::{parse_notification, Notification};
pub use function::LIBRARY;
pub use read::ReadSource;
pub use retention::sweep_period;
pub use server::ServerInfo;

use crate::topic::TopicMap;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::time::SystemTime;

use super::message::MessageId;
use super::StoreError;
use crate::config::{AckMode, KeyTemplate};
use crate::valkey::{Client, Command, Reply, ValkeyError};
use behind::Behind;
use publish::Slot;

/// What a [`ValkeyTier`] is built from (the settings of one shard's tier).
pub struct TierConfig {
    pub stream_key: KeyTemplate,
    pub meta_key: KeyTemplate,
    /// Prefix of idempotency keys; the client's key follows the rendered template.
    pub idempotency_key: KeyTemplate,
    /// `storage.max_messages_per_topic`.
    pub max_len: usize,
    pub retention_ms: u64,
    /// `idempotency.window`.
    pub idempotency_window_ms: u64,
    pub ack: AckMode,
    pub shard: usize,
    pub shards: usize,
    /// Buffered mode: messages the write-behind backlog holds at most (`valkey.max_pending`).
    pub max_behind: usize,
    /// This relay's instance id ([`crate::instance::id`]), named in feed notifications.
    pub instance_id: String,
}

/// The Valkey side of one shard's storage.
pub struct ValkeyTier {
    pub client: Rc<Client>,
    stream_key: KeyTemplate,
    meta_key: KeyTemplate,
    idempotency_key: KeyTemplate,
    /// `MAXLEN ~` bound on every XADD (`storage.max_messages_per_topic`).
    max_len: String,
    max_len_n: u64,
    retention_ms: u64,
    /// `idempotency.window` in milliseconds, as the `SET ... PX` argument.
    idempotency_window: String,
    /// Named in every feed notification (`<instance id> <last id>`), so relays can tell
    /// their own appends from the others'.
    instance_id: String,
    pub ack: AckMode,
    shard: usize,
    shards: usize,
    /// Topics this shard owns that exist in Valkey: found by SCAN or written since start.
    /// Sorted, so listing needs no extra sort.
    known: RefCell<BTreeSet<String>>,
    /// Whether one full SCAN has completed since start: listing topics waits for it, so a
    /// relay restarted over existing streams lists them at once.
    discovered: std::cell::Cell<bool>,
    /// Stream lengths as last seen (XLEN/XINFO) plus appends since: the `total` of history
    /// pages served from memory, which must not cost a round trip.
    lengths: RefCell<TopicMap<String, usize>>,
    /// Per topic, publishes whose append is in flight, in submission order (see `publish.rs`).
    in_flight: RefCell<TopicMap<String, VecDeque<Rc<RefCell<Slot>>>>>,
    /// Commands issued, by name (the `relay_valkey_operations_total` metric).
    ops: RefCell<std::collections::BTreeMap<&'static str, u64>>,
    /// Buffered mode only: the last id handed out per topic (ids are chosen here so the
    /// producer can be answered before Valkey replies), and whether it has been checked
    /// against the stream's last id since the last write-behind failure (`false`: read the
    /// stream's last id again before the next id; see [`ValkeyTier::assign_buffered_ids`]).
    buffered_last: RefCell<TopicMap<String, (MessageId, bool)>>,
    /// Buffered mode only: acknowledged messages not yet stored, oldest first (see
    /// [`ValkeyTier::enqueue_behind`]).
    behind: RefCell<Behind>,
    /// Buffered mode only: topics held while a keyed publish to them awaits Valkey's
    /// decision, each with the publishes waiting for it to be released (their receivers
    /// wake when the entry, and with it these senders, is dropped). See [`TopicHold`].
    holds: RefCell<TopicMap<String, Vec<futures::channel::oneshot::Sender<()>>>>,
    /// Replicated mode only: stored messages answered 503 because their batch's `WAIT`
    /// counted too few replicas (`relay_valkey_errors_total{kind="replication_short"}`).
    replication_short: std::cell::Cell<u64>,
    /// Buffered mode only: topics another writer was seen on. Their ids can no longer be
    /// chosen here, so they are published with `ack: persisted` for the rest of the
    /// process's life (see [`ValkeyTier::degrade_buffered`]).
    degraded: RefCell<crate::topic::TopicSet<String>>,
    /// Where [`ValkeyTier::degrade_buffered`] reports a topic it degrades, so storage can
    /// drop what its memory holds of it (set once by [`super::Storage`]).
    writer_conflicts: RefCell<Option<futures::channel::mpsc::UnboundedSender<String>>>,
    /// Consumer-group settings by (topic, group), with when they were read (`group.rs`).
    group_settings: RefCell<
        HashMap<(String, String), (crate::store::group::GroupSettings, std::time::Instant)>,
    >,
}

impl ValkeyTier {
    pub fn new(client: Rc<Client>, config: TierConfig) -> ValkeyTier {
        ValkeyTier {
            client,
            stream_key: config.stream_key,
            meta_key: config.meta_key,
            idempotency_key: config.idempotency_key,
            max_len: config.max_len.to_string(),
            max_len_n: u64::try_from(config.max_len).unwrap_or(u64::MAX),
            retention_ms: config.retention_ms,
            // `SET ... PX 0` is an error: at least a millisecond.
            idempotency_window: config.idempotency_window_ms.max(1).to_string(),
            instance_id: config.instance_id,
            ack: config.ack,
            shard: config.shard,
            shards: config.shards,
            known: RefCell::new(BTreeSet::new()),
            discovered: std::cell::Cell::new(false),
            lengths: RefCell::new(TopicMap::default()),
            in_flight: RefCell::new(TopicMap::default()),
            buffered_last: RefCell::new(TopicMap::default()),
            behind: RefCell::new(Behind::new(config.max_behind)),
            holds: RefCell::new(TopicMap::default()),
            ops: RefCell::new(std::collections::BTreeMap::new()),
            replication_short: std::cell::Cell::new(0),
            degraded: RefCell::new(crate::topic::TopicSet::default()),
            writer_conflicts: RefCell::new(None),
            group_settings: RefCell::new(HashMap::new()),
        }
    }

    /// Makes `listener` the receiver of every topic [`ValkeyTier::degrade_buffered`] degrades.
    pub fn report_writer_conflicts(
        &self,
        listener: futures::channel::mpsc::UnboundedSender<String>,
    ) {
        *self.writer_conflicts.borrow_mut() = Some(listener);
    }

    /// `ack: buffered` with another writer on `topic` (seen as `why`): ids chosen here would
    /// collide with the other writer's, so from now on the topic is published through the
    /// persisted path (Valkey picks the ids; a 201 means stored). Logged as an error once per
    /// topic and counted (`relay_valkey_errors_total{kind="buffered_other_writer"}`). Returns
    /// whether this call degraded it (false: it already was, or the mode is persisted).
    pub fn degrade_buffered(&self, topic: &str, why: &str) -> bool {
        if self.ack != AckMode::Buffered || self.degraded.borrow().contains(topic) {
            return false;
        }
        self.degraded.borrow_mut().insert(topic.to_owned());
        tracing::error!(
            topic,
            instance = %self.instance_id,
            why,
            "another writer on a topic this relay publishes with ack: buffered: its ids would \
             collide, so the topic is published with ack: persisted from now on"
        );
        if let Some(listener) = self.writer_conflicts.borrow().as_ref() {
            let _ = listener.unbounded_send(topic.to_owned());
        }
        true
    }

    /// Whether `topic` was degraded from `ack: buffered` (see [`ValkeyTier::degrade_buffered`]).
    pub fn is_degraded(&self, topic: &str) -> bool {
        !self.degraded.borrow().is_empty() && self.degraded.borrow().contains(topic)
    }

    /// Whether this relay chose ids for `topic` (`ack: buffered`, not degraded): its memory is
    /// ahead of the stream until the write-behind catches up.
    pub fn writes_buffered(&self, topic: &str) -> bool {
        self.ack == AckMode::Buffered
            && !self.is_degraded(topic)
            && self.buffered_last.borrow().contains_key(topic)
    }

    fn count(&self, op: &'static str, n: usize) {
        *self.ops.borrow_mut().entry(op).or_insert(0) += n as u64;
    }

    /// Operation counts, failures by kind and pipeline batch sizes, for `/metrics`.
    pub fn snapshot(&self) -> crate::metrics::ValkeySnapshot {
        let stats = self.client.stats();
        let mut errors = std::collections::BTreeMap::new();
        for (kind, n) in [
            ("connection_lost", stats.failed_connection_lost),
            (
                "timeout",
                stats.failed_timeout_in_flight + stats.failed_timeout_queued,
            ),
            ("protocol", stats.failed_protocol),
            ("backpressure", stats.rejected_backpressure),
            ("error_reply", stats.error_replies),
            ("connect", stats.connect_failures),
            ("auth", stats.auth_failures),
            ("tls", stats.tls_failures),
            ("buffered_retry", self.behind.borrow().retries),
            ("buffered_lost", self.behind.borrow().lost),
            ("not_master", stats.not_master_replies),
            ("replication_short", self.replication_short.get()),
            ("sentinel", stats.sentinel_errors),
            ("buffered_reassigned", self.behind.borrow().reassigned),
            ("buffered_other_writer", self.degraded.borrow().len() as u64),
        ] {
            errors.insert(kind.to_owned(), n);
        }
        let mut operations: std::collections::BTreeMap<String, u64> = self
            .ops
            .borrow()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        if let Some(cluster) = self.client.cluster_stats() {
            // Valkey Cluster: redirections followed and slot-map reads (not issued here).
            for (op, n) in [
                ("cluster_moved", cluster.moved),
                ("cluster_ask", cluster.asked),
                ("cluster_tryagain", cluster.tryagain),
                ("cluster_shards", cluster.refreshes),
            ] {
                operations.insert(op.to_owned(), n);
            }
            errors.insert("cluster_topology".to_owned(), cluster.refresh_errors);
        }
        if stats.waits > 0 {
            // Appended by the client to replicated batches, not issued here.
            operations.insert("wait".to_owned(), stats.waits);
        }
        crate::metrics::ValkeySnapshot {
            operations,
            errors,
            batch_sizes: self.client.batch_histogram(),
            pending: self.client.pending(),
            connected: self.client.is_connected(),
            failovers: stats.failovers,
        }
    }

    fn note_written(&self, topic: &str) {
        if !self.known.borrow().contains(topic) {
            self.known.borrow_mut().insert(topic.to_owned());
        }
        // Look up before `entry`: an owned key (an allocation) only for a new topic.
        let mut lengths = self.lengths.borrow_mut();
        match lengths.get_mut(topic) {
            Some(n) => *n += 1,
            None => {
                lengths.insert(topic.to_owned(), 1);
            }
        }
    }

    /// The masters per-master commands (`SCAN`, `INFO`) go to (see
    /// [`Client::masters`]); in Valkey Cluster mode, waits for the first slot map.
    async fn masters(&self) -> Result<Vec<Option<crate::valkey::NodeAddr>>, StoreError> {
        if !self
            .client
            .wait_topology(std::time::Duration::from_secs(5))
            .await
        {
            return Err(StoreError::Unavailable(
                "Valkey Cluster topology unknown (no seed node answered CLUSTER SHARDS)".into(),
            ));
        }
        Ok(self.client.masters())
    }

    /// The stream length last seen plus appends since (no round trip).
    pub fn cached_length(&self, topic: &str) -> Option<usize> {
        self.lengths.borrow().get(topic).copied()
    }

    /// Whether `message` is due for removal (its ttl or the age retention ran out): never
    /// handed out.
    pub fn is_due(&self, message: &super::message::Message, now_ms: u64) -> bool {
        retention::is_due(message, now_ms, self.retention_ms)
    }

    /// `topic` exists in Valkey (another relay wrote it): listed without waiting for the
    /// next `SCAN`.
    pub fn note_known(&self, topic: &str) {
        if !self.known.borrow().contains(topic) {
            self.known.borrow_mut().insert(topic.to_owned());
        }
    }

    /// Drops what this tier caches about a topic that no longer exists.
    fn forget(&self, topic: &str) {
        self.known.borrow_mut().remove(topic);
        self.lengths.borrow_mut().remove(topic);
        self.buffered_last.borrow_mut().remove(topic);
    }
}

fn store_error(e: ValkeyError) -> StoreError {
    match e {
        ValkeyError::Server(message) => StoreError::Rejected(message),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// A pipeline answered fewer replies than commands (cannot happen with a healthy client).
fn missing_reply() -> Result<Reply, ValkeyError> {
    Err(ValkeyError::Protocol(
        crate::valkey::ProtocolError::Malformed("missing reply".into()),
    ))
}

/// Valkey's answer to XINFO on a missing key.
fn is_no_such_key(e: &ValkeyError) -> bool {
    matches!(e, ValkeyError::Server(m) if m.contains("no such key"))
}

/// Encodes one command. Every call site passes a literal, non-empty argument list, the only
/// thing `Command::new` refuses.
/// A command on `topic`'s keys, routed by the topic (see the module doc: ordering).
fn on(topic: &str, args: &[&[u8]]) -> Command {
    command(args).routed(topic.as_bytes())
}

fn command(args: &[&[u8]]) -> Command {
    Command::new(args).expect("commands built here are never empty")
}

#[allow(dead_code)]
fn now() -> SystemTime {
    SystemTime::now()
}

/// What the tests of the parts that talk to a real Valkey share.
#[cfg(test)]
mod test_support {
    use bytes::Bytes;

    use super::*;
    use crate::store::PublishItem;

    /// A single-shard tier on a fresh Valkey (run inside `run_local`).
    pub(super) fn tier_on(
        server: &crate::valkey::testing::ValkeyServer,
    ) -> crate::valkey::ClientConfig {
        crate::valkey::ClientConfig {
            connect: server.config(),
            ..crate::valkey::ClientConfig::default()
        }
    }

    /// A client config for a port nobody listens on: for tests that only encode commands.
    pub(super) fn offline() -> crate::valkey::ClientConfig {
        crate::valkey::ClientConfig {
            connect: crate::valkey::ConnectConfig {
                port: crate::valkey::testing::free_port(),
                ..crate::valkey::ConnectConfig::default()
            },
            ..crate::valkey::ClientConfig::default()
        }
    }

    pub(super) fn new_tier(
        config: crate::valkey::ClientConfig,
        retention_ms: u64,
    ) -> Rc<ValkeyTier> {
        new_tier_with(config, retention_ms, AckMode::Persisted, 600_000)
    }

    /// A single-shard tier with the given ack mode and idempotency window.
    pub(super) fn new_tier_with(
        mut config: crate::valkey::ClientConfig,
        retention_ms: u64,
        ack: AckMode,
        idempotency_window_ms: u64,
    ) -> Rc<ValkeyTier> {
        config.connect.library = Some(LIBRARY);
        let client = Client::start(config).expect("client");
        Rc::new(ValkeyTier::new(
            client,
            TierConfig {
                stream_key: KeyTemplate::parse("s:{topic}").expect("template"),
                meta_key: KeyTemplate::parse("m:{topic}").expect("template"),
                idempotency_key: KeyTemplate::parse("i:{topic}:").expect("template"),
                max_len: 1_000_000,
                retention_ms,
                idempotency_window_ms,
                ack,
                shard: 0,
                shards: 1,
                max_behind: 1000,
                instance_id: "0123456789abcdef".to_owned(),
            },
        ))
    }

    pub(super) fn item(topic: &str, payload_len: usize, ttl_ms: Option<u64>) -> PublishItem {
        PublishItem {
            topic: topic.to_owned(),
            payload: Bytes::from(format!("\"{}\"", "x".repeat(payload_len))),
            metadata: None,
            ttl_ms,
            idempotency_key: None,
        }
    }

    /// [`item`] with an idempotency key.
    pub(super) fn keyed(topic: &str, payload_len: usize, key: &str) -> PublishItem {
        PublishItem {
            idempotency_key: Some(key.to_owned()),
            ..item(topic, payload_len, None)
        }
    }
}
