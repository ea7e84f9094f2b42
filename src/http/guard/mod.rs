//! The checks every API request passes before it reaches an endpoint: rate limits, the
//! `Host` allow-list, the `Origin` rules with CORS, and the JSON-only rule for state changes.
//! One place, called by [`crate::http::handlers::handle`] for every transport's entrance
//! (HTTP API, long-poll, `/ws` upgrades, event streams), so no endpoint can forget one.
//!
//! In order, for a request that is not `/health`, `/ready` or `/metrics` (probes and
//! scrapers reach the relay by IP address, and they are never limited):
//! 1. rate limits ([`rate`]): per client address ([`client`]), per principal (once
//!    authentication names one), and per address on `POST /auth/login`: 429 with
//!    `Retry-After`;
//! 2. `Host` ([`host`]): 400 `INVALID_HOST` for a name the relay does not answer to (DNS
//!    rebinding);
//! 3. a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//!    answered here: 204 with the allowed methods and headers, or 403;
//! 4. a request whose `Origin` is neither allowed nor the relay's own is refused with 403
//!    `ORIGIN_NOT_ALLOWED` when it could change state (any method but GET, HEAD and OPTIONS)
//!    or opens a stream (`/ws`, event streams): the browser would otherwise send it (a
//!    cross-site form POST, a WebSocket, an `EventSource`) and only hide the answer.
//!
//! After routing, [`require_json_body`] refuses with 415 a POST that is not declared JSON (a
//! page can send `text/plain` or a form cross-site without a preflight; JSON it cannot), and
//! a PUT, PATCH or DELETE whose body is declared anything else. `POST /auth/login` is form-
//! encoded by design (the Python relay's clients send it so) and is protected by step 4.
//!
//! Owns: the decisions (sans-IO: requests, addresses and instants in, verdicts out) and the
//! shard's rate-limit state. Does not own: writing the answers (`handlers`), authentication.

pub mod client;
pub mod host;
pub mod origin;
pub mod rate;

use std::cell::RefCell;
use std::net::IpAddr;
use std::time::Instant;

use crate::config::{Config, IpNet};
use crate::http::codec::{Method, Request};
use crate::http::error::ApiError;
pub use origin::Cors;
use origin::{OriginCheck, OriginPolicy};
pub use rate::{RetryAfter, Scope};

/// The login endpoint, limited per address on its own (`rate_limit.login_*`), and the one
/// POST that may carry a form.
pub const LOGIN_PATH: &str = "/auth/login";

/// What the guard decided before routing.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Route the request.
    Pass,
    /// A CORS preflight the guard accepts: answer 204 with [`Cors::preflight_headers`].
    Preflight,
    /// Refused: answer this error.
    Refuse(ApiError),
}

/// A verdict and the CORS headers whatever answers the request carries.
#[derive(Debug)]
pub struct Screened {
    pub verdict: Verdict,
    pub cors: Cors,
    /// Set when a rate limit refused the request, for `relay_rate_limited_total`.
    pub limited: Option<Scope>,
}

/// One shard's guard: the policies from the configuration and the shard's rate-limit buckets.
pub struct Guard {
    hosts: host::HostPolicy,
    origins: OriginPolicy,
    trusted_proxies: Vec<IpNet>,
    /// Per-shard, touched only by this shard's executor (see [`rate`] for why not shared).
    limiter: RefCell<rate::RateLimiter>,
}

impl Guard {
    pub fn new(config: &Config) -> Guard {
        Guard {
            hosts: host::HostPolicy::new(config),
            origins: OriginPolicy::new(config),
            trusted_proxies: config.security.trusted_proxies.clone(),
            limiter: RefCell::new(rate::RateLimiter::new(&config.rate_limit)),
        }
    }

