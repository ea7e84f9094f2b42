//! Consumer groups over HTTP (`/api/v1/topics/{topic}/groups/…`, see docs/work-queues.md):
//! creating, listing, showing, deleting and resetting groups, and the pull consumer of
//! workers that are not connected (poll, ack, nack).
//!
//! Managing a group needs `write` on the topic; listing and consuming need `read`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::topics::stored_topic;
use super::{bad_json, Reply};
use crate::auth::{Permission, Principal};
use crate::delivery::group::{claim_period, GroupWake, Registration};
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::http::router::GroupAction;
use crate::shard::Shard;
use crate::store::group::{
    validate_name, GroupError, GroupInfo, GroupSettings, GroupStart, Settled, TakeRequest,
    DEFAULT_ACK_TIMEOUT_MS, DEFAULT_MAX_DELIVERIES, MAX_ACK_TIMEOUT_MS, MAX_MAX_DELIVERIES,
    MIN_ACK_TIMEOUT_MS,
};
use crate::store::message::MessageId;
use crate::topic;

/// Most ids one ack or nack may name.
const MAX_IDS: usize = 1000;
/// Most messages one poll may ask for.
const MAX_POLL: usize = 1000;
/// The longest a poll may wait, in seconds.
const MAX_POLL_WAIT_SECS: f64 = 60.0;

impl From<GroupError> for ApiError {
    fn from(e: GroupError) -> ApiError {
        match e {
            GroupError::NotFound => ApiError::new(404, "GROUP_NOT_FOUND", "no such group"),
            GroupError::Exists => ApiError::new(
                409,
                "GROUP_EXISTS",
                "a group of that name exists on the topic",
            ),
            GroupError::Store(e) => ApiError::from(e),
        }
    }
}

fn invalid_group(message: String) -> ApiError {
    ApiError::new(400, "INVALID_GROUP", message)
}

fn invalid_consumer(message: String) -> ApiError {
    ApiError::new(400, "INVALID_CONSUMER", message)
}

/// Acts on one group request for `name` (the topic as the client knows it).
pub async fn handle(
    shard: &Shard,
    name: &str,
    action: GroupAction,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    let permission = match action {
        GroupAction::Create | GroupAction::Delete(_) | GroupAction::Reset(_) => Permission::Write,
        _ => Permission::Read,
    };
    principal.require(permission)?;
    let topic = stored_topic(
        permission,
        name,
        request.query(),
        principal,
        &shard.config.api,
    )?;
    if let Some(group) = action.group() {
        validate_name("group", group).map_err(invalid_group)?;
    }
    match action {
        GroupAction::List => {
            let groups = shard.group_list(topic.clone()).await?;
            let body = serde_json::json!({
                "topic": name,
                "groups": groups.iter().map(|g| group_json(name, g)).collect::<Vec<_>>(),
            });
            json(200, &body)
        }
        GroupAction::Create => create(shard, name, &topic, request, principal).await,
        GroupAction::Show(group) => {
            let info = shard.group_info(topic, group).await?;
            json(200, &group_json(name, &info))
        }
        GroupAction::Delete(group) => {
            if shard.group_delete(topic, group).await? {
                json(200, &serde_json::json!({ "deleted": true }))
            } else {
                Err(GroupError::NotFound.into())
            }
        }
        GroupAction::Reset(group) => {
            let body: ResetBody = serde_json::from_slice(request.body()).map_err(bad_json)?;
            let to = body
                .to
                .as_deref()
                .ok_or_else(|| {
                    ApiError::invalid_request("`to` is required: \"earliest\", \"last\" or an id")
                })
                .and_then(parse_start)?;
            shard.group_reset(topic.clone(), group.clone(), to).await?;
            let info = shard.group_info(topic, group).await?;
            json(200, &group_json(name, &info))
        }
        GroupAction::Poll(group) => poll(shard, topic, group, request).await,
        GroupAction::Ack(group) => {
            let (ids, _) = parse_ids(request)?;
            let settled = shard.group_ack(topic, group, ids).await?;
            settled_json("acked", &settled)
        }
        GroupAction::Nack(group) => {
            let (ids, consumer) = parse_ids(request)?;
            let settled = shard.group_release(topic, group, ids, consumer).await?;
            settled_json("nacked", &settled)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    group: Option<String>,
    start: Option<String>,
    ack_timeout: Option<f64>,
    max_deliveries: Option<i64>,
    dead_letter_topic: Option<String>,
}

#[derive(Deserialize)]
struct ResetBody {
    to: Option<String>,
}

#[derive(Deserialize)]
struct IdsBody {
    ids: Option<Vec<String>>,
    /// A nack with it releases only what this consumer holds.
    consumer: Option<String>,
}

#[derive(Deserialize)]
struct PollBody {
    consumer: Option<String>,
    max: Option<i64>,
    timeout: Option<f64>,
    max_in_flight: Option<i64>,
}

async fn create(
    shard: &Shard,
    name: &str,
    topic: &str,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    let body: CreateBody = serde_json::from_slice(request.body()).map_err(bad_json)?;
    let group = body
        .group
        .ok_or_else(|| invalid_group("`group` is required: the group's name".into()))?;
    validate_name("group", &group).map_err(invalid_group)?;
    let start = parse_start(body.start.as_deref().unwrap_or("last"))?;
    let ack_timeout_ms = match body.ack_timeout {
        None => DEFAULT_ACK_TIMEOUT_MS,
        Some(secs) => {
            let ms = secs * 1000.0;
            if !ms.is_finite() || ms < MIN_ACK_TIMEOUT_MS as f64 || ms > MAX_ACK_TIMEOUT_MS as f64 {
                return Err(ApiError::invalid_request(format!(
                    "`ack_timeout` is seconds from {} to {}",
                    MIN_ACK_TIMEOUT_MS as f64 / 1000.0,
                    MAX_ACK_TIMEOUT_MS / 1000
                )));
            }
            ms.round() as u64
        }
    };
    let max_deliveries = match body.max_deliveries {
        None => DEFAULT_MAX_DELIVERIES,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_MAX_DELIVERIES).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "`max_deliveries` is an integer from 1 to {MAX_MAX_DELIVERIES}"
                ))
            })?,
    };
    let dead_name = body
        .dead_letter_topic
        .unwrap_or_else(|| format!("{name}.dead"));
    topic::validate(&dead_name, shard.config.api.max_topic_name_len).map_err(|e| {
        ApiError::invalid_topic(format!(
            "dead-letter topic `{}`: {e}; name one with `dead_letter_topic`",
            dead_name.escape_debug()
        ))
    })?;
    if dead_name == name {
        return Err(ApiError::invalid_topic(
            "the dead-letter topic must not be the group's own topic",
        ));
    }
    let dead_letter_topic = stored_topic(
        Permission::Write,
        &dead_name,
        request.query(),
        principal,
        &shard.config.api,
    )?;
    let settings = GroupSettings {
        ack_timeout_ms,
        max_deliveries,
        dead_letter_topic,
    };
    shard
        .group_create(topic.to_owned(), group.clone(), settings, start)
        .await?;
    let info = shard.group_info(topic.to_owned(), group).await?;
    json(201, &group_json(name, &info))
}

