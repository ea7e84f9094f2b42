//! A shard's pub/sub connection: one dedicated connection in RESP2 subscribed mode that
//! `SSUBSCRIBE`s to the channels the shard wants and reports what arrives on them.
//!
//! Owns: the connection (its own, never one of the client's pipelined ones: a subscribed
//! connection takes no other commands), the set of wanted channels, subscribing them all
//! again after every reconnect, a keep-alive `PING` (a connection that went silent without
//! a FIN is noticed within [`PING_AFTER_SILENCE`] plus the command timeout), and turning the
//! frames Valkey pushes into [`PushEvent`]s.
//!
//! Does not own: what a channel or a message means (the storage layer names the channels
//! and parses the payloads), nor what to do after a lost connection beyond subscribing again
//! (the listener learns of it from [`PushEvent::Lost`]: every confirmation it had is void,
//! and messages published meanwhile were not delivered to it).
//!
//! Sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`) rather than plain channels: on a single Valkey
//! they behave the same, and in a cluster a shard channel lives on the node that owns its
//! slot, so the relay's notifications travel with the stream they are about instead of being
//! broadcast to every node. One channel per `SSUBSCRIBE` so each command touches one slot.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use glommio::Task;

use super::codec::{encode_command, Reply};
use super::connection::{ConnectConfig, Connection, Connector};
use super::ValkeyError;

/// After this long without a frame from Valkey the subscriber sends a `PING`; no answer within
/// the command timeout and the connection counts as lost. 3 s: a dead connection (a cable
/// pulled, a Valkey host frozen) is noticed within seconds, for one tiny command every few
/// seconds per shard.
pub const PING_AFTER_SILENCE: Duration = Duration::from_secs(3);

/// First and longest pause between reconnect attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// What the subscriber reports, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    /// The connection was lost: no channel is subscribed any more, and messages published
    /// until each is confirmed again ([`PushEvent::Subscribed`]) were not delivered here.
    Lost,
    /// Valkey confirmed the subscription of this channel: from now on every message
    /// published to it arrives.
    Subscribed(Bytes),
    /// A message published to a subscribed channel.
    Message { channel: Bytes, payload: Bytes },
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    pub connects: u64,
    pub lost: u64,
    pub messages: u64,
}

struct Inner {
    /// Every channel the shard wants; subscribed again after each reconnect.
    wanted: HashSet<Bytes>,
    /// Commands encoded for the current connection, not written yet.
    outbox: BytesMut,
    connected: bool,
    /// The task, waiting for something to write.
    waker: Option<Waker>,
    stats: SubscriberStats,
}

/// One shard's pub/sub connection (see the module doc). `!Send`.
pub struct Subscriber {
    inner: Rc<RefCell<Inner>>,
    task: RefCell<Option<Task<()>>>,
}

impl Subscriber {
    /// Starts the connection task on the current glommio executor; events go to the returned
    /// receiver, in order. Fails only on settings the connector refuses.
    pub fn start(
        connect: ConnectConfig,
    ) -> Result<(Subscriber, mpsc::UnboundedReceiver<PushEvent>), ValkeyError> {
        let connector = Connector::new(connect)?;
        let inner = Rc::new(RefCell::new(Inner {
            wanted: HashSet::new(),
            outbox: BytesMut::new(),
            connected: false,
            waker: None,
            stats: SubscriberStats::default(),
        }));
        let (events, receiver) = mpsc::unbounded();
        let task = glommio::spawn_local(run(inner.clone(), connector, events));
        Ok((
            Subscriber {
                inner,
                task: RefCell::new(Some(task)),
            },
            receiver,
        ))
    }

    /// Wants `channel` from now on; a no-op if it was wanted already.
    pub fn subscribe(&self, channel: Bytes) {
        let mut inner = self.inner.borrow_mut();
        if !inner.wanted.insert(channel.clone()) || !inner.connected {
            return;
        }
        encode_command(&mut inner.outbox, &[b"SSUBSCRIBE", &channel]);
        wake(&mut inner);
    }

    /// No longer wants `channel`.
    pub fn unsubscribe(&self, channel: &[u8]) {
        let mut inner = self.inner.borrow_mut();
        if !inner.wanted.remove(channel) || !inner.connected {
            return;
        }
        encode_command(&mut inner.outbox, &[b"SUNSUBSCRIBE", channel]);
        wake(&mut inner);
    }

    pub fn is_connected(&self) -> bool {
        self.inner.borrow().connected
    }

