//! The Valkey Streams persistent tier: what the hot tier sits in front of with
//! `STORAGE_BACKEND=valkey`.
//!
//! Owns the mapping between the relay's model and Valkey's: one stream per topic (key from
//! `valkey.stream_key`), one entry per message with the fields `payload`, `timestamp`, and
//! optionally `metadata` and `ttl` (seconds); the entry id is the message id. It builds the
//! commands, parses the replies, discovers topics with `SCAN`, and runs the retention sweep.
//! It does not own the connection (that is [`crate::valkey::Client`], which batches whatever
//! the shard's tasks queue into one pipeline: the group commit) nor the hot tier (owned by
//! [`super::Storage`], which decides when a read can be served from memory).
//!
//! Ordering: every command touching a topic's keys is [routed](crate::valkey::Command::routed)
//! by the topic, so all of them travel over one connection of the shard's client (however
//! many it has) in submission order, and Valkey assigns ids in arrival order: a topic's
//! replies come back in id order, and explicit ids (`ack: buffered`) arrive increasing. The
//! per-topic reorder queue here makes the hot tier see them in that order even though the
//! publishing tasks resume in whatever order the executor picks. A `MULTI`/`EXEC` block is
//! routed by its topic as a whole, so it never straddles connections.
//!
//! Gap detection: Valkey's `max-deleted-entry-id` moves only on `XDEL`, so the relay records
//! what it removes itself in the topic's meta hash (`removed`, `expired_to`, `trimmed_to`,
//! `deleted_to`) and removes heads by exact cuts; [`ValkeyTier::gap_after`] compares that
//! record with `XINFO STREAM`. Exact for everything the relay removes by a cut or delete and
//! for `XDEL`; conservative (a gap from below the first entry) for removals nobody recorded,
//! such as Valkey's own `MAXLEN ~` trims on XADD (see `gap_verdict`).
//!
//! `ack = buffered`: acknowledged messages wait in a bounded write-behind backlog that one
//! writer task per shard sends oldest first, retrying failed batches with the same ids.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::hot_tier::{Order, Page, PageQuery, TopicStats};
use super::message::{write_rfc3339_millis, Message, MessageId};
use super::{GapInfo, GapReason, PublishItem, StoreError};
use crate::config::{AckMode, KeyTemplate};
use crate::valkey::{Client, Command, Reply, ValkeyError};

/// How many entries one range read asks for beyond the page, to skip expired entries without a
/// second round trip in the common case (and to learn whether more follow the page).
const READ_SLACK: usize = 8;

/// A page read from Valkey gives up after this many round trips that found only expired
/// entries; it then returns what it has with a cursor past what it scanned, so a client can
/// continue.
const MAX_READ_ROUNDS: usize = 8;

/// About how many reply bytes one XRANGE of a page read may bring back: the COUNT asked for is
/// this divided by the entry size seen so far. Bounds the memory of one read and how long it
/// holds the shard's shared pipeline, whatever the payload sizes.
const ROUND_BYTES: usize = 1 << 20;

/// The COUNT of a page read's first XRANGE when nothing is known of the entry sizes.
const FIRST_ROUND_ENTRIES: usize = 8;

/// The most entries one XRANGE of a page read asks for.
const MAX_ROUND_ENTRIES: usize = 1024;

/// The Valkey side of one shard's storage.
pub struct ValkeyTier {
    pub client: Rc<Client>,
    stream_key: KeyTemplate,
    meta_key: KeyTemplate,
    /// `MAXLEN ~` bound on every XADD (`storage.max_messages_per_topic`).
    max_len: String,
    max_len_n: u64,
    retention_ms: u64,
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
    lengths: RefCell<HashMap<String, usize>>,
    /// Per topic, publishes whose XADD is in flight, in submission order (see module doc).
    in_flight: RefCell<HashMap<String, VecDeque<Rc<RefCell<Slot>>>>>,
    /// Commands issued, by name (the `relay_valkey_operations_total` metric).
    ops: RefCell<std::collections::BTreeMap<&'static str, u64>>,
    /// Buffered mode only: the last id handed out per topic (ids are chosen here so the
    /// producer can be answered before Valkey replies), and whether it has been checked
    /// against the stream's last id since the last write-behind failure (`false`: read the
    /// stream's last id again before the next id; see [`ValkeyTier::assign_buffered_ids`]).
    buffered_last: RefCell<HashMap<String, (MessageId, bool)>>,
    /// Buffered mode only: acknowledged messages not yet stored, oldest first (see
    /// [`ValkeyTier::enqueue_behind`]).
    behind: RefCell<Behind>,
}

/// The write-behind backlog of `ack = buffered`: every acknowledged message stays here until
/// Valkey stored it (or refused it for good), and one writer task sends it, one batch at a
/// time, oldest first, retrying a failed batch with the same explicit ids. One batch at a
/// time keeps each topic's XADDs in id order on the wire even across reconnects: a later id
/// stored before an earlier retried one would make Valkey refuse the earlier one.
struct Behind {
    queue: VecDeque<BehindItem>,
    /// Payload and metadata bytes in `queue`.
    bytes: usize,
    /// At most this many messages (`valkey.max_pending`) or `BEHIND_MAX_BYTES` wait; a
    /// publish that would exceed it is refused (503) before it is acknowledged.
    max_items: usize,
    /// Wakes the writer task; `None` until the first buffered publish starts it.
    doorbell: Option<futures::channel::mpsc::Sender<()>>,
    /// Whether the writer is sending a batch (for `flush_behind`).
    busy: bool,
    /// Failed batches sent again.
    retries: u64,
    /// Acknowledged messages Valkey refused for good (not retryable): lost.
    lost: u64,
}

/// One acknowledged, not yet stored message.
struct BehindItem {
    item: PublishItem,
    id: MessageId,
    timestamp_ms: u64,
    /// The topic was new to this tier when published: send its meta commands too.
    new_topic: bool,
}

/// How one write-behind XADD ended.
enum BehindOutcome {
    Stored,
    /// Worth sending again (connection lost, timeout, queue full, `-OOM`).
    Retry,
    /// Refused because the stream already holds an id at least as high: stored already (a
    /// reply lost with its connection) or lost; the stream is asked.
    Check,
    /// Refused for good.
    Lost(String),
}

/// One in-flight XADD's outcome, filled when its reply arrives.
enum Slot {
    Waiting,
    Done(Option<Message>),
}

/// Where a read was served from (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    Memory,
    Valkey,
}

