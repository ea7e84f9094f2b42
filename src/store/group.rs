//! Consumer groups (work queues), storage side: what a group is, what taking, acknowledging
//! and releasing its messages mean, and the memory backend's groups.
//!
//! A group is a named cursor on one topic (`last_delivered`) plus the messages it delivered
//! and has not had acknowledged yet (its *pending* entries: who holds each, how often it was
//! delivered, when last). Both backends implement the same operations on the topic's owner:
//! - **valkey**: a Valkey Streams consumer group on the topic's stream (`store/valkey/group.rs`),
//!   shared by every relay on the Valkey, its settings in the topic's meta hash;
//! - **memory**: [`MemoryGroups`] below, one per shard, for the topics the shard owns, reading
//!   new messages from the hot tier.
//!
//! A *take* hands a consumer up to `max` messages: first pending ones that are due (their
//! `ack_timeout` ran out since their last delivery, or they were released by a `nack`),
//! reassigned to it with one more delivery; then new ones after the cursor. A due message
//! already delivered `max_deliveries` times is not handed out again: the take returns it as
//! *dead*, now held by [`DEAD_LETTER_CONSUMER`], and the shard publishes it to the dead-letter
//! topic and acknowledges it (`shard/group.rs`).
//!
//! Does not own: the consumer loops and their wake-ups (`delivery/group.rs`), dead-letter
//! publishing (`shard/group.rs`), the HTTP and WebSocket forms (`http/handlers/groups.rs`,
//! `net/websocket.rs`).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::hot_tier::{HotTier, Order, PageQuery};
use super::message::{Message, MessageId};
use super::StoreError;

/// Longest group or consumer name.
pub const MAX_NAME_LEN: usize = 64;

/// The consumer name a dead message is held by between its take and its acknowledgement (a
/// relay that dies in between leaves it there; it is due again after the group's timeout and
/// dead-lettered once: the publish is idempotent).
pub const DEAD_LETTER_CONSUMER: &str = "_dead-letter";

/// The consumer name a released (`nack`ed) message is held by until a take hands it out
/// again: it no longer counts against its former holder's `max_in_flight`.
pub const RELEASED_CONSUMER: &str = "_released";

/// `ack_timeout` when a create does not say.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 30_000;
pub const MIN_ACK_TIMEOUT_MS: u64 = 100;
pub const MAX_ACK_TIMEOUT_MS: u64 = 86_400_000;
/// `max_deliveries` when a create does not say.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
pub const MAX_MAX_DELIVERIES: u32 = 1000;

/// Dead messages one take moves at most (they cost a publish each, outside the caller's
/// `max`).
pub const MAX_DEAD_PER_TAKE: usize = 64;

/// Why a group or consumer name is refused (the text of a 400).
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a {what} name is 1 to {MAX_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "a {what} name may hold only letters, digits, `.`, `_` and `-`"
        ));
    }
    if name.starts_with('_') {
        // `_dead-letter` and `_released` hold messages on the relay's behalf.
        return Err(format!("a {what} name must not start with `_` (reserved)"));
    }
    Ok(())
}

/// A group's settings, as created. Stored as JSON in the topic's meta hash with Valkey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSettings {
    pub ack_timeout_ms: u64,
    pub max_deliveries: u32,
    /// Stored name of the dead-letter topic.
    pub dead_letter_topic: String,
}

/// Where a group's cursor starts (create) or is moved to (reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// Every retained message.
    Earliest,
    /// Only messages published from now on.
    Last,
    /// Messages after this id.
    After(MessageId),
}

/// One consumer of a group, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub name: String,
    /// Messages it holds unacknowledged.
    pub pending: u64,
    /// Since it last took or was handed something.
    pub idle_ms: u64,
}

