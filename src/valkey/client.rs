//! The per-shard Valkey client: a command queue, group commit onto pipelined connections, and
//! reconnection with capped exponential backoff.
//!
//! Owns: queueing commands and matching replies to callers, the driver tasks (one per
//! connection) and their reconnect loop, the expiry of commands that waited too long, and
//! shutdown. Does not own: the bytes on the wire (`codec.rs`) or connecting (`connection.rs`).
//!
//! Group commit: callers append encoded commands to one shard-local queue and await a oneshot.
//! A driver that has a connection and nothing in flight takes everything queued (up to
//! `max_batch_commands`) as one batch, writes it with one write, reads the replies, and
//! completes the callers in order. While that batch is in flight, new commands accumulate
//! and form the next batch. There is no timer: a command arriving at an idle driver goes out
//! at once, and a burst becomes one pipeline.
//!
//! Lanes: each connection has its own queue (a *lane*). A command [routed](Command::routed)
//! by a key (the relay routes by topic) always takes the lane chosen by a stable hash of that
//! key, so every command touching one topic travels over one connection and Valkey, which
//! executes one connection's commands in the order they arrive, applies them in submission
//! order. That is what makes a topic's `XADD *` ids follow submission order, and explicit ids
//! (`ack: buffered`) arrive in increasing order, with any number of connections. Commands
//! without a route go to the least busy connected lane.
//!
//! Where connections go: a [`Target`] (`sentinel.rs`) names the address: the configured host,
//! or with Sentinel the master the sentinels name now. Every driver of the client follows the
//! same target. With Sentinel, a failed connect, a lost connection and a `READONLY` reply make
//! the target ask the sentinels again; when the master's address changes (a `+switch-master`
//! message, or a new answer), every driver drops its connection, failing what it has in flight
//! with `ConnectionLost` (those commands may have been applied on the old master: the callers
//! answer 503, never an acknowledgement a failover could take back unseen), and reconnects to
//! the new master, where the commands still queued (never written anywhere) then go. Nothing
//! written is ever sent again: an `XADD *` replayed on the new master would store a message
//! twice when the first attempt had been replicated.
//!
//! Replication barrier (`ack: replicated`): a group queued with
//! [`Client::try_submit_replicated`] makes its batch end with one `WAIT <replicas> <timeout>`
//! (see [`WaitFor`]) on the same connection, right behind the writes it covers; the group gets
//! that one reply besides its own, however many groups share the batch: one `WAIT` per group
//! commit, not per publish.
//!
//! Failure semantics (one outcome per command, nothing waits forever):
//! - Error reply (`-ERR ...`) to a command: `Err(ValkeyError::Server)` for that command only;
//!   `-READONLY` (the node is a replica now) is `Err(ValkeyError::NotMaster)`, and the
//!   connection is dropped and opened again (with Sentinel, to the master named then).
//! - Connection lost while a batch is in flight: the commands whose replies had not arrived
//!   fail with `ConnectionLost` (they may have been applied); those with replies get them.
//!   Commands still queued in that lane stay there, in order, and go out on the lane's next
//!   connection (or expire): never on another lane, where they could overtake or be
//!   overtaken by commands of the same key.
//! - No reply within `command_timeout`: the rest of the batch fails with `Timeout` and the
//!   connection is dropped (its replies would be out of step) and reconnected.
//! - Queued for longer than `command_timeout` (no connection, or all busy): `Timeout`. So a
//!   command's total wait is bounded by about 2 x `command_timeout` (queue + round trip).
//! - Queue holding `max_pending` commands: `Backpressure` at once, nothing queued. An empty
//!   queue takes one group whatever its size (a bulk publish larger than `max_pending` is not
//!   refused forever), except with `max_pending == 0` while no connection is up ("never wait
//!   for a connection").
//! - After `shutdown`: `Unavailable` at once.
//!
//! A command whose `call` future is dropped is still sent if it was queued: the queue holds
//! encoded bytes back to back, and withdrawing one from the middle is not worth a copy.
//!
//! Ordering: one connection executes batches in order, so commands of one lane run in queue
//! order: with `connections == 1` all commands, with more, all commands routed by one key.
//! A `call_many` whose commands span lanes is split into one group per lane (each keeping its
//! commands' relative order) and its replies are reassembled in command order; an unrouted
//! command in such a call rides with the routed command before it (or, first, after it).
//!
//! Commands must produce exactly one reply each: SUBSCRIBE, MONITOR, CLIENT REPLY and HELLO
//! would put replies out of step. Blocking commands (BLPOP, XREAD BLOCK) hold up the whole
//! pipeline of their connection and must finish well within `command_timeout`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::channel::oneshot;
use futures_lite::future::poll_fn;
use glommio::Task;
use hdrhistogram::Histogram;

use super::codec::{encode_command, validate_command, ProtocolError, Reply};
use super::connection::{ConnectConfig, Connection, Connector};
use super::sentinel::{NodeAddr, SentinelConfig, Target};
use super::{with_timeout, ValkeyError};

/// A connection that stayed up this long was healthy: after losing it, reconnect at once
/// instead of continuing the previous backoff. Shorter-lived ones (a server that accepts and
/// then drops us) keep backing off, so a flapping server is not hammered.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);

/// Initial size of the queue's byte arena: a few hundred typical XADDs.
const ARENA_CAPACITY: usize = 64 << 10;

/// Configuration of one shard's client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect: ConnectConfig,
    /// Connections (and driver tasks, and lanes) per shard, at least 1. More than one lets
    /// batches of different keys go out while another is in flight; commands of one key keep
    /// their order whatever the number.
    pub connections: usize,
    /// Commands allowed to wait in the queue (not counting those in flight) before `call`
    /// fails with `Backpressure`. Bounds memory while Valkey is down or slow. An empty queue
    /// admits one group of any size; with 0, only while a connection is up.
    pub max_pending: usize,
    /// Most commands in one pipeline. A single `call_many` larger than this still goes out as
    /// one batch.
    pub max_batch_commands: usize,
    /// First reconnect delay; also the least delay between failed attempts.
    pub backoff_min: Duration,
    /// Cap of the exponential reconnect delay.
    pub backoff_max: Duration,
    /// Find the master through these sentinels instead of connecting to `connect.host`.
    pub sentinel: Option<SentinelConfig>,
    /// The `WAIT` that ends a batch carrying a [replicated](Client::try_submit_replicated)
    /// group; `None`: such groups are refused.
    pub wait_for: Option<WaitFor>,
}

/// `WAIT <replicas> <timeout>`: how many replicas must have acknowledged a batch's writes,
/// and how long Valkey may wait for them (blocking that connection meanwhile, so it must be
/// well below `command_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitFor {
    pub replicas: u32,
    pub timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect: ConnectConfig::default(),
            connections: 1,
            max_pending: 100_000,
            max_batch_commands: 4096,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            sentinel: None,
            wait_for: None,
        }
    }
}

/// One encoded command, checked to be exactly one non-empty RESP array of bulk strings (so it
/// gets exactly one reply and cannot put the pipeline out of step), and optionally the hash
/// of the key that chooses its connection (see the module doc's "Lanes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    bytes: Bytes,
    route: Option<u64>,
}

/// Seed of the lane hash. Not the shard router's (unseeded XXH3): with the same hash, a
/// shard's topics (all ≡ shard mod shards) would use only some lanes whenever the shard and
/// connection counts share a factor.
const LANE_SEED: u64 = 0x6c61_6e65_7365_6564;

/// The route of `key`: stable across processes, like the shard router.
fn route_of(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, LANE_SEED)
}

impl Command {
    /// Encodes `args` (command name first).
    pub fn new(args: &[&[u8]]) -> Result<Command, ProtocolError> {
        if args.is_empty() {
            return Err(ProtocolError::EmptyCommand);
        }
        let mut out = BytesMut::new();
        encode_command(&mut out, args);
        Ok(Command {
            bytes: out.freeze(),
            route: None,
        })
    }

    /// Encodes a command of exactly `args` arguments (at least one) that `write` appends one
    /// by one, straight into the encoded form: no argument list in between, for commands
    /// that carry tens of arguments on the publish path. `capacity`: the expected size, to
    /// allocate once. Fails if `write` appends another number of arguments.
    pub fn build(
        args: usize,
        capacity: usize,
        write: impl FnOnce(&mut ArgWriter),
    ) -> Result<Command, ProtocolError> {
        if args == 0 {
            return Err(ProtocolError::EmptyCommand);
        }
        let mut out = BytesMut::with_capacity(capacity.saturating_add(16));
        out.put_u8(b'*');
        out.put_slice(itoa::Buffer::new().format(args).as_bytes());
        out.put_slice(b"\r\n");
        let mut writer = ArgWriter { out, written: 0 };
        write(&mut writer);
        if writer.written != args {
            return Err(ProtocolError::NotOneCommand(
                "a different number of arguments than announced",
            ));
        }
        Ok(Command {
            bytes: writer.out.freeze(),
            route: None,
        })
    }

    /// Accepts bytes encoded elsewhere (e.g. with [`encode_command`]) after checking them.
    pub fn from_encoded(encoded: Bytes) -> Result<Command, ProtocolError> {
        validate_command(&encoded)?;
        Ok(Command {
            bytes: encoded,
            route: None,
        })
    }

