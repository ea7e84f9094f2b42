//! Removals the relay makes and records, and the gap verdicts read from that record: exact
//! head cuts (`XTRIM MINID` just past an id seen at the head), topic deletes with their
//! tombstone, the topic's meta-hash fields that record both ([`RemovalRecord`]), `XINFO
//! STREAM` as gap detection needs it ([`StreamInfo`]), and [`gap_verdict`].
//!
//! Valkey's `max-deleted-entry-id` moves only on `XDEL`, so the relay records what it removes
//! itself in the topic's meta hash (`removed`, `expired_to`, `trimmed_to`, `deleted_to`) and
//! removes heads by exact cuts; [`ValkeyTier::gap_after`] compares that record with `XINFO
//! STREAM`. Exact for everything the relay removes by a cut or delete and for `XDEL`;
//! conservative (a gap from below the first entry) for removals nobody recorded, such as
//! Valkey's own `MAXLEN ~` trims on XADD (see [`gap_verdict`]).
//!
//! Does not decide what is due for removal or when (`retention.rs`: the trim endpoint and
//! the sweep call the cuts here).

use super::entry::parse_entry;
use super::{is_no_such_key, missing_reply, on, store_error, ValkeyTier};
use crate::store::message::MessageId;
use crate::store::{GapInfo, GapReason, StoreError};
use crate::valkey::Reply;

/// Meta-hash fields the relay keeps per topic to know what left the stream and why (besides
/// `created`). Valkey's own `XINFO STREAM` fields do not: `max-deleted-entry-id` moves only on
/// `XDEL`, not on trims.
/// Entries the relay removed with exact knowledge (the cuts below), this incarnation.
const FIELD_REMOVED: &str = "removed";
/// The newest id removed because its ttl or the age retention ran out (exact).
pub(super) const FIELD_EXPIRED_TO: &str = "expired_to";
/// The newest id removed by the trim endpoint (exact).
pub(super) const FIELD_TRIMMED_TO: &str = "trimmed_to";
/// The last bulk age trim's threshold: every id below it is gone (not recorded per entry).
pub(super) const FIELD_AGED_BELOW: &str = "aged_below";
/// Set once a trim endpoint call fell back to a bulk `XTRIM MAXLEN`.
pub(super) const FIELD_TRIMMED_BULK: &str = "trimmed_bulk";
/// The last id of the stream the relay deleted (a tombstone; survives re-creation).
const FIELD_DELETED_TO: &str = "deleted_to";
/// The newest id a relay had seen stored that later vanished from the stream without any
/// removal to explain it: the stream was rewound (failover, flush, recreation). See
/// [`ValkeyTier::record_rewind`].
const FIELD_REWOUND_TO: &str = "rewound_to";

/// One exact head cut (see [`ValkeyTier::cut_heads`]).
pub(super) struct Cut<'a> {
    pub(super) topic: &'a str,
    pub(super) last: MessageId,
    pub(super) count: usize,
    pub(super) field: &'static str,
}

/// The id just after `id` in stream order.
fn id_after(id: MessageId) -> MessageId {
    match id.seq.checked_add(1) {
        Some(seq) => MessageId::new(id.ms, seq),
        None => MessageId::new(id.ms.saturating_add(1), 0),
    }
}

