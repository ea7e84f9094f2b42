//! The one writer loop of every streaming transport (WebSocket sessions, SSE streams).
//!
//! It drains a consumer's [`Sink`] onto its socket: the control frames first, then up to
//! [`WRITE_BATCH`] queued messages, framed by the transport and written with one write; it
//! sleeps until the sink has something or the transport's keep-alive is due, and ends the
//! stream when the sink stops (the consumer went away, fell behind, or the shard shuts down),
//! with the transport's last words (a WebSocket close frame; nothing for SSE).
//!
//! Owns: batching, delivery metrics, the slow-consumer cut-off on the wire, waking and
//! shutdown. Does not own: what goes on the wire (the [`Framing`] of each transport) nor
//! reading from the client (the transport's own reader, if any).

use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use futures::future::{select, Either};

use super::sink::{Delivered, Sink, SinkState};
use super::{record_delivered, write_or_give_up};
use crate::metrics::Egress;
use crate::shard::Shard;

/// Messages written per batch: one write for up to this many, so a burst costs few syscalls
/// while one batch never holds a socket for long.
pub const WRITE_BATCH: usize = 256;

/// The most output buffer a stream keeps while it waits for something to send: 10,000s of
/// idle consumers must not each pin the buffer of their last burst.
const IDLE_OUT_CAP: usize = 4 << 10;

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The sink was closed: the consumer went away, or its transport decided to end it.
    Closed,
    /// The consumer fell more than its queue bound behind.
    SlowConsumer,
    /// The shard is shutting down.
    Shutdown,
    /// Messages were removed from storage before this relay could pass them on: the consumer
    /// resumes from its last id, and the resume reports the gap.
    Resync,
}

/// What the loop does while nothing is queued.
pub enum Idle {
    /// Wait until this instant at the latest (then ask again).
    Until(Instant),
    /// End the stream (e.g. the client was silent past its idle timeout).
    End,
}

/// What a transport puts on the wire.
pub trait Framing {
    /// Which transport this is, for the delivery metrics.
    const EGRESS: Egress;

    /// Appends the wire form of one message.
    fn message(&mut self, delivered: &Delivered, out: &mut BytesMut);

    /// Nothing is queued at `now`: append a keep-alive if one is due, and say how long to
    /// wait (or to end the stream).
    fn idle(&mut self, now: Instant, out: &mut BytesMut) -> Idle;

    /// Appends the stream's last bytes before it ends for `why`.
    fn end(&mut self, why: Ending, out: &mut BytesMut);
}

/// Writes what `sink` queues to `socket` until the stream ends; returns why. The sink is
/// closed when this returns (so the transport's catch-ups and reader stop too).
pub async fn run<W, F>(shard: &Shard, sink: &Rc<Sink>, socket: &mut W, framing: &mut F) -> Ending
where
    W: futures::AsyncWrite + Unpin,
    F: Framing,
{
    // Both start empty and grow with the first delivery: most streams are idle most of the
    // time.
    let mut out = BytesMut::new();
    let mut batch: Vec<Rc<Delivered>> = Vec::new();
    let mut shutting_down = false;
    loop {
        sink.take_control(&mut out);
        batch.clear();
        sink.take(&mut batch, WRITE_BATCH);
        if !batch.is_empty() {
            record_delivered(shard, F::EGRESS, &batch);
        }
        for d in &batch {
            framing.message(d, &mut out);
        }
        let state = sink.state();
        // A resync lets what was queued before it go out first.
        let draining = state == SinkState::Resync && sink.has_queued();
        if state != SinkState::Open && !draining {
            let why = match state {
                SinkState::Overflowed => Ending::SlowConsumer,
                SinkState::Resync => Ending::Resync,
                _ if shutting_down => Ending::Shutdown,
                _ => Ending::Closed,
            };
            if why == Ending::SlowConsumer {
                shard.metrics.slow_consumer_disconnect();
                tracing::debug!(shard = shard.id, "closing a slow consumer");
            }
            framing.end(why, &mut out);
            if !out.is_empty() {
                let _ = write_or_give_up(socket, &out, sink).await;
            }
            return why;
        }
        if !out.is_empty() {
            if write_or_give_up(socket, &out, sink).await.is_err() {
                // Cut off while its write was blocked (no last words can reach a client that
                // does not read): still a slow consumer if that is why.
                let why = if sink.state() == SinkState::Overflowed {
                    shard.metrics.slow_consumer_disconnect();
                    Ending::SlowConsumer
                } else {
                    Ending::Closed
                };
                sink.close();
                return why;
            }
            out.clear();
            continue;
        }
        let wake_at = match framing.idle(Instant::now(), &mut out) {
            Idle::End => {
                sink.close();
                continue;
            }
            Idle::Until(at) => at,
        };
        if !out.is_empty() {
            continue;
        }
        if out.capacity() > IDLE_OUT_CAP {
            out = BytesMut::new();
        }
        if batch.capacity() > WRITE_BATCH {
            batch = Vec::new();
        }
        let ready = std::pin::pin!(sink.ready());
        let timer = std::pin::pin!(glommio::timer::sleep(
            wake_at.saturating_duration_since(Instant::now())
        ));
        let stop = std::pin::pin!(shard.shutdown.wait());
        if let Either::Right(_) = select(select(ready, timer), stop).await {
            shutting_down = true;
            sink.close();
        }
    }
}