    /// This command must go over the connection of `key` (the relay passes the topic): all
    /// commands routed by one key run in the order they were queued.
    pub fn routed(mut self, key: &[u8]) -> Command {
        self.route = Some(route_of(key));
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Appends the arguments of a command being built (see [`Command::build`]).
pub struct ArgWriter {
    out: BytesMut,
    written: usize,
}

impl ArgWriter {
    /// One argument.
    pub fn arg(&mut self, arg: &[u8]) {
        self.arg_concat(&[arg]);
    }

    /// One argument made of `parts` back to back (a key rendered from a template, say).
    pub fn arg_concat(&mut self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut digits = itoa::Buffer::new();
        let len_text = digits.format(len);
        self.out.reserve(1 + len_text.len() + 2 + len + 2);
        self.out.put_u8(b'$');
        self.out.put_slice(len_text.as_bytes());
        self.out.put_slice(b"\r\n");
        for part in parts {
            self.out.put_slice(part);
        }
        self.out.put_slice(b"\r\n");
        self.written += 1;
    }
}

/// A snapshot of the client's counters and gauges, for `/stats` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections up right now.
    pub connected: usize,
    /// Commands waiting for a batch.
    pub queued: usize,
    /// Commands written and awaiting replies.
    pub in_flight: usize,
    /// Commands taken into batches (written, or attempted).
    pub commands_sent: u64,
    pub batches_sent: u64,
    pub bytes_sent: u64,
    pub last_batch_commands: usize,
    pub largest_batch_commands: usize,
    /// Batch size percentiles (commands per batch), from an HDR histogram.
    pub batch_commands_p50: u64,
    pub batch_commands_p99: u64,
    /// Successful connects (handshake done), including the first per connection.
    pub connects: u64,
    /// Successful connects after a connection had been up before.
    pub reconnects: u64,
    /// Failed connect attempts of any kind (includes the auth and TLS ones below).
    pub connect_failures: u64,
    pub auth_failures: u64,
    pub tls_failures: u64,
    /// Established connections that failed (lost, timed out, protocol error).
    pub connections_lost: u64,
    /// Commands answered with an error reply.
    pub error_replies: u64,
    /// Commands failed in flight because their connection was lost.
    pub failed_connection_lost: u64,
    /// Commands failed in flight because no reply came within `command_timeout`.
    pub failed_timeout_in_flight: u64,
    /// Commands failed because they waited in the queue longer than `command_timeout`.
    pub failed_timeout_queued: u64,
    /// Commands failed in flight because Valkey sent something unparseable.
    pub failed_protocol: u64,
    pub rejected_backpressure: u64,
    pub rejected_shut_down: u64,
    /// Why the most recent connect attempt failed; cleared by a successful connect.
    pub last_connect_error: Option<ValkeyError>,
    /// Commands answered `-READONLY`: written to a node that had become a replica.
    pub not_master_replies: u64,
    /// Batches that ended with a replication `WAIT`.
    pub waits: u64,
    /// Times the master's address changed (Sentinel): failovers followed.
    pub failovers: u64,
    /// Sentinel questions no sentinel answered, and failed or lost subscriptions.
    pub sentinel_errors: u64,
    /// Where connections go now (`host:port`).
    pub master: Option<String>,
}

/// Where the reply (or replies) of one queued entry go.
enum Completion {
    One(oneshot::Sender<Result<Reply, ValkeyError>>),
    Many(oneshot::Sender<Vec<Result<Reply, ValkeyError>>>),
}

/// One `call` (one command) or one `call_many` (several, never split across batches).
struct QueuedGroup {
    /// Length of this group's encoded commands, which sit in the arena right after those of
    /// the groups before it.
    bytes: usize,
    commands: usize,
    completion: Completion,
    /// For expiry while queued.
    enqueued_at: Instant,
    /// Its batch must end with the replication `WAIT`, whose reply this group gets after its
    /// own (a `Completion::Many` of `commands + 1` results).
    wait: bool,
}

impl QueuedGroup {
    fn fail(self, error: &ValkeyError) {
        // A receiver that is gone belongs to a caller that stopped waiting: nothing to do.
        match self.completion {
            Completion::One(tx) => {
                let _ = tx.send(Err(error.clone()));
            }
            Completion::Many(tx) => {
                let n = self.commands + usize::from(self.wait);
                let _ = tx.send(vec![Err(error.clone()); n]);
            }
        }
    }

    /// Takes this group's replies from `replies`; commands without one get `missing`. A
    /// waiting group also gets `wait` (the batch's `WAIT` reply).
    fn complete(
        self,
        replies: &mut impl Iterator<Item = Reply>,
        missing: &ValkeyError,
        wait: Option<&Result<Reply, ValkeyError>>,
    ) {
        let mut next = || match replies.next() {
            Some(Reply::Error(message)) => Err(error_reply(message)),
            Some(reply) => Ok(reply),
            None => Err(missing.clone()),
        };
        match self.completion {
            Completion::One(tx) => {
                let _ = tx.send(next());
            }
            Completion::Many(tx) => {
                let mut results: Vec<_> = (0..self.commands).map(|_| next()).collect();
                if self.wait {
                    results.push(wait.cloned().unwrap_or_else(|| Err(missing.clone())));
                }
                let _ = tx.send(results);
            }
        }
    }
}

/// The error of an error reply: `-READONLY` means the node is no longer the master.
fn error_reply(message: String) -> ValkeyError {
    if is_read_only(&message) {
        ValkeyError::NotMaster(message)
    } else {
        ValkeyError::Server(message)
    }
}

fn is_read_only(message: &str) -> bool {
    message.starts_with("READONLY")
}

/// One connection's queue: what its driver sends, in order.
struct Lane {
    /// Encoded commands of every queued group, back to back in queue order. A batch is split
    /// off the front without copying; the arena reuses its allocation once the batch that
    /// shares it is written and dropped.
    arena: BytesMut,
    queue: VecDeque<QueuedGroup>,
    queued_commands: usize,
    in_flight_commands: usize,
    connected: bool,
    /// The lane's driver, when it waits for work.
    idle_driver: Option<Waker>,
}

/// The replies of one `call_many` will come from one group (one lane) or several.
enum Queued {
    One(oneshot::Receiver<Vec<Result<Reply, ValkeyError>>>),
    /// Per lane: the positions of its commands in the call, and its receiver.
    #[allow(clippy::type_complexity)]
    Split(
        Vec<(
            Vec<usize>,
            oneshot::Receiver<Vec<Result<Reply, ValkeyError>>>,
        )>,
    ),
}

/// Everything the callers and the tasks share. Only ever borrowed between awaits.
struct State {
    /// One per connection, indexed like the drivers.
    lanes: Vec<Lane>,
    /// Sums over the lanes.
    queued_commands: usize,
    in_flight_commands: usize,
    connected: usize,
    /// `shutdown` began: refuse new commands.
    closing: bool,
    /// The expiry task, when it waits for the queue to become non-empty.
    janitor: Option<Waker>,
    /// `shutdown` and `wait_connected`, woken on any change of queue, flight or connections.
    watchers: Vec<Waker>,
    stats: ClientStats,
    /// `None` only if the bounds were rejected, which `max_batch_commands >= 1` rules out.
    batch_sizes: Option<Histogram<u64>>,
}

impl State {
    fn wake_watchers(&mut self) {
        for waker in self.watchers.drain(..) {
            waker.wake();
        }
    }

    /// The lane of a routed command.
    fn lane_of(&self, route: u64) -> usize {
        (route % self.lanes.len() as u64) as usize
    }

    /// The lane for unrouted work: connected lanes first, then the fewest commands queued
    /// and in flight, then the lowest index.
    fn least_busy_lane(&self) -> usize {
        (0..self.lanes.len())
            .min_by_key(|&i| {
                let lane = &self.lanes[i];
                (
                    !lane.connected,
                    lane.queued_commands + lane.in_flight_commands,
                )
            })
            .unwrap_or(0)
    }

    fn queues_empty(&self) -> bool {
        self.lanes.iter().all(|lane| lane.queue.is_empty())
    }
}

pub(super) fn register(wakers: &mut Vec<Waker>, cx: &Context<'_>) {
    if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
        wakers.push(cx.waker().clone());
    }
}

struct Shared {
    config: ClientConfig,
    /// Built once: TLS roots are loaded at start, not per reconnect.
    connector: Connector,
    /// Where the drivers connect: the configured address, or the master Sentinel names.
    target: Rc<Target>,
    /// `WAIT <replicas> <timeout>` encoded once, when `config.wait_for` is set.
    wait_command: Option<Bytes>,
    state: RefCell<State>,
}

/// The shard's Valkey client. `!Send`; share it as `Rc<Client>` within the shard.
pub struct Client {
    shared: Rc<Shared>,
    /// Driver and expiry tasks; dropping a glommio `Task` cancels it, so dropping the client
    /// stops them.
    tasks: RefCell<Vec<Task<()>>>,
}

impl Client {
    /// Validates `config`, loads TLS roots, and starts one driver task per connection plus an
    /// expiry task on the current glommio executor (panics outside one). Drivers connect in
    /// the background and reconnect until `shutdown`; commands queue meanwhile.
    pub fn start(config: ClientConfig) -> Result<Rc<Client>, ValkeyError> {
        if config.connections == 0 || config.max_batch_commands == 0 {
            return Err(ValkeyError::Config(
                "connections and max_batch_commands must be at least 1".to_owned(),
            ));
        }
        if config.backoff_min.is_zero() || config.backoff_max < config.backoff_min {
            return Err(ValkeyError::Config(
                "backoff_min must be positive and at most backoff_max".to_owned(),
            ));
        }
        let mut connect = config.connect.clone();
        let target = match &config.sentinel {
            None => Target::fixed(
                NodeAddr {
                    host: connect.host.clone(),
                    port: connect.port,
                },
                &connect.client_name,
            ),
            Some(sentinel) => {
                // A sentinel's answer can be stale: every connection checks it got a master.
                connect.verify_master = true;
                Target::sentinel(sentinel, &connect)?
            }
        };
        let connector = Connector::new(connect)?;
        let wait_command = match config.wait_for {
            None => None,
            Some(wait) => {
                if wait.replicas == 0 || wait.timeout.is_zero() {
                    // `WAIT 0 ...` confirms nothing; `WAIT n 0` blocks forever.
                    return Err(ValkeyError::Config(
                        "WAIT needs at least one replica and a positive timeout".to_owned(),
                    ));
                }
                if wait.timeout >= config.connect.command_timeout {
                    return Err(ValkeyError::Config(
                        "the WAIT timeout must be below the command timeout".to_owned(),
                    ));
                }
                let replicas = wait.replicas.to_string();
                let millis = wait.timeout.as_millis().max(1).to_string();
                let mut encoded = BytesMut::new();
                encode_command(
                    &mut encoded,
                    &[b"WAIT", replicas.as_bytes(), millis.as_bytes()],
                );
                Some(encoded.freeze())
            }
        };
        let batch_sizes =
            Histogram::new_with_bounds(1, (config.max_batch_commands as u64).max(2), 3).ok();
        let target = Rc::new(target);
        let shared = Rc::new(Shared {
            connector,
            target: target.clone(),
            wait_command,
            state: RefCell::new(State {
                lanes: (0..config.connections)
                    .map(|_| Lane {
                        arena: BytesMut::with_capacity(ARENA_CAPACITY),
                        queue: VecDeque::new(),
                        queued_commands: 0,
                        in_flight_commands: 0,
                        connected: false,
                        idle_driver: None,
                    })
                    .collect(),
                queued_commands: 0,
                in_flight_commands: 0,
                connected: 0,
                closing: false,
                janitor: None,
                watchers: Vec::new(),
                stats: ClientStats::default(),
                batch_sizes,
            }),
            config,
        });
        let mut tasks = Vec::with_capacity(shared.config.connections + 3);
        for index in 0..shared.config.connections {
            tasks.push(glommio::spawn_local(run_driver(shared.clone(), index)));
        }
        tasks.push(glommio::spawn_local(run_janitor(shared.clone())));
        tasks.extend(target.spawn_tasks());
        Ok(Rc::new(Client {
            shared,
            tasks: RefCell::new(tasks),
        }))
    }

