//! `ack: buffered` publishes: ids chosen here so the producer is answered before Valkey
//! replies, and the bounded write-behind backlog those acknowledged messages wait in until
//! one writer task per shard has stored them (oldest first, one `pulsar_publish` call per
//! topic of a batch, failed batches retried with the same ids).
//!
//! Publishes with an idempotency key are written the same way, in their place in the
//! backlog, but not acknowledged before Valkey decided (stored, or a duplicate of a publish
//! made through any relay): their caller awaits a [`BehindDecision`]. They are not retried:
//! a failed attempt is answered 503 and the producer's retry, with the same key, is the
//! retry. While one is undecided its topic is held ([`TopicHold`]): later publishes to it
//! wait, so the hot tier and the feed keep seeing the topic in id order.
//!
//! Does not own the call's encoding (`function.rs`) nor `ack: persisted` publishes
//! (`publish.rs`); the hot tier is filled by the caller ([`crate::store::Storage`]) at
//! acknowledgement.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;

use super::entry::parse_entries;
use super::function::{parse_publish_reply, Entry, Outcome};
use super::publish::group_by_topic;
use super::{on, store_error, ValkeyTier};
use crate::store::message::MessageId;
use crate::store::{PublishAck, PublishItem, StoreError};
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
    per_topic: crate::topic::TopicMap<String, usize>,
}

impl Behind {
    /// Accounts for `item` leaving the backlog (stored, a duplicate, decided or lost).
    fn remove(&mut self, item: &PublishItem) {
        self.bytes = self.bytes.saturating_sub(item_bytes(item));
        if let Some(n) = self.per_topic.get_mut(&item.topic) {
            *n -= 1;
            if *n == 0 {
                self.per_topic.remove(&item.topic);
            }
        }
    }

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
            per_topic: crate::topic::TopicMap::default(),
        }
    }
}

/// One message waiting in the backlog: acknowledged, or (with an idempotency key) awaiting
/// its decision.
struct BehindItem {
    item: PublishItem,
    id: MessageId,
    timestamp_ms: u64,
    /// The topic was new to this tier when published: set its meta hash's creation time too.
    new_topic: bool,
    /// Keyed publishes only: where Valkey's decision goes (the publisher waits for it).
    decision: Option<oneshot::Sender<BehindDecision>>,
    /// Another writer stored an id at least as high first (`ack: buffered` with several
    /// writers): the message is sent with `*` instead, so it is stored after all, under the
    /// id Valkey gives it. Logged and counted (`buffered_reassigned`): the producer was told
    /// the other id.
    reassign: bool,
}

/// How the write-behind sends one backlog item this time (copied out of the backlog).
struct Attempt {
    id: MessageId,
    timestamp_ms: u64,
    new_topic: bool,
    /// Sent with `*`: see [`BehindItem::reassign`].
    reassign: bool,
}

/// What became of a keyed publish written behind (see the module doc).
#[derive(Debug)]
pub enum BehindDecision {
    /// Stored with the id chosen for it.
    Stored,
    /// Its key was used before, through this relay or another: nothing stored; the first
    /// publish's answer.
    Duplicate(PublishAck),
    /// Not stored, or not known to be (a lost reply): the producer retries with its key.
    Failed(StoreError),
}

