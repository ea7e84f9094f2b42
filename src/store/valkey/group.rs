//! Consumer groups on Valkey: each group is a Valkey Streams consumer group on the topic's
//! stream, so it is durable and shared by every relay on the Valkey (Sentinel and Cluster
//! included: every command is routed by the topic, like the stream's own).
//!
//! - create: `XGROUP CREATE <stream> <group> <id|$|0> MKSTREAM`, then the settings
//!   (`ack_timeout`, `max_deliveries`, dead-letter topic) as JSON in the topic's meta hash,
//!   field `group:<name>`;
//! - take: with `claim`, `XPENDING … IDLE <ack_timeout>` finds due entries and `XCLAIM … <min
//!   idle>` reassigns them (to the consumer, or to the dead-letter holder past
//!   `max_deliveries`): the min-idle check makes one claimer win when several relays race;
//!   then `XREADGROUP … >` for new entries;
//! - ack: `FCALL pulsar_group_ack` (`publish.lua`): per id, `XACK` unless the entry is held
//!   for dead-lettering, so an acknowledgement and a dead letter never both happen; the
//!   dead-lettering relay acknowledges its own with plain `XACK`s;
//! - release (`nack`): `XCLAIM … IDLE <long ago> JUSTID` to the release holder (so it no
//!   longer counts against its consumer's `max_in_flight`): due at once, its delivery count
//!   kept;
//! - listing: `XINFO GROUPS` / `XINFO CONSUMERS`, and the first undelivered entry for the lag
//!   in time.
//!
//! Settings are cached per shard for [`SETTINGS_TTL`]: they never change after a create
//! (a delete and re-create under the same name is seen within that time).

use std::time::{Duration, Instant};

use super::entry::parse_entry;
use super::{on, store_error, ValkeyTier};
use crate::store::group::{
    ConsumerInfo, GroupError, GroupInfo, GroupMessage, GroupSettings, GroupStart, Settled,
    TakeRequest, Taken, DEAD_LETTER_CONSUMER, DEFAULT_ACK_TIMEOUT_MS, DEFAULT_MAX_DELIVERIES,
    MAX_DEAD_PER_TAKE, RELEASED_CONSUMER,
};
use crate::store::message::MessageId;
use crate::valkey::{Reply, ValkeyError};

/// Reads one take makes past entries that all turned out expired.
const MAX_EXPIRED_ROUNDS: usize = 1024;

/// How long a shard trusts its cached copy of a group's settings.
const SETTINGS_TTL: Duration = Duration::from_secs(5);

/// The meta-hash field of a group's settings.
fn settings_field(group: &str) -> String {
    format!("group:{group}")
}

/// `NOGROUP`: the stream or the group does not exist.
fn is_no_group(e: &ValkeyError) -> bool {
    matches!(e, ValkeyError::Server(m) if m.starts_with("NOGROUP")
        || m.contains("no such key")
        // XGROUP DESTROY / SETID on a stream that does not exist.
        || m.contains("requires the key to exist"))
}

fn group_error(e: ValkeyError) -> GroupError {
    if is_no_group(&e) {
        GroupError::NotFound
    } else {
        GroupError::Store(store_error(e))
    }
}

fn id_arg(start: GroupStart) -> String {
    match start {
        GroupStart::Earliest => "0".to_owned(),
        GroupStart::Last => "$".to_owned(),
        GroupStart::After(id) => id.to_string(),
    }
}

/// The settings a group created without ours (by hand, `XGROUP CREATE`) runs with.
pub(crate) fn default_settings(topic: &str) -> GroupSettings {
    GroupSettings {
        ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
        max_deliveries: DEFAULT_MAX_DELIVERIES,
        dead_letter_topic: format!("{topic}.dead"),
    }
}

