//! Consumer-group operations as owner-calls: each runs on the shard owning the topic (whose
//! [`Storage`](crate::store::Storage) holds the memory backend's groups and the Valkey
//! connections routed by the topic), and takes care there of what follows from it:
//! dead letters published and acknowledged, the group's metrics, and waking the consumers
//! of a released message.

use std::time::Duration;

use bytes::Bytes;

use crate::clock::now_ms;
use crate::metrics::GroupEvent;
use crate::store::group::{
    GroupError, GroupInfo, GroupMessage, GroupSettings, GroupStart, Settled, TakeRequest,
};
use crate::store::message::MessageId;
use crate::store::{PublishItem, StoreError};

use super::{Shard, ShardError};

/// How often the owner reads a group's pending count and lag for the gauges at most.
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

fn lost(e: ShardError) -> GroupError {
    match e {
        ShardError::Store(e) => GroupError::Store(e),
        other => GroupError::Store(StoreError::Unavailable(other.to_string())),
    }
}

impl Shard {
    pub async fn group_create(
        &self,
        topic: String,
        group: String,
        settings: GroupSettings,
        start: GroupStart,
    ) -> Result<(), GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            owner
                .storage
                .group_create(&topic, &group, settings, start)
                .await
        })
        .await
        .map_err(lost)?
    }

    pub async fn group_delete(&self, topic: String, group: String) -> Result<bool, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            owner.storage.group_delete(&topic, &group).await
        })
        .await
        .map_err(lost)?
    }

    pub async fn group_reset(
        &self,
        topic: String,
        group: String,
        to: GroupStart,
    ) -> Result<(), GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            owner.storage.group_reset(&topic, &group, to).await
        })
        .await
        .map_err(lost)?
    }

    pub async fn group_list(&self, topic: String) -> Result<Vec<GroupInfo>, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            owner.storage.group_list(&topic, now_ms()).await
        })
        .await
        .map_err(lost)?
    }

    pub async fn group_info(&self, topic: String, group: String) -> Result<GroupInfo, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            owner.storage.group_info(&topic, &group, now_ms()).await
        })
        .await
        .map_err(lost)?
    }

    /// Messages `consumer` holds in the group and that are not due yet (a due message's
    /// place is free: the group may give it to anyone, this consumer included).
    pub async fn group_held_by(
        &self,
        topic: String,
        group: String,
        consumer: String,
    ) -> Result<usize, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            owner
                .storage
                .group_held_by(&topic, &group, &consumer, now_ms())
                .await
        })
        .await
        .map_err(lost)?
    }

    /// Hands a consumer up to `request.max` messages of the group (due ones first with
    /// `request.claim`); the dead ones the take found are dead-lettered on the way.
    pub async fn group_take(
        &self,
        topic: String,
        group: String,
        request: TakeRequest,
    ) -> Result<Vec<GroupMessage>, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            let claim = request.claim;
            let taken = owner
                .storage
                .group_take(&topic, &group, &request, now_ms())
                .await?;
            if !taken.dead.is_empty() {
                owner.dead_letter(&topic, &group, taken.dead).await?;
            }
            let metrics = &owner.metrics;
            if !taken.messages.is_empty() {
                metrics.group(
                    &topic,
                    &group,
                    GroupEvent::Delivered(taken.messages.len() as u64),
                );
            }
            if taken.redelivered > 0 {
                metrics.group(
                    &topic,
                    &group,
                    GroupEvent::Redelivered(taken.redelivered as u64),
                );
            }
            if claim {
                owner.refresh_group_gauges(&topic, &group).await;
            }
            Ok(taken.messages)
        })
        .await
        .map_err(lost)?
    }

    pub async fn group_ack(
        &self,
        topic: String,
        group: String,
        ids: Vec<MessageId>,
    ) -> Result<Settled, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            let settled = owner.storage.group_ack(&topic, &group, &ids, false).await?;
            if !settled.done.is_empty() {
                owner
                    .metrics
                    .group(&topic, &group, GroupEvent::Acked(settled.done.len() as u64));
            }
            Ok(settled)
        })
        .await
        .map_err(lost)?
    }

    /// Makes `ids` due at once (a `nack`; with `consumer`, only those it holds) and wakes
    /// the group's consumers on this relay.
    pub async fn group_release(
        &self,
        topic: String,
        group: String,
        ids: Vec<MessageId>,
        consumer: Option<String>,
    ) -> Result<Settled, GroupError> {
        let owner = self.owner_of(&topic);
        self.invoke_on(owner, async move |owner: &Shard| {
            let settled = owner
                .storage
                .group_release(&topic, &group, &ids, consumer.as_deref(), now_ms())
                .await?;
            if !settled.done.is_empty() {
                owner.wake_group_consumers(&topic, true);
            }
            Ok(settled)
        })
        .await
        .map_err(lost)?
    }

    /// Owner side: wakes the group consumers of `topic` here and on every shard with
    /// consumers of it; `claim`: they look for due messages too.
    pub fn wake_group_consumers(&self, topic: &str, claim: bool) {
        self.delivery.wake_groups(topic, claim);
        for shard in self.delivery.interested_shards(topic) {
            let topic = topic.to_owned();
            // No reply: a shard that stopped has no consumer left to wake.
            let _ = self.post(shard, async move |consumers: &Shard| {
                consumers.delivery.wake_groups(&topic, claim);
            });
        }
    }

    /// Publishes dead messages to the group's dead-letter topic (idempotently: the key names
    /// the group and the message, so a relay that dies before the acknowledgement and the
    /// one that takes over store it once), then acknowledges them in the group. A failed
    /// publish leaves them with the dead-letter holder: due again after the timeout.
    async fn dead_letter(
        &self,
        topic: &str,
        group: &str,
        dead: Vec<GroupMessage>,
    ) -> Result<(), GroupError> {
        let settings = self.storage.group_settings(topic, group).await?;
        let target = settings.dead_letter_topic.clone();
        let items: Vec<PublishItem> = dead
            .iter()
            .map(|d| PublishItem {
                topic: target.clone(),
                payload: d.message.payload.clone(),
                metadata: Some(dead_letter_metadata(topic, group, d)),
                ttl_ms: None,
                // The source topic too: several topics may share one dead-letter topic, and
                // their ids collide.
                idempotency_key: Some(format!("dead:{topic}:{group}:{}", d.message.id)),
            })
            .collect();
        let owner = self.owner_of(&target);
        let results = self.publish_on(owner, items).await.map_err(lost)?;
        let stored: Vec<MessageId> = dead
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(d, _)| d.message.id)
            .collect();
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            tracing::warn!(topic, group, error = %e, "dead-letter publish failed; retried after the ack timeout");
        }
        if !stored.is_empty() {
            let settled = self.storage.group_ack(topic, group, &stored, true).await?;
            self.metrics.group(
                topic,
                group,
                GroupEvent::DeadLettered(settled.done.len() as u64),
            );
        }
        Ok(())
    }

    /// Reads the group's pending count and lag for the gauges, at most once a
    /// [`GAUGE_PERIOD`] (owner side).
    async fn refresh_group_gauges(&self, topic: &str, group: &str) {
        if self
            .metrics
            .group_gauged_at(topic, group)
            .is_some_and(|at| at.elapsed() < GAUGE_PERIOD)
        {
            return;
        }
        if let Ok(info) = self.storage.group_info(topic, group, now_ms()).await {
            self.metrics
                .group_gauges(topic, group, info.pending, info.lag);
        }
    }
}

/// The original message's metadata plus `original_id`, `original_topic`, `group` and
/// `delivery_count` (which replace keys of those names).
fn dead_letter_metadata(topic: &str, group: &str, dead: &GroupMessage) -> Bytes {
    let mut map: serde_json::Map<String, serde_json::Value> = dead
        .message
        .metadata
        .as_ref()
        .and_then(|m| serde_json::from_slice(m).ok())
        .unwrap_or_default();
    let mut set = |k: &str, v: String| {
        map.insert(k.to_owned(), serde_json::Value::String(v));
    };
    set("original_id", dead.message.id.to_string());
    set(
        "original_topic",
        crate::topic::public_name(topic).to_owned(),
    );
    set("group", group.to_owned());
    set("delivery_count", dead.delivery_count.to_string());
    Bytes::from(serde_json::to_vec(&map).unwrap_or_else(|_| b"{}".to_vec()))
}
