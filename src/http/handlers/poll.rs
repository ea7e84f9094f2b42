//! Long-poll endpoints: `POST /messages/poll` (the Python relay's form) and `GET /api/v1/poll`.
//!
//! Parses and validates the request into a [`PollRequest`], lets delivery answer it
//! ([`crate::delivery::longpoll::poll`]), and renders the JSON answer: `messages`,
//! `has_more`, `next_offset` for every requested topic, `timeout` and `gaps` when they apply.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Reply;
use crate::config::LongPollConfig;
use crate::delivery::longpoll::{self, PollAnswer, PollError, PollRequest, Standing};
use crate::delivery::sink::Delivered;
use crate::delivery::{Gap, StartAt};
use crate::http::error::ApiError;
use crate::http::json::{array_up_to, object_up_to, Bounded};
use crate::shard::Shard;
use crate::sse::Position;
use crate::store::message::MessageId;

/// Answers a validated poll.
pub async fn poll(shard: &Shard, request: PollRequest) -> Result<Reply, ApiError> {
    let answer = longpoll::poll(shard, request).await.map_err(|e| match e {
        PollError::TooManyParked => ApiError::unavailable(e.to_string()),
        PollError::Shard(e) => ApiError::from(e),
    })?;
    Ok(Reply::json(200, render(&answer)))
}

/// `topics` and `since` stay raw until counted ([`crate::http::json`]): a 16 MiB body of
/// empty topic names would otherwise be millions of `String`s before the length check.
#[derive(Deserialize)]
struct PollBody<'a> {
    #[serde(borrow)]
    topics: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    timeout: Option<f64>,
    limit: Option<u64>,
}

/// `POST /messages/poll` body: `{topics, since?: {topic: id}, timeout?, limit?}`. With
/// `since`, a listed topic without an id is read from its oldest message (the Python relay's
/// clients rely on that to get what was published before their first poll); without `since`
/// the poll waits for new messages only.
pub fn parse_poll_body(
    body: &[u8],
    limits: &LongPollConfig,
    max_topic_len: usize,
) -> Result<PollRequest, ApiError> {
    let body: PollBody = serde_json::from_slice(body).map_err(crate::http::handlers::bad_json)?;
    let max = limits.max_topics;
    let topics: Vec<String> = match body.topics.map(|raw| array_up_to(raw, max)) {
        None => Vec::new(),
        Some(Ok(topics)) => topics,
        Some(Err(Bounded::TooMany)) => return Err(topic_count_error(max)),
        Some(Err(Bounded::Invalid)) => {
            return Err(ApiError::invalid_request(
                "`topics` must be an array of topic names",
            ))
        }
    };
    // Later entries win, as with any JSON object reader.
    let since: Option<BTreeMap<String, String>> = match body.since.map(|raw| object_up_to(raw, max))
    {
        None => None,
        Some(Ok(entries)) => Some(entries.into_iter().collect()),
        Some(Err(Bounded::TooMany)) => {
            return Err(ApiError::invalid_request(format!(
                "`since` must name at most {max} topics"
            )))
        }
        Some(Err(Bounded::Invalid)) => {
            return Err(ApiError::invalid_request(
                "`since` must be an object of topic name to message id",
            ))
        }
    };
    let mut starts = Vec::with_capacity(topics.len());
    for topic in topics {
        let start = match &since {
            None => StartAt::Last,
            Some(map) => match map.get(&topic) {
                None => StartAt::Earliest,
                Some(id) => StartAt::After(parse_id(id)?),
            },
        };
        starts.push((topic, start));
    }
    finish(starts, body.timeout, body.limit, limits, max_topic_len)
}

/// `GET /api/v1/poll?topics=a,b&since=<position>&timeout=&limit=`. `since` is a
/// [`Position`]: one id for every topic, or one per topic (`a=<id>,b=<id>`, a topic left out
/// read from its oldest message), as `next_offset` gives them.
pub fn parse_poll_query(
    query: Option<&str>,
    limits: &LongPollConfig,
    max_topic_len: usize,
) -> Result<PollRequest, ApiError> {
    let mut topics = Vec::new();
    let mut since = None;
    let mut timeout = None;
    let mut limit = None;
    for (key, value) in crate::http::router::query_pairs(query) {
        match &*key {
            "topics" | "topic" => crate::http::router::split_topics(&value, &mut topics),
            "since" | "cursor" if !value.is_empty() => {
                since = Some(Position::parse(&value, max_topic_len).map_err(|_| {
                    ApiError::invalid_cursor(
                        "`since` must be a message id such as 1700000000000-0, or one per \
                         topic such as a=1700000000000-0,b=1700000000001-3",
                    )
                })?)
            }
            "timeout" => {
                timeout = Some(value.parse::<f64>().map_err(|_| {
                    ApiError::invalid_request("`timeout` must be a number of seconds")
                })?)
            }
            "limit" => {
                limit =
                    Some(value.parse::<u64>().map_err(|_| {
                        ApiError::invalid_request("`limit` must be a positive integer")
                    })?)
            }
            _ => {}
        }
    }
    let starts = topics
        .into_iter()
        .map(|t| {
            let start = since.as_ref().map_or(StartAt::Last, |p| p.start_for(&t));
            (t, start)
        })
        .collect();
    finish(starts, timeout, limit, limits, max_topic_len)
}