/// How one write-behind entry ended.
enum BehindOutcome {
    /// Stored (under this id when Valkey picked it: a reassigned message).
    Stored(Option<MessageId>),
    /// Keyed only: a duplicate of an earlier publish.
    Duplicate(PublishAck),
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

/// Topics held while keyed publishes to them await their decision: while it lives, every
/// buffered publish to one of them waits before taking ids. Released on drop (also if the
/// publishing task is dropped), which wakes the waiters.
pub struct TopicHold {
    tier: Rc<ValkeyTier>,
    topics: Vec<String>,
}

impl TopicHold {
    /// Whether `topic` is one of the held topics.
    pub fn holds(&self, topic: &str) -> bool {
        self.topics.iter().any(|t| t == topic)
    }
}

impl Drop for TopicHold {
    fn drop(&mut self) {
        let mut holds = self.tier.holds.borrow_mut();
        for topic in &self.topics {
            // Dropping the waiters' senders wakes them.
            holds.remove(topic);
        }
    }
}

impl ValkeyTier {
    /// Buffered mode: chooses ids now so the producer is answered at once; the entries (with
    /// those explicit ids) are written behind. A topic's first publish since start, and its
    /// first after a write-behind failure (Valkey restarted, another writer may have
    /// appended), reads the stream's last id so new ids stay above it; ids never go back
    /// below ones already handed out.
    ///
    /// Waits first while any of the items' topics is held by a keyed publish awaiting its
    /// decision; if `items` hold keyed publishes, returns the hold of their topics, taken in
    /// the same synchronous step as the ids (so no publish can take ids between).
    pub async fn assign_buffered_ids(
        self: &Rc<Self>,
        items: &[PublishItem],
        now_ms: u64,
    ) -> Result<(Vec<MessageId>, Option<TopicHold>, Vec<(String, MessageId)>), StoreError> {
        let mut stream_lasts = Vec::new();
        loop {
            stream_lasts.extend(self.refresh_buffered_last(items).await?);
            // From here to the return: no await.
            let waiting = {
                let mut holds = self.holds.borrow_mut();
                items.iter().find_map(|item| {
                    holds.get_mut(&item.topic).map(|waiters| {
                        let (tx, rx) = oneshot::channel::<()>();
                        waiters.push(tx);
                        rx
                    })
                })
            };
            if let Some(released) = waiting {
                // Err(Canceled) is the release: the hold dropped its senders.
                let _ = released.await;
                continue;
            }
            let hold = self.hold_keyed_topics(items);
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
            return Ok((ids, hold, stream_lasts));
        }
    }

    /// Holds the topics of `items`' keyed publishes (none held: `None`).
    fn hold_keyed_topics(self: &Rc<Self>, items: &[PublishItem]) -> Option<TopicHold> {
        let mut topics: Vec<String> = Vec::new();
        for item in items.iter().filter(|i| i.idempotency_key.is_some()) {
            if !topics.contains(&item.topic) {
                topics.push(item.topic.clone());
            }
        }
        if topics.is_empty() {
            return None;
        }
        let mut holds = self.holds.borrow_mut();
        for topic in &topics {
            holds.insert(topic.clone(), Vec::new());
        }
        Some(TopicHold {
            tier: self.clone(),
            topics,
        })
    }

    /// Reads the stream's last id for each topic of `items` whose cached last id is not
    /// known to be current (see [`ValkeyTier::assign_buffered_ids`]); returns what it read,
    /// per topic: the caller compares it with what its memory has seen of the topic (another
    /// writer's entries there are a reason to degrade, see [`ValkeyTier::degrade_buffered`]).
    async fn refresh_buffered_last(
        &self,
        items: &[PublishItem],
    ) -> Result<Vec<(String, MessageId)>, StoreError> {
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
        Ok(read)
    }