impl ValkeyTier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Rc<Client>,
        stream_key: KeyTemplate,
        meta_key: KeyTemplate,
        max_len: usize,
        retention_ms: u64,
        ack: AckMode,
        shard: usize,
        shards: usize,
        max_behind: usize,
    ) -> ValkeyTier {
        ValkeyTier {
            client,
            stream_key,
            meta_key,
            max_len: max_len.to_string(),
            max_len_n: u64::try_from(max_len).unwrap_or(u64::MAX),
            retention_ms,
            ack,
            shard,
            shards,
            known: RefCell::new(BTreeSet::new()),
            discovered: std::cell::Cell::new(false),
            lengths: RefCell::new(HashMap::new()),
            in_flight: RefCell::new(HashMap::new()),
            buffered_last: RefCell::new(HashMap::new()),
            behind: RefCell::new(Behind {
                queue: VecDeque::new(),
                bytes: 0,
                max_items: max_behind.max(BEHIND_BATCH),
                doorbell: None,
                busy: false,
                retries: 0,
                lost: 0,
            }),
            ops: RefCell::new(std::collections::BTreeMap::new()),
        }
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
        ] {
            errors.insert(kind.to_owned(), n);
        }
        crate::metrics::ValkeySnapshot {
            operations: self
                .ops
                .borrow()
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            errors,
            batch_sizes: self.client.batch_histogram(),
            pending: self.client.pending(),
            connected: self.client.is_connected(),
        }
    }

    fn owns(&self, topic: &str) -> bool {
        crate::shard::router::owner_of(topic, self.shards) == self.shard
    }

    /// `XADD <key> MAXLEN ~ <n> <id|*> payload <json> timestamp <rfc3339> [metadata <json>] [ttl <s>]`
    fn encode_xadd(&self, item: &PublishItem, id: Option<MessageId>, timestamp_ms: u64) -> Command {
        let key = self.stream_key.render(&item.topic);
        // The timestamp and the id text share one small buffer and the argument list lives
        // on the stack: this runs once per persisted message, and each allocation saved
        // here is a malloc/free pair on the publish path.
        let mut text = Vec::with_capacity(48);
        write_rfc3339_millis(&mut text, timestamp_ms);
        let ts_end = text.len();
        match id {
            Some(id) => id.write_to(&mut text),
            None => text.push(b'*'),
        }
        let (ts, id_text) = text.split_at(ts_end);
        let ttl_text = item.ttl_ms.map(format_ttl_seconds);
        let mut args: [&[u8]; 14] = [
            b"XADD",
            key.as_bytes(),
            b"MAXLEN",
            b"~",
            self.max_len.as_bytes(),
            id_text,
            b"payload",
            &item.payload,
            b"timestamp",
            ts,
            b"",
            b"",
            b"",
            b"",
        ];
        let mut len = 10;
        if let Some(metadata) = &item.metadata {
            args[len] = b"metadata";
            args[len + 1] = metadata;
            len += 2;
        }
        if let Some(ttl) = &ttl_text {
            args[len] = b"ttl";
            args[len + 1] = ttl.as_bytes();
            len += 2;
        }
        command(&args[..len]).routed(item.topic.as_bytes())
    }

    /// Topic metadata (`created`) for topics this process has not written before, queued in
    /// the same pipeline as their first XADD. `HSETNX` keeps the first creation time across
    /// restarts. Replies are not awaited separately: the caller reads only the XADD replies.
    fn push_meta_for_new_topics(
        &self,
        items: &[PublishItem],
        now_ms: u64,
        commands: &mut Vec<Command>,
    ) {
        let known = self.known.borrow();
        let mut seen: Vec<&str> = Vec::new();
        for item in items {
            let topic = item.topic.as_str();
            if known.contains(topic) || seen.contains(&topic) {
                continue;
            }
            seen.push(topic);
            let mut created = Vec::with_capacity(24);
            write_rfc3339_millis(&mut created, now_ms);
            let key = self.meta_key.render(topic);
            commands.push(on(
                topic,
                &[b"HSETNX", key.as_bytes(), b"created", &created],
            ));
            // A deleted topic's meta is a tombstone that expires (see `delete`); written
            // again, the topic keeps it (its `deleted_to` still names what the delete took).
            commands.push(on(topic, &[b"PERSIST", key.as_bytes()]));
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

    /// Persists `items` and returns, per item, the stored message (id from Valkey) or why it
    /// failed. Messages reach `on_persisted` in id order per topic (see module doc).
    pub async fn publish_persisted(
        &self,
        items: Vec<PublishItem>,
        now_ms: u64,
        on_persisted: &dyn Fn(&str, Message),
    ) -> Vec<Result<Message, StoreError>> {
        let mut commands: Vec<Command> = items
            .iter()
            .map(|item| self.encode_xadd(item, None, now_ms))
            .collect();
        self.push_meta_for_new_topics(&items, now_ms, &mut commands);
        self.count("xadd", items.len());
        if commands.len() > items.len() {
            self.count("hsetnx", (commands.len() - items.len()) / 2);
            self.count("persist", (commands.len() - items.len()) / 2);
        }
        // Queue the commands first: a refused batch (queue full) is answered at once and
        // never enters the per-topic queues, so what they hold stays bounded by
        // `valkey.max_pending` however fast refused publishes arrive. Then reserve each
        // item's place in its topic's queue in the same synchronous section (no await
        // between), so queue order = wire order.
        let call = match self.client.try_submit(&commands) {
            Ok(call) => call,
            Err(e) => {
                let error = store_error(e);
                return items.iter().map(|_| Err(error.clone())).collect();
            }
        };
        let slots: Vec<Rc<RefCell<Slot>>> = {
            let mut in_flight = self.in_flight.borrow_mut();
            items
                .iter()
                .map(|item| {
                    let slot = Rc::new(RefCell::new(Slot::Waiting));
                    // Look up before inserting: the topic is cloned (allocated) only when it
                    // has nothing in flight yet.
                    match in_flight.get_mut(item.topic.as_str()) {
                        Some(queue) => queue.push_back(slot.clone()),
                        None => {
                            in_flight.insert(item.topic.clone(), VecDeque::from([slot.clone()]));
                        }
                    }
                    slot
                })
                .collect()
        };
        let replies = call.await;
        let mut results = Vec::with_capacity(items.len());
        for ((item, slot), reply) in items.into_iter().zip(&slots).zip(replies) {
            let outcome = match reply {
                Ok(Reply::Bulk(id)) => std::str::from_utf8(&id)
                    .ok()
                    .and_then(|s| s.parse::<MessageId>().ok())
                    .ok_or_else(|| StoreError::Unavailable("unexpected XADD reply".into())),
                Ok(other) => Err(StoreError::Unavailable(format!(
                    "unexpected XADD reply: {other:?}"
                ))),
                Err(e) => Err(store_error(e)),
            };
            let message = outcome.map(|id| Message {
                id,
                timestamp_ms: now_ms,
                expires_at_ms: item.ttl_ms.map(|ttl| now_ms.saturating_add(ttl)),
                payload: item.payload,
                metadata: item.metadata,
            });
            if message.is_ok() {
                self.note_written(&item.topic);
            }
            *slot.borrow_mut() = Slot::Done(message.as_ref().ok().cloned());
            results.push((item.topic, message));
        }
        // Hand finished messages to the hot tier in submission order per topic.
        for (topic, _) in &results {
            self.drain_in_flight(topic, on_persisted);
        }
        results.into_iter().map(|(_, r)| r).collect()
    }

    fn drain_in_flight(&self, topic: &str, on_persisted: &dyn Fn(&str, Message)) {
        let mut ready = Vec::new();
        {
            let mut in_flight = self.in_flight.borrow_mut();
            let Some(queue) = in_flight.get_mut(topic) else {
                return;
            };
            while let Some(front) = queue.front() {
                let done = match &*front.borrow() {
                    Slot::Waiting => None,
                    Slot::Done(message) => Some(message.clone()),
                };
                match done {
                    None => break,
                    Some(message) => {
                        queue.pop_front();
                        ready.extend(message);
                    }
                }
            }
            if queue.is_empty() {
                in_flight.remove(topic);
            }
        }
        for message in ready {
            on_persisted(topic, message);
        }
    }

    /// Buffered mode: chooses ids now so the producer is answered at once; the XADDs (with
    /// those explicit ids) are written behind. A topic's first publish since start, and its
    /// first after a write-behind failure (Valkey restarted, another writer may have
    /// appended), reads the stream's last id so new ids stay above it; ids never go back
    /// below ones already handed out.
    pub async fn assign_buffered_ids(
        &self,
        items: &[PublishItem],
        now_ms: u64,
    ) -> Result<Vec<MessageId>, StoreError> {
        for item in items {
            if matches!(
                self.buffered_last.borrow().get(&item.topic),
                Some((_, true))
            ) {
                continue;
            }
            let key = self.stream_key.render(&item.topic);
            self.count("xrevrange", 1);
            let reply = self
                .client
                .call_routed(
                    item.topic.as_bytes(),
                    &[b"XREVRANGE", key.as_bytes(), b"+", b"-", b"COUNT", b"1"],
                )
                .await
                .map_err(store_error)?;
            let last = parse_entries(&reply)
                .first()
                .map(|(id, _)| *id)
                .unwrap_or(MessageId::MIN);
            let mut cached = self.buffered_last.borrow_mut();
            match cached.get_mut(&item.topic) {
                Some(entry) => *entry = (entry.0.max(last), true),
                None => {
                    cached.insert(item.topic.clone(), (last, true));
                }
            }
        }
        let mut last_ids = self.buffered_last.borrow_mut();
        Ok(items
            .iter()
            .map(|item| {
                let last = last_ids.get(&item.topic).map(|(id, _)| *id);
                let id = MessageId::next_after(last, now_ms);
                last_ids.insert(item.topic.clone(), (id, true));
                id
            })
            .collect())
    }

    /// Queues messages about to be acknowledged for the write-behind, or refuses them all at
    /// once if the backlog is full (the producer then gets 503, never an acknowledgement that
    /// would be dropped). Once queued, a message is retried with its id until Valkey stores
    /// it; only a refusal that no retry can change (say `-WRONGTYPE`) loses it, logged as an
    /// error and counted (`relay_valkey_errors_total{kind="buffered_lost"}`).
    pub fn enqueue_behind(
        self: &Rc<Self>,
        items: Vec<PublishItem>,
        ids: &[MessageId],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let bytes: usize = items.iter().map(item_bytes).sum();
        let mut behind = self.behind.borrow_mut();
        if behind.queue.len() + items.len() > behind.max_items
            || behind.bytes.saturating_add(bytes) > BEHIND_MAX_BYTES
        {
            return Err(StoreError::Unavailable(format!(
                "write-behind backlog full ({} messages, {} bytes not yet in Valkey)",
                behind.queue.len(),
                behind.bytes
            )));
        }
        behind.bytes += bytes;
        let mut new_topics: Vec<&str> = Vec::new();
        let known = self.known.borrow();
        let fresh: Vec<bool> = items
            .iter()
            .map(|item| {
                let new =
                    !known.contains(&item.topic) && !new_topics.contains(&item.topic.as_str());
                if new {
                    new_topics.push(&item.topic);
                }
                new
            })
            .collect();
        drop(known);
        for item in &items {
            self.note_written(&item.topic);
        }
        for ((item, id), new_topic) in items.into_iter().zip(ids).zip(fresh) {
            behind.queue.push_back(BehindItem {
                item,
                id: *id,
                timestamp_ms: now_ms,
                new_topic,
            });
        }
        let start = behind.doorbell.is_none();
        if start {
            let (tx, rx) = futures::channel::mpsc::channel(1);
            behind.doorbell = Some(tx);
            drop(behind);
            glommio::spawn_local(write_behind(Rc::downgrade(self), rx)).detach();
            return Ok(());
        }
        // Rung outside the borrow: the executor may run the writer at once. Full means a
        // wake-up is already pending: enough.
        let mut doorbell = behind.doorbell.clone();
        drop(behind);
        if let Some(doorbell) = doorbell.as_mut() {
            let _ = doorbell.try_send(());
        }
        Ok(())
    }

    /// Waits (at most `within`) until the write-behind backlog is empty: at shutdown, before
    /// the client stops taking commands.
    pub async fn flush_behind(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            {
                let behind = self.behind.borrow();
                if behind.queue.is_empty() && !behind.busy {
                    return;
                }
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let left = self.behind.borrow().queue.len();
        if left > 0 {
            tracing::error!(
                messages = left,
                "shutdown: acknowledged buffered messages not stored in Valkey"
            );
        }
    }

    /// Sends the oldest part of the backlog once; returns whether something must be retried.
    async fn send_behind_batch(&self) -> bool {
        let batch: Vec<(PublishItem, MessageId, u64, bool)> = {
            let mut behind = self.behind.borrow_mut();
            behind.busy = true;
            behind
                .queue
                .iter()
                .take(BEHIND_BATCH)
                .map(|b| (b.item.clone(), b.id, b.timestamp_ms, b.new_topic))
                .collect()
        };
        let mut commands: Vec<Command> = batch
            .iter()
            .map(|(item, id, ts, _)| self.encode_xadd(item, Some(*id), *ts))
            .collect();
        for (item, _, ts, new_topic) in &batch {
            if *new_topic {
                let mut created = Vec::with_capacity(24);
                write_rfc3339_millis(&mut created, *ts);
                let key = self.meta_key.render(&item.topic);
                commands.push(on(
                    &item.topic,
                    &[b"HSETNX", key.as_bytes(), b"created", &created],
                ));
                commands.push(on(&item.topic, &[b"PERSIST", key.as_bytes()]));
            }
        }
        self.count("xadd", batch.len());
        let replies = self.client.call_many(&commands).await;
        let mut outcomes: Vec<BehindOutcome> = replies
            .into_iter()
            .take(batch.len())
            .map(|reply| match reply {
                Ok(Reply::Bulk(_)) => BehindOutcome::Stored,
                Ok(other) => BehindOutcome::Lost(format!("unexpected XADD reply: {other:?}")),
                Err(ValkeyError::Server(message)) if message.starts_with("OOM") => {
                    BehindOutcome::Retry
                }
                Err(ValkeyError::Server(message)) if message.contains("equal or smaller") => {
                    BehindOutcome::Check
                }
                Err(ValkeyError::Server(message)) => BehindOutcome::Lost(message),
                Err(_) => BehindOutcome::Retry,
            })
            .collect();
        outcomes.resize_with(batch.len(), || BehindOutcome::Retry);
        // Refused as not above the stream's last id: stored already, or lost. Ask.
        let checks: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, BehindOutcome::Check))
            .map(|(i, _)| i)
            .collect();
        if !checks.is_empty() {
            let commands: Vec<Command> = checks
                .iter()
                .map(|&i| {
                    let key = self.stream_key.render(&batch[i].0.topic);
                    let id = batch[i].1.to_string();
                    on(
                        &batch[i].0.topic,
                        &[b"XRANGE", key.as_bytes(), id.as_bytes(), id.as_bytes()],
                    )
                })
                .collect();
            self.count("xrange", commands.len());
            for (&i, reply) in checks.iter().zip(self.client.call_many(&commands).await) {
                outcomes[i] = match reply {
                    Ok(r) if !parse_entries(&r).is_empty() => BehindOutcome::Stored,
                    Ok(_) => BehindOutcome::Lost(
                        "the stream already holds a higher id (written by someone else?)".into(),
                    ),
                    Err(_) => BehindOutcome::Retry,
                };
            }
        }
        let mut retry = false;
        let mut behind = self.behind.borrow_mut();
        let mut kept = VecDeque::new();
        for outcome in &outcomes {
            let Some(done) = behind.queue.pop_front() else {
                break;
            };
            match outcome {
                BehindOutcome::Stored => {}
                BehindOutcome::Retry | BehindOutcome::Check => {
                    retry = true;
                    kept.push_back(done);
                    continue;
                }
                BehindOutcome::Lost(why) => {
                    behind.lost += 1;
                    tracing::error!(
                        topic = %done.item.topic,
                        id = %done.id,
                        error = %why,
                        "acknowledged buffered message refused by Valkey: LOST"
                    );
                }
            }
            behind.bytes = behind.bytes.saturating_sub(item_bytes(&done.item));
        }
        // What is to be retried goes first again, in its order.
        while let Some(item) = kept.pop_back() {
            behind.queue.push_front(item);
        }
        if retry {
            behind.retries += 1;
        }
        behind.busy = false;
        drop(behind);
        if retry {
            // Valkey may have restarted (lost a tail) or someone else may have written:
            // the next ids are checked against each stream again.
            for entry in self.buffered_last.borrow_mut().values_mut() {
                entry.1 = false;
            }
        }
        retry
    }

    /// A page from Valkey: XRANGE/XREVRANGE with an exclusive cursor, skipping expired
    /// entries, plus XLEN for `total`. `None` when the stream does not exist.
    ///
    /// Bounded three ways, so one request costs about its byte budget and never ends a topic
    /// early:
    /// - each round trip asks for as many entries as fit `ROUND_BYTES` at the sizes seen so
    ///   far (`size_hint`, else a small first probe), never `limit × max payload`;
    /// - the page stops at `query.limit` messages or `query.max_bytes` bytes (a single larger
    ///   message is still returned, alone);
    /// - after `MAX_READ_ROUNDS` round trips of only expired entries the page ends
    ///   with what it has and a `next_cursor` past the last entry scanned, even with no
    ///   messages: `next_cursor: None` means the end of the stream was reached.
    pub async fn read(
        &self,
        topic: &str,
        query: &PageQuery,
        now_ms: u64,
        size_hint: Option<usize>,
    ) -> Result<Option<Page>, StoreError> {
        let key = self.stream_key.render(topic);
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        let mut cursor = query.after;
        // The last entry looked at (returned or skipped as expired): where a next page starts.
        let mut scanned_to: Option<MessageId> = None;
        let mut more_remain = false;
        let mut expired_before = false;
        let mut total = None;
        let mut entry_size = size_hint.map(|s| s.max(1));
        // Round trips that found only expired entries: the scan budget. Rounds that return
        // messages do not count (with large entries a page takes several), so a page ends
        // early only over a long expired run.
        let mut idle_rounds = 0;
        for round in 0.. {
            let full = messages.len() >= query.limit || bytes >= query.max_bytes;
            if full && round > 0 {
                // Filled exactly by the previous round without seeing what follows.
                more_remain = true;
                break;
            }
            let want = query.limit.saturating_sub(messages.len());
            let count = round_count(want, query.max_bytes.saturating_sub(bytes), entry_size);
            let count_text = count.to_string();
            let bound = cursor.map(|c| format!("({c}"));
            let (cmd, start, end): (&[u8], &str, &str) = match query.order {
                Order::Asc => (b"XRANGE", bound.as_deref().unwrap_or("-"), "+"),
                Order::Desc => (b"XREVRANGE", bound.as_deref().unwrap_or("+"), "-"),
            };
            let range = on(
                topic,
                &[
                    cmd,
                    key.as_bytes(),
                    start.as_bytes(),
                    end.as_bytes(),
                    b"COUNT",
                    count_text.as_bytes(),
                ],
            );
            self.count(
                if query.order == Order::Asc {
                    "xrange"
                } else {
                    "xrevrange"
                },
                1,
            );
            let range_reply = if total.is_none() {
                self.count("xlen", 1);
                let xlen = on(topic, &[b"XLEN", key.as_bytes()]);
                let mut replies = self.client.call_many(&[range, xlen]).await;
                let len_reply = replies.pop().unwrap_or_else(missing_reply);
                let range_reply = replies.pop().unwrap_or_else(missing_reply);
                total = Some(match len_reply.map_err(store_error)? {
                    Reply::Integer(n) => usize::try_from(n).unwrap_or(0),
                    _ => 0,
                });
                range_reply
            } else {
                self.client
                    .call_many(&[range])
                    .await
                    .pop()
                    .unwrap_or_else(missing_reply)
            };
            // Parsed entries share the reply's payload buffers; the reply's frames go now.
            let entries = parse_entries(&range_reply.map_err(store_error)?);
            let fetched = entries.len();
            let mut fetched_bytes = 0usize;
            let had = messages.len();
            for (id, message) in entries {
                if messages.len() >= query.limit || bytes >= query.max_bytes {
                    // An entry beyond a full page: more remain.
                    more_remain = true;
                    break;
                }
                let due = is_due(&message, now_ms, self.retention_ms);
                if due && !messages.is_empty() && query.stop_at_expired {
                    // A page ends before an expired entry that follows a message it returns:
                    // the next page starts with that run and reports it (Page::expired_before).
                    more_remain = true;
                    break;
                }
                scanned_to = Some(id);
                fetched_bytes = fetched_bytes.saturating_add(message.footprint());
                if due {
                    expired_before |= messages.is_empty();
                } else {
                    bytes = bytes.saturating_add(message.footprint());
                    messages.push(message);
                }
            }
            if more_remain || fetched < count {
                // A page boundary inside this reply, or the end of the stream.
                break;
            }
            if let Some(size) = fetched_bytes.checked_div(fetched) {
                entry_size = Some(size.max(1));
            }
            cursor = scanned_to;
            if messages.len() == had {
                idle_rounds += 1;
                if idle_rounds == MAX_READ_ROUNDS {
                    // Scan budget spent (a long run of expired entries): let the client go on.
                    more_remain = true;
                    break;
                }
            }
        }
        let total = total.unwrap_or(0);
        let known = self.known.borrow().contains(topic);
        if total == 0 && messages.is_empty() && !known {
            if query.after.is_none() {
                return Ok(None);
            }
        } else {
            // Only streams that exist get a cached length: a client-chosen name read with a
            // cursor must not grow this map.
            self.lengths.borrow_mut().insert(topic.to_owned(), total);
        }
        let next_cursor = if more_remain { scanned_to } else { None };
        Ok(Some(Page {
            messages,
            total,
            next_cursor,
            expired_before,
            removed_before: None,
        }))
    }

    /// The stream length last seen plus appends since (no round trip).
    pub fn cached_length(&self, topic: &str) -> Option<usize> {
        self.lengths.borrow().get(topic).copied()
    }

    /// One topic's stats from `XINFO STREAM`; `None` when the stream does not exist.
    pub async fn stats(&self, topic: &str) -> Result<Option<TopicStats>, StoreError> {
        let key = self.stream_key.render(topic);
        self.count("xinfo", 1);
        match self
            .client
            .call_routed(topic.as_bytes(), &[b"XINFO", b"STREAM", key.as_bytes()])
            .await
        {
            Ok(reply) => Ok(self.parse_xinfo(topic, &reply)),
            Err(e) if is_no_such_key(&e) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Whether a consumer resuming after `after` missed entries that left the stream, and
    /// why: `Some` iff some entry with an id above `after` was removed (see the module doc
    /// for where this is exact and where it is conservative).
    pub async fn gap_after(
        &self,
        topic: &str,
        after: MessageId,
    ) -> Result<Option<GapInfo>, StoreError> {
        let key = self.stream_key.render(topic);
        let meta_key = self.meta_key.render(topic);
        self.count("xinfo", 1);
        self.count("hgetall", 1);
        let mut replies = self
            .client
            .call_many(&[
                on(topic, &[b"XINFO", b"STREAM", key.as_bytes()]),
                on(topic, &[b"HGETALL", meta_key.as_bytes()]),
            ])
            .await;
        let meta_reply = replies.pop().unwrap_or_else(missing_reply);
        let info_reply = replies.pop().unwrap_or_else(missing_reply);
        let meta = RemovalRecord::parse(&meta_reply.map_err(store_error)?);
        let stream = match info_reply {
            Ok(reply) => Some(StreamInfo::parse(&reply)),
            Err(e) if is_no_such_key(&e) => None,
            Err(e) => return Err(store_error(e)),
        };
        Ok(gap_verdict(stream.as_ref(), &meta, after, self.max_len_n))
    }

    fn parse_xinfo(&self, topic: &str, reply: &Reply) -> Option<TopicStats> {
        let Reply::Array(fields) = reply else {
            return None;
        };
        let mut stats = TopicStats {
            name: topic.into(),
            length: 0,
            first_id: None,
            last_id: None,
            oldest_timestamp_ms: None,
            newest_timestamp_ms: None,
            bytes: 0,
        };
        for pair in fields.chunks(2) {
            let [name, value] = pair else { continue };
            match name.as_bytes() {
                Some(b"length") => {
                    if let Reply::Integer(n) = value {
                        stats.length = usize::try_from(*n).unwrap_or(0);
                    }
                }
                Some(b"first-entry") => {
                    if let Some((id, m)) = parse_entry(value) {
                        stats.first_id = Some(id);
                        stats.oldest_timestamp_ms = Some(m.timestamp_ms);
                    }
                }
                Some(b"last-entry") => {
                    if let Some((id, m)) = parse_entry(value) {
                        stats.last_id = Some(id);
                        stats.newest_timestamp_ms = Some(m.timestamp_ms);
                    }
                }
                _ => {}
            }
        }
        self.lengths
            .borrow_mut()
            .insert(topic.to_owned(), stats.length);
        Some(stats)
    }

    /// Every topic of this shard that exists in Valkey, with stats (one pipeline).
    pub async fn topics(&self) -> Result<Vec<TopicStats>, StoreError> {
        if !self.discovered.get() {
            self.discover_topics().await?;
        }
        let names: Vec<String> = self.known.borrow().iter().cloned().collect();
        let commands: Vec<Command> = names
            .iter()
            .map(|topic| {
                on(
                    topic,
                    &[
                        b"XINFO",
                        b"STREAM",
                        self.stream_key.render(topic).as_bytes(),
                    ],
                )
            })
            .collect();
        self.count("xinfo", commands.len());
        let replies = self.client.call_many(&commands).await;
        let mut topics = Vec::with_capacity(names.len());
        for (name, reply) in names.into_iter().zip(replies) {
            let stats = match reply {
                Ok(reply) => self.parse_xinfo(&name, &reply),
                Err(e) if is_no_such_key(&e) => None,
                Err(e) => return Err(store_error(e)),
            };
            match stats {
                Some(stats) => topics.push(stats),
                // Gone from Valkey (deleted by another tool): forget it everywhere, so
                // the per-topic maps hold only topics that exist.
                None => self.forget(&name),
            }
        }
        Ok(topics)
    }

    /// Exact trim to the newest `keep_count`; `None` when the stream does not exist. Removes
    /// the head in bounded rounds (probe, then an exact cut recorded as `trimmed_to`), so a
    /// consumer resuming from the last removed message is told of no gap; a trim too large
    /// for `TRIM_ROUNDS` finishes with one unrecorded `XTRIM MAXLEN`, whose gaps are then
    /// reported conservatively.
    pub async fn trim(&self, topic: &str, keep_count: usize) -> Result<Option<usize>, StoreError> {
        let key = self.stream_key.render(topic);
        self.count("xlen", 1);
        self.count("exists", 1);
        let mut replies = self
            .client
            .call_many(&[
                on(topic, &[b"EXISTS", key.as_bytes()]),
                on(topic, &[b"XLEN", key.as_bytes()]),
            ])
            .await;
        let len = replies.pop().unwrap_or_else(missing_reply);
        let existed = replies.pop().unwrap_or_else(missing_reply);
        if !matches!(existed.map_err(store_error)?, Reply::Integer(n) if n > 0) {
            return Ok(None);
        }
        let len = match len.map_err(store_error)? {
            Reply::Integer(n) => usize::try_from(n).unwrap_or(0),
            other => {
                return Err(StoreError::Unavailable(format!(
                    "unexpected XLEN reply: {other:?}"
                )))
            }
        };
        let mut to_remove = len.saturating_sub(keep_count);
        let mut removed = 0usize;
        let mut entry_size = None;
        for _ in 0..TRIM_ROUNDS {
            if to_remove == 0 {
                break;
            }
            let count = round_count(
                to_remove.saturating_sub(1 + READ_SLACK),
                usize::MAX,
                entry_size,
            )
            .min(to_remove);
            let probe = self.probe_heads(&[(topic, count)]).await?;
            let Some(entries) = probe.into_iter().next() else {
                break;
            };
            let Some(last) = entries.last().map(|(id, _)| *id) else {
                break;
            };
            entry_size = average_footprint(&entries);
            let n = self
                .cut_heads(&[Cut {
                    topic,
                    last,
                    count: entries.len(),
                    field: FIELD_TRIMMED_TO,
                }])
                .await?;
            removed += n;
            to_remove = to_remove.saturating_sub(entries.len());
        }
        if to_remove > 0 {
            // Too large for exact rounds: one bulk trim, flagged so gaps it causes are
            // reported (conservatively) as `trimmed`.
            let keep = keep_count.to_string();
            let meta = self.meta_key.render(topic);
            self.count("xtrim", 1);
            let mut replies = self
                .client
                .call_many(&[
                    on(
                        topic,
                        &[b"XTRIM", key.as_bytes(), b"MAXLEN", keep.as_bytes()],
                    ),
                    on(
                        topic,
                        &[
                            b"HSET",
                            meta.as_bytes(),
                            FIELD_TRIMMED_BULK.as_bytes(),
                            b"1",
                        ],
                    ),
                ])
                .await;
            let _ = replies.pop();
            if let Some(Ok(Reply::Integer(n))) = replies.pop() {
                removed += usize::try_from(n).unwrap_or(0);
            }
        }
        if let Some(len) = self.lengths.borrow_mut().get_mut(topic) {
            *len = (*len).min(keep_count);
        }
        Ok(Some(removed))
    }

    /// The first `count` entries of each `(stream, count)` (one pipeline).
    async fn probe_heads(
        &self,
        topics: &[(&str, usize)],
    ) -> Result<Vec<Vec<(MessageId, Message)>>, StoreError> {
        let commands: Vec<Command> = topics
            .iter()
            .map(|(topic, count)| {
                let count = (*count).max(1).to_string();
                let key = self.stream_key.render(topic);
                on(
                    topic,
                    &[
                        b"XRANGE",
                        key.as_bytes(),
                        b"-",
                        b"+",
                        b"COUNT",
                        count.as_bytes(),
                    ],
                )
            })
            .collect();
        self.count("xrange", commands.len());
        self.client
            .call_many(&commands)
            .await
            .into_iter()
            .map(|reply| reply.map(|r| parse_entries(&r)).map_err(store_error))
            .collect()
    }

    /// Removes each stream's head up to and including `last` (an id the caller just saw at
    /// the head, with `count` entries up to it) and records it in the topic's meta hash in
    /// the same transaction: `removed += count`, `<field> = last`. Exact: `XTRIM MINID` with
    /// the id just after `last` removes precisely those entries (ids only grow), and the
    /// record is what makes a later gap verdict exact. Returns how many entries went.
    async fn cut_heads(&self, cuts: &[Cut<'_>]) -> Result<usize, StoreError> {
        if cuts.is_empty() {
            return Ok(0);
        }
        let mut commands = Vec::with_capacity(cuts.len() * 5);
        for cut in cuts {
            let key = self.stream_key.render(cut.topic);
            let meta = self.meta_key.render(cut.topic);
            let min_id = id_after(cut.last).to_string();
            let last = cut.last.to_string();
            let count = cut.count.to_string();
            commands.push(on(cut.topic, &[b"MULTI"]));
            commands.push(on(
                cut.topic,
                &[b"XTRIM", key.as_bytes(), b"MINID", min_id.as_bytes()],
            ));
            commands.push(on(
                cut.topic,
                &[
                    b"HINCRBY",
                    meta.as_bytes(),
                    FIELD_REMOVED.as_bytes(),
                    count.as_bytes(),
                ],
            ));
            commands.push(on(
                cut.topic,
                &[
                    b"HSET",
                    meta.as_bytes(),
                    cut.field.as_bytes(),
                    last.as_bytes(),
                ],
            ));
            commands.push(on(cut.topic, &[b"EXEC"]));
        }
        self.count("xtrim", cuts.len());
        let replies = self.client.call_many(&commands).await;
        let mut removed = 0usize;
        for chunk in replies.chunks(5) {
            match chunk.last() {
                Some(Ok(Reply::Array(results))) => {
                    if let Some(Reply::Integer(n)) = results.first() {
                        removed += usize::try_from(*n).unwrap_or(0);
                    }
                }
                Some(Err(e)) => return Err(store_error(e.clone())),
                _ => {}
            }
        }
        Ok(removed)
    }

    /// Deletes the topic's stream; `false` when the stream did not exist. The topic's meta
    /// hash stays behind as a tombstone naming the last id the stream held (`deleted_to`),
    /// so a consumer resuming from before it learns of the delete (reason `deleted`), also
    /// after the topic is written again. The tombstone expires after the retention (by then
    /// whatever it covered would have expired anyway) unless the topic is written again.
    pub async fn delete(&self, topic: &str) -> Result<bool, StoreError> {
        let stream = self.stream_key.render(topic);
        let meta = self.meta_key.render(topic);
        self.count("xinfo", 1);
        self.count("hgetall", 1);
        let mut replies = self
            .client
            .call_many(&[
                on(topic, &[b"XINFO", b"STREAM", stream.as_bytes()]),
                on(topic, &[b"HGETALL", meta.as_bytes()]),
            ])
            .await;
        let meta_reply = replies.pop().unwrap_or_else(missing_reply);
        let info_reply = replies.pop().unwrap_or_else(missing_reply);
        let info = match info_reply {
            Ok(reply) => StreamInfo::parse(&reply),
            Err(e) if is_no_such_key(&e) => {
                self.forget(topic);
                return Ok(false);
            }
            Err(e) => return Err(store_error(e)),
        };
        let record = RemovalRecord::parse(&meta_reply.map_err(store_error)?);
        let deleted_to = info.last_generated.max(record.deleted_to).to_string();
        let ttl_s = (self.retention_ms / 1000).max(1).to_string();
        let commands = [
            on(topic, &[b"MULTI"]),
            on(topic, &[b"DEL", stream.as_bytes()]),
            on(
                topic,
                &[
                    b"HDEL",
                    meta.as_bytes(),
                    b"created",
                    FIELD_REMOVED.as_bytes(),
                    FIELD_EXPIRED_TO.as_bytes(),
                    FIELD_TRIMMED_TO.as_bytes(),
                    FIELD_AGED_BELOW.as_bytes(),
                    FIELD_TRIMMED_BULK.as_bytes(),
                ],
            ),
            on(
                topic,
                &[
                    b"HSET",
                    meta.as_bytes(),
                    FIELD_DELETED_TO.as_bytes(),
                    deleted_to.as_bytes(),
                ],
            ),
            on(topic, &[b"EXPIRE", meta.as_bytes(), ttl_s.as_bytes()]),
            on(topic, &[b"EXEC"]),
        ];
        self.count("del", 1);
        let reply = self
            .client
            .call_many(&commands)
            .await
            .pop()
            .unwrap_or_else(missing_reply)
            .map_err(store_error)?;
        self.forget(topic);
        let existed = matches!(&reply, Reply::Array(r) if matches!(r.first(), Some(Reply::Integer(n)) if *n > 0));
        Ok(existed)
    }

    /// Drops what this tier caches about a topic that no longer exists.
    fn forget(&self, topic: &str) {
        self.known.borrow_mut().remove(topic);
        self.lengths.borrow_mut().remove(topic);
        self.buffered_last.borrow_mut().remove(topic);
    }

    /// Finds the streams of this shard's topics with `SCAN` (never `KEYS`, which blocks Valkey
    /// for the whole keyspace walk).
    pub async fn discover_topics(&self) -> Result<usize, StoreError> {
        let pattern = self.stream_key.scan_pattern();
        let mut cursor = String::from("0");
        let mut found = 0;
        loop {
            self.count("scan", 1);
            let reply = self
                .client
                .call(&[
                    b"SCAN",
                    cursor.as_bytes(),
                    b"MATCH",
                    pattern.as_bytes(),
                    b"COUNT",
                    b"1000",
                    b"TYPE",
                    b"stream",
                ])
                .await
                .map_err(store_error)?;
            let Reply::Array(parts) = reply else {
                return Err(StoreError::Unavailable("unexpected SCAN reply".into()));
            };
            let [next, keys] = parts.as_slice() else {
                return Err(StoreError::Unavailable("unexpected SCAN reply".into()));
            };
            if let Reply::Array(keys) = keys {
                let mut known = self.known.borrow_mut();
                for key in keys {
                    let Some(key) = key.as_str() else {
                        continue;
                    };
                    if let Some(topic) = self.stream_key.topic_of(key) {
                        if crate::topic::validate(topic, usize::MAX).is_ok()
                            && self.owns(topic)
                            && known.insert(topic.to_owned())
                        {
                            found += 1;
                        }
                    }
                }
            }
            cursor = next.as_str().unwrap_or("0").to_owned();
            if cursor == "0" {
                self.discovered.set(true);
                return Ok(found);
            }
        }
    }

    /// Removes what age retention and message ttls have made due from the head of every
    /// known topic's stream; returns how many entries were removed. Topics are swept in
    /// batches of `SWEEP_BATCH_TOPICS` (one pipeline each, never one batch for every topic
    /// ever seen). Per topic the due prefix is found by probing the head (reply sizes bounded
    /// like page reads) and cut exactly and recorded as `expired_to` (see `cut_heads`),
    /// for up to `SWEEP_ROUNDS` rounds; a backlog beyond that is cut by age in bulk
    /// (`XTRIM MINID <now - retention>`, recorded as `aged_below`: gaps it causes are reported
    /// conservatively) and the rest waits for the next sweep. An expired-ttl entry behind a
    /// live one stays (hidden from reads) until the head reaches it.
    pub async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let names: Vec<String> = self.known.borrow().iter().cloned().collect();
        let mut removed = 0;
        for batch in names.chunks(SWEEP_BATCH_TOPICS) {
            removed += self.sweep_batch(batch, now_ms).await?;
        }
        Ok(removed)
    }

    async fn sweep_batch(&self, topics: &[String], now_ms: u64) -> Result<usize, StoreError> {
        let mut removed = 0usize;
        // (topic, entry size seen so far) of the topics whose whole last probe was due.
        let mut active: Vec<(&str, Option<usize>)> =
            topics.iter().map(|t| (t.as_str(), None)).collect();
        for _round in 0..SWEEP_ROUNDS {
            if active.is_empty() {
                return Ok(removed);
            }
            // Each topic's COUNT from its own entry sizes: one topic of large messages does
            // not slow the others' probes.
            let key_refs: Vec<(&str, usize)> = active
                .iter()
                .map(|(t, size)| {
                    // First one entry: most heads are not due, and that is all it costs.
                    let count =
                        size.map_or(1, |_| round_count(MAX_ROUND_ENTRIES, ROUND_BYTES, *size));
                    (*t, count)
                })
                .collect();
            let heads = self.probe_heads(&key_refs).await?;
            let mut cuts = Vec::new();
            let mut next = Vec::new();
            for (((topic, _), (_, count)), entries) in active.iter().zip(&key_refs).zip(&heads) {
                let due = entries
                    .iter()
                    .take_while(|(_, m)| is_due(m, now_ms, self.retention_ms))
                    .count();
                if due == 0 {
                    continue;
                }
                cuts.push(Cut {
                    topic,
                    last: entries[due - 1].0,
                    count: due,
                    field: FIELD_EXPIRED_TO,
                });
                if due == entries.len() && entries.len() == *count {
                    next.push((*topic, average_footprint(entries)));
                }
            }
            drop(heads);
            removed += self.cut_heads(&cuts).await?;
            active = next;
        }
        if !active.is_empty() && self.retention_ms > 0 {
            // A backlog larger than the exact rounds: bulk age trim, recorded.
            let min_id = MessageId::new(now_ms.saturating_sub(self.retention_ms), 0).to_string();
            let mut commands = Vec::with_capacity(active.len() * 2);
            for (topic, _) in &active {
                let key = self.stream_key.render(topic);
                let meta = self.meta_key.render(topic);
                commands.push(on(
                    topic,
                    &[b"XTRIM", key.as_bytes(), b"MINID", min_id.as_bytes()],
                ));
                commands.push(on(
                    topic,
                    &[
                        b"HSET",
                        meta.as_bytes(),
                        FIELD_AGED_BELOW.as_bytes(),
                        min_id.as_bytes(),
                    ],
                ));
            }
            self.count("xtrim", active.len());
            for pair in self.client.call_many(&commands).await.chunks(2) {
                if let Some(Ok(Reply::Integer(n))) = pair.first() {
                    removed += usize::try_from(*n).unwrap_or(0);
                }
            }
        }
        Ok(removed)
    }

    /// `INFO` parsed into what `/health` reports.
    pub async fn server_info(&self) -> Result<ServerInfo, StoreError> {
        self.count("info", 1);
        let reply = self.client.call(&[b"INFO"]).await.map_err(store_error)?;
        let text = reply
            .as_bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        Ok(ServerInfo::parse(&text))
    }
}

/// The parts of `INFO` operators need to judge whether Valkey keeps what the relay gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    pub version: String,
    pub uptime_s: u64,
    pub used_memory: u64,
    pub aof_enabled: bool,
    pub maxmemory_policy: String,
}

impl ServerInfo {
    pub fn parse(info: &str) -> ServerInfo {
        let mut out = ServerInfo::default();
        let mut redis_version = String::new();
        for line in info.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            match k {
                "valkey_version" => out.version = v.to_owned(),
                "redis_version" => redis_version = v.to_owned(),
                "uptime_in_seconds" => out.uptime_s = v.parse().unwrap_or(0),
                "used_memory" => out.used_memory = v.parse().unwrap_or(0),
                "aof_enabled" => out.aof_enabled = v == "1",
                "maxmemory_policy" => out.maxmemory_policy = v.to_owned(),
                _ => {}
            }
        }
        if out.version.is_empty() {
            out.version = redis_version;
        }
        out
    }

    /// Why this Valkey could lose acknowledged messages, if it could.
    pub fn data_loss_risks(&self) -> Vec<String> {
        let mut risks = Vec::new();
        if !self.aof_enabled {
            risks.push("AOF is off (appendonly no): a Valkey restart loses messages written since the last RDB snapshot".to_owned());
        }
        if self.maxmemory_policy.starts_with("allkeys-")
            || self.maxmemory_policy.starts_with("volatile-")
        {
            risks.push(format!(
                "maxmemory-policy is {}: under memory pressure Valkey evicts whole keys, i.e. entire topic streams; use noeviction",
                self.maxmemory_policy
            ));
        }
        risks
    }
}