impl ValkeyTier {
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
        // `ack: buffered`: ids this relay issued may not be stored yet; a position among them
        // is not past the stream's end.
        let issued_here = self.buffered_last.borrow().get(topic).map(|(id, _)| *id);
        Ok(gap_verdict(
            stream.as_ref(),
            &meta,
            after,
            self.max_len_n,
            issued_here,
        ))
    }

    /// `topic`'s stream lost `vanished`, an id a relay had seen stored, with no removal to
    /// explain it (see the module doc): records it (`rewound_to`, only ever raised), so every
    /// consumer resuming from before it is told (reason `rewound`), on any relay; and moves
    /// the stream's last id up to it (`XSETID`, where the stream is not past it yet), so new
    /// entries never reuse the ids of the lost ones, which a consumer may have seen.
    pub async fn record_rewind(&self, topic: &str, vanished: MessageId) -> Result<(), StoreError> {
        let key = self.stream_key.render(topic);
        let meta = self.meta_key.render(topic);
        let id = vanished.to_string();
        self.count("hget", 1);
        let recorded = self
            .client
            .call_routed(
                topic.as_bytes(),
                &[b"HGET", meta.as_bytes(), FIELD_REWOUND_TO.as_bytes()],
            )
            .await
            .map_err(store_error)?;
        let recorded = recorded
            .as_str()
            .and_then(|s| s.parse::<MessageId>().ok())
            .unwrap_or(MessageId::MIN);
        if recorded < vanished {
            self.count("hset", 1);
            self.client
                .call_routed(
                    topic.as_bytes(),
                    &[
                        b"HSET",
                        meta.as_bytes(),
                        FIELD_REWOUND_TO.as_bytes(),
                        id.as_bytes(),
                    ],
                )
                .await
                .map_err(store_error)?;
        }
        self.count("xsetid", 1);
        // Refused when the stream is already past `vanished` or does not exist (new ids then
        // start from the clock, after it): nothing to do either way.
        let _ = self
            .client
            .call_routed(
                topic.as_bytes(),
                &[b"XSETID", key.as_bytes(), id.as_bytes()],
            )
            .await;
        tracing::warn!(
            topic,
            vanished = %vanished,
            "the stream lost entries it had stored (a failover, a flush or a recreation): \
             consumers resuming from before them are told (gap reason `rewound`)"
        );
        Ok(())
    }

    /// Removes each stream's head up to and including `last` (an id the caller just saw at
    /// the head, with `count` entries up to it) and records it in the topic's meta hash in
    /// the same transaction: `removed += count`, `<field> = last`. Exact: `XTRIM MINID` with
    /// the id just after `last` removes precisely those entries (ids only grow), and the
    /// record is what makes a later gap verdict exact. Returns how many entries went.
    pub(super) async fn cut_heads(&self, cuts: &[Cut<'_>]) -> Result<usize, StoreError> {
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
        let ttl_s = (self.retention_ms / 1000)
            .max(TOMBSTONE_MIN_TTL_S)
            .to_string();
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
}

/// How long a deleted topic's tombstone (its meta hash with `deleted_to`) lives at least, if
/// the topic is not written again: the retention alone is too short (with a retention of
/// seconds, a consumer a little behind resumed into a recreated stream with no gap; model
/// checker seed 8063). A consumer away longer than this after a delete and re-creation is
/// not told of the delete.
const TOMBSTONE_MIN_TTL_S: u64 = 7 * 24 * 3600;

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
    rewound_to: MessageId,
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
        rewound_to: MessageId::MIN,
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
                FIELD_REWOUND_TO => record.rewound_to = id(),
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
///   as a gap, also from the very last removed id (where nothing is missing after all);
/// - for a stream that lost its end (reason `rewound`): a relay that finds an id it had seen
///   stored gone with nothing to explain it records it (`rewound_to`, see
///   [`ValkeyTier::record_rewind`]), and a position past every id the stream ever generated
///   (`last-generated-id`) is itself the evidence, unless the position is an id this relay
///   issued and has not written yet (`issued_here`, `ack: buffered`).
fn gap_verdict(
    stream: Option<&StreamInfo>,
    record: &RemovalRecord,
    after: MessageId,
    max_len: u64,
    issued_here: Option<MessageId>,
) -> Option<GapInfo> {
    let Some(stream) = stream else {
        // No stream: rewound (a relay recorded ids it had seen stored that vanished), deleted
        // by the relay (the tombstone says up to where), or behind its back (the meta hash of
        // a topic it wrote is still there: cannot tell what is gone, so report it), or never
        // written (nothing to miss).
        if record.rewound_to != MessageId::MIN && record.rewound_to >= after {
            return Some(GapInfo {
                oldest_available: None,
                reason: GapReason::Rewound,
            });
        }
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
    if record.rewound_to != MessageId::MIN {
        // Also for a consumer at the vanished id itself: what it saw is gone.
        consider(id_after(record.rewound_to), GapReason::Rewound);
    }
    if after > stream.last_generated && issued_here.is_none_or(|issued| after > issued) {
        // The consumer's position is past every id this stream ever generated: it saw
        // entries that are gone with the stream's end (a failover, a flush, a recreation).
        consider(MessageId::MAX, GapReason::Rewound);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let gap = gap_verdict(Some(&s), &record, id(2), 1000, None).expect("gap");
        assert_eq!(gap.reason, GapReason::Expired);
        assert_eq!(gap.oldest_available, Some(id(5)));
        // Resuming from the last removed id (or later) misses nothing.
        for after in [4, 5, 9, 10] {
            assert_eq!(
                gap_verdict(Some(&s), &record, id(after), 1000, None),
                None,
                "{after}"
            );
        }
    }

    /// Epochs: a stream that lost its end. Ids 1..=10 were stored and seen; a failover
    /// promoted a replica that had 1..=7, which then stored 20..=22.
    #[test]
    fn a_rewound_stream_is_a_gap_for_every_position_up_to_what_vanished() {
        let after_failover = stream(3 + 7, 10, Some(1), 22);
        let record = RemovalRecord {
            rewound_to: id(10),
            ..RemovalRecord::NONE
        };
        // Before the lost ids (they will never come), and at them (what it saw is gone).
        for after in [5, 7, 8, 10] {
            let gap = gap_verdict(Some(&after_failover), &record, id(after), 1000, None)
                .unwrap_or_else(|| panic!("no gap after {after}"));
            assert_eq!(gap.reason, GapReason::Rewound, "{after}");
        }
        // Past them: nothing missed.
        assert_eq!(
            gap_verdict(Some(&after_failover), &record, id(20), 1000, None),
            None
        );
        // Nobody recorded it yet (every relay restarted): the failover left the stream
        // behind the consumer's position, which is itself the evidence.
        let just_failed_over = stream(7, 7, Some(1), 7);
        let gap = gap_verdict(
            Some(&just_failed_over),
            &RemovalRecord::NONE,
            id(9),
            1000,
            None,
        )
        .expect("gap");
        assert_eq!(gap.reason, GapReason::Rewound);
        // ... unless the position is an id this relay issued and has not written yet
        // (`ack: buffered`).
        assert_eq!(
            gap_verdict(
                Some(&just_failed_over),
                &RemovalRecord::NONE,
                id(9),
                1000,
                Some(id(9))
            ),
            None
        );
        // Flushed: no stream and no meta hash but the record a relay wrote since.
        assert_eq!(
            gap_verdict(None, &record, id(3), 1000, None).map(|g| g.reason),
            Some(GapReason::Rewound)
        );
        assert_eq!(gap_verdict(None, &record, id(11), 1000, None), None);
    }

    #[test]
    fn unrecorded_head_trims_are_reported_conservatively() {
        // Ids 1..=10 added, MAXLEN ~ 5 took 1..=3 (nothing recorded).
        let s = stream(7, 10, Some(4), 10);
        let gap = gap_verdict(Some(&s), &RemovalRecord::NONE, id(1), 5, None).expect("gap");
        assert_eq!(gap.reason, GapReason::Trimmed);
        // Conservative: from the last trimmed id a gap is reported although none is missing.
        assert!(gap_verdict(Some(&s), &RemovalRecord::NONE, id(3), 5, None).is_some());
        assert_eq!(
            gap_verdict(Some(&s), &RemovalRecord::NONE, id(4), 5, None),
            None
        );
        // Below the count cap an unrecorded removal has no known cause.
        let gap = gap_verdict(Some(&s), &RemovalRecord::NONE, id(1), 100, None).expect("gap");
        assert_eq!(gap.reason, GapReason::Unknown);
        // Emptied: everything up to the last id is gone.
        let empty = stream(0, 10, None, 10);
        assert!(gap_verdict(Some(&empty), &RemovalRecord::NONE, id(9), 5, None).is_some());
        assert_eq!(
            gap_verdict(Some(&empty), &RemovalRecord::NONE, id(10), 5, None),
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
            gap_verdict(None, &tomb, id(3), 5, None).map(|g| g.reason),
            Some(GapReason::Deleted)
        );
        assert_eq!(gap_verdict(None, &tomb, id(10), 5, None), None);
        // Never written: nothing to miss.
        assert_eq!(
            gap_verdict(None, &RemovalRecord::NONE, id(3), 5, None),
            None
        );
        // Recreated since: the old stream's messages after the resume point are gone.
        let again = stream(2, 2, Some(20), 21);
        let gap = gap_verdict(Some(&again), &tomb, id(3), 5, None).expect("gap");
        assert_eq!(gap.reason, GapReason::Deleted);
        assert_eq!(gap.oldest_available, Some(id(20)));
        assert_eq!(gap_verdict(Some(&again), &tomb, id(10), 5, None), None);
    }
}
