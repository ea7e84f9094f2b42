//! The append feed: storage's one report of what it appended, for real-time delivery.
//!
//! Every message a backend acknowledges enters the feed in id order per topic, whichever task
//! completed it (with Valkey, one task's pipeline reply may complete another's messages), and
//! the feed hands it to its listener: delivery never asks storage what was appended. The
//! feed collects a storage operation's messages and hands them over when the operation ends
//! ([`AppendFeed::flush`]), grouped into runs of one topic, so a bulk publish is one delivery
//! per topic and interested shard, not one per message.
//!
//! The same seam is where messages appended elsewhere (another relay instance) enter: the
//! stream sync (`store::stream_sync`) appends what it reads from Valkey here, in stream order
//! with the local ones. When it finds that messages after what the feed has handed out were
//! removed from the stream before it could read them, it raises a *resync*
//! ([`AppendFeed::resync`]): the listener makes the topic's consumers resume from their last
//! id, so the resume tells them of the gap.

use std::cell::RefCell;

use super::message::Message;

/// What receives a run of messages of one topic, in id order.
pub type AppendListener = Box<dyn Fn(&str, &[Message])>;

/// Messages appended and not yet flushed, with their topics, in append order.
type Appended = Vec<(String, Message)>;

/// Entries a flushed vector may hold and still be kept for the next operation: a shard keeps
/// its usual operation's room, not the largest bulk it ever saw.
const SPARE_ENTRIES: usize = 256;

/// What learns that a topic's consumers must resume from their last id (see the module doc).
pub type ResyncListener = Box<dyn Fn(&str)>;

#[derive(Default)]
pub struct AppendFeed {
    /// Appended since the last flush, in append order.
    pending: RefCell<Appended>,
    /// Emptied vectors of the last flush (its appended list and its run), reused so an
    /// operation's appends and flush allocate nothing once a shard is warm.
    spare: RefCell<(Appended, Vec<Message>)>,
    /// Set once, when the shard's delivery is wired up; appends before that (none in
    /// practice) are dropped at the next flush.
    listener: RefCell<Option<AppendListener>>,
    resync_listener: RefCell<Option<ResyncListener>>,
}

impl AppendFeed {
    pub fn new() -> AppendFeed {
        AppendFeed::default()
    }

    /// Makes `listener` the receiver of every run of appended messages from now on.
    pub fn subscribe(&self, listener: AppendListener) {
        *self.listener.borrow_mut() = Some(listener);
    }

    /// Makes `listener` the receiver of every resync from now on.
    pub fn subscribe_resync(&self, listener: ResyncListener) {
        *self.resync_listener.borrow_mut() = Some(listener);
    }

    /// The consumers of `topic` must resume from their last id: messages after what the feed
    /// handed out were removed before it could (see the module doc). Whatever was appended
    /// before goes out first.
    pub fn resync(&self, topic: &str) {
        self.flush();
        if let Some(listener) = self.resync_listener.borrow().as_ref() {
            listener(topic);
        }
    }

    /// Records one appended message (in id order for its topic). Takes the topic owned: the
    /// memory backend's publish hands over the request's own `String`, no copy per message.
    pub fn append(&self, topic: String, message: Message) {
        self.pending.borrow_mut().push((topic, message));
    }

    /// Hands everything appended since the last flush to the listener, grouping consecutive
    /// messages of one topic. Called by storage at the end of each operation that appends.
    pub fn flush(&self) {
        if self.pending.borrow().is_empty() {
            return;
        }
        let (spare_appended, mut run) = std::mem::take(&mut *self.spare.borrow_mut());
        let mut appended = std::mem::replace(&mut *self.pending.borrow_mut(), spare_appended);
        {
            let listener = self.listener.borrow();
            let mut current: Option<String> = None;
            for (topic, message) in appended.drain(..) {
                if current.as_deref() != Some(topic.as_str()) {
                    if let (Some(done), Some(listener)) = (current.take(), listener.as_ref()) {
                        listener(&done, &run);
                    }
                    run.clear();
                    current = Some(topic);
                }
                run.push(message);
            }
            if let (Some(done), Some(listener)) = (current, listener.as_ref()) {
                listener(&done, &run);
            }
        }
        run.clear();
        if appended.capacity() <= SPARE_ENTRIES && run.capacity() <= SPARE_ENTRIES {
            // A listener that appended and flushed meanwhile left its own spares: either
            // pair serves.
            *self.spare.borrow_mut() = (appended, run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::message::MessageId;
    use std::rc::Rc;

    fn message(ms: u64) -> Message {
        Message {
            id: MessageId::new(ms, 0),
            timestamp_ms: ms,
            expires_at_ms: None,
            payload: bytes::Bytes::from_static(b"1"),
            metadata: None,
        }
    }

    /// Runs handed over: (topic, the ids' milliseconds), in order.
    type Runs = Vec<(String, Vec<u64>)>;

    /// A feed whose listener records every run it is handed.
    fn recording_feed() -> (AppendFeed, Rc<RefCell<Runs>>) {
        let feed = AppendFeed::new();
        let seen: Rc<RefCell<Runs>> = Rc::default();
        let sink = seen.clone();
        feed.subscribe(Box::new(move |topic, messages| {
            let ids = messages.iter().map(|m| m.id.ms).collect();
            sink.borrow_mut().push((topic.to_owned(), ids));
        }));
        (feed, seen)
    }

    #[test]
    fn a_flush_hands_over_runs_of_one_topic_in_append_order() {
        let (feed, seen) = recording_feed();
        for (topic, ms) in [("a", 1), ("a", 2), ("b", 3), ("a", 4)] {
            feed.append(topic.to_owned(), message(ms));
        }
        assert!(seen.borrow().is_empty(), "nothing before the flush");
        feed.flush();
        feed.flush();
        assert_eq!(
            *seen.borrow(),
            vec![
                ("a".to_owned(), vec![1, 2]),
                ("b".to_owned(), vec![3]),
                ("a".to_owned(), vec![4])
            ]
        );
    }

    /// Operations of random sizes on both sides of the kept room, each flushed: every run
    /// holds exactly its own messages (nothing left over from a reused vector), in order.
    #[test]
    fn reused_vectors_carry_nothing_from_one_flush_to_the_next() {
        let (feed, seen) = recording_feed();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut next = 0u64;
        for _ in 0..300 {
            let count = match rng.u8(..4) {
                0 => rng.usize(SPARE_ENTRIES - 2..SPARE_ENTRIES + 3),
                _ => rng.usize(0..8),
            };
            let mut expected: Runs = Vec::new();
            for _ in 0..count {
                let topic = ["a", "b", "c"][rng.usize(..3)].to_owned();
                next += 1;
                feed.append(topic.clone(), message(next));
                match expected.last_mut() {
                    Some((last, ids)) if *last == topic => ids.push(next),
                    _ => expected.push((topic, vec![next])),
                }
            }
            feed.flush();
            assert_eq!(std::mem::take(&mut *seen.borrow_mut()), expected);
        }
    }
}