    /// Queues messages about to be acknowledged for the write-behind, or refuses them all at
    /// once if the backlog is full (the producer then gets 503, never an acknowledgement that
    /// would be dropped). Once queued, a message is retried with its id until Valkey stores
    /// it; only a refusal that no retry can change (say `-WRONGTYPE`) loses it, logged as an
    /// error and counted (`relay_valkey_errors_total{kind="buffered_lost"}`).
    ///
    /// Returns, per item, where a keyed publish's [`BehindDecision`] will arrive (`None` for
    /// the others, acknowledged now).
    pub fn enqueue_behind(
        self: &Rc<Self>,
        items: Vec<PublishItem>,
        ids: &[MessageId],
        now_ms: u64,
    ) -> Result<Vec<Option<oneshot::Receiver<BehindDecision>>>, StoreError> {
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
        // A keyed publish counts once it is stored (it may turn out a duplicate).
        for item in items.iter().filter(|i| i.idempotency_key.is_none()) {
            self.note_written(&item.topic);
        }
        let mut decisions = Vec::with_capacity(items.len());
        for ((item, id), new_topic) in items.into_iter().zip(ids).zip(fresh) {
            let (decision, receiver) = match item.idempotency_key {
                Some(_) => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                }
                None => (None, None),
            };
            decisions.push(receiver);
            *behind.per_topic.entry(item.topic.clone()).or_insert(0) += 1;
            behind.queue.push_back(BehindItem {
                item,
                id: *id,
                timestamp_ms: now_ms,
                new_topic,
                decision,
                reassign: false,
            });
        }
        let start = behind.doorbell.is_none();
        if start {
            let (tx, rx) = futures::channel::mpsc::channel(1);
            behind.doorbell = Some(tx);
            drop(behind);
            glommio::spawn_local(write_behind(Rc::downgrade(self), rx)).detach();
            return Ok(decisions);
        }
        // Rung outside the borrow: the executor may run the writer at once. Full means a
        // wake-up is already pending: enough.
        let mut doorbell = behind.doorbell.clone();
        drop(behind);
        if let Some(doorbell) = doorbell.as_mut() {
            let _ = doorbell.try_send(());
        }
        Ok(decisions)
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
        // The items, and beside them how each is sent.
        let (items, batch): (Vec<PublishItem>, Vec<Attempt>) = {
            let mut behind = self.behind.borrow_mut();
            behind.busy = true;
            behind
                .queue
                .iter()
                .take(BEHIND_BATCH)
                .map(|b| {
                    let attempt = Attempt {
                        id: b.id,
                        timestamp_ms: b.timestamp_ms,
                        new_topic: b.new_topic,
                        reassign: b.reassign,
                    };
                    (b.item.clone(), attempt)
                })
                .unzip()
        };
        let groups = group_by_topic(&items);
        let commands: Vec<Command> = groups
            .iter()
            .map(|group| {
                let entries: Vec<Entry<'_>> = group
                    .iter()
                    .map(|&i| Entry {
                        item: &items[i],
                        id: (!batch[i].reassign).then_some(batch[i].id),
                        timestamp_ms: batch[i].timestamp_ms,
                    })
                    .collect();
                let created = group
                    .iter()
                    .find(|&&i| batch[i].new_topic)
                    .map(|&i| batch[i].timestamp_ms);
                self.encode_publish(&items[group[0]].topic, &entries, created)
            })
            .collect();
        self.count("fcall", commands.len());
        self.count("xadd", batch.len());
        let replies = self.client.call_many(&commands).await;
        let mut outcomes: Vec<BehindOutcome> =
            (0..batch.len()).map(|_| BehindOutcome::Retry).collect();
        for (group, reply) in groups.iter().zip(replies) {
            for (&i, outcome) in group.iter().zip(parse_publish_reply(reply, group.len())) {
                outcomes[i] = match outcome {
                    Outcome::Stored { id, .. } => BehindOutcome::Stored(Some(id)),
                    // Its own earlier attempt (a reply lost with its connection): stored.
                    Outcome::Duplicate(ack) if ack.id == batch[i].id => BehindOutcome::Stored(None),
                    Outcome::Duplicate(ack) => BehindOutcome::Duplicate(ack),
                    // Transient refusals, of the whole call (refused before it ran: OOM,
                    // LOADING, BUSY, MASTERDOWN, NOREPLICAS) or of one entry's XADD.
                    Outcome::Failed(ValkeyError::Server(message)) if is_transient(&message) => {
                        BehindOutcome::Retry
                    }
                    Outcome::Failed(ValkeyError::Server(message))
                        if message.contains("equal or smaller") =>
                    {
                        BehindOutcome::Check
                    }
                    Outcome::Failed(ValkeyError::Server(message)) => BehindOutcome::Lost(message),
                    Outcome::Failed(_) => BehindOutcome::Retry,
                };
            }
        }
        // Refused as not above the stream's last id: stored already, or lost. Ask. (A keyed
        // publish is never sent twice, so for it the refusal means not stored.)
        let checks: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(i, o)| {
                matches!(o, BehindOutcome::Check) && items[*i].idempotency_key.is_none()
            })
            .map(|(i, _)| i)
            .collect();
        if !checks.is_empty() {
            let commands: Vec<Command> = checks
                .iter()
                .map(|&i| {
                    let key = self.stream_key.render(&items[i].topic);
                    let id = batch[i].id.to_string();
                    on(
                        &items[i].topic,
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
                        m.payload == items[i].payload && m.timestamp_ms == batch[i].timestamp_ms
                    })
                };
                outcomes[i] = match reply {
                    Ok(r) if ours(&r) => BehindOutcome::Stored(None),
                    Ok(_) => {
                        // Not there, and the stream is past it: someone else wrote the topic.
                        self.degrade_buffered(
                            &items[i].topic,
                            "an acknowledged id was refused: the stream already holds a higher one",
                        );
                        BehindOutcome::Reassign
                    }
                    Err(_) => BehindOutcome::Retry,
                };
            }
        }
        let mut retry = false;
        // A keyed publish failed: not sent again, but the streams are checked as after any
        // failure before the next ids.
        let mut recheck = false;
        let mut behind = self.behind.borrow_mut();
        let mut kept = VecDeque::new();
        let mut decided = Vec::new();
        for outcome in outcomes {
            let Some(mut done) = behind.queue.pop_front() else {
                break;
            };
            if let Some(decision) = done.decision.take() {
                // A keyed publish: its producer is waiting for this attempt, the only one.
                let answer = match outcome {
                    BehindOutcome::Stored(_) => {
                        decided.push(done.item.topic.clone());
                        BehindDecision::Stored
                    }
                    BehindOutcome::Duplicate(ack) => BehindDecision::Duplicate(ack),
                    BehindOutcome::Retry | BehindOutcome::Check | BehindOutcome::Reassign => {
                        recheck = true;
                        BehindDecision::Failed(StoreError::Unavailable(
                            "write-behind attempt failed; the message may or may not be stored"
                                .into(),
                        ))
                    }
                    BehindOutcome::Lost(why) => BehindDecision::Failed(StoreError::Rejected(why)),
                };
                let _ = decision.send(answer);
                behind.remove(&done.item);
                continue;
            }
            match outcome {
                BehindOutcome::Stored(stored_as) => {
                    if done.reassign {
                        behind.reassigned += 1;
                        tracing::error!(
                            topic = %done.item.topic,
                            acknowledged_as = %done.id,
                            stored_as = ?stored_as,
                            "acknowledged buffered message stored under a new id: another \
                             writer took its id first"
                        );
                    }
                }
                BehindOutcome::Duplicate(_) => {}
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
            behind.remove(&done.item);
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
        for topic in decided {
            self.note_written(&topic);
        }
        if retry || recheck {
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

/// Server refusals that pass on their own (memory freed, the dataset loaded, a script
/// finished, a failover or resharding done): the write-behind sends the batch again rather
/// than count acknowledged messages as lost.
fn is_transient(message: &str) -> bool {
    const TRANSIENT: [&str; 7] = [
        "OOM",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
    ];
    TRANSIENT.iter().any(|prefix| message.starts_with(prefix))
}

#[cfg(test)]
mod transient_tests {
    use super::is_transient;

    #[test]
    fn loading_and_busy_are_retried_wrongtype_is_not() {
        assert!(is_transient(
            "LOADING Valkey is loading the dataset in memory"
        ));
        assert!(is_transient(
            "OOM command not allowed when used memory > 'maxmemory'."
        ));
        assert!(is_transient("BUSY Valkey is busy running a script."));
        assert!(!is_transient(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        ));
    }
}
