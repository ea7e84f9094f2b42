//! The oracle: what was published and removed, what each consumer received, and the
//! judgement of the one against the other.
//!
//! Every payload carries a history-wide number (`seq`), so a delivery names the publish it
//! came from. A publish ends [`Fate::Acked`] with the id of its 201/207 answer,
//! [`Fate::Ambiguous`] (503, timeout, connection lost: maybe stored) or [`Fate::Rejected`].
//!
//! A consumer's connection is a [`Session`]: the position each topic starts after, the
//! deliveries and gap signals it got, in arrival order. The invariant, per session and topic:
//!
//! 1. Only messages of that topic whose publish was acknowledged (with that very id) or
//!    ambiguous are delivered; each id is greater than the session's start and than the
//!    previous delivery (order, and exactly once: a repeat is not greater).
//! 2. Every acknowledged message after the start and before the session's last delivery
//!    (for the final, still open session: every one) was delivered, unless it is *excused*:
//!    - it lies inside a gap the session received: after `requested` and before
//!      `oldest_available`; with `oldest_available: null`, after `requested` and acknowledged
//!      before the gap arrived;
//!    - its ttl may have run out before the consumer passed it: published at `t`, with ttl
//!      `s`, received by nobody, and the session's first later delivery (or, if none, the
//!      time of judgement) came at or after `t + s`. A later message received before that
//!      proves the relay passed over a live message: a loss;
//!    - the session started from `earliest`, the message lies before the session's first
//!      delivery, and something may have removed it before the session read it: a trim or
//!      delete the checker asked for, count retention (as many newer messages exist as the
//!      limit), age retention, its ttl, or the memory backend's byte budget. "Earliest" means
//!      "what is retained", so no gap is owed for those.
//!
//!    Nothing else excuses a missing message: trims, deletes and retention after a resume
//!    position owe a gap.
//! 3. A final session that stops receiving while it is still owed messages is a stall.
//!
//! Sans-IO: times are offsets from the history's start, handed in by the executor.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::verify::MessageId;

/// Tolerance on the ttl and age rules: the relay's clock read and ours differ by scheduling.
const CLOCK_SLACK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// In flight.
    Pending,
    Acked(MessageId),
    /// 503, timeout or a lost connection: the relay may have stored it.
    Ambiguous,
    Rejected,
}

/// One published message.
#[derive(Debug, Clone)]
pub struct Published {
    pub topic: u16,
    pub ttl: Option<Duration>,
    /// When its request was sent.
    pub sent: Duration,
    pub fate: Fate,
    /// A trim or delete the checker asked for may have removed it.
    pub removed: bool,
}

/// Where a session starts on one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pos {
    Earliest,
    After(MessageId),
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Pos::Earliest => f.write_str("earliest"),
            Pos::After(id) => write!(f, "after {}-{}", id.ms, id.seq),
        }
    }
}

/// A gap signal as received.
#[derive(Debug, Clone)]
pub struct GapSeen {
    pub requested: Option<MessageId>,
    pub oldest_available: Option<MessageId>,
    pub reason: String,
    /// The newest acknowledged id of the topic when it arrived (for `oldest_available: null`).
    pub newest_acked: Option<MessageId>,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub seq: u64,
    pub id: Option<MessageId>,
    pub at: Duration,
}

/// Where a session's losses sit: each missing message's send time and ttl, and the
/// deliveries just around the first one (ids and arrival times), to tell a race from a hole.
fn loss_context(ledger: &Ledger, t: &TopicLog, missing: &[MessageId]) -> String {
    let list = ledger.acked(t.topic);
    let mut out = String::from("; missing:");
    for id in missing.iter().take(8) {
        if let Some(&(_, seq)) = list.iter().find(|(i, _)| i == id) {
            let m = &ledger.messages[seq as usize];
            out += &format!(
                " {} (seq {seq}, sent {} ms, ttl {:?})",
                id_str(Some(*id)),
                m.sent.as_millis(),
                m.ttl
            );
        }
    }
    if let Some(first) = missing.first() {
        let at = t
            .deliveries
            .iter()
            .position(|d| d.id.is_some_and(|d| d > *first))
            .unwrap_or(t.deliveries.len());
        out += "; delivered around it:";
        for d in &t.deliveries[at.saturating_sub(3)..(at + 3).min(t.deliveries.len())] {
            out += &format!(" {} at {} ms,", id_str(d.id), d.at.as_millis());
        }
    }
    out
}

