//! Retention on the streams: what is due for removal ([`is_due`]: a message's ttl or the
//! topic's age retention, counted from the entry id), the trim endpoint (count retention on
//! demand) and the periodic sweep (ttl and age). Both probe the head of a stream and remove
//! the due prefix with `removal.rs`'s exact, recorded cuts; only a backlog too large for
//! their bounded rounds falls back to one bulk `XTRIM`, flagged in the removal record.
//!
//! Does not own the record those removals leave nor the gap verdicts read from it
//! (`removal.rs`), nor count retention on every XADD (`MAXLEN ~`, `entry.rs`), nor when the
//! sweep runs (the shard's maintenance task, every [`sweep_period`]).

use std::time::Duration;

use super::entry::parse_entries;
use super::read::{round_count, MAX_ROUND_ENTRIES, READ_SLACK, ROUND_BYTES};
use super::removal::{
    Cut, FIELD_AGED_BELOW, FIELD_EXPIRED_TO, FIELD_TRIMMED_BULK, FIELD_TRIMMED_TO,
};
use super::{missing_reply, on, store_error, ValkeyTier};
use crate::store::message::{Message, MessageId};
use crate::store::StoreError;
use crate::valkey::{Command, Reply};

/// Topics per sweep pipeline.
const SWEEP_BATCH_TOPICS: usize = 128;

/// Exact probe-and-cut rounds per topic per sweep.
const SWEEP_ROUNDS: usize = 8;

/// Exact probe-and-cut rounds of one trim-endpoint call.
const TRIM_ROUNDS: usize = 64;

impl ValkeyTier {
    /// Exact trim to the newest `keep_count`; `None` when the stream does not exist. Removes
    /// the head in bounded rounds (probe, then an exact cut recorded as `trimmed_to`), so a
    /// consumer resuming from the last removed message is told of no gap; a trim too large
    /// for `TRIM_ROUNDS` finishes with one unrecorded `XTRIM MAXLEN`, whose gaps are then
    /// reported conservatively.
    pub async fn trim(&self, topic: &str, keep_count: usize) -> Result<Option<usize>, StoreError> {
        let key = self.stream_key.render(topic);
        self.count("xlen", 1);
        self.count("exists", 1);
        let mut replies = self
            .client
            .call_many(&[
                on(topic, &[b"EXISTS", key.as_bytes()]),
                on(topic, &[b"XLEN", key.as_bytes()]),
            ])
            .await;
        let len = replies.pop().unwrap_or_else(missing_reply);
        let existed = replies.pop().unwrap_or_else(missing_reply);
        if !matches!(existed.map_err(store_error)?, Reply::Integer(n) if n > 0) {
            return Ok(None);
        }
        let len = match len.map_err(store_error)? {
            Reply::Integer(n) => usize::try_from(n).unwrap_or(0),
            other => {
                return Err(StoreError::Unavailable(format!(
                    "unexpected XLEN reply: {other:?}"
                )))
            }
        };
        let mut to_remove = len.saturating_sub(keep_count);
        let mut removed = 0usize;
        let mut entry_size = None;
        for _ in 0..TRIM_ROUNDS {
            if to_remove == 0 {
                break;
            }
            let count = round_count(
                to_remove.saturating_sub(1 + READ_SLACK),
                usize::MAX,
                entry_size,
            )
            .min(to_remove);
            let probe = self.probe_heads(&[(topic, count)]).await?;
            let Some(entries) = probe.into_iter().next() else {
                break;
            };
            let Some(last) = entries.last().map(|(id, _)| *id) else {
                break;
            };
            entry_size = average_footprint(&entries);
            let n = self
                .cut_heads(&[Cut {
                    topic,
                    last,
                    count: entries.len(),
                    field: FIELD_TRIMMED_TO,
                }])
                .await?;
            removed += n;
            to_remove = to_remove.saturating_sub(entries.len());
        }
        if to_remove > 0 {
            // Too large for exact rounds: one bulk trim, flagged so gaps it causes are
            // reported (conservatively) as `trimmed`.
            let keep = keep_count.to_string();
            let meta = self.meta_key.render(topic);
            self.count("xtrim", 1);
            let mut replies = self
                .client
                .call_many(&[
                    on(
                        topic,
                        &[b"XTRIM", key.as_bytes(), b"MAXLEN", keep.as_bytes()],
                    ),
                    on(
                        topic,
                        &[
                            b"HSET",
                            meta.as_bytes(),
                            FIELD_TRIMMED_BULK.as_bytes(),
                            b"1",
                        ],
                    ),
                ])
                .await;
            let _ = replies.pop();
            if let Some(Ok(Reply::Integer(n))) = replies.pop() {
                removed += usize::try_from(n).unwrap_or(0);
            }
        }
        if let Some(len) = self.lengths.borrow_mut().get_mut(topic) {
            *len = (*len).min(keep_count);
        }
        Ok(Some(removed))
    }

