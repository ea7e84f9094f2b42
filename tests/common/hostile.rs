//! The harness of the hostile-client suites: a well-behaved client that keeps working while a
//! test attacks the relay, and the checks that the relay survived.
//!
//! Owns: [`Bystander`] (a publisher on one keep-alive connection plus a WebSocket subscriber,
//! on one topic per shard, running on their own threads for the whole attack), [`under_attack`]
//! (start a bystander, run the attack, then assert the bystander saw everything and the relay
//! is alive and never panicked), and [`assert_relay_alive`]. Does not own: the attacks (the
//! `hostile_*` test files) or the relay's process (`super::Server`).
//!
//! "Saw everything" is exact: every publish of the bystander got its 201, and its subscriber
//! received exactly the acknowledged ids of each topic, in order, nothing missing or extra.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ws::{WsClient, WsEvent};
use super::{id_of, topics_per_shard, Conn, Server};

/// Shards of the relays the hostile suites start: 2, so topics live on both and every
/// publish or subscription from a connection on the other shard crosses shards.
pub const SHARDS: usize = 2;

/// Pause between two publishes of the bystander: traffic shaping (a steady trickle for the
/// whole attack), not synchronisation.
const PUBLISH_PACE: Duration = Duration::from_millis(10);

/// How long the subscriber may take, once the publisher stopped, to receive the last message.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// Message ids by topic, in order.
type IdsByTopic = BTreeMap<String, Vec<String>>;

/// A well-behaved client running alongside an attack: it publishes to one topic per shard on
/// one keep-alive HTTP connection, and a WebSocket subscriber of those topics reads on.
///
/// From the return of [`Bystander::start`] until [`Bystander::finish`], the relay has
/// accepted exactly [`Bystander::CONNECTIONS`] connections of the bystander, so an attack may
/// count the relay's connections.
pub struct Bystander {
    /// Tells the publisher to stop (checked between publishes).
    stop_publishing: Arc<AtomicBool>,
    /// Tells the subscriber's reader to stop, once the finish check has what it needs.
    stop_reading: Arc<AtomicBool>,
    /// Acked ids by topic, in publish order; or the first failure.
    publisher: Option<JoinHandle<Result<IdsByTopic, String>>>,
    /// Received ids by topic, in arrival order, shared with the reader thread.
    received: Arc<Mutex<IdsByTopic>>,
    /// The subscriber's first problem (a close, an unexpected frame), if any.
    reader_failure: Arc<Mutex<Option<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Bystander {
    /// Connections the bystander holds while it runs: the publisher's keep-alive connection
    /// and the subscriber's WebSocket.
    pub const CONNECTIONS: u64 = 2;

    /// Subscribes (waiting for `subscribed`), opens the publisher's connection (waiting for
    /// one answer on it), then starts publishing.
    pub fn start(server: &Server, name: &str) -> Bystander {
        // `name` is a free-form label; topics allow only `[A-Za-z0-9._-]`.
        let label: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let topics = topics_per_shard(&format!("bystander-{label}"), SHARDS as u64);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let mut subscriber = WsClient::connect(server.addr);
        subscriber.subscribe(&names, None);
        // Connected is not accepted: the relay counts a connection only once a shard accepts
        // it. An answer on it proves that, before the publisher's thread (which the attack
        // races) starts.
        let mut conn = server.connect();
        let health = conn.request("GET", "/health", None);
        assert_eq!(
            health.status, 200,
            "the bystander's publisher connection: {health:?}"
        );

        let stop_publishing = Arc::new(AtomicBool::new(false));
        let stop_reading = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(IdsByTopic::new()));
        let reader_failure = Arc::new(Mutex::new(None));
        let reader = {
            let stop = stop_reading.clone();
            let received = received.clone();
            let failure = reader_failure.clone();
            std::thread::spawn(move || read_until_stopped(subscriber, &stop, &received, &failure))
        };
        let publisher = {
            let stop = stop_publishing.clone();
            std::thread::spawn(move || publish_until_stopped(conn, &topics, &stop))
        };
        Bystander {
            stop_publishing,
            stop_reading,
            publisher: Some(publisher),
            received,
            reader_failure,
            reader: Some(reader),
        }
    }