/// A poll: at once what the consumer has room for; with nothing ready, waits up to
/// `timeout` for news of the topic or a due message.
async fn poll(
    shard: &Shard,
    topic: String,
    group: String,
    request: &Request,
) -> Result<Reply, ApiError> {
    let body: PollBody = serde_json::from_slice(request.body()).map_err(bad_json)?;
    let consumer = body
        .consumer
        .ok_or_else(|| invalid_consumer("`consumer` is required: the worker's name".into()))?;
    validate_name("consumer", &consumer).map_err(invalid_consumer)?;
    let max = match body.max {
        None => 10,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_POLL).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_request(format!("`max` is an integer from 1 to {MAX_POLL}"))
            })?,
    };
    let max_in_flight = match body.max_in_flight {
        None => None,
        Some(n) => Some(usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::invalid_request("`max_in_flight` is an integer of at least 1")
        })?),
    };
    let wait = match body.timeout {
        None => Duration::ZERO,
        Some(secs) if secs.is_finite() && (0.0..=MAX_POLL_WAIT_SECS).contains(&secs) => {
            Duration::from_secs_f64(secs)
        }
        Some(_) => {
            return Err(ApiError::invalid_request(format!(
                "`timeout` is seconds from 0 to {MAX_POLL_WAIT_SECS}"
            )))
        }
    };
    let deadline = Instant::now() + wait;
    let settings = shard
        .group_info(topic.clone(), group.clone())
        .await?
        .settings;
    let period = claim_period(settings.ack_timeout_ms);
    let wake = GroupWake::new();
    let mut parked: Option<(Registration<'_>, ParkedCount<'_>)> = None;
    loop {
        let room = match max_in_flight {
            None => max,
            Some(limit) => {
                let held = shard
                    .group_held_by(topic.clone(), group.clone(), consumer.clone())
                    .await?;
                limit.saturating_sub(held).min(max)
            }
        };
        if room > 0 {
            let messages = shard
                .group_take(
                    topic.clone(),
                    group.clone(),
                    TakeRequest {
                        consumer: consumer.clone(),
                        max: room,
                        claim: true,
                        held: Vec::new(),
                    },
                )
                .await?;
            if !messages.is_empty() {
                let mut out = Vec::with_capacity(256 * messages.len());
                out.extend_from_slice(b"{\"messages\":[");
                for (i, m) in messages.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    m.write_json(&mut out, &topic, &group);
                }
                out.extend_from_slice(b"],\"group\":");
                serde_json::to_writer(&mut out, &group).map_err(|_| ApiError::internal())?;
                out.push(b'}');
                return Ok(Reply::json(200, out));
            }
        }
        let now = Instant::now();
        if now >= deadline || shard.is_shutting_down() {
            return json(
                200,
                &serde_json::json!({ "messages": [], "group": group, "timeout": true }),
            );
        }
        if parked.is_none() {
            if !shard
                .delivery
                .try_park(shard.config.longpoll.max_parked_per_shard)
            {
                return Err(ApiError::unavailable(
                    "too many parked polls on this shard; retry shortly",
                ));
            }
            let counted = ParkedCount(shard);
            let registration = Registration::new(shard, &Arc::from(topic.as_str()), &wake).await?;
            parked = Some((registration, counted));
            // News between the take and the registration woke nobody: take again first.
            continue;
        }
        let nap = deadline.saturating_duration_since(now).min(period);
        let woken = Box::pin(wake.wait());
        let timer = Box::pin(glommio::timer::sleep(nap));
        let stop = Box::pin(shard.shutdown.wait());
        let _ = futures::future::select(woken, futures::future::select(timer, stop)).await;
    }
}