    /// The first `count` entries of each `(stream, count)` (one pipeline).
    async fn probe_heads(
        &self,
        topics: &[(&str, usize)],
    ) -> Result<Vec<Vec<(MessageId, Message)>>, StoreError> {
        let commands: Vec<Command> = topics
            .iter()
            .map(|(topic, count)| {
                let count = (*count).max(1).to_string();
                let key = self.stream_key.render(topic);
                on(
                    topic,
                    &[
                        b"XRANGE",
                        key.as_bytes(),
                        b"-",
                        b"+",
                        b"COUNT",
                        count.as_bytes(),
                    ],
                )
            })
            .collect();
        self.count("xrange", commands.len());
        self.client
            .call_many(&commands)
            .await
            .into_iter()
            .map(|reply| reply.map(|r| parse_entries(&r)).map_err(store_error))
            .collect()
    }

    /// Removes what age retention and message ttls have made due from the head of every
    /// known topic's stream; returns how many entries were removed. Topics are swept in
    /// batches of `SWEEP_BATCH_TOPICS` (one pipeline each, never one batch for every topic
    /// ever seen). Per topic the due prefix is found by probing the head (reply sizes bounded
    /// like page reads) and cut exactly and recorded as `expired_to` (see `cut_heads`),
    /// for up to `SWEEP_ROUNDS` rounds; a backlog beyond that is cut by age in bulk
    /// (`XTRIM MINID <now - retention>`, recorded as `aged_below`: gaps it causes are reported
    /// conservatively) and the rest waits for the next sweep. An expired-ttl entry behind a
    /// live one stays (hidden from reads) until the head reaches it.
    pub async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let names: Vec<String> = self.known.borrow().iter().cloned().collect();
        let mut removed = 0;
        for batch in names.chunks(SWEEP_BATCH_TOPICS) {
            removed += self.sweep_batch(batch, now_ms).await?;
        }
        Ok(removed)
    }

    async fn sweep_batch(&self, topics: &[String], now_ms: u64) -> Result<usize, StoreError> {
        let mut removed = 0usize;
        // (topic, entry size seen so far) of the topics whose whole last probe was due.
        let mut active: Vec<(&str, Option<usize>)> =
            topics.iter().map(|t| (t.as_str(), None)).collect();
        for _round in 0..SWEEP_ROUNDS {
            if active.is_empty() {
                return Ok(removed);
            }
            // Each topic's COUNT from its own entry sizes: one topic of large messages does
            // not slow the others' probes.
            let key_refs: Vec<(&str, usize)> = active
                .iter()
                .map(|(t, size)| {
                    // First one entry: most heads are not due, and that is all it costs.
                    let count =
                        size.map_or(1, |_| round_count(MAX_ROUND_ENTRIES, ROUND_BYTES, *size));
                    (*t, count)
                })
                .collect();
            let heads = self.probe_heads(&key_refs).await?;
            let mut cuts = Vec::new();
            let mut next = Vec::new();
            for (((topic, _), (_, count)), entries) in active.iter().zip(&key_refs).zip(&heads) {
                let due = entries
                    .iter()
                    .take_while(|(_, m)| is_due(m, now_ms, self.retention_ms))
                    .count();
                if due == 0 {
                    continue;
                }
                cuts.push(Cut {
                    topic,
                    last: entries[due - 1].0,
                    count: due,
                    field: FIELD_EXPIRED_TO,
                });
                if due == entries.len() && entries.len() == *count {
                    next.push((*topic, average_footprint(entries)));
                }
            }
            drop(heads);
            removed += self.cut_heads(&cuts).await?;
            active = next;
        }
        if !active.is_empty() && self.retention_ms > 0 {
            // A backlog larger than the exact rounds: bulk age trim, recorded.
            let min_id = MessageId::new(now_ms.saturating_sub(self.retention_ms), 0).to_string();
            let mut commands = Vec::with_capacity(active.len() * 2);
            for (topic, _) in &active {
                let key = self.stream_key.render(topic);
                let meta = self.meta_key.render(topic);
                commands.push(on(
                    topic,
                    &[b"XTRIM", key.as_bytes(), b"MINID", min_id.as_bytes()],
                ));
                commands.push(on(
                    topic,
                    &[
                        b"HSET",
                        meta.as_bytes(),
                        FIELD_AGED_BELOW.as_bytes(),
                        min_id.as_bytes(),
                    ],
                ));
            }
            self.count("xtrim", active.len());
            for pair in self.client.call_many(&commands).await.chunks(2) {
                if let Some(Ok(Reply::Integer(n))) = pair.first() {
                    removed += usize::try_from(*n).unwrap_or(0);
                }
            }
        }
        Ok(removed)
    }
}

