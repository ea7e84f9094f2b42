//! The `pulsar` Valkey Function library (`publish.lua`) and the one call both publish paths
//! make with it: `FCALL pulsar_append`, a batch of entries of one topic, each appended
//! atomically with its idempotency check, then the topic's feed notified. The reply also names
//! the entry that preceded the batch in the stream, so each stored entry's predecessor is
//! known (`pulsar_publish`, the same call without it, stays in the library for relays of
//! version 1).
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

use super::ValkeyTier;
use crate::store::message::{write_rfc3339_millis, MessageId};
use crate::store::{PublishAck, PublishItem};
use crate::valkey::{Command, FunctionLibrary, ProtocolError, Reply, ValkeyError};

/// Bumped with every change to `publish.lua` (see its header for the compatibility rule).
pub const LIBRARY_VERSION: u32 = 3;

/// The library every relay connection makes sure is loaded.
pub const LIBRARY: FunctionLibrary = FunctionLibrary {
    name: "pulsar",
    version: LIBRARY_VERSION,
    source: include_str!("publish.lua"),
};

/// One entry of a `pulsar_append` call.
pub(super) struct Entry<'a> {
    pub(super) item: &'a PublishItem,
    /// `None`: Valkey picks the id (`*`, `ack: persisted`); `Some`: the write-behind's id.
    pub(super) id: Option<MessageId>,
    pub(super) timestamp_ms: u64,
}

/// How one entry of a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Appended with this id, right after `after` in the stream (the entry that preceded it
    /// when it was appended; `None` when the reply did not say).
    Stored {
        id: MessageId,
        after: Option<MessageId>,
    },
    /// Its idempotency key was used before: nothing appended; the first publish's answer.
    Duplicate(PublishAck),
    /// Not appended, or not known to be (the whole call failed).
    Failed(ValkeyError),
}

impl ValkeyTier {
    /// `FCALL pulsar_append <numkeys> <stream> <meta> <idempotency keys...> <maxlen>
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
        let keys = entries
            .iter()
            .filter(|e| e.item.idempotency_key.is_some())
            .count();
        let args = 3 + 2 + keys + 4 + ENTRY_ARGS * entries.len();
        let capacity = 256
            + entries
                .iter()
                .map(|e| {
                    e.item.payload.len()
                        + e.item.metadata.as_ref().map_or(0, |m| m.len())
                        + e.item.idempotency_key.as_ref().map_or(0, |k| k.len() + 64)
                        + 96
                })
                .sum::<usize>();
        // Ids, timestamps and numbers are formatted here first, one at a time; everything
        // else goes straight from where it lives into the command.
        let mut text: Vec<u8> = Vec::with_capacity(32);
        let mut digits = itoa::Buffer::new();
        let built = Command::build(args, capacity, |w| {
            w.arg(b"FCALL");
            w.arg(b"pulsar_append");
            w.arg(digits.format(2 + keys).as_bytes());
            w.arg_concat(&self.stream_key.parts(topic));
            w.arg_concat(&self.meta_key.parts(topic));
            for entry in entries {
                if let Some(key) = &entry.item.idempotency_key {
                    let [prefix, name, suffix] = self.idempotency_key.parts(topic);
                    w.arg_concat(&[prefix, name, suffix, key.as_bytes()]);
                }
            }
            w.arg(self.max_len.as_bytes());
            w.arg(self.idempotency_window.as_bytes());
            text.clear();
            if let Some(ms) = created_ms {
                write_rfc3339_millis(&mut text, ms);
            }
            w.arg(&text);
            w.arg(self.instance_id.as_bytes());
            // KEYS[1] is the stream, KEYS[2] the meta hash: idempotency keys start at 3.
            let mut next_key = 3;
            for entry in entries {
                text.clear();
                match entry.id {
                    Some(id) => id.write_to(&mut text),
                    None => text.push(b'*'),
                }
                w.arg(&text);
                if entry.item.idempotency_key.is_some() {
                    w.arg(digits.format(next_key).as_bytes());
                    next_key += 1;
                } else {
                    w.arg(b"0");
                }
                w.arg(&entry.item.payload);
                text.clear();
                write_rfc3339_millis(&mut text, entry.timestamp_ms);
                w.arg(&text);
                w.arg(entry.item.metadata.as_deref().unwrap_or(b""));
                text.clear();
                if let Some(ttl_ms) = entry.item.ttl_ms {
                    super::entry::write_ttl_seconds(&mut text, ttl_ms);
                }
                w.arg(&text);
            }
        });
        built
            .expect("pulsar_append's argument count is computed from the entries it writes")
            .routed(topic.as_bytes())
    }
}

/// Arguments per entry of a `pulsar_append` call (`ENTRY_ARGS` in `publish.lua`).
const ENTRY_ARGS: usize = 6;

