//! Method + path → [`Route`]; unknown paths are 404, known paths with another method 405.
//!
//! Hand-matched on path segments rather than a routing crate: the API has eight shapes, and
//! matching them this way allocates only the decoded topic name.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use super::codec::Method;
use super::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Publish,
    PublishBulk,
    ListTopics,
    TopicStats(String),
    DeleteTopic(String),
    History(String),
    Trim(String),
    Health,
    Ready,
    /// `POST /messages/poll` (the Python relay's long-poll).
    Poll,
    /// `GET /api/v1/poll`.
    PollGet,
    /// `GET /api/v1/topics/{topic}/events` (`Some`) or `GET /api/v1/events` (`None`).
    Events(Option<String>),
    /// `GET /ws`.
    WebSocket,
    /// `GET /metrics` (Prometheus).
    Metrics,
    /// `GET /api/v1/stats` (per-shard introspection).
    Stats,
    /// `GET /messages/poll/stats` (the Python relay's long-poll stats).
    PollStats,
    /// `POST /api/v1/topics`: create a topic in the caller's namespace.
    CreateTopic,
    /// The Python relay's `/auth/*` endpoints.
    Auth(AuthRoute),
    /// `/api/v1/topics/{topic}/groups[/{group}[/…]]`: consumer groups (work queues).
    Groups(String, GroupAction),
}

/// What a consumer-group request does (the group's name where the path has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAction {
    List,
    Create,
    Show(String),
    Delete(String),
    Reset(String),
    Poll(String),
    Ack(String),
    Nack(String),
}

impl GroupAction {
    pub fn group(&self) -> Option<&str> {
        match self {
            GroupAction::List | GroupAction::Create => None,
            GroupAction::Show(g)
            | GroupAction::Delete(g)
            | GroupAction::Reset(g)
            | GroupAction::Poll(g)
            | GroupAction::Ack(g)
            | GroupAction::Nack(g) => Some(g),
        }
    }
}

/// `/auth/...`: tokens, sessions and user management.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRoute {
    Login,
    Refresh,
    Revoke,
    Logout,
    Me,
    Sessions,
    DeleteSession(String),
    Register,
    Users,
    UserStats,
    UpdateUser(String),
    DeleteUser(String),
    /// `POST /auth/users/{id}/disconnect`: end the user's sessions now.
    DisconnectUser(String),
    /// `POST /auth/api-keys`: a static key for a producer.
    CreateApiKey,
    /// `GET /auth/api-keys`: the caller's keys (an admin's: `?user_id=`'s).
    ApiKeys,
    /// `DELETE /auth/api-keys/{id}`.
    RevokeApiKey(String),
}

impl AuthRoute {
    /// Whether it changes users, tokens, sessions or keys (every shard's cache must go).
    pub fn changes_state(&self) -> bool {
        !matches!(
            self,
            AuthRoute::Login
                | AuthRoute::Me
                | AuthRoute::Sessions
                | AuthRoute::Users
                | AuthRoute::UserStats
                | AuthRoute::ApiKeys
        )
    }

    /// Reachable without an access token (the credential is in the body).
    pub fn is_public(&self) -> bool {
        matches!(
            self,
            AuthRoute::Login | AuthRoute::Refresh | AuthRoute::Revoke
        )
    }
}

impl Route {
    /// The `route` label of `relay_http_requests_total`: the route's shape, never the topic
    /// (bounded cardinality).
    pub fn label(&self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::PublishBulk => "publish_bulk",
            Route::ListTopics => "topics",
            Route::TopicStats(_) => "topic",
            Route::DeleteTopic(_) => "topic_delete",
            Route::History(_) => "history",
            Route::Trim(_) => "trim",
            Route::Health => "health",
            Route::Ready => "ready",
            Route::Poll | Route::PollGet => "poll",
            Route::Events(_) => "events",
            Route::WebSocket => "ws",
            Route::Metrics => "metrics",
            Route::Stats => "stats",
            Route::PollStats => "poll_stats",
            Route::CreateTopic => "topic_create",
            Route::Groups(_, action) => match action {
                GroupAction::Poll(_) => "group_poll",
                GroupAction::Ack(_) | GroupAction::Nack(_) => "group_ack",
                _ => "groups",
            },
            Route::Auth(route) => match route {
                AuthRoute::Login => "auth_login",
                AuthRoute::Refresh => "auth_refresh",
                AuthRoute::Revoke => "auth_revoke",
                AuthRoute::Logout => "auth_logout",
                AuthRoute::Me => "auth_me",
                AuthRoute::Sessions | AuthRoute::DeleteSession(_) => "auth_sessions",
                AuthRoute::Register => "auth_register",
                AuthRoute::Users
                | AuthRoute::UserStats
                | AuthRoute::UpdateUser(_)
                | AuthRoute::DeleteUser(_)
                | AuthRoute::DisconnectUser(_) => "auth_users",
                AuthRoute::CreateApiKey | AuthRoute::ApiKeys | AuthRoute::RevokeApiKey(_) => {
                    "auth_api_keys"
                }
            },
        }
    }
}

