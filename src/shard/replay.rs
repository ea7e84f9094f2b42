//! Subscribe-read: a consumer's shard registers interest in a topic with its owner and reads a
//! page of its history, in one owner-call.
//!
//! This is the step that makes resume gap-free (see [`crate::delivery::registry`]): the owner
//! records the interest and notes the topic's last id in one step, before any await, so
//! whatever is appended afterwards is forwarded live, whatever before is in the pages read
//! (or older), and the consumer's sink drops what both delivered.

use crate::clock::now_ms;
use crate::store::hot_tier::{Order, PageQuery};
use crate::store::message::{Message, MessageId};
use crate::store::{GapInfo, GapReason, StoreError};

use super::{Shard, ShardError};

impl Shard {
    /// For a consumer on this shard: registers this shard's interest in `topic` with its
    /// owner, then reads the page `query` names there.
    pub async fn subscribe_read(
        &self,
        topic: &str,
        query: ReplayQuery,
    ) -> Result<ReplayPage, ShardError> {
        let owner = self.owner_of(topic);
        let from = self.id;
        let topic = topic.to_owned();
        Ok(self
            .invoke_on(owner, async move |owner: &Shard| {
                // Interest first, read second, both before the first await: a message
                // appended in between is both forwarded and (maybe) in the page, and the
                // consumer drops the duplicate; none is missed. The owner's own consumers are
                // in its local registry already: it registers no interest with itself.
                if owner.id != from {
                    owner.delivery.set_interest(&topic, from, true);
                }
                replay_page(owner, &topic, query).await
            })
            .await??)
    }
}

/// A consumer's catch-up read (see [`Shard::subscribe_read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayQuery {
    /// Ascending after this id; `None` = from the oldest.
    pub after: Option<MessageId>,
    /// At most this many messages; 0 only registers.
    pub limit: usize,
    /// At most about this many bytes (a single larger message still comes, alone).
    pub max_bytes: usize,
    /// Also report whether messages after `after` were already removed.
    pub check_gap: bool,
    /// The owner must know where the topic is before it answers (`ReplayPage::last_id`: every
    /// later message reaches the consumer live). With Valkey it may have to ask the stream
    /// (another relay may write it), and a failure is then an error. Without it a
    /// registration answers from memory at once and the position is learnt in the background
    /// (for a follow that catches up: its pages locate).
    pub locate: bool,
}

impl ReplayQuery {
    /// Registers interest, reads nothing, answers at once (a follow that catches up next).
    pub fn register_only() -> ReplayQuery {
        ReplayQuery {
            after: None,
            limit: 0,
            max_bytes: 0,
            check_gap: false,
            locate: false,
        }
    }

    /// Registers interest and learns where the topic is, reads nothing (a follow from now).
    pub fn register_and_locate() -> ReplayQuery {
        ReplayQuery {
            locate: true,
            ..ReplayQuery::register_only()
        }
    }
}

/// One page of history for a consumer catching up.
#[derive(Debug, Clone, Default)]
pub struct ReplayPage {
    pub messages: Vec<Message>,
    /// More messages follow the page.
    pub more: bool,
    /// Set when messages after the requested id were already removed.
    pub gap: Option<crate::store::GapInfo>,
    /// The topic's last id as the owner knew it when the interest was registered (read in the
    /// same step, before any await): every message after it reaches the consumer live. `None`
    /// when the owner's memory does not know the topic (never written, deleted, or a Valkey
    /// topic not written since start).
    pub last_id: Option<MessageId>,
}

/// Reads a page of history for a consumer catching up (owner side).
async fn replay_page(
    shard: &Shard,
    topic: &str,
    query: ReplayQuery,
) -> Result<ReplayPage, StoreError> {
    // The caller registered the interest just now, so everything the feed hands out after
    // this id is forwarded to the consumer (memory backend: read before any await).
    let last_id = shard.storage.follow_position(topic, query.locate).await?;
    let page = if query.limit == 0 {
        None
    } else {
        let mut page_query = PageQuery::new(query.after, Order::Asc, query.limit);
        page_query.max_bytes = query.max_bytes;
        page_query.stop_at_expired = true;
        shard
            .storage
            .read_nonempty(topic, &page_query, now_ms())
            .await?
    };
    // Asked after the read, never before: a removal that lands between the two (another
    // publish's `MAXLEN` trim, the write-behind catching up, a sweep) may have taken messages
    // after `after` that the read then skipped, and only a check that comes later sees it.
    // (Removals after the read make the verdict conservative: a gap where none was missed.)
    let mut gap = match (query.check_gap, query.after) {
        (true, Some(after)) => shard.storage.gap_after(topic, after).await?,
        _ => None,
    };
    if let (Some(page), true) = (&page, query.check_gap && query.after.is_some()) {
        if let Some(reason) = page.removed_before.filter(|_| gap.is_none()) {
            gap = Some(GapInfo {
                oldest_available: None,
                reason,
            });
        }
        if page.expired_before && gap.is_none() {
            // Expired messages after the position were skipped, not yet swept: a gap all the
            // same (reads never return an expired message).
            gap = Some(GapInfo {
                oldest_available: None,
                reason: GapReason::Expired,
            });
        }
        if let Some(gap) = &mut gap {
            // What the consumer gets next is the page's first message: entries before it
            // that storage still holds are expired.
            gap.oldest_available = page.messages.first().map(|m| m.id);
        }
    }
    tracing::debug!(
        topic,
        after = ?query.after,
        first = ?page.as_ref().and_then(|p| p.messages.first()).map(|m| m.id),
        last = ?page.as_ref().and_then(|p| p.messages.last()).map(|m| m.id),
        more = page.as_ref().is_some_and(|p| p.next_cursor.is_some()),
        gap = ?gap,
        "replay page"
    );
    Ok(match page {
        Some(page) => ReplayPage {
            more: page.next_cursor.is_some(),
            messages: page.messages,
            gap,
            last_id,
        },
        None => ReplayPage {
            messages: Vec::new(),
            more: false,
            gap,
            last_id,
        },
    })
}