/// A parked group poll, counted against `longpoll.max_parked_per_shard` while it lives.
struct ParkedCount<'a>(&'a Shard);

impl Drop for ParkedCount<'_> {
    fn drop(&mut self) {
        self.0.delivery.unpark();
    }
}

fn parse_start(value: &str) -> Result<GroupStart, ApiError> {
    match value {
        "earliest" => Ok(GroupStart::Earliest),
        "last" => Ok(GroupStart::Last),
        id => id.parse::<MessageId>().map(GroupStart::After).map_err(|_| {
            ApiError::invalid_request(format!(
                "`{}` is not \"earliest\", \"last\" or a message id such as 1700000000000-0",
                id.escape_debug()
            ))
        }),
    }
}

/// The body's `ids`, and its `consumer` if named.
fn parse_ids(request: &Request) -> Result<(Vec<MessageId>, Option<String>), ApiError> {
    let body: IdsBody = serde_json::from_slice(request.body()).map_err(bad_json)?;
    if let Some(consumer) = &body.consumer {
        validate_name("consumer", consumer).map_err(invalid_consumer)?;
    }
    let ids = body
        .ids
        .ok_or_else(|| ApiError::invalid_request("`ids` is required: an array of message ids"))?;
    if ids.len() > MAX_IDS {
        return Err(ApiError::invalid_request(format!(
            "at most {MAX_IDS} ids at once"
        )));
    }
    let ids = ids
        .iter()
        .map(|id| {
            id.parse::<MessageId>().map_err(|_| {
                ApiError::invalid_request(format!("`{}` is not a message id", id.escape_debug()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ids, body.consumer))
}

fn settled_json(what: &str, settled: &Settled) -> Result<Reply, ApiError> {
    let ids = |v: &[MessageId]| v.iter().map(|id| id.to_string()).collect::<Vec<_>>();
    let mut body = serde_json::Map::new();
    body.insert(what.to_owned(), settled.done.len().into());
    body.insert(format!("{what}_ids"), ids(&settled.done).into());
    body.insert("unknown".to_owned(), ids(&settled.unknown).into());
    json(200, &serde_json::Value::Object(body))
}

/// A group as every answer shows it (see docs/work-queues.md).
pub fn group_json(topic: &str, info: &GroupInfo) -> serde_json::Value {
    serde_json::json!({
        "topic": topic,
        "group": info.name,
        "ack_timeout": info.settings.ack_timeout_ms as f64 / 1000.0,
        "max_deliveries": info.settings.max_deliveries,
        "dead_letter_topic": topic::public_name(&info.settings.dead_letter_topic),
        "last_delivered_id": info.last_delivered.map(|id| id.to_string()),
        "pending": info.pending,
        "lag": info.lag,
        "lag_seconds": info.lag_ms.map(|ms| ms as f64 / 1000.0),
        "consumers": info.consumers.iter().map(|c| serde_json::json!({
            "name": c.name,
            "pending": c.pending,
            "idle_ms": c.idle_ms,
        })).collect::<Vec<_>>(),
    })
}

fn json(status: u16, body: &serde_json::Value) -> Result<Reply, ApiError> {
    Ok(Reply::json(
        status,
        serde_json::to_vec(body).map_err(|_| ApiError::internal())?,
    ))
}
