//! Idempotent publish: what an idempotency key is, and the memory backend's record of the
//! keys it has seen.
//!
//! A producer names one logical publish with a key (`Idempotency-Key`, as
//! `pulsar-relay-client` sends it: one key per publish, reused on every retry). Keys are
//! scoped per topic: a key names a publish *to one topic*. A publish whose key the topic has
//! seen within `idempotency.window` stores nothing and is answered with the first publish's
//! id and timestamp, also while that first publish is still in flight (its outcome is
//! decided first: by the owning shard, which runs both one after the other, or by Valkey).
//!
//! Where the record lives depends on the backend:
//! - **valkey**: in Valkey, one key per idempotency key (`valkey.idempotency_key` + the key,
//!   expiring after the window), checked and written atomically with the XADD by the `pulsar`
//!   Function library (`store/valkey/publish.lua`), so a retry that lands on another relay is
//!   deduplicated too.
//! - **memory**: [`KeyRecord`] below, one per shard, holding the keys of the topics the shard
//!   owns. Checked and written in the same synchronous step as the append, so two attempts
//!   with one key can never both append.
//!
//! Does not own: reading keys out of requests (the HTTP handlers) or the Valkey side
//! (`store/valkey/function.rs`).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use super::PublishAck;

/// Longest key accepted, in bytes: Stripe's limit, and far above the 32 hex digits
/// `pulsar-relay-client` sends. Each key becomes part of a Valkey key, so it stays short.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key is refused (the text of a 400).
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("an idempotency key must not be empty".to_owned());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "an idempotency key is at most {MAX_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    if !key.bytes().all(is_key_byte) {
        return Err(
            "an idempotency key may hold only printable ASCII characters (space to `~`)".to_owned(),
        );
    }
    Ok(())
}

/// Printable ASCII: what [`validate_key`] accepts.
pub fn is_key_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// The key of item `index` (0-based) of a bulk publish sent with `Idempotency-Key: <key>`:
/// `<key>:<index>`. A client that retries a bulk request retries it whole with the same
/// header, so every item keeps its key, and each item is deduplicated on its own, whichever
/// topic (and shard, and Valkey slot) it goes to.
pub fn bulk_item_key(key: &str, index: usize) -> String {
    let mut derived = String::with_capacity(key.len() + 5);
    derived.push_str(key);
    derived.push(':');
    derived.push_str(itoa::Buffer::new().format(index));
    derived
}

/// What [`KeyRecord::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The topic saw this key within the window: answer with the first publish's ack.
    Seen(PublishAck),
    /// Not seen: append, then [`KeyRecord::record`] the ack.
    New,
    /// Not seen, and the record holds `max_keys` keys still inside their window: refuse
    /// (503) rather than forget one of them.
    Full,
}

/// The memory backend's record of idempotency keys, per shard: (topic, key) → the ack of
/// the publish that first used the key, until the window runs out.
///
/// Bounded by count (`idempotency.max_keys` shared out over the shards). At the bound a new
/// key is refused with 503 instead of evicting the oldest: evicting would silently break the
/// promise for a key still inside its window (a retry of that publish would append again),
/// while a 503 is visible and retried by the client with the same key, and frees up as keys
/// expire. Publishes without a key are never affected.
pub struct KeyRecord {
    window_ms: u64,
    max_keys: usize,
    /// `topic` + `\n` + `key` (a newline is in neither) → the first ack and its expiry.
    seen: HashMap<Rc<str>, Seen>,
    /// The same entries in insertion order, which is expiry order: the window is the same
    /// for every key. Expiry pops from the front, O(1) per key.
    by_expiry: VecDeque<(u64, Rc<str>)>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    ack: PublishAck,
    expires_at_ms: u64,
}

impl KeyRecord {
    pub fn new(window_ms: u64, max_keys: usize) -> KeyRecord {
        KeyRecord {
            window_ms,
            max_keys: max_keys.max(1),
            seen: HashMap::new(),
            by_expiry: VecDeque::new(),
        }
    }