fn parse_id(id: &str) -> Result<MessageId, ApiError> {
    id.parse().map_err(|_| {
        ApiError::invalid_cursor("`since` must hold message ids such as 1700000000000-0")
    })
}

fn topic_count_error(max: usize) -> ApiError {
    ApiError::invalid_request(format!("`topics` must list 1 to {max} topics"))
}

fn finish(
    mut topics: Vec<(String, StartAt)>,
    timeout: Option<f64>,
    limit: Option<u64>,
    limits: &LongPollConfig,
    max_topic_len: usize,
) -> Result<PollRequest, ApiError> {
    // A topic named twice is polled once (the first mention's start: starts come from
    // `since`, which is per topic, so both mentions have the same one).
    let mut seen = std::collections::HashSet::new();
    topics.retain(|(t, _)| seen.insert(t.clone()));
    if topics.is_empty() || topics.len() > limits.max_topics {
        return Err(topic_count_error(limits.max_topics));
    }
    for (topic, _) in &topics {
        crate::topic::validate(topic, max_topic_len)?;
    }
    let max_timeout = limits.max_timeout.as_secs_f64();
    let timeout = match timeout {
        None => limits.default_timeout,
        Some(t) if t.is_finite() && (1.0..=max_timeout).contains(&t) => Duration::from_secs_f64(t),
        Some(_) => {
            return Err(ApiError::invalid_request(format!(
                "`timeout` must be 1 to {max_timeout} seconds"
            )))
        }
    };
    let limit = match limit {
        None => limits.default_limit,
        Some(l) if l >= 1 && l as usize <= limits.max_limit => l as usize,
        Some(_) => {
            return Err(ApiError::invalid_request(format!(
                "`limit` must be 1 to {}",
                limits.max_limit
            )))
        }
    };
    Ok(PollRequest {
        topics,
        timeout,
        limit,
    })
}

/// `"gaps":[…]` before the closing brace of an answer; nothing when there is no gap, so the
/// common answer keeps the Python relay's shape exactly.
fn write_gaps(body: &mut Vec<u8>, gaps: &[Gap]) {
    if gaps.is_empty() {
        return;
    }
    body.extend_from_slice(b",\"gaps\":[");
    for (i, gap) in gaps.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        gap.write_json(body);
    }
    body.push(b']');
}

/// `"next_offset":{"topic":"id",…}` for every requested topic, in request order.
fn write_next_offset(
    body: &mut Vec<u8>,
    standing: &[Standing],
    delivered: &HashMap<&str, MessageId>,
    first_left_out: &HashMap<&str, MessageId>,
) {
    body.extend_from_slice(b",\"next_offset\":{");
    for (i, topic) in standing.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let name: &str = &topic.topic;
        let id = topic.next_offset(
            delivered.get(name).copied(),
            first_left_out.get(name).copied(),
        );
        body.push(b'"');
        body.extend_from_slice(crate::topic::public_name(name).as_bytes());
        body.extend_from_slice(b"\":\"");
        id.write_to(body);
        body.push(b'"');
    }
    body.push(b'}');
}

fn render(answer: &PollAnswer) -> Vec<u8> {
    if answer.timed_out {
        return render_timeout(&answer.standing, &answer.gaps);
    }
    render_messages(
        &answer.messages,
        &answer.left_out,
        answer.has_more,
        &answer.standing,
        &answer.gaps,
    )
}

fn render_timeout(standing: &[Standing], gaps: &[Gap]) -> Vec<u8> {
    let mut body = br#"{"messages":[],"has_more":false,"timeout":true"#.to_vec();
    write_next_offset(&mut body, standing, &HashMap::new(), &HashMap::new());
    write_gaps(&mut body, gaps);
    body.push(b'}');
    body
}