/// The most segments a route has (`/api/v1/topics/{topic}/groups/{group}/…`).
const MAX_SEGMENTS: usize = 8;

/// Where `path` leads with `method`. `HEAD` is accepted wherever `GET` is.
pub fn route(method: Method, path: &str) -> Result<Route, ApiError> {
    let get = matches!(method, Method::Get | Method::Head);
    // The segments, in a fixed array: no route has more than `MAX_SEGMENTS`, so a longer path
    // is no route, and routing allocates nothing.
    let mut buffer = [""; MAX_SEGMENTS];
    let mut count = 0;
    // A one-char set, not `split('/')`: the char searcher sets up a memchr per segment,
    // which cost more than walking these few bytes.
    for segment in path
        .strip_prefix('/')
        .ok_or_else(|| not_found(path))?
        .split(['/'])
    {
        *buffer.get_mut(count).ok_or_else(|| not_found(path))? = segment;
        count += 1;
    }
    let segments = &buffer[..count];
    let allowed = |ok: bool, allow: &'static str, route: Route| {
        if ok {
            Ok(route)
        } else {
            Err(ApiError::method_not_allowed(format!(
                "{} is not allowed here; allowed: {allow}",
                method_name(method)
            )))
        }
    };
    match segments {
        ["health"] => allowed(get, "GET, HEAD", Route::Health),
        ["ready"] => allowed(get, "GET, HEAD", Route::Ready),
        ["api", "v1", "messages"] => allowed(method == Method::Post, "POST", Route::Publish),
        ["api", "v1", "messages", "bulk"] => {
            allowed(method == Method::Post, "POST", Route::PublishBulk)
        }
        ["api", "v1", "topics"] if method == Method::Post => Ok(Route::CreateTopic),
        ["api", "v1", "topics"] => allowed(get, "GET, HEAD, POST", Route::ListTopics),
        ["auth", "login"] => allowed(
            method == Method::Post,
            "POST",
            Route::Auth(AuthRoute::Login),
        ),
        ["auth", "token", "refresh"] => allowed(
            method == Method::Post,
            "POST",
            Route::Auth(AuthRoute::Refresh),
        ),
        ["auth", "token", "revoke"] => allowed(
            method == Method::Post,
            "POST",
            Route::Auth(AuthRoute::Revoke),
        ),
        ["auth", "logout"] => allowed(
            method == Method::Post,
            "POST",
            Route::Auth(AuthRoute::Logout),
        ),
        ["auth", "me"] => allowed(get, "GET, HEAD", Route::Auth(AuthRoute::Me)),
        ["auth", "sessions"] => allowed(get, "GET, HEAD", Route::Auth(AuthRoute::Sessions)),
        ["auth", "sessions", jti] if !jti.is_empty() => allowed(
            method == Method::Delete,
            "DELETE",
            Route::Auth(AuthRoute::DeleteSession(decode_segment(jti)?)),
        ),
        ["auth", "register"] => allowed(
            method == Method::Post,
            "POST",
            Route::Auth(AuthRoute::Register),
        ),
        ["auth", "users"] => allowed(get, "GET, HEAD", Route::Auth(AuthRoute::Users)),
        ["auth", "api-keys"] => match method {
            Method::Post => Ok(Route::Auth(AuthRoute::CreateApiKey)),
            _ => allowed(get, "GET, HEAD, POST", Route::Auth(AuthRoute::ApiKeys)),
        },
        ["auth", "api-keys", id] if !id.is_empty() => allowed(
            method == Method::Delete,
            "DELETE",
            Route::Auth(AuthRoute::RevokeApiKey(decode_segment(id)?)),
        ),
        ["auth", "users", "stats"] => allowed(get, "GET, HEAD", Route::Auth(AuthRoute::UserStats)),
        ["auth", "users", id, "disconnect"] if !id.is_empty() => allowed(
            method == Method::Post,
            "POST",
            Route::Auth(AuthRoute::DisconnectUser(decode_segment(id)?)),
        ),
        ["auth", "users", id] if !id.is_empty() => {
            let id = decode_segment(id)?;
            match method {
                Method::Patch => Ok(Route::Auth(AuthRoute::UpdateUser(id))),
                Method::Delete => Ok(Route::Auth(AuthRoute::DeleteUser(id))),
                _ => allowed(false, "PATCH, DELETE", Route::Health),
            }
        }
        ["messages", "poll"] => allowed(method == Method::Post, "POST", Route::Poll),
        ["api", "v1", "poll"] => allowed(method == Method::Get, "GET", Route::PollGet),
        ["api", "v1", "events"] => allowed(method == Method::Get, "GET", Route::Events(None)),
        ["ws"] => allowed(method == Method::Get, "GET", Route::WebSocket),
        ["metrics"] => allowed(get, "GET, HEAD", Route::Metrics),
        ["api", "v1", "stats"] => allowed(get, "GET, HEAD", Route::Stats),
        ["messages", "poll", "stats"] => allowed(get, "GET, HEAD", Route::PollStats),
        ["api", "v1", "topics", topic, "events"] if !topic.is_empty() => allowed(
            method == Method::Get,
            "GET",
            Route::Events(Some(decode_segment(topic)?)),
        ),
        ["api", "v1", "topics", topic] if !topic.is_empty() => {
            let topic = decode_segment(topic)?;
            match method {
                Method::Get | Method::Head => Ok(Route::TopicStats(topic)),
                Method::Delete => Ok(Route::DeleteTopic(topic)),
                _ => allowed(false, "GET, HEAD, DELETE", Route::Health),
            }
        }
        ["api", "v1", "topics", topic, "messages"] if !topic.is_empty() => {
            allowed(get, "GET, HEAD", Route::History(decode_segment(topic)?))
        }
        ["api", "v1", "topics", topic, "groups"] if !topic.is_empty() => {
            let topic = decode_segment(topic)?;
            match method {
                Method::Post => Ok(Route::Groups(topic, GroupAction::Create)),
                _ => allowed(
                    get,
                    "GET, HEAD, POST",
                    Route::Groups(topic, GroupAction::List),
                ),
            }
        }
        ["api", "v1", "topics", topic, "groups", group]
            if !topic.is_empty() && !group.is_empty() =>
        {
            let (topic, group) = (decode_segment(topic)?, decode_segment(group)?);
            match method {
                Method::Get | Method::Head => Ok(Route::Groups(topic, GroupAction::Show(group))),
                Method::Delete => Ok(Route::Groups(topic, GroupAction::Delete(group))),
                _ => allowed(false, "GET, HEAD, DELETE", Route::Health),
            }
        }
        ["api", "v1", "topics", topic, "groups", group, verb]
            if !topic.is_empty()
                && !group.is_empty()
                && matches!(*verb, "reset" | "poll" | "ack" | "nack") =>
        {
            let (topic, group) = (decode_segment(topic)?, decode_segment(group)?);
            let action = match *verb {
                "reset" => GroupAction::Reset(group),
                "poll" => GroupAction::Poll(group),
                "ack" => GroupAction::Ack(group),
                _ => GroupAction::Nack(group),
            };
            allowed(method == Method::Post, "POST", Route::Groups(topic, action))
        }
        ["api", "v1", "topics", topic, "trim"] if !topic.is_empty() => allowed(
            method == Method::Post,
            "POST",
            Route::Trim(decode_segment(topic)?),
        ),
        _ => Err(not_found(path)),
    }
}