/// The most acknowledged-but-unstored bytes (payload and metadata) the write-behind holds;
/// past it (or `valkey.max_pending` messages) buffered publishes get 503.
const BEHIND_MAX_BYTES: usize = 256 << 20;

/// Messages per write-behind batch.
const BEHIND_BATCH: usize = 1024;

/// First and longest pause between write-behind retries.
const BEHIND_BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));

fn item_bytes(item: &PublishItem) -> usize {
    item.payload.len() + item.metadata.as_ref().map_or(0, Bytes::len)
}

/// The write-behind task of `ack = buffered`: sends the backlog, one batch at a time, while
/// the tier lives; after a failure, backs off and sends the same messages again.
async fn write_behind(
    tier: std::rc::Weak<ValkeyTier>,
    mut doorbell: futures::channel::mpsc::Receiver<()>,
) {
    use futures::StreamExt;
    let mut backoff = BEHIND_BACKOFF.0;
    loop {
        let Some(strong) = tier.upgrade() else { return };
        if strong.behind.borrow().queue.is_empty() {
            drop(strong);
            if doorbell.next().await.is_none() {
                return;
            }
            continue;
        }
        if strong.send_behind_batch().await {
            drop(strong);
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(BEHIND_BACKOFF.1);
        } else {
            backoff = BEHIND_BACKOFF.0;
        }
    }
}