/// A group, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupInfo {
    pub name: String,
    pub settings: GroupSettings,
    /// The newest message handed out; `None` before the first.
    pub last_delivered: Option<MessageId>,
    pub pending: u64,
    /// Messages after `last_delivered` not yet handed out; `None` when the backend cannot tell.
    pub lag: Option<u64>,
    /// The age of the oldest of them, in milliseconds (0 with none).
    pub lag_ms: Option<u64>,
    pub consumers: Vec<ConsumerInfo>,
}

/// A message handed to a group consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessage {
    pub message: Message,
    /// 1 on its first delivery to the group, one more on each redelivery.
    pub delivery_count: u64,
    /// Unix milliseconds until which this delivery is the consumer's alone: an
    /// acknowledgement before it is never late. It is a lower bound on when the message
    /// becomes due (the take's start, or for a redelivery the moment the relay learnt it was
    /// due, plus `ack_timeout`), on the relay's clock, so a consumer can trust it and the model
    /// checker can judge `max_in_flight` and redelivery timing by the relay's own clock
    /// rather than by when frames arrived.
    pub ack_deadline_ms: u64,
}

/// What a take handed out.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    /// For the consumer, due redeliveries first, then new messages, each group in id order.
    pub messages: Vec<GroupMessage>,
    /// Due messages past `max_deliveries`, now held by [`DEAD_LETTER_CONSUMER`]: to be
    /// published to the dead-letter topic, then acknowledged.
    pub dead: Vec<GroupMessage>,
    /// How many of `messages` are redeliveries.
    pub redelivered: usize,
    /// Pending messages found gone from the topic (trimmed, expired) and dropped.
    pub dropped: usize,
}

/// The outcome of an acknowledgement or release, id by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Ids this call settled.
    pub done: Vec<MessageId>,
    /// Ids that were not pending in the group (settled before, never delivered, unknown).
    pub unknown: Vec<MessageId>,
}

impl GroupMessage {
    /// The message's wire form ([`write_message_json`](super::message::write_message_json))
    /// with `"group"`, `"delivery_count"` and `"ack_deadline"` added: what every transport hands a group
    /// consumer.
    pub fn write_json(&self, out: &mut Vec<u8>, topic: &str, group: &str) {
        super::message::write_message_json(out, topic, &self.message);
        // Replace the closing brace; a group name needs no escaping (validate_name).
        out.pop();
        out.extend_from_slice(b",\"group\":\"");
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(b"\",\"delivery_count\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.delivery_count).as_bytes());
        out.extend_from_slice(b",\"ack_deadline\":\"");
        super::message::write_rfc3339_millis(out, self.ack_deadline_ms);
        out.extend_from_slice(b"\"}");
    }
}

/// What a consumer asks of its group in one take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeRequest {
    pub consumer: String,
    /// At most this many messages.
    pub max: usize,
    /// Also look for due messages (ack timeouts ran out, releases).
    pub claim: bool,
    /// What the consumer holds now: due ones among them are not handed back to it (it has
    /// them), only to others, or dead-lettered.
    pub held: Vec<MessageId>,
}

/// Why a group operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    #[error("no such group")]
    NotFound,
    #[error("the group exists already")]
    Exists,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One pending entry of a memory group.
#[derive(Debug, Clone)]
struct Pending {
    message: Message,
    consumer: String,
    deliveries: u64,
    /// When last delivered.
    delivered_at_ms: u64,
    /// Released (`nack`) since: due at once.
    released: bool,
}

#[derive(Debug, Clone)]
struct MemoryGroup {
    settings: GroupSettings,
    last_delivered: MessageId,
    delivered_any: bool,
    pending: BTreeMap<MessageId, Pending>,
    /// Consumer name → when it last took something.
    consumers: BTreeMap<String, u64>,
}

impl MemoryGroup {
    fn is_due(&self, pending: &Pending, now_ms: u64) -> bool {
        pending.released
            || now_ms.saturating_sub(pending.delivered_at_ms) >= self.settings.ack_timeout_ms
    }
}

/// The memory backend's groups of one shard's topics.
#[derive(Debug, Default)]
pub struct MemoryGroups {
    topics: HashMap<String, BTreeMap<String, MemoryGroup>>,
}

