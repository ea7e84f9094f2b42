//! The typed requests one shard sends another.
//!
//! Every request names the operation and carries a oneshot sender for its typed reply. The
//! requesting task awaits the receiver; the owning shard completes it from its own executor
//! (glommio wakers may be woken from a foreign thread, which hands the wake back to the owner).
//! Everything here is `Send`: payloads are `Bytes`, never `Rc`.

use futures::channel::oneshot;

use crate::store::hot_tier::{Page, PageQuery, TopicStats};
use crate::store::message::{Message, MessageId};
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
    /// Registers shard `shard`'s interest in `topic` (its consumers get this owner's new
    /// messages from now on), THEN reads the page `query` names.
    SubscribeRead {
        topic: String,
        shard: usize,
        query: ReplayQuery,
        reply: Reply<Result<ReplayPage, StoreError>>,
    },
    /// Shard `shard` has no consumer of `topic` left (fire and forget).
    Withdraw { topic: String, shard: usize },
    /// New messages of `topic`, in id order, for this shard's consumers (fire and forget).
    Deliver {
        topic: String,
        messages: Vec<Message>,
        /// When the owner acknowledged them (the delivery-lag metric starts here).
        acked_at: std::time::Instant,
    },
    /// This shard's consumers of `topic` must resume from their last id (fire and forget;
    /// see [`crate::store::feed::AppendFeed::resync`]).
    Resync { topic: String },
    /// This shard's metrics and stats (gathered for `/metrics` and `/api/v1/stats`).
    Snapshot {
        reply: Reply<crate::metrics::Snapshot>,
    },
    /// This shard's storage counts (gathered for `/health`).
    Summary { reply: Reply<StorageSummary> },
    /// Stop accepting, finish in-flight work, exit. Sent by the signal thread.
    Shutdown,
}

/// A consumer's catch-up read (see [`ShardRequest::SubscribeRead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayQuery {
    /// Ascending after this id; `None` = from the oldest.
    pub after: Option<MessageId>,
    /// At most this many messages; 0 only registers.
    pub limit: usize,
    /// At most about this many bytes (a single larger message still comes, alone).
    pub max_bytes: usize,
    /// Also report whether messages after `after` were already removed.
    pub check_gap: bool,
    /// The owner must know where the topic is before it answers (`ReplayPage::last_id`: every
    /// later message reaches the consumer live). With Valkey it may have to ask the stream
    /// (another relay may write it), and a failure is then an error. Without it a
    /// registration answers from memory at once and the position is learnt in the background
    /// (for a follow that catches up: its pages locate).
    pub locate: bool,
}

impl ReplayQuery {
    /// Registers interest, reads nothing, answers at once (a follow that catches up next).
    pub fn register_only() -> ReplayQuery {
        ReplayQuery {
            after: None,
            limit: 0,
            max_bytes: 0,
            check_gap: false,
            locate: false,
        }
    }

    /// Registers interest and learns where the topic is, reads nothing (a follow from now).
    pub fn register_and_locate() -> ReplayQuery {
        ReplayQuery {
            locate: true,
            ..ReplayQuery::register_only()
        }
    }
}

/// One page of history for a consumer catching up.
#[derive(Debug, Clone, Default)]
pub struct ReplayPage {
    pub messages: Vec<Message>,
    /// More messages follow the page.
    pub more: bool,
    /// Set when messages after the requested id were already removed.
    pub gap: Option<crate::store::GapInfo>,
    /// The topic's last id as the owner knew it when the interest was registered (read in the
    /// same step, before any await): every message after it reaches the consumer live. `None`
    /// when the owner's memory does not know the topic (never written, deleted, or a Valkey
    /// topic not written since start).
    pub last_id: Option<MessageId>,
}