/// Topics per sweep pipeline.
const SWEEP_BATCH_TOPICS: usize = 128;

/// Exact probe-and-cut rounds per topic per sweep.
const SWEEP_ROUNDS: usize = 8;

/// Exact probe-and-cut rounds of one trim-endpoint call.
const TRIM_ROUNDS: usize = 64;

/// Meta-hash fields the relay keeps per topic to know what left the stream and why (besides
/// `created`). Valkey's own `XINFO STREAM` fields do not: `max-deleted-entry-id` moves only on
/// `XDEL`, not on trims.
/// Entries the relay removed with exact knowledge (the cuts below), this incarnation.
const FIELD_REMOVED: &str = "removed";
/// The newest id removed because its ttl or the age retention ran out (exact).
const FIELD_EXPIRED_TO: &str = "expired_to";
/// The newest id removed by the trim endpoint (exact).
const FIELD_TRIMMED_TO: &str = "trimmed_to";
/// The last bulk age trim's threshold: every id below it is gone (not recorded per entry).
const FIELD_AGED_BELOW: &str = "aged_below";
/// Set once a trim endpoint call fell back to a bulk `XTRIM MAXLEN`.
const FIELD_TRIMMED_BULK: &str = "trimmed_bulk";
/// The last id of the stream the relay deleted (a tombstone; survives re-creation).
const FIELD_DELETED_TO: &str = "deleted_to";

