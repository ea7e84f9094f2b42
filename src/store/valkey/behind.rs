//! `ack: buffered` publishes: ids chosen here so the producer is answered before Valkey
//! replies, and the bounded write-behind backlog those acknowledged messages wait in until
//! one writer task per shard has stored them (oldest first, failed batches retried with the
//! same ids).
//!
//! Does not own the entry format (`entry.rs`) nor `ack: persisted` publishes (`publish.rs`);
//! the hot tier is filled by the caller ([`crate::store::Storage`]) at acknowledgement.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use super::entry::parse_entries;
use super::{on, store_error, ValkeyTier};
use crate::store::message::{write_rfc3339_millis, MessageId};
use crate::store::{PublishItem, StoreError};
use crate::valkey::{Command, Reply, ValkeyError};

/// The write-behind backlog of `ack = buffered`: every acknowledged message stays here until
/// Valkey stored it (or refused it for good), and one writer task sends it, one batch at a
/// time, oldest first, retrying a failed batch with the same explicit ids. One batch at a
/// time keeps each topic's XADDs in id order on the wire even across reconnects: a later id
/// stored before an earlier retried one would make Valkey refuse the earlier one.
pub(super) struct Behind {
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
    pub(super) retries: u64,
    /// Acknowledged messages Valkey refused for good (not retryable): lost.
    pub(super) lost: u64,
    /// Acknowledged messages whose id another writer took first: stored with a new id
    /// (see [`BehindItem::reassign`]).
    pub(super) reassigned: u64,
    /// Messages in `queue` per topic: a topic degraded to persisted publishes waits until
    /// none of its own is left, so Valkey's ids stay above them.
    per_topic: std::collections::HashMap<String, usize>,
}

impl Behind {
    /// An empty backlog holding at most `max_behind` messages (never fewer than one batch).
    pub(super) fn new(max_behind: usize) -> Behind {
        Behind {
            queue: VecDeque::new(),
            bytes: 0,
            max_items: max_behind.max(BEHIND_BATCH),
            doorbell: None,
            busy: false,
            retries: 0,
            lost: 0,
            reassigned: 0,
            per_topic: std::collections::HashMap::new(),
        }
    }
}

/// One acknowledged, not yet stored message.
struct BehindItem {
    item: PublishItem,
    id: MessageId,
    timestamp_ms: u64,
    /// The topic was new to this tier when published: send its meta commands too.
    new_topic: bool,
    /// Another writer stored an id at least as high first (`ack: buffered` with several
    /// writers): the message is sent with `*` instead, so it is stored after all, under the
    /// id Valkey gives it. Logged and counted (`buffered_reassigned`): the producer was told
    /// the other id.
    reassign: bool,
}

/// How one write-behind XADD ended.
enum BehindOutcome {
    /// Stored with this id.
    Stored(MessageId),
    /// Worth sending again (connection lost, timeout, queue full, `-OOM`).
    Retry,
    /// Refused because the stream already holds an id at least as high: stored already (a
    /// reply lost with its connection) or taken by another writer; the stream is asked.
    Check,
    /// Another writer took the id first: send it again with `*`.
    Reassign,
    /// Refused for good.
    Lost(String),
}

