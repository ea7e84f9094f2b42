//! A consumer's outbound queue: what one WebSocket session, SSE stream or parked long-poll
//! has been handed and not yet written.
//!
//! The registry offers every live message of a subscribed topic to the sink; the sink keeps
//! per-topic order, drops duplicates (a message seen both in a replayed page and live), holds
//! live messages back while the topic's history is being replayed, and counts queued bytes
//! against a bound. Past the bound the sink marks itself overflowed: the consumer is too slow
//! and is cut off (WebSocket close 4008) instead of delaying anyone else or growing memory.
//!
//! "Too slow" means over the bound *while a write to the consumer's socket is pending*, i.e.
//! its socket buffers are full. A burst that lands all at once (a 1000-message bulk publish,
//! a batch forwarded from the owning shard) is not a slow consumer: the queue holds only
//! shared pointers to messages, and a reading consumer drains it at socket speed. A hard cap
//! of [`HARD_CAP_FACTOR`] times the bound still applies, whatever the writer is doing.
//! It never blocks the publisher: `offer` is O(1) and synchronous.
//!
//! History is pulled, not pushed: a catch-up waits for room ([`Sink::wait_room`]) before it
//! reads its next page, and asks for no more bytes than the room left, so one bound covers
//! a consumer's memory whatever the message sizes (a single message larger than the bound is
//! still delivered, alone). Live messages that arrive while a topic's history is replayed wait
//! in that topic's `pending`; past the bound they are dropped and the catch-up reads them from
//! storage instead (they were stored before they were offered), so a long replay under a fast
//! publisher costs bounded memory too. Every follow of a topic has a generation: a catch-up
//! started for an earlier follow (unsubscribed since) can neither queue messages nor end the
//! replay of the current one.

use crate::topic::TopicMap;
use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::store::message::{write_message_json, Message, MessageId};

/// A message as delivered: its topic and, encoded at most once per shard and wire format, the
/// bytes every consumer on this shard shares.
pub struct Delivered {
    pub topic: Arc<str>,
    pub message: Message,
    /// When the owning shard acknowledged it, for live deliveries (the delivery-lag metric);
    /// `None` for replayed history.
    pub acked_at: Option<std::time::Instant>,
    json: OnceCell<Bytes>,
    ws_frame: OnceCell<Bytes>,
    sse_event: OnceCell<Bytes>,
}

impl Delivered {
    pub fn new(topic: Arc<str>, message: Message) -> Delivered {
        Delivered::live(topic, message, None)
    }

    pub fn live(
        topic: Arc<str>,
        message: Message,
        acked_at: Option<std::time::Instant>,
    ) -> Delivered {
        Delivered {
            topic,
            message,
            acked_at,
            json: OnceCell::new(),
            ws_frame: OnceCell::new(),
            sse_event: OnceCell::new(),
        }
    }

    pub fn id(&self) -> MessageId {
        self.message.id
    }

    /// `{"message_id":…,"topic":…,"payload":…,"timestamp":…,"metadata":…}`
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            let mut out = Vec::with_capacity(self.message.payload.len() + 160);
            write_message_json(&mut out, &self.topic, &self.message);
            Bytes::from(out)
        })
    }

    /// One complete WebSocket text frame `{"type":"message",…}`, shared by every socket.
    pub fn ws_frame(&self) -> &Bytes {
        self.ws_frame.get_or_init(|| {
            let json = self.json();
            // The message object without its opening brace continues the frame's object;
            // the frame is assembled from both parts without an intermediate copy.
            crate::ws::codec::text_frame_from_parts(&[
                crate::ws::protocol::MESSAGE_PREFIX,
                json.get(1..).unwrap_or_default(),
            ])
        })
    }

    /// One Server-Sent Event: `id:` the message id, `data:` the message JSON. A payload sent
    /// with newlines inside (JSON whitespace) becomes several `data:` lines, which the client
    /// joins back with `\n`: the JSON stays valid.
    pub fn sse_event(&self) -> &Bytes {
        self.sse_event.get_or_init(|| {
            let json = self.json();
            let mut out = Vec::with_capacity(json.len() + 48);
            out.extend_from_slice(b"id: ");
            self.message.id.write_to(&mut out);
            out.extend_from_slice(b"\nevent: message\n");
            for line in json.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(line);
                out.push(b'\n');
            }
            out.push(b'\n');
            Bytes::from(out)
        })
    }

    /// What the message counts against a consumer's queue bound: the largest of its encodings
    /// is within ~40 bytes of this.
    pub fn queued_size(&self) -> usize {
        self.message.payload.len()
            + self.message.metadata.as_ref().map_or(0, |m| m.len())
            + self.topic.len()
            + 128
    }
}

