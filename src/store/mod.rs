//! Storage: message ids, the wire form of a message, the hot tier, and the storage seam.
//!
//! [`Storage`] is the one type the rest of the relay talks to. It lives on the shard that owns
//! the topics it holds and is `!Send`: every operation runs on that shard. Both backends keep
//! the same [`hot_tier::HotTier`]:
//! - **memory**: the hot tier is the whole store (lost on restart);
//! - **valkey**: the hot tier holds each topic's most recent messages in front of Valkey
//!   Streams ([`valkey::ValkeyTier`]). Writes go to Valkey first (group-committed by the
//!   shard's pipelined client); reads whose range the hot tier covers never touch Valkey.
//!
//! The HTTP handlers never see which backend runs.
//!
//! - [`message`]: [`message::MessageId`] (`<ms>-<seq>`, Valkey's stream-id format) and
//!   [`message::Message`], and the JSON form every delivery path shares.
//! - [`group`]: consumer groups (work queues): the model, and the memory backend's groups
//!   (the Valkey backend's are Valkey Streams consumer groups, `valkey/group.rs`).
//! - [`feed`]: the append feed, storage's one report of what it appended, for delivery.
//! - [`idempotency`]: what an idempotency key is, and the memory backend's record of keys
//!   (the Valkey backend keeps its record in Valkey, beside the topic's stream).
//! - [`hot_tier`]: per-topic ordered logs with count, age and byte-budget retention.
//! - [`stream_sync`]: with Valkey, what keeps the hot tier a cache of the streams and the feed
//!   in stream order when other relays write the same streams (repairs from Valkey, the
//!   pub/sub feed, the contiguity probe of local publishes).
//! - [`valkey`]: the Valkey Streams tier, split by concern: the entry format, persisted
//!   publishes and their reorder queue, the buffered write-behind, page reads, removals and
//!   gap verdicts, retention (trim, sweep), topic discovery, server checks.

pub mod feed;
pub mod group;
pub mod hot_tier;
pub mod idempotency;
pub mod message;
pub mod stream_sync;
pub mod valkey;

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;

use crate::config::{AckMode, Config, StorageBackend};
use hot_tier::{HotTier, HotTierLimits, Order, Page, PageQuery, TopicStats};
use idempotency::{KeyRecord, Lookup};
use message::{Message, MessageId};
use valkey::{BehindDecision, ServerInfo, TierConfig, ValkeyTier};

/// One message to append, already validated by the HTTP layer. `Send`: it may travel to the
/// owning shard.
#[derive(Debug, Clone)]
pub struct PublishItem {
    pub topic: String,
    /// The payload JSON exactly as the producer sent it. Copied out of the request buffer
    /// (never a slice of it), so a retained message does not pin a whole read buffer.
    pub payload: Bytes,
    /// Compact JSON object of string → string.
    pub metadata: Option<Bytes>,
    pub ttl_ms: Option<u64>,
    /// The producer's name for this publish (validated by
    /// [`idempotency::validate_key`]): a publish to the same topic with the same key within
    /// `idempotency.window` stores nothing and is answered with this one's ack.
    pub idempotency_key: Option<String>,
}

/// What a producer is told about an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    pub id: MessageId,
    pub timestamp_ms: u64,
}

/// Why a storage operation failed. Each maps to one client-visible outcome in the HTTP layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot take the operation now (Valkey down or stalled, the pending queue
    /// full, shutting down): 503 with `Retry-After`. For a publish, the message may or may not
    /// have been stored (a reply lost with its connection): a retry can duplicate it.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Valkey refused the command (e.g. OOM under `noeviction`): 503 as well, with the cause
    /// logged.
    #[error("storage refused the operation: {0}")]
    Rejected(String),
    /// Memory backend: the idempotency record holds `idempotency.max_keys` keys still inside
    /// their window, so a publish with a new key is refused (503) rather than a remembered
    /// key forgotten early.
    #[error("too many idempotency keys inside their window")]
    TooManyKeys,
}

