//! Pulsar Relay: a thread-per-core message relay.
//!
//! Producers POST JSON messages to topics over HTTP; the relay persists them to Valkey Streams
//! (or keeps them only in memory with the memory backend), keeps the recent ones in an
//! in-memory hot tier, and serves history reads.
//!
//! # Architecture
//!
//! One glommio executor runs per shard, each pinned to a core. Every shard binds the same
//! listen address (`SO_REUSEPORT`), so the kernel spreads connections over the shards, and a
//! shard serves every request on the connections it accepted. Topics are partitioned over the
//! shards by a stable hash of their name: the *owning* shard holds the topic's state (its
//! ordered log in the hot tier and its id sequence). Every operation on a topic is one async
//! closure run on its owner by the owner-call [`shard::Shard::invoke_on`] (Seastar's
//! `invoke_on`): at once when the owner is this shard, else through the owner's inbox, with the
//! typed result coming back on a oneshot channel.
//! Shard state is plain `!Send` data behind `RefCell`s: no locks and no shared atomics on the
//! hot path. What must be seen by every shard (readiness, draining) lives in one small
//! [`shard::RuntimeState`] that only start-up, shutdown and `/ready` touch.
//!
//! A request's life: [`net::listener`] accepts → [`net::connection`] reads bytes and feeds the
//! sans-IO [`http::codec`] → [`http::guard`] screens it (rate limits, `Host`, `Origin`, CORS)
//! → [`http::router`] picks a route → a handler in [`http::handlers`]
//! parses and validates the body and asks the owning shard via [`shard::Shard`] →
//! [`store::Storage`] appends (with Valkey: queues a `pulsar_publish` call, the Valkey
//! Function that checks idempotency keys and XADDs, on the shard's [`valkey::Client`],
//! which sends everything queued meanwhile as one pipeline, and waits for the reply) or reads
//! → the handler encodes JSON with [`http::response`] into
//! the connection's output buffer, which is written once per batch of pipelined requests.
//! Every message storage acknowledges goes out on its append feed ([`store::feed`]), which the
//! shard's [`delivery`] fans out to its consumers and to the other shards that have some; a
//! consumer that resumes catches up by pulling pages of history into the room its queue has
//! ([`delivery::catch_up`]), and one writer loop ([`delivery::writer`]) drains it onto the
//! socket.
//!
//! # Module map
//!
//! - [`config`]: raw layers (defaults, YAML, environment, flags) → one validated [`config::Config`];
//!   every setting declared once, in `config/settings.rs`.
//! - [`shard`]: per-core state, the owner-call between shards, topic→shard routing, executor
//!   start-up and the shutdown gate.
//! - [`net`]: the per-shard listener, the HTTP connection loop (timeouts, batching),
//!   WebSocket sessions and SSE streams; the only code that touches client sockets.
//! - [`http`]: sans-IO request decoding and response encoding, routing, error bodies, handlers,
//!   and the guard every request passes first (rate limits, `Host`, `Origin` and CORS).
//! - [`store`]: message ids and the wire form of a message, the hot tier, the storage seam
//!   behind which backends live, idempotency keys ([`store::idempotency`]), and the Valkey
//!   Streams tier ([`store::valkey`], one file a concern: the entry format, the `pulsar`
//!   Function library every append goes through, persisted publishes, the buffered
//!   write-behind, page reads, removals and gap verdicts, retention, topic discovery, server
//!   checks).
//! - [`delivery`]: what every real-time transport shares: bounded queues (sinks), the
//!   per-shard subscriber registry, cross-shard fan-out fed by storage's append feed,
//!   pull-based catch-up with gap signals, the one writer loop, long-poll's answer, and the
//!   consumer-group (work queue) consumers that take their messages from their group
//!   (`store::group`, owner-calls in `shard::group`) within their `max_in_flight`.
//! - [`metrics`]: per-shard counters and histograms, summed and rendered at scrape.
//! - [`ws`]: sans-IO WebSocket handshake, frame codec (tungstenite's frame layer) and the
//!   JSON protocol of `/ws`.
//! - [`sse`]: sans-IO Server-Sent Events: event framing, per-topic ids, resume positions.
//! - [`valkey`]: the RESP codec, each shard's pipelined, group-committing Valkey client
//!   (which loads the Function library its caller needs on every connection), and where its
//!   connections go (a fixed address, the master Valkey Sentinel names, followed across
//!   failovers, or in Valkey Cluster mode the master owning each command's slot, with
//!   `MOVED`/`ASK` followed); the only code that touches Valkey sockets.
//! - [`topic`]: the topic-name rule.
//! - [`clock`]: wall-clock milliseconds, read in one place.
//! - [`instance`]: this process's random relay instance id (named in cross-relay
//!   notifications: which relay appended what).
//! - [`replicate`]: per shard, what keeps the hot tier a cache of the Valkey streams when
//!   other relays write them too: the pub/sub feed of each followed topic, repairs, the
//!   periodic safety net (design: `docs/scaling.md`).

pub mod auth;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod net;
pub mod replicate;
pub mod shard;
pub mod sse;
pub mod store;
pub mod topic;
pub mod valkey;
pub mod ws;