/// One exact head cut (see [`ValkeyTier::cut_heads`]).
struct Cut<'a> {
    topic: &'a str,
    last: MessageId,
    count: usize,
    field: &'static str,
}

/// The id just after `id` in stream order.
fn id_after(id: MessageId) -> MessageId {
    match id.seq.checked_add(1) {
        Some(seq) => MessageId::new(id.ms, seq),
        None => MessageId::new(id.ms.saturating_add(1), 0),
    }
}

/// Mean footprint of `entries` (`None` if empty).
fn average_footprint(entries: &[(MessageId, Message)]) -> Option<usize> {
    let total: usize = entries.iter().map(|(_, m)| m.footprint()).sum();
    total.checked_div(entries.len()).map(|s| s.max(1))
}

/// The `XINFO STREAM` fields gap detection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamInfo {
    length: u64,
    entries_added: u64,
    first: Option<MessageId>,
    last_generated: MessageId,
    max_deleted: MessageId,
}

impl StreamInfo {
    fn parse(reply: &Reply) -> StreamInfo {
        let mut info = StreamInfo {
            length: 0,
            entries_added: 0,
            first: None,
            last_generated: MessageId::MIN,
            max_deleted: MessageId::MIN,
        };
        let Reply::Array(fields) = reply else {
            return info;
        };
        let id = |value: &Reply| {
            value
                .as_str()
                .and_then(|s| s.parse::<MessageId>().ok())
                .unwrap_or(MessageId::MIN)
        };
        for pair in fields.chunks(2) {
            let [name, value] = pair else { continue };
            match name.as_bytes() {
                Some(b"length") => info.length = value.as_int().map_or(0, |n| n.max(0) as u64),
                Some(b"entries-added") => {
                    info.entries_added = value.as_int().map_or(0, |n| n.max(0) as u64)
                }
                Some(b"first-entry") => info.first = parse_entry(value).map(|(id, _)| id),
                Some(b"last-generated-id") => info.last_generated = id(value),
                Some(b"max-deleted-entry-id") => info.max_deleted = id(value),
                _ => {}
            }
        }
        info
    }
}

