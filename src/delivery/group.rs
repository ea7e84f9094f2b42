//! Consumer-group consumers, delivery side: the loop every transport runs for one consumer of
//! one group on one topic, and the wake-up it waits on.
//!
//! Unlike a plain consumer, a group consumer is not handed messages by the fan-out: it *takes*
//! them from the group ([`Shard::group_take`]), because which consumer gets a message is the
//! group's decision (and with Valkey, shared by every relay). The fan-out only wakes it
//! ([`GroupWake`], registered in the shard's registry like a sink, with the owner told of the
//! interest): on news of the topic it takes new messages; on a release (`nack`) and every
//! claim period it also looks for due ones (ack timeouts). Flow control is the loop's own:
//! it never takes more than `max_in_flight` minus what the consumer holds, and an
//! acknowledgement frees room and wakes it ([`Holding`]).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::shard::{ReplayQuery, Shard, ShardError};
use crate::store::group::{GroupError, GroupMessage, TakeRequest};
use crate::store::message::MessageId;

/// The shortest and longest time between two looks for due messages; in between, a quarter
/// of the group's `ack_timeout` (a redelivery comes at most that late).
const MIN_CLAIM_PERIOD: Duration = Duration::from_millis(100);
const MAX_CLAIM_PERIOD: Duration = Duration::from_secs(1);

