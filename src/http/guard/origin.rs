//! The `Origin` of a browser request and what it may do: CORS (preflight answers and the
//! headers on actual responses) and the same-origin rule.
//!
//! A browser names the page that makes a request in `Origin` on every cross-origin request,
//! on every POST, and on WebSocket handshakes; other clients send none. An origin is allowed
//! when `security.allowed_origins` lists it (exactly, after both are put in normal form) or
//! lists `*`, and same-origin when its host and port are the request's `Host` (a page the
//! relay's own name serves, e.g. behind a reverse proxy that serves the app too).
//!
//! Owns: classifying the `Origin` header, the preflight's method and header rules, the CORS
//! header values. Does not own: when a foreign origin is refused (`guard`).

use crate::config::{default_port, normalize_origin, split_host_port, Config};
use crate::http::codec::Request;
use crate::http::error::ApiError;

/// What a preflight may ask for: every method the API (and the auth endpoints) use.
pub const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// The request headers a cross-origin page may send: credentials, JSON bodies, idempotent
/// publishes, and an event stream's resume point. The CORS-safelisted ones (`Accept`,
/// `Accept-Language`, `Content-Language`) need no permission but are accepted if asked for.
pub const ALLOW_HEADERS: &str =
    "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-API-Key";
/// Ten minutes, as the Python relay: a page does not repeat the preflight for every publish,
/// and a narrowed allow-list reaches browsers soon. (Chromium caps it at two hours anyway.)
pub const MAX_AGE: &str = "600";
/// Response headers a cross-origin page may read besides the safelisted ones: how long to wait
/// after a 429 or 503.
pub const EXPOSE_HEADERS: &str = "Retry-After";

const SAFELISTED_HEADERS: [&str; 3] = ["accept", "accept-language", "content-language"];

/// The request's `Origin`, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` header: not a browser (or a same-origin GET, which browsers send without).
    Absent,
    /// In `security.allowed_origins` (`listed`), or allowed by its `*`; the header's value,
    /// to echo.
    Allowed { origin: String, listed: bool },
    /// Not listed, but the same host and port as `Host` (a port left out is the scheme's
    /// default); the header's value.
    SameOrigin(String),
    /// Anything else, including `null` and values that are not origins.
    Foreign,
}

/// The allowed origins, in normal form.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    any: bool,
    allowed: Vec<String>,
}

impl OriginPolicy {
    pub fn new(config: &Config) -> OriginPolicy {
        let allowed = &config.security.allowed_origins;
        OriginPolicy {
            any: allowed.iter().any(|o| o == "*"),
            allowed: allowed.iter().filter(|o| *o != "*").cloned().collect(),
        }
    }

    pub fn check(&self, request: &Request) -> OriginCheck {
        let Some(value) = request.header("origin") else {
            return OriginCheck::Absent;
        };
        // Header values are visible ASCII (the decoder refuses control bytes); anything else is
        // no origin.
        let Some(origin) = std::str::from_utf8(value)
            .ok()
            .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        else {
            return OriginCheck::Foreign;
        };
        let Ok(normal) = normalize_origin(origin) else {
            return OriginCheck::Foreign;
        };
        if normal == "*" {
            return OriginCheck::Foreign;
        }
        let listed = self.allowed.contains(&normal);
        if self.any || listed {
            return OriginCheck::Allowed {
                origin: origin.to_owned(),
                listed,
            };
        }
        if same_origin(&normal, request.header("host")) {
            return OriginCheck::SameOrigin(origin.to_owned());
        }
        OriginCheck::Foreign
    }
}

/// Whether `origin` (normal form) names the host and port of `host` (the `Host` header); a
/// `Host` without a port means the origin's scheme's default port.
fn same_origin(origin: &str, host: Option<&[u8]>) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let Some((origin_host, origin_port)) = split_host_port(authority) else {
        return false;
    };
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return false;
    };
    let Some((host, port)) = split_host_port(host.trim()) else {
        return false;
    };
    let default = default_port(scheme);
    host.eq_ignore_ascii_case(origin_host) && port.or(default) == origin_port.or(default)
}