/// What the relay recorded in a topic's meta hash about removals (fields `FIELD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RemovalRecord {
    created: bool,
    removed: u64,
    expired_to: MessageId,
    trimmed_to: MessageId,
    aged_below: MessageId,
    trimmed_bulk: bool,
    deleted_to: MessageId,
}

impl RemovalRecord {
    const NONE: RemovalRecord = RemovalRecord {
        created: false,
        removed: 0,
        expired_to: MessageId::MIN,
        trimmed_to: MessageId::MIN,
        aged_below: MessageId::MIN,
        trimmed_bulk: false,
        deleted_to: MessageId::MIN,
    };

    fn parse(reply: &Reply) -> RemovalRecord {
        let mut record = RemovalRecord::NONE;
        let Reply::Array(fields) = reply else {
            return record;
        };
        for pair in fields.chunks(2) {
            let [name, value] = pair else { continue };
            let (Some(name), Some(value)) = (name.as_str(), value.as_str()) else {
                continue;
            };
            let id = || value.parse::<MessageId>().unwrap_or(MessageId::MIN);
            match name {
                "created" => record.created = true,
                FIELD_REMOVED => record.removed = value.parse().unwrap_or(0),
                FIELD_EXPIRED_TO => record.expired_to = id(),
                FIELD_TRIMMED_TO => record.trimmed_to = id(),
                FIELD_AGED_BELOW => record.aged_below = id(),
                FIELD_TRIMMED_BULK => record.trimmed_bulk = true,
                FIELD_DELETED_TO => record.deleted_to = id(),
                _ => {}
            }
        }
        record
    }
}

