//! A history: one relay set-up and the list of steps driven against it, generated up front
//! from a seed, so `--seed N` replays the same steps (their timing may differ; their content
//! does not).
//!
//! Steps name topics and consumers by number. Every position a step asks for is relative
//! ("k messages back from the last one seen", "the newest acknowledged"), and the executor
//! resolves it while running: a shrunk history (steps, consumers or topics dropped) stays a
//! meaningful history, and steps that refer to a consumer that no longer subscribes are
//! skipped.
//!
//! Sans-IO: no sockets, no clocks.

use std::fmt;

use crate::cli::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Valkey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Persisted,
    Buffered,
}

/// How the relay (and its Valkey) are configured for one history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub backend: Backend,
    pub shards: u8,
    /// `valkey.connections_per_shard`.
    pub connections: u8,
    pub ack: Ack,
    /// Count retention (`storage.max_messages_per_topic`); `None`: the default (a million).
    pub max_messages: Option<u32>,
    /// Age retention (`storage.persistent_tier_retention`), whole seconds.
    pub retention_s: Option<u32>,
    /// The memory backend's byte budget (`memory.max_bytes`).
    pub memory_bytes: Option<u64>,
    /// `ws.max_queued_bytes` and `sse.max_queued_bytes`: how far behind a slow reader may fall.
    pub queue_bytes: u32,
    /// Built-in authentication on: every request and stream carries a logged-in token, and
    /// topics live in that user's namespace.
    pub auth: bool,
}

/// Where a (re)subscription starts, before the executor resolves it to ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Everything retained.
    Earliest,
    /// Only what is published from now on (WebSocket `"last"`; long-poll and single-topic
    /// SSE: after the newest acknowledged id; multi-topic SSE: everything, as the checker
    /// cannot write a multi-topic id).
    Live,
    /// From the last message seen (a resume); nothing seen yet: where the previous session
    /// started.
    LastSeen,
    /// `k` messages before the last one seen (or before the newest acknowledged, if none was
    /// seen); fewer than `k` known: earliest.
    Back(u32),
}

/// A Valkey outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// `kill -9`, then a restart on the same port and data directory.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Freeze,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `count` messages of about `bytes` each to `topic`, over `parallel` connections
    /// (single publishes) or in bulk requests; each with `ttl_s` if given.
    Publish {
        topic: u16,
        count: u32,
        bytes: u32,
        ttl_s: Option<u32>,
        bulk: bool,
        parallel: u8,
    },
    /// `POST /api/v1/topics/{t}/trim` with `keep_count`.
    Trim {
        topic: u16,
        keep: u32,
    },
    /// `DELETE /api/v1/topics/{t}`.
    Delete {
        topic: u16,
    },
    /// A consumer's first subscription.
    Subscribe {
        consumer: u8,
        transport: Transport,
        topics: Vec<u16>,
        from: From,
    },
    /// The consumer drops its connection.
    Disconnect {
        consumer: u8,
    },
    /// The consumer connects again (after a disconnect) or re-subscribes (while connected).
    Resume {
        consumer: u8,
        from: From,
    },
    /// The consumer stops reading for `ms` (the relay's queue bound may close it).
    Pause {
        consumer: u8,
        ms: u32,
    },
    Sleep {
        ms: u32,
    },
    Valkey {
        outage: Outage,
        down_ms: u32,
    },
}

impl Step {
    /// The consumer a step belongs to, if any.
    pub fn consumer(&self) -> Option<u8> {
        match self {
            Step::Subscribe { consumer, .. }
            | Step::Disconnect { consumer }
            | Step::Resume { consumer, .. }
            | Step::Pause { consumer, .. } => Some(*consumer),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub seed: u64,
    pub setup: Setup,
    pub topics: u16,
    pub steps: Vec<Step>,
    /// Consumer groups (work queues) on some topics, each with its workers; empty in most
    /// histories (see [`plan_groups`]).
    pub groups: Vec<GroupPlan>,
}

/// How a group worker talks to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupTransport {
    /// `subscribe` with `group`/`consumer`/`max_in_flight`, `ack`/`nack` frames.
    Ws,
    /// `POST …/groups/{g}/poll`, `…/ack`, `…/nack`.
    Http,
}

/// One worker of a group: its transport, its `max_in_flight`, and the seed of its
/// behaviour (which messages it acknowledges at once or late, nacks, ignores, and when it
/// crashes holding messages; those choices are made while running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    pub transport: GroupTransport,
    pub max_in_flight: u16,
    pub seed: u64,
}