/// Checks what a preflight (`OPTIONS` with `Access-Control-Request-Method`) asks for: the
/// method and every header named must be allowed.
pub fn check_preflight(request: &Request) -> Result<(), ApiError> {
    let method = request
        .header("access-control-request-method")
        .map(<[u8]>::trim_ascii)
        .unwrap_or_default();
    let method_ok = ALLOW_METHODS
        .split(", ")
        .any(|allowed| allowed.as_bytes() == method);
    if !method_ok {
        return Err(not_allowed(format!(
            "the method {} is not allowed cross-origin; allowed: {ALLOW_METHODS}",
            String::from_utf8_lossy(method)
        )));
    }
    for name in request
        .header_values("access-control-request-headers")
        .flat_map(|value| value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|name| !name.is_empty())
    {
        let allowed = ALLOW_HEADERS
            .split(", ")
            .chain(SAFELISTED_HEADERS)
            .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(name));
        if !allowed {
            return Err(not_allowed(format!(
                "the request header {} is not allowed cross-origin; allowed: {ALLOW_HEADERS}",
                String::from_utf8_lossy(name)
            )));
        }
    }
    Ok(())
}

fn not_allowed(message: String) -> ApiError {
    ApiError::new(403, "CORS_NOT_ALLOWED", message)
}

/// The refusal of a request from a page whose origin may not do what it asks.
pub fn origin_not_allowed(what: &str) -> ApiError {
    ApiError::new(
        403,
        "ORIGIN_NOT_ALLOWED",
        format!(
            "{what} is not allowed from this page's origin: it is not in \
             security.allowed_origins and not the relay's own"
        ),
    )
}

/// The CORS headers a response carries: none, or those allowing the request's origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cors {
    /// The `Origin` value to echo in `Access-Control-Allow-Origin`.
    allow_origin: Option<String>,
    /// `Access-Control-Allow-Credentials: true`: the page may send its cookies (an
    /// `EventSource` authenticates with the `pulsar_token` cookie). Only for an origin listed
    /// by name, never through `*`: a wildcard with credentials would let any site act with a
    /// visitor's cookie.
    credentials: bool,
}

impl Cors {
    pub fn none() -> Cors {
        Cors::default()
    }

    /// The headers for an actual response to a request from `origin`: only a listed origin
    /// needs them (a same-origin page reads its answers without).
    pub fn for_origin(origin: &OriginCheck) -> Cors {
        match origin {
            OriginCheck::Allowed { origin, listed } => Cors {
                allow_origin: Some(origin.clone()),
                credentials: *listed,
            },
            _ => Cors::none(),
        }
    }

    /// The headers for a preflight from `origin` (allowed or same-origin).
    pub fn for_preflight(origin: &OriginCheck) -> Cors {
        match origin {
            OriginCheck::Allowed { origin, listed } => Cors {
                allow_origin: Some(origin.clone()),
                credentials: *listed,
            },
            OriginCheck::SameOrigin(origin) => Cors {
                allow_origin: Some(origin.clone()),
                credentials: true,
            },
            _ => Cors::none(),
        }
    }

    pub fn allow_origin(&self) -> Option<&str> {
        self.allow_origin.as_deref()
    }

    /// The headers of an actual response (not a preflight).
    pub fn response_headers(&self) -> Vec<(&'static str, &str)> {
        match &self.allow_origin {
            Some(origin) => {
                let mut headers = vec![
                    ("Access-Control-Allow-Origin", origin.as_str()),
                    ("Access-Control-Expose-Headers", EXPOSE_HEADERS),
                    ("Vary", "Origin"),
                ];
                if self.credentials {
                    headers.push(("Access-Control-Allow-Credentials", "true"));
                }
                headers
            }
            None => Vec::new(),
        }
    }

    /// The headers of a successful preflight answer.
    pub fn preflight_headers(&self) -> Vec<(&'static str, &str)> {
        let mut headers = Vec::with_capacity(5);
        if let Some(origin) = &self.allow_origin {
            headers.push(("Access-Control-Allow-Origin", origin.as_str()));
            if self.credentials {
                headers.push(("Access-Control-Allow-Credentials", "true"));
            }
        }
        headers.extend([
            ("Access-Control-Allow-Methods", ALLOW_METHODS),
            ("Access-Control-Allow-Headers", ALLOW_HEADERS),
            ("Access-Control-Max-Age", MAX_AGE),
            ("Vary", "Origin"),
        ]);
        headers
    }
}
