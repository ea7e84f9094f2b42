//! Black-box tests of the memory backend's memory of removed topics: a topic emptied by
//! expiry, or deleted through the API, still tells a consumer resuming from before the removal
//! that messages are gone (and why), and the topic created again continues its id sequence.
//!
//! Owns: gap reasons and id continuity across topic removal on the memory backend, over the
//! long-poll API. Does not own: the gap frame format per transport (`delivery_*.rs`) or the
//! Valkey backend's gaps (`valkey_retention.rs`).

mod common;

use std::time::Duration;

use common::{eventually, parse_id, Server};
use serde_json::{json, Value};

fn poll(server: &Server, topic: &str, since: &str) -> Value {
    let body = json!({"topics": [topic], "since": {topic: since}, "timeout": 1});
    let resp = server.post_json("/messages/poll", &body.to_string());
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.json()
}

fn id_of(ack: &Value) -> String {
    ack["message_id"].as_str().expect("message_id").to_owned()
}

/// Regression (issue 11 item 8): deleting a topic forgot it, so a consumer resuming from
/// before the delete silently got the new incarnation's messages, and new ids restarted.
#[test]
fn resume_from_before_a_delete_reports_a_deleted_gap() {
    let server = Server::start("");
    let topic = "mem-gap-deleted";
    let old: Vec<String> = (0..3)
        .map(|i| id_of(&server.publish(topic, &i.to_string())))
        .collect();
    let resp = server.delete(&format!("/api/v1/topics/{topic}"));
    assert!(resp.status < 300, "{resp:?}");
    let new = id_of(&server.publish(topic, "3"));
    assert!(
        parse_id(&new) > parse_id(&old[2]),
        "{new} continues after {}",
        old[2]
    );
    let body = poll(&server, topic, &old[0]);
    assert_eq!(
        body["gaps"],
        json!([{"type": "gap", "topic": topic, "requested": old[0],
                "oldest_available": new, "reason": "deleted"}]),
        "{body}"
    );
    // From the last deleted id nothing more was lost.
    let body = poll(&server, topic, &old[2]);
    assert!(body.get("gaps").is_none(), "{body}");
}

/// Regression (issue 11 item 8): a topic emptied by ttl expiry was removed with everything it
/// knew, so a resume from before it got no gap.
#[test]
fn resume_into_a_topic_emptied_by_expiry_reports_an_expired_gap() {
    let server = Server::start("");
    let topic = "mem-gap-expired";
    let body = format!(r#"{{"topic":"{topic}","payload":1,"ttl":1}}"#);
    let resp = server.post_json("/api/v1/messages", &body);
    assert_eq!(resp.status, 201, "{resp:?}");
    let first = id_of(&resp.json());
    // The sweeper removes the expired message and with it the (now empty) topic.
    assert!(
        eventually(Duration::from_secs(10), || {
            server.get(&format!("/api/v1/topics/{topic}")).status == 404
        }),
        "the emptied topic was never removed"
    );
    let body = poll(&server, topic, "0-1");
    assert_eq!(
        body["gaps"],
        json!([{"type": "gap", "topic": topic, "requested": "0-1",
                "oldest_available": null, "reason": "expired"}]),
        "{body}"
    );
    let body = poll(&server, topic, &first);
    assert!(body.get("gaps").is_none(), "{body}");
}