/// Why messages a consumer asked for are no longer there: the `reason` of a gap signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Removed by count retention (`MAXLEN`/`max_messages_per_topic`) or the trim endpoint.
    Trimmed,
    /// Removed because a message's `ttl` or the topic's age retention ran out.
    Expired,
    /// Evicted from memory by the byte budget (memory backend).
    Evicted,
    /// The topic (stream) was deleted, or recreated or emptied since.
    Deleted,
    /// Removed, but storage cannot tell how (e.g. another client's `XDEL`).
    Unknown,
    /// The stream lost entries at its end that had been stored (and maybe delivered): a
    /// Valkey failover that promoted a replica the newest entries had not reached, a flush, or
    /// the stream recreated behind the relay's back. What the consumer saw after the point it
    /// resumes from may no longer exist, and what it did not see of that range never will.
    Rewound,
}

impl GapReason {
    /// The wire name: the `reason` field of every gap frame, event and entry.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Trimmed => "trimmed",
            GapReason::Expired => "expired",
            GapReason::Evicted => "evicted",
            GapReason::Deleted => "deleted",
            GapReason::Unknown => "unknown",
            GapReason::Rewound => "rewound",
        }
    }
}

/// What storage knows of a gap after a consumer's position: messages after it are gone;
/// `oldest_available` is the oldest message still there (`None`: nothing after the position
/// is retained any more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapInfo {
    pub oldest_available: Option<MessageId>,
    pub reason: GapReason,
}

/// The backend behind the hot tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Messages live only in the hot tier and are lost on restart.
    Memory,
    /// Messages are persisted to Valkey Streams; the hot tier caches the newest.
    Valkey,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Valkey => "valkey",
        }
    }
}

/// Counts one shard reports for `/health`, `/ready` and, later, metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageSummary {
    pub topics: usize,
    pub messages: usize,
    pub bytes: usize,
    pub evictions: u64,
    pub expirations: u64,
    /// Shards whose persistent tier is connected (all of them with the memory backend).
    pub connected_shards: usize,
    /// Commands queued or in flight to Valkey.
    pub pending: usize,
}

impl std::ops::Add for StorageSummary {
    type Output = StorageSummary;
    fn add(self, o: StorageSummary) -> StorageSummary {
        StorageSummary {
            topics: self.topics + o.topics,
            messages: self.messages + o.messages,
            bytes: self.bytes + o.bytes,
            evictions: self.evictions + o.evictions,
            expirations: self.expirations + o.expirations,
            connected_shards: self.connected_shards + o.connected_shards,
            pending: self.pending + o.pending,
        }
    }
}

enum Backend {
    /// With the shard's record of idempotency keys (the Valkey backend's is in Valkey).
    Memory(RefCell<KeyRecord>),
    Valkey(Rc<ValkeyTier>),
}

/// A shard's store: the hot tier and the backend behind it.
pub struct Storage {
    backend: Backend,
    /// Borrowed only inside synchronous sections, never across an `.await`, so concurrent
    /// tasks on the shard cannot observe a half-applied operation or panic on re-borrow.
    hot: RefCell<HotTier>,
    /// Every acknowledged message, in id order per topic, for real-time delivery.
    feed: feed::AppendFeed,
    /// With Valkey: which topics memory mirrors, how far, and whether reads may trust it.
    sync: Option<stream_sync::StreamSync>,
    /// Memory backend: the consumer groups of this shard's topics (Valkey keeps its own).
    groups: RefCell<group::MemoryGroups>,
}