    /// Queues one command and awaits its reply. An error reply is `Err(ValkeyError::Server)`.
    pub async fn call(&self, args: &[&[u8]]) -> Result<Reply, ValkeyError> {
        if args.is_empty() {
            return Err(ProtocolError::EmptyCommand.into());
        }
        let (tx, rx) = oneshot::channel();
        self.shared.enqueue(
            None,
            1,
            |arena| encode_command(arena, args),
            Completion::One(tx),
        )?;
        rx.await.unwrap_or_else(|_| Err(stopped_in_flight()))
    }

    /// Like [`Client::call`], routed by `key` (see [`Command::routed`]): ordered with every
    /// other command routed by the same key.
    pub async fn call_routed(&self, key: &[u8], args: &[&[u8]]) -> Result<Reply, ValkeyError> {
        if args.is_empty() {
            return Err(ProtocolError::EmptyCommand.into());
        }
        let (tx, rx) = oneshot::channel();
        self.shared.enqueue(
            Some(route_of(key)),
            1,
            |arena| encode_command(arena, args),
            Completion::One(tx),
        )?;
        rx.await.unwrap_or_else(|_| Err(stopped_in_flight()))
    }

    /// Queues `commands` to go out together in one batch, in order, and awaits one result per
    /// command (error replies as `Err(ValkeyError::Server)`, others unaffected).
    pub async fn call_many(&self, commands: &[Command]) -> Vec<Result<Reply, ValkeyError>> {
        self.submit(commands).await
    }

    /// Like [`Client::call_many`], but queues the commands *now*, before returning, and the
    /// returned future borrows nothing. For work that must keep its place in the pipeline
    /// while its reply is awaited elsewhere (write-behind persistence).
    pub fn submit(
        &self,
        commands: &[Command],
    ) -> impl std::future::Future<Output = Vec<Result<Reply, ValkeyError>>> + 'static {
        let n = commands.len();
        let queued = self.try_submit(commands);
        async move {
            match queued {
                Ok(replies) => replies.await,
                Err(error) => vec![Err(error); n],
            }
        }
    }

    /// Like [`Client::submit`], but a refusal (queue full, shut down) comes back at once,
    /// before anything was queued: the caller learns synchronously whether the commands hold
    /// a place in the pipeline, and need not track ones that never will.
    pub fn try_submit(
        &self,
        commands: &[Command],
    ) -> Result<
        impl std::future::Future<Output = Vec<Result<Reply, ValkeyError>>> + 'static,
        ValkeyError,
    > {
        let n = commands.len();
        let queued = if n == 0 {
            Queued::Split(Vec::new())
        } else {
            self.shared.enqueue_many(commands, false)?
        };
        Ok(async move {
            match queued {
                // One lane (the usual case): the replies are already in command order.
                Queued::One(rx) => rx
                    .await
                    .unwrap_or_else(|_| vec![Err(stopped_in_flight()); n]),
                Queued::Split(groups) => {
                    let mut out: Vec<Option<Result<Reply, ValkeyError>>> = vec![None; n];
                    for (positions, rx) in groups {
                        let replies = rx
                            .await
                            .unwrap_or_else(|_| vec![Err(stopped_in_flight()); positions.len()]);
                        for (position, reply) in positions.into_iter().zip(replies) {
                            out[position] = Some(reply);
                        }
                    }
                    out.into_iter()
                        .map(|reply| reply.unwrap_or_else(|| Err(stopped_in_flight())))
                        .collect()
                }
            }
        })
    }

    /// Like [`Client::try_submit`], and each batch that carries these commands ends with the
    /// configured `WAIT` ([`ClientConfig::wait_for`]) on the same connection. The future gives
    /// one result per command and, per command, the `WAIT` reply of its batch: an integer,
    /// the replicas that acknowledged every write of that connection up to then (commands
    /// spanning connections get one `WAIT` per connection). Refused with `Config` when no
    /// `WAIT` is configured.
    #[allow(clippy::type_complexity)]
    pub fn try_submit_replicated(
        &self,
        commands: &[Command],
    ) -> Result<
        impl std::future::Future<
                Output = (
                    Vec<Result<Reply, ValkeyError>>,
                    Vec<Result<Reply, ValkeyError>>,
                ),
            > + 'static,
        ValkeyError,
    > {
        if self.shared.wait_command.is_none() {
            return Err(ValkeyError::Config(
                "replicated submit without a configured WAIT".to_owned(),
            ));
        }
        let n = commands.len();
        let queued = if n == 0 {
            Queued::Split(Vec::new())
        } else {
            self.shared.enqueue_many(commands, true)?
        };
        Ok(async move {
            // Each group's results end with its batch's WAIT reply.
            let split = |mut results: Vec<Result<Reply, ValkeyError>>, len: usize| {
                let wait = if results.len() > len {
                    results.pop().unwrap_or_else(|| Err(stopped_in_flight()))
                } else {
                    Err(stopped_in_flight())
                };
                results.resize_with(len, || Err(stopped_in_flight()));
                (results, wait)
            };
            match queued {
                Queued::One(rx) => {
                    let results = rx.await.unwrap_or_default();
                    let (replies, wait) = split(results, n);
                    (replies, vec![wait; n])
                }
                Queued::Split(groups) => {
                    let mut replies: Vec<Result<Reply, ValkeyError>> =
                        vec![Err(stopped_in_flight()); n];
                    let mut waits = replies.clone();
                    for (positions, rx) in groups {
                        let results = rx.await.unwrap_or_default();
                        let (results, wait) = split(results, positions.len());
                        for (position, reply) in positions.into_iter().zip(results) {
                            replies[position] = reply;
                            waits[position] = wait.clone();
                        }
                    }
                    (replies, waits)
                }
            }
        })
    }

    /// The `WAIT` that [replicated](Client::try_submit_replicated) batches end with.
    pub fn wait_for(&self) -> Option<WaitFor> {
        self.shared.config.wait_for
    }

    /// A copy of the batch-size distribution (commands per batch) since start, for metrics.
    pub fn batch_histogram(&self) -> Option<Histogram<u64>> {
        self.shared.state.borrow().batch_sizes.clone()
    }

    /// How long one command may wait in the queue, and then for its reply.
    pub fn command_timeout(&self) -> Duration {
        self.shared.config.connect.command_timeout
    }

    /// Whether at least one connection is up.
    pub fn is_connected(&self) -> bool {
        self.shared.state.borrow().connected > 0
    }

    /// Waits until a connection is up; false if none came within `within`.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let up = self.shared.until(|state| state.connected > 0);
        with_timeout(within, "", async {
            up.await;
            Ok(())
        })
        .await
        .is_ok()
    }

    /// Commands queued plus in flight.
    pub fn pending(&self) -> usize {
        let state = self.shared.state.borrow();
        state.queued_commands + state.in_flight_commands
    }

    pub fn stats(&self) -> ClientStats {
        let state = self.shared.state.borrow();
        let mut stats = state.stats.clone();
        let target = self.shared.target.stats();
        stats.failovers = target.failovers;
        stats.sentinel_errors = target.sentinel_errors;
        stats.master = target.master;
        stats.connected = state.connected;
        stats.queued = state.queued_commands;
        stats.in_flight = state.in_flight_commands;
        if let Some(histogram) = &state.batch_sizes {
            stats.batch_commands_p50 = histogram.value_at_quantile(0.5);
            stats.batch_commands_p99 = histogram.value_at_quantile(0.99);
        }
        stats
    }

    /// Refuses new commands, sends what is queued and waits for the replies (at most
    /// `command_timeout`), fails whatever is left with `Unavailable`, and stops the tasks
    /// (closing the connections). Commands still in flight then fail with `ConnectionLost`.
    pub async fn shutdown(&self) {
        self.shared.state.borrow_mut().closing = true;
        let drained = self
            .shared
            .until(|state| state.queues_empty() && state.in_flight_commands == 0);
        let limit = self.shared.config.connect.command_timeout;
        let _ = with_timeout(limit, "", async {
            drained.await;
            Ok(())
        })
        .await;
        let leftovers: Vec<QueuedGroup> = {
            let mut state = self.shared.state.borrow_mut();
            state.queued_commands = 0;
            let mut leftovers = Vec::new();
            for lane in &mut state.lanes {
                lane.arena.clear();
                lane.queued_commands = 0;
                leftovers.extend(lane.queue.drain(..));
            }
            leftovers
        };
        let error = ValkeyError::Unavailable("client shut down before the command was sent");
        for group in leftovers {
            group.fail(&error);
        }
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        for task in tasks {
            task.cancel().await;
        }
        // A driver cancelled mid-batch never finished its accounting; its callers got
        // `ConnectionLost` through their dropped senders.
        let mut state = self.shared.state.borrow_mut();
        state.in_flight_commands = 0;
        for lane in &mut state.lanes {
            lane.in_flight_commands = 0;
        }
        drop(state);
        tracing::info!(client = %self.shared.config.connect.client_name, "Valkey client stopped");
    }
}

/// What a caller sees when its command's driver was stopped before replying.
fn stopped_in_flight() -> ValkeyError {
    ValkeyError::ConnectionLost("client stopped with the command in flight".to_owned())
}

