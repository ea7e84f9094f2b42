//! HTTP/1.1: sans-IO decoding and encoding, routing, error bodies, and the API handlers.
//!
//! Nothing here touches a socket: [`codec`] turns bytes into requests, [`response`] turns
//! responses into bytes, and the connection loop in `net` moves the bytes. Handlers take a
//! decoded request and the shard, and append the response to the connection's output buffer.
//!
//! - [`codec`]: request head parsing (httparse) and body framing (Content-Length, chunked),
//!   limits, `Expect: 100-continue`.
//! - [`response`]: status line, headers, `Date` cache, JSON error bodies.
//! - [`router`]: method + path → [`router::Route`], 404/405, query strings.
//! - [`error`]: [`error::ApiError`], the one type every client-visible error becomes.
//! - [`guard`]: what every request passes before an endpoint: rate limits, the `Host`
//!   allow-list, `Origin` rules and CORS, JSON-only state changes.
//! - [`json`]: arrays and objects in request bodies, refused at the first entry past a limit.
//! - [`handlers`]: the API endpoints.

pub mod codec;
pub mod error;
pub mod guard;
pub mod handlers;
pub mod json;
pub mod response;
pub mod router;
