//! `/auth/*`: the Python relay's token and user endpoints, with its request and response
//! shapes (`pulsar-relay-client` and its users' scripts depend on them).
//!
//! - `POST /auth/login` (form `username`, `password`, optional `grant_type=password`) →
//!   `{"access_token","token_type":"bearer","expires_in","refresh_token","refresh_token_secondary":null}`;
//! - `POST /auth/token/refresh` `{"refresh_token"}` → the same, with the token rotated;
//! - `POST /auth/token/revoke` `{"refresh_token","revoke_chain"?}` → 204 whatever the token;
//! - `POST /auth/logout` → 204, the access token deny-listed;
//! - `GET /auth/me`; `GET /auth/sessions`, `DELETE /auth/sessions/{jti}`;
//! - admin: `POST /auth/register` (201), `GET /auth/users`, `GET /auth/users/stats`,
//!   `PATCH /auth/users/{id}`, `DELETE /auth/users/{id}`, and ours,
//!   `POST /auth/users/{id}/disconnect` (the user's tokens so far stop working; open streams
//!   close within [`crate::auth::STREAM_RECHECK_EVERY`]);
//! - ours: `POST /auth/api-keys` `{"name","permissions","user_id"?}` → 201 with the key, shown
//!   once; `GET /auth/api-keys` (`?user_id=` for admins); `DELETE /auth/api-keys/{id}`.
//!
//! In `auth.mode: external` there are no users: only `GET /auth/me` answers (with what the
//! external token grants); the rest are 404.
//!
//! The logic lives in [`crate::auth`]; this module parses and renders.

use serde::Deserialize;
use serde_json::{json, Value};

use super::Reply;
use crate::auth::session::{split_refresh_token, LoginError, RefreshError, Tokens};
use crate::auth::store::{iso8601, ApiKeyRecord, User};
use crate::auth::{AuthError, CredentialKind, Grants, Permission, Permissions, Principal, Refusal};
use crate::http::codec::Request;
use crate::http::error::ApiError;
use crate::http::router::AuthRoute;
use crate::shard::Shard;

/// FastAPI's status for a body that does not validate, which the Python relay's clients see.
fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(422, "VALIDATION_ERROR", message)
}

fn json_reply(status: u16, value: &Value) -> Result<Reply, ApiError> {
    serde_json::to_vec(value)
        .map(|body| Reply::json(status, body))
        .map_err(|_| ApiError::internal())
}

fn tokens_reply(tokens: Tokens) -> Result<Reply, ApiError> {
    json_reply(
        200,
        &json!({
            "access_token": tokens.access_token,
            "token_type": "bearer",
            "expires_in": tokens.expires_in,
            "refresh_token": tokens.refresh_token,
            "refresh_token_secondary": null,
        }),
    )
}

/// The Python relay's `UserPublic`.
pub fn user_public(user: &User) -> Value {
    json!({
        "user_id": user.id,
        "username": user.username,
        "email": user.email,
        "is_active": user.active,
        "created_at": user.created_at,
        "permissions": user.permissions.names(),
        "owned_topics": user.owned_topics,
    })
}

fn is_form(request: &Request) -> bool {
    request.content_type().is_some_and(|value| {
        let media = value
            .split(|&b| b == b';')
            .next()
            .unwrap_or(&[])
            .trim_ascii();
        media.eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
    })
}

/// A JSON body (its media type was checked before routing, `guard::require_json_body`).
fn parse_json<'a, T: Deserialize<'a>>(request: &'a Request) -> Result<T, ApiError> {
    serde_json::from_slice(request.body())
        .map_err(|e| unprocessable(format!("invalid JSON body: {e}")))
}

/// Dispatches an `/auth/*` request; `principal` is `None` only for the public routes.
///
/// After a change to users, tokens or keys every shard of this relay drops its cache at once
/// (the one that made it already has), so the change applies to the next request on any
/// shard; other relays see it when they next read the generation (within a second).
pub async fn handle(
    shard: &Shard,
    route: AuthRoute,
    request: &Request,
    principal: Option<&Principal>,
) -> Result<Reply, ApiError> {
    let changes = route.changes_state();
    let result = handle_route(shard, route, request, principal).await;
    if changes && result.is_ok() && shard.shard_count() > 1 {
        shard
            .invoke_on_all(async |s: &Shard| s.auth.invalidate())
            .await;
    }
    result
}