impl ValkeyTier {
    /// Buffered mode: chooses ids now so the producer is answered at once; the XADDs (with
    /// those explicit ids) are written behind. A topic's first publish since start, and its
    /// first after a write-behind failure (Valkey restarted, another writer may have
    /// appended), reads the stream's last id so new ids stay above it; ids never go back
    /// below ones already handed out.
    ///
    /// Also returns, for each topic whose stream was read here, the stream's last id: the
    /// caller compares it with what its memory has seen of the topic (another writer's
    /// entries there are a reason to degrade, see [`ValkeyTier::degrade_buffered`]).
    pub async fn assign_buffered_ids(
        &self,
        items: &[PublishItem],
        now_ms: u64,
    ) -> Result<(Vec<MessageId>, Vec<(String, MessageId)>), StoreError> {
        let mut read = Vec::new();
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
            read.push((item.topic.clone(), last));
            let mut cached = self.buffered_last.borrow_mut();
            match cached.get_mut(&item.topic) {
                Some(entry) => *entry = (entry.0.max(last), true),
                None => {
                    cached.insert(item.topic.clone(), (last, true));
                }
            }
        }
        let mut last_ids = self.buffered_last.borrow_mut();
        let ids = items
            .iter()
            .map(|item| {
                let last = last_ids.get(&item.topic).map(|(id, _)| *id);
                let id = MessageId::next_after(last, now_ms);
                last_ids.insert(item.topic.clone(), (id, true));
                id
            })
            .collect();
        Ok((ids, read))
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
            match behind.per_topic.get_mut(&item.topic) {
                Some(n) => *n += 1,
                None => {
                    behind.per_topic.insert(item.topic.clone(), 1);
                }
            }
            behind.queue.push_back(BehindItem {
                item,
                id: *id,
                timestamp_ms: now_ms,
                new_topic,
                reassign: false,
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

    /// Whether acknowledged messages of `topic` still wait in the write-behind backlog.
    pub fn behind_holds(&self, topic: &str) -> bool {
        self.behind.borrow().per_topic.contains_key(topic)
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
        let batch: Vec<(PublishItem, MessageId, u64, bool, bool)> = {
            let mut behind = self.behind.borrow_mut();
            behind.busy = true;
            behind
                .queue
                .iter()
                .take(BEHIND_BATCH)
                .map(|b| {
                    (
                        b.item.clone(),
                        b.id,
                        b.timestamp_ms,
                        b.new_topic,
                        b.reassign,
                    )
                })
                .collect()
        };
        let mut commands: Vec<Command> = batch
            .iter()
            .map(|(item, id, ts, _, reassign)| {
                self.encode_xadd(item, (!reassign).then_some(*id), *ts)
            })
            .collect();
        for (item, _, ts, new_topic, _) in &batch {
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
                Ok(Reply::Bulk(id)) => match std::str::from_utf8(&id)
                    .ok()
                    .and_then(|s| s.parse::<MessageId>().ok())
                {
                    Some(id) => BehindOutcome::Stored(id),
                    None => BehindOutcome::Lost(format!("unexpected XADD reply: {id:?}")),
                },
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
                // There, and ours (another writer may have stored its own message under the
                // same id): stored already, its reply lost with a connection.
                let ours = |r: &Reply| {
                    parse_entries(r).first().is_some_and(|(_, m)| {
                        m.payload == batch[i].0.payload && m.timestamp_ms == batch[i].2
                    })
                };
                outcomes[i] = match reply {
                    Ok(r) if ours(&r) => BehindOutcome::Stored(batch[i].1),
                    Ok(_) => {
                        // Not there, and the stream is past it: someone else wrote the topic.
                        self.degrade_buffered(
                            &batch[i].0.topic,
                            "an acknowledged id was refused: the stream already holds a higher one",
                        );
                        BehindOutcome::Reassign
                    }
                    Err(_) => BehindOutcome::Retry,
                };
            }
        }
        let mut retry = false;
        let mut behind = self.behind.borrow_mut();
        let mut kept = VecDeque::new();
        let mut stored: Vec<(String, MessageId)> = Vec::new();
        for outcome in &outcomes {
            let Some(mut done) = behind.queue.pop_front() else {
                break;
            };
            match outcome {
                BehindOutcome::Stored(id) => {
                    if done.reassign {
                        behind.reassigned += 1;
                        tracing::error!(
                            topic = %done.item.topic,
                            acknowledged_as = %done.id,
                            stored_as = %id,
                            "acknowledged buffered message stored under a new id: another \
                             writer took its id first"
                        );
                    }
                    stored.push((done.item.topic.clone(), *id));
                }
                BehindOutcome::Retry | BehindOutcome::Check | BehindOutcome::Reassign => {
                    done.reassign |= matches!(outcome, BehindOutcome::Reassign);
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
            if let Some(n) = behind.per_topic.get_mut(&done.item.topic) {
                *n -= 1;
                if *n == 0 {
                    behind.per_topic.remove(&done.item.topic);
                }
            }
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
        self.notify_batch(stored.iter().map(|(topic, id)| (topic.as_str(), *id)));
        if retry {
            // Valkey may have restarted (lost a tail) or someone else may have written:
            // the next ids are checked against each stream again.
            for entry in self.buffered_last.borrow_mut().values_mut() {
                entry.1 = false;
            }
        }
        retry
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