impl Shared {
    /// Admission control for `commands` more commands going to `lanes`: refused when
    /// shutting down, or when the queues hold `max_pending` already and one of the target
    /// lanes is not empty (an empty lane admits one group of any size; with
    /// `max_pending == 0`, only while that lane is connected).
    fn admit(
        &self,
        state: &mut State,
        commands: usize,
        lanes: &[usize],
    ) -> Result<(), ValkeyError> {
        if state.closing {
            state.stats.rejected_shut_down += commands as u64;
            return Err(ValkeyError::Unavailable("client is shut down"));
        }
        let limit = self.config.max_pending;
        let fits = state.queued_commands + commands <= limit
            || lanes.iter().all(|&i| {
                let lane = &state.lanes[i];
                lane.queue.is_empty() && (limit > 0 || lane.connected)
            });
        if !fits {
            state.stats.rejected_backpressure += commands as u64;
            return Err(ValkeyError::Backpressure {
                limit: self.config.max_pending,
            });
        }
        Ok(())
    }

    /// Appends one admitted group to lane `index` and wakes its driver and the janitor.
    fn push_group(
        state: &mut State,
        index: usize,
        commands: usize,
        wait: bool,
        write: impl FnOnce(&mut BytesMut),
        completion: Completion,
    ) {
        let lane = &mut state.lanes[index];
        let before = lane.arena.len();
        write(&mut lane.arena);
        let bytes = lane.arena.len() - before;
        lane.queue.push_back(QueuedGroup {
            bytes,
            commands,
            completion,
            enqueued_at: Instant::now(),
            wait,
        });
        lane.queued_commands += commands;
        if let Some(waker) = lane.idle_driver.take() {
            waker.wake();
        }
        state.queued_commands += commands;
        if let Some(waker) = state.janitor.take() {
            waker.wake();
        }
    }

    /// Admission control and appending one group to its lane, in one borrow.
    fn enqueue(
        &self,
        route: Option<u64>,
        commands: usize,
        write: impl FnOnce(&mut BytesMut),
        completion: Completion,
    ) -> Result<(), ValkeyError> {
        let mut state = self.state.borrow_mut();
        let index = match route {
            Some(route) => state.lane_of(route),
            None => state.least_busy_lane(),
        };
        self.admit(&mut state, commands, &[index])?;
        Self::push_group(&mut state, index, commands, false, write, completion);
        Ok(())
    }

    /// Queues `commands` (at least one) as one group per lane they route to, all or none;
    /// with `wait`, each group's batch ends with the replication `WAIT`. Allocates nothing
    /// beyond the group's receiver when they all take one lane (every single-topic publish).
    fn enqueue_many(&self, commands: &[Command], wait: bool) -> Result<Queued, ValkeyError> {
        let mut state = self.state.borrow_mut();
        // Unrouted commands ride with the routed command before them (the first routed one
        // if none is before), so they keep their place relative to it.
        let first_lane = match commands.iter().find_map(|c| c.route) {
            Some(route) => state.lane_of(route),
            None => state.least_busy_lane(),
        };
        let lane_count = state.lanes.len() as u64;
        let lanes_of = || {
            let mut current = first_lane;
            commands.iter().map(move |command| {
                if let Some(route) = command.route {
                    current = (route % lane_count) as usize;
                }
                current
            })
        };
        if lanes_of().all(|lane| lane == first_lane) {
            self.admit(&mut state, commands.len(), &[first_lane])?;
            let (tx, rx) = oneshot::channel();
            Self::push_group(
                &mut state,
                first_lane,
                commands.len(),
                wait,
                |arena| {
                    for command in commands {
                        arena.extend_from_slice(command.as_bytes());
                    }
                },
                Completion::Many(tx),
            );
            return Ok(Queued::One(rx));
        }
        let lane_per_command: Vec<usize> = lanes_of().collect();
        let mut lanes: Vec<usize> = Vec::new();
        for &lane in &lane_per_command {
            if !lanes.contains(&lane) {
                lanes.push(lane);
            }
        }
        self.admit(&mut state, commands.len(), &lanes)?;
        let mut groups = Vec::with_capacity(lanes.len());
        for lane in lanes {
            let positions: Vec<usize> = (0..commands.len())
                .filter(|&i| lane_per_command[i] == lane)
                .collect();
            let (tx, rx) = oneshot::channel();
            Self::push_group(
                &mut state,
                lane,
                positions.len(),
                wait,
                |arena| {
                    for &i in &positions {
                        arena.extend_from_slice(commands[i].as_bytes());
                    }
                },
                Completion::Many(tx),
            );
            groups.push((positions, rx));
        }
        Ok(Queued::Split(groups))
    }

    /// Resolves once `condition` holds; re-checked whenever watchers are woken.
    fn until<'a>(
        &'a self,
        condition: impl Fn(&State) -> bool + 'a,
    ) -> impl Future<Output = ()> + 'a {
        poll_fn(move |cx| {
            let mut state = self.state.borrow_mut();
            if condition(&state) {
                Poll::Ready(())
            } else {
                register(&mut state.watchers, cx);
                Poll::Pending
            }
        })
    }

    /// Resolves when something is queued in lane `index`.
    fn work_available(&self, index: usize) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            let mut state = self.state.borrow_mut();
            let lane = &mut state.lanes[index];
            if lane.queue.is_empty() {
                lane.idle_driver = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }

    /// Moves lane `index`'s front groups (up to `max_batch_commands`, whole groups only, at
    /// least one) into `groups` and splits their bytes off its arena.
    fn take_batch(&self, index: usize, groups: &mut Vec<QueuedGroup>) -> (BytesMut, usize, bool) {
        let mut state = self.state.borrow_mut();
        let limit = self.config.max_batch_commands;
        let (mut commands, mut bytes, mut wait) = (0, 0, false);
        let lane = &mut state.lanes[index];
        while let Some(front) = lane.queue.front() {
            if commands > 0 && commands + front.commands > limit {
                break;
            }
            let Some(group) = lane.queue.pop_front() else {
                break;
            };
            commands += group.commands;
            bytes += group.bytes;
            wait |= group.wait;
            groups.push(group);
        }
        let batch = lane.arena.split_to(bytes);
        lane.queued_commands -= commands;
        lane.in_flight_commands += commands;
        state.queued_commands -= commands;
        state.in_flight_commands += commands;
        let stats = &mut state.stats;
        stats.commands_sent += commands as u64;
        stats.batches_sent += 1;
        stats.bytes_sent += bytes as u64;
        stats.last_batch_commands = commands;
        stats.largest_batch_commands = stats.largest_batch_commands.max(commands);
        if let Some(histogram) = state.batch_sizes.as_mut() {
            histogram.saturating_record(commands as u64);
        }
        state.stats.waits += u64::from(wait);
        (batch, commands, wait)
    }

    /// Completes the callers of a finished batch of lane `index`: replies in order,
    /// `failure` for the rest. With `wait`, the batch ended with the replication `WAIT`,
    /// whose reply (the one after the `commands` replies, if it came) goes to every waiting
    /// group.
    fn finish_batch(
        &self,
        index: usize,
        groups: &mut Vec<QueuedGroup>,
        replies: &mut Vec<Reply>,
        commands: usize,
        wait: bool,
        failure: Option<&ValkeyError>,
    ) {
        let fallback;
        let missing = match failure {
            Some(error) => error,
            None => {
                // round_trip returns Ok only with every reply; kept total anyway.
                fallback = ValkeyError::ConnectionLost("reply missing".to_owned());
                &fallback
            }
        };
        let wait_reply = if wait && replies.len() > commands {
            replies.pop().map(|reply| match reply {
                Reply::Error(message) => Err(error_reply(message)),
                reply => Ok(reply),
            })
        } else {
            None
        };
        {
            let mut state = self.state.borrow_mut();
            state.in_flight_commands -= commands;
            state.lanes[index].in_flight_commands -= commands;
            let error_replies = replies.iter().filter(|r| r.is_error()).count() as u64;
            let read_only = replies
                .iter()
                .filter(|r| r.as_error().is_some_and(is_read_only))
                .count() as u64;
            let unanswered = commands.saturating_sub(replies.len()) as u64;
            let stats = &mut state.stats;
            stats.error_replies += error_replies;
            stats.not_master_replies += read_only;
            match failure {
                Some(ValkeyError::Timeout(_)) => stats.failed_timeout_in_flight += unanswered,
                Some(ValkeyError::Protocol(_)) => stats.failed_protocol += unanswered,
                Some(_) => stats.failed_connection_lost += unanswered,
                None => {}
            }
            state.wake_watchers();
        }
        let mut replies = replies.drain(..);
        for group in groups.drain(..) {
            group.complete(&mut replies, missing, wait_reply.as_ref());
        }
    }

    fn on_connected(&self, index: usize, connection: &Connection, reconnect: bool) {
        let mut state = self.state.borrow_mut();
        state.connected += 1;
        state.lanes[index].connected = true;
        state.stats.connects += 1;
        if reconnect {
            state.stats.reconnects += 1;
        }
        state.stats.last_connect_error = None;
        state.wake_watchers();
        let name = &self.config.connect.client_name;
        let peer = connection.peer_addr();
        if reconnect {
            tracing::info!(client = %name, connection = index, %peer, "reconnected to Valkey");
        } else {
            tracing::info!(client = %name, connection = index, %peer, "connected to Valkey");
        }
    }

    fn on_connect_failed(&self, index: usize, failures: u32, error: ValkeyError) {
        let mut state = self.state.borrow_mut();
        state.stats.connect_failures += 1;
        match &error {
            ValkeyError::Auth(_) => state.stats.auth_failures += 1,
            ValkeyError::Tls(_) => state.stats.tls_failures += 1,
            _ => {}
        }
        let name = &self.config.connect.client_name;
        // The first failure of a streak is news; repeats every few seconds are not.
        if failures == 0 {
            tracing::warn!(client = %name, connection = index, %error, "cannot connect to Valkey; retrying with backoff");
        } else {
            tracing::debug!(client = %name, connection = index, %error, attempt = failures + 1, "still cannot connect to Valkey");
        }
        state.stats.last_connect_error = Some(error);
    }

    fn on_lost(&self, index: usize, error: &ValkeyError) {
        let mut state = self.state.borrow_mut();
        state.stats.connections_lost += 1;
        let name = &self.config.connect.client_name;
        tracing::warn!(client = %name, connection = index, %error, "lost connection to Valkey; reconnecting");
    }

    fn on_moved(&self, index: usize) {
        let name = &self.config.connect.client_name;
        tracing::info!(client = %name, connection = index, "Valkey master changed: reconnecting to the new master");
    }

    /// Pops every group queued at or before `cutoff` into `expired`; in each lane they are
    /// at the front because all groups share one timeout and a lane is in arrival order.
    fn expire_queued(&self, cutoff: Instant, expired: &mut Vec<QueuedGroup>) {
        let mut state = self.state.borrow_mut();
        let mut removed = 0;
        for lane in &mut state.lanes {
            while lane
                .queue
                .front()
                .is_some_and(|front| front.enqueued_at <= cutoff)
            {
                let Some(group) = lane.queue.pop_front() else {
                    break;
                };
                let _ = lane.arena.split_to(group.bytes);
                lane.queued_commands -= group.commands;
                removed += group.commands;
                expired.push(group);
            }
        }
        state.queued_commands -= removed;
        state.stats.failed_timeout_queued += removed as u64;
        state.wake_watchers();
    }

    /// When the oldest queued group (over all lanes) was queued.
    fn oldest_queued(&self) -> Option<Instant> {
        let state = self.state.borrow();
        state
            .lanes
            .iter()
            .filter_map(|lane| lane.queue.front().map(|g| g.enqueued_at))
            .min()
    }
}

