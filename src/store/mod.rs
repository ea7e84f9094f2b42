//! Storage: message ids, the wire form of a message, the hot tier, and the storage seam.
//!
//! [`Storage`] is the one type the rest of the relay talks to. It lives on the shard that owns
//! the topics it holds and is `!Send`: every operation runs on that shard. The memory backend
//! is the [`hot_tier::HotTier`] alone; the Valkey backend (a later issue) keeps the same hot
//! tier in front of Valkey Streams, so the HTTP handlers never see which backend is running.
//!
//! - [`message`]: [`message::MessageId`] (`<ms>-<seq>`, Valkey's stream-id format) and
//!   [`message::Message`], and the JSON form every delivery path shares.
//! - [`hot_tier`]: per-topic ordered logs with count, age and byte-budget retention.

pub mod hot_tier;
pub mod message;

use std::cell::RefCell;

use bytes::Bytes;

use crate::config::{Config, StorageBackend};
use hot_tier::{HotTier, HotTierLimits, Page, PageQuery, TopicStats};
use message::MessageId;

/// One message to append, already validated by the HTTP layer. `Send`: it may travel to the
/// owning shard.
#[derive(Debug, Clone)]
pub struct PublishItem {
    pub topic: String,
    /// The payload JSON exactly as the producer sent it. Copied out of the request buffer
    /// (never a slice of it), so a retained message does not pin a whole read buffer.
    pub payload: Bytes,
    /// Compact JSON object of string → string.
    pub metadata: Option<Bytes>,
    pub ttl_ms: Option<u64>,
}

/// What a producer is told about an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    pub id: MessageId,
    pub timestamp_ms: u64,
}

/// Why a storage operation failed. Each maps to one client-visible outcome in the HTTP layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot take the operation now (persistent tier down, shutting down):
    /// 503 with `Retry-After`.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// The backend behind the hot tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Messages live only in the hot tier and are lost on restart.
    Memory,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
        }
    }
}

/// Counts one shard reports for `/health` and, later, metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageSummary {
    pub topics: usize,
    pub messages: usize,
    pub bytes: usize,
    pub evictions: u64,
    pub expirations: u64,
}

impl std::ops::Add for StorageSummary {
    type Output = StorageSummary;
    fn add(self, o: StorageSummary) -> StorageSummary {
        StorageSummary {
            topics: self.topics + o.topics,
            messages: self.messages + o.messages,
            bytes: self.bytes + o.bytes,
            evictions: self.evictions + o.evictions,
            expirations: self.expirations + o.expirations,
        }
    }
}

/// A shard's store: the hot tier and the backend behind it.
pub struct Storage {
    backend: BackendKind,
    /// Borrowed only inside synchronous sections, never across an `.await`, so concurrent
    /// tasks on the shard cannot observe a half-applied operation or panic on re-borrow.
    hot: RefCell<HotTier>,
}

impl Storage {
    /// The store for one of `shards` shards. Each shard gets an equal share of the process
    /// memory budget: topics hash evenly, and a per-shard budget keeps eviction a local,
    /// lock-free decision.
    pub fn new(config: &Config, shards: usize) -> Result<Storage, StoreError> {
        let backend = match config.storage.backend {
            StorageBackend::Memory => BackendKind::Memory,
            StorageBackend::Valkey => {
                return Err(StoreError::Unavailable(
                    "STORAGE_BACKEND=valkey is not available in this build yet; use memory"
                        .to_string(),
                ))
            }
        };
        let limits = HotTierLimits {
            max_messages_per_topic: config.storage.max_messages_per_topic,
            retention_ms: duration_ms(config.storage.persistent_tier_retention),
            max_bytes: (config.memory.max_bytes / shards.max(1)).max(1),
        };
        Ok(Storage {
            backend,
            hot: RefCell::new(HotTier::new(limits)),
        })
    }

    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Appends messages in order; one result per item, in item order.
    pub async fn publish(
        &self,
        items: Vec<PublishItem>,
        now_ms: u64,
    ) -> Vec<Result<PublishAck, StoreError>> {
        let mut hot = self.hot.borrow_mut();
        items
            .into_iter()
            .map(|item| {
                let msg = hot.append(
                    &item.topic,
                    item.payload,
                    item.metadata,
                    item.ttl_ms,
                    now_ms,
                );
                Ok(PublishAck {
                    id: msg.id,
                    timestamp_ms: msg.timestamp_ms,
                })
            })
            .collect()
    }

    /// A page of a topic's history; `None` for a topic this store does not hold.
    pub async fn read(
        &self,
        topic: &str,
        query: &PageQuery,
        now_ms: u64,
    ) -> Result<Option<Page>, StoreError> {
        Ok(self.hot.borrow().read(topic, query, now_ms))
    }

    pub async fn stats(&self, topic: &str) -> Result<Option<TopicStats>, StoreError> {
        Ok(self.hot.borrow().stats(topic))
    }

    pub async fn topics(&self) -> Result<Vec<TopicStats>, StoreError> {
        Ok(self.hot.borrow().topics().collect())
    }

    /// Keeps the newest `keep_count` messages; `None` for an unknown topic.
    pub async fn trim(&self, topic: &str, keep_count: usize) -> Result<Option<usize>, StoreError> {
        Ok(self
            .hot
            .borrow_mut()
            .trim(topic, keep_count, crate::clock::now_ms()))
    }

    /// Deletes a topic; `false` when it did not exist.
    pub async fn delete(&self, topic: &str) -> Result<bool, StoreError> {
        Ok(self.hot.borrow_mut().delete(topic))
    }

    /// Applies age retention and message ttls; run by the shard's sweeper.
    pub fn expire(&self, now_ms: u64) -> usize {
        self.hot.borrow_mut().expire(now_ms)
    }

    pub fn summary(&self) -> StorageSummary {
        let hot = self.hot.borrow();
        StorageSummary {
            topics: hot.topic_count(),
            messages: hot.message_count(),
            bytes: hot.bytes(),
            evictions: hot.evictions(),
            expirations: hot.expirations(),
        }
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
