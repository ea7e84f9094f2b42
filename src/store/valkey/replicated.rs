//! `ack: replicated`: a 201 means "stored on the master and on `durability.replicas`
//! replicas".
//!
//! A publish's commands are queued exactly as with `ack: persisted`, marked so that the
//! pipeline batch carrying them ends with one `WAIT <replicas> <timeout>` on the same
//! connection (the client appends it: one per group-commit batch, however many publishes
//! share it; see [`crate::valkey::Client::try_submit_replicated`]). `WAIT` counts the replicas
//! that acknowledged every write of that connection up to it, so one reply covers the whole
//! batch. A stored message is acknowledged only if that count reached `durability.replicas`;
//! otherwise the producer gets 503 although the master stored the message: an ambiguous
//! answer (it survives unless the master is lost before a replica gets it; a retry may store
//! it twice). Such a message is treated like any other ambiguous 503 (a reply lost with its
//! connection): it does not enter the hot tier, so live consumers never receive it; a
//! consumer reading history from Valkey sees it if it survived. Live consumers thus get only
//! messages the replicas have, never one a failover could take back (a manual failover test
//! delivered 6 such messages before this rule).
//!
//! Why `WAIT` and not `WAITAOF`: a failover promotes a replica from its memory, so "a replica
//! has it" is what survives the master's loss; `WAITAOF` would add "fsynced to an AOF", at the
//! price of up to one `appendfsync everysec` period (a second) per batch, and it needs AOF on
//! every replica. It protects only against losing master and replicas together, which
//! `appendfsync always` on the replicas covers without slowing every publish.
//!
//! The buffered write-behind (`behind.rs`) is not affected: `ack: buffered` answers before
//! Valkey is written at all.
//!
//! Entries read from the stream for live delivery (the stream sync's repairs: other relays'
//! publishes, or this relay's own answered 503) are held to the same rule: before they are
//! handed out, [`ValkeyTier::replication_fence`] makes sure the replicas have them. `WAIT`
//! counts only the waiting connection's own writes, so the fence writes first (one
//! `HINCRBY` of a counter in the topic's meta hash, on the connection that read the entries,
//! after the read): replication is one ordered stream, so replicas that acknowledged that
//! write have every entry the read returned.
//!
//! Kept apart from `publish.rs` so the persisted path stays one function with two small hooks:
//! [`ValkeyTier::submit_publish`] and [`ValkeyTier::replicated_or_unavailable`].

use futures::future::Either;
use futures::FutureExt;

use super::ValkeyTier;
use crate::config::AckMode;
use crate::store::message::Message;
use crate::store::StoreError;
use crate::valkey::{Command, Reply, ValkeyError};

/// Per command of a submitted publish, its batch's `WAIT` reply (`ack: replicated` only).
pub(super) type WaitReplies = Option<Vec<Result<Reply, ValkeyError>>>;

impl ValkeyTier {
    /// Queues a publish's commands now; with `ack: replicated` their batches end with the
    /// `WAIT`. The future gives the replies and, in that mode, each command's `WAIT` reply.
    #[allow(clippy::type_complexity)]
    pub(super) fn submit_publish(
        &self,
        commands: &[Command],
    ) -> Result<
        impl std::future::Future<Output = (Vec<Result<Reply, ValkeyError>>, WaitReplies)> + 'static,
        ValkeyError,
    > {
        if self.ack == AckMode::Replicated {
            let call = self.client.try_submit_replicated(commands)?;
            Ok(Either::Left(
                call.map(|(replies, waits)| (replies, Some(waits))),
            ))
        } else {
            let call = self.client.try_submit(commands)?;
            Ok(Either::Right(call.map(|replies| (replies, None))))
        }
    }

    /// The producer's answer for a message the master `stored`, given its batch's `WAIT`
    /// reply (`None`: not `ack: replicated`, the stored message is acknowledged as is).
    /// Fewer replicas than required, or no `WAIT` reply at all: 503, the message possibly
    /// stored.
    pub(super) fn replicated_or_unavailable(
        &self,
        stored: Result<Message, StoreError>,
        wait: Option<&Result<Reply, ValkeyError>>,
    ) -> Result<Message, StoreError> {
        let (Ok(message), Some(wait)) = (&stored, wait) else {
            return stored;
        };
        let Some(required) = self.client.wait_for() else {
            return stored;
        };
        let confirmed = match wait {
            Ok(Reply::Integer(n)) => *n,
            Ok(other) => {
                return Err(self.not_replicated(format!("unexpected WAIT reply {other:?}")));
            }
            Err(e) => return Err(self.not_replicated(format!("no WAIT reply: {e}"))),
        };
        if confirmed >= i64::from(required.replicas) {
            return stored;
        }
        Err(self.not_replicated(format!(
            "message {} stored on the master but acknowledged by {confirmed} of {} replicas \
             within {:?}: it may be lost in a failover, or stored (a retry may duplicate it)",
            message.id, required.replicas, required.timeout
        )))
    }

    /// `ack: replicated`: resolves once `durability.replicas` replicas have everything read
    /// from `topic`'s stream so far on its connection (see the module doc); an error when too
    /// few acknowledged in time (the caller reads again later). Other modes: at once.
    pub async fn replication_fence(&self, topic: &str) -> Result<(), StoreError> {
        if self.ack != AckMode::Replicated {
            return Ok(());
        }
        let meta = self.meta_key.render(topic);
        let fence = super::on(topic, &[b"HINCRBY", meta.as_bytes(), b"sync_fence", b"1"]);
        self.count("fence", 1);
        let (replies, waits) = self
            .client
            .try_submit_replicated(std::slice::from_ref(&fence))
            .map_err(super::store_error)?
            .await;
        if let Some(Err(e)) = replies.into_iter().next() {
            return Err(super::store_error(e));
        }
        let Some(required) = self.client.wait_for() else {
            return Ok(());
        };
        match waits.first() {
            Some(Ok(Reply::Integer(n))) if *n >= i64::from(required.replicas) => Ok(()),
            other => Err(StoreError::Unavailable(format!(
                "entries read for delivery not yet on {} replicas ({other:?})",
                required.replicas
            ))),
        }
    }

    fn not_replicated(&self, why: String) -> StoreError {
        self.replication_short.set(self.replication_short.get() + 1);
        StoreError::Unavailable(why)
    }
}