/// A consumer group created (from `earliest`) on `topic` before the first step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    pub topic: u16,
    /// Its name: `g<index>`.
    pub index: u8,
    pub ack_timeout_ms: u32,
    pub max_deliveries: u32,
    pub workers: Vec<WorkerPlan>,
}

/// Largest bulk request body the checker builds; the relay is configured to take more.
pub const MAX_BULK_BODY: usize = 8 << 20;
/// Payload bytes one history publishes at most: keeps a history to seconds on a small box.
const HISTORY_BYTES: u64 = 24 << 20;

/// Which backends/transports/etc. a generated history may use (the CI set pins some).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pins {
    pub backend: Option<Backend>,
    pub shards: Option<u8>,
    pub connections: Option<u8>,
    pub ack: Option<Ack>,
    pub transport: Option<Transport>,
    pub auth: Option<bool>,
    /// Consumer groups on (`Some(true)`: every history), off, or (`None`) in about one
    /// history in four of those without count, age or memory retention.
    pub groups: Option<bool>,
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

fn payload_bytes(rng: &mut fastrand::Rng) -> u32 {
    match rng.u8(..100) {
        0..=59 => rng.u32(20..600),
        60..=84 => rng.u32(600..4_000),
        85..=94 => rng.u32(4_000..40_000),
        _ => rng.u32(40_000..400_000),
    }
}

