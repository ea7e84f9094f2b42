//! Client sockets: the per-shard listener and the connection loop.
//!
//! This is the only code that touches client sockets. It moves bytes between a socket and
//! the sans-IO HTTP codec, enforces the timeouts and the per-shard connection limit, and
//! writes each batch of pipelined responses with one syscall.
//!
//! - [`listener`]: accepts on the shard's `SO_REUSEPORT` socket, enforces the connection cap.
//! - [`connection`]: read → decode → handle → write, keep-alive and timeouts.

pub mod connection;
pub mod listener;