/// One topic within a session.
#[derive(Debug, Clone)]
pub struct TopicLog {
    pub topic: u16,
    pub start: Pos,
    pub deliveries: Vec<Delivery>,
    pub gaps: Vec<GapSeen>,
}

/// One connection of a consumer (for long-poll: one chain of polls).
#[derive(Debug, Clone)]
pub struct Session {
    pub started: Duration,
    pub topics: Vec<TopicLog>,
    /// Closed (by us or the relay): only what lies before its last delivery is owed.
    pub closed: bool,
    /// Why it was opened ("subscribe", "resume", "4008", ...), for reports.
    pub why: String,
}

/// One consumer's whole log.
#[derive(Debug, Clone)]
pub struct ConsumerLog {
    pub sessions: Vec<Session>,
    /// Deliveries received, all sessions.
    pub received: u64,
    /// When anything last arrived (progress, for stall detection).
    pub last_progress: Duration,
    /// Deliveries that fit no session: unreadable, or of a topic not subscribed.
    pub strays: Vec<String>,
    /// `ws`, `sse` or `longpoll`, for reports.
    pub transport: &'static str,
}

impl ConsumerLog {
    pub fn new(transport: &'static str) -> ConsumerLog {
        ConsumerLog {
            sessions: Vec::new(),
            received: 0,
            last_progress: Duration::ZERO,
            strays: Vec::new(),
            transport,
        }
    }

    /// The current session's log of `topic`, if subscribed.
    pub fn current(&mut self, topic: u16) -> Option<&mut TopicLog> {
        self.sessions
            .last_mut()
            .and_then(|s| s.topics.iter_mut().find(|t| t.topic == topic))
    }

    /// Where a resume from the last message seen starts on `topic`: after the last delivery
    /// of the latest session that had one, else where the latest session started.
    pub fn last_seen(&self, topic: u16) -> Pos {
        let Some(s) = self.sessions.last() else {
            return Pos::Earliest;
        };
        let Some(t) = s.topics.iter().find(|t| t.topic == topic) else {
            return Pos::Earliest;
        };
        match t.deliveries.iter().rev().find_map(|d| d.id) {
            Some(id) => Pos::After(id),
            None => t.start,
        }
    }
}

/// Retention the relay was configured with (what may remove a message besides trims).
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    pub max_messages: Option<u32>,
    pub age: Option<Duration>,
    /// The memory backend under a byte budget: any message may be evicted.
    pub evicting: bool,
}

/// Everything published in one history.
#[derive(Debug, Default)]
pub struct Ledger {
    pub messages: Vec<Published>,
    /// Per topic, acknowledged ids ascending, with their seq.
    acked: HashMap<u16, Vec<(MessageId, u64)>>,
}

impl Ledger {
    pub fn publish(&mut self, p: Published) -> u64 {
        self.messages.push(p);
        self.messages.len() as u64 - 1
    }

    pub fn settle(&mut self, seq: u64, fate: Fate) {
        let Some(m) = self.messages.get_mut(seq as usize) else {
            return;
        };
        m.fate = fate;
        if let Fate::Acked(id) = fate {
            let list = self.acked.entry(m.topic).or_default();
            let at = list.partition_point(|(i, _)| *i < id);
            list.insert(at, (id, seq));
        }
    }

    pub fn acked(&self, topic: u16) -> &[(MessageId, u64)] {
        self.acked.get(&topic).map_or(&[], Vec::as_slice)
    }

    pub fn newest_acked(&self, topic: u16) -> Option<MessageId> {
        self.acked(topic).last().map(|(id, _)| *id)
    }

    /// The acknowledged id `k` before `from` (after, or the newest if `None`).
    pub fn back(&self, topic: u16, from: Option<MessageId>, k: u32) -> Pos {
        let list = self.acked(topic);
        let end = match from {
            Some(id) => list.partition_point(|(i, _)| *i <= id),
            None => list.len(),
        };
        match (end as u64).checked_sub(u64::from(k) + 1) {
            Some(i) => Pos::After(list[i as usize].0),
            None => Pos::Earliest,
        }
    }

