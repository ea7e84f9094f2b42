//! The cross-relay feed on Valkey: the notification that follows every publish batch of a
//! topic, and the stream reads that keep a hot tier a cache of the stream (design:
//! `docs/scaling.md`, "Several relays on one Valkey").
//!
//! - **Notifications.** Every `pulsar_publish` call that stored something ends with
//!   `SPUBLISH <stream key>:feed "<instance id> <id of the batch's last entry>"` inside the
//!   Function (`publish.lua`), atomically with the XADDs: no publisher can die between the
//!   two. A trim or delete sends `"<instance id> removed"` from here
//!   ([`ValkeyTier::notify_removed`]), routed by the topic, not awaited. [`parse_notification`]
//!   reads both.
//! - **Reads for the sync** (`crate::store::stream_sync` decides when): where a topic's stream
//!   is now ([`ValkeyTier::stream_position`], a seed), whether entries someone else wrote
//!   sit between ids this relay knows ([`ValkeyTier::entries_between`], the contiguity probe
//!   of local publishes), bounded pages from an id on ([`ValkeyTier::read_from`], repairs),
//!   and which topics have entries past a position ([`ValkeyTier::newer_than`], the safety
//!   net).
//!
//! Does not own the subscription (the shard's [`crate::valkey::subscriber`]) nor what a
//! notification or a read leads to (`stream_sync`).

use bytes::Bytes;

use super::entry::parse_entries;
use super::read::round_count;
use super::{is_no_such_key, missing_reply, on, store_error, ValkeyTier};
use crate::store::message::{Message, MessageId};
use crate::store::StoreError;
use crate::valkey::{Command, Reply};

/// The feed channel of a topic is its rendered stream key plus this.
pub const CHANNEL_SUFFIX: &str = ":feed";

/// The word a removal notification carries instead of an id.
const REMOVED: &str = "removed";

/// What another relay (or this one) said on a topic's feed channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification<'a> {
    /// A batch of entries was appended; `last` is the batch's last id.
    Appended { instance: &'a str, last: MessageId },
    /// Entries were trimmed, or the topic deleted.
    Removed { instance: &'a str },
}

impl Notification<'_> {
    pub fn instance(&self) -> &str {
        match self {
            Notification::Appended { instance, .. } | Notification::Removed { instance } => {
                instance
            }
        }
    }
}

/// Parses `"<instance id> <id>"` or `"<instance id> removed"`; `None` for anything else.
pub fn parse_notification(payload: &[u8]) -> Option<Notification<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let (instance, rest) = text.split_once(' ')?;
    if instance.is_empty() {
        return None;
    }
    if rest == REMOVED {
        return Some(Notification::Removed { instance });
    }
    let last = rest.parse::<MessageId>().ok()?;
    Some(Notification::Appended { instance, last })
}

/// The most entries one repair page asks for.
const REPAIR_PAGE_ENTRIES: usize = 1024;

/// The most safety-net checks sent in one pipeline.
const CHECKS_PER_PIPELINE: usize = 512;

impl ValkeyTier {
    /// This relay's instance id, as its notifications name it.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The feed channel of `topic`: `<rendered stream key>:feed`.
    pub fn feed_channel(&self, topic: &str) -> Bytes {
        let mut channel = Vec::with_capacity(self.stream_key.rendered_len(topic) + 5);
        self.stream_key.render_into(topic, &mut channel);
        channel.extend_from_slice(CHANNEL_SUFFIX.as_bytes());
        Bytes::from(channel)
    }

