//! Real-time delivery: WebSocket sessions, long-poll requests and Server-Sent Event streams.
//!
//! Every consumer, whatever its transport, is a [`sink::Sink`] registered in its shard's
//! [`registry::Registry`] for the topics it follows. The owning shard of a topic offers each
//! acknowledged message to its own consumers and forwards one copy to every other shard with
//! consumers of the topic (see `registry`), so a message crosses a shard boundary at most once
//! per shard, and each wire encoding is made once per shard and shared by its sockets.
//!
//! Resume is gap-free: [`follow`] attaches the sink (live messages are held back), registers
//! with the owner, replays history after the consumer's offset page by page (hot tier, then
//! Valkey for older ranges), then releases the held-back live messages newer than the last
//! replayed one. An offset older than what is retained yields a gap signal first.
//!
//! - [`group`]: consumer-group consumers (work queues): the loop that takes a consumer's
//!   messages from its group within its `max_in_flight`, and its wake-up.
//! - [`sink`]: a consumer's bounded queue, per-topic cursors, shared encodings.
//! - [`registry`]: consumers per topic, interest of other shards, parked long-poll count.
//! - [`longpoll`]: what one poll request gets (parked until a message or its timeout).
//! - [`writer`]: the one writer loop of the streaming transports (WebSocket, SSE).

pub mod group;
pub mod longpoll;
pub mod registry;
pub mod sink;
pub mod writer;

use std::rc::Rc;
use std::sync::Arc;

use crate::shard::{ReplayQuery, Shard, ShardError};
use crate::store::hot_tier::{Order, PageQuery};
use crate::store::message::MessageId;
use crate::store::BackendKind;
use crate::store::GapReason;
use sink::{Delivered, Sink};

/// Messages per replay round trip: large enough that catching up on a long backlog is few
/// round trips, small enough that one page never dominates a consumer's queue bound.
const REPLAY_PAGE: usize = 500;

/// Where a consumer starts reading a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Only messages published from now on.
    Last,
    /// Every retained message.
    Earliest,
    /// Every message after this id (exclusive).
    After(MessageId),
}

/// A gap: messages after `requested` and before `oldest_available` were removed before the
/// consumer could read them (for `reason`); delivery continues from `oldest_available`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub topic: Arc<str>,
    pub requested: MessageId,
    pub oldest_available: Option<MessageId>,
    pub reason: GapReason,
}

impl Gap {
    /// `{"type":"gap","topic":"..","requested":"..","oldest_available":".."|null,"reason":".."}`:
    /// the one form every transport sends (a WebSocket frame, an SSE `gap` event, a long-poll
    /// answer's `gaps` entry). Missing: every message after `requested` and before
    /// `oldest_available`; `null` = nothing is retained after `requested` any more.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Topic names are `[A-Za-z0-9._-]` (crate::topic), so they need no escaping.
        out.extend_from_slice(b"{\"type\":\"gap\",\"topic\":\"");
        out.extend_from_slice(crate::topic::public_name(&self.topic).as_bytes());
        out.extend_from_slice(b"\",\"requested\":\"");
        self.requested.write_to(out);
        out.extend_from_slice(b"\",\"oldest_available\":");
        match self.oldest_available {
            Some(id) => {
                out.push(b'"');
                id.write_to(out);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"reason\":\"");
        out.extend_from_slice(self.reason.as_str().as_bytes());
        out.extend_from_slice(b"\"}");
    }
}

/// Makes `sink` a consumer of `topic` from `start`: [`register`], then [`catch_up`].
pub async fn follow(
    shard: &Shard,
    sink: &Rc<Sink>,
    topic: Arc<str>,
    start: StartAt,
    on_gap: &mut dyn FnMut(Gap),
) -> Result<(), ShardError> {
    let generation = register(shard, sink, &topic, start).await?;
    catch_up(shard, sink, topic, start, generation, on_gap).await
}

/// Attaches `sink` to `topic` and registers with the owner; from its return on, every
/// message appended to the topic reaches the sink (held back while a replay is pending).
/// Returns the follow's generation, for [`catch_up`].
pub async fn register(
    shard: &Shard,
    sink: &Rc<Sink>,
    topic: &Arc<str>,
    start: StartAt,
) -> Result<u64, ShardError> {
    let generation = sink.follow(topic, start != StartAt::Last);
    if let StartAt::After(id) = start {
        sink.seen_up_to(topic, id);
    }
    shard.delivery.attach(topic, sink);
    // A follow from now has no catch-up to place it: the owner must know where the topic is
    // before anything counts as "published after the registration".
    let query = if start == StartAt::Last {
        ReplayQuery::register_and_locate()
    } else {
        ReplayQuery::register_only()
    };
    shard.subscribe_read(topic, query).await?;
    Ok(generation)
}