/// Past this many times the bound, a consumer is cut off even when no write is pending.
pub const HARD_CAP_FACTOR: usize = 8;

/// Per topic: where the consumer is, and what waits while its history is replayed.
#[derive(Default)]
struct Cursor {
    /// Which follow of the topic this is (see the module doc).
    generation: u64,
    /// The newest id handed to the consumer; live messages at or below it are duplicates.
    last: Option<MessageId>,
    /// While true, live messages wait in `pending` (the replay delivers older ones first).
    replaying: bool,
    pending: VecDeque<Rc<Delivered>>,
    /// Live messages were dropped from `pending` (over the bound): the replay must read past
    /// them from storage before it may hand over to live delivery.
    pending_dropped: bool,
}

/// Why a sink stopped taking messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkState {
    Open,
    /// The consumer fell more than the bound behind.
    Overflowed,
    /// The consumer went away or the shard is shutting down.
    Closed,
    /// Messages of a followed topic were removed before this relay could pass them on: the
    /// consumer must resume from its last id, where the resume reports the gap.
    Resync,
}

struct Inner {
    /// Transport-level frames/events (acknowledgements, gap signals, pongs) that go out
    /// before any message queued after them.
    control: VecDeque<Bytes>,
    /// Bytes in `control`. They count against the bound like queued messages: a client that
    /// sends commands (pings) and never reads the replies must not grow them without end.
    control_bytes: usize,
    queue: VecDeque<Rc<Delivered>>,
    /// Bytes in `queue`: what the bound is about.
    queued_bytes: usize,
    /// Bytes in every cursor's `pending`, bounded separately (dropped past the bound, never
    /// an overflow: storage still has them).
    pending_bytes: usize,
    state: SinkState,
    /// A write of this consumer's data to its socket is in progress (and, if an offer
    /// observes it, blocked: offers run only while the writer's task is suspended).
    writing: bool,
    /// The writer, waiting for something to write or for the sink to stop.
    waker: Option<Waker>,
    /// Catch-ups waiting for room in the queue (one per topic being replayed at most).
    room_wakers: Vec<Waker>,
    cursors: TopicMap<Arc<str>, Cursor>,
    /// The generation the next follow gets.
    next_generation: u64,
}

pub struct Sink {
    pub id: u64,
    max_bytes: usize,
    inner: RefCell<Inner>,
}

impl Sink {
    pub fn new(id: u64, max_bytes: usize) -> Rc<Sink> {
        Rc::new(Sink {
            id,
            max_bytes,
            inner: RefCell::new(Inner {
                control: VecDeque::new(),
                control_bytes: 0,
                queue: VecDeque::new(),
                queued_bytes: 0,
                pending_bytes: 0,
                state: SinkState::Open,
                writing: false,
                waker: None,
                room_wakers: Vec::new(),
                cursors: TopicMap::default(),
                next_generation: 1,
            }),
        })
    }

    pub fn state(&self) -> SinkState {
        self.inner.borrow().state
    }

    /// Starts following `topic`: replaying (live messages held back until
    /// [`Sink::finish_replay`]) or live at once. Returns the follow's generation, which the
    /// topic's catch-up passes back with everything it does.
    pub fn follow(&self, topic: &Arc<str>, replaying: bool) -> u64 {
        let mut inner = self.inner.borrow_mut();
        let generation = inner.next_generation;
        inner.next_generation += 1;
        if let Some(old) = inner.cursors.insert(
            topic.clone(),
            Cursor {
                generation,
                last: None,
                replaying,
                pending: VecDeque::new(),
                pending_dropped: false,
            },
        ) {
            inner.pending_bytes -= pending_size(&old);
        }
        Self::wake_room(&mut inner);
        generation
    }

    /// Stops following `topic`: its queued messages are dropped (none is written after the
    /// consumer was told it is unsubscribed), and a catch-up running for it stops at its next
    /// step.
    pub fn unfollow(&self, topic: &str) {
        let mut inner = self.inner.borrow_mut();
        if let Some(cursor) = inner.cursors.remove(topic) {
            inner.pending_bytes -= pending_size(&cursor);
            let mut freed = 0;
            inner.queue.retain(|d| {
                let keep = &*d.topic != topic;
                if !keep {
                    freed += d.queued_size();
                }
                keep
            });
            inner.queued_bytes -= freed;
        }
        Self::wake_room(&mut inner);
    }

