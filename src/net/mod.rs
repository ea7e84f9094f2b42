//! Client sockets: the per-shard listener and the connection loop.
//!
//! This is the only code that touches client sockets. It moves bytes between a socket and
//! the sans-IO HTTP codec, enforces the timeouts and the per-shard connection limit, and
//! writes each batch of pipelined responses with one syscall.
//!
//! - [`listener`]: accepts on the shard's `SO_REUSEPORT` socket, enforces the connection cap.
//! - [`connection`]: read → decode → handle → write, keep-alive and timeouts.
//! - [`deadline`]: the shard's connection timeouts, kept by one sweeper task.
//! - [`read`]: socket reads through one per-shard scratch buffer (no per-connection read room).
//! - [`sse`]: an event stream: registration, catch-ups, the writer loop.
//! - [`websocket`]: a `/ws` session: client frames in, commands, catch-ups, the writer loop.

pub mod connection;
pub mod deadline;
pub mod listener;
pub mod read;
pub mod sse;
pub mod websocket;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The whole API.
    Api,
    /// Only `GET /metrics` (the optional `metrics.listen` address, e.g. for a scrape network
    /// that must not reach the API).
    MetricsOnly,
}