/// After [`register`]: replays history after the start, then hands over to live delivery
/// with no gap and no repeat (live messages that arrived meanwhile are released after the
/// last replayed one).
///
/// Pull, not push: each page is read only when the sink has room, and asks for no more bytes
/// than that room, so the consumer's one bound holds whatever the message sizes. It stops
/// (without error) as soon as the follow `generation` is no longer current: an unsubscribe,
/// a newer subscribe of the topic, a disconnect or an overflow. A gap found before any page
/// (messages after the start were removed) or between pages (removed while the consumer was
/// catching up) is reported through `on_gap` before the messages after it are queued.
pub async fn catch_up(
    shard: &Shard,
    sink: &Rc<Sink>,
    topic: Arc<str>,
    start: StartAt,
    generation: u64,
    on_gap: &mut dyn FnMut(Gap),
) -> Result<(), ShardError> {
    let mut after = match start {
        StartAt::Last => return Ok(()),
        StartAt::Earliest => None,
        StartAt::After(id) => Some(id),
    };
    loop {
        let Some(room) = sink.wait_room(&topic, generation).await else {
            return Ok(());
        };
        let page = shard
            .subscribe_read(
                &topic,
                ReplayQuery {
                    after,
                    limit: REPLAY_PAGE,
                    max_bytes: room,
                    check_gap: after.is_some(),
                    locate: true,
                },
            )
            .await?;
        if !sink.is_current(&topic, generation) {
            return Ok(());
        }
        if let (Some(gap), Some(requested)) = (page.gap, after) {
            on_gap(Gap {
                topic: topic.clone(),
                requested,
                oldest_available: gap.oldest_available,
                reason: gap.reason,
            });
        }
        for message in page.messages {
            after = Some(message.id);
            if !sink.push_replayed(generation, Rc::new(Delivered::new(topic.clone(), message))) {
                return Ok(());
            }
        }
        if !page.more && sink.finish_replay(&topic, generation) {
            return Ok(());
        }
    }
}

/// The position of `topic` "now", for a consumer that registered its interest just before:
/// every message after the returned id reaches it live. The owner answers in the registering
/// step, from memory or (a Valkey topic it does not follow yet) from the stream's newest
/// entry. The consumer must then ignore live messages at or before the answer
/// ([`Sink::seen_up_to`](sink::Sink::seen_up_to)): those count as published before it came.
/// `None`: the topic holds nothing.
pub async fn position_now(shard: &Shard, topic: &str) -> Result<Option<MessageId>, ShardError> {
    let page = shard
        .subscribe_read(topic, crate::shard::ReplayQuery::register_and_locate())
        .await?;
    position_from(shard, topic, page.last_id).await
}

/// [`position_now`] given the owner's answer to a registration (`ReplayPage::last_id`).
pub async fn position_from(
    shard: &Shard,
    topic: &str,
    owner_knows: Option<MessageId>,
) -> Result<Option<MessageId>, ShardError> {
    if owner_knows.is_some() || shard.storage.backend() == BackendKind::Memory {
        return Ok(owner_knows);
    }
    let newest = shard
        .read(topic.to_owned(), PageQuery::new(None, Order::Desc, 1))
        .await?;
    Ok(newest.and_then(|page| page.messages.first().map(|m| m.id)))
}

/// Counts deliveries about to be written and, for live ones, their lag since the owner
/// acknowledged them.
pub fn record_delivered(shard: &Shard, egress: crate::metrics::Egress, batch: &[Rc<Delivered>]) {
    shard.metrics.delivered(egress, batch.len() as u64);
    let now = std::time::Instant::now();
    let per_topic = shard.metrics.per_topic_enabled();
    for d in batch {
        if per_topic {
            shard.metrics.per_topic(&d.topic, 1, 1);
        }
        if let Some(acked) = d.acked_at {
            shard
                .metrics
                .delivery_lag(now.saturating_duration_since(acked));
        }
    }
}

/// How long a write blocked on a consumer that stopped reading may still take once the
/// consumer has been cut off (overflow, idle, shutdown): enough for a slow reader to take the
/// rest of a batch and then see the close frame; after it the connection is dropped, so a
/// client that never reads cannot hold a connection (and its task) forever.
pub const WRITE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes `bytes` unless the consumer was cut off and the write then stays blocked for
/// [`WRITE_GRACE`]. `Err` means the connection must be dropped without another frame (a
/// partial frame may be on the wire).
pub async fn write_or_give_up<W: futures::AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    sink: &Sink,
) -> Result<(), ()> {
    use futures::AsyncWriteExt;
    sink.set_writing(true);
    let write = Box::pin(writer.write_all(bytes));
    let give_up = Box::pin(async {
        sink.stopped().await;
        glommio::timer::sleep(WRITE_GRACE).await;
    });
    let result = match futures::future::select(write, give_up).await {
        futures::future::Either::Left((Ok(()), _)) => Ok(()),
        _ => Err(()),
    };
    sink.set_writing(false);
    result
}

/// Runs a closure when dropped (gauges that must go down however a session ends).
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Stops `sink` following `topic`; the owner stops forwarding when no consumer is left here.
pub fn unfollow(shard: &Shard, sink: &Sink, topic: &str) {
    sink.unfollow(topic);
    if shard.delivery.detach(topic, sink.id) {
        shard.withdraw_interest(topic);
    }
}

/// Stops `sink` following everything (the consumer went away).
pub fn unfollow_all(shard: &Shard, sink: &Sink) {
    for topic in sink.topics() {
        unfollow(shard, sink, &topic);
    }
    sink.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap_json(oldest_available: Option<MessageId>) -> String {
        let gap = Gap {
            topic: Arc::from("orders"),
            requested: MessageId::new(1, 0),
            oldest_available,
            reason: GapReason::Trimmed,
        };
        let mut out = Vec::new();
        gap.write_json(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn a_gap_names_the_oldest_retained_message_or_null() {
        assert_eq!(
            gap_json(Some(MessageId::new(5, 2))),
            r#"{"type":"gap","topic":"orders","requested":"1-0","oldest_available":"5-2","reason":"trimmed"}"#
        );
        assert_eq!(
            gap_json(None),
            r#"{"type":"gap","topic":"orders","requested":"1-0","oldest_available":null,"reason":"trimmed"}"#
        );
    }
}