    /// Stops publishing and asserts: every publish succeeded, at least one happened per topic,
    /// and the subscriber received exactly the acknowledged ids, in order.
    pub fn finish(mut self, during: &str) {
        // The publisher stops first; the reader keeps reading until it has everything.
        self.stop_publishing.store(true, Ordering::Relaxed);
        let acked = match join(self.publisher.take().expect("finish runs once")) {
            Ok(acked) => acked,
            Err(e) => {
                panic!("the well-behaved publisher failed during {during}: {e}");
            }
        };
        let complete = super::eventually(DRAIN_DEADLINE, || {
            let got = self.received.lock().expect("received lock");
            acked
                .iter()
                .all(|(t, ids)| got.get(t).map_or(0, Vec::len) >= ids.len())
                || self.reader_failure.lock().expect("failure lock").is_some()
        });
        self.stop_reading.store(true, Ordering::Relaxed);
        join(self.reader.take().expect("finish runs once"));
        if let Some(failure) = self.reader_failure.lock().expect("failure lock").take() {
            panic!("the well-behaved subscriber failed during {during}: {failure}");
        }
        let got = self.received.lock().expect("received lock").clone();
        for (topic, ids) in &acked {
            assert!(
                !ids.is_empty(),
                "the well-behaved publisher published nothing to {topic} during {during}"
            );
            assert_eq!(
                got.get(topic).cloned().unwrap_or_default(),
                *ids,
                "during {during}: the subscriber of {topic} did not receive exactly the acked ids \
                 (complete: {complete})"
            );
        }
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        // A test that panicked mid-attack must not leave threads publishing or reading.
        self.stop_publishing.store(true, Ordering::Relaxed);
        self.stop_reading.store(true, Ordering::Relaxed);
    }
}

fn join<T>(handle: JoinHandle<T>) -> T {
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn publish_until_stopped(
    mut conn: Conn,
    topics: &[String],
    stop: &AtomicBool,
) -> Result<IdsByTopic, String> {
    let mut acked = IdsByTopic::new();
    let mut i = 0usize;
    // At least one round, so a very short attack still proves delivery on every topic.
    while i < topics.len() || !stop.load(Ordering::Relaxed) {
        let topic = &topics[i % topics.len()];
        let body = super::publish_body(topic, &format!(r#"{{"bystander":{i}}}"#));
        let resp = conn
            .try_request("POST", "/api/v1/messages", Some(body.as_bytes()))
            .map_err(|e| format!("publish {i} to {topic}: {e}"))?;
        if resp.status != 201 {
            return Err(format!("publish {i} to {topic}: {resp:?}"));
        }
        acked
            .entry(topic.clone())
            .or_default()
            .push(id_of(&resp.json()));
        // And read it back: the read path must keep working too.
        let resp = conn
            .try_request("GET", &format!("/api/v1/topics/{topic}"), None)
            .map_err(|e| format!("stats of {topic}: {e}"))?;
        if resp.status != 200 {
            return Err(format!("stats of {topic}: {resp:?}"));
        }
        i += 1;
        std::thread::sleep(PUBLISH_PACE);
    }
    Ok(acked)
}

fn read_until_stopped(
    mut subscriber: WsClient,
    stop: &AtomicBool,
    received: &Mutex<IdsByTopic>,
    failure: &Mutex<Option<String>>,
) {
    loop {
        match subscriber.next_event(Duration::from_millis(100)) {
            WsEvent::Json(v) if v["type"] == "message" => {
                let topic = v["topic"].as_str().unwrap_or_default().to_string();
                received
                    .lock()
                    .expect("received lock")
                    .entry(topic)
                    .or_default()
                    .push(id_of(&v));
            }
            WsEvent::Ping | WsEvent::Timeout => {}
            other => {
                *failure.lock().expect("failure lock") = Some(format!("{other:?}"));
                return;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// Runs `attack` while a [`Bystander`] works alongside, then asserts the bystander saw
/// everything and the relay is alive, serving, and never panicked. `name` labels failures.
pub fn under_attack(server: &Server, name: &str, attack: impl FnOnce()) {
    let bystander = Bystander::start(server, name);
    let started = Instant::now();
    attack();
    bystander.finish(&format!("{name} ({:?} of attack)", started.elapsed()));
    assert_relay_alive(server, name);
}

/// Asserts the relay process is running (not exited, not a zombie), answers `/health`, and
/// its stderr holds no panic.
pub fn assert_relay_alive(server: &Server, during: &str) {
    let pid = server.pid().expect("the relay was stopped by the test");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3 of /proc/<pid>/stat is the state; Z (zombie) or X (dead) means it exited.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .unwrap_or("gone");
    assert!(
        !matches!(state, "Z" | "X" | "gone"),
        "the relay process is {state} after {during}\nstderr:\n{}",
        server.stderr()
    );
    let stderr = server.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the relay panicked during {during}:\n{stderr}"
    );
    let health = Conn::try_connect(server.addr)
        .ok()
        .and_then(|mut c| c.try_request("GET", "/health", None).ok());
    assert!(
        health.as_ref().is_some_and(|r| r.status == 200),
        "the relay does not answer /health after {during}: {health:?}\nstderr:\n{stderr}"
    );
}

/// A per-shard counter of `GET /api/v1/stats` (`connections`, `websocket_sessions`,
/// `event_streams`, ...) summed over the shards; `u64::MAX` if the answer lacks it.
pub fn stat_sum(server: &Server, key: &str) -> u64 {
    server.get("/api/v1/stats").json()["shards"]
        .as_array()
        .map(|shards| shards.iter().filter_map(|s| s[key].as_u64()).sum())
        .unwrap_or(u64::MAX)
}
