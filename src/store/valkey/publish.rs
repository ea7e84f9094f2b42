//! `ack: persisted` publishes: one `pulsar_publish` call per topic of the request (Valkey
//! picks the ids: `*`), all queued as one pipeline, and the per-topic reorder queue.
//!
//! Valkey answers a topic's calls in id order (they travel over one connection, see the
//! parent module), but the publishing tasks resume in whatever order the executor picks. So
//! each publish reserves its place in its topic's queue in the same synchronous section that
//! queues its commands (queue order = wire order), and a stored message reaches the hot tier
//! only once every publish queued before it on its topic has been answered.
//!
//! Idempotency: an entry whose key Valkey has seen is answered with the first publish's id
//! and timestamp and reaches neither the hot tier nor the feed (it was delivered when it was
//! stored). Two attempts with one key in flight at once are decided by Valkey, which runs one
//! call after the other: the second finds the first's key, whichever relay sent it.
//!
//! Does not own the call's encoding (`function.rs`) nor `ack: buffered` publishes
//! (`behind.rs`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::function::{parse_publish_reply, Entry, Outcome};
use super::{store_error, ValkeyTier};
use crate::store::message::{Message, MessageId};
use crate::store::{PublishAck, PublishItem, StoreError};
use crate::valkey::Command;

/// One in-flight entry's outcome, filled when its reply arrives.
pub(super) enum Slot {
    Waiting,
    /// The stored message and the stream entry it was appended after (if known), or `None`
    /// (failed, or a duplicate: nothing new to cache).
    Done(Option<(Message, Option<MessageId>)>),
}

/// The positions of `items` grouped by topic: groups in order of each topic's first item,
/// positions in item order within a group.
pub(super) fn group_by_topic(items: &[PublishItem]) -> Vec<Vec<usize>> {
    // The common cases first: a single publish, or a bulk to one topic.
    if items.iter().all(|item| item.topic == items[0].topic) {
        return vec![(0..items.len()).collect()];
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        match group_of.get(item.topic.as_str()) {
            Some(&group) => groups[group].push(index),
            None => {
                group_of.insert(&item.topic, groups.len());
                groups.push(vec![index]);
            }
        }
    }
    groups
}

impl ValkeyTier {
    /// Persists `items` and returns, per item, what the producer is told: the stored
    /// message's id (from Valkey), the first publish's answer for a key seen before, or why
    /// it failed. Stored messages reach `on_persisted` in id order per topic (see module doc),
    /// each with the id of the stream entry it was appended after, when Valkey said.
    pub async fn publish_persisted(
        &self,
        mut items: Vec<PublishItem>,
        now_ms: u64,
        on_persisted: &dyn Fn(&str, Message, Option<MessageId>),
    ) -> Vec<Result<PublishAck, StoreError>> {
        if items.is_empty() {
            return Vec::new();
        }
        let groups = group_by_topic(&items);
        let commands: Vec<Command> = {
            let known = self.known.borrow();
            groups
                .iter()
                .map(|group| {
                    let topic = items[group[0]].topic.as_str();
                    let entries: Vec<Entry<'_>> = group
                        .iter()
                        .map(|&i| Entry {
                            item: &items[i],
                            id: None,
                            timestamp_ms: now_ms,
                        })
                        .collect();
                    // Topic metadata (`created`) for topics this process has not written
                    // before; the function keeps the first creation time (HSETNX).
                    let created = (!known.contains(topic)).then_some(now_ms);
                    self.encode_publish(topic, &entries, created)
                })
                .collect()
        };
        self.count("fcall", commands.len());
        self.count("xadd", items.len());
        // Queue the commands first: a refused batch (queue full) is answered at once and
        // never enters the per-topic queues, so what they hold stays bounded by
        // `valkey.max_pending` however fast refused publishes arrive. Then reserve each
        // item's place in its topic's queue in the same synchronous section (no await
        // between), in the order its call carries it, so queue order = wire order. With
        // `ack: replicated` each batch carrying a call ends with the client's `WAIT`.
        let call = match self.submit_publish(&commands) {
            Ok(call) => call,
            Err(e) => {
                let error = store_error(e);
                return items.iter().map(|_| Err(error.clone())).collect();
            }
        };
        let mut slots: Vec<Option<Rc<RefCell<Slot>>>> = vec![None; items.len()];
        {
            let mut in_flight = self.in_flight.borrow_mut();
            for group in &groups {
                let topic = &items[group[0]].topic;
                // Look up before inserting: the topic is cloned (allocated) only when it has
                // nothing in flight yet.
                let queue = match in_flight.get_mut(topic.as_str()) {
                    Some(queue) => queue,
                    None => in_flight.entry(topic.clone()).or_default(),
                };
                for &i in group {
                    let slot = Rc::new(RefCell::new(Slot::Waiting));
                    queue.push_back(slot.clone());
                    slots[i] = Some(slot);
                }
            }
        }
        let (replies, waits) = call.await;
        let mut outcomes: Vec<Option<(Outcome, usize)>> = vec![None; items.len()];
        for (g, (group, reply)) in groups.iter().zip(replies).enumerate() {
            for (&i, outcome) in group.iter().zip(parse_publish_reply(reply, group.len())) {
                // With the call's position: its batch's `WAIT` reply is the call's.
                outcomes[i] = Some((outcome, g));
            }
        }
        let mut results = Vec::with_capacity(items.len());
        for ((item, slot), outcome) in items.iter_mut().zip(slots).zip(outcomes) {
            let (cached, result) = match outcome {
                Some((Outcome::Stored { id, after }, call)) => {
                    self.note_written(&item.topic);
                    // Taken, not cloned: the item's topic is still needed below.
                    let message = Message {
                        id,
                        timestamp_ms: now_ms,
                        expires_at_ms: item.ttl_ms.map(|ttl| now_ms.saturating_add(ttl)),
                        payload: std::mem::take(&mut item.payload),
                        metadata: item.metadata.take(),
                    };
                    // `ack: replicated`: stored, but acknowledged (and cached, so delivered
                    // live) only if enough replicas have it.
                    let wait = waits.as_ref().and_then(|w| w.get(call));
                    match self.replicated_or_unavailable(Ok(message), wait) {
                        Ok(message) => {
                            let ack = PublishAck {
                                id,
                                timestamp_ms: now_ms,
                            };
                            (Some((message, after)), Ok(ack))
                        }
                        Err(e) => (None, Err(e)),
                    }
                }
                // A replay: the first publish's answer, with no `WAIT` verdict applied, also
                // under `ack: replicated`. This call wrote nothing, and the `WAIT` of its batch
                // counts only this connection's writes, while the first attempt's entry may
                // have been written on another connection or relay: a short count would not
                // mean the entry is missing on the replicas, nor a full count that it is
                // there. So a replay repeats the first answer's id (the producer's retry
                // converges on one message) rather than turning it into a 503 that another
                // retry could not change. The one weaker case: a first attempt answered 503
                // for too few replicas whose retry comes back as this duplicate is told 201
                // although no `WAIT` has confirmed that entry (by then the replicas had at
                // least `durability.replica_timeout` to catch up). Never cached either way: a
                // duplicate was delivered, or deliberately not, when it was stored.
                Some((Outcome::Duplicate(ack), _)) => (None, Ok(ack)),
                Some((Outcome::Failed(e), _)) => (None, Err(store_error(e))),
                None => (
                    None,
                    Err(StoreError::Unavailable(
                        "missing pulsar_publish reply".into(),
                    )),
                ),
            };
            if let Some(slot) = slot {
                *slot.borrow_mut() = Slot::Done(cached);
            }
            results.push(result);
        }
        // Hand finished messages to the hot tier in submission order per topic.
        for group in &groups {
            self.drain_in_flight(&items[group[0]].topic, on_persisted);
        }
        results
    }

