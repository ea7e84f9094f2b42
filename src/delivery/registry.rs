//! Who on this shard consumes which topic, and (for the topics this shard owns) which other
//! shards have consumers of it.
//!
//! Fan-out follows ownership. The owning shard, after a message is appended (acknowledged),
//! offers it to its own consumers and sends ONE copy to each shard that registered interest
//! in the topic; that shard offers it to its consumers. A shard registers interest when its
//! first consumer of a topic arrives and withdraws it when the last one leaves. Registration
//! happens on the owner before any history is read for a consumer, which is what makes
//! resume gap-free: whatever is appended after registration is forwarded, whatever before is
//! in the history read, and the consumer's sink drops what both delivered.

use crate::topic::TopicMap;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use super::group::GroupWake;
use super::sink::{Delivered, Sink};
use crate::store::message::Message;

#[derive(Default)]
pub struct Registry {
    /// This shard's consumers per topic.
    local: RefCell<TopicMap<Arc<str>, Vec<Rc<Sink>>>>,
    /// Owner side: shards (other than this one) with consumers of a topic this shard owns.
    remote: RefCell<TopicMap<String, Vec<usize>>>,
    next_sink_id: Cell<u64>,
    /// Parked long-polls on this shard, against `longpoll.max_parked_per_shard`.
    parked: Cell<usize>,
    /// This shard's consumer-group consumers per topic: woken (not handed messages) when
    /// the topic has news; they take their messages from the group themselves.
    group_wakes: RefCell<TopicMap<Arc<str>, Vec<Rc<GroupWake>>>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn new_sink(&self, max_bytes: usize) -> Rc<Sink> {
        let id = self.next_sink_id.get();
        self.next_sink_id.set(id + 1);
        Sink::new(id, max_bytes)
    }

    /// Adds `sink` as a consumer of `topic`. Returns true when it is the shard's first.
    pub fn attach(&self, topic: &Arc<str>, sink: &Rc<Sink>) -> bool {
        let mut local = self.local.borrow_mut();
        let sinks = local.entry(topic.clone()).or_default();
        let first = sinks.is_empty();
        if !sinks.iter().any(|s| s.id == sink.id) {
            sinks.push(sink.clone());
        }
        first
    }

    /// Removes `sink` from `topic`. Returns true when no consumer of the topic is left here.
    pub fn detach(&self, topic: &str, sink_id: u64) -> bool {
        let mut local = self.local.borrow_mut();
        let Some(sinks) = local.get_mut(topic) else {
            return false;
        };
        sinks.retain(|s| s.id != sink_id);
        if sinks.is_empty() {
            local.remove(topic);
            !self.group_wakes.borrow().contains_key(topic)
        } else {
            false
        }
    }

    /// Adds a group consumer's wake-up for `topic`.
    pub fn attach_group(&self, topic: &Arc<str>, wake: &Rc<GroupWake>) {
        let mut wakes = self.group_wakes.borrow_mut();
        let list = wakes.entry(topic.clone()).or_default();
        if !list.iter().any(|w| Rc::ptr_eq(w, wake)) {
            list.push(wake.clone());
        }
    }

    /// Removes a group consumer's wake-up. Returns true when nothing on this shard follows
    /// the topic any more (no consumer of any kind).
    pub fn detach_group(&self, topic: &str, wake: &Rc<GroupWake>) -> bool {
        let mut wakes = self.group_wakes.borrow_mut();
        let Some(list) = wakes.get_mut(topic) else {
            return false;
        };
        list.retain(|w| !Rc::ptr_eq(w, wake));
        if list.is_empty() {
            wakes.remove(topic);
            !self.local.borrow().contains_key(topic)
        } else {
            false
        }
    }

    /// Wakes this shard's group consumers of `topic`; `claim`: they look for due messages
    /// too (a release).
    pub fn wake_groups(&self, topic: &str, claim: bool) {
        if let Some(list) = self.group_wakes.borrow().get(topic) {
            for wake in list {
                wake.wake(claim);
            }
        }
    }

    pub fn local_consumers(&self, topic: &str) -> usize {
        self.local.borrow().get(topic).map_or(0, Vec::len)
    }

    /// Whether anything on this shard follows `topic` (plain or group consumers).
    pub fn has_local_interest(&self, topic: &str) -> bool {
        self.local.borrow().contains_key(topic) || self.group_wakes.borrow().contains_key(topic)
    }

    pub fn consumer_count(&self) -> usize {
        self.local.borrow().values().map(Vec::len).sum()
    }

    /// Owner side: shard `shard` does (or no longer does) have consumers of `topic`.
    pub fn set_interest(&self, topic: &str, shard: usize, interested: bool) {
        let mut remote = self.remote.borrow_mut();
        if interested {
            let shards = remote.entry(topic.to_owned()).or_default();
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        } else if let Some(shards) = remote.get_mut(topic) {
            shards.retain(|&s| s != shard);
            if shards.is_empty() {
                remote.remove(topic);
            }
        }
    }

    /// Owner side: the shards to forward `topic`'s messages to.
    pub fn interested_shards(&self, topic: &str) -> Vec<usize> {
        self.remote.borrow().get(topic).cloned().unwrap_or_default()
    }

    pub fn has_remote_interest(&self, topic: &str) -> bool {
        self.remote.borrow().contains_key(topic)
    }

    /// Offers messages of `topic` (in id order) to this shard's consumers. Each message is
    /// wrapped once; its encodings are made on first use and shared by all consumers.
    /// Returns how many deliveries were queued.
    pub fn deliver_local(
        &self,
        topic: &str,
        messages: &[Message],
        acked_at: std::time::Instant,
    ) -> usize {
        if !messages.is_empty() {
            self.wake_groups(topic, false);
        }
        let sinks: Vec<Rc<Sink>> = match self.local.borrow().get(topic) {
            Some(sinks) if !sinks.is_empty() => sinks.clone(),
            _ => return 0,
        };
        let name: Arc<str> = Arc::from(topic);
        let mut queued = 0;
        for message in messages {
            let delivered = Rc::new(Delivered::live(
                name.clone(),
                message.clone(),
                Some(acked_at),
            ));
            for sink in &sinks {
                sink.offer(&delivered);
                queued += 1;
            }
        }
        queued
    }

    /// Cuts off every consumer of `topic` on this shard so it resumes from its last id (its
    /// transport ends the stream; the resume reports what was removed meanwhile). Returns how
    /// many.
    pub fn resync_local(&self, topic: &str) -> usize {
        let sinks: Vec<Rc<Sink>> = match self.local.borrow().get(topic) {
            Some(sinks) => sinks.clone(),
            None => return 0,
        };
        for sink in &sinks {
            sink.resync();
        }
        sinks.len()
    }

    /// Counts a parked long-poll if under `max`; false when the shard is at its limit.
    pub fn try_park(&self, max: usize) -> bool {
        let n = self.parked.get();
        if n >= max {
            return false;
        }
        self.parked.set(n + 1);
        true
    }

    pub fn unpark(&self) {
        self.parked.set(self.parked.get().saturating_sub(1));
    }

    pub fn parked(&self) -> usize {
        self.parked.get()
    }
}
