//! The stream sync: what keeps a shard's hot tier a cache of the Valkey streams, and its
//! append feed complete and in stream order, when other relays (or any other client) append
//! to the same streams. Design and reasons: `docs/scaling.md`, "Several relays on one Valkey".
//!
//! Valkey is the only sequencer of a topic's ids; the hot tier is never a second source of
//! truth. Per *tracked* topic (one this shard owns that has followers on this relay, or that
//! its hot tier holds) the sync keeps:
//! - **`fed_to`**: the last id handed to the append feed. The hot tier's run of the topic is a
//!   contiguous run of the stream ending there, and everything the feed hands out is in
//!   stream order with nothing skipped: a message enters only if it directly follows
//!   `fed_to` in the stream.
//! - **the subscription** to the topic's feed channel (the shard's one
//!   [`crate::valkey::subscriber`] connection), and **`in_sync`**: subscribed (confirmed) and
//!   repaired since. Only then may reads be served from memory (`Storage::read`); otherwise
//!   they go to Valkey.
//!
//! Messages enter three ways, one at a time per topic (a per-topic worker task serialises
//! everything that awaits):
//! - **local persisted publishes**, in reply order. Each comes with the id of the entry it was
//!   appended after (the `pulsar_append` Function returns it): a message appended right after
//!   `fed_to`, or whose id is its immediate successor (same millisecond, next sequence:
//!   nothing fits between), enters at once. Otherwise someone else appended in between, or
//!   (without that id) a *probe* (`XRANGE key (prev (id COUNT 1`) must tell, and the topic is
//!   repaired: the read brings the local message too, in stream order.
//! - **local buffered publishes** (`ack: buffered`, ids chosen here): at acknowledgement. This
//!   relay is then the topic's only writer, or about to learn otherwise (and degrade it).
//! - **repairs**: `XRANGE` pages from `fed_to` on, after a notification of another relay
//!   (`<instance> <last id>` with a last id past `fed_to`), a (re)confirmed subscription, a
//!   removal notification, or the periodic safety net. Each page starts *at* `fed_to`: if
//!   that entry left the stream, the gap verdict (`removal.rs`) says whether entries after it
//!   went too, and if so the topic's consumers are made to resume from their last id (a
//!   [`resync`](super::feed::AppendFeed::resync)), where the resume reports the gap.
//!
//! Does not own the pub/sub connection, the notifications' format or the Valkey reads
//! (`valkey::feed`), nor the task that feeds it events and runs its workers
//! (`crate::replicate`).

use crate::topic::TopicMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};

use super::message::{Message, MessageId};
use super::valkey::{parse_notification, Notification, ValkeyTier};
use super::{GapReason, Storage, StoreError};
use crate::valkey::subscriber::{PushEvent, Subscriber, SubscriberStats};

/// How often the safety net asks Valkey whether tracked topics have entries no notification
/// announced, and drops topics nobody needs any more. Notifications are lost only when a
/// publisher dies between its XADD and its SPUBLISH, when a SPUBLISH fails, or when a writer
/// does not notify at all (the Python relay, `valkey-cli`); a lost pub/sub connection is
/// repaired at once on reconnect, and the next notification of a topic repairs everything
/// before it. So the net only bounds how stale a *quiet* topic can stay: 5 s, for one tiny
/// command per tracked topic (an empty `XRANGE` reply) every 5 s per shard, pipelined.
pub const SAFETY_NET_PERIOD: Duration = Duration::from_secs(5);

/// First and longest pause of a topic's worker after a failed Valkey read.
const RETRY: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// What the shard's replicate task receives (taken once, see [`Storage::take_sync_inputs`]).
pub struct SyncInputs {
    /// Frames the pub/sub connection pushed, in order.
    pub pushes: mpsc::UnboundedReceiver<PushEvent>,
    /// Topics whose worker must be started.
    pub work: mpsc::UnboundedReceiver<String>,
    /// Topics `ack: buffered` found another writer on.
    pub conflicts: mpsc::UnboundedReceiver<String>,
}

/// Counts for metrics (`relay_valkey_operations_total{op="sync_…"}`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncStats {
    pub repairs: u64,
    pub repaired_messages: u64,
    pub probes: u64,
    pub probes_found_other_writer: u64,
    /// Local messages Valkey appended after another writer's entries (no probe needed).
    pub appends_after_another_writer: u64,
    pub resyncs: u64,
    pub safety_net_finds: u64,
    /// Streams found rewound (an id seen stored vanished unexplained).
    pub rewinds: u64,
}

