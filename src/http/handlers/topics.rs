//! Topic resources: history pages, stats, listing, trim, delete.

use serde::Deserialize;

use super::{bad_json, Reply};
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

pub async fn history(shard: &Shard, topic: String, query: Option<&str>) -> Result<Reply, ApiError> {
    checked_topic(&topic, &shard.config.api)?;
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
    body.extend_from_slice(stats.name.as_bytes());
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

pub async fn list(shard: &Shard) -> Result<Reply, ApiError> {
    let topics = shard.all_topics().await?;
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

pub async fn stats(shard: &Shard, topic: String) -> Result<Reply, ApiError> {
    checked_topic(&topic, &shard.config.api)?;
    let stats = shard
        .stats(topic.clone())
        .await?
        .ok_or_else(|| unknown_topic(&topic))?;
    let mut body = Vec::with_capacity(256);
    write_topic(&mut body, &stats, true);
    Ok(Reply::json(200, body))
}

#[derive(Deserialize)]
struct TrimBody {
    keep_count: Option<u64>,
}

pub async fn trim(shard: &Shard, topic: String, request: &Request) -> Result<Reply, ApiError> {
    checked_topic(&topic, &shard.config.api)?;
    let body: TrimBody = serde_json::from_slice(request.body()).map_err(bad_json)?;
    let keep_count = body
        .keep_count
        .ok_or_else(|| ApiError::invalid_request("`keep_count` is required: an integer >= 0"))?;
    let keep_count = usize::try_from(keep_count).unwrap_or(usize::MAX);
    let removed = shard
        .trim(topic.clone(), keep_count)
        .await?
        .ok_or_else(|| unknown_topic(&topic))?;
    let body = serde_json::to_vec(&serde_json::json!({ "topic": topic, "removed": removed }))
        .map_err(|_| ApiError::internal())?;
    Ok(Reply::json(200, body))
}

pub async fn delete(shard: &Shard, topic: String) -> Result<Reply, ApiError> {
    checked_topic(&topic, &shard.config.api)?;
    if shard.delete(topic.clone()).await? {
        Ok(Reply::no_content())
    } else {
        Err(unknown_topic(&topic))
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