impl MemoryGroups {
    pub fn new() -> MemoryGroups {
        MemoryGroups::default()
    }

    pub fn create(
        &mut self,
        hot: &HotTier,
        topic: &str,
        name: &str,
        settings: GroupSettings,
        start: GroupStart,
    ) -> Result<(), GroupError> {
        let groups = self.topics.entry(topic.to_owned()).or_default();
        if groups.contains_key(name) {
            return Err(GroupError::Exists);
        }
        groups.insert(
            name.to_owned(),
            MemoryGroup {
                settings,
                last_delivered: cursor_for(hot, topic, start),
                delivered_any: false,
                pending: BTreeMap::new(),
                consumers: BTreeMap::new(),
            },
        );
        Ok(())
    }

    pub fn delete(&mut self, topic: &str, name: &str) -> bool {
        let Some(groups) = self.topics.get_mut(topic) else {
            return false;
        };
        let found = groups.remove(name).is_some();
        if groups.is_empty() {
            self.topics.remove(topic);
        }
        found
    }

    /// The topic was deleted: its groups go with it.
    pub fn drop_topic(&mut self, topic: &str) {
        self.topics.remove(topic);
    }

    pub fn reset(
        &mut self,
        hot: &HotTier,
        topic: &str,
        name: &str,
        to: GroupStart,
    ) -> Result<(), GroupError> {
        let group = self.group_mut(topic, name)?;
        group.last_delivered = cursor_for(hot, topic, to);
        Ok(())
    }

    pub fn settings(&self, topic: &str, name: &str) -> Option<&GroupSettings> {
        self.topics.get(topic)?.get(name).map(|g| &g.settings)
    }

    pub fn info(
        &self,
        hot: &HotTier,
        topic: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<GroupInfo, GroupError> {
        let group = self
            .topics
            .get(topic)
            .and_then(|g| g.get(name))
            .ok_or(GroupError::NotFound)?;
        Ok(info_of(hot, topic, name, group, now_ms))
    }

    pub fn list(&self, hot: &HotTier, topic: &str, now_ms: u64) -> Vec<GroupInfo> {
        self.topics.get(topic).map_or_else(Vec::new, |groups| {
            groups
                .iter()
                .map(|(name, group)| info_of(hot, topic, name, group, now_ms))
                .collect()
        })
    }

    /// Messages held by `consumer` in the group and not due yet (released, or delivered an
    /// `ack_timeout` ago or more: their places are free, the group may give them to anyone).
    pub fn held_by(
        &self,
        topic: &str,
        name: &str,
        consumer: &str,
        now_ms: u64,
    ) -> Result<usize, GroupError> {
        let group = self
            .topics
            .get(topic)
            .and_then(|g| g.get(name))
            .ok_or(GroupError::NotFound)?;
        let timeout = group.settings.ack_timeout_ms;
        Ok(group
            .pending
            .values()
            .filter(|p| {
                p.consumer == consumer
                    && !p.released
                    && now_ms < p.delivered_at_ms.saturating_add(timeout)
            })
            .count())
    }

    /// Hands the consumer up to `max` messages (see the module doc). Due pending entries
    /// are looked at only with `claim`.
    pub fn take(
        &mut self,
        hot: &HotTier,
        topic: &str,
        name: &str,
        request: &TakeRequest,
        now_ms: u64,
    ) -> Result<Taken, GroupError> {
        let TakeRequest {
            consumer,
            max,
            claim,
            held,
        } = request;
        let (consumer, max, claim) = (consumer.as_str(), *max, *claim);
        let group = self.group_mut(topic, name)?;
        group.consumers.insert(consumer.to_owned(), now_ms);
        let timeout = group.settings.ack_timeout_ms;
        let mut taken = Taken::default();
        if claim {
            let due: Vec<MessageId> = group
                .pending
                .iter()
                .filter(|(_, p)| group.is_due(p, now_ms))
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                if taken.messages.len() >= max && taken.dead.len() >= MAX_DEAD_PER_TAKE {
                    break;
                }
                let max_deliveries = u64::from(group.settings.max_deliveries);
                let Some(pending) = group.pending.get_mut(&id) else {
                    continue;
                };
                if pending.message.is_expired(now_ms) {
                    group.pending.remove(&id);
                    taken.dropped += 1;
                    continue;
                }
                if pending.deliveries >= max_deliveries {
                    if taken.dead.len() < MAX_DEAD_PER_TAKE {
                        pending.consumer = DEAD_LETTER_CONSUMER.to_owned();
                        pending.delivered_at_ms = now_ms;
                        pending.released = false;
                        taken.dead.push(GroupMessage {
                            message: pending.message.clone(),
                            delivery_count: pending.deliveries,
                            ack_deadline_ms: now_ms.saturating_add(timeout),
                        });
                    }
                } else if taken.messages.len() < max && !held.contains(&id) {
                    pending.consumer = consumer.to_owned();
                    pending.deliveries += 1;
                    pending.delivered_at_ms = now_ms;
                    pending.released = false;
                    taken.messages.push(GroupMessage {
                        message: pending.message.clone(),
                        delivery_count: pending.deliveries,
                        ack_deadline_ms: now_ms.saturating_add(timeout),
                    });
                    taken.redelivered += 1;
                }
            }
        }
        let room = max.saturating_sub(taken.messages.len());
        if room > 0 {
            let mut query = PageQuery::new(Some(group.last_delivered), Order::Asc, room);
            query.max_bytes = usize::MAX;
            if let Some(page) = hot.read(topic, &query, now_ms) {
                for message in page.messages {
                    group.last_delivered = message.id;
                    group.delivered_any = true;
                    group.pending.insert(
                        message.id,
                        Pending {
                            message: message.clone(),
                            consumer: consumer.to_owned(),
                            deliveries: 1,
                            delivered_at_ms: now_ms,
                            released: false,
                        },
                    );
                    taken.messages.push(GroupMessage {
                        message,
                        delivery_count: 1,
                        ack_deadline_ms: now_ms.saturating_add(timeout),
                    });
                }
            }
        }
        Ok(taken)
    }