/// One shard's sync state (Valkey backend only).
pub(super) struct StreamSync {
    topics: RefCell<TopicMap<String, TopicSync>>,
    subscriber: Subscriber,
    work: mpsc::UnboundedSender<String>,
    /// Pub/sub connections lost so far: a confirmation holds for the connection it came on.
    epoch: Cell<u64>,
    inputs: RefCell<Option<SyncInputs>>,
    stats: Cell<SyncStats>,
    /// Set at shutdown: workers stop.
    stopped: Cell<bool>,
}

impl StreamSync {
    pub(super) fn new(
        subscriber: Subscriber,
        work: mpsc::UnboundedSender<String>,
        inputs: SyncInputs,
    ) -> StreamSync {
        StreamSync {
            topics: RefCell::new(TopicMap::default()),
            subscriber,
            work,
            epoch: Cell::new(0),
            inputs: RefCell::new(Some(inputs)),
            stats: Cell::new(SyncStats::default()),
            stopped: Cell::new(false),
        }
    }

    fn bump(&self, f: impl FnOnce(&mut SyncStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }
}

/// One tracked topic (see the module doc).
#[derive(Default)]
struct TopicSync {
    /// The last id handed to the append feed; `None`: nothing yet and no follower has asked
    /// where the topic is (the first local message starts the run).
    fed_to: Option<MessageId>,
    /// `fed_to` names an entry the stream stored (a local persisted publish, a repaired entry,
    /// a seed on the newest entry), not an emptied stream's last id: if it vanishes with no
    /// removal to explain it, the stream was rewound.
    fed_entry: bool,
    /// The connection epoch on which the subscription was confirmed; `None`: not (yet).
    confirmed: Option<u64>,
    /// Confirmed and repaired since: memory may serve reads.
    in_sync: bool,
    /// A repair is due.
    repair_wanted: bool,
    /// `fed_to` may be an id the stream does not hold (yet): one chosen here with
    /// `ack: buffered`. The next repair reads after it without asking whether it was removed.
    start_unwritten: bool,
    /// Local persisted messages waiting for the worker (in id order), each with the entry it
    /// was appended after when known.
    local: VecDeque<(Message, Option<MessageId>)>,
    /// A worker task runs for this topic.
    worker: bool,
    /// Followers waiting for the topic's position (a seed read).
    seed_waiters: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

/// What a worker does next.
enum Job {
    Seed,
    Repair,
    Local(Vec<(Message, Option<MessageId>)>),
}

/// The id right after `id` in stream order: nothing can sit between the two.
fn successor(id: MessageId) -> MessageId {
    match id.seq.checked_add(1) {
        Some(seq) => MessageId::new(id.ms, seq),
        None => MessageId::new(id.ms.saturating_add(1), 0),
    }
}

/// The id right before `id` in stream order (`0-0` stays `0-0`).
fn id_before(id: MessageId) -> MessageId {
    match id.seq.checked_sub(1) {
        Some(seq) => MessageId::new(id.ms, seq),
        None if id.ms > 0 => MessageId::new(id.ms - 1, u64::MAX),
        None => id,
    }
}

/// A position as the delivery layer knows it: `0-0` (an empty or missing stream) is "no
/// message yet".
fn as_position(id: MessageId) -> Option<MessageId> {
    (id != MessageId::MIN).then_some(id)
}

impl Storage {
    /// The inputs of this shard's replicate task; `None` with the memory backend or once
    /// taken.
    pub fn take_sync_inputs(&self) -> Option<SyncInputs> {
        self.sync.as_ref()?.inputs.borrow_mut().take()
    }

    /// Sync counters and the pub/sub connection's, for metrics.
    pub fn sync_stats(&self) -> Option<(SyncStats, SubscriberStats)> {
        let sync = self.sync.as_ref()?;
        Some((sync.stats.get(), sync.subscriber.stats()))
    }

    /// Whether memory may serve reads of `topic` (always with the memory backend): in sync,
    /// and nothing stored waits to enter it (a local message whose probe is under way, a
    /// repair reading), so a producer reading back what it was just acknowledged sees it.
    pub(super) fn hot_trusted(&self, topic: &str) -> bool {
        match &self.sync {
            None => true,
            Some(sync) => sync
                .topics
                .borrow()
                .get(topic)
                .is_some_and(|s| s.in_sync && !s.worker && s.local.is_empty()),
        }
    }

