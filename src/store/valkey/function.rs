//! The `pulsar` Valkey Function library (`publish.lua`) and the one call both publish paths
//! make with it: `FCALL pulsar_publish`, a batch of entries of one topic, each appended
//! atomically with its idempotency check, then the topic's feed notified.
//!
//! Owns: the library's version, encoding a call (keys and arguments in the order
//! `publish.lua` documents) and reading its reply back into per-entry outcomes. Does not own:
//! when entries are written (`publish.rs` for `ack: persisted`, `behind.rs` for the
//! write-behind of `ack: buffered`), nor loading the library (the client does it on every new
//! connection: [`crate::valkey::library`]).
//!
//! Why one function for both paths: the idempotency check and the XADD must be one atomic
//! step in Valkey (two relays, or two attempts in flight, must not both append), and a
//! script is the only way to make a read-then-write atomic without `WATCH` round trips. With
//! every append going through it there is one way to write an entry, one place that knows
//! its fields, and one place that notifies the feed.

use super::{command, ValkeyTier};
use crate::store::message::{write_rfc3339_millis, MessageId};
use crate::store::{PublishAck, PublishItem};
use crate::valkey::{Command, FunctionLibrary, ProtocolError, Reply, ValkeyError};

/// Bumped with every change to `publish.lua` (see its header for the compatibility rule).
pub const LIBRARY_VERSION: u32 = 1;

/// The library every relay connection makes sure is loaded.
pub const LIBRARY: FunctionLibrary = FunctionLibrary {
    name: "pulsar",
    version: LIBRARY_VERSION,
    source: include_str!("publish.lua"),
};

/// One entry of a `pulsar_publish` call.
pub(super) struct Entry<'a> {
    pub(super) item: &'a PublishItem,
    /// `None`: Valkey picks the id (`*`, `ack: persisted`); `Some`: the write-behind's id.
    pub(super) id: Option<MessageId>,
    pub(super) timestamp_ms: u64,
}

/// How one entry of a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Appended with this id.
    Stored(MessageId),
    /// Its idempotency key was used before: nothing appended; the first publish's answer.
    Duplicate(PublishAck),
    /// Not appended, or not known to be (the whole call failed).
    Failed(ValkeyError),
}

