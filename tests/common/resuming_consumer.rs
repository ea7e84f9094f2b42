//! A WebSocket consumer for the storage fault tests (Sentinel and Cluster failovers, slot
//! migrations): it subscribes to its topics from the earliest message, records every message
//! and gap it is given, and whenever its connection ends (or storage cannot serve a resume
//! mid-fault) connects again and resumes from the last id it saw of each topic.
//!
//! Owns: that loop on its own thread, and the end-of-test check against what the publishers
//! were acknowledged (every acknowledged message delivered; per topic, ids strictly
//! increasing: none twice, none out of order). Does not own: the publishers
//! ([`PublishLoad`](super::valkey::PublishLoad)) or what a test concludes from the messages
//! that were delivered but not acknowledged (each test audits storage its own way).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::valkey::WorkerOutcome;
use super::ws::{WsClient, WsEvent};
use super::{eventually, parse_id};

/// One message as the consumer was given it.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub topic: String,
    pub id: String,
}

/// What the consumer saw, once every acknowledged message had arrived.
#[derive(Debug)]
pub struct Finished {
    /// Every message delivered, in arrival order.
    pub received: Vec<Delivered>,
    /// Of those, the ones no publisher was acknowledged for (a 503 whose message was stored).
    pub unacked: usize,
    /// Gap frames received.
    pub gaps: usize,
    /// Connections after the first (each resumed from the last ids seen).
    pub resumes: u64,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Delivered>>,
    gaps: Mutex<Vec<Value>>,
    resumes: Mutex<u64>,
    subscribed: AtomicBool,
    stop: AtomicBool,
}

pub struct ResumingConsumer {
    state: Arc<State>,
    handle: Option<JoinHandle<()>>,
    patience: Duration,
}

impl ResumingConsumer {
    /// Connects to the relay at `addr`, subscribes to `topics` from the earliest message and
    /// waits (up to `patience`) for the subscription to be confirmed. `patience` also bounds
    /// the wait for the acknowledged messages in [`ResumingConsumer::finish`].
    pub fn start(addr: SocketAddr, topics: &[String], patience: Duration) -> ResumingConsumer {
        let state = Arc::new(State::default());
        let shared = state.clone();
        let topics = topics.to_vec();
        let handle = std::thread::spawn(move || consume(addr, &topics, &shared));
        assert!(
            eventually(patience, || state.subscribed.load(Ordering::Relaxed)),
            "the WebSocket consumer did not subscribe"
        );
        ResumingConsumer {
            state,
            handle: Some(handle),
            patience,
        }
    }

    /// Messages received so far.
    pub fn received_len(&self) -> usize {
        self.state.received.lock().expect("lock").len()
    }

    /// Waits until every acknowledged message was delivered, stops, and asserts per topic:
    /// ids strictly increasing (none twice, none out of order) and every acknowledged one
    /// among them.
    pub fn finish(mut self, outcomes: &[WorkerOutcome]) -> Finished {
        // By topic and id: two streams can hand out the same id.
        let acked: HashSet<(&str, &str)> = outcomes
            .iter()
            .flat_map(|o| {
                o.acked
                    .iter()
                    .map(|(_, id)| (o.topic.as_str(), id.as_str()))
            })
            .collect();
        let all_in = eventually(self.patience, || {
            let received = self.state.received.lock().expect("lock");
            let seen: HashSet<(&str, &str)> = received
                .iter()
                .map(|d| (d.topic.as_str(), d.id.as_str()))
                .collect();
            acked.iter().all(|pair| seen.contains(pair))
        });
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        let received = self.state.received.lock().expect("lock").clone();
        for out in outcomes {
            let mine: Vec<&Delivered> = received.iter().filter(|d| d.topic == out.topic).collect();
            for pair in mine.windows(2) {
                assert!(
                    parse_id(&pair[0].id) < parse_id(&pair[1].id),
                    "{}: delivered {} then {} (duplicate or out of order)",
                    out.topic,
                    pair[0].id,
                    pair[1].id
                );
            }
            let ids: HashSet<&str> = mine.iter().map(|d| d.id.as_str()).collect();
            let missing = out
                .acked
                .iter()
                .filter(|(_, id)| !ids.contains(id.as_str()))
                .count();
            assert!(
                all_in && missing == 0,
                "{}: {missing} of {} acknowledged messages never delivered",
                out.topic,
                out.acked.len()
            );
        }
        let unacked = received
            .iter()
            .filter(|d| !acked.contains(&(d.topic.as_str(), d.id.as_str())))
            .count();
        let gaps = self.state.gaps.lock().expect("lock").len();
        let resumes = *self.state.resumes.lock().expect("lock");
        Finished {
            received,
            unacked,
            gaps,
            resumes,
        }
    }
}

impl Drop for ResumingConsumer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

fn consume(addr: SocketAddr, topics: &[String], state: &State) {
    let mut first = true;
    while !state.stop.load(Ordering::Relaxed) {
        let Ok(mut ws) = WsClient::try_connect_with(addr, &[], None) else {
            // The relay is not accepting (yet): the test's own fault; try again shortly.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if !first {
            *state.resumes.lock().expect("lock") += 1;
        }
        first = false;
        let last: HashMap<String, String> = state
            .received
            .lock()
            .expect("lock")
            .iter()
            .map(|d| (d.topic.clone(), d.id.clone()))
            .collect();
        let offset: serde_json::Map<String, Value> = topics
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    json!(last.get(t).map_or("earliest", String::as_str)),
                )
            })
            .collect();
        let subscribe = json!({"type": "subscribe", "topics": topics, "offset": offset});
        if ws
            .socket
            .send(tungstenite::Message::text(subscribe.to_string()))
            .is_err()
        {
            continue;
        }
        while !state.stop.load(Ordering::Relaxed) {
            match ws.next_event(Duration::from_millis(50)) {
                WsEvent::Json(v) => match v["type"].as_str() {
                    Some("message") => state.received.lock().expect("lock").push(Delivered {
                        topic: v["topic"].as_str().expect("topic").to_string(),
                        id: v["message_id"].as_str().expect("id").to_string(),
                    }),
                    Some("subscribed") => state.subscribed.store(true, Ordering::Relaxed),
                    Some("gap") => state.gaps.lock().expect("lock").push(v),
                    // A resume that storage could not serve mid-fault: the next connection
                    // resumes again from the last ids.
                    Some("error") => break,
                    _ => panic!("unexpected frame {v}"),
                },
                WsEvent::Ping | WsEvent::Timeout => {}
                WsEvent::Close(_) | WsEvent::Gone(_) => break,
            }
        }
    }
}
