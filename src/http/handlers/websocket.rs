//! `GET /ws`: the opening handshake of a WebSocket session, as an HTTP endpoint.
//!
//! [`accept`] checks the upgrade request (sans-IO rules in [`crate::ws::handshake`]) and
//! produces the 101 response, choosing the `bearer` subprotocol when offered, as the Python
//! relay's clients expect. The session itself runs in [`crate::net::websocket`].

use crate::auth::Principal;
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::shard::Shard;
use crate::ws::handshake::{self, UpgradeRequest};

/// What the session needs from the upgrade.
#[derive(Debug, Clone)]
pub struct WsUpgrade {
    pub protocol: Option<&'static str>,
    /// Who opened the session (checked before the 101): its topics are in its namespace.
    pub principal: Principal,
}

/// Validates an upgrade request; returns the session parameters and the 101 response.
pub fn accept(
    _shard: &Shard,
    request: &Request,
    principal: Principal,
) -> Result<(WsUpgrade, Vec<u8>), ApiError> {
    match handshake::accept(&upgrade_request(request)) {
        Ok(accepted) => Ok((
            WsUpgrade {
                protocol: accepted.protocol,
                principal,
            },
            accepted.response,
        )),
        Err(e) => {
            let mut error = ApiError::new(e.status(), e.code(), e.message());
            error.headers = e.response_headers();
            Err(error)
        }
    }
}

/// The headers of `request` the opening handshake looks at. Public so the fuzz targets check
/// the handshake on the requests the HTTP decoder produces, as [`accept`] does.
pub fn upgrade_request(request: &Request) -> UpgradeRequest<'_> {
    UpgradeRequest {
        method_get: request.method() == crate::http::codec::Method::Get,
        version_minor: request.version_minor(),
        connection: request.header("connection"),
        upgrade: request.header("upgrade"),
        sec_websocket_key: request.header("sec-websocket-key"),
        sec_websocket_version: request.header("sec-websocket-version"),
        sec_websocket_protocol: request.header("sec-websocket-protocol"),
    }
}