/// The `Allow` header value for a 405 on `path` (the message names it too).
pub fn allow_header(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "messages"] | ["api", "v1", "messages", "bulk"] | ["messages", "poll"] => {
            "POST"
        }
        ["api", "v1", "topics"] => "GET, HEAD, POST",
        ["auth", "login"] | ["auth", "token", _] | ["auth", "logout"] | ["auth", "register"] => {
            "POST"
        }
        ["auth", "sessions", _] => "DELETE",
        ["auth", "users", _, "disconnect"] => "POST",
        ["auth", "users", "stats"] => "GET, HEAD",
        ["auth", "users", _] => "PATCH, DELETE",
        ["api", "v1", "poll"] | ["api", "v1", "events"] | ["ws"] => "GET",
        ["api", "v1", "topics", _, "events"] => "GET",
        ["api", "v1", "topics", _, "trim"] => "POST",
        ["api", "v1", "topics", _, "groups"] => "GET, HEAD, POST",
        ["api", "v1", "topics", _, "groups", _] => "GET, HEAD, DELETE",
        ["api", "v1", "topics", _, "groups", _, _] => "POST",
        ["api", "v1", "topics", _] => "GET, HEAD, DELETE",
        _ => "GET, HEAD",
    }
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Patch => "PATCH",
        Method::Options => "OPTIONS",
        Method::Other => "this method",
    }
}

