//! The server side of the RFC 6455 opening handshake: validates an upgrade request whose
//! headers our HTTP layer already parsed, and produces the exact `101 Switching Protocols`
//! response bytes plus the selected subprotocol.
//!
//! It does not parse HTTP, route, authenticate or write error responses: on failure it returns
//! a [`HandshakeError`] that says which status, code, message and extra headers the HTTP layer
//! should answer with. The accept key is tungstenite's [`derive_accept_key`] (SHA-1 + base64).

use tungstenite::handshake::derive_accept_key;

/// The headers of a `GET /ws` request that the handshake looks at, as the HTTP layer parsed
/// them. Values are raw header bytes (surrounding whitespace is tolerated); a header sent more
/// than once arrives joined with `", "`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpgradeRequest<'a> {
    pub method_get: bool,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0; only 1.1 may upgrade (RFC 6455 §4.1).
    pub version_minor: u8,
    pub connection: Option<&'a [u8]>,
    pub upgrade: Option<&'a [u8]>,
    pub sec_websocket_key: Option<&'a [u8]>,
    pub sec_websocket_version: Option<&'a [u8]>,
    /// Comma-separated list of offered subprotocols, possibly several headers joined.
    pub sec_websocket_protocol: Option<&'a [u8]>,
}

/// Why an upgrade request was refused; the HTTP layer answers with [`status`](Self::status),
/// the JSON error body from [`code`](Self::code)/[`message`](Self::message), and the
/// [`response_headers`](Self::response_headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a WebSocket upgrade must use GET")]
    NotGet,
    #[error("a WebSocket upgrade requires HTTP/1.1")]
    NotHttp11,
    #[error("a WebSocket upgrade needs `Connection: Upgrade` and `Upgrade: websocket`")]
    MissingUpgrade,
    #[error("missing or malformed Sec-WebSocket-Key (must be base64 of 16 bytes)")]
    BadKey,
    #[error("unsupported or missing Sec-WebSocket-Version; this server speaks version 13")]
    UnsupportedVersion,
}

impl HandshakeError {
    /// 426 for a version mismatch (RFC 6455 §4.2.2 step 4 lets the client retry with a version
    /// we announce), 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::UnsupportedVersion => 426,
            _ => 400,
        }
    }

    /// Machine-readable code, in the vocabulary of the relay's other HTTP errors.
    pub fn code(&self) -> &'static str {
        match self {
            HandshakeError::UnsupportedVersion => "UPGRADE_REQUIRED",
            _ => "INVALID_REQUEST",
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }

    /// Headers the error response must carry: the 426 names the version we do speak
    /// (RFC 6455 §4.4) so the client can retry with it.
    pub fn response_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            HandshakeError::UnsupportedVersion => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }
}

/// A validated upgrade: the complete response to write before switching the connection to
/// WebSocket framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `HTTP/1.1 101 Switching Protocols` with its headers and the terminating blank line.
    pub response: Vec<u8>,
    /// The subprotocol the response selected, if any (only ever `bearer`).
    pub protocol: Option<&'static str>,
}

/// The one subprotocol we select. Clients of the old Python relay offer `bearer` together with
/// `bearer.<token>` (a browser cannot set an `Authorization` header on a WebSocket); selecting
/// the token entry would echo a credential into a response header, so only the plain name is
/// ever answered.
const BEARER_PROTOCOL: &str = "bearer";

/// 129 bytes without a protocol line, 32 more with `Sec-WebSocket-Protocol: bearer`.
const MAX_RESPONSE_LEN: usize = 161;

/// Validates the request and returns the `101` response bytes, plus the selected subprotocol:
/// `bearer` if the client offered exactly that name, otherwise no `Sec-WebSocket-Protocol`
/// header at all (the client decides whether to go on without one).
///
/// Checks run in the order of the variants' severity: method, HTTP version, upgrade headers,
/// then the WebSocket version before the key, because a client speaking another version may
/// use another key format and should get the 426 that tells it what to speak.
pub fn accept(req: &UpgradeRequest) -> Result<Accepted, HandshakeError> {
    if !req.method_get {
        return Err(HandshakeError::NotGet);
    }
    if req.version_minor < 1 {
        return Err(HandshakeError::NotHttp11);
    }
    let connection_upgrade = req
        .connection
        .is_some_and(|v| has_token(v, |t| t.eq_ignore_ascii_case(b"upgrade")));
    let upgrade_websocket = req
        .upgrade
        .is_some_and(|v| has_token(v, |t| t.eq_ignore_ascii_case(b"websocket")));
    if !connection_upgrade || !upgrade_websocket {
        return Err(HandshakeError::MissingUpgrade);
    }
    if req.sec_websocket_version.map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = req
        .sec_websocket_key
        .map(<[u8]>::trim_ascii)
        .filter(|k| is_valid_key(k))
        .ok_or(HandshakeError::BadKey)?;

    let protocol = req
        .sec_websocket_protocol
        .filter(|v| has_token(v, |t| t == BEARER_PROTOCOL.as_bytes()))
        .map(|_| BEARER_PROTOCOL);

    let accept_key = derive_accept_key(key);
    // The longest response (with the protocol line) is 161 bytes: one exact allocation.
    let mut response = Vec::with_capacity(MAX_RESPONSE_LEN);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\n\
          Upgrade: websocket\r\n\
          Connection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    response.extend_from_slice(accept_key.as_bytes());
    response.extend_from_slice(b"\r\n");
    if let Some(protocol) = protocol {
        response.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        response.extend_from_slice(protocol.as_bytes());
        response.extend_from_slice(b"\r\n");
    }
    response.extend_from_slice(b"\r\n");
    Ok(Accepted { response, protocol })
}

