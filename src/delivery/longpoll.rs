//! Long-poll delivery: what one poll request gets (`POST /messages/poll`, `GET /api/v1/poll`;
//! their HTTP parsing and JSON answers are in `crate::http::handlers::poll`).
//!
//! A poll returns at once with whatever is retained after the consumer's position, oldest
//! first; with nothing there it parks until a message arrives or its timeout passes. The
//! Python relay read, then started waiting, and lost a message published in between; here the
//! request registers as a consumer of its topics *before* it reads, so such a message is
//! queued for it while it reads and wakes it at once.
//!
//! A parked request whose client disconnects is dropped by the connection loop, which
//! detaches it (its `Parked` guard) at once.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{select, Either};

use super::sink::{Delivered, Sink};
use super::{unfollow_all, Gap, StartAt};
use crate::shard::{ReplayQuery, Shard, ShardError};
use crate::store::message::MessageId;

/// A validated poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    /// Each topic with where to start reading it.
    pub topics: Vec<(String, StartAt)>,
    pub timeout: Duration,
    pub limit: usize,
}

impl PollRequest {
    /// The same poll on the principal's stored topic names (its namespace).
    /// Refused when `read` is not granted on one of them.
    pub fn in_namespace_of(
        mut self,
        principal: &crate::auth::Principal,
    ) -> Result<PollRequest, crate::auth::AuthError> {
        for (topic, _) in &mut self.topics {
            *topic = principal.into_topic(crate::auth::Permission::Read, std::mem::take(topic))?;
        }
        Ok(self)
    }
}

/// Why a poll could not be answered with messages or a timeout.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The shard already parks `longpoll.max_parked_per_shard` polls: 503.
    #[error("too many parked poll requests on this shard")]
    TooManyParked,
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// What a poll gets.
pub struct PollAnswer {
    /// Oldest first across topics, at most `limit`.
    pub messages: Vec<Rc<Delivered>>,
    /// Found but cut by `limit` (for `next_offset`, never delivered).
    pub left_out: Vec<Rc<Delivered>>,
    pub has_more: bool,
    /// Every requested topic's standing, in request order (for `next_offset`).
    pub standing: Vec<Standing>,
    pub gaps: Vec<Gap>,
    /// Nothing arrived before the timeout (or shutdown).
    pub timed_out: bool,
}
/// Detaches a poll's sink however the request ends (answered, timed out, client gone).
struct Parked<'a> {
    shard: &'a Shard,
    sink: Rc<Sink>,
    counted: bool,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        unfollow_all(self.shard, &self.sink);
        if self.counted {
            self.shard.delivery.unpark();
        }
    }
}

/// The queue bound of a poll's sink: it is answered at the first message, so this only
/// needs to hold one burst.
const POLL_QUEUE_BYTES: usize = 8 << 20;

/// Bytes one history read of a poll asks for: an answer's memory is bounded by bytes, not by
/// `limit` times the largest payload (a single larger message still comes, alone).
const POLL_PAGE_BYTES: usize = 4 << 20;

/// Answers a poll: what is retained after each topic's start, else the first live message, else
/// (after the timeout) nothing. Either way `next_offset` names every requested topic: its last
/// delivered id; else its `since`; else its last id when the poll started (read from "now",
/// or found empty); else `0-0`. So polling again with `since = next_offset` neither repeats
/// nor skips.
pub async fn poll(shard: &Shard, request: PollRequest) -> Result<PollAnswer, PollError> {
    let sink = shard.delivery.new_sink(POLL_QUEUE_BYTES);
    let mut guard = Parked {
        shard,
        sink: sink.clone(),
        counted: false,
    };
    let mut found: Vec<Rc<Delivered>> = Vec::new();
    let mut gaps: Vec<Gap> = Vec::new();
    let mut has_more = false;
    let mut standing: Vec<Standing> = Vec::with_capacity(request.topics.len());
    for (topic, start) in &request.topics {
        let name: Arc<str> = Arc::from(topic.as_str());
        // Registered before the reads below; live messages are held back until the topic
        // is placed (read to its end, or its position "now" known), then only newer ones
        // are kept.
        let generation = sink.follow(&name, true);
        shard.delivery.attach(&name, &sink);
        let mut after = match start {
            StartAt::After(id) => {
                sink.seen_up_to(topic, *id);
                Some(*id)
            }
            StartAt::Earliest | StartAt::Last => None,
        };
        // A topic read from "now" is only registered (and its last id learnt).
        let limit = if *start == StartAt::Last {
            0
        } else {
            request.limit
        };
        let mut registered_last = None;
        let mut first = true;
        loop {
            // A resume point older than what is retained is reported (`gaps`), as WebSocket
            // and SSE consumers are told; the answer still carries what is there.
            let page = shard
                .subscribe_read(
                    topic,
                    ReplayQuery {
                        after,
                        limit,
                        max_bytes: POLL_PAGE_BYTES,
                        check_gap: after.is_some(),
                        locate: true,
                    },
                )
                .await?;
            if first {
                registered_last = page.last_id;
                first = false;
            }
            if let (Some(gap), Some(requested)) = (page.gap, after) {
                gaps.push(Gap {
                    topic: name.clone(),
                    requested,
                    oldest_available: gap.oldest_available,
                    reason: gap.reason,
                });
            }
            for message in page.messages {
                sink.seen_up_to(topic, message.id);
                after = Some(message.id);
                found.push(Rc::new(Delivered::new(name.clone(), message)));
            }
            if limit == 0 {
                break;
            }
            if found.len() >= request.limit {
                // A full answer: the rest of this topic (and what arrived live) is for the
                // next poll, from the position this answer reports.
                has_more |= page.more || found.len() > request.limit;
                break;
            }
            if !page.more && sink.finish_replay(topic, generation) {
                break;
            }
        }
        let otherwise = match start {
            StartAt::After(id) => Some(*id),
            // Nothing retained when read: everything after the last id it had is new.
            StartAt::Earliest => registered_last,
            StartAt::Last => {
                let now = super::position_from(shard, topic, registered_last).await?;
                if let Some(now) = now {
                    // Live messages at or before it count as published before this poll.
                    sink.seen_up_to(topic, now);
                }
                // Only registered: nothing to read, the hand-over cannot be refused.
                sink.finish_replay(topic, generation);
                now
            }
        };
        standing.push(Standing {
            topic: name,
            resumed: matches!(start, StartAt::After(_)),
            otherwise,
        });
    }
    if found.is_empty() {
        if !shard
            .delivery
            .try_park(shard.config.longpoll.max_parked_per_shard)
        {
            return Err(PollError::TooManyParked);
        }
        guard.counted = true;
        let ready = Box::pin(sink.ready());
        let timer = Box::pin(glommio::timer::sleep(request.timeout));
        // Shutdown answers a parked poll at once, like its timeout: the client polls again
        // (elsewhere) from the same position, so nothing is lost.
        let stop = Box::pin(shard.shutdown.wait());
        if let Either::Right(_) = select(ready, select(timer, stop)).await {
            return Ok(PollAnswer {
                messages: Vec::new(),
                left_out: Vec::new(),
                has_more: false,
                standing,
                gaps,
                timed_out: true,
            });
        }
    }
    // Whatever arrived live meanwhile (newer than anything read above) goes after it.
    sink.take(&mut found, usize::MAX);
    // Oldest first across topics; per topic the order is already by id.
    found.sort_by_key(|d| d.id());
    let mut left_out: Vec<Rc<Delivered>> = Vec::new();
    if found.len() > request.limit {
        left_out = found.split_off(request.limit);
        has_more = true;
    }
    drop(guard);
    super::record_delivered(shard, crate::metrics::Egress::LongPoll, &found);
    Ok(PollAnswer {
        messages: found,
        left_out,
        has_more,
        standing,
        gaps,
        timed_out: false,
    })
}

