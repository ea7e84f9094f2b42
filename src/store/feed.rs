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
pub type AppendListener = Box<dyn Fn(&str, Vec<Message>)>;

/// What learns that a topic's consumers must resume from their last id (see the module doc).
pub type ResyncListener = Box<dyn Fn(&str)>;

#[derive(Default)]
pub struct AppendFeed {
    /// Appended since the last flush, in append order.
    pending: RefCell<Vec<(String, Message)>>,
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
        let appended = std::mem::take(&mut *self.pending.borrow_mut());
        if appended.is_empty() {
            return;
        }
        let listener = self.listener.borrow();
        let Some(listener) = listener.as_ref() else {
            return;
        };
        let mut run: Vec<Message> = Vec::new();
        let mut current: Option<String> = None;
        for (topic, message) in appended {
            if current.as_deref() != Some(topic.as_str()) {
                if let Some(done) = current.take() {
                    listener(&done, std::mem::take(&mut run));
                }
                current = Some(topic);
            }
            run.push(message);
        }
        if let Some(done) = current {
            listener(&done, run);
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

    #[test]
    fn a_flush_hands_over_runs_of_one_topic_in_append_order() {
        let feed = AppendFeed::new();
        type Runs = Vec<(String, Vec<u64>)>;
        let seen: Rc<RefCell<Runs>> = Rc::default();
        let sink = seen.clone();
        feed.subscribe(Box::new(move |topic, messages| {
            let ids = messages.iter().map(|m| m.id.ms).collect();
            sink.borrow_mut().push((topic.to_owned(), ids));
        }));
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
}