    /// Where `topic` is for a follower that registered just before: every message after the
    /// returned id reaches it through the feed. `None`: the topic holds no message, or (not
    /// `locate`) the position is not known yet. With Valkey this starts tracking the topic
    /// (its subscription, and a seed read of the stream's position if nothing is known of it
    /// yet); with `locate` it waits for that read, whose failure is then the answer, without
    /// it the read runs in the background (see `ReplayQuery::locate`).
    pub async fn follow_position(
        &self,
        topic: &str,
        locate: bool,
    ) -> Result<Option<MessageId>, StoreError> {
        let Some(sync) = &self.sync else {
            return Ok(self.hot.borrow().last_id(topic));
        };
        let waiting = {
            let mut topics = sync.topics.borrow_mut();
            let state = self.track(&mut topics, topic);
            if let Some(fed) = state.fed_to {
                return Ok(as_position(fed));
            }
            if !locate {
                // A seed with nobody waiting: retried until it succeeds.
                state.repair_wanted = true;
                self.ensure_worker(topic, state);
                return Ok(None);
            }
            let (tx, rx) = oneshot::channel();
            state.seed_waiters.push(tx);
            self.ensure_worker(topic, state);
            rx
        };
        waiting
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("shard stopping".into())))?;
        Ok(sync
            .topics
            .borrow()
            .get(topic)
            .and_then(|s| s.fed_to)
            .and_then(as_position))
    }

    /// A local persisted message (in reply order per topic) for the hot tier and the feed;
    /// `after`: the stream entry it was appended after, if Valkey said.
    pub(super) fn ingest_local(&self, topic: &str, message: Message, after: Option<MessageId>) {
        let Some(sync) = &self.sync else {
            return self.accept(topic, message);
        };
        let mut topics = sync.topics.borrow_mut();
        let state = self.track(&mut topics, topic);
        if state.fed_to.is_some_and(|fed| message.id <= fed) {
            // A repair read it from the stream already.
            return;
        }
        let idle = !state.worker && state.local.is_empty();
        // Unknown predecessor and nobody following yet: the run starts here. Appended right
        // after the run's end, or its immediate successor: nothing sits between.
        let follows = match state.fed_to {
            None => true,
            Some(fed) => after == Some(fed) || message.id == successor(fed),
        };
        if idle && follows {
            state.fed_to = Some(message.id);
            state.fed_entry = true;
            drop(topics);
            self.accept(topic, message);
            return;
        }
        state.local.push_back((message, after));
        self.ensure_worker(topic, state);
    }

    /// A message acknowledged with `ack: buffered` (its id chosen here, not in Valkey yet).
    pub(super) fn ingest_buffered(&self, topic: &str, message: Message) {
        if let Some(sync) = &self.sync {
            let mut topics = sync.topics.borrow_mut();
            let state = self.track(&mut topics, topic);
            if state.fed_to.is_some_and(|fed| message.id <= fed) {
                return;
            }
            state.fed_to = Some(message.id);
            state.fed_entry = false;
            state.start_unwritten = true;
        }
        self.accept(topic, message);
    }

    /// What a buffered publish learnt of `topic`'s stream (its last id): entries there that
    /// this shard never fed were written by someone else.
    pub(super) fn check_buffered_start(
        &self,
        tier: &ValkeyTier,
        topic: &str,
        stream_last: MessageId,
    ) {
        let Some(sync) = &self.sync else { return };
        let fed = sync.topics.borrow().get(topic).and_then(|s| s.fed_to);
        if fed.is_some_and(|fed| stream_last > fed) {
            tier.degrade_buffered(
                topic,
                "its stream holds entries this relay did not write after the ones it has seen",
            );
        }
    }

    /// Hands `message` to the hot tier and the feed (the caller checked it follows the
    /// topic's run). The feed is flushed by the caller's operation.
    fn accept(&self, topic: &str, message: Message) {
        self.feed.append(topic.to_owned(), message.clone());
        let mut hot = self.hot.borrow_mut();
        if let Err(e) = hot.insert(topic, message) {
            // Cannot happen while the sync keeps runs contiguous; memory then defers to Valkey.
            tracing::warn!(topic, error = %e, "out-of-order message: serving the topic from Valkey");
            hot.delete(topic);
        }
    }