    /// Whether `topic` saw `key` within the window (as of `now_ms`).
    pub fn check(&mut self, topic: &str, key: &str, now_ms: u64) -> Lookup {
        self.expire(now_ms);
        if let Some(seen) = self.seen.get(composite(topic, key).as_str()) {
            return Lookup::Seen(seen.ack);
        }
        if self.seen.len() >= self.max_keys {
            return Lookup::Full;
        }
        Lookup::New
    }

    /// Records `ack` as the answer to `key` on `topic` for the window from `now_ms`. Called
    /// only after [`KeyRecord::check`] said [`Lookup::New`] in the same synchronous step.
    pub fn record(&mut self, topic: &str, key: &str, ack: PublishAck, now_ms: u64) {
        let name: Rc<str> = Rc::from(composite(topic, key));
        let expires_at_ms = now_ms.saturating_add(self.window_ms);
        self.by_expiry.push_back((expires_at_ms, name.clone()));
        self.seen.insert(name, Seen { ack, expires_at_ms });
    }

    /// Forgets every key whose window ended by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut removed = 0;
        while let Some((expires_at_ms, _)) = self.by_expiry.front() {
            if *expires_at_ms > now_ms {
                break;
            }
            if let Some((expires_at_ms, name)) = self.by_expiry.pop_front() {
                // A key recorded again after it expired has a later expiry: keep that one.
                if self
                    .seen
                    .get(&name)
                    .is_some_and(|s| s.expires_at_ms == expires_at_ms)
                {
                    self.seen.remove(&name);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Keys held (some may have expired since the last check).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

fn composite(topic: &str, key: &str) -> String {
    let mut name = String::with_capacity(topic.len() + 1 + key.len());
    name.push_str(topic);
    name.push('\n');
    name.push_str(key);
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::message::MessageId;

    fn ack(ms: u64) -> PublishAck {
        PublishAck {
            id: MessageId::new(ms, 0),
            timestamp_ms: ms,
        }
    }

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("0123456789abcdef0123456789abcdef").is_ok());
        assert!(validate_key("order 42 / retry-safe").is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(validate_key("tab\there").is_err());
        assert!(validate_key("new\nline").is_err());
        assert!(validate_key("é").is_err());
        assert!(validate_key("\u{7f}").is_err());
    }

    #[test]
    fn bulk_items_get_one_key_each() {
        assert_eq!(bulk_item_key("abc", 0), "abc:0");
        assert_eq!(bulk_item_key("abc", 999), "abc:999");
    }

    #[test]
    fn a_key_answers_its_first_ack_per_topic_until_the_window_ends() {
        let mut record = KeyRecord::new(1000, 10);
        assert_eq!(record.check("t", "k", 0), Lookup::New);
        record.record("t", "k", ack(1), 0);
        assert_eq!(record.check("t", "k", 999), Lookup::Seen(ack(1)));
        // Scoped per topic: the same key on another topic is another publish.
        assert_eq!(record.check("u", "k", 999), Lookup::New);
        assert_eq!(record.check("t", "k", 1000), Lookup::New);
        assert!(record.is_empty());
        record.record("t", "k", ack(2), 1000);
        assert_eq!(record.check("t", "k", 1500), Lookup::Seen(ack(2)));
    }

    #[test]
    fn a_topic_and_key_cannot_pose_as_another_pair() {
        let mut record = KeyRecord::new(1000, 10);
        record.record("a", "b:c", ack(1), 0);
        assert_eq!(record.check("a:b", "c", 0), Lookup::New);
    }

    #[test]
    fn at_the_bound_new_keys_are_refused_until_old_ones_expire() {
        let mut record = KeyRecord::new(1000, 2);
        record.record("t", "a", ack(1), 0);
        record.record("t", "b", ack(2), 10);
        assert_eq!(record.check("t", "c", 500), Lookup::Full);
        // Known keys still answer at the bound.
        assert_eq!(record.check("t", "a", 500), Lookup::Seen(ack(1)));
        // The oldest expires: room for one.
        assert_eq!(record.check("t", "c", 1000), Lookup::New);
        assert_eq!(record.len(), 1);
    }
}
