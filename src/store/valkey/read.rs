//! Page reads from Valkey: XRANGE/XREVRANGE with an exclusive cursor, each round trip asking
//! for as many entries as fit its byte budget at the entry sizes seen so far (the adaptive
//! COUNT, [`round_count`], which head probes of `retention.rs` size themselves by too), entries
//! due for removal skipped, and a scan budget over long expired runs.
//!
//! Does not decide whether a read can be served from memory instead (that is
//! [`crate::store::Storage`]) nor what makes an entry due (`retention.rs`).

use super::entry::parse_entries;
use super::retention::is_due;
use super::{missing_reply, on, store_error, ValkeyTier};
use crate::store::hot_tier::{Order, Page, PageQuery};
use crate::store::message::MessageId;
use crate::store::StoreError;
use crate::valkey::Reply;

/// How many entries one range read asks for beyond the page, to skip expired entries without a
/// second round trip in the common case (and to learn whether more follow the page).
pub(super) const READ_SLACK: usize = 8;

/// A page read from Valkey gives up after this many round trips that found only expired
/// entries; it then returns what it has with a cursor past what it scanned, so a client can
/// continue.
const MAX_READ_ROUNDS: usize = 8;

/// About how many reply bytes one XRANGE of a page read may bring back: the COUNT asked for is
/// this divided by the entry size seen so far. Bounds the memory of one read and how long it
/// holds the shard's shared pipeline, whatever the payload sizes.
pub(super) const ROUND_BYTES: usize = 1 << 20;

/// The COUNT of a page read's first XRANGE when nothing is known of the entry sizes.
pub(super) const FIRST_ROUND_ENTRIES: usize = 8;

/// The most entries one XRANGE of a page read asks for.
pub(super) const MAX_ROUND_ENTRIES: usize = 1024;

/// Where a read was served from (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    Memory,
    Valkey,
}

