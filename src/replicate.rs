//! Cross-relay replication, per shard: the task that keeps the shard's hot tier a cache of
//! the Valkey streams and its append feed complete when other relays write the same streams
//! (the state and the reads are `store::stream_sync`; the design is in `docs/scaling.md`,
//! "Several relays on one Valkey").
//!
//! It hands what the shard's pub/sub connection pushes (feed notifications, subscription
//! confirmations, a lost connection) and the writer conflicts `ack: buffered` reports to the
//! storage, starts a worker task for each topic that has sync work (one per topic at a time,
//! so a topic's reads and feeds never interleave), and every
//! [`SAFETY_NET_PERIOD`] runs the safety net.
//! Which topics have followers comes from the shard's delivery registry: that is why this
//! lives above `store` and `delivery`, and takes the shard.

use std::rc::Rc;

use futures::StreamExt;

use crate::shard::Shard;
use crate::store::stream_sync::{SyncInputs, SAFETY_NET_PERIOD};
use crate::valkey::subscriber::PushEvent;

/// What the task reacts to.
enum Input {
    Push(PushEvent),
    Work(String),
    Conflict(String),
}

/// Runs until the shard shuts down (with the memory backend: returns at once).
pub async fn run(shard: Rc<Shard>) {
    let Some(SyncInputs {
        pushes,
        work,
        conflicts,
    }) = shard.storage.take_sync_inputs()
    else {
        return;
    };
    glommio::spawn_local(safety_net(shard.clone())).detach();
    let mut inputs = futures::stream::select(
        pushes.map(Input::Push),
        futures::stream::select(work.map(Input::Work), conflicts.map(Input::Conflict)),
    );
    while let Some(input) = inputs.next().await {
        if shard.is_shutting_down() {
            break;
        }
        match input {
            Input::Push(event) => shard.storage.on_push(event),
            Input::Conflict(topic) => shard.storage.on_writer_conflict(&topic),
            Input::Work(topic) => {
                let shard = shard.clone();
                glommio::spawn_local(async move { shard.storage.sync_worker(&topic).await })
                    .detach();
            }
        }
    }
}

/// The periodic safety net: topics nobody follows and memory no longer holds are dropped,
/// the others checked for entries no notification announced.
async fn safety_net(shard: Rc<Shard>) {
    while !shard.is_shutting_down() {
        glommio::timer::sleep(SAFETY_NET_PERIOD).await;
        let wanted = |topic: &str| {
            shard.delivery.has_local_interest(topic) || shard.delivery.has_remote_interest(topic)
        };
        shard.storage.safety_net(&wanted).await;
    }
}