/// Where a poll leaves one topic when the answer delivers nothing of it: `next_offset` must
/// still name it, at a point from which polling again misses and repeats nothing.
pub struct Standing {
    pub topic: Arc<str>,
    /// The poll gave an id for it (`since`).
    resumed: bool,
    /// Its `since`; else its last id when the poll registered (a topic read from "now", or
    /// read from its oldest message and found empty); `None`: it had never held a message.
    otherwise: Option<MessageId>,
}

impl Standing {
    /// The topic's `next_offset`: its last delivered id; else, when messages of it were found
    /// but left out by `limit`, the id just before the first of them (unless the poll gave an
    /// id, which is no later); else its `otherwise`; else `0-0` (before every id).
    pub fn next_offset(
        &self,
        delivered: Option<MessageId>,
        first_left_out: Option<MessageId>,
    ) -> MessageId {
        if let Some(id) = delivered {
            return id;
        }
        match (first_left_out, self.otherwise) {
            (Some(first), otherwise) if !self.resumed => {
                let before = just_before(first);
                otherwise.map_or(before, |o| o.min(before))
            }
            (_, otherwise) => otherwise.unwrap_or(MessageId::MIN),
        }
    }
}

/// The greatest id below `id` (resuming after it starts exactly at `id`).
fn just_before(id: MessageId) -> MessageId {
    match (id.ms, id.seq) {
        (ms, 0) if ms > 0 => MessageId::new(ms - 1, u64::MAX),
        (ms, seq) => MessageId::new(ms, seq.saturating_sub(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> MessageId {
        MessageId::new(ms, seq)
    }

    #[test]
    fn just_before_is_the_greatest_smaller_id() {
        assert_eq!(just_before(id(5, 3)), id(5, 2));
        assert_eq!(just_before(id(5, 0)), id(4, u64::MAX));
        assert_eq!(just_before(MessageId::MIN), MessageId::MIN);
        assert_eq!(just_before(id(0, 1)), MessageId::MIN);
    }

    #[test]
    fn next_offset_never_passes_an_undelivered_message() {
        let standing = |resumed, otherwise| Standing {
            topic: Arc::from("t"),
            resumed,
            otherwise,
        };
        // Delivered wins.
        assert_eq!(
            standing(true, Some(id(1, 0))).next_offset(Some(id(9, 0)), Some(id(10, 0))),
            id(9, 0)
        );
        // Resumed: its `since`, even with messages left out by the limit.
        assert_eq!(
            standing(true, Some(id(1, 0))).next_offset(None, Some(id(10, 0))),
            id(1, 0)
        );
        // Read from the oldest (or now), messages left out: just before the first of them.
        assert_eq!(
            standing(false, Some(id(20, 0))).next_offset(None, Some(id(10, 0))),
            id(9, u64::MAX)
        );
        assert_eq!(
            standing(false, None).next_offset(None, Some(id(10, 4))),
            id(10, 3)
        );
        // From now, a live message left out after its position: the position.
        assert_eq!(
            standing(false, Some(id(7, 0))).next_offset(None, Some(id(10, 0))),
            id(7, 0)
        );
        // Nothing of it at all.
        assert_eq!(
            standing(false, Some(id(7, 0))).next_offset(None, None),
            id(7, 0)
        );
        assert_eq!(
            standing(false, None).next_offset(None, None),
            MessageId::MIN
        );
    }
}