/// Counts a connection (of the lane it names) as up for as long as the driver holds it,
/// including when the driver task is cancelled mid-batch by `shutdown`.
struct ConnectedGuard<'a>(&'a Shared, usize);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.borrow_mut();
        state.connected -= 1;
        state.lanes[self.1].connected = false;
        state.wake_watchers();
    }
}

/// One connection's life, forever: connect (with backoff) to where the target says, serve
/// batches until the connection fails or the master moves, repeat. Stopped by cancelling its
/// task.
async fn run_driver(shared: Rc<Shared>, index: usize) {
    let mut failures: u32 = 0;
    let mut ever_connected = false;
    // The master generation last connected to (or tried): its failures are reported against it.
    let mut generation: u64 = 0;
    // Reused across batches: no allocation per batch once warmed up.
    let mut groups = Vec::new();
    let mut replies = Vec::new();
    loop {
        if failures > 0 {
            let delay = backoff_delay(
                shared.config.backoff_min,
                shared.config.backoff_max,
                failures,
            );
            // A new master ends the wait at once: the backoff was from the old one.
            futures_lite::future::or(
                glommio::timer::sleep(delay),
                shared.target.moved(generation),
            )
            .await;
        }
        let (master, master_generation) = shared.target.master().await;
        generation = master_generation;
        let mut connection = match shared.connector.connect_to(&master.host, master.port).await {
            Ok(connection) => connection,
            Err(error) => {
                shared.target.suspect(generation, &error);
                shared.on_connect_failed(index, failures, error);
                failures = failures.saturating_add(1);
                continue;
            }
        };
        shared.on_connected(index, &connection, ever_connected);
        ever_connected = true;
        let connected_at = Instant::now();
        let guard = ConnectedGuard(&shared, index);
        let ended = serve(
            &shared,
            index,
            &mut connection,
            generation,
            &mut groups,
            &mut replies,
        )
        .await;
        drop(guard);
        drop(connection);
        match ended {
            Ended::Moved => {
                shared.on_moved(index);
                failures = 0;
            }
            Ended::Failed(error) => {
                shared.target.suspect(generation, &error);
                shared.on_lost(index, &error);
                failures = if connected_at.elapsed() >= STABLE_CONNECTION {
                    0
                } else {
                    failures.saturating_add(1)
                };
            }
        }
    }
}

/// Why a driver stopped using a connection.
enum Ended {
    /// It failed (lost, timed out, out of step, or the node answered `READONLY`).
    Failed(ValkeyError),
    /// The master moved (Sentinel): the connection leads to a node that is no longer it.
    Moved,
}

/// Sends lane `index`'s batches over `connection` (to the master of `generation`) until it
/// fails or the master moves; returns why.
async fn serve(
    shared: &Shared,
    index: usize,
    connection: &mut Connection,
    generation: u64,
    groups: &mut Vec<QueuedGroup>,
    replies: &mut Vec<Reply>,
) -> Ended {
    loop {
        // Idle: wait for work, but also watch the socket, so a restarted Valkey is noticed
        // (and reconnected to) before the next batch is written into a dead connection, and
        // the target, so a failover moves an idle connection at once. `or` polls the queue
        // first: under load the read is never even started.
        let idle_end = futures_lite::future::or(
            async {
                shared.work_available(index).await;
                None
            },
            futures_lite::future::or(
                async { Some(Ended::Failed(connection.closed().await)) },
                async {
                    shared.target.moved(generation).await;
                    Some(Ended::Moved)
                },
            ),
        )
        .await;
        if let Some(ended) = idle_end {
            return ended;
        }
        let (mut batch, commands, wait) = shared.take_batch(index, groups);
        let mut expected = commands;
        if wait {
            if let Some(command) = &shared.wait_command {
                // One WAIT behind every write of the batch, on the same connection: it
                // counts the replicas that have all of them. A copy of the batch, but only
                // in this mode, where the WAIT's round trip to the replicas dwarfs it.
                batch.extend_from_slice(command);
                expected += 1;
            }
        }
        replies.clear();
        // A master that moves while the batch is in flight: abandon it. What it wrote on
        // the old master may be lost with it, so its callers must not be told it is stored.
        let result = futures_lite::future::or(
            async { Some(connection.round_trip(&batch, expected, replies).await) },
            async {
                shared.target.moved(generation).await;
                None
            },
        )
        .await;
        drop(batch);
        let (failure, ended) = match result {
            Some(Ok(())) => (None, None),
            Some(Err(error)) => (Some(error.clone()), Some(Ended::Failed(error))),
            None => (
                Some(ValkeyError::ConnectionLost(
                    "abandoned in flight: the Valkey master changed".to_owned(),
                )),
                Some(Ended::Moved),
            ),
        };
        // A node that answers READONLY became a replica: this connection is of no more use.
        let demoted = replies
            .iter()
            .find_map(|r| r.as_error().filter(|m| is_read_only(m)))
            .map(|m| ValkeyError::NotMaster(m.to_owned()));
        let wait = wait && shared.wait_command.is_some();
        shared.finish_batch(index, groups, replies, commands, wait, failure.as_ref());
        if let Some(ended) = ended {
            return ended;
        }
        if let Some(error) = demoted {
            return Ended::Failed(error);
        }
    }
}