    fn drain_in_flight(
        &self,
        topic: &str,
        on_persisted: &dyn Fn(&str, Message, Option<MessageId>),
    ) {
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
        for (message, after) in ready {
            on_persisted(topic, message, after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{item, keyed, new_tier, tier_on};
    use super::*;

    #[test]
    fn items_are_grouped_per_topic_in_order() {
        let items = [item("a", 1, None), item("b", 1, None), item("a", 1, None)];
        assert_eq!(group_by_topic(&items), vec![vec![0, 2], vec![1]]);
        assert_eq!(group_by_topic(&items[..1]), vec![vec![0]]);
    }

    /// A replay stores nothing and gets the first attempt's id and timestamp, also within
    /// one call and when the first attempt was in another call of the same pipeline.
    #[test]
    fn a_seen_key_stores_nothing_and_answers_the_first_publish() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let cached = RefCell::new(Vec::new());
            let cache =
                |topic: &str, m: Message, _| cached.borrow_mut().push((topic.to_owned(), m.id));
            let first = tier
                .publish_persisted(vec![keyed("t", 5, "k1")], 1_000, &cache)
                .await;
            let first = first[0].clone().expect("stored");
            assert_eq!(first.timestamp_ms, 1_000);
            // The replay, with a later clock, in a bulk beside a new key and a plain item.
            let again = tier
                .publish_persisted(
                    vec![
                        keyed("t", 5, "k1"),
                        keyed("t", 5, "k2"),
                        item("t", 5, None),
                        keyed("t", 5, "k2"),
                    ],
                    9_000,
                    &cache,
                )
                .await;
            let again: Vec<PublishAck> = again.into_iter().map(|r| r.expect("answered")).collect();
            assert_eq!(again[0], first);
            assert_ne!(again[1].id, first.id);
            assert_eq!(again[3], again[1], "the same key twice in one call");
            let ids: Vec<_> = cached.borrow().iter().map(|(_, id)| *id).collect();
            assert_eq!(ids, vec![first.id, again[1].id, again[2].id]);
            let len = tier.client.call(&[b"XLEN", b"s:t"]).await.expect("xlen");
            assert_eq!(len.as_int(), Some(3));
            // Scoped per topic: the same key on another topic publishes.
            let other = tier
                .publish_persisted(vec![keyed("u", 5, "k1")], 9_000, &cache)
                .await;
            // (Its id may equal `first.id`: each stream numbers its own entries, and the two
            // can fall in one millisecond. A fresh store carries this call's clock.)
            assert_eq!(other[0].clone().expect("stored").timestamp_ms, 9_000);
            let len = tier.client.call(&[b"XLEN", b"s:u"]).await.expect("xlen");
            assert_eq!(len.as_int(), Some(1));
        });
    }
}
