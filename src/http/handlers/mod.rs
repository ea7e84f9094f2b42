//! The API endpoints: a decoded request in, a response appended to the connection's output.
//!
//! [`handle`] routes the request, has the [`guard`] screen it, runs the
//! endpoint and renders either its [`Reply`] or its [`ApiError`]. Endpoints are grouped by resource:
//! - [`publish`]: `POST /api/v1/messages`, `POST /api/v1/messages/bulk` and their body parsing;
//! - [`topics`]: history pages, topic stats and listing, trim, delete;
//! - [`health`]: `/health` and `/ready`;
//! - [`poll`]: the long-poll endpoints (parsing, the JSON answer);
//! - [`events`]: the event-stream request (the stream runs in [`crate::net::sse`]);
//! - [`websocket`]: the `GET /ws` upgrade (the session runs in [`crate::net::websocket`]).

pub mod auth;
mod bulk_body;
pub mod events;
pub mod groups;
pub mod health;
pub mod poll;
pub mod publish;
pub mod topics;
pub mod websocket;

use std::net::IpAddr;
use std::time::Instant;

use bytes::BytesMut;

use crate::auth::{Permission, Principal};
use crate::sse::SseRequest;
use websocket::WsUpgrade;

use super::codec::{Method, Request};
use super::error::ApiError;
use super::guard::{self, Cors, Verdict};
use super::response::{write_json_error, write_response, ResponseHead};
use super::router::{self, Route};
use crate::shard::Shard;

/// A successful response: status and JSON body (empty for 204).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body,
        }
    }
    pub fn no_content() -> Reply {
        Reply::json(204, Vec::new())
    }
}

/// What the connection does after a request.
pub enum Outcome {
    /// The response is in the output buffer; keep the connection (`true`) or close it.
    Respond {
        keep_alive: bool,
    },
    /// The connection leaves HTTP request/response: it becomes an event stream (whose head
    /// carries the CORS headers) or (the 101 response already in the output buffer) a
    /// WebSocket.
    EventStream(SseRequest, Cors),
    WebSocket(WsUpgrade),
}

