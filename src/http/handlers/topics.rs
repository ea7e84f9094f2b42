//! Topic resources: history pages, stats, listing, creation, trim, delete.
//!
//! With authentication on, every name is the caller's (`<user id>/<name>` once stored, see
//! [`Principal::topic`]); an admin reaches another user's topic with `?owner=<user id>`.

use serde::Deserialize;

use super::{bad_json, Reply};
use crate::auth::store::{iso8601, TopicRecord};
use crate::auth::{Permission, Principal};
use crate::clock::now_ms;
use crate::config::ApiConfig;
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::http::router::query_pairs;
use crate::shard::Shard;
use crate::store::hot_tier::{Order, PageQuery, TopicStats};
use crate::store::message::{write_message_json, write_rfc3339_millis, MessageId};
use crate::topic;

fn checked_topic(name: &str, limits: &ApiConfig) -> Result<(), ApiError> {
    Ok(topic::validate(name, limits.max_topic_name_len)?)
}

/// The stored name of the path's topic `name`, validated and `permission` on it checked: the
/// caller's own, or with `?owner=` another user's (admins only).
pub(super) fn stored_topic(
    permission: Permission,
    name: &str,
    query: Option<&str>,
    principal: &Principal,
    limits: &ApiConfig,
) -> Result<String, ApiError> {
    checked_topic(name, limits)?;
    let owner = query_pairs(query)
        .find(|(k, _)| k == "owner")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty());
    if owner.as_deref().is_some_and(|o| o.contains('/')) {
        return Err(ApiError::invalid_request("`owner` must be a user id"));
    }
    Ok(principal.topic_of(permission, owner.as_deref(), name)?)
}

/// The query of a history read, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    pub limit: usize,
    pub order: Order,
    pub cursor: Option<MessageId>,
}