    /// The topic a feed channel belongs to, if it is one of ours.
    pub fn topic_of_channel<'c>(&self, channel: &'c [u8]) -> Option<&'c str> {
        let channel = std::str::from_utf8(channel).ok()?;
        let key = channel.strip_suffix(CHANNEL_SUFFIX)?;
        self.stream_key.topic_of(key)
    }

    /// Tells the other relays that entries of `topic` were removed (trim, delete): what their
    /// memory holds of it may be gone from the stream.
    pub fn notify_removed(&self, topic: &str) {
        let payload = format!("{} {REMOVED}", self.instance_id);
        self.publish_notification(topic, payload.as_bytes());
    }

    fn publish_notification(&self, topic: &str, payload: &[u8]) {
        let channel = self.feed_channel(topic);
        self.count("spublish", 1);
        // Dropping the reply future leaves the command queued: it is still sent.
        if let Err(e) = self
            .client
            .try_submit(&[on(topic, &[b"SPUBLISH", &channel, payload])])
        {
            tracing::debug!(topic, error = %e, "feed notification not sent");
        }
    }

    /// Where `topic`'s stream is now: its newest entry's id, else (emptied) its last
    /// generated id, else (no stream) `0-0`. What a topic followed from now starts after.
    /// Also says whether the id is an entry's (`false`: an emptied or missing stream).
    pub async fn stream_position(&self, topic: &str) -> Result<(MessageId, bool), StoreError> {
        let key = self.stream_key.render(topic);
        self.count("xrevrange", 1);
        let reply = self
            .client
            .call_routed(
                topic.as_bytes(),
                &[b"XREVRANGE", key.as_bytes(), b"+", b"-", b"COUNT", b"1"],
            )
            .await
            .map_err(store_error)?;
        if let Some((id, _)) = parse_entries(&reply).first() {
            return Ok((*id, true));
        }
        self.count("xinfo", 1);
        match self
            .client
            .call_routed(topic.as_bytes(), &[b"XINFO", b"STREAM", key.as_bytes()])
            .await
        {
            Ok(Reply::Array(fields)) => Ok((
                fields
                    .chunks(2)
                    .find(|pair| {
                        pair.first().and_then(Reply::as_bytes) == Some(b"last-generated-id")
                    })
                    .and_then(|pair| pair.get(1))
                    .and_then(Reply::as_str)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(MessageId::MIN),
                false,
            )),
            Ok(_) => Ok((MessageId::MIN, false)),
            Err(e) if is_no_such_key(&e) => Ok((MessageId::MIN, false)),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Whether the stream holds an entry strictly between the two ids of any pair: one
    /// pipeline of `XRANGE key (a (b COUNT 1`, empty replies when nobody else wrote there.
    pub async fn entries_between(
        &self,
        topic: &str,
        pairs: &[(MessageId, MessageId)],
    ) -> Result<bool, StoreError> {
        if pairs.is_empty() {
            return Ok(false);
        }
        let key = self.stream_key.render(topic);
        let commands: Vec<Command> = pairs
            .iter()
            .map(|(after, before)| {
                let start = format!("({after}");
                let end = format!("({before}");
                on(
                    topic,
                    &[
                        b"XRANGE",
                        key.as_bytes(),
                        start.as_bytes(),
                        end.as_bytes(),
                        b"COUNT",
                        b"1",
                    ],
                )
            })
            .collect();
        self.count("xrange", commands.len());
        let mut found = false;
        for reply in self.client.call_many(&commands).await {
            match reply.map_err(store_error)? {
                Reply::Array(entries) if !entries.is_empty() => found = true,
                _ => {}
            }
        }
        Ok(found)
    }

    /// Up to one page of `topic`'s entries from `from` on (`inclusive`: `from` itself too, so
    /// the caller can tell whether it is still there), about `ROUND_BYTES` of them at the
    /// entry sizes `size_hint` gives; and whether more may follow.
    pub async fn read_from(
        &self,
        topic: &str,
        from: MessageId,
        inclusive: bool,
        size_hint: Option<usize>,
    ) -> Result<(Vec<(MessageId, Message)>, bool), StoreError> {
        let key = self.stream_key.render(topic);
        let count =
            round_count(REPAIR_PAGE_ENTRIES, usize::MAX, size_hint).clamp(2, REPAIR_PAGE_ENTRIES);
        let count_text = count.to_string();
        let start = if inclusive {
            from.to_string()
        } else {
            format!("({from}")
        };
        self.count("xrange", 1);
        let reply = self
            .client
            .call_many(&[on(
                topic,
                &[
                    b"XRANGE",
                    key.as_bytes(),
                    start.as_bytes(),
                    b"+",
                    b"COUNT",
                    count_text.as_bytes(),
                ],
            )])
            .await
            .pop()
            .unwrap_or_else(missing_reply)
            .map_err(store_error)?;
        let entries = parse_entries(&reply);
        let more = entries.len() >= count;
        Ok((entries, more))
    }

    /// For each `(topic, position)`: whether the topic's stream holds an entry after the
    /// position (`XRANGE key (position + COUNT 1`, pipelined). The safety net for
    /// notifications that never came.
    pub async fn newer_than(
        &self,
        positions: &[(String, MessageId)],
    ) -> Vec<Result<bool, StoreError>> {
        let mut out = Vec::with_capacity(positions.len());
        for chunk in positions.chunks(CHECKS_PER_PIPELINE) {
            let commands: Vec<Command> = chunk
                .iter()
                .map(|(topic, position)| {
                    let key = self.stream_key.render(topic);
                    let start = format!("({position}");
                    on(
                        topic,
                        &[
                            b"XRANGE",
                            key.as_bytes(),
                            start.as_bytes(),
                            b"+",
                            b"COUNT",
                            b"1",
                        ],
                    )
                })
                .collect();
            self.count("xrange", commands.len());
            for reply in self.client.call_many(&commands).await {
                out.push(match reply {
                    Ok(Reply::Array(entries)) => Ok(!entries.is_empty()),
                    Ok(_) => Ok(false),
                    Err(e) => Err(store_error(e)),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip_and_junk_is_refused() {
        assert_eq!(
            parse_notification(b"0123456789abcdef 1700000000000-3"),
            Some(Notification::Appended {
                instance: "0123456789abcdef",
                last: MessageId::new(1_700_000_000_000, 3),
            })
        );
        assert_eq!(
            parse_notification(b"0123456789abcdef removed"),
            Some(Notification::Removed {
                instance: "0123456789abcdef"
            })
        );
        for junk in [
            &b""[..],
            b"abc",
            b" 1-0",
            b"abc 1-x",
            b"abc 1-0 extra",
            b"\xff 1-0",
        ] {
            assert_eq!(parse_notification(junk), None, "{junk:?}");
        }
    }
}