/// Generates history `seed` (with `pins` applied): `steps` steps, roughly.
pub fn generate(seed: u64, steps: usize, pins: Pins) -> History {
    let mut rng = fastrand::Rng::with_seed(seed);
    let backend = pins
        .backend
        .unwrap_or_else(|| pick(&mut rng, &[Backend::Memory, Backend::Valkey]));
    let valkey = backend == Backend::Valkey;
    let setup = Setup {
        backend,
        shards: pins.shards.unwrap_or_else(|| rng.u8(1..=2)),
        connections: if valkey {
            pins.connections
                .unwrap_or_else(|| pick(&mut rng, &[1, 1, 2, 4]))
        } else {
            1
        },
        ack: if valkey {
            pins.ack
                .unwrap_or_else(|| pick(&mut rng, &[Ack::Persisted, Ack::Buffered]))
        } else {
            Ack::Persisted
        },
        max_messages: rng.bool().then(|| pick(&mut rng, &[50, 300, 1000])),
        retention_s: (rng.u8(..4) == 0).then(|| rng.u32(2..=4)),
        memory_bytes: (!valkey && rng.u8(..3) == 0).then(|| pick(&mut rng, &[2u64 << 20, 8 << 20])),
        queue_bytes: pick(&mut rng, &[256 << 10, 1 << 20]),
        // From a stream of its own, so a seed's other choices are those it had before
        // authentication joined the set-up (seeds named in regression tests stay meaningful).
        auth: pins
            .auth
            .unwrap_or_else(|| fastrand::Rng::with_seed(seed ^ 0xa07_0a07).u8(..3) == 0),
    };
    // Mostly a few topics, sometimes many.
    let topics = if rng.u8(..5) == 0 {
        rng.u16(5..=50)
    } else {
        rng.u16(1..=4)
    };
    let transports = [Transport::Ws, Transport::Sse, Transport::Longpoll];
    let consumers = rng.u8(1..=4);
    let mut out = Vec::new();
    let mut bytes: u64 = 0;
    let mut subscribed = vec![false; usize::from(consumers)];
    let mut connected = vec![false; usize::from(consumers)];
    // Most traffic goes to a "hot" topic, so consumers see long runs on one topic.
    let hot = rng.u16(..topics);
    for _ in 0..steps {
        let roll = rng.u8(..100);
        let c = rng.u8(..consumers);
        let ci = usize::from(c);
        let step = match roll {
            _ if !subscribed[ci] && roll < 40 => {
                let transport = pins
                    .transport
                    .unwrap_or_else(|| pick(&mut rng, &transports));
                let n = rng.u16(1..=topics.min(3));
                let mut ts: Vec<u16> = vec![hot];
                while ts.len() < usize::from(n) {
                    let t = rng.u16(..topics);
                    if !ts.contains(&t) {
                        ts.push(t);
                    }
                }
                subscribed[ci] = true;
                connected[ci] = true;
                let back = From::Back(rng.u32(1..1500));
                Step::Subscribe {
                    consumer: c,
                    transport,
                    topics: ts,
                    from: pick(&mut rng, &[From::Earliest, From::Live, back]),
                }
            }
            0..=44 => {
                let size = payload_bytes(&mut rng);
                let max_count = ((HISTORY_BYTES.saturating_sub(bytes)) / u64::from(size)).min(1500);
                if max_count == 0 {
                    Step::Sleep {
                        ms: rng.u32(50..300),
                    }
                } else {
                    let count = if rng.u8(..4) == 0 {
                        rng.u32(300..=1500).min(max_count as u32)
                    } else {
                        rng.u32(1..=60).min(max_count as u32)
                    };
                    bytes += u64::from(count) * u64::from(size);
                    Step::Publish {
                        topic: if rng.u8(..3) == 0 {
                            rng.u16(..topics)
                        } else {
                            hot
                        },
                        count,
                        bytes: size,
                        ttl_s: (rng.u8(..6) == 0).then(|| rng.u32(1..=3)),
                        bulk: rng.bool(),
                        parallel: pick(&mut rng, &[1, 1, 2, 4]),
                    }
                }
            }
            45..=49 => Step::Trim {
                topic: if rng.bool() { hot } else { rng.u16(..topics) },
                keep: pick(&mut rng, &[0, 1, 10, 100, 500]),
            },
            50..=51 => Step::Delete {
                topic: rng.u16(..topics),
            },
            52..=61 if subscribed[ci] && connected[ci] => {
                connected[ci] = false;
                Step::Disconnect { consumer: c }
            }
            52..=73 if subscribed[ci] => {
                connected[ci] = true;
                let back = From::Back(rng.u32(1..1200));
                Step::Resume {
                    consumer: c,
                    from: pick(
                        &mut rng,
                        &[From::LastSeen, From::LastSeen, back, From::Earliest],
                    ),
                }
            }
            74..=81 if subscribed[ci] => Step::Pause {
                consumer: c,
                ms: rng.u32(100..2_500),
            },
            82..=84 if valkey => Step::Valkey {
                outage: pick(&mut rng, &[Outage::Kill, Outage::Freeze]),
                down_ms: rng.u32(100..1_500),
            },
            _ => Step::Sleep {
                ms: rng.u32(20..1_500),
            },
        };
        out.push(step);
    }
    let mut h = History {
        seed,
        setup,
        topics,
        steps: out,
        groups: Vec::new(),
    };
    plan_groups(&mut h, pins.groups);
    h
}