fn render_messages(
    messages: &[Rc<Delivered>],
    left_out: &[Rc<Delivered>],
    has_more: bool,
    standing: &[Standing],
    gaps: &[Gap],
) -> Vec<u8> {
    let mut body =
        Vec::with_capacity(64 + messages.iter().map(|d| d.json().len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"messages\":[");
    let mut delivered: HashMap<&str, MessageId> = HashMap::new();
    for (i, d) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(d.json());
        // Oldest first: the last one seen per topic is its newest.
        delivered.insert(&d.topic, d.id());
    }
    let mut first_left_out: HashMap<&str, MessageId> = HashMap::new();
    for d in left_out {
        first_left_out.entry(&d.topic).or_insert(d.id());
    }
    body.extend_from_slice(if has_more {
        b"],\"has_more\":true"
    } else {
        b"],\"has_more\":false"
    });
    write_next_offset(&mut body, standing, &delivered, &first_left_out);
    write_gaps(&mut body, gaps);
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> MessageId {
        MessageId::new(ms, seq)
    }

    #[test]
    fn get_poll_since_takes_one_id_or_one_per_topic_and_topics_once() {
        let l = limits();
        let poll =
            parse_poll_query(Some("topics=a,b,a&since=a%3D5-0,b=6-1"), &l, 255).expect("valid");
        assert_eq!(
            poll.topics,
            vec![
                ("a".to_owned(), StartAt::After(id(5, 0))),
                ("b".to_owned(), StartAt::After(id(6, 1)))
            ]
        );
        let poll = parse_poll_query(Some("topics=a,b&since=b=6-1"), &l, 255).expect("valid");
        assert_eq!(poll.topics[0], ("a".to_owned(), StartAt::Earliest));
        let poll = parse_poll_query(Some("topics=a,b&since=6-1"), &l, 255).expect("valid");
        assert!(poll
            .topics
            .iter()
            .all(|(_, s)| *s == StartAt::After(id(6, 1))));
        let poll = parse_poll_query(Some("topics=a,b"), &l, 255).expect("valid");
        assert!(poll.topics.iter().all(|(_, s)| *s == StartAt::Last));
        let e = parse_poll_query(Some("topics=a&since=a=x"), &l, 255).expect_err("bad");
        assert_eq!(e.status, 400);
        // Named more often than the limit allows, but few distinct topics: counted once each.
        let many = vec!["a"; l.max_topics + 5].join(",");
        let poll = parse_poll_query(Some(&format!("topics={many}")), &l, 255).expect("valid");
        assert_eq!(poll.topics.len(), 1);
    }

    fn limits() -> LongPollConfig {
        crate::config::built_in().longpoll
    }

    /// A 16 MiB poll body of empty topic names used to become ~5.6 million `String`s (a
    /// relay high-water mark of ~400 MiB for one request) before the count was checked.
    #[test]
    fn poll_topics_and_since_are_counted_while_read() {
        let l = limits();
        let names = |n: usize| (0..n).map(|i| format!("\"t{i}\"")).collect::<Vec<_>>();
        let body = format!(r#"{{"topics":[{}]}}"#, names(l.max_topics).join(","));
        let at_limit = parse_poll_body(body.as_bytes(), &l, 255).expect("at the limit");
        assert_eq!(at_limit.topics.len(), l.max_topics);

        let over = format!(r#"{{"topics":[{}]}}"#, names(l.max_topics + 1).join(","));
        let e = parse_poll_body(over.as_bytes(), &l, 255).expect_err("over");
        assert_eq!(e.status, 400);
        assert!(e.message.contains("must list 1 to"), "{}", e.message);

        let since: Vec<String> = (0..=l.max_topics)
            .map(|i| format!("\"t{i}\":\"1-0\""))
            .collect();
        let over = format!(r#"{{"topics":["t0"],"since":{{{}}}}}"#, since.join(","));
        let e = parse_poll_body(over.as_bytes(), &l, 255).expect_err("since over");
        assert!(
            e.message.contains("`since` must name at most"),
            "{}",
            e.message
        );

        // A topic named twice in `since`: the later id wins.
        let body = r#"{"topics":["a"],"since":{"a":"1-0","a":"2-0"}}"#;
        let poll = parse_poll_body(body.as_bytes(), &l, 255).expect("valid");
        assert_eq!(
            poll.topics,
            vec![("a".to_owned(), StartAt::After(MessageId::new(2, 0)))]
        );

        for (bad, why) in [
            (r#"{"topics":"a"}"#, "must be an array"),
            (r#"{"topics":[1]}"#, "must be an array"),
            (r#"{"topics":["a"],"since":["1-0"]}"#, "must be an object"),
            (r#"{"topics":["a"],"since":{"a":1}}"#, "must be an object"),
        ] {
            let e = parse_poll_body(bad.as_bytes(), &l, 255).expect_err(bad);
            assert_eq!(e.status, 400, "{bad}");
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
    }
}
