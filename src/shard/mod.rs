//! Shards: per-core state, cross-shard requests, topic routing, start-up and shutdown.
//!
//! A [`Shard`] is everything one core owns: its partition of the topics (the [`Storage`]),
//! its connection count, its shutdown gate, and a sender into every shard's inbox. It is
//! `!Send` and reached through `Rc<Shard>` by the tasks of its executor only.
//!
//! Operations on a topic go through the `Shard` methods below ([`Shard::publish_on`],
//! [`Shard::read`], ...): when this shard owns the topic they run on the local store at once;
//! otherwise they travel to the owner as a [`ShardRequest`] and the reply comes back the same
//! way. Handlers never need to know where a topic lives.
//!
//! - [`router`]: topic → owning shard.
//! - [`message`]: the typed cross-shard requests.
//! - [`runtime`]: starting one pinned executor per shard, readiness, signals.
//! - [`shutdown`]: the shard-local shutdown broadcast idle connections wait on.

pub mod message;
pub mod router;
pub mod runtime;
pub mod shutdown;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use glommio::sync::Gate;

use crate::clock::now_ms;
use crate::config::Config;
use crate::delivery::registry::Registry;
use crate::http::response::DateCache;
use crate::store::hot_tier::{Order, Page, PageQuery, TopicStats};
use crate::store::{
    GapInfo, GapReason, PublishAck, PublishItem, Storage, StorageSummary, StoreError,
};
pub use message::{ReplayPage, ReplayQuery, ShardRequest};

/// The sending side of a shard's inbox. Unbounded because the number of requests in flight is
/// already bounded by its producers: each connection has at most one request being handled
/// (pipelined requests are handled in order), and connections per shard are capped. A bounded
/// channel would add a second, deadlock-prone back-pressure path between shards (the trap
/// glommio#555 documents for its channel mesh).
pub type ShardSender = mpsc::UnboundedSender<ShardRequest>;
pub type ShardInbox = mpsc::UnboundedReceiver<ShardRequest>;