/// A key is base64 of a 16-byte nonce: 22 alphabet characters and `==` (RFC 6455 §4.1).
/// Non-canonical trailing bits are tolerated: the accept hash is taken over the text anyway.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Whether the comma-separated list `value` has an element (whitespace-trimmed) matching.
fn has_token(value: &[u8], matches: impl Fn(&[u8]) -> bool) -> bool {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .any(matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";

    fn valid() -> UpgradeRequest<'static> {
        UpgradeRequest {
            method_get: true,
            version_minor: 1,
            connection: Some(b"Upgrade"),
            upgrade: Some(b"websocket"),
            sec_websocket_key: Some(RFC_KEY),
            sec_websocket_version: Some(b"13"),
            sec_websocket_protocol: None,
        }
    }

    #[test]
    fn rfc_example_key_gives_exact_response() {
        let accepted = accept(&valid()).expect("valid request");
        assert_eq!(
            accepted.response,
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              \r\n"
        );
        assert_eq!(accepted.protocol, None);
        assert_eq!(accepted.response.len(), MAX_RESPONSE_LEN - 32);
    }

    #[test]
    fn bearer_is_selected_and_the_token_entry_never_echoed() {
        let req = UpgradeRequest {
            sec_websocket_protocol: Some(b"bearer.c2VjcmV0LXRva2Vu, bearer"),
            ..valid()
        };
        let accepted = accept(&req).expect("valid request");
        assert_eq!(accepted.protocol, Some("bearer"));
        assert_eq!(
            accepted.response,
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              Sec-WebSocket-Protocol: bearer\r\n\
              \r\n"
        );
        assert!(!accepted.response.windows(6).any(|w| w == b"c2Vjcm"));
        assert_eq!(accepted.response.len(), MAX_RESPONSE_LEN);
    }

    #[test]
    fn other_or_token_only_protocols_get_no_protocol_header() {
        for offered in [
            &b"bearer.abc"[..],
            b"chat, superchat",
            b"Bearer",
            b"bearerx",
            b"",
        ] {
            let req = UpgradeRequest {
                sec_websocket_protocol: Some(offered),
                ..valid()
            };
            let accepted = accept(&req).expect("valid request");
            assert_eq!(accepted.protocol, None, "{offered:?}");
            assert_eq!(accepted.response.len(), MAX_RESPONSE_LEN - 32);
        }
    }

    #[test]
    fn header_lists_and_case_are_tolerated() {
        let req = UpgradeRequest {
            connection: Some(b"keep-alive, Upgrade"),
            upgrade: Some(b" WebSocket "),
            sec_websocket_key: Some(b" dGhlIHNhbXBsZSBub25jZQ== "),
            sec_websocket_version: Some(b" 13"),
            version_minor: 2,
            ..valid()
        };
        assert!(accept(&req).is_ok());
    }

    #[test]
    fn each_rejection_maps_to_its_status_and_code() {
        let cases: [(UpgradeRequest, HandshakeError); 11] = [
            (
                UpgradeRequest {
                    method_get: false,
                    ..valid()
                },
                HandshakeError::NotGet,
            ),
            (
                UpgradeRequest {
                    version_minor: 0,
                    ..valid()
                },
                HandshakeError::NotHttp11,
            ),
            (
                UpgradeRequest {
                    connection: None,
                    ..valid()
                },
                HandshakeError::MissingUpgrade,
            ),
            (
                UpgradeRequest {
                    connection: Some(b"keep-alive"),
                    ..valid()
                },
                HandshakeError::MissingUpgrade,
            ),
            (
                UpgradeRequest {
                    upgrade: Some(b"h2c"),
                    ..valid()
                },
                HandshakeError::MissingUpgrade,
            ),
            (
                UpgradeRequest {
                    sec_websocket_version: None,
                    ..valid()
                },
                HandshakeError::UnsupportedVersion,
            ),
            (
                UpgradeRequest {
                    sec_websocket_version: Some(b"8"),
                    sec_websocket_key: None,
                    ..valid()
                },
                HandshakeError::UnsupportedVersion,
            ),
            (
                UpgradeRequest {
                    sec_websocket_key: None,
                    ..valid()
                },
                HandshakeError::BadKey,
            ),
            (
                UpgradeRequest {
                    sec_websocket_key: Some(b"dGhlIHNhbXBsZSBub25jZQ"),
                    ..valid()
                },
                HandshakeError::BadKey,
            ),
            (
                UpgradeRequest {
                    sec_websocket_key: Some(b"dGhlIHNhbXBsZSBub25j*Q=="),
                    ..valid()
                },
                HandshakeError::BadKey,
            ),
            (
                UpgradeRequest {
                    // Two keys joined by the HTTP layer.
                    sec_websocket_key: Some(b"dGhlIHNhbXBsZSBub25jZQ==, dGhlIHNhbXBsZSBub25jZQ=="),
                    ..valid()
                },
                HandshakeError::BadKey,
            ),
        ];
        for (req, expected) in cases {
            let err = accept(&req).expect_err("must be rejected");
            assert_eq!(err, expected, "{req:?}");
            let (status, code, headers): (u16, &str, &[(&str, &str)]) = match expected {
                HandshakeError::UnsupportedVersion => {
                    (426, "UPGRADE_REQUIRED", &[("Sec-WebSocket-Version", "13")])
                }
                _ => (400, "INVALID_REQUEST", &[]),
            };
            assert_eq!(err.status(), status);
            assert_eq!(err.code(), code);
            assert_eq!(err.response_headers(), headers);
            assert!(!err.message().is_empty());
        }
    }
}
