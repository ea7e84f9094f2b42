//! The request bodies and query strings consumers and producers send, through the parsers the
//! handlers use: publish and bulk bodies (`http::handlers::publish`), long-poll bodies and
//! queries (`delivery::longpoll`), history queries (`http::handlers::topics`), the `/ws` JSON
//! commands (`ws::protocol`), message-id cursors (`store::message::MessageId`) and the topic
//! rule (`topic`). Each accepted value is checked against the limits it was parsed under.
//!
//! Input: `[selector, text...]`. `selector % 6` picks the parser (see `fuzz_target!`);
//! `selector & 0x80` swaps the default API limits for tiny ones so every limit is reachable.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pulsar_relay::config::{ApiConfig, LongPollConfig};
use pulsar_relay::delivery::longpoll::PollRequest;
use pulsar_relay::http::error::ApiError;
use pulsar_relay::http::handlers::poll::{parse_poll_body, parse_poll_query};
use pulsar_relay::http::handlers::publish::{parse_bulk, parse_publish};
use pulsar_relay::http::handlers::topics::parse_history_query;
use pulsar_relay::store::message::MessageId;
use pulsar_relay::store::PublishItem;
use pulsar_relay::ws::protocol::{self, ClientMessage};
use pulsar_relay_fuzz::relay_config;
use serde_json::value::RawValue;

/// Limits small enough for short inputs to cross each of them.
fn tiny_limits() -> &'static (ApiConfig, LongPollConfig) {
    static TINY: OnceLock<(ApiConfig, LongPollConfig)> = OnceLock::new();
    TINY.get_or_init(|| {
        let config = relay_config();
        let api = ApiConfig {
            max_bulk_messages: 3,
            default_page_limit: 2,
            max_page_limit: 5,
            max_payload_bytes: 16,
            max_topic_name_len: 8,
        };
        let longpoll = LongPollConfig {
            max_topics: 2,
            default_limit: 2,
            max_limit: 4,
            ..config.longpoll.clone()
        };
        (api, longpoll)
    })
}

fn check_error(error: &ApiError) {
    assert!((400..500).contains(&error.status), "{error:?}");
    assert!(!error.message.is_empty());
}

fn check_item(item: &PublishItem, api: &ApiConfig) {
    assert!(pulsar_relay::topic::validate(&item.topic, api.max_topic_name_len).is_ok());
    assert!(item.payload.len() <= api.max_payload_bytes);
    // Syntax only: a number like 11e308 is valid JSON the relay stores byte for byte, though
    // it does not fit an f64 (serde_json::Value would refuse it).
    let payload: Box<RawValue> =
        serde_json::from_slice(&item.payload).expect("the payload is the JSON text sent");
    assert_ne!(payload.get().trim(), "null");
    if let Some(metadata) = &item.metadata {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(metadata).expect("metadata is stored as a JSON object");
        assert!(map.values().all(serde_json::Value::is_string));
    }
    assert_ne!(item.ttl_ms, Some(0));
}

fn check_poll(poll: &PollRequest, longpoll: &LongPollConfig, api: &ApiConfig) {
    assert!(!poll.topics.is_empty() && poll.topics.len() <= longpoll.max_topics);
    for (i, (topic, _)) in poll.topics.iter().enumerate() {
        assert!(pulsar_relay::topic::validate(topic, api.max_topic_name_len).is_ok());
        assert!(
            poll.topics[..i].iter().all(|(t, _)| t != topic),
            "duplicate topic"
        );
    }
    assert!((1..=longpoll.max_limit).contains(&poll.limit));
    assert!(poll.timeout <= longpoll.max_timeout);
}

/// A cursor that parses prints back in canonical form and parses to the same id.
fn check_cursor(text: &str) {
    if let Ok(id) = text.parse::<MessageId>() {
        let printed = id.to_string();
        assert_eq!(printed.parse::<MessageId>(), Ok(id));
        assert!(printed.len() <= text.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let config = relay_config();
    let (api, longpoll) = if selector & 0x80 == 0 {
        (&config.api, &config.longpoll)
    } else {
        let (api, longpoll) = tiny_limits();
        (api, longpoll)
    };
    match selector % 6 {
        0 => match parse_publish(body, api) {
            Ok(item) => check_item(&item, api),
            Err(e) => check_error(&e),
        },
        1 => match parse_bulk(body, api) {
            Ok(items) => {
                assert!(!items.is_empty() && items.len() <= api.max_bulk_messages);
                for item in &items {
                    match item {
                        Ok(item) => check_item(item, api),
                        Err((_, e)) => check_error(e),
                    }
                }
            }
            Err(e) => check_error(&e),
        },
        2 => match parse_poll_body(body, longpoll, api.max_topic_name_len) {
            Ok(poll) => check_poll(&poll, longpoll, api),
            Err(e) => check_error(&e),
        },
        3 => {
            let Ok(text) = std::str::from_utf8(body) else {
                return; // the WebSocket codec hands over only valid UTF-8
            };
            match protocol::parse_client_message(text, config.ws.max_topics) {
                Ok(
                    ClientMessage::Subscribe { topics, .. } | ClientMessage::Unsubscribe { topics, .. },
                ) => {
                    assert!(!topics.is_empty() && topics.len() <= config.ws.max_topics);
                }
                Ok(_) => {}
                Err(e) => assert!(!e.code().is_empty() && !e.message().is_empty()),
            }
        }
        4 => {
            let query = String::from_utf8_lossy(body);
            match parse_history_query(Some(&query), api) {
                Ok(history) => assert!((1..=api.max_page_limit).contains(&history.limit)),
                Err(e) => check_error(&e),
            }
            match parse_poll_query(Some(&query), longpoll, api.max_topic_name_len) {
                Ok(poll) => check_poll(&poll, longpoll, api),
                Err(e) => check_error(&e),
            }
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            check_cursor(&text);
            if pulsar_relay::topic::validate(&text, api.max_topic_name_len).is_ok() {
                assert!(!text.is_empty() && text.len() <= api.max_topic_name_len);
                assert!(text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
            }
        }
    }
});