async fn handle_route(
    shard: &Shard,
    route: AuthRoute,
    request: &Request,
    principal: Option<&Principal>,
) -> Result<Reply, ApiError> {
    if !shard.auth.enabled() {
        return Err(ApiError::not_found(
            "authentication is off on this relay (auth.mode: none)",
        ));
    }
    if !shard.auth.config.builtin() && route != AuthRoute::Me {
        return Err(ApiError::not_found(
            "this relay has no users of its own (auth.mode: external)",
        ));
    }
    let principal = match (route.is_public(), principal) {
        (true, _) => None,
        (false, Some(p)) => Some(p),
        (false, None) => return Err(AuthError::Unauthenticated(Refusal::Missing).into()),
    };
    // Users, sessions and keys are managed with a login token only: an API key or an external
    // token (whatever it grants, `admin` included) only asks who it is. Otherwise a leaked
    // key could change its owner's password or mint a login that outlives the key's
    // revocation, and an identity provider's `admin` claim would own every built-in user.
    if let Some(user) = principal.and_then(|p| p.user.as_ref()) {
        if user.credential != CredentialKind::BuiltinToken && route != AuthRoute::Me {
            return Err(ApiError::new(
                403,
                "FORBIDDEN",
                "users, sessions and API keys are managed with a login token, not an API key \
                 or an external token",
            ));
        }
    }
    let user_id = || {
        principal
            .and_then(Principal::user_id)
            .ok_or(ApiError::from(AuthError::Unauthenticated(Refusal::Missing)))
    };
    match route {
        AuthRoute::Login => login(shard, request).await,
        AuthRoute::Refresh => refresh(shard, request).await,
        AuthRoute::Revoke => revoke(shard, request).await,
        AuthRoute::Logout => {
            if let Some(user) = principal.and_then(|p| p.user.as_ref()) {
                if let Some(jti) = &user.token_id {
                    shard.auth.logout(jti, user.expires_at).await?;
                }
            }
            Ok(Reply::no_content())
        }
        AuthRoute::Me => match principal.and_then(|p| p.user.as_ref().map(|u| (p, u))) {
            Some((p, user)) if user.credential == CredentialKind::External => json_reply(
                200,
                &json!({
                    "user_id": user.user_id,
                    "username": user.username,
                    "permissions": p.grants.entries(),
                    "external": true,
                }),
            ),
            other => {
                let user = shard
                    .auth
                    .store
                    .user_by_id(user_id()?)
                    .await?
                    .ok_or(AuthError::Unauthenticated(Refusal::UnknownUser))?;
                let mut me = user_public(&user);
                // An API key answers for its owner, with what the key itself may do now.
                if let Some((p, user)) = other {
                    if let CredentialKind::ApiKey { key_id } = &user.credential {
                        me["api_key"] = json!({
                            "key_id": key_id,
                            "permissions": p.grants.entries(),
                        });
                    }
                }
                json_reply(200, &me)
            }
        },
        AuthRoute::Sessions => {
            let rows = shard.auth.sessions(user_id()?).await?;
            let sessions: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({
                        "jti": r.jti,
                        "issued_at": iso8601(r.issued_at),
                        "expires_at": iso8601(r.expires_at),
                        "last_used_at": r.last_used_at.map(iso8601),
                        "client_hint": r.client_hint,
                    })
                })
                .collect();
            json_reply(200, &Value::Array(sessions))
        }
        AuthRoute::DeleteSession(jti) => {
            if shard.auth.revoke_session(user_id()?, &jti).await? {
                Ok(Reply::no_content())
            } else {
                Err(ApiError::not_found("session not found"))
            }
        }
        AuthRoute::Register => {
            require_admin(principal)?;
            register(shard, request, principal).await
        }
        AuthRoute::Users => {
            require_admin(principal)?;
            let users = shard.auth.store.users().await?;
            json_reply(200, &Value::Array(users.iter().map(user_public).collect()))
        }
        AuthRoute::UserStats => {
            require_admin(principal)?;
            let users = shard.auth.store.users().await?;
            let active = users.iter().filter(|u| u.active).count();
            json_reply(
                200,
                &json!({"total_users": users.len(), "active_users": active}),
            )
        }
        AuthRoute::UpdateUser(id) => {
            require_admin(principal)?;
            let reply = update_user(shard, request, &id, user_id()?).await?;
            admin_action(principal, "update_user", &id);
            Ok(reply)
        }
        AuthRoute::DisconnectUser(id) => {
            require_admin(principal)?;
            if shard.auth.store.user_by_id(&id).await?.is_none() {
                return Err(ApiError::not_found(format!(
                    "User with ID '{id}' not found"
                )));
            }
            shard.auth.disconnect(&id).await?;
            Ok(Reply::no_content())
        }
        AuthRoute::DeleteUser(id) => {
            require_admin(principal)?;
            if id == user_id()? {
                return Err(ApiError::invalid_request(
                    "Cannot delete your own user account",
                ));
            }
            let user = shard
                .auth
                .store
                .user_by_id(&id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("User with ID '{id}' not found")))?;
            shard.auth.delete_user(&user).await?;
            admin_action(principal, "delete_user", &id);
            Ok(Reply::no_content())
        }
        AuthRoute::CreateApiKey => {
            let caller = key_manager(principal, user_id()?)?;
            create_api_key(shard, request, caller).await
        }
        AuthRoute::ApiKeys => {
            let caller = key_manager(principal, user_id()?)?;
            let owner = query_value(request.query(), "user_id");
            let owner = match owner.as_deref() {
                Some(other) if other != caller.user_id => {
                    caller.principal.require(Permission::Admin)?;
                    other.to_owned()
                }
                _ => caller.user_id.to_owned(),
            };
            let keys = shard.auth.store.api_keys_of(&owner).await?;
            json_reply(
                200,
                &Value::Array(keys.iter().map(api_key_public).collect()),
            )
        }
        AuthRoute::RevokeApiKey(key_id) => {
            let caller = key_manager(principal, user_id()?)?;
            let record = shard.auth.store.api_key(&key_id).await?;
            // Another user's key is a 404 to a non-admin, as another user's topic is.
            let visible = record
                .as_ref()
                .is_some_and(|r| r.user_id == caller.user_id || caller.principal.is_admin());
            if !visible || !shard.auth.revoke_api_key(&key_id).await? {
                return Err(ApiError::not_found("API key not found"));
            }
            if record.is_some_and(|r| r.user_id != caller.user_id) {
                admin_action(principal, "revoke_api_key", &key_id);
            }
            Ok(Reply::no_content())
        }
    }
}