    /// Acknowledges `ids`: with `dead`, those held for dead-lettering (by the shard that
    /// dead-lettered them); else each one pending with anyone else. An acknowledgement and a
    /// dead letter of one message never both happen.
    pub fn ack(
        &mut self,
        topic: &str,
        name: &str,
        ids: &[MessageId],
        dead: bool,
    ) -> Result<Settled, GroupError> {
        let group = self.group_mut(topic, name)?;
        let mut settled = Settled::default();
        for id in ids {
            let held_for_dead = group
                .pending
                .get(id)
                .map(|p| p.consumer == DEAD_LETTER_CONSUMER);
            if held_for_dead == Some(dead) {
                group.pending.remove(id);
                settled.done.push(*id);
            } else {
                settled.unknown.push(*id);
            }
        }
        Ok(settled)
    }

    /// Releases `ids` (a `nack`): each one pending (with `consumer`, held by it) is due at
    /// once, its delivery count kept.
    pub fn release(
        &mut self,
        topic: &str,
        name: &str,
        ids: &[MessageId],
        consumer: Option<&str>,
    ) -> Result<Settled, GroupError> {
        let group = self.group_mut(topic, name)?;
        let mut settled = Settled::default();
        for id in ids {
            match group.pending.get_mut(id) {
                Some(pending)
                    if pending.consumer != DEAD_LETTER_CONSUMER
                        && pending.consumer != RELEASED_CONSUMER
                        && consumer.is_none_or(|c| c == pending.consumer) =>
                {
                    pending.released = true;
                    pending.consumer = RELEASED_CONSUMER.to_owned();
                    settled.done.push(*id);
                }
                _ => settled.unknown.push(*id),
            }
        }
        Ok(settled)
    }

