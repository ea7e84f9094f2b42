//! `GET /api/v1/topics/{topic}/events` and `GET /api/v1/events?topics=`: the HTTP side of an
//! event stream. [`parse`] turns the request into an [`SseRequest`]; the stream itself runs
//! in [`crate::net::sse`].

use crate::delivery::StartAt;
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::sse::{invalid_position, Position, SseRequest};

/// Builds the stream request from the path's topic (if any), `?topics=`, and the resume point:
/// the `Last-Event-ID` header (what `EventSource` sends on reconnect) or `?since=`, in either
/// [`Position`] form. A topic named twice is followed once.
pub fn parse(
    request: &Request,
    path_topic: Option<String>,
    max_topics: usize,
    max_topic_len: usize,
) -> Result<SseRequest, ApiError> {
    let mut topics: Vec<String> = path_topic.into_iter().collect();
    let mut since = None;
    for (key, value) in crate::http::router::query_pairs(request.query()) {
        match &*key {
            "topics" | "topic" => crate::http::router::split_topics(&value, &mut topics),
            "since" if !value.is_empty() => since = Some(value.into_owned()),
            _ => {}
        }
    }
    if let Some(header) = request.header("last-event-id") {
        let header = std::str::from_utf8(header).map_err(|_| invalid_position())?;
        if !header.trim().is_empty() {
            since = Some(header.trim().to_owned());
        }
    }
    let mut seen = std::collections::HashSet::new();
    topics.retain(|t| seen.insert(t.clone()));
    if topics.is_empty() || topics.len() > max_topics {
        return Err(ApiError::invalid_request(format!(
            "name 1 to {max_topics} topics"
        )));
    }
    for topic in &topics {
        crate::topic::validate(topic, max_topic_len)?;
    }
    let position = since
        .map(|text| Position::parse(&text, max_topic_len))
        .transpose()?;
    let topics = topics
        .into_iter()
        .map(|topic| {
            let start = position
                .as_ref()
                .map_or(StartAt::Last, |p| p.start_for(&topic));
            (topic, start)
        })
        .collect();
    Ok(SseRequest {
        topics,
        principal: None,
    })
}