/// Parses `limit`, `order` and `cursor` (alias `since`) of a history read.
pub fn parse_history_query(
    query: Option<&str>,
    limits: &ApiConfig,
) -> Result<HistoryQuery, ApiError> {
    let mut parsed = HistoryQuery {
        limit: limits.default_page_limit,
        order: Order::Desc,
        cursor: None,
    };
    for (key, value) in query_pairs(query) {
        match &*key {
            "limit" => {
                parsed.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=limits.max_page_limit).contains(l))
                    .ok_or_else(|| {
                        ApiError::invalid_request(format!(
                            "`limit` must be an integer from 1 to {}",
                            limits.max_page_limit
                        ))
                    })?;
            }
            "order" => {
                parsed.order = match &*value {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    _ => return Err(ApiError::invalid_request("`order` must be `asc` or `desc`")),
                };
            }
            "cursor" | "since" if !value.is_empty() => {
                parsed.cursor = Some(value.parse::<MessageId>().map_err(|_| {
                    ApiError::invalid_cursor(format!(
                        "`{key}` must be a message id such as 1700000000000-0"
                    ))
                })?);
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// The most payload bytes one history page carries: a page of `limit` 1 MiB messages would
/// otherwise hold ~1 GiB per request. A page cut by it has fewer than `limit` messages and a
/// `next_cursor` (a single larger message still comes, alone).
const HISTORY_PAGE_BYTES: usize = 8 << 20;

pub async fn history(
    shard: &Shard,
    name: &str,
    query: Option<&str>,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    principal.require(Permission::Read)?;
    let topic = stored_topic(Permission::Read, name, query, principal, &shard.config.api)?;
    let q = parse_history_query(query, &shard.config.api)?;
    let mut page_query = PageQuery::new(q.cursor, q.order, q.limit);
    page_query.max_bytes = HISTORY_PAGE_BYTES;
    let page = shard.read(topic.clone(), page_query).await?;
    let (messages, total, next_cursor) = match page {
        Some(p) => (p.messages, p.total, p.next_cursor),
        None => (Vec::new(), 0, None),
    };
    let mut body = Vec::with_capacity(
        128 + messages
            .iter()
            .map(|m| m.payload.len() + 160)
            .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"messages\":[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_message_json(&mut body, &topic, message);
    }
    body.extend_from_slice(b"],\"total\":");
    body.extend_from_slice(itoa::Buffer::new().format(total).as_bytes());
    body.extend_from_slice(b",\"limit\":");
    body.extend_from_slice(itoa::Buffer::new().format(q.limit).as_bytes());
    body.extend_from_slice(match q.order {
        Order::Asc => b",\"order\":\"asc\",\"cursor\":",
        Order::Desc => b",\"order\":\"desc\",\"cursor\":",
    });
    write_optional_id(&mut body, q.cursor);
    body.extend_from_slice(b",\"next_cursor\":");
    write_optional_id(&mut body, next_cursor);
    body.push(b'}');
    Ok(Reply::json(200, body))
}

fn write_optional_id(body: &mut Vec<u8>, id: Option<MessageId>) {
    match id {
        Some(id) => {
            body.push(b'"');
            id.write_to(body);
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
}

fn write_optional_time(body: &mut Vec<u8>, ms: Option<u64>) {
    match ms {
        Some(ms) => {
            body.push(b'"');
            write_rfc3339_millis(body, ms);
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
}

/// `{"topic", "length", "first_id", "last_id"}`, and with `detail` also timestamps and bytes.
fn write_topic(body: &mut Vec<u8>, stats: &TopicStats, detail: bool) {
    body.extend_from_slice(b"{\"topic\":\"");
    body.extend_from_slice(topic::public_name(&stats.name).as_bytes());
    if let Some(owner) = topic::owner_of(&stats.name) {
        // The Python relay's `TopicPublic` keys, which `pulsar-relay-client` checks.
        body.extend_from_slice(b"\",\"topic_name\":\"");
        body.extend_from_slice(topic::public_name(&stats.name).as_bytes());
        body.extend_from_slice(b"\",\"owner_id\":\"");
        body.extend_from_slice(owner.as_bytes());
    }
    body.extend_from_slice(b"\",\"length\":");
    body.extend_from_slice(itoa::Buffer::new().format(stats.length).as_bytes());
    body.extend_from_slice(b",\"first_id\":");
    write_optional_id(body, stats.first_id);
    body.extend_from_slice(b",\"last_id\":");
    write_optional_id(body, stats.last_id);
    if detail {
        body.extend_from_slice(b",\"oldest_timestamp\":");
        write_optional_time(body, stats.oldest_timestamp_ms);
        body.extend_from_slice(b",\"newest_timestamp\":");
        write_optional_time(body, stats.newest_timestamp_ms);
        body.extend_from_slice(b",\"bytes\":");
        body.extend_from_slice(itoa::Buffer::new().format(stats.bytes).as_bytes());
    }
    body.push(b'}');
}

pub async fn list(shard: &Shard, principal: &Principal) -> Result<Reply, ApiError> {
    let mut topics = shard.all_topics().await?;
    // The caller's own topics (the Python relay's rule, for admins too), those its grants let
    // it read when they name patterns.
    topics.retain(|t| {
        topic::owner_of(&t.name) == principal.namespace()
            && principal.may(Permission::Read, topic::public_name(&t.name))
    });
    let mut body = Vec::with_capacity(32 + topics.len() * 96);
    body.extend_from_slice(b"{\"topics\":[");
    for (i, stats) in topics.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_topic(&mut body, stats, false);
    }
    body.extend_from_slice(b"],\"total\":");
    body.extend_from_slice(itoa::Buffer::new().format(topics.len()).as_bytes());
    body.push(b'}');
    Ok(Reply::json(200, body))
}

pub async fn stats(
    shard: &Shard,
    name: &str,
    query: Option<&str>,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    let topic = stored_topic(Permission::Read, name, query, principal, &shard.config.api)?;
    let stats = match shard.stats(topic.clone()).await? {
        Some(stats) => stats,
        // Created through `POST /api/v1/topics` and not yet published to: it exists.
        None => match record_of(shard, &topic).await? {
            Some(_) => TopicStats::empty(&topic),
            None => return Err(unknown_topic(name)),
        },
    };
    let mut body = Vec::with_capacity(256);
    write_topic(&mut body, &stats, true);
    Ok(Reply::json(200, body))
}

/// The creation record of a stored topic name, if it has one.
async fn record_of(shard: &Shard, stored: &str) -> Result<Option<TopicRecord>, ApiError> {
    let owner = topic::owner_of(stored).unwrap_or("");
    Ok(shard
        .auth
        .store
        .topic(owner, topic::public_name(stored))
        .await?)
}

#[derive(Deserialize)]
struct CreateBody {
    topic_name: String,
    #[serde(default)]
    description: Option<String>,
}

/// `POST /api/v1/topics` `{"topic_name", "description"?}`: 201 with the Python relay's
/// `TopicPublic`; 409 when the caller already has the topic (created or published to);
/// 422 for an invalid name (never 400: `pulsar-relay-client` takes 400 as "exists").
pub async fn create(
    shard: &Shard,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    principal.require(Permission::Write)?;
    let body: CreateBody = serde_json::from_slice(request.body())
        .map_err(|e| ApiError::new(422, "VALIDATION_ERROR", format!("invalid JSON body: {e}")))?;
    topic::validate(&body.topic_name, shard.config.api.max_topic_name_len)
        .map_err(|e| ApiError::new(422, "INVALID_TOPIC", e.to_string()))?;
    let description = body.description.unwrap_or_default();
    if description.chars().count() > 500 {
        return Err(ApiError::new(
            422,
            "VALIDATION_ERROR",
            "`description` is at most 500 characters",
        ));
    }
    let stored = principal.topic(Permission::Write, &body.topic_name)?;
    let owner = principal.namespace().unwrap_or("").to_owned();
    let exists = || {
        ApiError::new(
            409,
            "TOPIC_EXISTS",
            format!(
                "Topic '{}' already exists for owner {owner}",
                body.topic_name
            ),
        )
    };
    if shard.stats(stored.clone()).await?.is_some() {
        return Err(exists());
    }
    let record = TopicRecord {
        topic_id: uuid::Uuid::new_v4().to_string(),
        name: body.topic_name.clone(),
        owner_id: owner.clone(),
        description,
        created_at: iso8601(now_ms() / 1000),
    };
    if !shard.auth.store.create_topic(&record).await? {
        return Err(exists());
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "topic_id": record.topic_id,
        "topic_name": record.name,
        "owner_id": record.owner_id,
        "created_at": record.created_at,
        "description": record.description,
    }))
    .map_err(|_| ApiError::internal())?;
    Ok(Reply::json(201, body))
}

#[derive(Deserialize)]
struct TrimBody {
    keep_count: Option<u64>,
}

pub async fn trim(
    shard: &Shard,
    name: &str,
    request: &Request,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    principal.require(Permission::Write)?;
    let topic = stored_topic(
        Permission::Write,
        name,
        request.query(),
        principal,
        &shard.config.api,
    )?;
    let body: TrimBody = serde_json::from_slice(request.body()).map_err(bad_json)?;
    let keep_count = body
        .keep_count
        .ok_or_else(|| ApiError::invalid_request("`keep_count` is required: an integer >= 0"))?;
    let keep_count = usize::try_from(keep_count).unwrap_or(usize::MAX);
    let removed = shard
        .trim(topic.clone(), keep_count)
        .await?
        .ok_or_else(|| unknown_topic(name))?;
    let body = serde_json::to_vec(&serde_json::json!({ "topic": name, "removed": removed }))
        .map_err(|_| ApiError::internal())?;
    Ok(Reply::json(200, body))
}

pub async fn delete(
    shard: &Shard,
    name: &str,
    query: Option<&str>,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    principal.require(Permission::Write)?;
    let topic = stored_topic(Permission::Write, name, query, principal, &shard.config.api)?;
    let record = record_of(shard, &topic).await?;
    if let Some(record) = &record {
        shard
            .auth
            .store
            .delete_topic(&record.owner_id, &record.name)
            .await?;
    }
    // A publish through this shard writes the record again.
    shard.auth.forget_topic_record(&topic);
    if shard.delete(topic.clone()).await? || record.is_some() {
        Ok(Reply::no_content())
    } else {
        Err(unknown_topic(name))
    }
}

fn unknown_topic(topic: &str) -> ApiError {
    ApiError::not_found(format!("topic `{topic}` does not exist"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ApiConfig {
        crate::http::handlers::default_api_limits()
    }

    #[test]
    fn history_query_defaults_and_aliases() {
        let l = limits();
        let q = parse_history_query(None, &l).expect("defaults");
        assert_eq!(
            q,
            HistoryQuery {
                limit: 10,
                order: Order::Desc,
                cursor: None
            }
        );
        let q = parse_history_query(Some("limit=5&order=asc&since=17-3"), &l).expect("valid");
        assert_eq!(
            q,
            HistoryQuery {
                limit: 5,
                order: Order::Asc,
                cursor: Some(MessageId { ms: 17, seq: 3 })
            }
        );
    }

    #[test]
    fn history_query_rejects_bad_values() {
        let l = limits();
        for (query, code) in [
            ("limit=0", "INVALID_REQUEST"),
            ("limit=1001", "INVALID_REQUEST"),
            ("limit=-1", "INVALID_REQUEST"),
            ("limit=abc", "INVALID_REQUEST"),
            ("order=up", "INVALID_REQUEST"),
            ("cursor=abc", "INVALID_CURSOR"),
            ("cursor=1-2-3", "INVALID_CURSOR"),
            ("since=%7B%7D", "INVALID_CURSOR"),
        ] {
            let err = parse_history_query(Some(query), &l).expect_err(query);
            assert_eq!((err.status, err.code), (400, code), "{query}");
        }
    }
}