fn not_found(path: &str) -> ApiError {
    // The path is the client's; it is JSON-escaped in the body, never put in a header.
    ApiError::not_found(format!("no route for {}", truncate(path, 200)))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn decode_segment(segment: &str) -> Result<String, ApiError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| ApiError::invalid_topic("topic in the path is not valid UTF-8"))
}

/// Appends the topics of a comma-separated query value (`topics=a,b`), skipping empty items.
pub fn split_topics(value: &str, out: &mut Vec<String>) {
    out.extend(
        value
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    );
}

/// Iterates `name=value` pairs of a query string, percent-decoded (`+` as space).
pub fn query_pairs(query: Option<&str>) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_every_endpoint() {
        assert_eq!(route(Method::Post, "/api/v1/messages"), Ok(Route::Publish));
        assert_eq!(
            route(Method::Post, "/api/v1/messages/bulk"),
            Ok(Route::PublishBulk)
        );
        assert_eq!(route(Method::Get, "/api/v1/topics"), Ok(Route::ListTopics));
        assert_eq!(
            route(Method::Head, "/api/v1/topics/a"),
            Ok(Route::TopicStats("a".into()))
        );
        assert_eq!(
            route(Method::Delete, "/api/v1/topics/a"),
            Ok(Route::DeleteTopic("a".into()))
        );
        assert_eq!(
            route(Method::Get, "/api/v1/topics/a/messages"),
            Ok(Route::History("a".into()))
        );
        assert_eq!(
            route(Method::Post, "/api/v1/topics/a/trim"),
            Ok(Route::Trim("a".into()))
        );
        assert_eq!(route(Method::Get, "/health"), Ok(Route::Health));
        assert_eq!(route(Method::Get, "/ready"), Ok(Route::Ready));
        assert_eq!(route(Method::Post, "/messages/poll"), Ok(Route::Poll));
        assert_eq!(route(Method::Get, "/api/v1/poll"), Ok(Route::PollGet));
        assert_eq!(
            route(Method::Get, "/api/v1/events"),
            Ok(Route::Events(None))
        );
        assert_eq!(
            route(Method::Get, "/api/v1/topics/a/events"),
            Ok(Route::Events(Some("a".into())))
        );
        assert_eq!(route(Method::Get, "/ws"), Ok(Route::WebSocket));
        assert_eq!(route(Method::Post, "/ws").map_err(|e| e.status), Err(405));
        let group = |action| Ok(Route::Groups("a".into(), action));
        assert_eq!(
            route(Method::Get, "/api/v1/topics/a/groups"),
            group(GroupAction::List)
        );
        assert_eq!(
            route(Method::Post, "/api/v1/topics/a/groups"),
            group(GroupAction::Create)
        );
        assert_eq!(
            route(Method::Get, "/api/v1/topics/a/groups/g"),
            group(GroupAction::Show("g".into()))
        );
        assert_eq!(
            route(Method::Delete, "/api/v1/topics/a/groups/g"),
            group(GroupAction::Delete("g".into()))
        );
        for (verb, action) in [
            ("reset", GroupAction::Reset("g".into())),
            ("poll", GroupAction::Poll("g".into())),
            ("ack", GroupAction::Ack("g".into())),
            ("nack", GroupAction::Nack("g".into())),
        ] {
            let path = format!("/api/v1/topics/a/groups/g/{verb}");
            assert_eq!(route(Method::Post, &path), group(action));
            assert_eq!(route(Method::Get, &path).map_err(|e| e.status), Err(405));
        }
        assert_eq!(
            route(Method::Post, "/api/v1/topics/a/groups/g/other").map_err(|e| e.status),
            Err(404)
        );
    }

    #[test]
    fn wrong_method_is_405_and_unknown_path_404() {
        assert_eq!(
            route(Method::Get, "/api/v1/messages").map_err(|e| e.status),
            Err(405)
        );
        assert_eq!(
            route(Method::Put, "/api/v1/topics/a").map_err(|e| e.status),
            Err(405)
        );
        assert_eq!(route(Method::Get, "/nope").map_err(|e| e.status), Err(404));
        assert_eq!(
            route(Method::Get, "/api/v1/topics/").map_err(|e| e.status),
            Err(404)
        );
        assert_eq!(allow_header("/api/v1/topics/a"), "GET, HEAD, DELETE");
    }

    #[test]
    fn topic_segment_is_percent_decoded() {
        assert_eq!(
            route(Method::Get, "/api/v1/topics/a%2Fb"),
            Ok(Route::TopicStats("a/b".into()))
        );
        assert_eq!(
            route(Method::Get, "/api/v1/topics/%FF").map_err(|e| e.code),
            Err("INVALID_TOPIC")
        );
    }
}