/// The outcomes of the `n` entries of one `pulsar_append` call, in entry order.
pub(super) fn parse_publish_reply(reply: Result<Reply, ValkeyError>, n: usize) -> Vec<Outcome> {
    let mut items = match reply {
        Ok(Reply::Array(items)) if items.len() == n + 1 => items.into_iter(),
        Ok(other) => {
            let error = malformed(format!("unexpected pulsar_append reply: {other:?}"));
            return vec![Outcome::Failed(error); n];
        }
        Err(error) => return vec![Outcome::Failed(error); n],
    };
    // The stream's newest entry before the call, then each stored entry in turn.
    let mut after = items
        .next()
        .as_ref()
        .and_then(Reply::as_str)
        .and_then(|s| s.parse().ok());
    items
        .map(|reply| {
            let outcome = parse_entry_reply(reply, after);
            if let Outcome::Stored { id, .. } = outcome {
                after = Some(id);
            }
            outcome
        })
        .collect()
}

fn parse_entry_reply(reply: Reply, after: Option<MessageId>) -> Outcome {
    match reply {
        Reply::Bulk(id) => match std::str::from_utf8(&id).ok().and_then(|s| s.parse().ok()) {
            Some(id) => Outcome::Stored { id, after },
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

    /// The exact call: what `publish.lua` documents, argument by argument.
    #[test]
    fn a_call_carries_keys_then_header_then_six_arguments_per_entry() {
        use crate::store::valkey::test_support::{item, keyed, new_tier, offline};
        crate::valkey::testing::run_local(|| async {
            let tier = new_tier(offline(), 1000);
            let plain = item("t", 3, Some(1_500));
            let keyed = keyed("t", 2, "k 1");
            let entries = [
                Entry {
                    item: &plain,
                    id: None,
                    timestamp_ms: 1_700_000_000_000,
                },
                Entry {
                    item: &keyed,
                    id: Some(MessageId::new(7, 1)),
                    timestamp_ms: 1_700_000_000_001,
                },
            ];
            let command = tier.encode_publish("t", &entries, Some(1_700_000_000_000));
            let expected: &[&[u8]] = &[
                b"FCALL",
                b"pulsar_append",
                b"3",
                b"s:t",
                b"m:t",
                b"i:t:k 1",
                b"1000000",
                b"600000",
                b"2023-11-14T22:13:20.000Z",
                b"0123456789abcdef",
                b"*",
                b"0",
                b"\"xxx\"",
                b"2023-11-14T22:13:20.000Z",
                b"",
                b"1.500",
                b"7-1",
                b"3",
                b"\"xx\"",
                b"2023-11-14T22:13:20.001Z",
                b"",
                b"",
            ];
            let mut encoded = bytes::BytesMut::new();
            crate::valkey::encode_command(&mut encoded, expected);
            assert_eq!(command.as_bytes(), &encoded[..]);
            // Without a created time the meta argument is empty.
            let command = tier.encode_publish("t", &entries[..1], None);
            let mut encoded = bytes::BytesMut::new();
            let mut short: Vec<&[u8]> = expected[..16].to_vec();
            short[2] = b"2";
            short.remove(5);
            short[7] = b"";
            crate::valkey::encode_command(&mut encoded, &short);
            assert_eq!(command.as_bytes(), &encoded[..]);
        });
    }

    #[test]
    fn replies_become_outcomes_in_entry_order() {
        let reply = Reply::Array(vec![
            bulk("5-0"),
            bulk("5-1"),
            Reply::Array(vec![bulk("4-0 2023-11-14T22:13:20.000Z")]),
            Reply::Error("ERR The ID specified in XADD is equal or smaller".into()),
            bulk("6-0"),
        ]);
        let outcomes = parse_publish_reply(Ok(reply), 4);
        // Each stored entry follows the newest entry before the call, or the call's previous
        // stored entry (a duplicate or a failure stored nothing between).
        assert_eq!(
            outcomes[0],
            Outcome::Stored {
                id: MessageId::new(5, 1),
                after: Some(MessageId::new(5, 0)),
            }
        );
        assert_eq!(
            outcomes[3],
            Outcome::Stored {
                id: MessageId::new(6, 0),
                after: Some(MessageId::new(5, 1)),
            }
        );
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
        let short = parse_publish_reply(Ok(Reply::Array(vec![bulk("0-0"), bulk("1-0")])), 2);
        assert!(short.iter().all(|o| matches!(o, Outcome::Failed(_))));
        let lost = parse_publish_reply(Err(ValkeyError::ConnectionLost("x".into())), 2);
        assert_eq!(lost.len(), 2);
        let unreadable = parse_publish_reply(
            Ok(Reply::Array(vec![
                bulk("0-0"),
                Reply::Array(vec![bulk("junk")]),
            ])),
            1,
        );
        assert!(matches!(
            unreadable[0],
            Outcome::Failed(ValkeyError::Protocol(_))
        ));
    }
}