    /// Screens `request`, received from `peer`, by `principal` when authentication has named
    /// one (`None` for anonymous requests).
    pub fn screen(
        &self,
        request: &Request,
        peer: IpAddr,
        principal: Option<&str>,
        now: Instant,
    ) -> Screened {
        let pass = |verdict, cors| Screened {
            verdict,
            cors,
            limited: None,
        };
        let path = request.path();
        if is_operational(path) {
            return pass(Verdict::Pass, Cors::none());
        }
        let origin = self.origins.check(request);
        let cors = Cors::for_origin(&origin);

        let client = client::client_addr(peer, request, &self.trusted_proxies);
        let login = request.method() == Method::Post && path == LOGIN_PATH;
        let limited = self
            .limiter
            .borrow_mut()
            .check(client, login, principal, now);
        if let Err((scope, retry_after)) = limited {
            return Screened {
                verdict: Verdict::Refuse(rate_limited(scope, retry_after)),
                cors,
                limited: Some(scope),
            };
        }

        if !self.hosts.allows(request.header("host")) {
            let error = ApiError::new(
                400,
                "INVALID_HOST",
                "the Host header names a host this relay does not answer to \
                 (security.trusted_hosts)",
            );
            return pass(Verdict::Refuse(error), cors);
        }

        let preflight = request.method() == Method::Options
            && request.header("access-control-request-method").is_some()
            && origin != OriginCheck::Absent;
        if preflight {
            if origin == OriginCheck::Foreign {
                return pass(
                    Verdict::Refuse(origin::origin_not_allowed("a cross-origin request")),
                    Cors::none(),
                );
            }
            return match origin::check_preflight(request) {
                Ok(()) => pass(Verdict::Preflight, Cors::for_preflight(&origin)),
                Err(error) => pass(Verdict::Refuse(error), Cors::none()),
            };
        }

        if origin == OriginCheck::Foreign {
            if opens_stream(path) {
                return pass(
                    Verdict::Refuse(origin::origin_not_allowed("a WebSocket or event stream")),
                    cors,
                );
            }
            if changes_state(request.method()) {
                return pass(
                    Verdict::Refuse(origin::origin_not_allowed("a request that changes state")),
                    cors,
                );
            }
        }
        pass(Verdict::Pass, cors)
    }

    /// The principal scope alone, for a caller that learns the principal after screening (an
    /// in-band token refresh on a stream): on `Err`, answer [`rate_limited`] with
    /// [`Scope::Principal`] and count it in `relay_rate_limited_total`, as `handle` does.
    pub fn check_principal(&self, principal_id: &str, now: Instant) -> Result<(), RetryAfter> {
        self.limiter.borrow_mut().check_principal(principal_id, now)
    }

    /// Buckets held per scope (address, principal, login).
    pub fn tracked_buckets(&self) -> [usize; 3] {
        self.limiter.borrow().tracked()
    }
}

/// The answer to a request over the `scope` limit: 429 `RATE_LIMITED` with `Retry-After`.
pub fn rate_limited(scope: Scope, RetryAfter(secs): RetryAfter) -> ApiError {
    ApiError {
        retry_after: Some(secs),
        ..ApiError::new(
            429,
            "RATE_LIMITED",
            format!(
                "too many requests ({} limit); retry after {secs} s",
                scope.as_str()
            ),
        )
    }
}