/// Fails queued commands that waited longer than `command_timeout`. Sleeps until the oldest
/// queued command's deadline, or until something is queued.
async fn run_janitor(shared: Rc<Shared>) {
    let limit = shared.config.connect.command_timeout;
    let error = ValkeyError::Timeout("waiting in the queue for a connection");
    let mut expired = Vec::new();
    loop {
        let oldest = poll_fn(|cx| match shared.oldest_queued() {
            Some(oldest) => Poll::Ready(oldest),
            None => {
                shared.state.borrow_mut().janitor = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let now = Instant::now();
        // `Connector::new` bounds the timeout to an hour, so neither side overflows.
        let deadline = oldest + limit;
        if deadline > now {
            glommio::timer::sleep(deadline - now).await;
            continue;
        }
        shared.expire_queued(now.checked_sub(limit).unwrap_or(oldest), &mut expired);
        for group in expired.drain(..) {
            group.fail(&error);
        }
    }
}

/// Delay before reconnect attempt `failures` (>= 1): uniform in `[min, cap]` where the cap
/// doubles from `min` up to `max` ("full jitter", floored at `min` so attempts are never
/// back to back: a wrong password costs a handful of attempts per second, not thousands).
pub(super) fn backoff_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let cap = min.saturating_mul(1u32 << doublings).min(max);
    let (low, high) = (min.as_nanos() as u64, cap.as_nanos() as u64);
    Duration::from_nanos(fastrand::u64(low..=high.max(low)))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{eventually, free_port, run_local, ValkeyServer};
    use super::*;

    fn config_for(connect: ConnectConfig) -> ClientConfig {
        ClientConfig {
            connect,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..ClientConfig::default()
        }
    }

    fn unreachable_config(command_timeout: Duration) -> ClientConfig {
        config_for(ConnectConfig {
            port: free_port(),
            connect_timeout: Duration::from_millis(500),
            command_timeout,
            ..ConnectConfig::default()
        })
    }

    #[test]
    fn backoff_is_capped_exponential_with_floor() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(5));
        for _ in 0..200 {
            let first = backoff_delay(min, max, 1);
            assert_eq!(first, min);
            let third = backoff_delay(min, max, 3);
            assert!(
                third >= min && third <= Duration::from_millis(200),
                "{third:?}"
            );
            let late = backoff_delay(min, max, 40);
            assert!(late >= min && late <= max, "{late:?}");
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| backoff_delay(min, max, 10)).collect();
        assert!(spread.len() > 10, "jittered");
    }

    #[test]
    fn commands_are_validated() {
        assert_eq!(Command::new(&[]), Err(ProtocolError::EmptyCommand));
        let ping = Command::new(&[b"PING"]).expect("ping");
        assert_eq!(ping.as_bytes(), b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(
            Command::from_encoded(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")),
            Ok(ping)
        );
        assert!(Command::from_encoded(Bytes::from_static(b"PING\r\n")).is_err());
        assert!(Command::from_encoded(Bytes::from_static(
            b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n"
        ))
        .is_err());
    }

    #[test]
    fn invalid_configs_are_refused() {
        run_local(|| async {
            for bad in [
                ClientConfig {
                    connections: 0,
                    ..ClientConfig::default()
                },
                ClientConfig {
                    max_batch_commands: 0,
                    ..ClientConfig::default()
                },
                ClientConfig {
                    backoff_min: Duration::from_secs(10),
                    ..ClientConfig::default()
                },
            ] {
                assert!(matches!(Client::start(bad), Err(ValkeyError::Config(_))));
            }
        });
    }

    #[test]
    fn round_trips_ping_set_get_xadd() {
        let server = ValkeyServer::start(&[]);
        let config = config_for(server.config());
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert_eq!(
                client.call(&[b"PING"]).await.expect("PING").as_str(),
                Some("PONG")
            );
            assert!(client
                .call(&[b"SET", b"k", b"v"])
                .await
                .expect("SET")
                .is_ok());
            assert_eq!(
                client.call(&[b"GET", b"k"]).await.expect("GET").as_str(),
                Some("v")
            );
            assert_eq!(client.call(&[b"GET", b"nope"]).await, Ok(Reply::Nil));
            let id = client
                .call(&[b"XADD", b"topic:t:stream", b"*", b"d", b"{\"a\":1}"])
                .await
                .expect("XADD");
            let range = client
                .call(&[b"XRANGE", b"topic:t:stream", b"-", b"+"])
                .await
                .expect("XRANGE")
                .into_array()
                .expect("array");
            let entry = range[0].as_array().expect("entry");
            assert_eq!(entry[0], id);
            assert!(client.is_connected());
            assert_eq!(client.pending(), 0);
            assert_eq!(
                client.call(&[]).await,
                Err(ValkeyError::Protocol(ProtocolError::EmptyCommand))
            );
            let stats = client.stats();
            assert_eq!(stats.connects, 1);
            assert_eq!(stats.commands_sent, 6);
            client.shutdown().await;
        });
    }

    #[test]
    fn ten_thousand_concurrent_calls_go_out_in_few_batches() {
        let server = ValkeyServer::start(&[]);
        let config = config_for(server.config());
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            let tasks: Vec<_> = (0..10_000)
                .map(|_| {
                    let client = client.clone();
                    glommio::spawn_local(async move { client.call(&[b"INCR", b"counter"]).await })
                })
                .collect();
            let mut seen = std::collections::HashSet::new();
            for task in tasks {
                let value = task.await.expect("INCR").as_int().expect("integer");
                assert!(seen.insert(value), "each INCR got its own reply");
            }
            assert_eq!(seen.len(), 10_000);
            assert_eq!(seen.iter().max(), Some(&10_000));
            let stats = client.stats();
            assert_eq!(stats.commands_sent, 10_000);
            assert!(
                stats.batches_sent <= 50,
                "{} batches for 10,000 commands",
                stats.batches_sent
            );
            assert!(stats.largest_batch_commands <= 4096);
            assert!(stats.largest_batch_commands >= 1000);
            assert!(stats.batch_commands_p99 >= 1000);
            client.shutdown().await;
        });
    }

    #[test]
    fn call_many_keeps_order_and_isolates_error_replies() {
        let server = ValkeyServer::start(&[]);
        let config = ClientConfig {
            connections: 3,
            ..config_for(server.config())
        };
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            let command = |args: &[&[u8]]| Command::new(args).expect("command");
            let results = client
                .call_many(&[
                    command(&[b"SET", b"s", b"text"]),
                    command(&[b"RPUSH", b"s", b"x"]),
                    command(&[b"RPUSH", b"l", b"a"]),
                    command(&[b"RPUSH", b"l", b"b"]),
                    command(&[b"LRANGE", b"l", b"0", b"-1"]),
                    command(&[b"GET", b"s"]),
                ])
                .await;
            assert_eq!(results.len(), 6);
            assert!(results[0].as_ref().is_ok_and(Reply::is_ok));
            assert!(
                matches!(&results[1], Err(ValkeyError::Server(m)) if m.starts_with("WRONGTYPE")),
                "{:?}",
                results[1]
            );
            assert_eq!(results[2], Ok(Reply::Integer(1)));
            assert_eq!(results[3], Ok(Reply::Integer(2)));
            assert_eq!(
                results[4],
                Ok(Reply::Array(vec![
                    Reply::Bulk(Bytes::from_static(b"a")),
                    Reply::Bulk(Bytes::from_static(b"b"))
                ]))
            );
            assert_eq!(
                results[5].as_ref().ok().and_then(Reply::as_str),
                Some("text")
            );
            // Many concurrent groups over 3 connections: each group's order holds.
            let tasks: Vec<_> = (0..200)
                .map(|i| {
                    let client = client.clone();
                    glommio::spawn_local(async move {
                        let key = format!("list{i}");
                        let cmds: Vec<Command> = (0..5)
                            .map(|j| {
                                Command::new(&[b"RPUSH", key.as_bytes(), j.to_string().as_bytes()])
                                    .expect("command")
                            })
                            .chain([Command::new(&[b"LRANGE", key.as_bytes(), b"0", b"-1"])
                                .expect("command")])
                            .collect();
                        client.call_many(&cmds).await
                    })
                })
                .collect();
            for task in tasks {
                let results = task.await;
                for (j, result) in results[..5].iter().enumerate() {
                    assert_eq!(result, &Ok(Reply::Integer(j as i64 + 1)));
                }
                let items = results[5]
                    .clone()
                    .expect("LRANGE")
                    .into_array()
                    .expect("array");
                let items: Vec<_> = items.iter().filter_map(Reply::as_str).collect();
                assert_eq!(items, ["0", "1", "2", "3", "4"]);
            }
            assert!(client.call_many(&[]).await.is_empty());
            assert!(eventually(Duration::from_secs(5), || client.stats().connected == 3).await);
            client.shutdown().await;
        });
    }

    /// Publishes `rounds` bursts of XADDs from concurrent tasks to `topics` streams and
    /// returns, per topic, the ids Valkey assigned in the order the XADDs were submitted.
    async fn xadd_bursts(client: &Rc<Client>, topics: usize, rounds: usize) -> Vec<Vec<String>> {
        let order: Rc<RefCell<Vec<Vec<usize>>>> = Rc::new(RefCell::new(vec![Vec::new(); topics]));
        let mut tasks = Vec::new();
        let mut ticket = 0usize;
        let payload = vec![b'p'; 4096];
        for round in 0..rounds {
            for task in 0..16 {
                let topic = (round * 16 + task) % topics;
                let key = format!("seq:{topic}");
                // Batches of tens of KB: Valkey reads a connection's pipeline in chunks and
                // interleaves connections between chunks, which is where order was lost.
                let command = Command::new(&[b"XADD", key.as_bytes(), b"*", b"d", &payload])
                    .expect("command")
                    .routed(format!("{topic}").as_bytes());
                // Submission order is the order `submit` queues in, recorded right here.
                order.borrow_mut()[topic].push(ticket);
                let reply = client.submit(&[command]);
                tasks.push((topic, ticket, glommio::spawn_local(reply)));
                ticket += 1;
            }
            // Let the drivers take what is queued so the bursts spread over connections.
            glommio::yield_if_needed().await;
            glommio::timer::sleep(Duration::from_micros(50)).await;
        }
        let mut ids: Vec<Vec<(usize, String)>> = vec![Vec::new(); topics];
        for (topic, ticket, task) in tasks {
            let reply = task.await.pop().expect("one reply").expect("XADD");
            ids[topic].push((ticket, reply.as_str().expect("id").to_owned()));
        }
        ids.into_iter()
            .map(|mut per_topic| {
                per_topic.sort_by_key(|(ticket, _)| *ticket);
                per_topic.into_iter().map(|(_, id)| id).collect()
            })
            .collect()
    }

    /// Starts a client and waits until every one of its connections is up (lanes would
    /// otherwise fall back to the connected ones and hide what a test checks).
    async fn start_all_connected(config: ClientConfig) -> Rc<Client> {
        let connections = config.connections;
        let client = Client::start(config).expect("start");
        assert!(
            eventually(Duration::from_secs(5), || client.stats().connected
                == connections)
            .await,
            "not all {connections} connections came up"
        );
        client
    }

    fn parse_id(id: &str) -> (u64, u64) {
        let (ms, seq) = id.split_once('-').expect("stream id");
        (ms.parse().expect("ms"), seq.parse().expect("seq"))
    }

    /// Regression (issue 11 item 5): with several connections per shard, two XADDs of one
    /// topic submitted one after the other went out on different connections and Valkey
    /// could assign the later one the smaller id; sinks then dropped a message.
    #[test]
    fn one_topic_stays_in_order_over_four_connections() {
        let server = ValkeyServer::start(&[]);
        for connections in [1, 2, 4] {
            let config = ClientConfig {
                connections,
                ..config_for(server.config())
            };
            run_local(move || async move {
                let client = start_all_connected(config).await;
                let per_topic = xadd_bursts(&client, 3, 400).await;
                for (topic, ids) in per_topic.iter().enumerate() {
                    let parsed: Vec<(u64, u64)> = ids.iter().map(|id| parse_id(id)).collect();
                    let out_of_order = parsed.windows(2).filter(|w| w[0] >= w[1]).count();
                    assert_eq!(
                        out_of_order, 0,
                        "{connections} connections: topic {topic} got ids out of submission order"
                    );
                }
                client.shutdown().await;
            });
        }
    }

    /// Regression (issue 11 item 5, `ack: buffered`): explicit increasing ids of one topic
    /// were rejected ("equal or smaller than the target stream top item") when a later XADD
    /// overtook an earlier one on another connection. Bulk calls here span topics (so lanes):
    /// each is split per lane and its replies must come back in item order.
    #[test]
    fn explicit_ids_of_one_topic_are_never_rejected_over_four_connections() {
        let server = ValkeyServer::start(&[]);
        for connections in [1, 2, 4] {
            let config = ClientConfig {
                connections,
                ..config_for(server.config())
            };
            run_local(move || async move {
                let client = start_all_connected(config).await;
                let payload = vec![b'p'; 4096];
                let mut next_seq = [0u64; 5];
                let mut tasks = Vec::new();
                for round in 0..300usize {
                    // 1 to 4 items over several topics, ids chosen at submission.
                    let items: Vec<(usize, String)> = (0..1 + round % 4)
                        .map(|i| {
                            let topic = (round + i * 2) % next_seq.len();
                            next_seq[topic] += 1;
                            (topic, format!("1-{}", next_seq[topic]))
                        })
                        .collect();
                    let commands: Vec<Command> = items
                        .iter()
                        .map(|(topic, id)| {
                            let key = format!("explicit:{connections}:{topic}");
                            Command::new(&[b"XADD", key.as_bytes(), id.as_bytes(), b"d", &payload])
                                .expect("command")
                                .routed(topic.to_string().as_bytes())
                        })
                        .collect();
                    let reply = client.submit(&commands);
                    tasks.push((items, glommio::spawn_local(reply)));
                    if round % 8 == 0 {
                        glommio::timer::sleep(Duration::from_micros(50)).await;
                    }
                }
                for (items, task) in tasks {
                    let replies = task.await;
                    assert_eq!(replies.len(), items.len());
                    for ((_, id), reply) in items.iter().zip(replies) {
                        let reply = reply.unwrap_or_else(|e| {
                            panic!("{connections} connections: XADD {id} failed: {e}")
                        });
                        assert_eq!(reply.as_str(), Some(id.as_str()), "replies in item order");
                    }
                }
                client.shutdown().await;
            });
        }
    }

    /// A lane whose connection dies keeps its queued commands, in order, for its next
    /// connection: they are not moved to another lane (where they could be overtaken).
    #[test]
    fn a_lane_keeps_its_queue_in_order_across_a_reconnect() {
        let mut server = ValkeyServer::start(&[]);
        let config = ClientConfig {
            connections: 4,
            ..config_for(ConnectConfig {
                command_timeout: Duration::from_secs(10),
                ..server.config()
            })
        };
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(eventually(Duration::from_secs(5), || client.stats().connected == 4).await);
            // Hold the lane of "k" with a BLPOP, then queue INCRs behind it.
            let blocker = {
                let client = client.clone();
                glommio::spawn_local(async move {
                    client.call_routed(b"k", &[b"BLPOP", b"empty", b"30"]).await
                })
            };
            assert!(eventually(Duration::from_secs(5), || client.stats().in_flight == 1).await);
            let queued: Vec<_> = (0..5)
                .map(|_| {
                    let client = client.clone();
                    glommio::spawn_local(
                        async move { client.call_routed(b"k", &[b"INCR", b"n"]).await },
                    )
                })
                .collect();
            assert!(eventually(Duration::from_secs(5), || client.stats().queued == 5).await);
            server.restart();
            assert!(matches!(blocker.await, Err(ValkeyError::ConnectionLost(_))));
            let mut values = Vec::new();
            for task in queued {
                values.push(task.await.expect("INCR after reconnect").as_int());
            }
            assert_eq!(values, [1, 2, 3, 4, 5].map(Some), "sent in queue order");
            client.shutdown().await;
        });
    }

    #[test]
    fn queued_commands_time_out_while_disconnected() {
        let config = unreachable_config(Duration::from_millis(300));
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            let started = Instant::now();
            let result = client.call(&[b"PING"]).await;
            let waited = started.elapsed();
            assert_eq!(
                result,
                Err(ValkeyError::Timeout(
                    "waiting in the queue for a connection"
                ))
            );
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
            assert!(waited < Duration::from_secs(2), "{waited:?}");
            let many = client
                .call_many(&vec![Command::new(&[b"PING"]).expect("cmd"); 3])
                .await;
            assert!(many
                .iter()
                .all(|r| matches!(r, Err(ValkeyError::Timeout(_)))));
            let stats = client.stats();
            assert_eq!(stats.failed_timeout_queued, 4);
            assert_eq!(stats.commands_sent, 0);
            assert!(stats.connect_failures >= 1);
            assert!(matches!(
                stats.last_connect_error,
                Some(ValkeyError::Connect(_))
            ));
            assert!(!client.is_connected());
            client.shutdown().await;
        });
    }

    #[test]
    fn backpressure_when_queue_is_full() {
        let config = ClientConfig {
            max_pending: 3,
            ..unreachable_config(Duration::from_secs(1))
        };
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            let waiting: Vec<_> = (0..3)
                .map(|_| {
                    let client = client.clone();
                    glommio::spawn_local(async move { client.call(&[b"PING"]).await })
                })
                .collect();
            assert!(eventually(Duration::from_secs(5), || client.pending() == 3).await);
            assert_eq!(
                client.call(&[b"PING"]).await,
                Err(ValkeyError::Backpressure { limit: 3 })
            );
            let two = client
                .call_many(&vec![Command::new(&[b"PING"]).expect("cmd"); 2])
                .await;
            assert_eq!(two, vec![Err(ValkeyError::Backpressure { limit: 3 }); 2]);
            assert_eq!(client.stats().rejected_backpressure, 3);
            // Nothing can be sent (no server): shutdown gives up after command_timeout and
            // every waiting caller gets an error, none hangs.
            client.shutdown().await;
            for task in waiting {
                assert!(task.await.is_err());
            }
            assert_eq!(
                client.call(&[b"PING"]).await,
                Err(ValkeyError::Unavailable("client is shut down"))
            );
        });
    }

    /// Regression: a group larger than `max_pending` (an XADD plus the topic's HSETNX with
    /// `max_pending: 1`, a bulk publish) was refused even by an empty queue, forever.
    #[test]
    fn an_empty_queue_takes_a_group_larger_than_max_pending() {
        let server = ValkeyServer::start(&[]);
        let config = ClientConfig {
            max_pending: 1,
            ..config_for(server.config())
        };
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            let replies = client
                .call_many(&vec![Command::new(&[b"PING"]).expect("cmd"); 3])
                .await;
            assert!(
                replies
                    .iter()
                    .all(|r| r.as_ref().ok().and_then(Reply::as_str) == Some("PONG")),
                "{replies:?}"
            );
            client.shutdown().await;
        });
    }

    /// `max_pending: 0`: publish while connected, refuse at once (no wait for a connection)
    /// while Valkey is unreachable.
    #[test]
    fn max_pending_zero_refuses_only_while_disconnected() {
        let server = ValkeyServer::start(&[]);
        let up = ClientConfig {
            max_pending: 0,
            ..config_for(server.config())
        };
        let down = ClientConfig {
            max_pending: 0,
            ..unreachable_config(Duration::from_secs(5))
        };
        run_local(move || async move {
            let client = Client::start(up).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            let pong = client.call(&[b"PING"]).await.expect("PING");
            assert_eq!(pong.as_str(), Some("PONG"));
            client.shutdown().await;

            let client = Client::start(down).expect("start");
            let began = Instant::now();
            assert_eq!(
                client.call(&[b"PING"]).await,
                Err(ValkeyError::Backpressure { limit: 0 })
            );
            assert!(began.elapsed() < Duration::from_secs(1), "refused at once");
            client.shutdown().await;
        });
    }

    #[test]
    fn reply_timeout_fails_batch_and_reconnects() {
        let server = ValkeyServer::start(&[]);
        let config = config_for(ConnectConfig {
            command_timeout: Duration::from_millis(300),
            ..server.config()
        });
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            // BLPOP stalls this connection's pipeline for 5 s; PING rides in the same batch.
            let results = client
                .call_many(&[
                    Command::new(&[b"BLPOP", b"empty", b"5"]).expect("cmd"),
                    Command::new(&[b"PING"]).expect("cmd"),
                ])
                .await;
            assert_eq!(
                results,
                vec![Err(ValkeyError::Timeout("waiting for replies")); 2]
            );
            // The stalled connection was dropped; a fresh one answers at once.
            assert_eq!(
                client.call(&[b"PING"]).await.expect("PING").as_str(),
                Some("PONG")
            );
            let stats = client.stats();
            assert_eq!(stats.failed_timeout_in_flight, 2);
            assert_eq!(stats.connections_lost, 1);
            assert_eq!(stats.connects, 2);
            assert_eq!(stats.reconnects, 1);
            client.shutdown().await;
        });
    }

    #[test]
    fn server_killed_mid_pipeline_then_restarted() {
        let mut server = ValkeyServer::start(&[]);
        let config = config_for(ConnectConfig {
            command_timeout: Duration::from_secs(10),
            ..server.config()
        });
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            assert_eq!(
                client.call(&[b"SET", b"n", b"0"]).await.map(|r| r.is_ok()),
                Ok(true)
            );
            // In flight: a BLPOP Valkey holds without replying.
            let in_flight = {
                let client = client.clone();
                glommio::spawn_local(async move { client.call(&[b"BLPOP", b"empty", b"30"]).await })
            };
            assert!(eventually(Duration::from_secs(5), || client.stats().in_flight == 1).await);
            // Queued behind it (one connection, busy).
            let queued: Vec<_> = (0..5)
                .map(|_| {
                    let client = client.clone();
                    glommio::spawn_local(async move { client.call(&[b"INCR", b"n"]).await })
                })
                .collect();
            assert!(eventually(Duration::from_secs(5), || client.stats().queued == 5).await);

            server.kill();
            let lost = in_flight.await;
            assert!(
                matches!(lost, Err(ValkeyError::ConnectionLost(_))),
                "{lost:?}"
            );
            assert!(eventually(Duration::from_secs(5), || !client.is_connected()).await);
            assert_eq!(
                client.stats().queued,
                5,
                "queued commands were not sent to a dead server"
            );

            // The data is gone with the killed server (no persistence): INCR starts at 1.
            server.restart();
            let mut values = Vec::new();
            for task in queued {
                values.push(task.await.expect("queued INCR after reconnect").as_int());
            }
            assert_eq!(values, [1, 2, 3, 4, 5].map(Some), "sent in queue order");
            assert_eq!(
                client.call(&[b"GET", b"n"]).await.expect("GET").as_str(),
                Some("5")
            );
            let stats = client.stats();
            assert_eq!(stats.failed_connection_lost, 1);
            assert!(stats.connections_lost >= 1);
            assert!(stats.reconnects >= 1);
            client.shutdown().await;
        });
    }

    #[test]
    fn idle_connection_reconnects_after_server_restart() {
        let mut server = ValkeyServer::start(&[]);
        let config = config_for(server.config());
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            server.restart();
            // The idle driver notices the close and reconnects without any command failing.
            assert!(eventually(Duration::from_secs(5), || client.stats().reconnects == 1).await);
            assert_eq!(
                client.call(&[b"PING"]).await.expect("PING").as_str(),
                Some("PONG")
            );
            assert_eq!(client.stats().failed_connection_lost, 0);
            client.shutdown().await;
        });
    }

    #[test]
    fn wrong_password_is_auth_error_without_hot_loop() {
        let server = ValkeyServer::start(&["--requirepass", "right"]);
        let config = ClientConfig {
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            ..config_for(ConnectConfig {
                password: Some("wrong".to_owned()),
                command_timeout: Duration::from_millis(500),
                ..server.config()
            })
        };
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            let result = client.call(&[b"PING"]).await;
            assert_eq!(
                result,
                Err(ValkeyError::Timeout(
                    "waiting in the queue for a connection"
                ))
            );
            let stats = client.stats();
            assert!(stats.auth_failures >= 1);
            assert_eq!(stats.auth_failures, stats.connect_failures);
            // 500 ms with a 50 ms floor and doubling: at most ~6 attempts, never hundreds.
            assert!(
                stats.connect_failures <= 8,
                "{} attempts",
                stats.connect_failures
            );
            assert!(matches!(
                stats.last_connect_error,
                Some(ValkeyError::Auth(_))
            ));
            client.shutdown().await;
        });
    }

    #[test]
    fn acl_user_client() {
        let server = ValkeyServer::start(&["--requirepass", "admin"]);
        let admin = ConnectConfig {
            password: Some("admin".to_owned()),
            ..server.config()
        };
        let user = ConnectConfig {
            username: Some("relay".to_owned()),
            password: Some("pw".to_owned()),
            ..server.config()
        };
        run_local(move || async move {
            let admin = Client::start(config_for(admin)).expect("start admin");
            admin
                .call(&[b"ACL", b"SETUSER", b"relay", b"on", b">pw", b"~*", b"+@all"])
                .await
                .expect("ACL SETUSER");
            admin.shutdown().await;
            let client = Client::start(config_for(user)).expect("start user");
            let whoami = client.call(&[b"ACL", b"WHOAMI"]).await.expect("WHOAMI");
            assert_eq!(whoami.as_str(), Some("relay"));
            client.shutdown().await;
        });
    }

    #[test]
    fn shutdown_flushes_queue_then_refuses() {
        let server = ValkeyServer::start(&[]);
        let config = config_for(server.config());
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            assert!(client.wait_connected(Duration::from_secs(5)).await);
            // A BLPOP that returns nil after 0.3 s holds the only connection, so the INCRs
            // below are certainly still queued when shutdown begins.
            let blocker = {
                let client = client.clone();
                glommio::spawn_local(
                    async move { client.call(&[b"BLPOP", b"empty", b"0.3"]).await },
                )
            };
            assert!(eventually(Duration::from_secs(5), || client.stats().in_flight == 1).await);
            let tasks: Vec<_> = (0..500)
                .map(|_| {
                    let client = client.clone();
                    glommio::spawn_local(async move { client.call(&[b"INCR", b"x"]).await })
                })
                .collect();
            assert!(eventually(Duration::from_secs(5), || client.stats().queued == 500).await);
            client.shutdown().await;
            assert_eq!(blocker.await, Ok(Reply::Nil));
            let mut values = Vec::new();
            for task in tasks {
                values.push(
                    task.await
                        .expect("queued before shutdown: sent and answered"),
                );
            }
            assert_eq!(values.last(), Some(&Reply::Integer(500)));
            assert!(!client.is_connected());
            assert_eq!(client.pending(), 0);
            assert_eq!(
                client.call(&[b"PING"]).await,
                Err(ValkeyError::Unavailable("client is shut down"))
            );
            assert_eq!(client.stats().rejected_shut_down, 1);
        });
    }

    #[test]
    fn shutdown_fails_queued_when_valkey_is_down() {
        let config = unreachable_config(Duration::from_millis(300));
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            let task = {
                let client = client.clone();
                glommio::spawn_local(async move { client.call(&[b"PING"]).await })
            };
            assert!(eventually(Duration::from_secs(5), || client.pending() == 1).await);
            let started = Instant::now();
            client.shutdown().await;
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(matches!(
                task.await,
                Err(ValkeyError::Timeout(_) | ValkeyError::Unavailable(_))
            ));
            assert_eq!(client.pending(), 0);
        });
    }

    #[test]
    fn client_over_tls() {
        let server = ValkeyServer::start_tls();
        let config = config_for(ConnectConfig {
            tls: true,
            tls_ca_file: Some(server.file("ca.crt")),
            ..server.config()
        });
        let untrusted = config_for(ConnectConfig {
            tls: true,
            tls_ca_file: Some(server.file("other-ca.crt")),
            command_timeout: Duration::from_millis(300),
            ..server.config()
        });
        run_local(move || async move {
            let client = Client::start(config).expect("start");
            let results = client
                .call_many(&[
                    Command::new(&[b"SET", b"a", b"1"]).expect("cmd"),
                    Command::new(&[b"INCR", b"a"]).expect("cmd"),
                ])
                .await;
            assert_eq!(results[1], Ok(Reply::Integer(2)));
            client.shutdown().await;
            let refused = Client::start(untrusted).expect("start");
            assert!(refused.call(&[b"PING"]).await.is_err());
            let stats = refused.stats();
            assert!(stats.tls_failures >= 1);
            assert!(matches!(
                stats.last_connect_error,
                Some(ValkeyError::Tls(_))
            ));
            refused.shutdown().await;
        });
    }

    /// A replica of `master`, once the master sees it online.
    fn start_replica(master: &ValkeyServer) -> ValkeyServer {
        let port = master.port.to_string();
        let replica = ValkeyServer::start(&["--replicaof", "127.0.0.1", &port]);
        let probe = master.config();
        run_local(move || async move {
            let mut conn = Connection::connect(&probe).await.expect("connect master");
            let mut online = false;
            for _ in 0..500 {
                let info = conn.call(&[b"INFO", b"replication"]).await.expect("INFO");
                if info.as_str().is_some_and(|i| i.contains("state=online")) {
                    online = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            assert!(online, "replica never came online");
        });
        replica
    }

    /// A write to a node that became a replica is answered `READONLY`: the caller gets
    /// `NotMaster` (transient: not applied), and the connection is dropped and opened again
    /// (with Sentinel, to the master named then); reads keep working.
    #[test]
    fn read_only_reply_is_not_master_and_reconnects() {
        let master = ValkeyServer::start(&[]);
        let replica = start_replica(&master);
        let config = config_for(replica.config());
        run_local(move || async move {
            let client = start_all_connected(config).await;
            let refused = client.call(&[b"SET", b"k", b"v"]).await;
            assert!(
                matches!(&refused, Err(ValkeyError::NotMaster(m)) if m.starts_with("READONLY")),
                "{refused:?}"
            );
            assert!(refused
                .as_ref()
                .err()
                .is_some_and(ValkeyError::is_transient));
            assert!(eventually(Duration::from_secs(5), || client.stats().connects == 2).await);
            let stats = client.stats();
            assert_eq!(stats.not_master_replies, 1);
            assert_eq!(stats.connections_lost, 1);
            assert_eq!(
                client.call(&[b"GET", b"k"]).await,
                Ok(Reply::Nil),
                "reads still go to the replica"
            );
            client.shutdown().await;
        });
    }

    /// `ack: replicated`: everything queued before a batch goes out shares one WAIT at its
    /// end, whose count every group gets; spanning two connections, one WAIT each. Without a
    /// replica, WAIT answers 0 after its timeout.
    #[test]
    fn replicated_groups_share_one_wait_per_batch() {
        let master = ValkeyServer::start(&[]);
        let replica = start_replica(&master);
        // Generous with a replica (a loaded machine must not make it miss the deadline);
        // short without one, where it always runs out.
        let wait = WaitFor {
            replicas: 1,
            timeout: Duration::from_secs(3),
        };
        let config = ClientConfig {
            connections: 2,
            wait_for: Some(wait),
            ..config_for(ConnectConfig {
                command_timeout: Duration::from_secs(10),
                ..master.config()
            })
        };
        let lonely = ValkeyServer::start(&[]);
        let lonely_config = ClientConfig {
            wait_for: Some(WaitFor {
                replicas: 1,
                timeout: Duration::from_millis(300),
            }),
            ..config_for(lonely.config())
        };
        run_local(move || async move {
            let client = start_all_connected(config).await;
            // Queued at once: one batch per lane, each ending with one WAIT.
            let calls: Vec<_> = (0..50)
                .map(|i| {
                    let key = format!("k{i}");
                    let command = Command::new(&[b"SET", key.as_bytes(), b"v"])
                        .expect("cmd")
                        .routed(key.as_bytes());
                    client.try_submit_replicated(&[command]).expect("queued")
                })
                .collect();
            for call in calls {
                let (replies, waits) = call.await;
                assert!(replies[0].as_ref().is_ok_and(Reply::is_ok), "{replies:?}");
                assert_eq!(waits, vec![Ok(Reply::Integer(1))]);
            }
            assert_eq!(client.stats().waits, 2, "one WAIT per lane's batch");
            // One call spanning both lanes: split, each part with its own lane's WAIT.
            let keys: Vec<String> = (0..20).map(|i| format!("split{i}")).collect();
            let commands: Vec<Command> = keys
                .iter()
                .map(|k| {
                    Command::new(&[b"INCR", k.as_bytes()])
                        .expect("cmd")
                        .routed(k.as_bytes())
                })
                .collect();
            let (replies, waits) = client
                .try_submit_replicated(&commands)
                .expect("queued")
                .await;
            assert_eq!(replies, vec![Ok(Reply::Integer(1)); 20]);
            assert_eq!(waits, vec![Ok(Reply::Integer(1)); 20]);
            assert_eq!(client.stats().waits, 4);
            // Plain submits never carry a WAIT.
            let plain = client
                .call_many(&[Command::new(&[b"SET", b"x", b"1"]).expect("cmd")])
                .await;
            assert!(plain[0].is_ok());
            assert_eq!(client.stats().waits, 4);
            client.shutdown().await;

            let alone = start_all_connected(lonely_config).await;
            let began = Instant::now();
            let (replies, waits) = alone
                .try_submit_replicated(&[Command::new(&[b"SET", b"k", b"v"]).expect("cmd")])
                .expect("queued")
                .await;
            assert!(replies[0].is_ok());
            assert_eq!(
                waits,
                vec![Ok(Reply::Integer(0))],
                "no replica acknowledged"
            );
            assert!(began.elapsed() >= Duration::from_millis(300), "WAIT waited");
            alone.shutdown().await;

            let plain = start_all_connected(config_for(lonely.config())).await;
            assert!(matches!(
                plain.try_submit_replicated(&[Command::new(&[b"PING"]).expect("cmd")]),
                Err(ValkeyError::Config(_))
            ));
            plain.shutdown().await;
        });
        drop(replica);
    }

    #[test]
    fn wait_settings_are_checked() {
        run_local(|| async {
            for wait in [
                WaitFor {
                    replicas: 0,
                    timeout: Duration::from_millis(100),
                },
                WaitFor {
                    replicas: 1,
                    timeout: Duration::ZERO,
                },
                WaitFor {
                    replicas: 1,
                    timeout: Duration::from_secs(5),
                },
            ] {
                let config = ClientConfig {
                    wait_for: Some(wait),
                    ..ClientConfig::default()
                };
                assert!(
                    matches!(
                        Client::start(config).map(|_| ()),
                        Err(ValkeyError::Config(_))
                    ),
                    "{wait:?}"
                );
            }
        });
    }
}
