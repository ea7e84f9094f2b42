//! Server-Sent Events: `GET /api/v1/topics/{topic}/events` and `GET /api/v1/events?topics=a,b`.
//!
//! A `text/event-stream` response that stays open: each message is an event whose `id:` is
//! the message id and whose `data:` is the message JSON, so a browser's `EventSource` resumes
//! by itself (it sends the last `id:` back as `Last-Event-ID` when it reconnects). `?since=`
//! does the same for clients that choose their own start. A comment line every
//! `sse.heartbeat_interval` keeps proxies from timing the stream out and finds dead clients
//! (the write fails). A consumer that falls `sse.max_queued_bytes` behind is disconnected and
//! resumes from its last id. The response is close-delimited (no Content-Length, no chunked
//! framing): the stream ends when the connection does.

use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use futures::future::{join, select, Either};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::sink::{Delivered, SinkState};
use super::{follow, record_delivered, unfollow_all, Gap, OnDrop, StartAt};
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::metrics::Egress;
use crate::shard::Shard;
use crate::store::message::MessageId;

/// A validated event-stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseRequest {
    pub topics: Vec<String>,
    pub start: StartAt,
}

/// Builds the stream request from the path's topic (if any), `?topics=`, and the resume point:
/// the `Last-Event-ID` header (what `EventSource` sends on reconnect) or `?since=`.
pub fn parse(
    request: &Request,
    path_topic: Option<String>,
    max_topics: usize,
    max_topic_len: usize,
) -> Result<SseRequest, ApiError> {
    let mut topics: Vec<String> = path_topic.into_iter().collect();
    let mut since = None;
    for (key, value) in crate::http::router::query_pairs(request.query()) {
        match &*key {
            "topics" | "topic" => crate::http::router::split_topics(&value, &mut topics),
            "since" if !value.is_empty() => since = Some(value.into_owned()),
            _ => {}
        }
    }
    if let Some(header) = request.header("last-event-id") {
        let header = std::str::from_utf8(header)
            .map_err(|_| ApiError::invalid_cursor("Last-Event-ID must be a message id"))?;
        if !header.trim().is_empty() {
            since = Some(header.trim().to_owned());
        }
    }
    topics.dedup();
    if topics.is_empty() || topics.len() > max_topics {
        return Err(ApiError::invalid_request(format!(
            "name 1 to {max_topics} topics"
        )));
    }
    for topic in &topics {
        crate::topic::validate(topic, max_topic_len)?;
    }
    let start = match since {
        None => StartAt::Last,
        Some(id) => StartAt::After(id.parse::<MessageId>().map_err(|_| {
            ApiError::invalid_cursor(
                "`since` / Last-Event-ID must be a message id such as 1700000000000-0",
            )
        })?),
    };
    Ok(SseRequest { topics, start })
}

/// Messages written per batch: bounds one write's size while a backlog drains.
const WRITE_BATCH: usize = 256;

/// Streams events until the client goes away, falls too far behind, or the shard shuts down.
pub async fn run(shard: &Shard, mut stream: TcpStream, request: SseRequest) {
    let config = &shard.config.sse;
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nServer: pulsar-relay\r\nDate: ");
    shard.with_date(|date| head.extend_from_slice(date.header_value()));
    head.extend_from_slice(b"\r\nConnection: close\r\n\r\nretry: 2000\n\n");
    if stream.write_all(&head).await.is_err() {
        return;
    }
    shard.metrics.event_stream_opened(1);
    let _open = OnDrop(|| shard.metrics.event_stream_opened(-1));
    let sink = shard.delivery.new_sink(config.max_queued_bytes);
    let followers = async {
        for topic in &request.topics {
            let name: Arc<str> = Arc::from(topic.as_str());
            let mut on_gap = |gap: Gap| {
                let mut event = BytesMut::new();
                write_gap(&mut event, &gap);
                sink.push_control(event.freeze());
            };
            if let Err(e) = follow(shard, &sink, name, request.start, &mut on_gap).await {
                tracing::debug!(error = %e, "event stream could not follow its topics");
                sink.close();
                return;
            }
        }
    };
    let writer = async {
        let mut out = BytesMut::with_capacity(4096);
        let mut batch: Vec<Rc<Delivered>> = Vec::with_capacity(WRITE_BATCH);
        loop {
            sink.take_control(&mut out);
            batch.clear();
            sink.take(&mut batch, WRITE_BATCH);
            if !batch.is_empty() {
                record_delivered(shard, Egress::Sse, &batch);
            }
            for d in &batch {
                out.extend_from_slice(d.sse_event());
            }
            if !out.is_empty() {
                if super::write_or_give_up(&mut stream, &out, &sink)
                    .await
                    .is_err()
                {
                    // Cut off while its write was blocked: a slow consumer too.
                    if sink.state() == SinkState::Overflowed {
                        shard.metrics.slow_consumer_disconnect();
                    }
                    return;
                }
                out.clear();
                continue;
            }
            if sink.state() != SinkState::Open {
                if sink.state() == SinkState::Overflowed {
                    shard.metrics.slow_consumer_disconnect();
                }
                return;
            }
            let ready = Box::pin(sink.ready());
            let heartbeat = Box::pin(glommio::timer::sleep(config.heartbeat_interval));
            let idle = select(ready, heartbeat);
            match select(idle, Box::pin(shard.shutdown.wait())).await {
                Either::Left((Either::Left(_), _)) => {}
                Either::Left((Either::Right(_), _)) => out.extend_from_slice(b": ping\n\n"),
                Either::Right(_) => return,
            }
        }
    };
    join(followers, async {
        writer.await;
        // The client is gone or cut off: stop the followers' flow control from waiting.
        sink.close();
    })
    .await;
    unfollow_all(shard, &sink);
    let _ = stream.close().await;
}

fn write_gap(out: &mut BytesMut, gap: &Gap) {
    let mut data = Vec::with_capacity(96);
    gap.write_json(&mut data);
    out.extend_from_slice(b"event: gap\ndata: ");
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\n\n");
}