/// The gap verdict for a consumer resuming after `after`, from the stream's state (`None`:
/// the stream does not exist) and the relay's removal record. `max_len` is the count
/// retention (`MAXLEN ~` on every XADD).
///
/// A gap is reported iff some removed entry has an id above `after`:
/// - exact for what the relay removed itself and recorded: ttl/age cuts (`expired_to`),
///   trim-endpoint cuts (`trimmed_to`), a topic delete (`deleted_to`), and for any `XDEL`
///   (Valkey's `max-deleted-entry-id`, reason `unknown`: the relay never uses XDEL);
/// - conservative for removals nobody recorded, detected because
///   `entries-added - length - removed` is not 0: Valkey's own `MAXLEN ~` trims on XADD, a
///   bulk age or trim fallback, another client's XTRIM, or a stream deleted and recreated
///   behind the relay's back. They remove the stream's head, so every such id is below the
///   first entry, but which ids is unknown: a resume from below the first entry is reported
///   as a gap, also from the very last removed id (where nothing is missing after all).
fn gap_verdict(
    stream: Option<&StreamInfo>,
    record: &RemovalRecord,
    after: MessageId,
    max_len: u64,
) -> Option<GapInfo> {
    let Some(stream) = stream else {
        // No stream: deleted by the relay (the tombstone says up to where), or behind its
        // back (the meta hash of a topic it wrote is still there: cannot tell what is gone,
        // so report it), or never written (nothing to miss).
        if record.deleted_to > after || (record.created && record.deleted_to == MessageId::MIN) {
            return Some(GapInfo {
                oldest_available: None,
                reason: GapReason::Deleted,
            });
        }
        return None;
    };
    // (newest removed id, or a bound on it; reason) of every removal reaching past `after`.
    let mut found: Option<(MessageId, GapReason)> = None;
    let mut consider = |bound: MessageId, reason: GapReason| {
        if bound > after && found.is_none_or(|(b, _)| bound > b) {
            found = Some((bound, reason));
        }
    };
    consider(record.deleted_to, GapReason::Deleted);
    consider(record.expired_to, GapReason::Expired);
    consider(record.trimmed_to, GapReason::Trimmed);
    consider(stream.max_deleted, GapReason::Unknown);
    let explained = stream.length.saturating_add(record.removed);
    if stream.entries_added != explained {
        // Unrecorded head removals: every removed id is below the first entry, or, emptied,
        // at most the last id (which was removed).
        let head = stream.first.unwrap_or(stream.last_generated);
        if after < head && stream.entries_added > 0 {
            let reason = if record.aged_below > after {
                GapReason::Expired
            } else if stream.entries_added < explained {
                // More removed than ever added in this incarnation: recreated behind the
                // relay's back.
                GapReason::Deleted
            } else if record.trimmed_bulk || stream.entries_added > max_len {
                GapReason::Trimmed
            } else {
                GapReason::Unknown
            };
            // Weighs as the newest removal: nothing recorded is newer than the head.
            consider(MessageId::MAX, reason);
        }
    }
    found.map(|(_, reason)| GapInfo {
        oldest_available: stream.first,
        reason,
    })
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

/// `ttl` field text: seconds, with millisecond precision only when needed.
fn format_ttl_seconds(ttl_ms: u64) -> String {
    if ttl_ms.is_multiple_of(1000) {
        (ttl_ms / 1000).to_string()
    } else {
        format!("{}.{:03}", ttl_ms / 1000, ttl_ms % 1000)
    }
}

/// Age counts from the entry id, the same clock `XTRIM MINID` trims by, not from the
/// `timestamp` field: entries migrated from the Python relay carry new ids but old
/// timestamps, and must not be hidden (or swept) for that.
fn is_due(message: &Message, now_ms: u64, retention_ms: u64) -> bool {
    message.is_expired(now_ms) || now_ms.saturating_sub(message.id.ms) > retention_ms
}

/// The COUNT of one page-read XRANGE: what the page still wants (plus one to see whether more
/// follow, plus slack for expired entries), within `ROUND_BYTES` (and the page's remaining
/// bytes) at `entry_size` bytes per entry, at least 1.
fn round_count(want: usize, byte_room: usize, entry_size: Option<usize>) -> usize {
    let by_bytes = match entry_size {
        Some(size) => ROUND_BYTES.min(byte_room) / size.max(1) + 1,
        None => FIRST_ROUND_ENTRIES,
    };
    want.saturating_add(1 + READ_SLACK)
        .min(by_bytes)
        .clamp(1, MAX_ROUND_ENTRIES)
}

/// Entries of an XRANGE/XREVRANGE reply, skipping any that do not parse.
pub fn parse_entries(reply: &Reply) -> Vec<(MessageId, Message)> {
    match reply {
        Reply::Array(entries) => entries.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// One stream entry `[id, [field, value, ...]]` as a message. Entries written by the Python
/// relay (fields `message_id`, `payload`, `timestamp` without a zone, `metadata`) parse too.
pub fn parse_entry(entry: &Reply) -> Option<(MessageId, Message)> {
    let Reply::Array(parts) = entry else {
        return None;
    };
    let [id, fields] = parts.as_slice() else {
        return None;
    };
    let id: MessageId = id.as_str()?.parse().ok()?;
    let Reply::Array(fields) = fields else {
        return None;
    };
    let mut payload = None;
    let mut timestamp_ms = None;
    let mut metadata = None;
    let mut ttl_ms = None;
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        let (Some(name), Some(value)) = (name.as_bytes(), value.as_bytes()) else {
            continue;
        };
        match name {
            // The reply's own buffer (the codec copied it out of the read buffer already):
            // no second copy of every payload.
            b"payload" => payload = Some(field_bytes(&pair[1], value)),
            b"timestamp" => {
                timestamp_ms = std::str::from_utf8(value).ok().and_then(parse_timestamp_ms)
            }
            b"metadata" => {
                metadata = Some(field_bytes(&pair[1], value)).filter(|m| m.as_ref() != b"null")
            }
            b"ttl" => {
                ttl_ms = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(|s| (s * 1000.0).ceil() as u64)
            }
            _ => {}
        }
    }
    let timestamp_ms = timestamp_ms.unwrap_or(id.ms);
    Some((
        id,
        Message {
            id,
            timestamp_ms,
            expires_at_ms: ttl_ms.map(|t| timestamp_ms.saturating_add(t)),
            payload: payload?,
            metadata,
        },
    ))
}

/// A field value as `Bytes`, sharing the reply's buffer when it is a bulk string.
fn field_bytes(reply: &Reply, value: &[u8]) -> Bytes {
    match reply {
        Reply::Bulk(b) => b.clone(),
        _ => Bytes::copy_from_slice(value),
    }
}

/// RFC 3339 with or without a zone (the Python relay wrote naive UTC times).
fn parse_timestamp_ms(text: &str) -> Option<u64> {
    let parsed = humantime::parse_rfc3339(text)
        .or_else(|_| humantime::parse_rfc3339_weak(text))
        .or_else(|_| humantime::parse_rfc3339_weak(&format!("{text}Z")))
        .ok()?;
    let ms = parsed.duration_since(UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok()
}

/// How long a shard waits between retention sweeps of Valkey: a quarter of the retention,
/// within 1 s .. 60 s.
pub fn sweep_period(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

#[allow(dead_code)]
fn now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn parses_entries_of_both_relays() {
        let ours = Reply::Array(vec![
            bulk("1700000000000-1"),
            Reply::Array(vec![
                bulk("payload"),
                bulk("{\"a\":1}"),
                bulk("timestamp"),
                bulk("2023-11-14T22:13:20.000Z"),
                bulk("ttl"),
                bulk("1.5"),
            ]),
        ]);
        let (id, m) = parse_entry(&ours).expect("entry");
        assert_eq!(id, MessageId::new(1_700_000_000_000, 1));
        assert_eq!(&m.payload[..], b"{\"a\":1}");
        assert_eq!(m.timestamp_ms, 1_700_000_000_000);
        assert_eq!(m.expires_at_ms, Some(1_700_000_001_500));
        let python = Reply::Array(vec![
            bulk("1700000000000-0"),
            Reply::Array(vec![
                bulk("message_id"),
                bulk("msg_abc"),
                bulk("payload"),
                bulk("{\"k\":\"v\"}"),
                bulk("timestamp"),
                bulk("2023-11-14T22:13:20"),
                bulk("metadata"),
                bulk("{\"source\":\"api\"}"),
            ]),
        ]);
        let (_, m) = parse_entry(&python).expect("python entry");
        assert_eq!(m.timestamp_ms, 1_700_000_000_000);
        assert_eq!(m.metadata.as_deref(), Some(&b"{\"source\":\"api\"}"[..]));
    }

    #[test]
    fn info_flags_data_loss_risks() {
        let info = ServerInfo::parse("# Server\r\nredis_version:7.2.4\r\nvalkey_version:8.0.1\r\nuptime_in_seconds:5\r\n# Memory\r\nused_memory:1024\r\nmaxmemory_policy:allkeys-lru\r\n# Persistence\r\naof_enabled:0\r\n");
        assert_eq!(info.version, "8.0.1");
        assert_eq!(info.uptime_s, 5);
        assert_eq!(info.used_memory, 1024);
        assert_eq!(info.data_loss_risks().len(), 2);
        let safe = ServerInfo::parse(
            "redis_version:7.2.4\r\naof_enabled:1\r\nmaxmemory_policy:noeviction\r\n",
        );
        assert_eq!(safe.version, "7.2.4");
        assert!(safe.data_loss_risks().is_empty());
    }

    #[test]
    fn age_counts_from_the_entry_id_not_the_timestamp_field() {
        // Regression: a migrated entry (new id, 2025 timestamp) was hidden and then swept.
        let m = Message {
            id: MessageId::new(1_800_000_000_000, 0),
            timestamp_ms: 1_735_732_800_000,
            expires_at_ms: None,
            payload: Bytes::from_static(b"1"),
            metadata: None,
        };
        assert!(!is_due(&m, 1_800_000_001_000, 86_400_000));
        assert!(is_due(&m, 1_800_000_000_000 + 86_400_001, 86_400_000));
    }

    fn stream(length: u64, added: u64, first: Option<u64>, last: u64) -> StreamInfo {
        StreamInfo {
            length,
            entries_added: added,
            first: first.map(|ms| MessageId::new(ms, 0)),
            last_generated: MessageId::new(last, 0),
            max_deleted: MessageId::MIN,
        }
    }

    fn id(ms: u64) -> MessageId {
        MessageId::new(ms, 0)
    }

    #[test]
    fn gap_verdicts_are_exact_for_recorded_removals() {
        // Ids 1..=10 added; the relay cut 1..=4 (ttl) and recorded it.
        let s = stream(6, 10, Some(5), 10);
        let record = RemovalRecord {
            removed: 4,
            expired_to: id(4),
            ..RemovalRecord::NONE
        };
        let gap = gap_verdict(Some(&s), &record, id(2), 1000).expect("gap");
        assert_eq!(gap.reason, GapReason::Expired);
        assert_eq!(gap.oldest_available, Some(id(5)));
        // Resuming from the last removed id (or later) misses nothing.
        for after in [4, 5, 9, 10] {
            assert_eq!(
                gap_verdict(Some(&s), &record, id(after), 1000),
                None,
                "{after}"
            );
        }
    }

    #[test]
    fn unrecorded_head_trims_are_reported_conservatively() {
        // Ids 1..=10 added, MAXLEN ~ 5 took 1..=3 (nothing recorded).
        let s = stream(7, 10, Some(4), 10);
        let gap = gap_verdict(Some(&s), &RemovalRecord::NONE, id(1), 5).expect("gap");
        assert_eq!(gap.reason, GapReason::Trimmed);
        // Conservative: from the last trimmed id a gap is reported although none is missing.
        assert!(gap_verdict(Some(&s), &RemovalRecord::NONE, id(3), 5).is_some());
        assert_eq!(gap_verdict(Some(&s), &RemovalRecord::NONE, id(4), 5), None);
        // Below the count cap an unrecorded removal has no known cause.
        let gap = gap_verdict(Some(&s), &RemovalRecord::NONE, id(1), 100).expect("gap");
        assert_eq!(gap.reason, GapReason::Unknown);
        // Emptied: everything up to the last id is gone.
        let empty = stream(0, 10, None, 10);
        assert!(gap_verdict(Some(&empty), &RemovalRecord::NONE, id(9), 5).is_some());
        assert_eq!(
            gap_verdict(Some(&empty), &RemovalRecord::NONE, id(10), 5),
            None
        );
    }

    #[test]
    fn deleted_streams_are_reported_from_the_tombstone() {
        let tomb = RemovalRecord {
            deleted_to: id(10),
            ..RemovalRecord::NONE
        };
        assert_eq!(
            gap_verdict(None, &tomb, id(3), 5).map(|g| g.reason),
            Some(GapReason::Deleted)
        );
        assert_eq!(gap_verdict(None, &tomb, id(10), 5), None);
        // Never written: nothing to miss.
        assert_eq!(gap_verdict(None, &RemovalRecord::NONE, id(3), 5), None);
        // Recreated since: the old stream's messages after the resume point are gone.
        let again = stream(2, 2, Some(20), 21);
        let gap = gap_verdict(Some(&again), &tomb, id(3), 5).expect("gap");
        assert_eq!(gap.reason, GapReason::Deleted);
        assert_eq!(gap.oldest_available, Some(id(20)));
        assert_eq!(gap_verdict(Some(&again), &tomb, id(10), 5), None);
    }

    #[test]
    fn round_counts_stay_within_the_byte_budget() {
        assert_eq!(round_count(100, usize::MAX, None), FIRST_ROUND_ENTRIES);
        assert_eq!(round_count(100, usize::MAX, Some(100)), 109);
        assert_eq!(round_count(5000, usize::MAX, Some(10)), MAX_ROUND_ENTRIES);
        // 1 MiB entries: one at a time.
        assert_eq!(round_count(1000, usize::MAX, Some(1 << 20)), 2);
        assert_eq!(round_count(1000, 1000, Some(100)), 11);
        assert_eq!(round_count(0, usize::MAX, Some(1)), 9);
    }

    /// A single-shard tier on a fresh Valkey (run inside `run_local`).
    fn tier_on(server: &crate::valkey::testing::ValkeyServer) -> crate::valkey::ClientConfig {
        crate::valkey::ClientConfig {
            connect: server.config(),
            ..crate::valkey::ClientConfig::default()
        }
    }

    fn new_tier(config: crate::valkey::ClientConfig, retention_ms: u64) -> Rc<ValkeyTier> {
        let client = Client::start(config).expect("client");
        Rc::new(ValkeyTier::new(
            client,
            KeyTemplate::parse("s:{topic}").expect("template"),
            KeyTemplate::parse("m:{topic}").expect("template"),
            1_000_000,
            retention_ms,
            AckMode::Persisted,
            0,
            1,
            1000,
        ))
    }

    fn item(topic: &str, payload_len: usize, ttl_ms: Option<u64>) -> PublishItem {
        PublishItem {
            topic: topic.to_owned(),
            payload: Bytes::from(format!("\"{}\"", "x".repeat(payload_len))),
            metadata: None,
            ttl_ms,
        }
    }

    #[test]
    fn valkey_pages_stop_at_their_byte_budget_and_a_larger_message_comes_alone() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            let items: Vec<PublishItem> = (0..20).map(|_| item("big", 100_000, None)).collect();
            let stored = tier.publish_persisted(items, now, &|_, _| {}).await;
            let ids: Vec<MessageId> = stored
                .iter()
                .map(|r| r.as_ref().expect("stored").id)
                .collect();
            let mut query = PageQuery::new(None, Order::Asc, 1000);
            query.max_bytes = 350_000;
            let mut got = Vec::new();
            let mut pages = 0;
            loop {
                let page = tier
                    .read("big", &query, now, None)
                    .await
                    .expect("read")
                    .expect("page");
                pages += 1;
                // 100 KB messages under a 350 KB budget: the page stops once it holds 350 KB
                // (the message that crosses it included), like the hot tier's pages.
                assert!(page.messages.len() <= 4, "{} messages", page.messages.len());
                got.extend(page.messages.iter().map(|m| m.id));
                match page.next_cursor {
                    Some(c) => query.after = Some(c),
                    None => break,
                }
            }
            assert_eq!(got, ids);
            assert_eq!(pages, 5);
            // A budget below one message: one message per page, never none.
            query.after = None;
            query.max_bytes = 10;
            let page = tier
                .read("big", &query, now, None)
                .await
                .expect("read")
                .expect("page");
            assert_eq!(page.messages.len(), 1);
            assert_eq!(page.next_cursor, Some(ids[0]));
        });
    }

    #[test]
    fn a_page_of_megabyte_messages_is_not_cut_short_by_the_scan_budget() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            // More messages than `MAX_READ_ROUNDS` rounds of 1 MiB replies can carry.
            let n = FIRST_ROUND_ENTRIES + 2 * MAX_READ_ROUNDS + 5;
            let items: Vec<PublishItem> = (0..n).map(|_| item("huge", 1 << 20, None)).collect();
            let stored = tier.publish_persisted(items, now, &|_, _| {}).await;
            assert!(stored.iter().all(Result::is_ok));
            let query = PageQuery::new(None, Order::Asc, n);
            let page = tier
                .read("huge", &query, now, None)
                .await
                .expect("read")
                .expect("page");
            assert_eq!(page.messages.len(), n);
        });
    }

    #[test]
    fn a_cursor_read_of_a_nonexistent_topic_caches_nothing() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            for i in 0..100 {
                let topic = format!("nobody-{i}");
                let query = PageQuery::new(Some(MessageId::new(1, 0)), Order::Asc, 10);
                let page = tier.read(&topic, &query, now, None).await.expect("read");
                assert!(page.is_none_or(|p| p.messages.is_empty()));
            }
            assert!(tier.lengths.borrow().is_empty());
            assert!(tier.known.borrow().is_empty());
        });
    }

    #[test]
    fn a_sweep_over_more_topics_than_one_batch_removes_every_expired_head() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            let topics = SWEEP_BATCH_TOPICS * 2 + 3;
            // Per topic: a run of expired entries longer than one probe, then one live one.
            let mut items = Vec::new();
            for t in 0..topics {
                for _ in 0..(FIRST_ROUND_ENTRIES + 5) {
                    items.push(item(&format!("t{t}"), 10, Some(1)));
                }
                items.push(item(&format!("t{t}"), 10, None));
            }
            let stored = tier.publish_persisted(items, now, &|_, _| {}).await;
            assert!(stored.iter().all(Result::is_ok));
            let removed = tier.sweep(now + 10).await.expect("sweep");
            assert_eq!(removed, topics * (FIRST_ROUND_ENTRIES + 5));
            for t in [0, SWEEP_BATCH_TOPICS, topics - 1] {
                let key = format!("s:t{t}");
                let len = tier
                    .client
                    .call(&[b"XLEN", key.as_bytes()])
                    .await
                    .expect("XLEN");
                assert_eq!(len.as_int(), Some(1), "{key}");
            }
        });
    }

    #[test]
    fn ttl_text_round_trips() {
        assert_eq!(format_ttl_seconds(3_600_000), "3600");
        assert_eq!(format_ttl_seconds(1_500), "1.500");
    }
}
