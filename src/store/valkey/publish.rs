//! `ack: persisted` publishes: one pipeline of XADDs (with `*` ids: Valkey picks them) plus
//! the meta commands of topics new to this tier, and the per-topic reorder queue.
//!
//! Valkey answers a topic's XADDs in id order (they travel over one connection, see the
//! parent module), but the publishing tasks resume in whatever order the executor picks. So
//! each publish reserves its place in its topic's queue in the same synchronous section that
//! queues its commands (queue order = wire order), and a stored message reaches the hot tier
//! only once every publish queued before it on its topic has been answered.
//!
//! Does not own the entry format (`entry.rs`) nor `ack: buffered` publishes (`behind.rs`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::{on, store_error, ValkeyTier};
use crate::store::message::{write_rfc3339_millis, Message, MessageId};
use crate::store::{PublishItem, StoreError};
use crate::valkey::{Command, Reply};

/// One in-flight XADD's outcome, filled when its reply arrives.
pub(super) enum Slot {
    Waiting,
    Done(Option<Message>),
}

impl ValkeyTier {
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
        self.notify_batch(
            results
                .iter()
                .filter_map(|(topic, r)| r.as_ref().ok().map(|m| (topic.as_str(), m.id))),
        );
        // Hand finished messages to the hot tier in submission order per topic.
        for (topic, _) in &results {
            self.drain_in_flight(topic, on_persisted);
        }
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// One feed notification per topic of a stored batch, naming its last id (see
    /// `feed.rs`). `stored` yields each stored entry as (topic, id).
    pub(super) fn notify_batch<'a>(&self, stored: impl Iterator<Item = (&'a str, MessageId)>) {
        let mut stored: Vec<(&str, MessageId)> = stored.collect();
        // By topic, then id: the last of each run is its topic's newest.
        stored.sort_unstable();
        for (i, (topic, id)) in stored.iter().enumerate() {
            if stored.get(i + 1).is_none_or(|(next, _)| next != topic) {
                self.notify_feed(topic, *id);
            }
        }
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
}
