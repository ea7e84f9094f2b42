//! The typed requests one shard sends another.
//!
//! Every request names the operation and carries a oneshot sender for its typed reply. The
//! requesting task awaits the receiver; the owning shard completes it from its own executor
//! (glommio wakers may be woken from a foreign thread, which hands the wake back to the owner).
//! Everything here is `Send`: payloads are `Bytes`, never `Rc`.

use futures::channel::oneshot;

use crate::store::hot_tier::{Page, PageQuery, TopicStats};
use crate::store::{PublishAck, PublishItem, StorageSummary, StoreError};

pub type Reply<T> = oneshot::Sender<T>;

/// A request to the shard that owns the topics named in it (or, for the gathering requests,
/// to every shard in turn).
#[derive(Debug)]
pub enum ShardRequest {
    /// Append messages of topics this shard owns; one result per item, in order.
    Publish {
        items: Vec<PublishItem>,
        reply: Reply<Vec<Result<PublishAck, StoreError>>>,
    },
    Read {
        topic: String,
        query: PageQuery,
        reply: Reply<Result<Option<Page>, StoreError>>,
    },
    Stats {
        topic: String,
        reply: Reply<Result<Option<TopicStats>, StoreError>>,
    },
    /// Every topic this shard owns (gathered across shards for `GET /api/v1/topics`).
    Topics {
        reply: Reply<Result<Vec<TopicStats>, StoreError>>,
    },
    Trim {
        topic: String,
        keep_count: usize,
        reply: Reply<Result<Option<usize>, StoreError>>,
    },
    Delete {
        topic: String,
        reply: Reply<Result<bool, StoreError>>,
    },
    /// This shard's storage counts (gathered for `/health`).
    Summary { reply: Reply<StorageSummary> },
    /// Stop accepting, finish in-flight work, exit. Sent by the signal thread.
    Shutdown,
}
