//! Long-poll: `POST /messages/poll` (the Python relay's form) and `GET /api/v1/poll`.
//!
//! A poll returns at once with whatever is retained after the consumer's position, oldest
//! first; with nothing there it parks until a message arrives or its timeout passes. The
//! Python relay read, then started waiting, and lost a message published in between; here the
//! request registers as a consumer of its topics *before* it reads, so such a message is
//! queued for it while it reads and wakes it at once.
//!
//! A parked request whose client disconnects is dropped by the connection loop, which
//! detaches it (its `Parked` guard) at once.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{select, Either};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::sink::{Delivered, Sink};
use super::sse::Position;
use super::{unfollow_all, Gap, StartAt};
use crate::config::LongPollConfig;
use crate::http::error::ApiError;
use crate::http::handlers::Reply;
use crate::http::json::{array_up_to, object_up_to, Bounded};
use crate::shard::{ReplayQuery, Shard};
use crate::store::message::MessageId;

/// A validated poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    /// Each topic with where to start reading it.
    pub topics: Vec<(String, StartAt)>,
    pub timeout: Duration,
    pub limit: usize,
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

/// Detaches a poll's sink however the request ends (answered, timed out, client gone).
struct Parked<'a> {
    shard: &'a Shard,
    sink: Rc<Sink>,
    counted: bool,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        unfollow_all(self.shard, &self.sink);
        if self.counted {
            self.shard.delivery.unpark();
        }
    }
}

/// The queue bound of a poll's sink: it is answered at the first message, so this only
/// needs to hold one burst.
const POLL_QUEUE_BYTES: usize = 8 << 20;

/// Bytes one history read of a poll asks for: an answer's memory is bounded by bytes, not by
/// `limit` times the largest payload (a single larger message still comes, alone).
const POLL_PAGE_BYTES: usize = 4 << 20;

/// Answers a poll: what is retained after each topic's start, else the first live message, else
/// (after the timeout) nothing. Either way `next_offset` names every requested topic: its last
/// delivered id; else its `since`; else its last id when the poll started (read from "now",
/// or found empty); else `0-0`. So polling again with `since = next_offset` neither repeats
/// nor skips.
pub async fn poll(shard: &Shard, request: PollRequest) -> Result<Reply, ApiError> {
    let sink = shard.delivery.new_sink(POLL_QUEUE_BYTES);
    let mut guard = Parked {
        shard,
        sink: sink.clone(),
        counted: false,
    };
    let mut found: Vec<Rc<Delivered>> = Vec::new();
    let mut gaps: Vec<Gap> = Vec::new();
    let mut has_more = false;
    let mut standing: Vec<Standing> = Vec::with_capacity(request.topics.len());
    for (topic, start) in &request.topics {
        let name: Arc<str> = Arc::from(topic.as_str());
        // Registered before the reads below; live messages are held back until the topic
        // is placed (read to its end, or its position "now" known), then only newer ones
        // are kept.
        let generation = sink.follow(&name, true);
        shard.delivery.attach(&name, &sink);
        let mut after = match start {
            StartAt::After(id) => {
                sink.seen_up_to(topic, *id);
                Some(*id)
            }
            StartAt::Earliest | StartAt::Last => None,
        };
        // A topic read from "now" is only registered (and its last id learnt).
        let limit = if *start == StartAt::Last {
            0
        } else {
            request.limit
        };
        let mut registered_last = None;
        let mut first = true;
        loop {
            // A resume point older than what is retained is reported (`gaps`), as WebSocket
            // and SSE consumers are told; the answer still carries what is there.
            let page = shard
                .subscribe_read(
                    topic,
                    ReplayQuery {
                        after,
                        limit,
                        max_bytes: POLL_PAGE_BYTES,
                        check_gap: after.is_some(),
                    },
                )
                .await?;
            if first {
                registered_last = page.last_id;
                first = false;
            }
            if let (Some(gap), Some(requested)) = (page.gap, after) {
                gaps.push(Gap {
                    topic: name.clone(),
                    requested,
                    oldest_available: gap.oldest_available,
                    reason: gap.reason,
                });
            }
            for message in page.messages {
                sink.seen_up_to(topic, message.id);
                after = Some(message.id);
                found.push(Rc::new(Delivered::new(name.clone(), message)));
            }
            if limit == 0 {
                break;
            }
            if found.len() >= request.limit {
                // A full answer: the rest of this topic (and what arrived live) is for the
                // next poll, from the position this answer reports.
                has_more |= page.more || found.len() > request.limit;
                break;
            }
            if !page.more && sink.finish_replay(topic, generation) {
                break;
            }
        }
        let otherwise = match start {
            StartAt::After(id) => Some(*id),
            // Nothing retained when read: everything after the last id it had is new.
            StartAt::Earliest => registered_last,
            StartAt::Last => {
                let now = super::sse::position_from(shard, topic, registered_last).await?;
                if let Some(now) = now {
                    // Live messages at or before it count as published before this poll.
                    sink.seen_up_to(topic, now);
                }
                // Only registered: nothing to read, the hand-over cannot be refused.
                sink.finish_replay(topic, generation);
                now
            }
        };
        standing.push(Standing {
            topic: name,
            resumed: matches!(start, StartAt::After(_)),
            otherwise,
        });
    }
    if found.is_empty() {
        if !shard
            .delivery
            .try_park(shard.config.longpoll.max_parked_per_shard)
        {
            return Err(ApiError::unavailable(
                "too many parked poll requests on this shard",
            ));
        }
        guard.counted = true;
        let ready = Box::pin(sink.ready());
        let timer = Box::pin(glommio::timer::sleep(request.timeout));
        // Shutdown answers a parked poll at once, like its timeout: the client polls again
        // (elsewhere) from the same position, so nothing is lost.
        let stop = Box::pin(shard.shutdown.wait());
        if let Either::Right(_) = select(ready, select(timer, stop)).await {
            return Ok(Reply::json(200, render_timeout(&standing, &gaps)));
        }
    }
    // Whatever arrived live meanwhile (newer than anything read above) goes after it.
    sink.take(&mut found, usize::MAX);
    // Oldest first across topics; per topic the order is already by id.
    found.sort_by_key(|d| d.id());
    let mut left_out: Vec<Rc<Delivered>> = Vec::new();
    if found.len() > request.limit {
        left_out = found.split_off(request.limit);
        has_more = true;
    }
    drop(guard);
    super::record_delivered(shard, crate::metrics::Egress::LongPoll, &found);
    Ok(Reply::json(
        200,
        render(&found, &left_out, has_more, &standing, &gaps),
    ))
}