impl ValkeyTier {
    /// A page from Valkey: XRANGE/XREVRANGE with an exclusive cursor, skipping expired
    /// entries, plus XLEN for `total`. `None` when the stream does not exist.
    ///
    /// Bounded three ways, so one request costs about its byte budget and never ends a topic
    /// early:
    /// - each round trip asks for as many entries as fit `ROUND_BYTES` at the sizes seen so
    ///   far (`size_hint`, else a small first probe), never `limit × max payload`;
    /// - the page stops at `query.limit` messages or `query.max_bytes` bytes (a single larger
    ///   message is still returned, alone);
    /// - after `MAX_READ_ROUNDS` round trips of only expired entries the page ends
    ///   with what it has and a `next_cursor` past the last entry scanned, even with no
    ///   messages: `next_cursor: None` means the end of the stream was reached.
    pub async fn read(
        &self,
        topic: &str,
        query: &PageQuery,
        now_ms: u64,
        size_hint: Option<usize>,
    ) -> Result<Option<Page>, StoreError> {
        let key = self.stream_key.render(topic);
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        let mut cursor = query.after;
        // The last entry looked at (returned or skipped as expired): where a next page starts.
        let mut scanned_to: Option<MessageId> = None;
        let mut more_remain = false;
        let mut expired_before = false;
        let mut total = None;
        let mut entry_size = size_hint.map(|s| s.max(1));
        // Round trips that found only expired entries: the scan budget. Rounds that return
        // messages do not count (with large entries a page takes several), so a page ends
        // early only over a long expired run.
        let mut idle_rounds = 0;
        for round in 0.. {
            let full = messages.len() >= query.limit || bytes >= query.max_bytes;
            if full && round > 0 {
                // Filled exactly by the previous round without seeing what follows.
                more_remain = true;
                break;
            }
            let want = query.limit.saturating_sub(messages.len());
            let count = round_count(want, query.max_bytes.saturating_sub(bytes), entry_size);
            // Rounds after the first start AT the last entry scanned, not after it: a trim
            // between two rounds (a `MAXLEN` of another publish, the write-behind, a sweep)
            // would otherwise leave a hole inside the page that no gap check sees. Removals
            // other than foreign `XDEL`s take a stream's head, so while that entry is still
            // there nothing after it has gone; once it is gone the page ends at it, and the
            // next page's read (then its gap check) starts from there.
            let overlap = usize::from(round > 0 && cursor.is_some());
            let count_text = (count + overlap).to_string();
            let bound = cursor.map(|c| {
                if overlap == 1 {
                    c.to_string()
                } else {
                    format!("({c}")
                }
            });
            let (cmd, start, end): (&[u8], &str, &str) = match query.order {
                Order::Asc => (b"XRANGE", bound.as_deref().unwrap_or("-"), "+"),
                Order::Desc => (b"XREVRANGE", bound.as_deref().unwrap_or("+"), "-"),
            };
            let range = on(
                topic,
                &[
                    cmd,
                    key.as_bytes(),
                    start.as_bytes(),
                    end.as_bytes(),
                    b"COUNT",
                    count_text.as_bytes(),
                ],
            );
            self.count(
                if query.order == Order::Asc {
                    "xrange"
                } else {
                    "xrevrange"
                },
                1,
            );
            let range_reply = if total.is_none() {
                self.count("xlen", 1);
                let xlen = on(topic, &[b"XLEN", key.as_bytes()]);
                let mut replies = self.client.call_many(&[range, xlen]).await;
                let len_reply = replies.pop().unwrap_or_else(missing_reply);
                let range_reply = replies.pop().unwrap_or_else(missing_reply);
                total = Some(match len_reply.map_err(store_error)? {
                    Reply::Integer(n) => usize::try_from(n).unwrap_or(0),
                    _ => 0,
                });
                range_reply
            } else {
                self.client
                    .call_many(&[range])
                    .await
                    .pop()
                    .unwrap_or_else(missing_reply)
            };
            // Parsed entries share the reply's payload buffers; the reply's frames go now.
            let mut entries = parse_entries(&range_reply.map_err(store_error)?);
            if overlap == 1 {
                if entries.first().map(|(id, _)| *id) != cursor {
                    // The boundary left the stream between the rounds.
                    more_remain = true;
                    break;
                }
                entries.remove(0);
            }
            let fetched = entries.len();
            let mut fetched_bytes = 0usize;
            let had = messages.len();
            for (id, message) in entries {
                if messages.len() >= query.limit || bytes >= query.max_bytes {
                    // An entry beyond a full page: more remain.
                    more_remain = true;
                    break;
                }
                let due = is_due(&message, now_ms, self.retention_ms);
                if due && !messages.is_empty() && query.stop_at_expired {
                    // A page ends before an expired entry that follows a message it returns:
                    // the next page starts with that run and reports it (Page::expired_before).
                    more_remain = true;
                    break;
                }
                scanned_to = Some(id);
                fetched_bytes = fetched_bytes.saturating_add(message.footprint());
                if due {
                    expired_before |= messages.is_empty();
                } else {
                    bytes = bytes.saturating_add(message.footprint());
                    messages.push(message);
                }
            }
            if more_remain || fetched < count {
                // A page boundary inside this reply, or the end of the stream.
                break;
            }
            if let Some(size) = fetched_bytes.checked_div(fetched) {
                entry_size = Some(size.max(1));
            }
            cursor = scanned_to;
            if messages.len() == had {
                idle_rounds += 1;
                if idle_rounds == MAX_READ_ROUNDS {
                    // Scan budget spent (a long run of expired entries): let the client go on.
                    more_remain = true;
                    break;
                }
            }
        }
        let total = total.unwrap_or(0);
        let known = self.known.borrow().contains(topic);
        if total == 0 && messages.is_empty() && !known {
            if query.after.is_none() {
                return Ok(None);
            }
        } else {
            // Only streams that exist get a cached length: a client-chosen name read with a
            // cursor must not grow this map.
            self.lengths.borrow_mut().insert(topic.to_owned(), total);
        }
        let next_cursor = if more_remain { scanned_to } else { None };
        Ok(Some(Page {
            messages,
            total,
            next_cursor,
            expired_before,
            removed_before: None,
        }))
    }
}