    fn group_mut(&mut self, topic: &str, name: &str) -> Result<&mut MemoryGroup, GroupError> {
        self.topics
            .get_mut(topic)
            .and_then(|g| g.get_mut(name))
            .ok_or(GroupError::NotFound)
    }
}

/// The cursor a start means for a topic of `hot`.
fn cursor_for(hot: &HotTier, topic: &str, start: GroupStart) -> MessageId {
    match start {
        GroupStart::Earliest => MessageId::MIN,
        GroupStart::Last => hot.last_id(topic).unwrap_or(MessageId::MIN),
        GroupStart::After(id) => id,
    }
}

fn info_of(hot: &HotTier, topic: &str, name: &str, group: &MemoryGroup, now_ms: u64) -> GroupInfo {
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for pending in group.pending.values() {
        *held.entry(pending.consumer.as_str()).or_default() += 1;
    }
    let mut consumers: Vec<ConsumerInfo> = group
        .consumers
        .iter()
        .map(|(name, seen)| ConsumerInfo {
            name: name.clone(),
            pending: held.get(name.as_str()).copied().unwrap_or(0),
            idle_ms: now_ms.saturating_sub(*seen),
        })
        .collect();
    if let Some(&n) = held.get(DEAD_LETTER_CONSUMER) {
        consumers.push(ConsumerInfo {
            name: DEAD_LETTER_CONSUMER.to_owned(),
            pending: n,
            idle_ms: 0,
        });
    }
    let oldest = hot.first_after(topic, group.last_delivered);
    GroupInfo {
        name: name.to_owned(),
        settings: group.settings.clone(),
        last_delivered: group.delivered_any.then_some(group.last_delivered),
        pending: group.pending.len() as u64,
        lag: Some(hot.count_after(topic, group.last_delivered) as u64),
        lag_ms: Some(oldest.map_or(0, |ts| now_ms.saturating_sub(ts))),
        consumers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hot_tier::HotTierLimits;
    use bytes::Bytes;

    fn hot_with(topic: &str, n: u64) -> HotTier {
        let mut hot = HotTier::new(HotTierLimits {
            max_messages_per_topic: 10_000,
            retention_ms: 86_400_000,
            max_bytes: usize::MAX,
        });
        for i in 1..=n {
            let message = Message {
                id: MessageId::new(i, 0),
                timestamp_ms: i,
                expires_at_ms: None,
                payload: Bytes::from_static(b"1"),
                metadata: None,
            };
            assert!(hot.insert(topic, message).is_ok());
        }
        hot
    }

    fn settings(ack_timeout_ms: u64, max_deliveries: u32) -> GroupSettings {
        GroupSettings {
            ack_timeout_ms,
            max_deliveries,
            dead_letter_topic: "t.dead".into(),
        }
    }

    fn req(consumer: &str, max: usize, claim: bool) -> TakeRequest {
        TakeRequest {
            consumer: consumer.into(),
            max,
            claim,
            held: Vec::new(),
        }
    }

    fn ids(taken: &[GroupMessage]) -> Vec<u64> {
        taken.iter().map(|m| m.message.id.ms).collect()
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(validate_name("group", "workers-1.a_b").is_ok());
        assert!(validate_name("group", "").is_err());
        assert!(validate_name("group", &"a".repeat(64)).is_ok());
        assert!(validate_name("group", &"a".repeat(65)).is_err());
        assert!(validate_name("group", "a b").is_err());
        assert!(validate_name("group", "a/b").is_err());
        assert!(validate_name("consumer", DEAD_LETTER_CONSUMER).is_err());
        assert!(validate_name("consumer", RELEASED_CONSUMER).is_err());
    }

    #[test]
    fn each_message_goes_to_one_consumer_and_redelivery_counts() -> Result<(), GroupError> {
        let hot = hot_with("t", 5);
        let mut groups = MemoryGroups::new();
        groups.create(&hot, "t", "g", settings(1000, 2), GroupStart::Earliest)?;
        let a = groups.take(&hot, "t", "g", &req("a", 3, true), 10)?;
        let b = groups.take(&hot, "t", "g", &req("b", 3, true), 10)?;
        assert_eq!(ids(&a.messages), vec![1, 2, 3]);
        assert_eq!(ids(&b.messages), vec![4, 5]);
        // Not due yet: nothing for c.
        assert!(groups
            .take(&hot, "t", "g", &req("c", 3, true), 500)?
            .messages
            .is_empty());
        let settled = groups.ack(
            "t",
            "g",
            &[
                MessageId::new(1, 0),
                MessageId::new(1, 0),
                MessageId::new(9, 0),
            ],
            false,
        )?;
        assert_eq!(settled.done, vec![MessageId::new(1, 0)]);
        assert_eq!(settled.unknown.len(), 2);
        // Due after the timeout: 2..5 to c, with a second delivery each.
        let c = groups.take(&hot, "t", "g", &req("c", 10, true), 1010)?;
        assert_eq!(ids(&c.messages), vec![2, 3, 4, 5]);
        assert!(c.messages.iter().all(|m| m.delivery_count == 2));
        assert_eq!(c.redelivered, 4);
        // Due again, past max_deliveries: dead.
        let d = groups.take(&hot, "t", "g", &req("d", 10, true), 2100)?;
        assert!(d.messages.is_empty());
        assert_eq!(ids(&d.dead), vec![2, 3, 4, 5]);
        // Held for dead-lettering: a consumer's late acknowledgement does not settle it, the
        // dead-letterer's does.
        let two = [MessageId::new(2, 0)];
        assert_eq!(groups.ack("t", "g", &two, false)?.unknown, two);
        assert_eq!(groups.ack("t", "g", &two, true)?.done, two);
        let info = groups.info(&hot, "t", "g", 2100)?;
        assert_eq!(info.pending, 3);
        assert_eq!(info.lag, Some(0));
        Ok(())
    }

    #[test]
    fn release_makes_a_message_due_at_once_and_start_last_skips_history() -> Result<(), GroupError>
    {
        let hot = hot_with("t", 3);
        let mut groups = MemoryGroups::new();
        groups.create(&hot, "t", "g", settings(60_000, 5), GroupStart::Last)?;
        assert!(groups
            .take(&hot, "t", "g", &req("a", 5, true), 1)?
            .messages
            .is_empty());
        assert!(matches!(
            groups.create(&hot, "t", "g", settings(1, 1), GroupStart::Last),
            Err(GroupError::Exists)
        ));
        groups.reset(&hot, "t", "g", GroupStart::After(MessageId::new(1, 0)))?;
        let a = groups.take(&hot, "t", "g", &req("a", 5, true), 1)?;
        assert_eq!(ids(&a.messages), vec![2, 3]);
        assert!(groups
            .release("t", "g", &[MessageId::new(3, 0)], Some("b"))?
            .done
            .is_empty());
        let released = groups.release("t", "g", &[MessageId::new(3, 0)], Some("a"))?;
        assert_eq!(released.done, vec![MessageId::new(3, 0)]);
        let b = groups.take(&hot, "t", "g", &req("b", 5, true), 2)?;
        assert_eq!(ids(&b.messages), vec![3]);
        assert_eq!(b.messages[0].delivery_count, 2);
        assert_eq!(groups.held_by("t", "g", "a", 2)?, 1);
        // Once its ack_timeout has run out, a held message's place is free again.
        assert_eq!(groups.held_by("t", "g", "a", 1 + 60_000)?, 0);
        // Released, it no longer counts against its former holder.
        groups.release("t", "g", &[MessageId::new(2, 0)], Some("a"))?;
        assert_eq!(groups.held_by("t", "g", "a", 2)?, 0);
        assert!(groups.delete("t", "g"));
        assert!(matches!(
            groups.take(&hot, "t", "g", &req("a", 1, true), 3),
            Err(GroupError::NotFound)
        ));
        Ok(())
    }
}