    pub fn follows(&self, topic: &str) -> bool {
        self.inner.borrow().cursors.contains_key(topic)
    }

    /// Whether `generation` is still the current follow of `topic` and the sink is open: a
    /// catch-up goes on only while this holds.
    pub fn is_current(&self, topic: &str, generation: u64) -> bool {
        let inner = self.inner.borrow();
        inner.state == SinkState::Open
            && inner
                .cursors
                .get(topic)
                .is_some_and(|c| c.generation == generation)
    }

    pub fn topics(&self) -> Vec<Arc<str>> {
        self.inner.borrow().cursors.keys().cloned().collect()
    }

    /// A live message of a followed topic (from the registry).
    pub fn offer(&self, delivered: &Rc<Delivered>) {
        let mut inner = self.inner.borrow_mut();
        if inner.state != SinkState::Open {
            return;
        }
        let size = delivered.queued_size();
        let max_bytes = self.max_bytes;
        let Inner {
            cursors,
            queue,
            queued_bytes,
            pending_bytes,
            ..
        } = &mut *inner;
        let Some(cursor) = cursors.get_mut(&*delivered.topic) else {
            return;
        };
        if cursor.last.is_some_and(|last| delivered.id() <= last) {
            return;
        }
        if cursor.replaying {
            if cursor.pending_dropped {
                // The catch-up reads past this from storage anyway.
                return;
            }
            cursor.pending.push_back(delivered.clone());
            *pending_bytes += size;
            if *pending_bytes > max_bytes {
                // Held-back live messages are a copy of what storage has: past the bound,
                // drop them (every replaying topic's) and let the catch-ups read on.
                for c in cursors.values_mut().filter(|c| !c.pending.is_empty()) {
                    c.pending.clear();
                    c.pending_dropped = true;
                }
                *pending_bytes = 0;
            }
            return;
        }
        cursor.last = Some(delivered.id());
        queue.push_back(delivered.clone());
        *queued_bytes += size;
        Self::check_bound(&mut inner, self.max_bytes);
        Self::wake(&mut inner);
    }