/// Adds consumer groups to `h`, from a stream of its own (so a seed's other choices are
/// those it had before groups joined the checker). By default only histories without count,
/// age or memory retention get groups (messages a retention removes before a group delivers
/// them are skipped by the group, which the group oracle does not model); `--groups on`
/// turns those retentions off instead. A group's topic is never deleted (a delete drops the
/// topic's groups): with `--groups on` the deletes of a group topic become short sleeps.
/// Three trims of a group topic in four become sleeps too; the other trims and ttl stay: the
/// messages they may remove are not owed to the group.
pub fn plan_groups(h: &mut History, pin: Option<bool>) {
    let mut rng = fastrand::Rng::with_seed(h.seed ^ 0x6720_90b5);
    let draw = rng.u8(..4) == 0;
    let retention = h.setup.max_messages.is_some()
        || h.setup.retention_s.is_some()
        || h.setup.memory_bytes.is_some();
    match pin {
        Some(false) => return,
        None if !draw || retention => return,
        _ => {}
    }
    h.setup.max_messages = None;
    h.setup.retention_s = None;
    h.setup.memory_bytes = None;
    // The topic with the most publish steps (the "hot" one) and maybe another.
    let mut publishes = vec![0u32; usize::from(h.topics)];
    for s in &h.steps {
        if let Step::Publish { topic, .. } = s {
            publishes[usize::from(*topic)] += 1;
        }
    }
    let hot = (0..h.topics)
        .max_by_key(|t| publishes[usize::from(*t)])
        .unwrap_or(0);
    let mut topics = vec![hot];
    if h.topics > 1 && rng.bool() {
        let other = rng.u16(..h.topics);
        if other != hot {
            topics.push(other);
        }
    }
    for (i, topic) in topics.into_iter().enumerate() {
        let workers = (0..rng.u8(1..=3))
            .map(|_| WorkerPlan {
                transport: if rng.u8(..3) == 0 {
                    GroupTransport::Http
                } else {
                    GroupTransport::Ws
                },
                max_in_flight: pick(&mut rng, &[1, 3, 10, 50]),
                seed: rng.u64(..),
            })
            .collect();
        h.groups.push(GroupPlan {
            topic,
            index: i as u8,
            ack_timeout_ms: pick(&mut rng, &[300, 500, 1000]),
            max_deliveries: pick(&mut rng, &[2, 3, 3, 5]),
            workers,
        });
    }
    // Deletes of a group topic go; so do three trims in four (what a trim removes is not
    // owed to the group, so each trim takes much of the topic out of the check).
    let group_topics: Vec<u16> = h.groups.iter().map(|g| g.topic).collect();
    for s in &mut h.steps {
        match s {
            Step::Delete { topic } if group_topics.contains(topic) => {
                *s = Step::Sleep { ms: 50 };
            }
            Step::Trim { topic, .. } if group_topics.contains(topic) && rng.u8(..4) != 0 => {
                *s = Step::Sleep { ms: 50 };
            }
            _ => {}
        }
    }
}