/// A flat `[key, value, key, value, …]` array (RESP2 maps) looked up by key.
fn field<'a>(map: &'a [Reply], key: &str) -> Option<&'a Reply> {
    map.chunks_exact(2)
        .find(|kv| kv[0].as_str() == Some(key))
        .map(|kv| &kv[1])
}

fn int_field(map: &[Reply], key: &str) -> Option<u64> {
    field(map, key)
        .and_then(Reply::as_int)
        .and_then(|n| u64::try_from(n).ok())
}

impl ValkeyTier {
    pub async fn group_create(
        &self,
        topic: &str,
        group: &str,
        settings: &GroupSettings,
        start: GroupStart,
    ) -> Result<(), GroupError> {
        let key = self.stream_key.render(topic);
        let id = id_arg(start);
        self.count("xgroup", 1);
        match self
            .client
            .call_routed(
                topic.as_bytes(),
                &[
                    b"XGROUP",
                    b"CREATE",
                    key.as_bytes(),
                    group.as_bytes(),
                    id.as_bytes(),
                    b"MKSTREAM",
                ],
            )
            .await
        {
            Ok(_) => {}
            Err(ValkeyError::Server(m)) if m.starts_with("BUSYGROUP") => {
                return Err(GroupError::Exists)
            }
            Err(e) => return Err(GroupError::Store(store_error(e))),
        }
        self.note_known(topic);
        let json = serde_json::to_vec(settings)
            .map_err(|e| GroupError::Store(crate::store::StoreError::Rejected(e.to_string())))?;
        let meta = self.meta_key.render(topic);
        let field = settings_field(group);
        self.count("hset", 1);
        // PERSIST: after a topic delete the meta hash is an expiring tombstone, and the
        // settings must not expire with it.
        for reply in self
            .client
            .call_many(&[
                on(topic, &[b"HSET", meta.as_bytes(), field.as_bytes(), &json]),
                on(topic, &[b"PERSIST", meta.as_bytes()]),
            ])
            .await
        {
            reply.map_err(|e| GroupError::Store(store_error(e)))?;
        }
        self.group_settings.borrow_mut().insert(
            (topic.to_owned(), group.to_owned()),
            (settings.clone(), Instant::now()),
        );
        Ok(())
    }

    pub async fn group_delete(&self, topic: &str, group: &str) -> Result<bool, GroupError> {
        let key = self.stream_key.render(topic);
        let meta = self.meta_key.render(topic);
        let field = settings_field(group);
        self.count("xgroup", 1);
        let replies = self
            .client
            .call_many(&[
                on(
                    topic,
                    &[b"XGROUP", b"DESTROY", key.as_bytes(), group.as_bytes()],
                ),
                on(topic, &[b"HDEL", meta.as_bytes(), field.as_bytes()]),
            ])
            .await;
        self.group_settings
            .borrow_mut()
            .remove(&(topic.to_owned(), group.to_owned()));
        match replies.into_iter().next() {
            Some(Ok(reply)) => Ok(reply.as_int() == Some(1)),
            Some(Err(e)) if is_no_group(&e) => Ok(false),
            Some(Err(e)) => Err(GroupError::Store(store_error(e))),
            None => Ok(false),
        }
    }

    pub async fn group_reset(
        &self,
        topic: &str,
        group: &str,
        to: GroupStart,
    ) -> Result<(), GroupError> {
        let key = self.stream_key.render(topic);
        let id = id_arg(to);
        self.count("xgroup", 1);
        self.client
            .call_routed(
                topic.as_bytes(),
                &[
                    b"XGROUP",
                    b"SETID",
                    key.as_bytes(),
                    group.as_bytes(),
                    id.as_bytes(),
                ],
            )
            .await
            .map_err(group_error)?;
        Ok(())
    }

