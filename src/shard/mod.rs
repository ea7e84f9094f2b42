//! Shards: per-core state, the owner-call between shards, topic routing, start-up and shutdown.
//!
//! A [`Shard`] is everything one core owns: its partition of the topics (the [`Storage`]),
//! its connection count, its shutdown gate, and a sender into every shard's inbox. It is
//! `!Send` and reached through `Rc<Shard>` by the tasks of its executor only.
//!
//! Operations on a topic are `Shard` methods ([`Shard::publish_on`], [`Shard::read`],
//! [`Shard::subscribe_read`], ...) whose body is one async closure handed to the owner-call
//! [`Shard::invoke_on`]: it runs on the local store at once when this shard owns the topic,
//! else on the owner's executor through its inbox, and its typed result comes back either way.
//! Handlers never need to know where a topic lives, and a new operation is one such method.
//!
//! - [`call`]: the owner-call ([`Shard::invoke_on`], [`Shard::invoke_on_all`],
//!   [`Shard::post`]), the inbox and the order it keeps.
//! - [`group`]: consumer-group operations (work queues) on the topic's owner, with dead
//!   letters, group metrics and wake-ups.
//! - [`replay`]: the subscribe-read a consumer's catch-up is made of.
//! - [`router`]: topic → owning shard.
//! - [`runtime`]: starting one pinned executor per shard, readiness, signals.
//! - [`shutdown`]: the shard-local shutdown broadcast idle connections wait on.

pub mod call;
pub mod group;
pub mod replay;
pub mod router;
pub mod runtime;
pub mod shutdown;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use glommio::sync::Gate;

