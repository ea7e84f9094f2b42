//! Server-Sent Event streams: the socket side of `GET /api/v1/topics/{topic}/events` and
//! `GET /api/v1/events?topics=` (framing and positions in [`crate::sse`]).
//!
//! Every topic is registered with its owner *before* the response head is written, so a
//! client that has seen the head misses nothing published after it, also on topics followed
//! from "now". Then the topics' catch-ups run (one after the other) while the shared writer
//! loop ([`crate::delivery::writer`]) writes events, a heartbeat comment every
//! `sse.heartbeat_interval` while idle, and ends the stream when the client goes away, falls
//! `sse.max_queued_bytes` behind, or the shard shuts down.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures::future::{join, select, Either};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::auth::{Principal, StreamEnd};
use crate::delivery::sink::Delivered;
use crate::delivery::writer::{self, Ending, Framing, Idle};
use crate::delivery::{catch_up, position_now, register, unfollow_all, Gap, OnDrop, StartAt};
use crate::http::guard::Cors;
use crate::metrics::Egress;
use crate::shard::Shard;
use crate::sse::{without_id_line, write_gap, Positions, SseRequest};

/// A stream's wire form for the shared writer loop.
struct SseFraming<'a> {
    /// A multi-topic stream's positions (its event ids); `None`: plain message ids.
    positions: Option<&'a RefCell<Positions>>,
    heartbeat: std::time::Duration,
    next_heartbeat: Instant,
}

impl Framing for SseFraming<'_> {
    const EGRESS: Egress = Egress::Sse;

    fn message(&mut self, delivered: &Delivered, out: &mut BytesMut) {
        match self.positions {
            None => out.extend_from_slice(delivered.sse_event()),
            Some(positions) => {
                let mut positions = positions.borrow_mut();
                positions.advance(&delivered.topic, delivered.id());
                positions.write_id_line(out);
                out.extend_from_slice(without_id_line(delivered.sse_event()));
            }
        }
        self.next_heartbeat = Instant::now() + self.heartbeat;
    }

    fn idle(&mut self, now: Instant, out: &mut BytesMut) -> Idle {
        if now >= self.next_heartbeat {
            out.extend_from_slice(b": ping\n\n");
            self.next_heartbeat = now + self.heartbeat;
        }
        Idle::Until(self.next_heartbeat)
    }

    fn end(&mut self, _why: Ending, _out: &mut BytesMut) {}
}

/// Streams events until the client goes away, falls too far behind, or the shard shuts down.
/// `cors` goes into the response head (an `EventSource` on another allowed origin needs it).
pub async fn run(shard: &Shard, mut stream: TcpStream, request: SseRequest, cors: &Cors) {
    let config = &shard.config.sse;
    let sink = shard.delivery.new_sink(config.max_queued_bytes);
    // Shared by the catch-ups (a gap event names the stream's position) and the writer
    // (which moves it as it writes); `None` on a single-topic stream, whose ids are plain.
    let positions = request
        .per_topic_ids()
        .then(|| RefCell::new(Positions::new(&request)));
    let mut follows = Vec::with_capacity(request.topics.len());
    for (topic, start) in &request.topics {
        let name: Arc<str> = Arc::from(topic.as_str());
        let generation = match register(shard, &sink, &name, *start).await {
            Ok(generation) => generation,
            Err(e) => {
                tracing::debug!(error = %e, "event stream could not follow its topics");
                unfollow_all(shard, &sink);
                return;
            }
        };
        if let (Some(positions), StartAt::Last) = (&positions, start) {
            // A topic followed from now gets a position at once: a resume must not read it
            // from its oldest message, nor miss what is published to it meanwhile.
            match position_now(shard, topic).await {
                Ok(Some(now)) => {
                    sink.seen_up_to(topic, now);
                    positions.borrow_mut().advance(topic, now);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "event stream could not place a topic");
                    unfollow_all(shard, &sink);
                    return;
                }
            }
        }
        follows.push((name, *start, generation));
    }
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nServer: pulsar-relay\r\nDate: ");
    shard.with_date(|date| head.extend_from_slice(date.header_value()));
    head.extend_from_slice(b"\r\n");
    for (name, value) in cors.response_headers() {
        // The value is an `Origin` header as received: visible ASCII (checked by the guard).
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\nretry: 2000\n\n");
    if stream.write_all(&head).await.is_err() {
        unfollow_all(shard, &sink);
        return;
    }
    shard.metrics.event_stream_opened(1);
    let _open = OnDrop(|| shard.metrics.event_stream_opened(-1));
    let catch_ups = async {
        for (topic, start, generation) in follows {
            let mut on_gap = |gap: Gap| {
                let mut event = BytesMut::new();
                if let Some(positions) = &positions {
                    // Gap events are the only control events of a stream, written before
                    // anything queued after them: the position now is the one they follow.
                    positions.borrow().write_id_line(&mut event);
                }
                write_gap(&mut event, &gap);
                sink.push_control(event.freeze());
            };
            if let Err(e) = catch_up(shard, &sink, topic, start, generation, &mut on_gap).await {
                // The client reconnects (EventSource does by itself) from its last event id.
                tracing::debug!(error = %e, "event stream could not replay a topic");
                sink.close();
                return;
            }
        }
    };
    let mut framing = SseFraming {
        positions: positions.as_ref(),
        heartbeat: config.heartbeat_interval,
        next_heartbeat: Instant::now() + config.heartbeat_interval,
    };
    let principal = RefCell::new(request.principal.clone().unwrap_or_else(Principal::open));
    // The writer closes the sink when it ends, which stops the catch-ups too.
    let streaming = join(
        catch_ups,
        writer::run(shard, &sink, &mut stream, &mut framing),
    );
    let ended_by = match select(
        std::pin::pin!(streaming),
        std::pin::pin!(shard.auth.watch(&principal)),
    )
    .await
    {
        Either::Left(_) => None,
        Either::Right((end, streaming)) => {
            // The writer ends after the event it is writing; then the last word.
            sink.close();
            streaming.await;
            Some(end)
        }
    };
    if let Some(end) = ended_by {
        // `EventSource` reconnects by itself; with an expired cookie that reconnect is a 401,
        // which ends it for good: the event says why before that.
        let event = format!(
            "event: error\ndata: {{\"type\":\"error\",\"code\":\"{}\",\"message\":\"{}\"}}\n\n",
            match end {
                StreamEnd::Expired => "TOKEN_EXPIRED",
                StreamEnd::Revoked => "TOKEN_REVOKED",
            },
            end.reason()
        );
        let _ = stream.write_all(event.as_bytes()).await;
    }
    unfollow_all(shard, &sink);
    let _ = stream.close().await;
}