    /// The topic's sync state, created (and its channel subscribed) if it is new.
    fn track<'t>(
        &self,
        topics: &'t mut TopicMap<String, TopicSync>,
        topic: &str,
    ) -> &'t mut TopicSync {
        if !topics.contains_key(topic) {
            if let (Some(sync), Some(tier)) = (&self.sync, self.valkey()) {
                sync.subscriber.subscribe(tier.feed_channel(topic));
            }
            topics.insert(topic.to_owned(), TopicSync::default());
        }
        match topics.get_mut(topic) {
            Some(state) => state,
            None => unreachable!("inserted just above"),
        }
    }

    fn ensure_worker(&self, topic: &str, state: &mut TopicSync) {
        let Some(sync) = &self.sync else { return };
        if state.worker || sync.stopped.get() {
            return;
        }
        state.worker = true;
        if sync.work.unbounded_send(topic.to_owned()).is_err() {
            state.worker = false;
        }
    }

    /// What the pub/sub connection pushed.
    pub fn on_push(&self, event: PushEvent) {
        let (Some(sync), Some(tier)) = (&self.sync, self.valkey()) else {
            return;
        };
        match event {
            PushEvent::Lost => {
                sync.epoch.set(sync.epoch.get() + 1);
                for state in sync.topics.borrow_mut().values_mut() {
                    state.confirmed = None;
                    state.in_sync = false;
                }
            }
            PushEvent::Subscribed(channel) => {
                let Some(topic) = tier.topic_of_channel(&channel) else {
                    return;
                };
                let mut topics = sync.topics.borrow_mut();
                let Some(state) = topics.get_mut(topic) else {
                    return;
                };
                state.confirmed = Some(sync.epoch.get());
                state.in_sync = false;
                state.repair_wanted = true;
                self.ensure_worker(topic, state);
            }
            PushEvent::Message { channel, payload } => {
                let Some(topic) = tier.topic_of_channel(&channel) else {
                    return;
                };
                let Some(notification) = parse_notification(&payload) else {
                    tracing::debug!(topic, "unreadable feed notification ignored");
                    return;
                };
                if notification.instance() == tier.instance_id() {
                    return;
                }
                let mut topics = sync.topics.borrow_mut();
                let Some(state) = topics.get_mut(topic) else {
                    return;
                };
                match notification {
                    Notification::Appended { last, .. } => {
                        if tier.writes_buffered(topic) {
                            tier.degrade_buffered(topic, "another relay appended to it");
                        }
                        tier.note_known(topic);
                        if state.fed_to.is_none_or(|fed| last > fed) {
                            state.repair_wanted = true;
                            self.ensure_worker(topic, state);
                        }
                    }
                    Notification::Removed { .. } => {
                        // What memory holds may be gone from the stream: read from Valkey
                        // until the run starts again after the next repair.
                        self.hot.borrow_mut().delete(topic);
                        state.repair_wanted = true;
                        self.ensure_worker(topic, state);
                    }
                }
            }
        }
    }

    /// `ack: buffered` found another writer on `topic` (it is published persisted from now
    /// on): memory may hold ids that will never be stored as such, so it is dropped and the
    /// topic repaired from the stream.
    pub fn on_writer_conflict(&self, topic: &str) {
        let Some(sync) = &self.sync else { return };
        self.hot.borrow_mut().delete(topic);
        let mut topics = sync.topics.borrow_mut();
        let state = self.track(&mut topics, topic);
        state.start_unwritten = true;
        state.repair_wanted = true;
        self.ensure_worker(topic, state);
    }

    /// A trim or delete of `topic` through this relay: the other relays are told.
    pub(super) fn notify_removed(&self, topic: &str) {
        if let Some(tier) = self.valkey() {
            tier.notify_removed(topic);
        }
    }

    /// Runs `topic`'s worker until it has nothing left to do: seeds, repairs and local
    /// messages, one at a time. Started through [`SyncInputs::work`].
    pub async fn sync_worker(&self, topic: &str) {
        let (Some(sync), Some(tier)) = (&self.sync, self.valkey().cloned()) else {
            return;
        };
        let mut failures: u32 = 0;
        loop {
            if sync.stopped.get() {
                return;
            }
            let job = {
                let mut topics = sync.topics.borrow_mut();
                let Some(state) = topics.get_mut(topic) else {
                    return;
                };
                if state.fed_to.is_none() && (!state.seed_waiters.is_empty() || state.repair_wanted)
                {
                    state.repair_wanted = false;
                    Job::Seed
                } else if state.fed_to.is_some() && state.repair_wanted {
                    state.repair_wanted = false;
                    Job::Repair
                } else if !state.local.is_empty() {
                    Job::Local(state.local.drain(..).collect())
                } else {
                    state.worker = false;
                    return;
                }
            };
            let outcome = match job {
                Job::Seed => self.seed(sync, &tier, topic).await,
                Job::Repair => {
                    let repaired = self.repair(sync, &tier, topic).await;
                    if repaired.is_err() {
                        // Read again after the pause (what is already fed stays fed).
                        if let Some(state) = sync.topics.borrow_mut().get_mut(topic) {
                            state.repair_wanted = true;
                        }
                    }
                    repaired
                }
                Job::Local(messages) => self.ingest_local_batch(sync, &tier, topic, messages).await,
            };
            self.feed.flush();
            match outcome {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(topic, error = %e, "stream sync read failed; retrying");
                    let doublings = (failures - 1).min(16);
                    let pause = RETRY.0.saturating_mul(1 << doublings).min(RETRY.1);
                    glommio::timer::sleep(pause).await;
                }
            }
        }
    }

    /// Learns where the stream is (nothing is fed: a follower placed there starts after it).
    async fn seed(
        &self,
        sync: &StreamSync,
        tier: &ValkeyTier,
        topic: &str,
    ) -> Result<(), StoreError> {
        let confirmed = self.confirmed(sync, topic);
        let position = tier.stream_position(topic).await;
        let mut topics = sync.topics.borrow_mut();
        let Some(state) = topics.get_mut(topic) else {
            return Ok(());
        };
        let waiters = std::mem::take(&mut state.seed_waiters);
        match position {
            Ok((position, is_entry)) => {
                if state.fed_to.is_none() {
                    state.fed_to = Some(position);
                    state.fed_entry = is_entry;
                }
                // Subscribed before the read: every later entry is notified.
                if confirmed.is_some() && state.confirmed == confirmed {
                    state.in_sync = true;
                }
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                // Whatever asked for it (a notification) still needs it.
                state.repair_wanted = true;
                for waiter in waiters {
                    let _ = waiter.send(Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    fn confirmed(&self, sync: &StreamSync, topic: &str) -> Option<u64> {
        sync.topics.borrow().get(topic).and_then(|s| s.confirmed)
    }

    /// Reads the stream from `fed_to` to its end and feeds what follows, page by page.
    async fn repair(
        &self,
        sync: &StreamSync,
        tier: &ValkeyTier,
        topic: &str,
    ) -> Result<(), StoreError> {
        let (confirmed, mut from, mut exclusive, mut from_is_entry) = {
            let topics = sync.topics.borrow();
            let Some(state) = topics.get(topic) else {
                return Ok(());
            };
            let Some(from) = state.fed_to else {
                return Ok(());
            };
            (
                state.confirmed,
                from,
                state.start_unwritten || tier.writes_buffered(topic),
                state.fed_entry,
            )
        };
        sync.bump(|s| s.repairs += 1);
        let result = loop {
            let size_hint = self
                .hot
                .borrow()
                .stats(topic)
                .filter(|s| s.length > 0)
                .map(|s| s.bytes / s.length);
            let (mut entries, more) = match tier.read_from(topic, from, !exclusive, size_hint).await
            {
                Ok(read) => read,
                Err(e) => break Err(e),
            };
            let mut removed_after = false;
            if !exclusive {
                if entries.first().map(|(id, _)| *id) == Some(from) {
                    entries.remove(0);
                } else {
                    // `from` left the stream: did entries after it go before this shard read
                    // them? (Asked after the read, so a removal between the two is seen.)
                    // And was `from` itself removed (a removal reaching it, asked as a gap
                    // after the id just before it), or did it vanish?
                    let removed = if from_is_entry {
                        tier.gap_after(topic, id_before(from)).await
                    } else {
                        tier.gap_after(topic, from).await
                    };
                    match removed {
                        Ok(Some(gap)) if gap.reason != GapReason::Rewound => removed_after = true,
                        Ok(_) if from_is_entry => {
                            // Gone with nothing to explain it: the stream lost its end (a
                            // failover, a flush, a recreation). Recorded for every relay's
                            // consumers, and this relay's resume from their last ids.
                            if let Err(e) = tier.record_rewind(topic, from).await {
                                break Err(e);
                            }
                            sync.bump(|s| s.rewinds += 1);
                            removed_after = true;
                        }
                        Ok(gap) => removed_after = gap.is_some(),
                        Err(e) => break Err(e),
                    }
                }
            }
            if !entries.is_empty() {
                // `ack: replicated`: only what the replicas have is handed out.
                if let Err(e) = tier.replication_fence(topic).await {
                    break Err(e);
                }
            }
            if !entries.is_empty() && tier.writes_buffered(topic) {
                tier.degrade_buffered(topic, "its stream holds entries after this relay's own");
            }
            let last_read = entries.last().map(|(id, _)| *id);
            let now = crate::clock::now_ms();
            let mut fed = 0u64;
            if removed_after {
                self.resync_followers(sync, topic);
            }
            // What to do with each new entry, decided while the sync state is borrowed:
            // `Some` feeds it, `None` is an entry due for removal (its ttl or the age
            // retention ran out while this relay had not read it yet).
            let mut steps: Vec<Option<Message>> = Vec::with_capacity(entries.len());
            {
                let mut topics = sync.topics.borrow_mut();
                let Some(state) = topics.get_mut(topic) else {
                    return Ok(());
                };
                state.start_unwritten = false;
                for (id, message) in entries {
                    if state.fed_to.is_some_and(|f| id <= f) {
                        continue;
                    }
                    state.fed_to = Some(id);
                    state.fed_entry = true;
                    steps.push((!tier.is_due(&message, now)).then_some(message));
                }
            }
            let mut in_hole = false;
            for step in steps {
                match step {
                    Some(message) => {
                        in_hole = false;
                        fed += 1;
                        self.accept(topic, message);
                    }
                    None if !in_hole => {
                        // Never handed out (reads never return it either), and never skipped
                        // in silence: what came before goes out, the followers resume from
                        // their last id, where the catch-up reports the expired gap, and
                        // memory's run starts again after it.
                        in_hole = true;
                        self.resync_followers(sync, topic);
                    }
                    None => {}
                }
            }
            self.feed.flush();
            sync.bump(|s| s.repaired_messages += fed);
            match (more, last_read) {
                (true, Some(last)) => {
                    from = last;
                    from_is_entry = true;
                    exclusive = false;
                }
                _ => break Ok(()),
            }
        };
        result?;
        if let Some(state) = sync.topics.borrow_mut().get_mut(topic) {
            // Subscribed before the first read: every entry after what it read is notified.
            if confirmed.is_some() && state.confirmed == confirmed {
                state.in_sync = true;
            }
        }
        Ok(())
    }

    /// Local messages that did not follow `fed_to` directly: fed if the stream holds nothing
    /// of anyone else's between them, else the topic is repaired (the read brings them too).
    async fn ingest_local_batch(
        &self,
        sync: &StreamSync,
        tier: &ValkeyTier,
        topic: &str,
        messages: Vec<(Message, Option<MessageId>)>,
    ) -> Result<(), StoreError> {
        let fed_to = sync.topics.borrow().get(topic).and_then(|s| s.fed_to);
        let messages: Vec<(Message, Option<MessageId>)> = messages
            .into_iter()
            .filter(|(m, _)| fed_to.is_none_or(|fed| m.id > fed))
            .collect();
        if messages.is_empty() {
            return Ok(());
        }
        // Where Valkey named a message's predecessor, it says whether anything sits between;
        // the others are probed.
        let mut pairs = Vec::new();
        let mut interleaved = false;
        if let Some(fed) = fed_to {
            let mut before = fed;
            for (m, after) in &messages {
                match after {
                    _ if m.id == successor(before) => {}
                    Some(after) if *after == before => {}
                    Some(_) => interleaved = true,
                    None => pairs.push((before, m.id)),
                }
                before = m.id;
            }
        }
        if interleaved {
            sync.bump(|s| s.appends_after_another_writer += 1);
            if let Some(state) = sync.topics.borrow_mut().get_mut(topic) {
                state.repair_wanted = true;
            }
            return Ok(());
        }
        if !pairs.is_empty() {
            sync.bump(|s| s.probes += 1);
            match tier.entries_between(topic, &pairs).await {
                Ok(false) => {}
                Ok(true) => {
                    sync.bump(|s| s.probes_found_other_writer += 1);
                    if let Some(state) = sync.topics.borrow_mut().get_mut(topic) {
                        state.repair_wanted = true;
                    }
                    return Ok(());
                }
                Err(e) => {
                    if let Some(state) = sync.topics.borrow_mut().get_mut(topic) {
                        for m in messages.into_iter().rev() {
                            state.local.push_front(m);
                        }
                    }
                    return Err(e);
                }
            }
        }
        let mut topics = sync.topics.borrow_mut();
        let Some(state) = topics.get_mut(topic) else {
            return Ok(());
        };
        if state.fed_to != fed_to {
            // Something else was fed meanwhile (a buffered publish): check these again.
            for m in messages.into_iter().rev() {
                state.local.push_front(m);
            }
            return Ok(());
        }
        if let Some((last, _)) = messages.last() {
            state.fed_to = Some(last.id);
            state.fed_entry = true;
        }
        drop(topics);
        for (message, _) in messages {
            self.accept(topic, message);
        }
        Ok(())
    }

    /// Entries after what the feed handed out were removed before this shard read them:
    /// memory's run ends, and every consumer of the topic on this relay resumes from its last
    /// id (where the resume reports the gap).
    fn resync_followers(&self, sync: &StreamSync, topic: &str) {
        sync.bump(|s| s.resyncs += 1);
        tracing::info!(
            topic,
            "messages were removed from the stream before this relay passed them on: its \
             consumers of the topic resume from their last id and are told of the gap"
        );
        self.hot.borrow_mut().delete(topic);
        self.feed.resync(topic);
    }

    /// The safety net (every [`SAFETY_NET_PERIOD`]): stops tracking topics nobody needs
    /// (`wanted` says which have followers on this relay; memory keeps the others it holds),
    /// then asks Valkey, in one pipeline, which tracked topics have entries past `fed_to`
    /// that no notification announced, and repairs those.
    pub async fn safety_net(&self, wanted: &dyn Fn(&str) -> bool) {
        let (Some(sync), Some(tier)) = (&self.sync, self.valkey().cloned()) else {
            return;
        };
        let mut positions = Vec::new();
        {
            let mut topics = sync.topics.borrow_mut();
            let hot = self.hot.borrow();
            topics.retain(|topic, state| {
                let needed = state.worker
                    || !state.local.is_empty()
                    || !state.seed_waiters.is_empty()
                    || wanted(topic)
                    || hot.stats(topic).is_some();
                if !needed {
                    sync.subscriber.unsubscribe(&tier.feed_channel(topic));
                }
                needed
            });
            for (topic, state) in topics.iter() {
                if let (Some(fed), Some(_), false) = (state.fed_to, state.confirmed, state.worker) {
                    positions.push((topic.clone(), fed));
                }
            }
        }
        if positions.is_empty() {
            return;
        }
        let found = tier.newer_than(&positions).await;
        let mut topics = sync.topics.borrow_mut();
        for ((topic, position), newer) in positions.into_iter().zip(found) {
            if !matches!(newer, Ok(true)) {
                continue;
            }
            let Some(state) = topics.get_mut(&topic) else {
                continue;
            };
            if state.fed_to != Some(position) {
                continue;
            }
            sync.bump(|s| s.safety_net_finds += 1);
            if tier.writes_buffered(&topic) {
                tier.degrade_buffered(&topic, "its stream holds entries after this relay's own");
            }
            tracing::debug!(topic, "safety net: entries no notification announced");
            state.repair_wanted = true;
            self.ensure_worker(&topic, state);
        }
    }

    /// Stops the workers and the pub/sub connection (shutdown).
    pub async fn stop_sync(&self) {
        if let Some(sync) = &self.sync {
            sync.stopped.set(true);
            sync.subscriber.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_leaves_no_room_between() {
        assert_eq!(successor(MessageId::new(5, 1)), MessageId::new(5, 2));
        assert_eq!(successor(MessageId::new(5, u64::MAX)), MessageId::new(6, 0));
        assert_eq!(id_before(MessageId::new(5, 2)), MessageId::new(5, 1));
        assert_eq!(id_before(MessageId::new(5, 0)), MessageId::new(4, u64::MAX));
        assert_eq!(id_before(MessageId::MIN), MessageId::MIN);
        assert_eq!(as_position(MessageId::MIN), None);
        assert_eq!(
            as_position(MessageId::new(1, 0)),
            Some(MessageId::new(1, 0))
        );
    }
}