impl Storage {
    /// The store for shard `shard` of `shards`. Each shard gets an equal share of the process
    /// memory budget: topics hash evenly, and a per-shard budget keeps eviction a local,
    /// lock-free decision. With the Valkey backend this starts the shard's client, so it must
    /// run on the shard's executor; it fails only on settings the client refuses (an
    /// unreadable CA file, say).
    pub fn new(config: &Config, shard: usize, shards: usize) -> Result<Storage, String> {
        let max_bytes = (config.memory.max_bytes / shards.max(1)).max(1);
        let window_ms = duration_ms(config.idempotency.window);
        match config.storage.backend {
            StorageBackend::Memory => Ok(Storage {
                backend: Backend::Memory(RefCell::new(KeyRecord::new(
                    window_ms,
                    (config.idempotency.max_keys / shards.max(1)).max(1),
                ))),
                feed: feed::AppendFeed::new(),
                sync: None,
                groups: RefCell::new(group::MemoryGroups::new()),
                hot: RefCell::new(HotTier::new(HotTierLimits {
                    max_messages_per_topic: config.storage.max_messages_per_topic,
                    retention_ms: duration_ms(config.storage.persistent_tier_retention),
                    max_bytes,
                })),
            }),
            StorageBackend::Valkey => {
                let mut client_config = crate::valkey::client_config(config, shard);
                // Every append goes through this library's function: each connection makes
                // sure it is loaded before it carries a command.
                client_config.connect.library = Some(valkey::LIBRARY);
                let client = crate::valkey::Client::start(client_config)
                    .map_err(|e| format!("valkey client: {e}"))?;
                let tier = ValkeyTier::new(
                    client,
                    TierConfig {
                        stream_key: config.valkey.stream_key.clone(),
                        meta_key: config.valkey.meta_key.clone(),
                        idempotency_key: config.valkey.idempotency_key.clone(),
                        max_len: config.storage.max_messages_per_topic,
                        retention_ms: duration_ms(config.storage.persistent_tier_retention),
                        idempotency_window_ms: window_ms,
                        ack: config.durability.ack,
                        shard,
                        shards,
                        max_behind: config.valkey.max_pending,
                        instance_id: crate::instance::id().to_owned(),
                    },
                );
                let mut connect = crate::valkey::client_config(config, shard).connect;
                connect.client_name = format!("pulsar-relay-shard{shard}-pubsub");
                let subscribed = match tier.client.topology() {
                    // Valkey Cluster: one connection per master, channels placed by slot.
                    Some(topology) => {
                        crate::valkey::subscriber::Subscriber::start_cluster(connect, topology)
                    }
                    None => crate::valkey::subscriber::Subscriber::start(connect),
                };
                let (subscriber, pushes) =
                    subscribed.map_err(|e| format!("valkey pub/sub: {e}"))?;
                let (work_tx, work) = futures::channel::mpsc::unbounded();
                let (conflicts_tx, conflicts) = futures::channel::mpsc::unbounded();
                tier.report_writer_conflicts(conflicts_tx);
                let sync = stream_sync::StreamSync::new(
                    subscriber,
                    work_tx,
                    stream_sync::SyncInputs {
                        pushes,
                        work,
                        conflicts,
                    },
                );
                Ok(Storage {
                    backend: Backend::Valkey(Rc::new(tier)),
                    feed: feed::AppendFeed::new(),
                    sync: Some(sync),
                    groups: RefCell::new(group::MemoryGroups::new()),
                    hot: RefCell::new(HotTier::new(HotTierLimits {
                        max_messages_per_topic: config
                            .hot_tier
                            .max_messages
                            .min(config.storage.max_messages_per_topic),
                        retention_ms: duration_ms(
                            config
                                .hot_tier
                                .retention
                                .min(config.storage.persistent_tier_retention),
                        ),
                        max_bytes,
                    })),
                })
            }
        }
    }

    pub fn backend(&self) -> BackendKind {
        match self.backend {
            Backend::Memory(_) => BackendKind::Memory,
            Backend::Valkey(_) => BackendKind::Valkey,
        }
    }

    /// The Valkey tier, when that is the backend.
    pub fn valkey(&self) -> Option<&Rc<ValkeyTier>> {
        match &self.backend {
            Backend::Valkey(tier) => Some(tier),
            Backend::Memory(_) => None,
        }
    }

    /// The append feed delivery subscribes to.
    pub fn feed(&self) -> &feed::AppendFeed {
        &self.feed
    }

    /// Appends messages; one result per item, in item order. With Valkey and
    /// `ack = persisted` a result is `Ok` only once Valkey has stored the message. What was
    /// appended reaches the [`feed`](Storage::feed) before this returns.
    pub async fn publish(
        &self,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        let results = self.append(items, now_ms).await;
        self.feed.flush();
        results
    }

    async fn append(
        &self,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        match &self.backend {
            Backend::Memory(keys) => self.append_in_memory(keys, items, now_ms),
            Backend::Valkey(tier) => match tier.ack {
                AckMode::Persisted | AckMode::Replicated => {
                    self.publish_persisted(tier, items, now_ms).await
                }
                AckMode::Buffered => self.publish_buffered(tier, items, now_ms).await,
            },
        }
    }

    /// `ack = persisted`/`replicated` (and topics degraded from `buffered`): a result is `Ok`
    /// once Valkey stored the message; stored messages reach the hot tier and the feed in id
    /// order.
    async fn publish_persisted(
        &self,
        tier: &Rc<ValkeyTier>,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        let ingest = |topic: &str, message: Message, after: Option<MessageId>| {
            self.ingest_local(topic, message, after)
        };
        tier.publish_persisted(items, now_ms, &ingest).await
    }

