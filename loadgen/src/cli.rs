//! The command line: scenarios and their flags, parsed by clap.
//!
//! Owns names, defaults and help texts; `main` turns these into a run. Does not own
//! validation that needs the target (bulk caps: `target`).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for Pulsar Relay: publish throughput, end-to-end latency, fan-out, connection cost",
    after_help = "Examples:\n  \
        loadgen publish --url http://127.0.0.1:8080 --connections 64 --duration 10s\n  \
        loadgen publish --rate 20000 --duration 30s          # open loop, latency from intended send times\n  \
        loadgen bulk --batch 100 --connections 8\n  \
        loadgen e2e --transport ws --subscribers 4 --rate 2000 --verify\n  \
        loadgen fanout --subscribers 1000 --rate 1000 --duration 5s\n  \
        loadgen connections --subscribers 5000 --hold 10s --relay-pid $(pgrep -n pulsar-relay)\n  \
        loadgen churn --concurrent 10000 --topics 16 --duration 30s --relay-pid $(pgrep -n pulsar-relay)\n  \
        loadgen soak --duration 30m --topics 4 --rate 200 --relay-pid $(pgrep -n pulsar-relay)\n  \
        loadgen check --seed 1 --histories 20                # model checker: starts its own relays\n\n\
        Progress goes to stderr once a second; the summary to stdout (--json: one JSON object).\n\
        Exit status: 0 ok, 1 a delivery check failed (lost, duplicated or reordered messages),\n\
        2 the run could not be set up."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Randomized model checker: per history, starts a relay (and a Valkey) of a random
    /// set-up, drives seeded random publishes, trims, deletes, outages and WebSocket, SSE
    /// and long-poll consumers that disconnect, read slowly and resume, and checks every
    /// consumer against an oracle: each acknowledged message delivered once, in id order,
    /// or inside a gap it was told about; nothing unacknowledged (503s aside); no stalls.
    /// A failure prints the history and the shortest failing variant found.
    /// Exit status 1 on any violation. See docs/reliability.md.
    #[command(
        after_help = "History i uses seed --seed + i: `--seed S --histories 1` replays one."
    )]
    Check(CheckArgs),
    /// Consumer groups (work queues) against plain subscription, in one run: the same publish
    /// load to a topic with --consumers plain WebSocket subscribers, then to a topic with one
    /// group and --consumers group consumers acknowledging every message; messages/s,
    /// publish -> delivery latency, delivery -> `acked` latency, and the ratios group / plain.
    Groups(GroupsArgs),
    /// Single-message publishes (POST /api/v1/messages) over keep-alive connections.
    Publish {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
    },
    /// Bulk publishes (POST /api/v1/messages/bulk); counts are in messages.
    Bulk {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Messages per bulk request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Publishers and subscribers: end-to-end delivery latency, optionally exact delivery.
    E2e {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        delivery: Delivery,
        /// How subscribers receive.
        #[arg(long, value_enum, default_value_t = Transport::Ws)]
        transport: Transport,
        /// Subscribers; each follows every topic.
        #[arg(long, default_value_t = 4)]
        subscribers: usize,
        /// Check every acknowledged message reached every subscriber exactly once, in order
        /// (exit status 1 if not).
        #[arg(long)]
        verify: bool,
        /// Publish at full speed: closed loop, each of --connections sending its next message
        /// when the previous one is answered, instead of an open loop at --rate. Delivery
        /// latency is then measured from each actual send.
        #[arg(long, conflicts_with = "rate")]
        closed_loop: bool,
    },
    /// One topic, many WebSocket subscribers: deliveries/s and delivery lag.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        delivery: Delivery,
        /// WebSocket subscribers of the one topic.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
    },
    /// Open and hold idle WebSocket subscribers; with --relay-pid, the relay's memory per
    /// connection.
    Connections {
        #[command(flatten)]
        common: Common,
        /// Connections to open (each subscribes to one topic).
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// How long to hold them open.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        hold: Duration,
        /// The relay's process id: VmRSS is read from /proc/PID/status before and after.
        #[arg(long)]
        relay_pid: Option<u32>,
    },
    /// Up to --concurrent WebSocket connections, each living a short random life (connect,
    /// subscribe to one of --topics, receive, disconnect) and replaced at once, while a
    /// publisher runs; then a check that the relay's connection and subscriber counts return
    /// to the baseline (and, with --relay-pid, its memory before and after).
    Churn {
        #[command(flatten)]
        common: Common,
        /// Connections held at once.
        #[arg(long, default_value_t = 10_000)]
        concurrent: usize,
        /// Publish rate, messages per second in total (open loop).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Shortest life of a connection after it subscribed.
        /// (Connections held at once ≈ connects/s × mean life: with 10,000 connections
        /// and ~1,000 connects/s, lives must average ~10 s.)
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        life_min: Duration,
        /// Longest life of a connection after it subscribed.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
        life_max: Duration,
        /// The relay's process id: VmRSS before, during (peak) and after.
        #[arg(long)]
        relay_pid: Option<u32>,
        /// After closing everything, wait at most this long for the relay's counts to return
        /// to the baseline.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        settle_timeout: Duration,
    },
    /// Long-running mixed load: publishers at a fixed rate; WebSocket, long-poll and SSE
    /// subscribers that keep dropping their connections and resuming; a status line with the
    /// relay's RSS every --report-every; exact delivery accounting at the end (exit status 1
    /// on any loss, duplicate or reorder).
    Soak {
        #[command(flatten)]
        common: Common,
        /// Publish rate, messages per second in total (open loop).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// WebSocket subscribers (each follows every topic).
        #[arg(long, default_value_t = 4)]
        ws: usize,
        /// Long-poll subscribers.
        #[arg(long, default_value_t = 2)]
        longpoll: usize,
        /// SSE subscribers (one stream per topic each).
        #[arg(long, default_value_t = 2)]
        sse: usize,
        /// Each subscriber drops its connection after about this long (jittered) and resumes
        /// from the last ids it saw.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        reconnect_every: Duration,
        /// How often to print a status line (with the relay's RSS).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        report_every: Duration,
        /// The relay's process id: its VmRSS is sampled with every status line.
        #[arg(long)]
        relay_pid: Option<u32>,
        /// After publishing ends, wait at most this long for subscribers to catch up.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        drain_timeout: Duration,
    },
}