/// Health, readiness and metrics: never limited, answered whatever the `Host` (probes and
/// scrapers address the relay by IP, and these carry no message data).
fn is_operational(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// `GET /ws` and the event streams: a browser opens them cross-origin without a preflight
/// (WebSocket is not subject to CORS at all, and an `EventSource` request is a simple GET),
/// and what they deliver would go to the page.
fn opens_stream(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    matches!(
        segments.as_slice(),
        ["", "ws"] | ["", "api", "v1", "events"] | ["", "api", "v1", "topics", _, "events"]
    )
}

/// Every method but the safe ones (RFC 9110 §9.2.1); unknown methods count as unsafe.
fn changes_state(method: Method) -> bool {
    !matches!(method, Method::Get | Method::Head | Method::Options)
}

/// The media-type rule for state changes: a POST must be declared JSON (`application/json`
/// or a `+json` type, parameters ignored), except the form-encoded login; a PUT, PATCH or
/// DELETE may come without a body and type (a browser preflights those methods anyway), but
/// a body or type it declares must be JSON.
pub fn require_json_body(request: &Request) -> Result<(), ApiError> {
    let required = match request.method() {
        // A bodiless POST with an `Authorization` or `X-API-Key` header (`/auth/logout`, an
        // admin's disconnect) cannot be a cross-site simple request: those headers need a
        // preflight.
        Method::Post => {
            request.path() != LOGIN_PATH
                && !(request.body().is_empty()
                    && (request.header("authorization").is_some()
                        || request.header("x-api-key").is_some()))
        }
        Method::Put | Method::Patch | Method::Delete => {
            !request.body().is_empty() || request.content_type().is_some()
        }
        _ => false,
    };
    if !required {
        return Ok(());
    }
    let media = request
        .content_type()
        .and_then(|value| value.split(|&b| b == b';').next())
        .map(<[u8]>::trim_ascii)
        .unwrap_or_default();
    let is_json = media.eq_ignore_ascii_case(b"application/json")
        || (media.len() > 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(
            "a request that changes state must send JSON with Content-Type: application/json \
             (a cross-site page can send a form or text without asking; JSON it cannot)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;

    use super::*;
    use crate::config::{BucketConfig, Rate};
    use crate::http::codec::{Event, Limits, RequestDecoder};

    fn request(text: &str) -> Request {
        let mut buf = BytesMut::from(text.replace('\n', "\r\n").as_bytes());
        match RequestDecoder::new(Limits::default()).decode(&mut buf) {
            Ok(Some(Event::Request(r))) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn guard(edit: impl FnOnce(&mut Config)) -> Guard {
        let mut config = crate::config::built_in();
        config.security.allowed_origins = vec!["https://app.example".to_owned()];
        edit(&mut config);
        Guard::new(&config)
    }

    fn peer() -> IpAddr {
        "10.0.0.1".parse().expect("literal")
    }

    fn screen(guard: &Guard, text: &str) -> Screened {
        guard.screen(&request(text), peer(), None, Instant::now())
    }

    fn code(screened: &Screened) -> Option<&'static str> {
        match &screened.verdict {
            Verdict::Refuse(e) => Some(e.code),
            _ => None,
        }
    }

    #[test]
    fn host_is_checked_except_on_probes() {
        let g = guard(|_| {});
        assert_eq!(
            code(&screen(
                &g,
                "GET /api/v1/topics HTTP/1.1\nHost: localhost:8080\n\n"
            )),
            None
        );
        let refused = screen(&g, "GET /api/v1/topics HTTP/1.1\nHost: evil.example\n\n");
        assert_eq!(code(&refused), Some("INVALID_HOST"));
        let Verdict::Refuse(e) = refused.verdict else {
            unreachable!()
        };
        assert_eq!(e.status, 400);
        for probe in ["/health", "/ready", "/metrics"] {
            let s = screen(
                &g,
                &format!("GET {probe} HTTP/1.1\nHost: 10.1.2.3:8080\n\n"),
            );
            assert_eq!(s.verdict, Verdict::Pass, "{probe}");
        }
    }

    #[test]
    fn streams_refuse_foreign_origins_only() {
        let g = guard(|_| {});
        for path in ["/ws", "/api/v1/events?topics=a", "/api/v1/topics/a/events"] {
            let with = |origin: &str| {
                screen(
                    &g,
                    &format!("GET {path} HTTP/1.1\nHost: localhost:8080\n{origin}\n"),
                )
            };
            assert_eq!(with("").verdict, Verdict::Pass, "{path}: no Origin");
            let allowed = with("Origin: https://app.example\n");
            assert_eq!(allowed.verdict, Verdict::Pass, "{path}: allowed");
            assert_eq!(allowed.cors.allow_origin(), Some("https://app.example"));
            assert_eq!(
                with("Origin: http://localhost:8080\n").verdict,
                Verdict::Pass,
                "{path}: same origin"
            );
            for foreign in [
                "https://evil.example",
                "http://localhost:9999",
                "https://localhost",
                "null",
                "https://app.example.evil",
            ] {
                let s = with(&format!("Origin: {foreign}\n"));
                assert_eq!(code(&s), Some("ORIGIN_NOT_ALLOWED"), "{path}: {foreign}");
            }
        }
        // Other GETs pass from anywhere: the browser hides the answer from a foreign page.
        let s = screen(
            &g,
            "GET /api/v1/topics HTTP/1.1\nHost: localhost\nOrigin: https://evil.example\n\n",
        );
        assert_eq!(s.verdict, Verdict::Pass);
        assert_eq!(s.cors, Cors::none());
        let any = guard(|c| c.security.allowed_origins = vec!["*".to_owned()]);
        let s = screen(
            &any,
            "GET /ws HTTP/1.1\nHost: localhost\nOrigin: https://x.example\n\n",
        );
        assert_eq!(s.verdict, Verdict::Pass);
        assert_eq!(s.cors.allow_origin(), Some("https://x.example"));
    }

    #[test]
    fn same_origin_follows_default_ports() {
        let g = guard(|c| c.listen = "0.0.0.0:443".parse().expect("literal"));
        let post = |host: &str, origin: &str| {
            code(&screen(
                &g,
                &format!(
                    "POST /api/v1/messages HTTP/1.1\nHost: {host}\nOrigin: {origin}\n\
                     Content-Length: 0\n\n"
                ),
            ))
        };
        assert_eq!(post("relay.example", "https://relay.example"), None);
        assert_eq!(post("relay.example:443", "https://relay.example"), None);
        assert_eq!(post("relay.example", "http://relay.example:80"), None);
        assert_eq!(post("Relay.Example", "https://relay.example"), None);
        assert_eq!(post("[::1]:8080", "http://[::1]:8080"), None);
        assert_eq!(
            post("relay.example:8443", "https://relay.example"),
            Some("ORIGIN_NOT_ALLOWED")
        );
        assert_eq!(
            post("relay.example", "http://relay.example:8080"),
            Some("ORIGIN_NOT_ALLOWED")
        );
        assert_eq!(
            post("relay.example", "https://other.example"),
            Some("ORIGIN_NOT_ALLOWED")
        );
    }

    #[test]
    fn state_changes_from_foreign_origins_are_refused_login_included() {
        let g = guard(|_| {});
        for (method, path) in [
            ("POST", "/api/v1/messages"),
            ("POST", "/api/v1/topics/a/trim"),
            ("DELETE", "/api/v1/topics/a"),
            ("POST", "/messages/poll"),
            ("PUT", "/api/v1/topics/a"),
            ("PATCH", "/auth/users/1"),
            ("POST", LOGIN_PATH),
        ] {
            let at = |origin: &str| {
                screen(
                    &g,
                    &format!(
                        "{method} {path} HTTP/1.1\nHost: localhost\n{origin}Content-Length: 0\n\n"
                    ),
                )
            };
            assert_eq!(
                code(&at("Origin: https://evil.example\n")),
                Some("ORIGIN_NOT_ALLOWED"),
                "{method} {path}"
            );
            assert_eq!(at("").verdict, Verdict::Pass, "{method} {path}: no Origin");
            assert_eq!(at("Origin: https://app.example\n").verdict, Verdict::Pass);
            assert_eq!(at("Origin: http://localhost\n").verdict, Verdict::Pass);
        }
    }

    #[test]
    fn preflights_are_answered_for_allowed_origins_methods_and_headers() {
        let g = guard(|_| {});
        let preflight = |origin: &str, method: &str, headers: &str| {
            screen(
                &g,
                &format!(
                    "OPTIONS /api/v1/messages HTTP/1.1\nHost: localhost:8080\nOrigin: {origin}\n\
                     Access-Control-Request-Method: {method}\n{headers}\n"
                ),
            )
        };
        let ok = preflight(
            "https://app.example",
            "POST",
            "Access-Control-Request-Headers: content-type,idempotency-key, authorization\n",
        );
        assert_eq!(ok.verdict, Verdict::Preflight);
        let headers = ok.cors.preflight_headers();
        assert!(headers.contains(&("Access-Control-Allow-Origin", "https://app.example")));
        assert!(headers.contains(&("Access-Control-Max-Age", "600")));
        assert!(headers.contains(&("Vary", "Origin")));
        assert!(headers.contains(&(
            "Access-Control-Allow-Methods",
            "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        )));
        for method in ["GET", "PUT", "PATCH", "DELETE"] {
            assert_eq!(
                preflight("https://app.example", method, "").verdict,
                Verdict::Preflight
            );
        }
        assert_eq!(
            preflight(
                "https://app.example",
                "GET",
                "Access-Control-Request-Headers: last-event-id, accept\n"
            )
            .verdict,
            Verdict::Preflight
        );
        assert_eq!(
            code(&preflight("https://evil.example", "POST", "")),
            Some("ORIGIN_NOT_ALLOWED")
        );
        assert_eq!(
            code(&preflight("https://app.example", "TRACE", "")),
            Some("CORS_NOT_ALLOWED")
        );
        assert_eq!(
            code(&preflight(
                "https://app.example",
                "POST",
                "Access-Control-Request-Headers: x-evil\n"
            )),
            Some("CORS_NOT_ALLOWED")
        );
        // Not a preflight: left to the router (405).
        let plain = screen(&g, "OPTIONS /api/v1/messages HTTP/1.1\nHost: localhost\n\n");
        assert_eq!(plain.verdict, Verdict::Pass);
        // A preflight to a host the relay does not answer is refused as any request.
        let s = screen(
            &g,
            "OPTIONS /ws HTTP/1.1\nHost: evil.example\nOrigin: https://app.example\n\
             Access-Control-Request-Method: GET\n\n",
        );
        assert_eq!(code(&s), Some("INVALID_HOST"));
    }

    #[test]
    fn login_json_rule_and_the_other_posts() {
        let check = |text: &str| require_json_body(&request(text)).map_err(|e| (e.status, e.code));
        let unsupported = Err((415, "UNSUPPORTED_MEDIA_TYPE"));
        assert_eq!(
            check("POST /api/v1/messages HTTP/1.1\nHost: h\nContent-Length: 2\n\n{}"),
            unsupported
        );
        assert_eq!(
            check("POST /api/v1/topics/a/trim HTTP/1.1\nHost: h\nContent-Length: 0\n\n"),
            unsupported
        );
        assert_eq!(
            check("POST /api/v1/messages HTTP/1.1\nHost: h\nContent-Type: text/plain\nContent-Length: 2\n\n{}"),
            unsupported
        );
        assert_eq!(
            check("POST /api/v1/messages HTTP/1.1\nHost: h\nContent-Type: application/x-www-form-urlencoded\nContent-Length: 3\n\na=b"),
            unsupported
        );
        assert_eq!(
            check("POST /api/v1/messages HTTP/1.1\nHost: h\nContent-Type: Application/JSON; charset=utf-8\nContent-Length: 2\n\n{}"),
            Ok(())
        );
        assert_eq!(
            check("POST /x HTTP/1.1\nHost: h\nContent-Type: application/problem+json\nContent-Length: 2\n\n{}"),
            Ok(())
        );
        // The login is a form, by design.
        assert_eq!(
            check("POST /auth/login HTTP/1.1\nHost: h\nContent-Type: application/x-www-form-urlencoded\nContent-Length: 3\n\na=b"),
            Ok(())
        );
        // DELETE without a body needs no type; with a declared non-JSON body it is refused.
        assert_eq!(
            check("DELETE /api/v1/topics/a HTTP/1.1\nHost: h\n\n"),
            Ok(())
        );
        assert_eq!(
            check("DELETE /api/v1/topics/a HTTP/1.1\nHost: h\nContent-Type: text/plain\nContent-Length: 1\n\nx"),
            unsupported
        );
        assert_eq!(
            check("PUT /api/v1/topics/a HTTP/1.1\nHost: h\nContent-Length: 2\n\n{}"),
            unsupported
        );
        assert_eq!(check("GET /api/v1/topics HTTP/1.1\nHost: h\n\n"), Ok(()));
    }

    #[test]
    fn rate_limits_answer_429_with_retry_after_and_spare_probes() {
        let g = guard(|c| {
            c.rate_limit.exempt.clear();
            c.rate_limit.address = Some(BucketConfig {
                rate: Rate::per_second(1),
                burst: 2,
            });
        });
        let t0 = Instant::now();
        let get = request(
            "GET /api/v1/topics HTTP/1.1\nHost: localhost\nOrigin: https://app.example\n\n",
        );
        assert_eq!(g.screen(&get, peer(), None, t0).verdict, Verdict::Pass);
        assert_eq!(g.screen(&get, peer(), None, t0).verdict, Verdict::Pass);
        let limited = g.screen(&get, peer(), None, t0);
        assert_eq!(limited.limited, Some(Scope::Address));
        assert_eq!(
            limited.cors.allow_origin(),
            Some("https://app.example"),
            "readable"
        );
        let Verdict::Refuse(e) = limited.verdict else {
            panic!("not refused")
        };
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (429, "RATE_LIMITED", Some(1))
        );
        for probe in ["/health", "/ready", "/metrics"] {
            let r = request(&format!("GET {probe} HTTP/1.1\nHost: localhost\n\n"));
            assert_eq!(g.screen(&r, peer(), None, t0).verdict, Verdict::Pass);
        }
        let later = t0 + Duration::from_secs(1);
        assert_eq!(g.screen(&get, peer(), None, later).verdict, Verdict::Pass);
        // The principal scope, through `screen`'s argument, applies to exempt addresses too.
        let g = guard(|c| {
            c.rate_limit.principal = Some(BucketConfig {
                rate: Rate::per_minute(1),
                burst: 1,
            })
        });
        let loopback: IpAddr = "127.0.0.1".parse().expect("literal");
        assert_eq!(
            g.screen(&get, loopback, Some("user-7"), t0).verdict,
            Verdict::Pass
        );
        assert_eq!(
            g.screen(&get, loopback, Some("user-7"), t0).limited,
            Some(Scope::Principal)
        );
        assert_eq!(
            g.screen(&get, loopback, Some("user-8"), t0).verdict,
            Verdict::Pass
        );
        assert_eq!(g.check_principal("user-8", t0), Err(RetryAfter(60)));
    }

    #[test]
    fn login_is_limited_per_address_on_its_own() {
        let g = guard(|c| c.rate_limit.exempt.clear());
        let t0 = Instant::now();
        let login = request(
            "POST /auth/login HTTP/1.1\nHost: localhost\n\
             Content-Type: application/x-www-form-urlencoded\nContent-Length: 3\n\na=b",
        );
        for i in 0..10 {
            assert_eq!(
                g.screen(&login, peer(), None, t0).verdict,
                Verdict::Pass,
                "login {i}"
            );
        }
        let s = g.screen(&login, peer(), None, t0);
        assert_eq!(s.limited, Some(Scope::Login));
        let Verdict::Refuse(e) = s.verdict else {
            panic!("not refused")
        };
        assert_eq!(e.retry_after, Some(6), "10/min");
        let other = request("GET /api/v1/topics HTTP/1.1\nHost: localhost\n\n");
        assert_eq!(g.screen(&other, peer(), None, t0).verdict, Verdict::Pass);
        // Loopback is exempt by default.
        let g = guard(|_| {});
        let loopback: IpAddr = "127.0.0.1".parse().expect("literal");
        for _ in 0..100 {
            assert_eq!(g.screen(&login, loopback, None, t0).verdict, Verdict::Pass);
        }
    }

    #[test]
    fn the_client_behind_a_trusted_proxy_is_limited_not_the_proxy() {
        let g = guard(|c| {
            c.security.trusted_proxies = vec![IpNet::parse("10.0.0.0/8").expect("literal")];
            c.rate_limit.address = Some(BucketConfig {
                rate: Rate::per_minute(1),
                burst: 1,
            });
        });
        let t0 = Instant::now();
        let from = |client: &str| {
            request(&format!(
                "GET /api/v1/topics HTTP/1.1\nHost: localhost\nX-Forwarded-For: {client}\n\n"
            ))
        };
        assert_eq!(
            g.screen(&from("203.0.113.1"), peer(), None, t0).verdict,
            Verdict::Pass
        );
        assert_eq!(
            g.screen(&from("203.0.113.2"), peer(), None, t0).verdict,
            Verdict::Pass
        );
        assert_eq!(
            g.screen(&from("203.0.113.1"), peer(), None, t0).limited,
            Some(Scope::Address)
        );
        assert_eq!(g.tracked_buckets()[0], 2);
    }
}