use crate::clock::now_ms;
use crate::config::Config;
use crate::delivery::registry::Registry;
use crate::http::response::DateCache;
use crate::store::hot_tier::{Page, PageQuery, TopicStats};
use crate::store::{PublishAck, PublishItem, Storage, StorageSummary, StoreError};
pub use call::{serve_inbox, InboxMessage, RemoteCall, ShardInbox, ShardSender};
pub use replay::{ReplayPage, ReplayQuery};

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
    /// Who a request is: the entrance every transport calls, with this shard's cache.
    pub auth: crate::auth::Auth,
    /// This shard's consumers and, for the topics it owns, the shards that have consumers.
    pub delivery: Registry,
    /// Plain counters and histograms, read only when a scrape gathers them.
    pub metrics: crate::metrics::ShardMetrics,
    /// Browser-safety policies and this shard's rate-limit buckets, consulted for every
    /// API request before it is routed.
    pub guard: crate::http::guard::Guard,
    /// Calls for other shards (and posts to this one) waiting for this turn's flush to their
    /// inboxes.
    pub(crate) outbox: Rc<call::Outbox>,
    /// Open client connections on this shard, against `http.max_connections_per_shard`.
    connections: Cell<usize>,
    /// The timeouts of this shard's HTTP connections (one sweeper, no timer per read).
    pub deadlines: crate::net::deadline::Deadlines,
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
        auth: crate::auth::Auth,
        peers: Vec<ShardSender>,
    ) -> Shard {
        let per_topic_cap = config
            .metrics
            .per_topic
            .then_some(config.metrics.max_topic_series);
        let guard = crate::http::guard::Guard::new(&config);
        Shard {
            id,
            config,
            runtime,
            storage,
            auth,
            delivery: Registry::new(),
            metrics: crate::metrics::ShardMetrics::new(per_topic_cap),
            guard,
            outbox: call::Outbox::new(peers),
            connections: Cell::new(0),
            deadlines: crate::net::deadline::Deadlines::new(),
            gate: Gate::new(),
            shutdown: shutdown::ShutdownSignal::new(),
            date: RefCell::new(DateCache::new(SystemTime::now())),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.outbox.shard_count()
    }

    pub fn owner_of(&self, topic: &str) -> usize {
        router::owner_of(topic, self.shard_count())
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

    /// Appends messages that all belong to topics owned by `owner`.
    pub async fn publish_on(
        &self,
        owner: usize,
        items: Vec<PublishItem>,
    ) -> Result<Vec<Result<PublishAck, StoreError>>, ShardError> {
        self.invoke_on(owner, async move |owner: &Shard| {
            owner.storage.publish(items, now_ms()).await
        })
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
            let topic = topic.to_owned();
            // No reply: a shard that stopped has no consumer left to cut off.
            let _ = self.post(shard, async move |consumers: &Shard| {
                consumers.delivery.resync_local(&topic);
            });
        }
    }

    fn deliver_batch(&self, topic: &str, messages: &[crate::store::message::Message]) {
        let acked_at = std::time::Instant::now();
        self.delivery.deliver_local(topic, messages, acked_at);
        for shard in self.delivery.interested_shards(topic) {
            let topic = topic.to_owned();
            let messages = messages.to_vec();
            // No reply: a shard that stopped has no consumer left to deliver to.
            let _ = self.post(shard, async move |consumers: &Shard| {
                consumers
                    .delivery
                    .deliver_local(&topic, &messages, acked_at);
            });
        }
    }

    /// This shard's metrics and stats.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let mut snap = self.metrics.snapshot(self.id);
        snap.parked_polls = self.delivery.parked();
        snap.connections = self.connection_count();
        snap.rate_limit_buckets = self.guard.tracked_buckets();
        snap.consumers = self.delivery.consumer_count();
        snap.storage = self.storage.summary();
        snap.valkey = self.storage.valkey_snapshot();
        snap.jwks = self
            .auth
            .external
            .as_ref()
            .and_then(|e| e.jwks())
            .map(|j| j.stats());
        snap
    }

    /// Every shard's snapshot, in shard order (a shard that cannot answer is left out).
    pub async fn gather_snapshots(&self) -> Vec<crate::metrics::Snapshot> {
        self.invoke_on_all(async |shard: &Shard| shard.snapshot())
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// This shard's last consumer of `topic` left: the owner stops forwarding it here.
    pub fn withdraw_interest(&self, topic: &str) {
        let owner = self.owner_of(topic);
        if owner != self.id {
            let (topic, from) = (topic.to_owned(), self.id);
            // No reply: an owner that stopped forwards nothing any more.
            let _ = self.post(owner, async move |owner: &Shard| {
                owner.delivery.set_interest(&topic, from, false)
            });
        }
    }

    pub async fn read(&self, topic: String, query: PageQuery) -> Result<Option<Page>, ShardError> {
        let owner = self.owner_of(&topic);
        Ok(self
            .invoke_on(owner, async move |owner: &Shard| {
                owner.storage.read(&topic, &query, now_ms()).await
            })
            .await??)
    }

    pub async fn stats(&self, topic: String) -> Result<Option<TopicStats>, ShardError> {
        let owner = self.owner_of(&topic);
        Ok(self
            .invoke_on(owner, async move |owner: &Shard| {
                owner.storage.stats(&topic).await
            })
            .await??)
    }

    pub async fn trim(
        &self,
        topic: String,
        keep_count: usize,
    ) -> Result<Option<usize>, ShardError> {
        let owner = self.owner_of(&topic);
        Ok(self
            .invoke_on(owner, async move |owner: &Shard| {
                owner.storage.trim(&topic, keep_count).await
            })
            .await??)
    }

    pub async fn delete(&self, topic: String) -> Result<bool, ShardError> {
        let owner = self.owner_of(&topic);
        Ok(self
            .invoke_on(owner, async move |owner: &Shard| {
                owner.storage.delete(&topic).await
            })
            .await??)
    }

    /// Every topic of every shard, sorted by name (map-reduce over the shards).
    pub async fn all_topics(&self) -> Result<Vec<TopicStats>, ShardError> {
        let mut all = Vec::new();
        for part in self
            .invoke_on_all(async |shard: &Shard| shard.storage.topics().await)
            .await
        {
            all.extend(part??);
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Storage counts summed over every shard.
    pub async fn storage_summary(&self) -> Result<StorageSummary, ShardError> {
        let mut sum = StorageSummary::default();
        for part in self
            .invoke_on_all(async |shard: &Shard| shard.storage.summary())
            .await
        {
            sum = sum + part?;
        }
        Ok(sum)
    }
}