    /// Marks what `POST trim {keep_count: keep}` may remove: all but the newest `keep`
    /// acknowledged messages of `topic` (ambiguous ones may take some of the kept places, so
    /// this is an upper bound on what is gone).
    pub fn trimmed(&mut self, topic: u16, keep: u32) {
        let list = self.acked(topic);
        let cut = list.len().saturating_sub(keep as usize);
        let seqs: Vec<u64> = list[..cut].iter().map(|(_, s)| *s).collect();
        for s in seqs {
            self.messages[s as usize].removed = true;
        }
    }

    pub fn deleted(&mut self, topic: u16) {
        for m in self.messages.iter_mut().filter(|m| m.topic == topic) {
            m.removed = true;
        }
    }

    pub fn count(&self, pred: impl Fn(&Fate) -> bool) -> u64 {
        self.messages.iter().filter(|m| pred(&m.fate)).count() as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// An acknowledged message owed and never delivered (nor excused).
    Lost,
    /// A message delivered twice in one session, or out of id order.
    OutOfOrder,
    /// A message delivered that was not acknowledged (nor ambiguous), or under another id.
    NotAcked,
    /// A message of another topic, or no message of ours at all.
    Foreign,
    /// Owed messages, no progress.
    Stall,
    /// The relay failed to serve (a WebSocket error frame, a 5xx to a read) or crashed.
    Relay,
    /// A consumer group's contract broken (`check::group`).
    Group,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Kind::Lost => "lost",
            Kind::OutOfOrder => "duplicate or out of order",
            Kind::NotAcked => "not acknowledged",
            Kind::Foreign => "foreign",
            Kind::Stall => "stall",
            Kind::Relay => "relay error",
            Kind::Group => "consumer group",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    pub consumer: u8,
    pub transport: &'static str,
    pub topic: u16,
    pub session: usize,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}: consumer c{} ({}) topic t{} session {}: {}",
            self.kind, self.consumer, self.transport, self.topic, self.session, self.detail
        )
    }
}

fn id_str(id: Option<MessageId>) -> String {
    id.map_or_else(|| "?".to_owned(), |i| format!("{}-{}", i.ms, i.seq))
}

/// What judging found, plus counts for the summary.
#[derive(Debug, Default)]
pub struct Judgement {
    pub violations: Vec<Violation>,
    pub deliveries: u64,
    pub gaps: u64,
    /// Acknowledged messages still owed to final sessions (the settle loop waits on this).
    pub owed: u64,
}

/// Judges every consumer's log at time `now`.
pub fn judge(
    ledger: &Ledger,
    retention: Retention,
    consumers: &[(u8, &ConsumerLog)],
    now: Duration,
) -> Judgement {
    let mut j = Judgement::default();
    for (c, log) in consumers {
        for stray in &log.strays {
            j.violations.push(Violation {
                kind: Kind::Foreign,
                consumer: *c,
                transport: log.transport,
                topic: 0,
                session: log.sessions.len().saturating_sub(1),
                detail: stray.clone(),
            });
        }
        let last = log.sessions.len().saturating_sub(1);
        for (si, session) in log.sessions.iter().enumerate() {
            let open = si == last && !session.closed;
            for t in &session.topics {
                judge_topic(
                    ledger,
                    retention,
                    (*c, log.transport),
                    si,
                    session,
                    t,
                    open,
                    now,
                    &mut j,
                );
            }
        }
    }
    j
}