    /// The memory backend: each item is checked against the idempotency record and appended
    /// in one synchronous step, so of two attempts with one key (a retry racing its first
    /// attempt included) the second always finds the first's ack.
    fn append_in_memory(
        &self,
        keys: &RefCell<KeyRecord>,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        let mut hot = self.hot.borrow_mut();
        let mut keys = keys.borrow_mut();
        items
            .into_iter()
            .map(|item| {
                if let Some(key) = &item.idempotency_key {
                    match keys.check(&item.topic, key, now_ms) {
                        Lookup::Seen(ack) => return Ok(ack),
                        Lookup::Full => return Err(StoreError::TooManyKeys),
                        Lookup::New => {}
                    }
                }
                let msg = hot.append(
                    &item.topic,
                    item.payload,
                    item.metadata,
                    item.ttl_ms,
                    now_ms,
                );
                let ack = PublishAck {
                    id: msg.id,
                    timestamp_ms: msg.timestamp_ms,
                };
                if let Some(key) = &item.idempotency_key {
                    keys.record(&item.topic, key, ack, now_ms);
                }
                self.feed.append(item.topic, msg);
                Ok(ack)
            })
            .collect()
    }

    /// `ack = buffered`: ids are chosen here, the messages enter the hot tier and the
    /// producer is answered; Valkey is written behind, retried until stored. Trade-off
    /// (documented): a message acknowledged this way is lost if the relay dies before Valkey
    /// stored it. Topics another writer was seen on go through the persisted path instead
    /// (see [`ValkeyTier::degrade_buffered`]).
    ///
    /// Items with an idempotency key are the exception: whether they are stored at all is
    /// Valkey's decision (the key may have been used through another relay), so they are
    /// answered only once the write-behind has written them through the `pulsar_publish`
    /// function, which decides. They keep their place in the topic's id sequence (their ids
    /// are chosen here like the others'), and the topics they are published to are held
    /// (see [`ValkeyTier::assign_buffered_ids`]) until they are decided, so the hot tier and
    /// the feed still see every topic in id order: this request's other items of those
    /// topics enter the hot tier after the decision, and later publishes wait for it.
    async fn publish_buffered(
        &self,
        tier: &Rc<ValkeyTier>,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        if items.iter().any(|item| tier.is_degraded(&item.topic)) {
            return self.publish_split(tier, items, now_ms).await;
        }
        let (ids, hold, stream_lasts) = match tier.assign_buffered_ids(&items, now_ms).await {
            Ok(assigned) => assigned,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        for (topic, stream_last) in &stream_lasts {
            self.check_buffered_start(tier, topic, *stream_last);
        }
        if items.iter().any(|item| tier.is_degraded(&item.topic)) {
            // Degraded just now: nothing was acknowledged yet, publish it the safe way.
            return self.publish_split(tier, items, now_ms).await;
        }
        let messages: Vec<(String, Message)> = items
            .iter()
            .zip(&ids)
            .map(|(item, id)| {
                let message = Message {
                    id: *id,
                    timestamp_ms: now_ms,
                    expires_at_ms: item.ttl_ms.map(|t| now_ms.saturating_add(t)),
                    payload: item.payload.clone(),
                    metadata: item.metadata.clone(),
                };
                (item.topic.clone(), message)
            })
            .collect();
        // Queued before anything is acknowledged: with the write-behind backlog full (Valkey
        // down or slower than the producers) every item gets 503 and nothing enters the hot
        // tier, instead of a 201 for a message the write-behind could not keep.
        let decisions = match tier.enqueue_behind(items, &ids, now_ms) {
            Ok(decisions) => decisions,
            Err(e) => return messages.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut results: Vec<Result<PublishAck, StoreError>> = ids
            .iter()
            .map(|id| {
                Ok(PublishAck {
                    id: *id,
                    timestamp_ms: now_ms,
                })
            })
            .collect();
        let Some(hold) = hold else {
            for (topic, message) in messages {
                self.ingest_buffered(&topic, message);
            }
            return results;
        };
        // Topics no keyed item of this request goes to are cached now, in this synchronous
        // step, like any buffered publish; the held ones once the keyed items are decided.
        let mut held = Vec::new();
        for (index, (topic, message)) in messages.into_iter().enumerate() {
            if hold.holds(&topic) {
                held.push((index, topic, message));
            } else {
                self.ingest_buffered(&topic, message);
            }
        }
        let mut stored = vec![true; results.len()];
        for (index, decision) in decisions.into_iter().enumerate() {
            let Some(decision) = decision else { continue };
            let decision = decision.await.unwrap_or_else(|_| {
                BehindDecision::Failed(StoreError::Unavailable(
                    "the write-behind stopped before the publish was decided".into(),
                ))
            });
            match decision {
                BehindDecision::Stored => {}
                BehindDecision::Duplicate(ack) => {
                    stored[index] = false;
                    results[index] = Ok(ack);
                }
                BehindDecision::Failed(e) => {
                    stored[index] = false;
                    results[index] = Err(e);
                }
            }
        }
        for (index, topic, message) in held {
            if stored[index] {
                self.ingest_buffered(&topic, message);
            }
        }
        drop(hold);
        results
    }

    /// A buffered publish with items of degraded topics: those go through the persisted path
    /// (once none of their own is left in the write-behind backlog, so Valkey's ids come
    /// after them), the others are buffered as usual; results in item order.
    async fn publish_split(
        &self,
        tier: &Rc<ValkeyTier>,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        let (persisted, buffered): (Vec<_>, Vec<_>) = items
            .into_iter()
            .enumerate()
            .partition(|(_, item)| tier.is_degraded(&item.topic));
        let mut results: Vec<Option<Result<PublishAck, StoreError>>> =
            vec![None; persisted.len() + buffered.len()];
        let deadline = std::time::Instant::now() + tier.client.command_timeout();
        while persisted
            .iter()
            .any(|(_, item)| tier.behind_holds(&item.topic))
        {
            if std::time::Instant::now() >= deadline {
                let refused = StoreError::Unavailable(
                    "the write-behind still holds messages of a topic degraded to persisted".into(),
                );
                for (i, _) in &persisted {
                    results[*i] = Some(Err(refused.clone()));
                }
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
        }
        let (persisted_at, persisted_items): (Vec<usize>, Vec<PublishItem>) = persisted
            .into_iter()
            .filter(|(i, _)| results[*i].is_none())
            .unzip();
        let (buffered_at, buffered_items): (Vec<usize>, Vec<PublishItem>) =
            buffered.into_iter().unzip();
        if !persisted_items.is_empty() {
            let done = self.publish_persisted(tier, persisted_items, now_ms).await;
            for (i, r) in persisted_at.into_iter().zip(done) {
                results[i] = Some(r);
            }
        }
        if !buffered_items.is_empty() {
            let done = Box::pin(self.publish_buffered(tier, buffered_items, now_ms)).await;
            for (i, r) in buffered_at.into_iter().zip(done) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Unavailable("not published".into()))))
            .collect()
    }

    /// A page of a topic's history; `None` for a topic this store does not hold. With Valkey,
    /// served from memory when the hot tier covers the whole page.
    pub async fn read(
        &self,
        topic: &str,
        query: &PageQuery,
        now_ms: u64,
    ) -> Result<Option<Page>, StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.hot.borrow().read(topic, query, now_ms)),
            Backend::Valkey(tier) => {
                if self.hot_trusted(topic) {
                    if let Some(page) = self.read_hot(tier, topic, query, now_ms) {
                        return Ok(Some(page));
                    }
                }
                // The sizes of the topic's recent messages size Valkey's first range read.
                let size_hint = self
                    .hot
                    .borrow()
                    .stats(topic)
                    .filter(|s| s.length > 0)
                    .map(|s| s.bytes / s.length);
                let mut page = tier.read(topic, query, now_ms, size_hint).await?;
                if tier.ack == AckMode::Buffered && query.order == Order::Asc {
                    match &mut page {
                        Some(page) => self.append_unwritten_tail(topic, query, page, now_ms),
                        // Not in Valkey yet at all: its messages are all in the backlog.
                        None => page = self.hot.borrow().read(topic, query, now_ms),
                    }
                }
                Ok(page)
            }
        }
    }

    /// `ack = buffered`: an ascending page that reached the end of the Valkey stream goes on
    /// with what the hot tier holds after it: acknowledged messages still waiting in the
    /// write-behind backlog are not in Valkey yet, and a reader must not skip them (they are
    /// the topic's newest, and the hot tier has held every publish since it cached the topic).
    fn append_unwritten_tail(&self, topic: &str, query: &PageQuery, page: &mut Page, now_ms: u64) {
        if page.next_cursor.is_some() || page.messages.len() >= query.limit {
            return;
        }
        let bytes: usize = page.messages.iter().map(Message::footprint).sum();
        if bytes >= query.max_bytes {
            return;
        }
        let after = page.messages.last().map(|m| m.id).or(query.after);
        // Memory lost some of them (count or byte limits) before Valkey got them: the tail
        // starts past a hole, which must come at the start of a page, where a catch-up
        // reports it.
        let hole = after.and_then(|after| self.hot.borrow().gap_after(topic, after));
        if hole.is_some() && !page.messages.is_empty() {
            page.next_cursor = after;
            return;
        }
        let mut tail_query = PageQuery::new(after, Order::Asc, query.limit - page.messages.len());
        tail_query.max_bytes = query.max_bytes - bytes;
        tail_query.stop_at_expired = query.stop_at_expired;
        let tail = self.hot.borrow().read(topic, &tail_query, now_ms);
        if let Some(hole) = hole {
            // A hole before what the tail returns (or before nothing: memory has nothing
            // after it any more, e.g. all aged out); past the tail the rest is still to be
            // written.
            let first = tail.as_ref().and_then(|t| t.messages.first()).map(|m| m.id);
            if first.is_none_or(|first| hole.oldest_available.is_none_or(|o| o <= first)) {
                page.removed_before = Some(hole.reason);
            }
        }
        let Some(tail) = tail else {
            return;
        };
        page.messages.extend(tail.messages);
        page.next_cursor = tail.next_cursor;
        page.expired_before |= tail.expired_before;
    }

    /// Like [`Storage::read`], but steps over pages that held only expired entries (a
    /// Valkey read ends after a bounded scan with a cursor and possibly no messages): the
    /// page returned has messages, or `next_cursor: None` (the end of the topic). For
    /// consumers catching up, whose loop ends at the first empty page.
    pub async fn read_nonempty(
        &self,
        topic: &str,
        query: &PageQuery,
        now_ms: u64,
    ) -> Result<Option<Page>, StoreError> {
        let mut query = query.clone();
        let mut expired_before = false;
        let mut removed_before = None;
        loop {
            match self.read(topic, &query, now_ms).await? {
                Some(page) if page.messages.is_empty() && page.next_cursor.is_some() => {
                    expired_before |= page.expired_before;
                    removed_before = removed_before.or(page.removed_before);
                    query.after = page.next_cursor;
                }
                Some(mut page) => {
                    page.expired_before |= expired_before;
                    page.removed_before = page.removed_before.or(removed_before);
                    return Ok(Some(page));
                }
                None => return Ok(None),
            }
        }
    }

    /// While the topic is in sync (see [`stream_sync`]) the hot tier holds a contiguous run of
    /// the stream up to the last entry announced to this relay, losing only its oldest. So:
    /// - ascending after a cursor at or past the oldest held id: fully covered;
    /// - descending: covered when memory alone fills the page (older pages go to Valkey).
    fn read_hot(
        &self,
        tier: &ValkeyTier,
        topic: &str,
        query: &PageQuery,
        now_ms: u64,
    ) -> Option<Page> {
        // Drop what aged out of memory first, so the coverage below is what memory really
        // holds (cheap: O(removed + 1)).
        self.hot.borrow_mut().expire(now_ms);
        let hot = self.hot.borrow();
        let stats = hot.stats(topic)?;
        let covered_from = stats.first_id.or(stats.last_id)?;
        let mut page = match query.order {
            Order::Asc => {
                let after = query.after?;
                if after < covered_from {
                    return None;
                }
                hot.read(topic, query, now_ms)?
            }
            Order::Desc => {
                let page = hot.read(topic, query, now_ms)?;
                if page.messages.len() < query.limit {
                    return None;
                }
                page
            }
        };
        if query.order == Order::Desc && page.next_cursor.is_none() {
            // Older messages may remain in Valkey: let the client ask.
            page.next_cursor = page.messages.last().map(|m| m.id);
        }
        page.total = tier
            .cached_length(topic)
            .unwrap_or(page.total)
            .max(page.total);
        Some(page)
    }

    pub async fn stats(&self, topic: &str) -> Result<Option<TopicStats>, StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.hot.borrow().stats(topic)),
            Backend::Valkey(tier) => tier.stats(topic).await,
        }
    }

    pub async fn topics(&self) -> Result<Vec<TopicStats>, StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.hot.borrow().topics().collect()),
            Backend::Valkey(tier) => tier.topics().await,
        }
    }

    /// Keeps the newest `keep_count` messages; `None` for an unknown topic.
    pub async fn trim(&self, topic: &str, keep_count: usize) -> Result<Option<usize>, StoreError> {
        let now = crate::clock::now_ms();
        match &self.backend {
            Backend::Memory(_) => Ok(self.hot.borrow_mut().trim(topic, keep_count, now)),
            Backend::Valkey(tier) => {
                let removed = tier.trim(topic, keep_count).await?;
                self.hot.borrow_mut().trim(topic, keep_count, now);
                if removed.is_some_and(|n| n > 0) {
                    self.notify_removed(topic);
                }
                Ok(removed)
            }
        }
    }

    /// Deletes a topic; `false` when it did not exist.
    pub async fn delete(&self, topic: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Memory(_) => {
                self.groups.borrow_mut().drop_topic(topic);
                Ok(self.hot.borrow_mut().delete(topic))
            }
            Backend::Valkey(tier) => {
                let existed = tier.delete(topic).await?;
                let cached = self.hot.borrow_mut().delete(topic);
                if existed {
                    self.notify_removed(topic);
                }
                Ok(existed || cached)
            }
        }
    }

    // ---- consumer groups (see `group`): one method per operation, either backend ----

    pub async fn group_create(
        &self,
        topic: &str,
        name: &str,
        settings: group::GroupSettings,
        start: group::GroupStart,
    ) -> Result<(), group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => {
                let hot = self.hot.borrow();
                self.groups
                    .borrow_mut()
                    .create(&hot, topic, name, settings, start)
            }
            Backend::Valkey(tier) => tier.group_create(topic, name, &settings, start).await,
        }
    }

    pub async fn group_delete(&self, topic: &str, name: &str) -> Result<bool, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.groups.borrow_mut().delete(topic, name)),
            Backend::Valkey(tier) => tier.group_delete(topic, name).await,
        }
    }

    pub async fn group_reset(
        &self,
        topic: &str,
        name: &str,
        to: group::GroupStart,
    ) -> Result<(), group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => {
                let hot = self.hot.borrow();
                self.groups.borrow_mut().reset(&hot, topic, name, to)
            }
            Backend::Valkey(tier) => tier.group_reset(topic, name, to).await,
        }
    }

    pub async fn group_list(
        &self,
        topic: &str,
        now_ms: u64,
    ) -> Result<Vec<group::GroupInfo>, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.groups.borrow().list(&self.hot.borrow(), topic, now_ms)),
            Backend::Valkey(tier) => tier.group_list(topic, now_ms).await,
        }
    }

    pub async fn group_info(
        &self,
        topic: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<group::GroupInfo, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => {
                self.groups
                    .borrow()
                    .info(&self.hot.borrow(), topic, name, now_ms)
            }
            Backend::Valkey(tier) => tier.group_info(topic, name, now_ms).await,
        }
    }

    pub async fn group_settings(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<group::GroupSettings, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => self
                .groups
                .borrow()
                .settings(topic, name)
                .cloned()
                .ok_or(group::GroupError::NotFound),
            Backend::Valkey(tier) => tier.group_settings(topic, name).await,
        }
    }

    /// Hands a consumer up to `request.max` of the group's messages (due ones first with
    /// `request.claim`).
    pub async fn group_take(
        &self,
        topic: &str,
        name: &str,
        request: &group::TakeRequest,
        now_ms: u64,
    ) -> Result<group::Taken, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => {
                let hot = self.hot.borrow();
                self.groups
                    .borrow_mut()
                    .take(&hot, topic, name, request, now_ms)
            }
            Backend::Valkey(tier) => tier.group_take(topic, name, request, now_ms).await,
        }
    }

    /// Acknowledges `ids`; `dead`: the dead-letterer acknowledging what it moved.
    pub async fn group_ack(
        &self,
        topic: &str,
        name: &str,
        ids: &[MessageId],
        dead: bool,
    ) -> Result<group::Settled, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => self.groups.borrow_mut().ack(topic, name, ids, dead),
            Backend::Valkey(tier) => tier.group_ack(topic, name, ids, dead).await,
        }
    }

    /// Makes `ids` due at once (a `nack`); with `consumer`, only those it holds.
    pub async fn group_release(
        &self,
        topic: &str,
        name: &str,
        ids: &[MessageId],
        consumer: Option<&str>,
        now_ms: u64,
    ) -> Result<group::Settled, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => self.groups.borrow_mut().release(topic, name, ids, consumer),
            Backend::Valkey(tier) => tier.group_release(topic, name, ids, consumer, now_ms).await,
        }
    }

    /// Messages `consumer` holds in the group.
    pub async fn group_held_by(
        &self,
        topic: &str,
        name: &str,
        consumer: &str,
        now_ms: u64,
    ) -> Result<usize, group::GroupError> {
        match &self.backend {
            Backend::Memory(_) => self.groups.borrow().held_by(topic, name, consumer, now_ms),
            Backend::Valkey(tier) => tier.group_held_by(topic, name, consumer).await,
        }
    }

    /// Whether a consumer resuming after `after` has missed messages that are gone (removed
    /// by retention, eviction, trim or delete): `Some` names the oldest message still
    /// available (if any) and why the others left; `None` means nothing after `after` was
    /// lost.
    pub async fn gap_after(
        &self,
        topic: &str,
        after: MessageId,
    ) -> Result<Option<GapInfo>, StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.hot.borrow().gap_after(topic, after)),
            Backend::Valkey(tier) => tier.gap_after(topic, after).await,
        }
    }

    /// Applies age retention and message ttls to the hot tier, and forgets idempotency keys
    /// whose window ended (memory backend); run by the shard's sweeper.
    pub fn expire(&self, now_ms: u64) -> usize {
        if let Backend::Memory(keys) = &self.backend {
            keys.borrow_mut().expire(now_ms);
        }
        self.hot.borrow_mut().expire(now_ms)
    }

    pub fn summary(&self) -> StorageSummary {
        let hot = self.hot.borrow();
        let (connected, pending) = match &self.backend {
            Backend::Memory(_) => (true, 0),
            Backend::Valkey(tier) => (tier.client.is_connected(), tier.client.pending()),
        };
        StorageSummary {
            topics: hot.topic_count(),
            messages: hot.message_count(),
            bytes: hot.bytes(),
            evictions: hot.evictions(),
            expirations: hot.expirations(),
            connected_shards: usize::from(connected),
            pending,
        }
    }

    /// Valkey's `INFO`, when that is the backend and it answers.
    pub async fn server_info(&self) -> Option<Result<ServerInfo, StoreError>> {
        match &self.backend {
            Backend::Memory(_) => None,
            Backend::Valkey(tier) => Some(tier.server_info().await),
        }
    }

    /// The last id this shard's memory knows for `topic` (issued, or cached from Valkey), even
    /// if that message is gone; no round trip. With Valkey, `None` for a topic not written
    /// through this shard since start. (A follower's position: [`Storage::follow_position`].)
    pub fn last_id(&self, topic: &str) -> Option<MessageId> {
        self.hot.borrow().last_id(topic)
    }

    /// The Valkey tier's metrics, with the stream sync's and its pub/sub connection's.
    pub fn valkey_snapshot(&self) -> Option<crate::metrics::ValkeySnapshot> {
        let mut snap = self.valkey()?.snapshot();
        if let Some((sync, subscriber)) = self.sync_stats() {
            for (name, n) in [
                ("sync_repair", sync.repairs),
                ("sync_repaired_message", sync.repaired_messages),
                ("sync_probe", sync.probes),
                (
                    "sync_probe_found_other_writer",
                    sync.probes_found_other_writer,
                ),
                (
                    "sync_append_after_other_writer",
                    sync.appends_after_another_writer,
                ),
                ("sync_resync", sync.resyncs),
                ("sync_rewind", sync.rewinds),
                ("sync_safety_net_find", sync.safety_net_finds),
                ("pubsub_message", subscriber.messages),
                ("pubsub_connect", subscriber.connects),
            ] {
                snap.operations.insert(name.to_owned(), n);
            }
            snap.errors
                .insert("pubsub_lost".to_owned(), subscriber.lost);
        }
        Some(snap)
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