impl fmt::Display for From {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            From::Earliest => f.write_str("earliest"),
            From::Live => f.write_str("live"),
            From::LastSeen => f.write_str("last-seen"),
            From::Back(k) => write!(f, "{k}-back"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Step::Publish {
                topic,
                count,
                bytes,
                ttl_s,
                bulk,
                parallel,
            } => {
                write!(f, "publish t{topic} {count} x {bytes} B")?;
                if *bulk {
                    f.write_str(" bulk")?;
                } else if *parallel > 1 {
                    write!(f, " over {parallel} connections")?;
                }
                if let Some(ttl) = ttl_s {
                    write!(f, " ttl {ttl}s")?;
                }
                Ok(())
            }
            Step::Trim { topic, keep } => write!(f, "trim t{topic} keep {keep}"),
            Step::Delete { topic } => write!(f, "delete t{topic}"),
            Step::Subscribe {
                consumer,
                transport,
                topics,
                from,
            } => {
                let ts: Vec<String> = topics.iter().map(|t| format!("t{t}")).collect();
                write!(
                    f,
                    "c{consumer} subscribes over {} to {} from {from}",
                    transport.name(),
                    ts.join(",")
                )
            }
            Step::Disconnect { consumer } => write!(f, "c{consumer} disconnects"),
            Step::Resume { consumer, from } => write!(f, "c{consumer} resumes from {from}"),
            Step::Pause { consumer, ms } => write!(f, "c{consumer} stops reading for {ms} ms"),
            Step::Sleep { ms } => write!(f, "sleep {ms} ms"),
            Step::Valkey { outage, down_ms } => match outage {
                Outage::Kill => write!(f, "valkey kill -9, restart after {down_ms} ms"),
                Outage::Freeze => write!(f, "valkey SIGSTOP for {down_ms} ms"),
            },
        }
    }
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.backend {
            Backend::Memory => f.write_str("memory")?,
            Backend::Valkey => write!(
                f,
                "valkey ({} connection(s)/shard, ack {})",
                self.connections,
                match self.ack {
                    Ack::Persisted => "persisted",
                    Ack::Buffered => "buffered",
                }
            )?,
        }
        write!(
            f,
            ", {} shard(s), queue bound {} B",
            self.shards, self.queue_bytes
        )?;
        if let Some(n) = self.max_messages {
            write!(f, ", max {n} messages/topic")?;
        }
        if let Some(s) = self.retention_s {
            write!(f, ", retention {s}s")?;
        }
        if let Some(b) = self.memory_bytes {
            write!(f, ", memory budget {b} B")?;
        }
        if self.auth {
            f.write_str(", authentication on")?;
        }
        Ok(())
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "history seed {}: {}; {} topic(s); {} step(s)",
            self.seed,
            self.setup,
            self.topics,
            self.steps.len()
        )?;
        for g in &self.groups {
            let ws: Vec<String> = g
                .workers
                .iter()
                .map(|w| {
                    format!(
                        "{} max_in_flight {}",
                        match w.transport {
                            GroupTransport::Ws => "ws",
                            GroupTransport::Http => "http",
                        },
                        w.max_in_flight
                    )
                })
                .collect();
            writeln!(
                f,
                "  group g{} on t{} (ack_timeout {} ms, max_deliveries {}): workers {}",
                g.index,
                g.topic,
                g.ack_timeout_ms,
                g.max_deliveries,
                ws.join(", ")
            )?;
        }
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(f, "  {i:>3}. {s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_generates_the_same_history_every_time() {
        for seed in 0..20 {
            assert_eq!(
                generate(seed, 40, Pins::default()),
                generate(seed, 40, Pins::default())
            );
        }
        assert_ne!(
            generate(1, 40, Pins::default()),
            generate(2, 40, Pins::default())
        );
    }

    #[test]
    fn groups_come_without_retention_and_their_topics_are_never_deleted() {
        let on = Pins {
            groups: Some(true),
            ..Pins::default()
        };
        let mut drawn = 0;
        for seed in 0..200 {
            let h = generate(seed, 40, on);
            assert!(!h.groups.is_empty() && h.groups.len() <= 2, "seed {seed}");
            assert_eq!(h, generate(seed, 40, on));
            assert_eq!(
                (
                    h.setup.max_messages,
                    h.setup.retention_s,
                    h.setup.memory_bytes
                ),
                (None, None, None)
            );
            for s in &h.steps {
                if let Step::Delete { topic } = s {
                    assert!(h.groups.iter().all(|g| g.topic != *topic), "seed {seed}");
                }
            }
            let off = Pins {
                groups: Some(false),
                ..Pins::default()
            };
            assert!(generate(seed, 40, off).groups.is_empty());
            let default = generate(seed, 40, Pins::default());
            if !default.groups.is_empty() {
                drawn += 1;
                assert_eq!(default.setup.max_messages, None);
            } else {
                // Without groups, a seed's history is the one it had before groups existed.
                assert_eq!(default, generate(seed, 40, off));
            }
        }
        assert!((10..100).contains(&drawn), "{drawn} of 200 drew groups");
    }

    #[test]
    fn pins_are_obeyed() {
        let pins = Pins {
            backend: Some(Backend::Valkey),
            shards: Some(2),
            connections: Some(4),
            ack: Some(Ack::Buffered),
            transport: Some(Transport::Sse),
            auth: Some(true),
            groups: None,
        };
        for seed in 0..10 {
            let h = generate(seed, 60, pins);
            assert_eq!(h.setup.backend, Backend::Valkey);
            assert_eq!((h.setup.shards, h.setup.connections), (2, 4));
            for s in &h.steps {
                if let Step::Subscribe { transport, .. } = s {
                    assert_eq!(*transport, Transport::Sse);
                }
            }
        }
    }
}