/// Flags of `groups`.
#[derive(Debug, Args, Clone)]
pub struct GroupsArgs {
    /// The relay's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Consumers per phase (plain subscribers, then group consumers).
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Each group consumer's `max_in_flight`.
    #[arg(long, default_value_t = 100)]
    pub max_in_flight: u32,
    /// Publishing connections (closed loop unless --rate).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Open loop at this many messages per second in total.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long each phase publishes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Payload size, bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// After publishing, wait at most this long for the consumers.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub drain_timeout: Duration,
    /// Bearer token for a relay with authentication on.
    #[arg(long)]
    pub token: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Accepted for symmetry with the other scenarios (this one prints no progress).
    #[arg(long)]
    pub quiet: bool,
}

/// Flags of `check`.
#[derive(Debug, Args, Clone)]
pub struct CheckArgs {
    /// The first history's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Histories to run (default 1, or as many as fit in --duration).
    #[arg(long)]
    pub histories: Option<u64>,
    /// Keep running new histories until this much time has passed.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Steps per history.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// The relay binary (default: $PULSAR_RELAY_BIN, else pulsar-relay next to loadgen, else $PATH).
    #[arg(long)]
    pub relay_bin: Option<std::path::PathBuf>,
    /// The Valkey server binary (default: valkey-server on $PATH); without one, only memory
    /// backend histories run.
    #[arg(long)]
    pub valkey_bin: Option<std::path::PathBuf>,
    /// Re-runs shrinking may spend per failing history (0: do not shrink).
    #[arg(long, default_value_t = 30)]
    pub shrink_runs: u32,
    /// Time shrinking may spend per failing history.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub shrink_time: Duration,
    /// Only this backend.
    #[arg(long, value_enum)]
    pub backend: Option<CheckBackend>,
    /// Only this many shards (1 or 2).
    #[arg(long)]
    pub shards: Option<u8>,
    /// Only this many Valkey connections per shard (1 to 4).
    #[arg(long)]
    pub valkey_connections: Option<u8>,
    /// Only this `durability.ack`.
    #[arg(long, value_enum)]
    pub ack: Option<CheckAck>,
    /// Only consumers of this transport.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// Built-in authentication on (`on`) or off (`off`) in every history; unset, about one
    /// history in three has it: a logged-in token on every request and stream, topics in the
    /// user's namespace.
    #[arg(long, value_enum)]
    pub auth: Option<CheckAuth>,
    /// Consumer groups (work queues) in every history (`on`) or none (`off`); unset, about
    /// one history in four without count, age or memory retention has one or two groups
    /// with WebSocket and HTTP workers that crash holding messages, acknowledge late and
    /// nack, checked for exactly-once acknowledgement or dead-lettering of every
    /// acknowledged publish, and `max_in_flight`.
    #[arg(long, value_enum)]
    pub groups: Option<CheckAuth>,
    /// Relays per history, all on the one Valkey (1 to 5; more than 1 implies
    /// --backend valkey, and --ack persisted unless --ack buffered is given): publishes,
    /// trims and deletes go to each in turn, and consumers resume on the next relay each
    /// time.
    #[arg(long, default_value_t = 1)]
    pub relays: usize,
    /// Run against a Valkey Cluster of three masters (started with `valkey-server
    /// --cluster-enabled yes` and joined with `valkey-cli --cluster create`; implies
    /// --backend valkey): the relays are given the nodes as `valkey.cluster_nodes`, and each
    /// Valkey outage takes one master in turn.
    #[arg(long)]
    pub cluster: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// No per-history lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckBackend {
    Memory,
    Valkey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckAuth {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckAck {
    Persisted,
    Buffered,
}

/// Flags every scenario takes.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// The relay's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Publish through these relays instead of --url (repeat the flag or separate with
    /// commas); subscribers stay on --url. Closed loop: publishing connection i goes to the
    /// (i mod n)-th; open loop: message k goes out through the (k mod n)-th, so publishes
    /// alternate. With several, each payload names its publish URL and delivery latency is
    /// also reported per publish URL (same relay as the subscribers, or another one).
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub publish_url: Vec<String>,
    /// Length of the measured phase (after the warm-up).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "messages")]
    pub duration: Option<Duration>,
    /// Stop after this many measured messages instead of after a duration.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Publishing connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Size of each message's payload in bytes (approximate; at least ~45).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Topics messages are spread over (round-robin).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Not-measured time at the start: connections open, caches warm.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Print the final report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// A request without an answer for this long fails as "timeout".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Topic names are PREFIX-0, PREFIX-1, ...; default prefix: loadgen-RANDOM, fresh for every run.
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Which relay is driven.
    #[arg(long, value_enum, default_value_t = TargetKind::Pulsar)]
    pub target: TargetKind,
    /// Bearer token: required with --target python; with --target pulsar for a relay with
    /// authentication on.
    #[arg(long)]
    pub token: Option<String>,
    /// With --target nchan: which nginx locations to use, `/pub` + `/sub` (memory store) or
    /// `/rpub` + `/rsub` (Redis store), each taking the channel as `?id=` (the layout
    /// `scripts/bench-compare` configures).
    #[arg(long, value_enum, default_value_t = NchanStore::Memory)]
    pub nchan_store: NchanStore,
}

/// Flags of the publish-only scenarios.
#[derive(Debug, Args, Clone)]
pub struct Load {
    /// Open loop at this many messages per second in total (latency measured from each
    /// request's intended send time). Default: closed loop, as fast as answers come.
    #[arg(long)]
    pub rate: Option<f64>,
}

/// Flags of the delivery scenarios.
#[derive(Debug, Args, Clone)]
pub struct Delivery {
    /// Publish rate, messages per second in total (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// After publishing ends, wait at most this long for subscribers to receive everything.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Ws,
    Longpoll,
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Longpoll => "longpoll",
            Transport::Sse => "sse",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// This repository's relay.
    Pulsar,
    /// The Python relay (pulsar-relay 0.2.1): bearer auth, 100-message bulk cap.
    Python,
    /// nginx with the Nchan module: publish by POSTing the payload to a channel, WebSocket
    /// subscribers get each payload as a frame. No bulk, long-poll or SSE scenarios.
    Nchan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NchanStore {
    Memory,
    Redis,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn duration_and_messages_exclude_each_other() {
        let r = Cli::try_parse_from(["loadgen", "publish", "--duration", "1s", "--messages", "5"]);
        assert!(r.is_err());
        let ok = Cli::try_parse_from(["loadgen", "bulk", "--messages", "5", "--batch", "10"])
            .expect("parses");
        match ok.scenario {
            Scenario::Bulk { common, batch, .. } => {
                assert_eq!(common.messages, Some(5));
                assert_eq!(batch, 10);
                assert_eq!(common.warmup, Duration::from_secs(1));
            }
            other => panic!("wrong scenario {other:?}"),
        }
    }

    #[test]
    fn publish_urls_repeat_or_take_commas_and_default_to_none() {
        let parsed = Cli::try_parse_from([
            "loadgen",
            "e2e",
            "--url",
            "http://127.0.0.1:1",
            "--publish-url",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--publish-url",
            "http://127.0.0.1:3",
        ])
        .expect("parses");
        match parsed.scenario {
            Scenario::E2e { common, .. } => assert_eq!(
                common.publish_url,
                [
                    "http://127.0.0.1:1",
                    "http://127.0.0.1:2",
                    "http://127.0.0.1:3"
                ]
            ),
            other => panic!("wrong scenario {other:?}"),
        }
        let plain = Cli::try_parse_from(["loadgen", "publish"]).expect("parses");
        match plain.scenario {
            Scenario::Publish { common, .. } => assert!(common.publish_url.is_empty()),
            other => panic!("wrong scenario {other:?}"),
        }
    }
}
