//! Where a request carries its credential (an access token, an external token or an API
//! key), in order of preference:
//! 1. `Authorization: Bearer <token>` (the HTTP API, `pulsar-relay-client`, curl);
//! 2. `X-API-Key: <key>` (what producers configured with a static key commonly send);
//! 3. the WebSocket subprotocol pair `bearer, bearer.<token>` (the Python relay's clients:
//!    a browser cannot set headers on a WebSocket);
//! 4. the cookie `pulsar_token=<token>` (`EventSource`, which can neither).
//!
//! Sans-IO: header values in, the token's text out. Tokens are never logged.

/// The cookie an `EventSource` (or any browser page) authenticates with.
pub const COOKIE_NAME: &str = "pulsar_token";

/// The token of an `Authorization` header value with the `Bearer` scheme (any case).
pub fn from_authorization(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of a `Sec-WebSocket-Protocol` offer holding both `bearer` and `bearer.<token>`
/// (as the Python relay requires: the bare name is the one the server selects).
pub fn from_subprotocols(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let mut offered = value.split(',').map(str::trim);
    let mut bare = false;
    let mut token = None;
    for entry in offered.by_ref() {
        if entry == "bearer" {
            bare = true;
        } else if let Some(t) = entry.strip_prefix("bearer.") {
            if token.is_none() && !t.is_empty() {
                token = Some(t);
            }
        }
    }
    token.filter(|_| bare)
}

/// The `pulsar_token` cookie of a `Cookie` header value.
pub fn from_cookie(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    value.split(';').find_map(|pair| {
        let (name, token) = pair.trim().split_once('=')?;
        (name == COOKIE_NAME && !token.is_empty()).then_some(token.trim_matches('"'))
    })
}

/// The token of a request, by the headers a lookup gives (names lowercase).
pub fn find<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<&'a str> {
    if let Some(token) = header("authorization").and_then(from_authorization) {
        return Some(token);
    }
    if let Some(key) = header("x-api-key")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        return Some(key);
    }
    if let Some(token) = header("sec-websocket-protocol").and_then(from_subprotocols) {
        return Some(token);
    }
    header("cookie").and_then(from_cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_any_case_nothing_else() {
        assert_eq!(from_authorization(b"Bearer abc"), Some("abc"));
        assert_eq!(from_authorization(b"bearer  abc "), Some("abc"));
        assert_eq!(from_authorization(b"Basic abc"), None);
        assert_eq!(from_authorization(b"Bearer "), None);
        assert_eq!(from_authorization(b"Bearerabc"), None);
        assert_eq!(from_authorization(&[0xff, b' ', b'a']), None);
    }

    #[test]
    fn subprotocol_pair_needs_both_entries() {
        assert_eq!(from_subprotocols(b"bearer, bearer.abc"), Some("abc"));
        assert_eq!(from_subprotocols(b"bearer.abc,bearer"), Some("abc"));
        assert_eq!(from_subprotocols(b"bearer.abc"), None);
        assert_eq!(from_subprotocols(b"bearer"), None);
        assert_eq!(from_subprotocols(b"bearer, bearer."), None);
        assert_eq!(from_subprotocols(b"bearer, bearer.a, bearer.b"), Some("a"));
    }

    #[test]
    fn cookie_among_others() {
        assert_eq!(from_cookie(b"a=1; pulsar_token=abc; b=2"), Some("abc"));
        assert_eq!(from_cookie(b"pulsar_token=\"abc\""), Some("abc"));
        assert_eq!(from_cookie(b"xpulsar_token=abc"), None);
        assert_eq!(from_cookie(b"pulsar_token="), None);
    }

    #[test]
    fn header_before_subprotocol_before_cookie() {
        let headers = |auth: Option<&'static [u8]>| {
            move |name: &str| match name {
                "authorization" => auth,
                "sec-websocket-protocol" => Some(&b"bearer, bearer.ws"[..]),
                "cookie" => Some(&b"pulsar_token=cookie"[..]),
                _ => None,
            }
        };
        assert_eq!(find(headers(Some(b"Bearer h"))), Some("h"));
        assert_eq!(find(headers(None)), Some("ws"));
        assert_eq!(
            find(|n| (n == "cookie").then_some(&b"pulsar_token=c"[..])),
            Some("c")
        );
        assert_eq!(find(|_| None), None);
        assert_eq!(
            find(|n| (n == "x-api-key").then_some(&b" prk_a.b "[..])),
            Some("prk_a.b")
        );
    }
}