#[allow(clippy::too_many_arguments)]
fn judge_topic(
    ledger: &Ledger,
    retention: Retention,
    (consumer, transport): (u8, &'static str),
    si: usize,
    session: &Session,
    t: &TopicLog,
    open: bool,
    now: Duration,
    j: &mut Judgement,
) {
    let violation = |kind, detail: String| Violation {
        kind,
        consumer,
        transport,
        topic: t.topic,
        session: si,
        detail,
    };
    j.deliveries += t.deliveries.len() as u64;
    j.gaps += t.gaps.len() as u64;
    // 1. What was delivered.
    let mut prev = match t.start {
        Pos::After(id) => Some(id),
        Pos::Earliest => None,
    };
    let mut seen: HashMap<u64, ()> = HashMap::new();
    for d in &t.deliveries {
        let Some(m) = ledger.messages.get(d.seq as usize) else {
            j.violations.push(violation(
                Kind::Foreign,
                format!("seq {} was never published", d.seq),
            ));
            continue;
        };
        if m.topic != t.topic {
            j.violations.push(violation(
                Kind::Foreign,
                format!("seq {} belongs to t{}", d.seq, m.topic),
            ));
            continue;
        }
        match m.fate {
            Fate::Acked(id) if Some(id) != d.id => j.violations.push(violation(
                Kind::NotAcked,
                format!(
                    "seq {} delivered as {}, acknowledged as {}",
                    d.seq,
                    id_str(d.id),
                    id_str(Some(id))
                ),
            )),
            Fate::Rejected => j.violations.push(violation(
                Kind::NotAcked,
                format!("seq {} ({}) was rejected", d.seq, id_str(d.id)),
            )),
            _ => {}
        }
        if seen.insert(d.seq, ()).is_some() {
            j.violations.push(violation(
                Kind::OutOfOrder,
                format!("seq {} ({}) delivered twice", d.seq, id_str(d.id)),
            ));
            continue;
        }
        if let (Some(id), Some(p)) = (d.id, prev) {
            if id <= p {
                j.violations.push(violation(
                    Kind::OutOfOrder,
                    format!(
                        "{} delivered after {} (start {})",
                        id_str(Some(id)),
                        id_str(Some(p)),
                        t.start
                    ),
                ));
                continue;
            }
        }
        if d.id.is_some() {
            prev = d.id;
        }
    }
    // 2. What was owed.
    let last_delivered = t.deliveries.iter().rev().find_map(|d| d.id);
    let first_delivered = t.deliveries.iter().find_map(|d| d.id);
    let list = ledger.acked(t.topic);
    let from = match t.start {
        Pos::After(id) => list.partition_point(|(i, _)| *i <= id),
        Pos::Earliest => 0,
    };
    let mut missing = Vec::new();
    for (idx, &(id, seq)) in list.iter().enumerate().skip(from) {
        if !open && last_delivered.is_none_or(|l| id > l) {
            break;
        }
        if seen.contains_key(&seq) {
            continue;
        }
        let m = &ledger.messages[seq as usize];
        if in_gap(&t.gaps, id) {
            continue;
        }
        // When the session passed this id: its first later delivery, else now.
        let passed = t
            .deliveries
            .iter()
            .find(|d| d.id.is_some_and(|d| d > id))
            .map_or(now, |d| d.at);
        if m.ttl
            .is_some_and(|ttl| m.sent + ttl <= passed + CLOCK_SLACK)
        {
            continue;
        }
        if t.start == Pos::Earliest && first_delivered.is_none_or(|f| id < f) {
            let newer = (list.len() - idx - 1) as u64;
            let removable = m.removed
                || retention.evicting
                || retention
                    .max_messages
                    .is_some_and(|n| newer >= u64::from(n))
                || retention
                    .age
                    .is_some_and(|a| m.sent + a <= now + CLOCK_SLACK)
                || m.ttl.is_some_and(|ttl| m.sent + ttl <= now + CLOCK_SLACK);
            if removable {
                continue;
            }
        }
        missing.push(id);
    }
    if open {
        j.owed += missing.len() as u64;
    }
    if !missing.is_empty() && !open {
        j.violations.push(violation(
            Kind::Lost,
            format!(
                "{} acknowledged message(s) missing before the last delivery {} (first {}), \
                 start {}, {} delivered, gaps {:?}",
                missing.len(),
                id_str(last_delivered),
                id_str(missing.first().copied()),
                t.start,
                t.deliveries.len(),
                t.gaps.iter().map(gap_str).collect::<Vec<_>>()
            ) + &loss_context(ledger, t, &missing),
        ));
    } else if !missing.is_empty() {
        // Open sessions: only holes before something delivered are certain losses now;
        // the tail may still be on its way (the settle loop decides about stalls).
        let holes = last_delivered.map_or(0, |l| missing.iter().filter(|m| **m < l).count());
        if holes > 0 {
            j.violations.push(violation(
                Kind::Lost,
                format!(
                    "{holes} acknowledged message(s) skipped (first {}), delivered up to {}, \
                     start {}, {} delivered, gaps {:?}",
                    id_str(missing.first().copied()),
                    id_str(last_delivered),
                    t.start,
                    t.deliveries.len(),
                    t.gaps.iter().map(gap_str).collect::<Vec<_>>()
                ) + &loss_context(ledger, t, &missing),
            ));
        }
    }
    let _ = session;
}

fn gap_str(g: &GapSeen) -> String {
    format!(
        "{}..{} {}",
        id_str(g.requested),
        id_str(g.oldest_available),
        g.reason
    )
}

/// Whether `id` lies inside a gap the session was told about.
fn in_gap(gaps: &[GapSeen], id: MessageId) -> bool {
    gaps.iter().any(|g| {
        let after = g.requested.is_none_or(|r| id > r);
        let before = match g.oldest_available {
            Some(o) => id < o,
            None => g.newest_acked.is_some_and(|n| id <= n),
        };
        after && before
    })
}

/// The violations of open sessions still owed messages: stalls, once the settle loop gave up.
pub fn stalls(
    ledger: &Ledger,
    retention: Retention,
    consumers: &[(u8, &ConsumerLog)],
    now: Duration,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for (c, log) in consumers {
        let Some(session) = log.sessions.last().filter(|s| !s.closed) else {
            continue;
        };
        let si = log.sessions.len() - 1;
        for t in &session.topics {
            let one = ConsumerLog {
                sessions: vec![Session {
                    started: session.started,
                    topics: vec![t.clone()],
                    closed: false,
                    why: session.why.clone(),
                }],
                received: 0,
                last_progress: log.last_progress,
                strays: Vec::new(),
                transport: log.transport,
            };
            let j = judge(ledger, retention, &[(*c, &one)], now);
            if j.owed > 0 {
                out.push(Violation {
                    kind: Kind::Stall,
                    consumer: *c,
                    transport: log.transport,
                    topic: t.topic,
                    session: si,
                    detail: format!(
                        "{} acknowledged message(s) never arrived; {} delivered in this session \
                         (opened by {}, start {}), last progress at {:.1}s",
                        j.owed,
                        t.deliveries.len(),
                        session.why,
                        t.start,
                        log.last_progress.as_secs_f64()
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> MessageId {
        MessageId { ms, seq: 0 }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// `n` acknowledged messages on topic 0 with ids 1..=n, sent at 0 s.
    fn ledger(n: u64, ttl: Option<Duration>) -> Ledger {
        let mut l = Ledger::default();
        for i in 1..=n {
            let seq = l.publish(Published {
                topic: 0,
                ttl,
                sent: Duration::ZERO,
                fate: Fate::Pending,
                removed: false,
            });
            l.settle(seq, Fate::Acked(id(i)));
        }
        l
    }

    fn session(start: Pos, got: &[u64], gaps: Vec<GapSeen>, closed: bool) -> ConsumerLog {
        ConsumerLog {
            sessions: vec![Session {
                started: Duration::ZERO,
                topics: vec![TopicLog {
                    topic: 0,
                    start,
                    deliveries: got
                        .iter()
                        .map(|&i| Delivery {
                            seq: i - 1,
                            id: Some(id(i)),
                            at: secs(1),
                        })
                        .collect(),
                    gaps,
                }],
                closed,
                why: "subscribe".into(),
            }],
            received: got.len() as u64,
            last_progress: secs(1),
            strays: Vec::new(),
            transport: "ws",
        }
    }

    fn kinds(l: &Ledger, log: &ConsumerLog, r: Retention) -> (Vec<Kind>, u64) {
        let j = judge(l, r, &[(0, log)], secs(2));
        (j.violations.iter().map(|v| v.kind).collect(), j.owed)
    }

    #[test]
    fn everything_in_order_is_clean_and_a_tail_is_owed_not_lost() {
        let l = ledger(5, None);
        let full = session(Pos::Earliest, &[1, 2, 3, 4, 5], vec![], false);
        assert_eq!(kinds(&l, &full, Retention::default()), (vec![], 0));
        let part = session(Pos::After(id(2)), &[3], vec![], false);
        assert_eq!(kinds(&l, &part, Retention::default()), (vec![], 2));
        let closed = session(Pos::After(id(2)), &[3], vec![], true);
        assert_eq!(kinds(&l, &closed, Retention::default()), (vec![], 0));
    }

    #[test]
    fn holes_repeats_and_reorders_are_violations() {
        let l = ledger(5, None);
        let hole = session(Pos::Earliest, &[1, 3], vec![], true);
        assert_eq!(kinds(&l, &hole, Retention::default()).0, vec![Kind::Lost]);
        let again = session(Pos::After(id(2)), &[2, 3], vec![], true);
        assert_eq!(
            kinds(&l, &again, Retention::default()).0,
            vec![Kind::OutOfOrder]
        );
        let swapped = session(Pos::Earliest, &[1, 3, 2], vec![], true);
        assert_eq!(
            kinds(&l, &swapped, Retention::default()).0,
            vec![Kind::OutOfOrder]
        );
    }

    #[test]
    fn a_gap_excuses_exactly_its_range() {
        let l = ledger(6, None);
        let gap = |o: Option<u64>| GapSeen {
            requested: Some(id(1)),
            oldest_available: o.map(id),
            reason: "trimmed".into(),
            newest_acked: Some(id(6)),
        };
        let ok = session(Pos::After(id(1)), &[4, 5, 6], vec![gap(Some(4))], true);
        assert_eq!(kinds(&l, &ok, Retention::default()).0, vec![]);
        let short = session(Pos::After(id(1)), &[4, 5, 6], vec![gap(Some(3))], true);
        assert_eq!(kinds(&l, &short, Retention::default()).0, vec![Kind::Lost]);
        let null = session(Pos::After(id(1)), &[], vec![gap(None)], false);
        assert_eq!(kinds(&l, &null, Retention::default()), (vec![], 0));
    }

    #[test]
    fn removals_excuse_an_earliest_prefix_only_and_never_a_resume() {
        let mut l = ledger(6, None);
        l.trimmed(0, 3);
        let earliest = session(Pos::Earliest, &[4, 5, 6], vec![], false);
        assert_eq!(kinds(&l, &earliest, Retention::default()), (vec![], 0));
        let resume = session(Pos::After(id(1)), &[4, 5, 6], vec![], false);
        assert_eq!(
            kinds(&l, &resume, Retention::default()).0,
            vec![Kind::Lost],
            "a trim after the resume point owes a gap"
        );
        let counted = ledger(6, None);
        let r = Retention {
            max_messages: Some(3),
            ..Retention::default()
        };
        assert_eq!(kinds(&counted, &earliest, r), (vec![], 0));
        let too_many = session(Pos::Earliest, &[5, 6], vec![], false);
        assert_eq!(kinds(&counted, &too_many, r).0, vec![Kind::Lost]);
    }

    #[test]
    fn ttl_excuses_only_what_expired_before_the_consumer_passed_it() {
        let l = ledger(3, Some(secs(1)));
        // Message 2 missing; message 3 arrived at 1 s = 0 s + ttl: it may have expired.
        let late = session(Pos::After(id(1)), &[3], vec![], true);
        assert_eq!(kinds(&l, &late, Retention::default()).0, vec![]);
        let l = ledger(3, Some(secs(5)));
        assert_eq!(kinds(&l, &late, Retention::default()).0, vec![Kind::Lost]);
    }

    #[test]
    fn not_acknowledged_and_foreign_deliveries_are_violations() {
        let mut l = ledger(2, None);
        let seq = l.publish(Published {
            topic: 0,
            ttl: None,
            sent: Duration::ZERO,
            fate: Fate::Pending,
            removed: false,
        });
        l.settle(seq, Fate::Rejected);
        let log = session(Pos::Earliest, &[1, 2, 3], vec![], false);
        assert_eq!(
            kinds(&l, &log, Retention::default()).0,
            vec![Kind::NotAcked]
        );
        l.messages[2].fate = Fate::Ambiguous;
        assert_eq!(kinds(&l, &log, Retention::default()).0, vec![]);
        let foreign = session(Pos::Earliest, &[1, 2, 9], vec![], false);
        assert_eq!(
            kinds(&l, &foreign, Retention::default()).0,
            vec![Kind::Foreign]
        );
    }

    #[test]
    fn back_counts_acknowledged_ids() {
        let l = ledger(5, None);
        assert_eq!(l.back(0, None, 0), Pos::After(id(5)));
        assert_eq!(l.back(0, None, 2), Pos::After(id(3)));
        assert_eq!(l.back(0, Some(id(3)), 1), Pos::After(id(2)));
        assert_eq!(l.back(0, Some(id(3)), 3), Pos::Earliest);
    }
}