    pub fn wanted(&self) -> usize {
        self.inner.borrow().wanted.len()
    }

    pub fn stats(&self) -> SubscriberStats {
        self.inner.borrow().stats
    }

    /// Stops the task and closes the connection.
    pub async fn shutdown(&self) {
        let task = self.task.borrow_mut().take();
        if let Some(task) = task {
            task.cancel().await;
        }
        self.inner.borrow_mut().connected = false;
    }
}

fn wake(inner: &mut Inner) {
    if let Some(waker) = inner.waker.take() {
        waker.wake();
    }
}

/// Connects, subscribes everything wanted, serves the connection until it fails, reports
/// the loss, and starts over with capped exponential backoff.
async fn run(
    inner: Rc<RefCell<Inner>>,
    connector: Connector,
    events: mpsc::UnboundedSender<PushEvent>,
) {
    let mut failures: u32 = 0;
    loop {
        if failures > 0 {
            let doublings = (failures - 1).min(16);
            let delay = BACKOFF.0.saturating_mul(1 << doublings).min(BACKOFF.1);
            glommio::timer::sleep(delay).await;
        }
        let mut connection = match connector.connect().await {
            Ok(connection) => connection,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::debug!(error = %error, "pub/sub connection to Valkey failed");
                continue;
            }
        };
        {
            let mut inner = inner.borrow_mut();
            let inner = &mut *inner;
            inner.connected = true;
            inner.stats.connects += 1;
            inner.outbox.clear();
            for channel in &inner.wanted {
                encode_command(&mut inner.outbox, &[b"SSUBSCRIBE", channel]);
            }
        }
        let connected_at = Instant::now();
        let command_timeout = connector.config().command_timeout;
        let error = serve(&inner, &mut connection, &events, command_timeout).await;
        {
            let mut inner = inner.borrow_mut();
            inner.connected = false;
            inner.outbox.clear();
            inner.stats.lost += 1;
        }
        tracing::warn!(error = %error, "pub/sub connection to Valkey lost: subscribing again");
        if events.unbounded_send(PushEvent::Lost).is_err() {
            return;
        }
        failures = if connected_at.elapsed() >= Duration::from_secs(1) {
            0
        } else {
            failures.saturating_add(1)
        };
    }
}

/// What woke the serving loop.
enum Step {
    Frame(Result<Reply, ValkeyError>),
    Outbox,
    Timer,
}