impl ValkeyTier {
    /// `FCALL pulsar_publish <numkeys> <stream> <meta> <idempotency keys...> <maxlen>
    /// <window ms> <created|''> <instance id> [<id|*> <key index> <payload> <timestamp>
    /// <metadata|''> <ttl|''>]...` for `entries` of `topic` (at least one), routed by the
    /// topic. `created_ms`: the topic is new to this tier, so the call sets its meta hash's
    /// creation time.
    pub(super) fn encode_publish(
        &self,
        topic: &str,
        entries: &[Entry<'_>],
        created_ms: Option<u64>,
    ) -> Command {
        // Every small text of the call (keys, ids, timestamps, indexes) goes into one buffer,
        // remembered as ranges, then sliced into the argument list: a handful of allocations
        // per call whatever the number of entries.
        let mut text: Vec<u8> = Vec::with_capacity(128 + 64 * entries.len());
        let stream = span(&mut text, |t| self.stream_key.render_into(topic, t));
        let meta = span(&mut text, |t| self.meta_key.render_into(topic, t));
        let mut keys = Vec::new();
        for entry in entries {
            if let Some(key) = &entry.item.idempotency_key {
                keys.push(span(&mut text, |t| {
                    self.idempotency_key.render_into(topic, t);
                    t.extend_from_slice(key.as_bytes());
                }));
            }
        }
        let mut digits = itoa::Buffer::new();
        let numkeys = span(&mut text, |t| {
            t.extend_from_slice(digits.format(2 + keys.len()).as_bytes())
        });
        let created = span(&mut text, |t| {
            if let Some(ms) = created_ms {
                write_rfc3339_millis(t, ms);
            }
        });
        // Per entry: id, key index, timestamp, ttl. The timestamp is shared with the entry
        // before when equal (every entry of a persisted publish has the same).
        let mut per_entry = Vec::with_capacity(entries.len());
        let mut next_key = 3; // KEYS[1] stream, KEYS[2] meta
        let mut last_timestamp: Option<(u64, (usize, usize))> = None;
        for entry in entries {
            let id = span(&mut text, |t| match entry.id {
                Some(id) => id.write_to(t),
                None => t.push(b'*'),
            });
            let key_index = span(&mut text, |t| {
                if entry.item.idempotency_key.is_some() {
                    t.extend_from_slice(digits.format(next_key).as_bytes());
                } else {
                    t.push(b'0');
                }
            });
            if entry.item.idempotency_key.is_some() {
                next_key += 1;
            }
            let timestamp = match last_timestamp {
                Some((ms, range)) if ms == entry.timestamp_ms => range,
                _ => {
                    let range = span(&mut text, |t| write_rfc3339_millis(t, entry.timestamp_ms));
                    last_timestamp = Some((entry.timestamp_ms, range));
                    range
                }
            };
            let ttl = span(&mut text, |t| {
                if let Some(ttl_ms) = entry.item.ttl_ms {
                    super::entry::write_ttl_seconds(t, ttl_ms);
                }
            });
            per_entry.push((id, key_index, timestamp, ttl));
        }
        let at = |(start, end): (usize, usize)| &text[start..end];
        let mut args: Vec<&[u8]> = Vec::with_capacity(9 + keys.len() + 6 * entries.len());
        args.extend_from_slice(&[b"FCALL".as_slice(), b"pulsar_publish", at(numkeys)]);
        args.push(at(stream));
        args.push(at(meta));
        args.extend(keys.iter().map(|&k| at(k)));
        args.extend_from_slice(&[
            self.max_len.as_bytes(),
            self.idempotency_window.as_bytes(),
            at(created),
            self.instance_id.as_bytes(),
        ]);
        for (entry, &(id, key_index, timestamp, ttl)) in entries.iter().zip(&per_entry) {
            args.extend_from_slice(&[
                at(id),
                at(key_index),
                &entry.item.payload,
                at(timestamp),
                entry.item.metadata.as_deref().unwrap_or(b""),
                at(ttl),
            ]);
        }
        command(&args).routed(topic.as_bytes())
    }
}

/// The outcomes of the `n` entries of one `pulsar_publish` call, in entry order.
pub(super) fn parse_publish_reply(reply: Result<Reply, ValkeyError>, n: usize) -> Vec<Outcome> {
    let items = match reply {
        Ok(Reply::Array(items)) if items.len() == n => items,
        Ok(other) => {
            let error = malformed(format!("unexpected pulsar_publish reply: {other:?}"));
            return vec![Outcome::Failed(error); n];
        }
        Err(error) => return vec![Outcome::Failed(error); n],
    };
    items.into_iter().map(parse_entry_reply).collect()
}

fn parse_entry_reply(reply: Reply) -> Outcome {
    match reply {
        Reply::Bulk(id) => match std::str::from_utf8(&id).ok().and_then(|s| s.parse().ok()) {
            Some(id) => Outcome::Stored(id),
            None => Outcome::Failed(malformed(format!("unexpected XADD id {id:?}"))),
        },
        Reply::Array(seen) => match seen.first().and_then(Reply::as_str).and_then(parse_seen) {
            Some(ack) => Outcome::Duplicate(ack),
            None => Outcome::Failed(malformed(format!("unreadable idempotency record {seen:?}"))),
        },
        Reply::Error(message) => Outcome::Failed(ValkeyError::Server(message)),
        other => Outcome::Failed(malformed(format!("unexpected entry reply {other:?}"))),
    }
}

/// An idempotency key's value, `<id> <RFC 3339 timestamp>`, as the first publish's answer.
fn parse_seen(value: &str) -> Option<PublishAck> {
    let (id, timestamp) = value.split_once(' ')?;
    Some(PublishAck {
        id: id.parse().ok()?,
        timestamp_ms: super::entry::parse_timestamp_ms(timestamp)?,
    })
}

fn malformed(message: String) -> ValkeyError {
    ValkeyError::Protocol(ProtocolError::Malformed(message))
}

/// Appends what `write` writes to `text`; returns where it went.
fn span(text: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) -> (usize, usize) {
    let start = text.len();
    write(text);
    (start, text.len())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn the_lua_source_declares_this_version() {
        assert!(LIBRARY.source.starts_with("#!lua name=pulsar\n"));
        assert!(
            LIBRARY
                .source
                .contains(&format!("\nlocal VERSION = {LIBRARY_VERSION}\n")),
            "publish.lua's VERSION differs from LIBRARY_VERSION"
        );
    }

    #[test]
    fn replies_become_outcomes_in_entry_order() {
        let reply = Reply::Array(vec![
            bulk("5-1"),
            Reply::Array(vec![bulk("4-0 2023-11-14T22:13:20.000Z")]),
            Reply::Error("ERR The ID specified in XADD is equal or smaller".into()),
        ]);
        let outcomes = parse_publish_reply(Ok(reply), 3);
        assert_eq!(outcomes[0], Outcome::Stored(MessageId::new(5, 1)));
        assert_eq!(
            outcomes[1],
            Outcome::Duplicate(PublishAck {
                id: MessageId::new(4, 0),
                timestamp_ms: 1_700_000_000_000,
            })
        );
        assert!(
            matches!(&outcomes[2], Outcome::Failed(ValkeyError::Server(m)) if m.contains("equal or smaller"))
        );
        // A reply of the wrong length or shape fails every entry; so does a failed call.
        let short = parse_publish_reply(Ok(Reply::Array(vec![bulk("1-0")])), 2);
        assert!(short.iter().all(|o| matches!(o, Outcome::Failed(_))));
        let lost = parse_publish_reply(Err(ValkeyError::ConnectionLost("x".into())), 2);
        assert_eq!(lost.len(), 2);
        let unreadable =
            parse_publish_reply(Ok(Reply::Array(vec![Reply::Array(vec![bulk("junk")])])), 1);
        assert!(matches!(
            unreadable[0],
            Outcome::Failed(ValkeyError::Protocol(_))
        ));
    }
}