/// The COUNT of one page-read XRANGE: what the page still wants (plus one to see whether more
/// follow, plus slack for expired entries), within `ROUND_BYTES` (and the page's remaining
/// bytes) at `entry_size` bytes per entry, at least 1.
pub(super) fn round_count(want: usize, byte_room: usize, entry_size: Option<usize>) -> usize {
    let by_bytes = match entry_size {
        Some(size) => ROUND_BYTES.min(byte_room) / size.max(1) + 1,
        None => FIRST_ROUND_ENTRIES,
    };
    want.saturating_add(1 + READ_SLACK)
        .min(by_bytes)
        .clamp(1, MAX_ROUND_ENTRIES)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{item, new_tier, tier_on};
    use super::*;
    use crate::store::PublishItem;

    #[test]
    fn round_counts_stay_within_the_byte_budget() {
        assert_eq!(round_count(100, usize::MAX, None), FIRST_ROUND_ENTRIES);
        assert_eq!(round_count(100, usize::MAX, Some(100)), 109);
        assert_eq!(round_count(5000, usize::MAX, Some(10)), MAX_ROUND_ENTRIES);
        // 1 MiB entries: one at a time.
        assert_eq!(round_count(1000, usize::MAX, Some(1 << 20)), 2);
        assert_eq!(round_count(1000, 1000, Some(100)), 11);
        assert_eq!(round_count(0, usize::MAX, Some(1)), 9);
    }

    #[test]
    fn valkey_pages_stop_at_their_byte_budget_and_a_larger_message_comes_alone() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            let items: Vec<PublishItem> = (0..20).map(|_| item("big", 100_000, None)).collect();
            let stored = tier.publish_persisted(items, now, &|_, _, _| {}).await;
            let ids: Vec<MessageId> = stored
                .iter()
                .map(|r| r.as_ref().expect("stored").id)
                .collect();
            let mut query = PageQuery::new(None, Order::Asc, 1000);
            query.max_bytes = 350_000;
            let mut got = Vec::new();
            let mut pages = 0;
            loop {
                let page = tier
                    .read("big", &query, now, None)
                    .await
                    .expect("read")
                    .expect("page");
                pages += 1;
                // 100 KB messages under a 350 KB budget: the page stops once it holds 350 KB
                // (the message that crosses it included), like the hot tier's pages.
                assert!(page.messages.len() <= 4, "{} messages", page.messages.len());
                got.extend(page.messages.iter().map(|m| m.id));
                match page.next_cursor {
                    Some(c) => query.after = Some(c),
                    None => break,
                }
            }
            assert_eq!(got, ids);
            assert_eq!(pages, 5);
            // A budget below one message: one message per page, never none.
            query.after = None;
            query.max_bytes = 10;
            let page = tier
                .read("big", &query, now, None)
                .await
                .expect("read")
                .expect("page");
            assert_eq!(page.messages.len(), 1);
            assert_eq!(page.next_cursor, Some(ids[0]));
        });
    }

    #[test]
    fn a_page_of_megabyte_messages_is_not_cut_short_by_the_scan_budget() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            // More messages than `MAX_READ_ROUNDS` rounds of 1 MiB replies can carry.
            let n = FIRST_ROUND_ENTRIES + 2 * MAX_READ_ROUNDS + 5;
            let items: Vec<PublishItem> = (0..n).map(|_| item("huge", 1 << 20, None)).collect();
            let stored = tier.publish_persisted(items, now, &|_, _, _| {}).await;
            assert!(stored.iter().all(Result::is_ok));
            let query = PageQuery::new(None, Order::Asc, n);
            let page = tier
                .read("huge", &query, now, None)
                .await
                .expect("read")
                .expect("page");
            assert_eq!(page.messages.len(), n);
        });
    }

    #[test]
    fn a_cursor_read_of_a_nonexistent_topic_caches_nothing() {
        let server = crate::valkey::testing::ValkeyServer::start(&[]);
        let config = tier_on(&server);
        crate::valkey::testing::run_local(move || async move {
            let tier = new_tier(config, 3_600_000);
            let now = crate::clock::now_ms();
            for i in 0..100 {
                let topic = format!("nobody-{i}");
                let query = PageQuery::new(Some(MessageId::new(1, 0)), Order::Asc, 10);
                let page = tier.read(&topic, &query, now, None).await.expect("read");
                assert!(page.is_none_or(|p| p.messages.is_empty()));
            }
            assert!(tier.lengths.borrow().is_empty());
            assert!(tier.known.borrow().is_empty());
        });
    }
}