/// Writes what is queued and reads what Valkey pushes until the connection fails.
async fn serve(
    inner: &Rc<RefCell<Inner>>,
    connection: &mut Connection,
    events: &mpsc::UnboundedSender<PushEvent>,
    command_timeout: Duration,
) -> ValkeyError {
    let mut last_heard = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    loop {
        let out = inner.borrow_mut().outbox.split().freeze();
        if !out.is_empty() {
            if let Err(error) = connection.send(&out).await {
                return error;
            }
        }
        let wake_at = match ping_sent {
            Some(at) => at + command_timeout,
            None => last_heard + PING_AFTER_SILENCE,
        };
        let frame = async { Step::Frame(connection.next_frame().await) };
        let outbox = async {
            std::future::poll_fn(|cx| {
                let mut inner = inner.borrow_mut();
                if inner.outbox.is_empty() {
                    inner.waker = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            Step::Outbox
        };
        let timer = async {
            glommio::timer::sleep(wake_at.saturating_duration_since(Instant::now())).await;
            Step::Timer
        };
        // The frame first: under a stream of messages, writing waits for a pause (the outbox
        // is tiny and ordered either way).
        let step = futures_lite::future::or(frame, futures_lite::future::or(outbox, timer)).await;
        match step {
            Step::Frame(Ok(reply)) => {
                last_heard = Instant::now();
                ping_sent = None;
                match classify(reply) {
                    Some(Push::Event(event)) => {
                        if matches!(event, PushEvent::Message { .. }) {
                            inner.borrow_mut().stats.messages += 1;
                        }
                        if events.unbounded_send(event).is_err() {
                            return ValkeyError::Unavailable("nobody listens to the subscriber");
                        }
                    }
                    Some(Push::Refused(message)) => {
                        tracing::error!(error = %message, "Valkey refused a pub/sub command");
                    }
                    None => {}
                }
            }
            Step::Frame(Err(error)) => return error,
            Step::Outbox => {}
            Step::Timer => {
                if ping_sent.is_some() {
                    return ValkeyError::Timeout("waiting for a pub/sub pong");
                }
                encode_command(&mut inner.borrow_mut().outbox, &[b"PING"]);
                ping_sent = Some(Instant::now());
            }
        }
    }
}

/// A frame pushed on a subscribed connection, classified.
#[derive(Debug, PartialEq, Eq)]
enum Push {
    Event(PushEvent),
    /// An error reply to one of our commands (e.g. a Valkey without sharded pub/sub).
    Refused(String),
}

/// RESP2 subscribed mode: `["smessage", channel, payload]`, `["ssubscribe", channel, n]`,
/// `["sunsubscribe", channel, n]`, `["pong", ""]`, or an error reply. `None`: nothing to
/// report (an unsubscribe confirmation, a pong, a frame of another kind).
fn classify(reply: Reply) -> Option<Push> {
    let items = match reply {
        Reply::Array(items) => items,
        Reply::Error(message) => return Some(Push::Refused(message)),
        _ => return None,
    };
    let mut items = items.into_iter();
    let kind = items.next()?.into_bytes()?;
    match kind.as_ref() {
        b"smessage" | b"message" => {
            let channel = items.next()?.into_bytes()?;
            let payload = items.next()?.into_bytes()?;
            Some(Push::Event(PushEvent::Message { channel, payload }))
        }
        b"ssubscribe" | b"subscribe" => {
            let channel = items.next()?.into_bytes()?;
            Some(Push::Event(PushEvent::Subscribed(channel)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{run_local, ValkeyServer};
    use super::*;
    use futures::StreamExt;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn pushed_frames_are_classified() {
        assert_eq!(
            classify(Reply::Array(vec![bulk("smessage"), bulk("c"), bulk("p")])),
            Some(Push::Event(PushEvent::Message {
                channel: Bytes::from_static(b"c"),
                payload: Bytes::from_static(b"p"),
            }))
        );
        assert_eq!(
            classify(Reply::Array(vec![
                bulk("ssubscribe"),
                bulk("c"),
                Reply::Integer(1)
            ])),
            Some(Push::Event(PushEvent::Subscribed(Bytes::from_static(b"c"))))
        );
        assert_eq!(
            classify(Reply::Array(vec![
                bulk("sunsubscribe"),
                bulk("c"),
                Reply::Integer(0)
            ])),
            None
        );
        assert_eq!(classify(Reply::Array(vec![bulk("pong"), bulk("")])), None);
        assert_eq!(
            classify(Reply::Error("ERR unknown command".into())),
            Some(Push::Refused("ERR unknown command".into()))
        );
        // Malformed: too short.
        assert_eq!(classify(Reply::Array(vec![bulk("smessage")])), None);
    }

    /// Subscribes, receives, survives `CLIENT KILL TYPE pubsub` (reported as `Lost`, then
    /// confirmed again), and stops receiving after unsubscribing.
    #[test]
    fn subscribes_receives_and_resubscribes_after_a_kill() {
        let server = ValkeyServer::start(&[]);
        let config = server.config();
        run_local(move || async move {
            let (subscriber, mut events) = Subscriber::start(config.clone()).expect("start");
            subscriber.subscribe(Bytes::from_static(b"ch"));
            assert_eq!(
                events.next().await,
                Some(PushEvent::Subscribed(Bytes::from_static(b"ch")))
            );
            let mut admin = Connection::connect(&config).await.expect("admin");
            admin
                .call(&[b"SPUBLISH", b"ch", b"hello"])
                .await
                .expect("spublish");
            assert_eq!(
                events.next().await,
                Some(PushEvent::Message {
                    channel: Bytes::from_static(b"ch"),
                    payload: Bytes::from_static(b"hello"),
                })
            );
            admin
                .call(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"])
                .await
                .expect("kill");
            assert_eq!(events.next().await, Some(PushEvent::Lost));
            assert_eq!(
                events.next().await,
                Some(PushEvent::Subscribed(Bytes::from_static(b"ch")))
            );
            subscriber.unsubscribe(b"ch");
            assert_eq!(subscriber.wanted(), 0);
            // Await the condition: Valkey counts no subscriber of the channel any more.
            let mut published = Reply::Integer(1);
            for _ in 0..100 {
                published = admin
                    .call(&[b"SPUBLISH", b"ch", b"late"])
                    .await
                    .expect("spublish");
                if published == Reply::Integer(0) {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(published, Reply::Integer(0));
            subscriber.shutdown().await;
        });
    }
}