/// Who is managing API keys: a user logged in with a built-in token (the only credential
/// `handle` lets past for anything but `/auth/me`).
struct KeyManager<'a> {
    principal: &'a Principal,
    user_id: &'a str,
}

fn key_manager<'a>(
    principal: Option<&'a Principal>,
    user_id: &'a str,
) -> Result<KeyManager<'a>, ApiError> {
    let principal = principal.ok_or(AuthError::Unauthenticated(Refusal::Missing))?;
    Ok(KeyManager { principal, user_id })
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

fn api_key_public(record: &ApiKeyRecord) -> Value {
    json!({
        "key_id": record.key_id,
        "name": record.name,
        "user_id": record.user_id,
        "permissions": record.grants,
        "created_at": record.created_at,
        "revoked": record.revoked,
    })
}

/// Live keys a user may hold: far more than producers need, few enough that listing them (and
/// the per-key Valkey read it costs) stays cheap.
const MAX_KEYS_PER_USER: usize = 100;

/// Entries in one key's permissions: each topic check walks them.
const MAX_GRANTS_PER_KEY: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApiKeyBody {
    name: String,
    permissions: Vec<String>,
    #[serde(default)]
    user_id: Option<String>,
}

async fn create_api_key(
    shard: &Shard,
    request: &Request,
    caller: KeyManager<'_>,
) -> Result<Reply, ApiError> {
    let body: CreateApiKeyBody = parse_json(request)?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(unprocessable("`name` is 1 to 100 characters"));
    }
    if body.permissions.len() > MAX_GRANTS_PER_KEY {
        return Err(unprocessable(format!(
            "at most {MAX_GRANTS_PER_KEY} permissions a key"
        )));
    }
    let grants =
        Grants::parse_strict(body.permissions.iter().map(String::as_str)).map_err(|e| {
            unprocessable(format!(
                "unknown permission {:?}: use read, write, admin, read:<pattern> or \
                 write:<pattern>",
                e.0
            ))
        })?;
    let owner_id = match body.user_id.as_deref() {
        Some(other) if other != caller.user_id => {
            caller.principal.require(Permission::Admin)?;
            other.to_owned()
        }
        _ => caller.user_id.to_owned(),
    };
    let owner = shard
        .auth
        .store
        .user_by_id(&owner_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("User with ID '{owner_id}' not found")))?;
    // A key is never more than its owner; asking for more is refused rather than narrowed,
    // so the caller is not surprised later.
    if grants.clone().within(owner.permissions) != grants {
        return Err(ApiError::new(
            403,
            "FORBIDDEN",
            format!(
                "a key cannot have permissions its owner lacks (the owner has {:?})",
                owner.permissions.names()
            ),
        ));
    }
    let live = shard
        .auth
        .store
        .api_keys_of(&owner.id)
        .await?
        .iter()
        .filter(|k| !k.revoked)
        .count();
    if live >= MAX_KEYS_PER_USER {
        return Err(ApiError::new(
            409,
            "TOO_MANY_KEYS",
            format!("a user has at most {MAX_KEYS_PER_USER} live API keys; revoke one first"),
        ));
    }
    let created = shard.auth.create_api_key(&owner.id, name, &grants).await?;
    if owner.id != caller.user_id {
        admin_action(
            Some(caller.principal),
            "create_api_key",
            &created.record.key_id,
        );
    }
    let mut public = api_key_public(&created.record);
    public["api_key"] = Value::String(created.key);
    json_reply(201, &public)
}