/// Why a cross-shard operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShardError {
    /// The owning shard has stopped (shutdown in progress).
    #[error("shard {0} is not running")]
    ShardGone(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// State every shard and the signal thread can see. Touched only at start-up, shutdown and by
/// `/ready`, never per message, so atomics here cost nothing on the hot path.
#[derive(Debug)]
pub struct RuntimeState {
    pub shards: usize,
    /// Shards that have bound their listener and warmed their timers.
    started: AtomicUsize,
    /// Set at the first shutdown signal: `/ready` answers 503 from then on.
    draining: AtomicBool,
}

impl RuntimeState {
    pub fn new(shards: usize) -> RuntimeState {
        RuntimeState {
            shards,
            started: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }
    pub fn mark_started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
    }
    pub fn started_shards(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    pub fn is_ready(&self) -> bool {
        self.started_shards() == self.shards && !self.is_draining()
    }
}

/// One core's share of the relay.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    pub runtime: Arc<RuntimeState>,
    pub storage: Storage,
    /// This shard's consumers and, for the topics it owns, the shards that have consumers.
    pub delivery: Registry,
    /// Plain counters and histograms, read only when a scrape gathers them.
    pub metrics: crate::metrics::ShardMetrics,
    /// Inbox senders of every shard, indexed by shard id (this shard's own included, unused).
    peers: Vec<ShardSender>,
    /// Open client connections on this shard, against `http.max_connections_per_shard`.
    connections: Cell<usize>,
    /// Held by every connection task; shutdown closes it and waits for them to finish.
    pub gate: Gate,
    /// Triggered when this shard starts shutting down: the accept loop stops and connections
    /// close after their current request (idle ones at once).
    pub shutdown: shutdown::ShutdownSignal,
    /// The `Date:` header value, re-formatted at most once a second for all connections.
    date: RefCell<DateCache>,
}

impl Shard {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        runtime: Arc<RuntimeState>,
        storage: Storage,
        peers: Vec<ShardSender>,
    ) -> Shard {
        let per_topic_cap = config
            .metrics
            .per_topic
            .then_some(config.metrics.max_topic_series);
        Shard {
            id,
            config,
            runtime,
            storage,
            delivery: Registry::new(),
            metrics: crate::metrics::ShardMetrics::new(per_topic_cap),
            peers,
            connections: Cell::new(0),
            gate: Gate::new(),
            shutdown: shutdown::ShutdownSignal::new(),
            date: RefCell::new(DateCache::new(SystemTime::now())),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.peers.len()
    }

    pub fn owner_of(&self, topic: &str) -> usize {
        router::owner_of(topic, self.peers.len())
    }

    /// Counts a new connection unless the shard is at its limit.
    pub fn try_open_connection(&self) -> bool {
        let n = self.connections.get();
        if n >= self.config.http.max_connections_per_shard {
            return false;
        }
        self.connections.set(n + 1);
        true
    }

    pub fn close_connection(&self) {
        self.connections
            .set(self.connections.get().saturating_sub(1));
    }

    pub fn connection_count(&self) -> usize {
        self.connections.get()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_triggered()
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.trigger();
    }

    /// The current `Date:` header value.
    pub fn with_date<R>(&self, f: impl FnOnce(&DateCache) -> R) -> R {
        let mut date = self.date.borrow_mut();
        date.update(SystemTime::now());
        f(&date)
    }

    /// Sends `request` to shard `owner` and awaits the reply `make` wired into it.
    async fn ask<T>(
        &self,
        owner: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardRequest,
    ) -> Result<T, ShardError> {
        let (tx, rx) = oneshot::channel();
        let peer = self.peers.get(owner).ok_or(ShardError::ShardGone(owner))?;
        peer.unbounded_send(make(tx))
            .map_err(|_| ShardError::ShardGone(owner))?;
        rx.await.map_err(|_| ShardError::ShardGone(owner))
    }

    /// Appends messages that all belong to topics owned by `owner`.
    pub async fn publish_on(
        &self,
        owner: usize,
        items: Vec<PublishItem>,
    ) -> Result<Vec<Result<PublishAck, StoreError>>, ShardError> {
        if owner == self.id {
            return Ok(self.storage.publish(items, now_ms()).await);
        }
        self.ask(owner, |reply| ShardRequest::Publish { items, reply })
            .await
    }

    /// Makes this shard's delivery the listener of its storage's append feed: every message
    /// the store acknowledges goes to this shard's consumers and one copy to every other
    /// shard that registered interest in its topic, in append (id) order.
    pub fn wire_delivery(self: &Rc<Self>) {
        let shard = Rc::downgrade(self);
        self.storage
            .feed()
            .subscribe(Box::new(move |topic, messages| {
                if let Some(shard) = shard.upgrade() {
                    shard.deliver_batch(topic, messages);
                }
            }));
        let shard = Rc::downgrade(self);
        self.storage.feed().subscribe_resync(Box::new(move |topic| {
            if let Some(shard) = shard.upgrade() {
                shard.resync_followers(topic);
            }
        }));
    }

    /// Every consumer of `topic` on this relay must resume from its last id (see
    /// [`crate::store::feed::AppendFeed::resync`]): this shard's, and those of the shards
    /// that registered interest.
    fn resync_followers(&self, topic: &str) {
        self.delivery.resync_local(topic);
        for shard in self.delivery.interested_shards(topic) {
            if let Some(peer) = self.peers.get(shard) {
                let _ = peer.unbounded_send(ShardRequest::Resync {
                    topic: topic.to_owned(),
                });
            }
        }
    }

    fn deliver_batch(&self, topic: &str, messages: Vec<crate::store::message::Message>) {
        let acked_at = std::time::Instant::now();
        self.delivery.deliver_local(topic, &messages, acked_at);
        for shard in self.delivery.interested_shards(topic) {
            if let Some(peer) = self.peers.get(shard) {
                let _ = peer.unbounded_send(ShardRequest::Deliver {
                    topic: topic.to_owned(),
                    messages: messages.clone(),
                    acked_at,
                });
            }
        }
    }

    /// This shard's metrics and stats.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let mut snap = self.metrics.snapshot(self.id);
        snap.parked_polls = self.delivery.parked();
        snap.connections = self.connection_count();
        snap.consumers = self.delivery.consumer_count();
        snap.storage = self.storage.summary();
        snap.valkey = self.storage.valkey_snapshot();
        snap
    }

    /// Every shard's snapshot, in shard order.
    pub async fn gather_snapshots(&self) -> Vec<crate::metrics::Snapshot> {
        let mut all = Vec::with_capacity(self.shard_count());
        for owner in 0..self.shard_count() {
            if owner == self.id {
                all.push(self.snapshot());
            } else if let Ok(snap) = self
                .ask(owner, |reply| ShardRequest::Snapshot { reply })
                .await
            {
                all.push(snap);
            }
        }
        all
    }

    /// For a consumer on this shard: registers this shard's interest in `topic` with its
    /// owner, then reads the page `query` names (see [`ShardRequest::SubscribeRead`]).
    pub async fn subscribe_read(
        &self,
        topic: &str,
        query: ReplayQuery,
    ) -> Result<ReplayPage, ShardError> {
        let owner = self.owner_of(topic);
        if owner == self.id {
            return Ok(replay_page(self, topic, query).await?);
        }
        Ok(self
            .ask(owner, |reply| ShardRequest::SubscribeRead {
                topic: topic.to_owned(),
                shard: self.id,
                query,
                reply,
            })
            .await??)
    }

    /// This shard's last consumer of `topic` left: the owner stops forwarding it here.
    pub fn withdraw_interest(&self, topic: &str) {
        let owner = self.owner_of(topic);
        if owner != self.id {
            if let Some(peer) = self.peers.get(owner) {
                let _ = peer.unbounded_send(ShardRequest::Withdraw {
                    topic: topic.to_owned(),
                    shard: self.id,
                });
            }
        }
    }

    pub async fn read(&self, topic: String, query: PageQuery) -> Result<Option<Page>, ShardError> {
        let owner = self.owner_of(&topic);
        if owner == self.id {
            return Ok(self.storage.read(&topic, &query, now_ms()).await?);
        }
        Ok(self
            .ask(owner, |reply| ShardRequest::Read {
                topic,
                query,
                reply,
            })
            .await??)
    }

    pub async fn stats(&self, topic: String) -> Result<Option<TopicStats>, ShardError> {
        let owner = self.owner_of(&topic);
        if owner == self.id {
            return Ok(self.storage.stats(&topic).await?);
        }
        Ok(self
            .ask(owner, |reply| ShardRequest::Stats { topic, reply })
            .await??)
    }

    pub async fn trim(
        &self,
        topic: String,
        keep_count: usize,
    ) -> Result<Option<usize>, ShardError> {
        let owner = self.owner_of(&topic);
        if owner == self.id {
            return Ok(self.storage.trim(&topic, keep_count).await?);
        }
        Ok(self
            .ask(owner, |reply| ShardRequest::Trim {
                topic,
                keep_count,
                reply,
            })
            .await??)
    }

    pub async fn delete(&self, topic: String) -> Result<bool, ShardError> {
        let owner = self.owner_of(&topic);
        if owner == self.id {
            return Ok(self.storage.delete(&topic).await?);
        }
        Ok(self
            .ask(owner, |reply| ShardRequest::Delete { topic, reply })
            .await??)
    }

    /// Every topic of every shard, sorted by name (map-reduce over the shards).
    pub async fn all_topics(&self) -> Result<Vec<TopicStats>, ShardError> {
        let mut all = Vec::new();
        for owner in 0..self.shard_count() {
            let part = if owner == self.id {
                self.storage.topics().await?
            } else {
                self.ask(owner, |reply| ShardRequest::Topics { reply })
                    .await??
            };
            all.extend(part);
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Storage counts summed over every shard.
    pub async fn storage_summary(&self) -> Result<StorageSummary, ShardError> {
        let mut sum = StorageSummary::default();
        for owner in 0..self.shard_count() {
            let part = if owner == self.id {
                self.storage.summary()
            } else {
                self.ask(owner, |reply| ShardRequest::Summary { reply })
                    .await?
            };
            sum = sum + part;
        }
        Ok(sum)
    }
}

/// Serves requests other shards send this one until the inbox closes or `Shutdown` arrives.
/// Each request runs as its own task so a slow operation (later: a Valkey round trip) does
/// not hold up the requests queued behind it.
pub async fn serve_inbox(shard: Rc<Shard>, mut inbox: ShardInbox) {
    while let Some(request) = inbox.next().await {
        if matches!(request, ShardRequest::Shutdown) {
            shard.begin_shutdown();
            break;
        }
        let shard = shard.clone();
        glommio::spawn_local(async move { handle_request(&shard, request).await }).detach();
    }
    // Keep answering peers while the rest of the shard drains: a peer's in-flight request for
    // one of our topics must still get its reply.
    let drain_shard = shard.clone();
    glommio::spawn_local(async move {
        while let Some(request) = inbox.next().await {
            if !matches!(request, ShardRequest::Shutdown) {
                handle_request(&drain_shard, request).await;
            }
        }
    })
    .detach();
}

/// Reads a page of history for a consumer catching up (owner side).
async fn replay_page(
    shard: &Shard,
    topic: &str,
    query: ReplayQuery,
) -> Result<ReplayPage, StoreError> {
    // The caller registered the interest just now, so everything the feed hands out after
    // this id is forwarded to the consumer (memory backend: read before any await).
    let last_id = shard.storage.follow_position(topic, query.locate).await?;
    let page = if query.limit == 0 {
        None
    } else {
        let mut page_query = PageQuery::new(query.after, Order::Asc, query.limit);
        page_query.max_bytes = query.max_bytes;
        page_query.stop_at_expired = true;
        shard
            .storage
            .read_nonempty(topic, &page_query, now_ms())
            .await?
    };
    // Asked after the read, never before: a removal that lands between the two (another
    // publish's `MAXLEN` trim, the write-behind catching up, a sweep) may have taken messages
    // after `after` that the read then skipped, and only a check that comes later sees it.
    // (Removals after the read make the verdict conservative: a gap where none was missed.)
    let mut gap = match (query.check_gap, query.after) {
        (true, Some(after)) => shard.storage.gap_after(topic, after).await?,
        _ => None,
    };
    if let (Some(page), true) = (&page, query.check_gap && query.after.is_some()) {
        if let Some(reason) = page.removed_before.filter(|_| gap.is_none()) {
            gap = Some(GapInfo {
                oldest_available: None,
                reason,
            });
        }
        if page.expired_before && gap.is_none() {
            // Expired messages after the position were skipped, not yet swept: a gap all the
            // same (reads never return an expired message).
            gap = Some(GapInfo {
                oldest_available: None,
                reason: GapReason::Expired,
            });
        }
        if let Some(gap) = &mut gap {
            // What the consumer gets next is the page's first message: entries before it
            // that storage still holds are expired.
            gap.oldest_available = page.messages.first().map(|m| m.id);
        }
    }
    tracing::debug!(
        topic,
        after = ?query.after,
        first = ?page.as_ref().and_then(|p| p.messages.first()).map(|m| m.id),
        last = ?page.as_ref().and_then(|p| p.messages.last()).map(|m| m.id),
        more = page.as_ref().is_some_and(|p| p.next_cursor.is_some()),
        gap = ?gap,
        "replay page"
    );
    Ok(match page {
        Some(page) => ReplayPage {
            more: page.next_cursor.is_some(),
            messages: page.messages,
            gap,
            last_id,
        },
        None => ReplayPage {
            messages: Vec::new(),
            more: false,
            gap,
            last_id,
        },
    })
}

/// Executes one request from a peer and sends the reply. A dropped receiver (the asking
/// connection went away) is not an error: the work is done either way.
async fn handle_request(shard: &Shard, request: ShardRequest) {
    let store = &shard.storage;
    match request {
        ShardRequest::Publish { items, reply } => {
            let _ = reply.send(store.publish(items, now_ms()).await);
        }
        ShardRequest::SubscribeRead {
            topic,
            shard: from,
            query,
            reply,
        } => {
            // Interest first, read second: a message appended in between is both forwarded
            // and (maybe) in the page, and the consumer drops the duplicate; none is missed.
            shard.delivery.set_interest(&topic, from, true);
            let _ = reply.send(replay_page(shard, &topic, query).await);
        }
        ShardRequest::Withdraw { topic, shard: from } => {
            shard.delivery.set_interest(&topic, from, false);
        }
        ShardRequest::Deliver {
            topic,
            messages,
            acked_at,
        } => {
            shard.delivery.deliver_local(&topic, &messages, acked_at);
        }
        ShardRequest::Resync { topic } => {
            shard.delivery.resync_local(&topic);
        }
        ShardRequest::Snapshot { reply } => {
            let _ = reply.send(shard.snapshot());
        }
        ShardRequest::Read {
            topic,
            query,
            reply,
        } => {
            let _ = reply.send(store.read(&topic, &query, now_ms()).await);
        }
        ShardRequest::Stats { topic, reply } => {
            let _ = reply.send(store.stats(&topic).await);
        }
        ShardRequest::Topics { reply } => {
            let _ = reply.send(store.topics().await);
        }
        ShardRequest::Trim {
            topic,
            keep_count,
            reply,
        } => {
            let _ = reply.send(store.trim(&topic, keep_count).await);
        }
        ShardRequest::Delete { topic, reply } => {
            let _ = reply.send(store.delete(&topic).await);
        }
        ShardRequest::Summary { reply } => {
            let _ = reply.send(store.summary());
        }
        ShardRequest::Shutdown => {}
    }
}