/// Mean footprint of `entries` (`None` if empty).
fn average_footprint(entries: &[(MessageId, Message)]) -> Option<usize> {
    let total: usize = entries.iter().map(|(_, m)| m.footprint()).sum();
    total.checked_div(entries.len()).map(|s| s.max(1))
}

/// Age counts from the entry id, the same clock `XTRIM MINID` trims by, not from the
/// `timestamp` field: entries migrated from the Python relay carry new ids but old
/// timestamps, and must not be hidden (or swept) for that.
pub(super) fn is_due(message: &Message, now_ms: u64, retention_ms: u64) -> bool {
    message.is_expired(now_ms) || now_ms.saturating_sub(message.id.ms) > retention_ms
}

/// How long a shard waits between retention sweeps of Valkey: a quarter of the retention,
/// within 1 s .. 60 s.
pub fn sweep_period(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::read::FIRST_ROUND_ENTRIES;
    use super::super::test_support::{item, new_tier, tier_on};
    use super::*;

    #[test]
    fn age_counts_from_the_entry_id_not_the_timestamp_field() {
        // Regression: a migrated entry (new id, 2025 timestamp) was hidden and then swept.
        let m = Message {
            id: MessageId::new(1_800_000_000_000, 0),
            timestamp_ms: 1_735_732_800_000,
            expires_at_ms: None,
            payload: Bytes::from_static(b"1"),
            metadata: None,
        };
        assert!(!is_due(&m, 1_800_000_001_000, 86_400_000));
        assert!(is_due(&m, 1_800_000_000_000 + 86_400_001, 86_400_000));
    }

    #[test]
    fn a_sweep_over_more_topics_than_one_batch_removes_every_expired_head() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            let topics = SWEEP_BATCH_TOPICS * 2 + 3;
            // Per topic: a run of expired entries longer than one probe, then one live one.
            let mut items = Vec::new();
            for t in 0..topics {
                for _ in 0..(FIRST_ROUND_ENTRIES + 5) {
                    items.push(item(&format!("t{t}"), 10, Some(1)));
                }
                items.push(item(&format!("t{t}"), 10, None));
            }
            let stored = tier.publish_persisted(items, now, &|_, _, _| {}).await;
            assert!(stored.iter().all(Result::is_ok));
            let removed = tier.sweep(now + 10).await.expect("sweep");
            assert_eq!(removed, topics * (FIRST_ROUND_ENTRIES + 5));
            for t in [0, SWEEP_BATCH_TOPICS, topics - 1] {
                let key = format!("s:t{t}");
                let len = tier
                    .client
                    .call(&[b"XLEN", key.as_bytes()])
                    .await
                    .expect("XLEN");
                assert_eq!(len.as_int(), Some(1), "{key}");
            }
        });
    }
}