/// Where a poll leaves one topic when the answer delivers nothing of it: `next_offset` must
/// still name it, at a point from which polling again misses and repeats nothing.
struct Standing {
    topic: Arc<str>,
    /// The poll gave an id for it (`since`).
    resumed: bool,
    /// Its `since`; else its last id when the poll registered (a topic read from "now", or
    /// read from its oldest message and found empty); `None`: it had never held a message.
    otherwise: Option<MessageId>,
}

impl Standing {
    /// The topic's `next_offset`: its last delivered id; else, when messages of it were found
    /// but left out by `limit`, the id just before the first of them (unless the poll gave an
    /// id, which is no later); else [`Standing::otherwise`]; else `0-0` (before every id).
    fn next_offset(
        &self,
        delivered: Option<MessageId>,
        first_left_out: Option<MessageId>,
    ) -> MessageId {
        if let Some(id) = delivered {
            return id;
        }
        match (first_left_out, self.otherwise) {
            (Some(first), otherwise) if !self.resumed => {
                let before = just_before(first);
                otherwise.map_or(before, |o| o.min(before))
            }
            (_, otherwise) => otherwise.unwrap_or(MessageId::MIN),
        }
    }
}

/// The greatest id below `id` (resuming after it starts exactly at `id`).
fn just_before(id: MessageId) -> MessageId {
    match (id.ms, id.seq) {
        (ms, 0) if ms > 0 => MessageId::new(ms - 1, u64::MAX),
        (ms, seq) => MessageId::new(ms, seq.saturating_sub(1)),
    }
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
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(b"\":\"");
        id.write_to(body);
        body.push(b'"');
    }
    body.push(b'}');
}

fn render_timeout(standing: &[Standing], gaps: &[Gap]) -> Vec<u8> {
    let mut body = br#"{"messages":[],"has_more":false,"timeout":true"#.to_vec();
    write_next_offset(&mut body, standing, &HashMap::new(), &HashMap::new());
    write_gaps(&mut body, gaps);
    body.push(b'}');
    body
}

fn render(
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
    fn just_before_is_the_greatest_smaller_id() {
        assert_eq!(just_before(id(5, 3)), id(5, 2));
        assert_eq!(just_before(id(5, 0)), id(4, u64::MAX));
        assert_eq!(just_before(MessageId::MIN), MessageId::MIN);
        assert_eq!(just_before(id(0, 1)), MessageId::MIN);
    }

    #[test]
    fn next_offset_never_passes_an_undelivered_message() {
        let standing = |resumed, otherwise| Standing {
            topic: Arc::from("t"),
            resumed,
            otherwise,
        };
        // Delivered wins.
        assert_eq!(
            standing(true, Some(id(1, 0))).next_offset(Some(id(9, 0)), Some(id(10, 0))),
            id(9, 0)
        );
        // Resumed: its `since`, even with messages left out by the limit.
        assert_eq!(
            standing(true, Some(id(1, 0))).next_offset(None, Some(id(10, 0))),
            id(1, 0)
        );
        // Read from the oldest (or now), messages left out: just before the first of them.
        assert_eq!(
            standing(false, Some(id(20, 0))).next_offset(None, Some(id(10, 0))),
            id(9, u64::MAX)
        );
        assert_eq!(
            standing(false, None).next_offset(None, Some(id(10, 4))),
            id(10, 3)
        );
        // From now, a live message left out after its position: the position.
        assert_eq!(
            standing(false, Some(id(7, 0))).next_offset(None, Some(id(10, 0))),
            id(7, 0)
        );
        // Nothing of it at all.
        assert_eq!(
            standing(false, Some(id(7, 0))).next_offset(None, None),
            id(7, 0)
        );
        assert_eq!(
            standing(false, None).next_offset(None, None),
            MessageId::MIN
        );
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