/// Handles one request from `peer`, appending its response to `out`. On the API surface the
/// [`guard`] screens it first (rate limits, `Host`, `Origin`, CORS
/// preflights), and every state change must then be JSON.
pub async fn handle(
    shard: &Shard,
    request: Request,
    out: &mut BytesMut,
    surface: crate::net::Surface,
    peer: IpAddr,
) -> Outcome {
    // Streams and upgrades leave the request/response cycle; everything else answers below.
    let route = match router::route(request.method(), request.path()) {
        Ok(route) if surface == crate::net::Surface::MetricsOnly && route != Route::Metrics => {
            Err(ApiError::not_found("this address serves only /metrics"))
        }
        other => other,
    };
    let preflight = request.method() == Method::Options
        && request.header("access-control-request-method").is_some();
    let label = match &route {
        _ if preflight => "cors_preflight",
        Ok(route) => route.label(),
        Err(_) => "unknown",
    };
    let cors = if surface == crate::net::Surface::Api {
        // The principal is not known yet: its bucket is checked once authentication names it.
        let screened = shard.guard.screen(&request, peer, None, Instant::now());
        if let Some(scope) = screened.limited {
            shard.metrics.rate_limited(scope);
        }
        match screened.verdict {
            Verdict::Pass => screened.cors,
            Verdict::Preflight => {
                shard.metrics.http_request(label, 204);
                let headers = screened.cors.preflight_headers();
                return respond(shard, &request, Ok(Reply::no_content()), &headers, out);
            }
            Verdict::Refuse(error) => {
                shard.metrics.http_request(label, error.status);
                let headers = screened.cors.response_headers();
                return respond(shard, &request, Err(error), &headers, out);
            }
        }
    } else {
        Cors::none()
    };
    // Who is asking, once per request, for every route that needs to know (all but health,
    // readiness, metrics and the endpoints whose credential is in the body); then that
    // principal's rate limit.
    let principal = match &route {
        Ok(route) if needs_principal(route) => {
            let token = crate::auth::credential::find(|name| request.header(name));
            let refused = match shard.auth.authenticate(token).await {
                Ok(principal) => match principal
                    .user_id()
                    .map(|id| shard.guard.check_principal(id, Instant::now()))
                {
                    Some(Err(wait)) => {
                        shard.metrics.rate_limited(guard::Scope::Principal);
                        Err(guard::rate_limited(guard::Scope::Principal, wait))
                    }
                    _ => Ok(principal),
                },
                Err(e) => {
                    shard.metrics.auth_failure(e.reason());
                    Err(ApiError::from(e))
                }
            };
            match refused {
                Ok(principal) => Some(principal),
                Err(error) => {
                    shard.metrics.http_request(label, error.status);
                    let headers = cors.response_headers();
                    return respond(shard, &request, Err(error), &headers, out);
                }
            }
        }
        _ => None,
    };
    let result = match route {
        Ok(Route::Events(topic)) => {
            let principal = principal.unwrap_or_else(Principal::open);
            match events::parse(
                &request,
                topic,
                shard.config.longpoll.max_topics,
                shard.config.api.max_topic_name_len,
            )
            .and_then(|sse| {
                principal.require(Permission::Read)?;
                Ok(sse.in_namespace_of(&principal)?)
            }) {
                Ok(sse) => {
                    shard.metrics.http_request(label, 200);
                    return Outcome::EventStream(sse, cors);
                }
                Err(e) => Err(e),
            }
        }
        Ok(Route::WebSocket) => {
            let principal = principal.unwrap_or_else(Principal::open);
            match principal
                .require(Permission::Read)
                .map_err(ApiError::from)
                .and_then(|()| websocket::accept(shard, &request, principal))
            {
                Ok((upgrade, response)) => {
                    shard.metrics.http_request(label, 101);
                    out.extend_from_slice(&response);
                    return Outcome::WebSocket(upgrade);
                }
                Err(e) => Err(e),
            }
        }
        Ok(route) => match guard::require_json_body(&request) {
            Ok(()) => dispatch(shard, route, &request, principal.as_ref()).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    shard.metrics.http_request(
        label,
        match &result {
            Ok(reply) => reply.status,
            Err(e) => e.status,
        },
    );
    if let Err(e) = &result {
        // A principal without the permission (the entrance already counted bad tokens), or a
        // failed login.
        match (e.code, label) {
            ("FORBIDDEN", _) => shard.metrics.auth_failure("forbidden"),
            ("UNAUTHORIZED", "auth_login" | "auth_refresh") => {
                shard.metrics.auth_failure("login_failed")
            }
            _ => {}
        }
    }
    respond(shard, &request, result, &cors.response_headers(), out)
}

/// Appends the answer to `out`, with `cors` (CORS headers, possibly none) after the fixed
/// headers.
fn respond(
    shard: &Shard,
    request: &Request,
    result: Result<Reply, ApiError>,
    cors: &[(&str, &str)],
    out: &mut BytesMut,
) -> Outcome {
    let keep_alive = request.keep_alive();
    let head_only = request.method() == Method::Head;
    // An HTTP/1.0 client keeps the connection only if told so explicitly (ab -k relies on it).
    let connection_header: &[(&str, &str)] = if keep_alive && request.version_minor() == 0 {
        &[("Connection", "keep-alive")]
    } else {
        &[]
    };
    shard.with_date(|date| match result {
        Ok(reply) => {
            // Without CORS headers (every non-browser request) no list is built.
            let joined: Vec<(&str, &str)>;
            let extra_headers = if cors.is_empty() {
                connection_header
            } else {
                joined = [connection_header, cors].concat();
                &joined
            };
            write_response(
                out,
                date,
                &ResponseHead {
                    status: reply.status,
                    content_type: reply.content_type,
                    extra_headers,
                    keep_alive,
                    head_only,
                },
                &reply.body,
            )
        }
        Err(error) => {
            let retry_after;
            let mut extra: Vec<(&str, &str)> = connection_header.to_vec();
            if let Some(secs) = error.retry_after {
                retry_after = secs.to_string();
                extra.push(("Retry-After", &retry_after));
            }
            extra.extend_from_slice(error.headers);
            extra.extend_from_slice(cors);
            if error.status == 405 {
                extra.push(("Allow", router::allow_header(request.path())));
            }
            if error.status == 500 {
                tracing::error!(path = %request.path().escape_debug(), "internal error");
            }
            write_json_error(
                out,
                date,
                error.status,
                error.code,
                &error.message,
                keep_alive,
                head_only,
                &extra,
            )
        }
    });
    Outcome::Respond { keep_alive }
}

/// Whether `route` acts for someone (and so needs [`Auth::authenticate`]'s answer).
///
/// [`Auth::authenticate`]: crate::auth::Auth::authenticate
fn needs_principal(route: &Route) -> bool {
    match route {
        Route::Health | Route::Ready | Route::Metrics => false,
        Route::Auth(route) => !route.is_public(),
        _ => true,
    }
}

async fn dispatch(
    shard: &Shard,
    route: Route,
    request: &Request,
    principal: Option<&Principal>,
) -> Result<Reply, ApiError> {
    let open = Principal::open();
    let who = principal.unwrap_or(&open);
    match route {
        Route::Publish => publish::publish_one(shard, request, who).await,
        Route::PublishBulk => publish::publish_bulk(shard, request, who).await,
        Route::ListTopics => topics::list(shard, who).await,
        Route::CreateTopic => topics::create(shard, request, who).await,
        Route::TopicStats(topic) => topics::stats(shard, &topic, request.query(), who).await,
        Route::DeleteTopic(topic) => topics::delete(shard, &topic, request.query(), who).await,
        Route::History(topic) => topics::history(shard, &topic, request.query(), who).await,
        Route::Trim(topic) => topics::trim(shard, &topic, request, who).await,
        Route::Groups(topic, action) => groups::handle(shard, &topic, action, request, who).await,
        Route::Health => health::health(shard).await,
        Route::Ready => Ok(health::ready(shard).await),
        Route::Auth(route) => auth::handle(shard, route, request, principal).await,
        Route::Poll => {
            who.require(Permission::Read)?;
            let poll = poll::parse_poll_body(
                request.body(),
                &shard.config.longpoll,
                shard.config.api.max_topic_name_len,
            )?;
            poll::poll(shard, poll.in_namespace_of(who)?).await
        }
        Route::PollGet => {
            who.require(Permission::Read)?;
            let poll = poll::parse_poll_query(
                request.query(),
                &shard.config.longpoll,
                shard.config.api.max_topic_name_len,
            )?;
            poll::poll(shard, poll.in_namespace_of(who)?).await
        }
        Route::Metrics => {
            let snapshots = shard.gather_snapshots().await;
            let text = crate::metrics::render(&snapshots, env!("CARGO_PKG_VERSION"));
            Ok(Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: text.into_bytes(),
            })
        }
        Route::Stats => {
            who.require(Permission::Admin)?;
            health::stats(shard).await
        }
        Route::PollStats => {
            who.require(Permission::Admin)?;
            health::poll_stats(shard).await
        }
        // Answered in `handle` before dispatch.
        Route::Events(_) | Route::WebSocket => Err(ApiError::internal()),
    }
}

/// The built-in API limits, for unit tests of body and query parsing.
#[cfg(test)]
pub(crate) fn default_api_limits() -> crate::config::ApiConfig {
    crate::config::built_in().api
}

/// `serde_json`'s message for a body that does not match the expected shape, made into a 400.
pub fn bad_json(e: serde_json::Error) -> ApiError {
    ApiError::invalid_request(format!("invalid JSON body: {e}"))
}