/// One log line per admin action: who did what to whom (never a password or token).
fn admin_action(principal: Option<&Principal>, action: &'static str, target: &str) {
    let admin = principal
        .and_then(|p| p.user.as_ref())
        .map_or("", |u| u.username.as_str());
    tracing::info!(admin, action, target = %target.escape_debug(), "admin action");
}

fn require_admin(principal: Option<&Principal>) -> Result<(), ApiError> {
    principal
        .ok_or(AuthError::Unauthenticated(Refusal::Missing))?
        .require(Permission::Admin)
        .map_err(ApiError::from)
}

async fn login(shard: &Shard, request: &Request) -> Result<Reply, ApiError> {
    if !is_form(request) {
        return Err(unprocessable(
            "the body must be a form (Content-Type: application/x-www-form-urlencoded) with \
             `username` and `password`",
        ));
    }
    let (mut username, mut password, mut grant_type) = (None, None, None);
    for (name, value) in form_urlencoded::parse(request.body()) {
        match name.as_ref() {
            "username" => username = Some(value.into_owned()),
            "password" => password = Some(value.into_owned()),
            "grant_type" => grant_type = Some(value.into_owned()),
            _ => {}
        }
    }
    let (Some(username), Some(password)) = (username, password) else {
        return Err(unprocessable("`username` and `password` are required"));
    };
    if grant_type.is_some_and(|g| !g.is_empty() && g != "password") {
        return Err(unprocessable("`grant_type` must be `password`"));
    }
    match shard.auth.login(&username, &password).await {
        Ok(tokens) => tokens_reply(tokens),
        Err(LoginError::BadCredentials) => {
            Err(AuthError::Unauthenticated(Refusal::BadCredentials).into())
        }
        Err(LoginError::Inactive) => {
            Err(ApiError::new(403, "FORBIDDEN", "User account is inactive"))
        }
        Err(LoginError::Auth(e)) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

async fn refresh(shard: &Shard, request: &Request) -> Result<Reply, ApiError> {
    let body: RefreshBody = parse_json(request)?;
    match shard.auth.refresh(&body.refresh_token).await {
        Ok(tokens) => tokens_reply(tokens),
        Err(RefreshError::Invalid) => {
            Err(AuthError::Unauthenticated(Refusal::InvalidRefresh).into())
        }
        Err(RefreshError::UserGone) => Err(ApiError::new(401, "UNAUTHORIZED", "user not found")),
        Err(RefreshError::Auth(e)) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct RevokeBody {
    refresh_token: String,
    #[serde(default)]
    revoke_chain: bool,
}

async fn revoke(shard: &Shard, request: &Request) -> Result<Reply, ApiError> {
    let body: RevokeBody = parse_json(request)?;
    if split_refresh_token(&body.refresh_token).is_none() {
        return Err(ApiError::invalid_request("malformed refresh token"));
    }
    shard
        .auth
        .revoke_refresh(&body.refresh_token, body.revoke_chain)
        .await?;
    Ok(Reply::no_content())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    username: String,
    #[serde(default)]
    email: Option<String>,
    password: String,
    #[serde(default)]
    permissions: Vec<String>,
}

fn check_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 {
        return Err(unprocessable("`password` must be at least 8 characters"));
    }
    Ok(())
}

fn parse_permissions(names: &[String]) -> Result<Permissions, ApiError> {
    Permissions::from_names(names.iter().map(String::as_str)).map_err(|unknown| {
        unprocessable(format!(
            "unknown permission `{unknown}`: expected `admin`, `read` or `write`"
        ))
    })
}

async fn register(
    shard: &Shard,
    request: &Request,
    principal: Option<&Principal>,
) -> Result<Reply, ApiError> {
    let body: RegisterBody = parse_json(request)?;
    let length = body.username.chars().count();
    if !(3..=50).contains(&length) || body.username.chars().any(char::is_control) {
        return Err(unprocessable(
            "`username` must be 3 to 50 characters without control characters",
        ));
    }
    check_password(&body.password)?;
    let permissions = parse_permissions(&body.permissions)?;
    let created = shard
        .auth
        .create_user(
            &body.username,
            body.email.as_deref().unwrap_or(""),
            &body.password,
            permissions,
        )
        .await?;
    match created {
        Some(user) => {
            admin_action(principal, "register", &user.username);
            json_reply(201, &user_public(&user))
        }
        None => Err(ApiError::invalid_request(format!(
            "Username '{}' already exists",
            body.username
        ))),
    }
}

/// Every key optional; an explicit `null` is refused (the Python relay stores it and breaks
/// the user record).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default, deserialize_with = "present")]
    email: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    password: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    permissions: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    is_active: Option<Value>,
}

/// `Some(value)` for a key that is present, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

async fn update_user(
    shard: &Shard,
    request: &Request,
    id: &str,
    own_id: &str,
) -> Result<Reply, ApiError> {
    let body: UpdateBody = parse_json(request)?;
    let mut user = shard
        .auth
        .store
        .user_by_id(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("User with ID '{id}' not found")))?;
    if let Some(email) = body.email {
        user.email = email
            .as_str()
            .ok_or_else(|| unprocessable("`email` must be a string"))?
            .to_owned();
    }
    if let Some(permissions) = body.permissions {
        let names: Vec<String> = serde_json::from_value(permissions)
            .map_err(|_| unprocessable("`permissions` must be a list of strings"))?;
        user.permissions = parse_permissions(&names)?;
    }
    if let Some(active) = body.is_active {
        user.active = active
            .as_bool()
            .ok_or_else(|| unprocessable("`is_active` must be true or false"))?;
    }
    if id == own_id && (!user.active || !user.permissions.contains(Permission::Admin)) {
        // The Python relay allows it and leaves the relay without a usable admin.
        return Err(ApiError::invalid_request(
            "an admin cannot deactivate or demote their own account",
        ));
    }
    if let Some(password) = body.password {
        let password = password
            .as_str()
            .ok_or_else(|| unprocessable("`password` must be a string"))?;
        check_password(password)?;
        user.password_hash = crate::auth::password::hash_off_shard(password.to_owned()).await;
    }
    shard.auth.update_user(&user).await?;
    json_reply(200, &user_public(&user))
}