/// A group consumer's wake-up: set by the registry (news of the topic), by a release (claim),
/// by its own session (an acknowledgement freed room). A wake before the wait is not lost.
#[derive(Default)]
pub struct GroupWake {
    woken: Cell<bool>,
    claim: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl GroupWake {
    pub fn new() -> Rc<GroupWake> {
        Rc::new(GroupWake::default())
    }

    pub fn wake(&self, claim: bool) {
        self.woken.set(true);
        if claim {
            self.claim.set(true);
        }
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Resolves at the next wake (at once if one came since the last); yields whether a
    /// claim was asked for.
    pub fn wait(&self) -> impl Future<Output = bool> + '_ {
        std::future::poll_fn(move |cx| {
            if self.woken.replace(false) {
                Poll::Ready(self.claim.replace(false))
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// What one consumer holds of one group on one topic, and may hold.
///
/// A message counts against `max_in_flight` until the consumer settles it or its
/// `ack_timeout` runs out: from then on it is due and its place is free, so a consumer whose
/// places were all taken by messages it let time out still gets work. (Counting due messages
/// until this consumer settled them kept it from ever getting anything again once another
/// consumer or the dead letters had taken them, and a lone consumer that let
/// `max_in_flight` messages time out stalled its group for good.) A due message goes to
/// *another* consumer first: it is not handed back to this one until a second `ack_timeout`
/// has passed (by then no other consumer took it: a lone consumer gets it back).
pub struct Holding {
    pub max_in_flight: usize,
    /// Ids handed over, and when; kept two `ack_timeout`s (see above).
    held: RefCell<BTreeMap<MessageId, Instant>>,
    /// The group's `ack_timeout` (set when the consumer starts; until then nothing is due).
    ack_timeout: Cell<Option<Duration>>,
    pub wake: Rc<GroupWake>,
}

impl Holding {
    pub fn new(max_in_flight: usize) -> Holding {
        Holding {
            max_in_flight: max_in_flight.max(1),
            held: RefCell::new(BTreeMap::new()),
            ack_timeout: Cell::new(None),
            wake: GroupWake::new(),
        }
    }

    /// Forgets what was handed over two `ack_timeout`s ago or more.
    fn expire(&self) {
        if let Some(timeout) = self.ack_timeout.get() {
            self.held
                .borrow_mut()
                .retain(|_, at| at.elapsed() < timeout * 2);
        }
    }

    /// Whether a message handed over at `at` still takes a place (is not due).
    fn counts(&self, at: Instant) -> bool {
        self.ack_timeout
            .get()
            .is_none_or(|timeout| at.elapsed() < timeout)
    }

    /// When the oldest place-taking message becomes due, if one is held and the timeout is
    /// known.
    fn next_due(&self) -> Option<Instant> {
        let timeout = self.ack_timeout.get()?;
        self.held
            .borrow()
            .values()
            .filter(|at| self.counts(**at))
            .min()
            .map(|at| *at + timeout)
    }

    /// How many more it may be handed now.
    pub fn room(&self) -> usize {
        self.max_in_flight.saturating_sub(self.held())
    }

    /// How many places its messages take (handed over, not settled, not due).
    pub fn held(&self) -> usize {
        self.expire();
        self.held
            .borrow()
            .values()
            .filter(|at| self.counts(**at))
            .count()
    }

    /// The ids not to hand back to it: what it holds, and what became due less than an
    /// `ack_timeout` ago (another consumer gets those first).
    pub fn held_ids(&self) -> Vec<MessageId> {
        self.expire();
        self.held.borrow().keys().copied().collect()
    }

    /// The consumer settled (acknowledged or released) `ids`: those it held free room.
    pub fn settle(&self, ids: &[MessageId]) {
        let mut held = self.held.borrow_mut();
        let before = held.len();
        for id in ids {
            held.remove(id);
        }
        if held.len() < before {
            drop(held);
            self.wake.wake(false);
        }
    }

    fn hold(&self, messages: &[GroupMessage]) {
        let mut held = self.held.borrow_mut();
        let now = Instant::now();
        for m in messages {
            held.insert(m.message.id, now);
        }
    }
}

/// One group consumer's identity.
#[derive(Debug, Clone)]
pub struct GroupConsumer {
    /// Stored topic name.
    pub topic: Arc<str>,
    pub group: String,
    pub consumer: String,
}

/// A group consumer's registration on this shard: its wake-up attached to the registry and
/// the interest registered with the topic's owner (so news of the topic, also from other
/// relays, reaches it). Dropped: detached, and the interest withdrawn when nothing else here
/// follows the topic.
pub struct Registration<'a> {
    shard: &'a Shard,
    topic: Arc<str>,
    wake: Rc<GroupWake>,
}

impl<'a> Registration<'a> {
    pub async fn new(
        shard: &'a Shard,
        topic: &Arc<str>,
        wake: &Rc<GroupWake>,
    ) -> Result<Registration<'a>, ShardError> {
        shard.delivery.attach_group(topic, wake);
        let registration = Registration {
            shard,
            topic: topic.clone(),
            wake: wake.clone(),
        };
        shard
            .subscribe_read(topic, ReplayQuery::register_only())
            .await?;
        Ok(registration)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.shard.delivery.detach_group(&self.topic, &self.wake) {
            self.shard.withdraw_interest(&self.topic);
        }
    }
}

/// How often a consumer of a group with this `ack_timeout` looks for due messages.
pub fn claim_period(ack_timeout_ms: u64) -> Duration {
    (Duration::from_millis(ack_timeout_ms) / 4).clamp(MIN_CLAIM_PERIOD, MAX_CLAIM_PERIOD)
}

/// Runs one consumer until its group is gone or storage fails: takes whatever it has room
/// for and hands it to `deliver`, then waits for news, room, or the next claim period. The
/// caller registers it first ([`Registration`]) and ends it by dropping the future.
pub async fn run_consumer(
    shard: &Shard,
    who: &GroupConsumer,
    holding: &Holding,
    deliver: &mut dyn FnMut(Vec<GroupMessage>),
) -> Result<(), GroupError> {
    let settings = shard
        .group_info(who.topic.to_string(), who.group.clone())
        .await?
        .settings;
    let period = claim_period(settings.ack_timeout_ms);
    holding
        .ack_timeout
        .set(Some(Duration::from_millis(settings.ack_timeout_ms)));
    let mut claim = true;
    let mut next_claim = Instant::now();
    loop {
        let room = holding.room();
        if room > 0 {
            let claiming = claim || Instant::now() >= next_claim;
            let held = holding.held_ids();
            let batch = shard
                .group_take(
                    who.topic.to_string(),
                    who.group.clone(),
                    TakeRequest {
                        consumer: who.consumer.clone(),
                        max: room,
                        claim: claiming,
                        held,
                    },
                )
                .await?;
            if claiming {
                claim = false;
                next_claim = Instant::now() + period;
            }
            let full = batch.len() >= room;
            if !batch.is_empty() {
                holding.hold(&batch);
                deliver(batch);
            }
            if full {
                // Maybe more ready: take again once there is room.
                continue;
            }
        }
        if holding.room() == 0 {
            // Nothing may be handed out before an acknowledgement frees room (which wakes)
            // or the oldest held message becomes due (its place is free again; it may be
            // handed back, so look for due messages then).
            let wait = std::pin::pin!(holding.wake.wait());
            let due = holding
                .next_due()
                .unwrap_or_else(|| Instant::now() + MAX_CLAIM_PERIOD);
            let tick = std::pin::pin!(glommio::timer::sleep(
                due.saturating_duration_since(Instant::now())
            ));
            match futures::future::select(wait, tick).await {
                futures::future::Either::Left((claim_asked, _)) => claim |= claim_asked,
                futures::future::Either::Right(_) => claim = true,
            }
            continue;
        }
        let wait = std::pin::pin!(holding.wake.wait());
        let tick = std::pin::pin!(glommio::timer::sleep(
            next_claim.saturating_duration_since(Instant::now())
        ));
        match futures::future::select(wait, tick).await {
            futures::future::Either::Left((claim_asked, _)) => claim |= claim_asked,
            futures::future::Either::Right(_) => claim = true,
        }
    }
}