    /// The group's settings (cached for a few seconds); defaults for a group created
    /// without them.
    pub async fn group_settings(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<GroupSettings, GroupError> {
        let cache_key = (topic.to_owned(), group.to_owned());
        if let Some((settings, at)) = self.group_settings.borrow().get(&cache_key) {
            if at.elapsed() < SETTINGS_TTL {
                return Ok(settings.clone());
            }
        }
        let meta = self.meta_key.render(topic);
        let field = settings_field(group);
        self.count("hget", 1);
        let reply = self
            .client
            .call_routed(
                topic.as_bytes(),
                &[b"HGET", meta.as_bytes(), field.as_bytes()],
            )
            .await
            .map_err(|e| GroupError::Store(store_error(e)))?;
        let settings = reply
            .as_bytes()
            .and_then(|json| serde_json::from_slice(json).ok())
            .unwrap_or_else(|| default_settings(topic));
        let mut cache = self.group_settings.borrow_mut();
        if cache.len() >= 10_000 {
            cache.clear();
        }
        cache.insert(cache_key, (settings.clone(), Instant::now()));
        Ok(settings)
    }

    /// Every group of `topic` (none when the stream does not exist).
    pub async fn group_list(&self, topic: &str, now_ms: u64) -> Result<Vec<GroupInfo>, GroupError> {
        self.groups_named(topic, None, now_ms).await
    }

    /// The groups of `topic` (only `only` when given), with their details. A group deleted
    /// between the listing and its details is left out, never an error for the others.
    async fn groups_named(
        &self,
        topic: &str,
        only: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<GroupInfo>, GroupError> {
        let key = self.stream_key.render(topic);
        self.count("xinfo", 1);
        let reply = match self
            .client
            .call_routed(topic.as_bytes(), &[b"XINFO", b"GROUPS", key.as_bytes()])
            .await
        {
            Ok(reply) => reply,
            Err(e) if is_no_group(&e) => return Ok(Vec::new()),
            Err(e) => return Err(GroupError::Store(store_error(e))),
        };
        let mut out = Vec::new();
        for group in reply.as_array().unwrap_or_default() {
            let Some(map) = group.as_array() else {
                continue;
            };
            let Some(name) = field(map, "name").and_then(Reply::as_str) else {
                continue;
            };
            if only.is_some_and(|only| only != name) {
                continue;
            }
            match self.group_details(topic, name, map, now_ms).await {
                Ok(info) => out.push(info),
                Err(GroupError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub async fn group_info(
        &self,
        topic: &str,
        group: &str,
        now_ms: u64,
    ) -> Result<GroupInfo, GroupError> {
        self.groups_named(topic, Some(group), now_ms)
            .await?
            .into_iter()
            .next()
            .ok_or(GroupError::NotFound)
    }

    /// One group's listing from its `XINFO GROUPS` entry plus its consumers, settings and the
    /// age of its first undelivered entry.
    async fn group_details(
        &self,
        topic: &str,
        name: &str,
        map: &[Reply],
        now_ms: u64,
    ) -> Result<GroupInfo, GroupError> {
        let key = self.stream_key.render(topic);
        let last_delivered: Option<MessageId> = field(map, "last-delivered-id")
            .and_then(Reply::as_str)
            .and_then(|s| s.parse().ok())
            .filter(|id| *id != MessageId::MIN);
        let lag = int_field(map, "lag");
        let after = format!("({}", last_delivered.unwrap_or(MessageId::MIN));
        self.count("xinfo", 1);
        self.count("xrange", 1);
        let mut replies = self
            .client
            .call_many(&[
                on(
                    topic,
                    &[b"XINFO", b"CONSUMERS", key.as_bytes(), name.as_bytes()],
                ),
                on(
                    topic,
                    &[
                        b"XRANGE",
                        key.as_bytes(),
                        after.as_bytes(),
                        b"+",
                        b"COUNT",
                        b"1",
                    ],
                ),
            ])
            .await
            .into_iter();
        let consumers = match replies.next() {
            Some(Ok(reply)) => reply
                .as_array()
                .unwrap_or_default()
                .iter()
                .filter_map(|c| {
                    let map = c.as_array()?;
                    Some(ConsumerInfo {
                        name: field(map, "name")?.as_str()?.to_owned(),
                        pending: int_field(map, "pending").unwrap_or(0),
                        idle_ms: int_field(map, "idle").unwrap_or(0),
                    })
                })
                .collect(),
            Some(Err(e)) => return Err(group_error(e)),
            None => Vec::new(),
        };
        let oldest_ms = match replies.next() {
            Some(Ok(reply)) => reply
                .as_array()
                .and_then(|entries| entries.first())
                .and_then(parse_entry)
                .map(|(_, m)| m.timestamp_ms),
            _ => None,
        };
        Ok(GroupInfo {
            name: name.to_owned(),
            settings: self.group_settings(topic, name).await?,
            last_delivered,
            pending: int_field(map, "pending").unwrap_or(0),
            lag,
            lag_ms: Some(oldest_ms.map_or(0, |ts| now_ms.saturating_sub(ts))),
            consumers,
        })
    }

    /// How many messages `consumer` holds in the group and are not due yet: those idle for
    /// the group's `ack_timeout` or more (or released) may go to anyone, so their places are
    /// free (`XPENDING … IDLE` counts them).
    pub async fn group_held_by(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
    ) -> Result<usize, GroupError> {
        let key = self.stream_key.render(topic);
        self.count("xpending", 1);
        let reply = self
            .client
            .call_routed(
                topic.as_bytes(),
                &[b"XPENDING", key.as_bytes(), group.as_bytes()],
            )
            .await
            .map_err(group_error)?;
        let held = reply
            .as_array()
            .and_then(|summary| summary.get(3))
            .and_then(Reply::as_array)
            .and_then(|per_consumer| {
                per_consumer.iter().find_map(|pair| {
                    let pair = pair.as_array()?;
                    (pair.first()?.as_str()? == consumer)
                        .then(|| pair.get(1)?.as_str()?.parse::<usize>().ok())?
                })
            })
            .unwrap_or(0);
        if held == 0 {
            return Ok(0);
        }
        let timeout = self.group_settings(topic, group).await?.ack_timeout_ms;
        let due = self
            .pending_due(topic, group, timeout, held, Some(consumer))
            .await?
            .as_array()
            .map_or(0, <[Reply]>::len);
        Ok(held.saturating_sub(due))
    }

    /// `XPENDING <stream> <group> IDLE <idle_ms> - + <count> [<consumer>]`: up to `count`
    /// pending entries idle for at least `idle_ms` (due), of `consumer` only when given.
    async fn pending_due(
        &self,
        topic: &str,
        group: &str,
        idle_ms: u64,
        count: usize,
        consumer: Option<&str>,
    ) -> Result<Reply, GroupError> {
        let key = self.stream_key.render(topic);
        let (idle, count) = (idle_ms.to_string(), count.to_string());
        let mut args: Vec<&[u8]> = vec![
            b"XPENDING",
            key.as_bytes(),
            group.as_bytes(),
            b"IDLE",
            idle.as_bytes(),
            b"-",
            b"+",
            count.as_bytes(),
        ];
        args.extend(consumer.map(str::as_bytes));
        self.count("xpending", 1);
        self.client
            .call_routed(topic.as_bytes(), &args)
            .await
            .map_err(group_error)
    }

    /// Hands the consumer up to `max` messages (see `store/group.rs`): due entries first
    /// (with `claim`), then new ones.
    pub async fn group_take(
        &self,
        topic: &str,
        group: &str,
        request: &TakeRequest,
        now_ms: u64,
    ) -> Result<Taken, GroupError> {
        let (consumer, max) = (request.consumer.as_str(), request.max);
        let settings = self.group_settings(topic, group).await?;
        let key = self.stream_key.render(topic);
        let mut taken = Taken::default();
        if request.claim {
            self.claim_due(topic, group, request, &settings, now_ms, &mut taken)
                .await?;
        }
        // New entries. A read that finds only expired entries (settled at once, never handed
        // out) reads on: one entry per take would let a consumer of max_in_flight 1 cross a
        // run of expired messages at one per poll or claim period (a lone worker behind
        // 800 expired messages stalled for minutes; loadgen check --groups, seed 311).
        for _ in 0..MAX_EXPIRED_ROUNDS {
            let room = max.saturating_sub(taken.messages.len());
            if room == 0 {
                break;
            }
            let count = room.to_string();
            self.count("xreadgroup", 1);
            let reply = self
                .client
                .call_routed(
                    topic.as_bytes(),
                    &[
                        b"XREADGROUP",
                        b"GROUP",
                        group.as_bytes(),
                        consumer.as_bytes(),
                        b"COUNT",
                        count.as_bytes(),
                        b"STREAMS",
                        key.as_bytes(),
                        b">",
                    ],
                )
                .await
                .map_err(group_error)?;
            let entries = reply
                .as_array()
                .and_then(|streams| streams.first())
                .and_then(Reply::as_array)
                .and_then(|pair| pair.get(1))
                .and_then(Reply::as_array)
                .unwrap_or_default();
            let read = entries.len();
            let mut expired = Vec::new();
            for entry in entries {
                let Some((id, message)) = parse_entry(entry) else {
                    continue;
                };
                if self.is_due(&message, now_ms) {
                    // Never handed out (reads skip it too): settled in the group at once.
                    expired.push(id);
                    continue;
                }
                taken.messages.push(GroupMessage {
                    message,
                    delivery_count: 1,
                    // `now_ms` was read before XREADGROUP ran: Valkey's idle clock for the
                    // entry starts later, so this is never after the real due time.
                    ack_deadline_ms: now_ms.saturating_add(settings.ack_timeout_ms),
                });
            }
            if !expired.is_empty() {
                taken.dropped += expired.len();
                self.group_ack(topic, group, &expired, false).await?;
            }
            if read < room || expired.is_empty() {
                break;
            }
        }
        Ok(taken)
    }

    /// The claim half of a take: due entries to `consumer`, or past `max_deliveries` to the
    /// dead-letter holder.
    async fn claim_due(
        &self,
        topic: &str,
        group: &str,
        request: &TakeRequest,
        settings: &GroupSettings,
        now_ms: u64,
        taken: &mut Taken,
    ) -> Result<(), GroupError> {
        let (consumer, max) = (request.consumer.as_str(), request.max);
        let key = self.stream_key.render(topic);
        let idle = settings.ack_timeout_ms.to_string();
        let reply = self
            .pending_due(
                topic,
                group,
                settings.ack_timeout_ms,
                max + MAX_DEAD_PER_TAKE,
                None,
            )
            .await?;
        // XPENDING found these idle for `ack_timeout`, so they were last delivered at least
        // that long before now; XCLAIM delivers them again after now. A deadline counted
        // from here is never after the real one, and never before the previous delivery's.
        let due_seen_ms = crate::clock::now_ms();
        let mut redeliver: Vec<(String, u64)> = Vec::new();
        let mut dead: Vec<(String, u64)> = Vec::new();
        for entry in reply.as_array().unwrap_or_default() {
            let Some(parts) = entry.as_array() else {
                continue;
            };
            let (Some(id), Some(deliveries)) = (
                parts.first().and_then(Reply::as_str),
                parts.get(3).and_then(Reply::as_int),
            ) else {
                continue;
            };
            let deliveries = u64::try_from(deliveries).unwrap_or(0);
            if deliveries >= u64::from(settings.max_deliveries) {
                if dead.len() < MAX_DEAD_PER_TAKE {
                    dead.push((id.to_owned(), deliveries));
                }
            } else if redeliver.len() < max
                && !id
                    .parse::<MessageId>()
                    .is_ok_and(|id| request.held.contains(&id))
            {
                redeliver.push((id.to_owned(), deliveries));
            }
        }
        for (holder, list, is_dead) in [
            (consumer, &redeliver, false),
            (DEAD_LETTER_CONSUMER, &dead, true),
        ] {
            if list.is_empty() {
                continue;
            }
            let mut args: Vec<&[u8]> = vec![
                b"XCLAIM",
                key.as_bytes(),
                group.as_bytes(),
                holder.as_bytes(),
                idle.as_bytes(),
            ];
            args.extend(list.iter().map(|(id, _)| id.as_bytes()));
            self.count("xclaim", 1);
            let reply = self
                .client
                .call_routed(topic.as_bytes(), &args)
                .await
                .map_err(group_error)?;
            let mut gone = list.len();
            for entry in reply.as_array().unwrap_or_default() {
                let Some((id, message)) = parse_entry(entry) else {
                    continue;
                };
                gone -= 1;
                let before = list
                    .iter()
                    .find(|(i, _)| i.parse::<MessageId>().ok() == Some(id))
                    .map_or(0, |(_, n)| *n);
                if !is_dead && self.is_due(&message, now_ms) {
                    taken.dropped += 1;
                    self.group_ack(topic, group, &[id], false).await?;
                    continue;
                }
                if is_dead {
                    // Valkey counted every claim to the dead-letter holder as a delivery: an
                    // entry whose dead-letter publish failed (and is claimed again after the
                    // timeout) would say max_deliveries + 1. Consumers had it max_deliveries
                    // times.
                    taken.dead.push(GroupMessage {
                        message,
                        delivery_count: before.min(u64::from(settings.max_deliveries)),
                        ack_deadline_ms: due_seen_ms.saturating_add(settings.ack_timeout_ms),
                    });
                } else {
                    taken.redelivered += 1;
                    taken.messages.push(GroupMessage {
                        message,
                        delivery_count: before + 1,
                        ack_deadline_ms: due_seen_ms.saturating_add(settings.ack_timeout_ms),
                    });
                }
            }
            // Claimed by another relay first, or deleted from the stream (Valkey drops
            // those from the pending list as it claims).
            taken.dropped += gone.min(list.len());
        }
        Ok(())
    }

    /// Acknowledges `ids` in the group: with `dead`, those the dead-letter holder has (plain
    /// `XACK`s, by the relay that dead-lettered them); else those anyone else has, through
    /// `pulsar_group_ack`, which leaves entries held for dead-lettering alone.
    pub async fn group_ack(
        &self,
        topic: &str,
        group: &str,
        ids: &[MessageId],
        dead: bool,
    ) -> Result<Settled, GroupError> {
        if ids.is_empty() {
            return Ok(Settled::default());
        }
        let key = self.stream_key.render(topic);
        let texts: Vec<String> = ids.iter().map(MessageId::to_string).collect();
        self.count("xack", ids.len());
        let replies: Vec<Result<Reply, ValkeyError>> = if dead {
            let commands: Vec<_> = texts
                .iter()
                .map(|id| {
                    on(
                        topic,
                        &[b"XACK", key.as_bytes(), group.as_bytes(), id.as_bytes()],
                    )
                })
                .collect();
            self.client.call_many(&commands).await
        } else {
            let mut args: Vec<&[u8]> = vec![
                b"FCALL",
                b"pulsar_group_ack",
                b"1",
                key.as_bytes(),
                group.as_bytes(),
                DEAD_LETTER_CONSUMER.as_bytes(),
            ];
            args.extend(texts.iter().map(|t| t.as_bytes()));
            match self.client.call_routed(topic.as_bytes(), &args).await {
                Ok(Reply::Array(items)) => items.into_iter().map(Ok).collect(),
                Ok(_) => Vec::new(),
                Err(e) => return Err(group_error(e)),
            }
        };
        let mut settled = Settled::default();
        let mut replies = replies.into_iter();
        for id in ids {
            match replies.next() {
                Some(Ok(reply)) if reply.as_int() == Some(1) => settled.done.push(*id),
                Some(Ok(_)) | None => settled.unknown.push(*id),
                Some(Err(e)) => return Err(group_error(e)),
            }
        }
        // XACK on a group that does not exist answers 0: tell a missing group apart.
        if settled.done.is_empty() && dead {
            self.group_settings_exist(topic, group).await?;
        }
        Ok(settled)
    }

    /// `Err(NotFound)` unless the group exists.
    async fn group_settings_exist(&self, topic: &str, group: &str) -> Result<(), GroupError> {
        let key = self.stream_key.render(topic);
        self.count("xpending", 1);
        self.client
            .call_routed(
                topic.as_bytes(),
                &[b"XPENDING", key.as_bytes(), group.as_bytes()],
            )
            .await
            .map_err(group_error)?;
        Ok(())
    }

    /// Releases `ids` (a `nack`): each pending one (with `consumer`, held by it) moves to the
    /// release holder, due at once.
    pub async fn group_release(
        &self,
        topic: &str,
        group: &str,
        ids: &[MessageId],
        consumer: Option<&str>,
        now_ms: u64,
    ) -> Result<Settled, GroupError> {
        if ids.is_empty() {
            return Ok(Settled::default());
        }
        let key = self.stream_key.render(topic);
        let texts: Vec<String> = ids.iter().map(MessageId::to_string).collect();
        let lookups: Vec<_> = texts
            .iter()
            .map(|id| {
                on(
                    topic,
                    &[
                        b"XPENDING",
                        key.as_bytes(),
                        group.as_bytes(),
                        id.as_bytes(),
                        id.as_bytes(),
                        b"1",
                    ],
                )
            })
            .collect();
        self.count("xpending", ids.len());
        let replies = self.client.call_many(&lookups).await;
        // Delivered one ack timeout ago by Valkey's own clock: due at once. (An absolute
        // "long ago" from this relay's clock would be clamped to Valkey's now when the
        // clocks disagree, and the release would wait a whole timeout.)
        let _ = now_ms;
        let idle = self
            .group_settings(topic, group)
            .await?
            .ack_timeout_ms
            .to_string();
        let mut settled = Settled::default();
        let mut claims = Vec::new();
        let mut claimed_ids = Vec::new();
        for ((id, text), reply) in ids.iter().zip(&texts).zip(replies) {
            let reply = reply.map_err(group_error)?;
            let holder = reply
                .as_array()
                .and_then(|entries| entries.first())
                .and_then(Reply::as_array)
                .and_then(|parts| parts.get(1))
                .and_then(Reply::as_str)
                .map(str::to_owned);
            match holder {
                Some(holder)
                    if holder != DEAD_LETTER_CONSUMER
                        && holder != RELEASED_CONSUMER
                        && consumer.is_none_or(|c| c == holder) =>
                {
                    claims.push(on(
                        topic,
                        &[
                            b"XCLAIM",
                            key.as_bytes(),
                            group.as_bytes(),
                            RELEASED_CONSUMER.as_bytes(),
                            b"0",
                            text.as_bytes(),
                            b"IDLE",
                            idle.as_bytes(),
                            b"JUSTID",
                        ],
                    ));
                    claimed_ids.push(*id);
                }
                _ => settled.unknown.push(*id),
            }
        }
        if claims.is_empty() {
            if settled.unknown.len() == ids.len() {
                self.group_settings_exist(topic, group).await?;
            }
            return Ok(settled);
        }
        self.count("xclaim", claims.len());
        for (id, reply) in claimed_ids
            .into_iter()
            .zip(self.client.call_many(&claims).await)
        {
            match reply.map_err(group_error)?.as_array() {
                Some(claimed) if !claimed.is_empty() => settled.done.push(id),
                _ => settled.unknown.push(id),
            }
        }
        Ok(settled)
    }
}