    /// A message of a replayed history page, in order, from the catch-up of follow
    /// `generation`. Never overflows the sink: the catch-up pulled it into room it waited for.
    /// Returns false when the catch-up must stop (unfollowed, refollowed, or sink stopped).
    pub fn push_replayed(&self, generation: u64, delivered: Rc<Delivered>) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.state != SinkState::Open {
            return false;
        }
        let size = delivered.queued_size();
        let Some(cursor) = inner.cursors.get_mut(&*delivered.topic) else {
            return false;
        };
        if cursor.generation != generation {
            return false;
        }
        if cursor.last.is_some_and(|last| delivered.id() <= last) {
            return true;
        }
        cursor.last = Some(delivered.id());
        inner.queue.push_back(delivered);
        inner.queued_bytes += size;
        Self::wake(&mut inner);
        true
    }

    /// Marks `id` as already seen for `topic` (a resume offset), so nothing at or before it is
    /// delivered again.
    pub fn seen_up_to(&self, topic: &str, id: MessageId) {
        if let Some(cursor) = self.inner.borrow_mut().cursors.get_mut(topic) {
            if cursor.last.is_none_or(|last| last < id) {
                cursor.last = Some(id);
            }
        }
    }

    /// The newest id handed to the consumer for `topic` (or its resume offset).
    pub fn position(&self, topic: &str) -> Option<MessageId> {
        self.inner.borrow().cursors.get(topic).and_then(|c| c.last)
    }

    /// Tries to end the replay of `topic` by the catch-up of follow `generation`, whose last
    /// page reached the end of what storage had: live messages held back are queued,
    /// skipping those the replay already delivered. Returns false when the catch-up must
    /// read on first, because live messages were dropped meanwhile (see [`Sink::offer`]);
    /// true when the replay is over (or no longer this catch-up's business).
    pub fn finish_replay(&self, topic: &str, generation: u64) -> bool {
        let mut inner = self.inner.borrow_mut();
        let Inner {
            queue,
            queued_bytes,
            pending_bytes,
            cursors,
            ..
        } = &mut *inner;
        let Some(cursor) = cursors.get_mut(topic) else {
            return true;
        };
        if cursor.generation != generation || !cursor.replaying {
            return true;
        }
        if cursor.pending_dropped {
            cursor.pending_dropped = false;
            return false;
        }
        cursor.replaying = false;
        while let Some(d) = cursor.pending.pop_front() {
            let size = d.queued_size();
            *pending_bytes -= size;
            if cursor.last.is_some_and(|last| d.id() <= last) {
                continue;
            }
            cursor.last = Some(d.id());
            queue.push_back(d);
            *queued_bytes += size;
        }
        Self::check_bound(&mut inner, self.max_bytes);
        Self::wake(&mut inner);
        true
    }

    /// Queues a control frame/event; it is written before messages queued after it.
    /// Dropped once the sink stopped: nobody will write it.
    pub fn push_control(&self, frame: Bytes) {
        let mut inner = self.inner.borrow_mut();
        if inner.state != SinkState::Open {
            return;
        }
        inner.control_bytes += frame.len();
        inner.control.push_back(frame);
        Self::check_bound(&mut inner, self.max_bytes);
        Self::wake(&mut inner);
    }

    /// Appends every queued control frame to `out`.
    pub fn take_control(&self, out: &mut bytes::BytesMut) {
        let mut inner = self.inner.borrow_mut();
        if inner.control.is_empty() {
            return;
        }
        inner.control_bytes = 0;
        for frame in inner.control.drain(..) {
            out.extend_from_slice(&frame);
        }
        Self::wake_room(&mut inner);
    }

    /// Moves up to `max` queued messages into `out` for writing.
    pub fn take(&self, out: &mut Vec<Rc<Delivered>>, max: usize) {
        let mut inner = self.inner.borrow_mut();
        let n = inner.queue.len().min(max);
        for d in inner.queue.drain(..n) {
            out.push(d);
        }
        let freed: usize = out.iter().rev().take(n).map(|d| d.queued_size()).sum();
        inner.queued_bytes = inner.queued_bytes.saturating_sub(freed);
        if n > 0 {
            Self::wake_room(&mut inner);
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.inner.borrow().queued_bytes
    }

    pub fn has_queued(&self) -> bool {
        !self.inner.borrow().queue.is_empty()
    }

    pub fn close(&self) {
        let mut inner = self.inner.borrow_mut();
        if inner.state == SinkState::Open {
            inner.state = SinkState::Closed;
        }
        Self::wake(&mut inner);
        Self::wake_room(&mut inner);
    }

    /// Ends the stream so the consumer resumes from its last id ([`SinkState::Resync`]).
    /// What is queued still goes out first: the consumer's last id is then its real one.
    pub fn resync(&self) {
        let mut inner = self.inner.borrow_mut();
        if inner.state == SinkState::Open {
            inner.state = SinkState::Resync;
        }
        inner.cursors.values_mut().for_each(|c| c.pending.clear());
        inner.pending_bytes = 0;
        Self::wake(&mut inner);
        Self::wake_room(&mut inner);
    }

    /// Resolves when there is something to write or the sink stopped taking messages.
    pub fn ready(&self) -> Ready<'_> {
        Ready { sink: self }
    }

    /// Resolves once the sink stopped taking messages (overflowed or closed).
    pub async fn stopped(&self) -> SinkState {
        std::future::poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if inner.state != SinkState::Open {
                Poll::Ready(inner.state)
            } else {
                inner.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves when the catch-up of follow `generation` of `topic` may read its next page:
    /// with the room left in the queue (at least half the bound, and at least 1 byte), or
    /// `None` when it must stop (unfollowed, refollowed, sink stopped).
    pub async fn wait_room(&self, topic: &str, generation: u64) -> Option<usize> {
        std::future::poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            let current = inner.state == SinkState::Open
                && inner
                    .cursors
                    .get(topic)
                    .is_some_and(|c| c.generation == generation);
            if !current {
                return Poll::Ready(None);
            }
            let used = inner.queued_bytes + inner.control_bytes;
            if used <= self.max_bytes / 2 {
                return Poll::Ready(Some((self.max_bytes - used).max(1)));
            }
            if !inner.room_wakers.iter().any(|w| w.will_wake(cx.waker())) {
                inner.room_wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Marks the start (`true`) and end of a socket write for this consumer.
    pub fn set_writing(&self, writing: bool) {
        let mut inner = self.inner.borrow_mut();
        inner.writing = writing;
        // A write that ends with the queue over the bound let it grow while blocked.
        if !writing {
            Self::check_bound(&mut inner, self.max_bytes);
        }
    }

    /// Over the bound (with a write blocked) or the hard cap: the consumer is cut off. A
    /// single queued message larger than the bound is not "behind": it is delivered alone.
    fn check_bound(inner: &mut Inner, max_bytes: usize) {
        let queued = inner.queued_bytes + inner.control_bytes;
        let over = queued > max_bytes && inner.queue.len() + inner.control.len() > 1;
        let hard = over && queued > max_bytes.saturating_mul(HARD_CAP_FACTOR);
        if (over && inner.writing) || hard {
            inner.state = SinkState::Overflowed;
            inner.queue.clear();
            inner.cursors.values_mut().for_each(|c| c.pending.clear());
            inner.queued_bytes = 0;
            inner.pending_bytes = 0;
            inner.control.clear();
            inner.control_bytes = 0;
            Self::wake_room(inner);
        }
    }

    fn wake(inner: &mut Inner) {
        if let Some(waker) = inner.waker.take() {
            waker.wake();
        }
    }

    fn wake_room(inner: &mut Inner) {
        for waker in inner.room_wakers.drain(..) {
            waker.wake();
        }
    }
}

fn pending_size(cursor: &Cursor) -> usize {
    cursor.pending.iter().map(|d| d.queued_size()).sum()
}

pub struct Ready<'a> {
    sink: &'a Sink,
}

impl Future for Ready<'_> {
    type Output = SinkState;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SinkState> {
        let mut inner = self.sink.inner.borrow_mut();
        if !inner.queue.is_empty() || !inner.control.is_empty() || inner.state != SinkState::Open {
            return Poll::Ready(inner.state);
        }
        inner.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of `topic` with id `ms`-0 and a 7-byte payload.
    fn msg(topic: &Arc<str>, ms: u64) -> Rc<Delivered> {
        sized(topic, ms, 7)
    }

    fn drain(sink: &Sink) -> Vec<u64> {
        let mut out = Vec::new();
        sink.take(&mut out, usize::MAX);
        out.iter().map(|d| d.id().ms).collect()
    }

    #[test]
    fn replay_then_live_without_gap_or_duplicate() {
        let t: Arc<str> = "t".into();
        let sink = Sink::new(1, 1 << 20);
        let generation = sink.follow(&t, true);
        // Live messages arrive while the replay runs; the replay overlaps them.
        sink.offer(&msg(&t, 5));
        sink.offer(&msg(&t, 6));
        for ms in [3, 4, 5] {
            assert!(sink.push_replayed(generation, msg(&t, ms)));
        }
        assert!(sink.finish_replay("t", generation));
        sink.offer(&msg(&t, 6)); // duplicate of a pending one
        sink.offer(&msg(&t, 7));
        assert_eq!(drain(&sink), vec![3, 4, 5, 6, 7]);
        assert_eq!(sink.queued_bytes(), 0);
    }

    fn sized(topic: &Arc<str>, ms: u64, bytes: usize) -> Rc<Delivered> {
        Rc::new(Delivered::new(
            topic.clone(),
            Message {
                id: MessageId::new(ms, 0),
                timestamp_ms: ms,
                expires_at_ms: None,
                payload: Bytes::from(vec![b'1'; bytes]),
                metadata: None,
            },
        ))
    }

    /// Bug (issue 11, item 7): a catch-up of an earlier subscription kept queueing messages
    /// and could end the replay of the current one (releasing its live messages early).
    #[test]
    fn a_stale_catch_up_can_neither_queue_nor_end_the_new_replay() {
        let t: Arc<str> = "t".into();
        let sink = Sink::new(1, 1 << 20);
        let old = sink.follow(&t, true);
        sink.unfollow("t");
        assert!(!sink.is_current("t", old));
        let new = sink.follow(&t, true);
        assert!(!sink.push_replayed(old, msg(&t, 1)));
        assert!(
            sink.finish_replay("t", old),
            "the stale catch-up is told to stop"
        );
        sink.offer(&msg(&t, 9));
        assert_eq!(drain(&sink), Vec::<u64>::new(), "live 9 still held back");
        assert!(sink.push_replayed(new, msg(&t, 2)));
        assert!(sink.finish_replay("t", new));
        assert_eq!(drain(&sink), vec![2, 9]);
    }

    /// Held-back live messages past the bound are dropped, and the replay is not allowed to
    /// end until its catch-up has read past them from storage.
    #[test]
    fn held_back_live_messages_past_the_bound_are_read_from_storage_instead() {
        let t: Arc<str> = "t".into();
        let sink = Sink::new(1, 1000);
        let generation = sink.follow(&t, true);
        for ms in 10..30 {
            sink.offer(&sized(&t, ms, 100));
        }
        assert_eq!(sink.state(), SinkState::Open, "held back, not an overflow");
        assert!(!sink.finish_replay("t", generation), "must read on first");
        for ms in 10..30 {
            assert!(sink.push_replayed(generation, sized(&t, ms, 100)));
        }
        sink.offer(&sized(&t, 30, 100));
        assert!(sink.finish_replay("t", generation));
        assert_eq!(drain(&sink), (10..31).collect::<Vec<_>>());
    }

    /// One message larger than the whole bound is delivered, alone, even with a write
    /// pending; a second one behind it is a consumer falling behind.
    #[test]
    fn a_single_message_larger_than_the_bound_is_still_delivered() {
        let t: Arc<str> = "t".into();
        let sink = Sink::new(1, 1000);
        sink.follow(&t, false);
        sink.set_writing(true);
        sink.offer(&sized(&t, 1, 50_000));
        assert_eq!(sink.state(), SinkState::Open);
        sink.set_writing(false);
        assert_eq!(drain(&sink), vec![1]);
        sink.set_writing(true);
        sink.offer(&sized(&t, 2, 50_000));
        sink.offer(&sized(&t, 3, 10));
        assert_eq!(sink.state(), SinkState::Overflowed);
    }

    #[test]
    fn a_burst_is_not_a_slow_consumer_but_a_blocked_writer_is() {
        let t: Arc<str> = "t".into();
        let sink = Sink::new(1, 1000);
        sink.follow(&t, false);
        // 7 x 135 bytes: over the bound, under the hard cap, no write pending.
        for ms in 1..8 {
            sink.offer(&msg(&t, ms));
        }
        assert_eq!(sink.state(), SinkState::Open);
        assert_eq!(drain(&sink), (1..8).collect::<Vec<_>>());
        // With a write blocked on the socket, falling past the bound cuts the consumer off.
        sink.set_writing(true);
        for ms in 8..20 {
            sink.offer(&msg(&t, ms));
        }
        assert_eq!(sink.state(), SinkState::Overflowed);
    }

    #[test]
    fn overflow_marks_the_sink_and_frees_its_queue() {
        let t: Arc<str> = "t".into();
        let sink = Sink::new(1, 1000);
        sink.follow(&t, false);
        // Past the hard cap even with no write pending.
        for ms in 1..100 {
            sink.offer(&msg(&t, ms));
        }
        assert_eq!(sink.state(), SinkState::Overflowed);
        assert_eq!(drain(&sink), Vec::<u64>::new());
        assert_eq!(sink.queued_bytes(), 0);
    }

    /// Replies to a client's commands (pongs, errors) used to queue without bound: a client
    /// that sent pings and never read could grow its session's memory forever.
    #[test]
    fn control_frames_count_against_the_bound() {
        let sink = Sink::new(1, 1000);
        let pong = Bytes::from_static(&[b'p'; 100]);
        // Under the bound, or over it with no write pending (a burst): kept.
        for _ in 0..9 {
            sink.push_control(pong.clone());
        }
        assert_eq!(sink.state(), SinkState::Open);
        let mut out = bytes::BytesMut::new();
        sink.take_control(&mut out);
        assert_eq!(out.len(), 900);
        // A blocked write and more replies than the bound: cut off, replies freed.
        sink.set_writing(true);
        for _ in 0..11 {
            sink.push_control(pong.clone());
        }
        assert_eq!(sink.state(), SinkState::Overflowed);
        out.clear();
        sink.take_control(&mut out);
        assert!(out.is_empty());
        // And nothing is queued after that.
        sink.push_control(pong);
        sink.take_control(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn sse_event_splits_lines_and_names_the_id() {
        let t: Arc<str> = "t".into();
        let d = Delivered::new(
            t,
            Message {
                id: MessageId::new(7, 1),
                timestamp_ms: 0,
                expires_at_ms: None,
                payload: Bytes::from_static(b"{\n\"a\": 1\r\n}"),
                metadata: None,
            },
        );
        let text = String::from_utf8(d.sse_event().to_vec()).expect("utf8");
        assert!(
            text.starts_with("id: 7-1\nevent: message\ndata: {\"message_id\":\"7-1\""),
            "{text}"
        );
        assert!(text.contains("\ndata: \"a\": 1\ndata: }"), "{text}");
        assert!(text.ends_with("\n\n"));
    }
}
