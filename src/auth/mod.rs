//! Who a request is and what it may do: users, passwords, tokens, permissions and topic
//! namespaces, compatible with the Python relay's built-in authentication.
//!
//! Owns: the one entrance every transport calls, [`Auth::authenticate`] (HTTP API, long-poll,
//! history, SSE, and the WebSocket handshake before its 101), the [`Principal`] it yields and
//! the permission rules on it, the user/token/topic-ownership state behind it ([`store`]), the
//! access tokens ([`token`]), password hashing ([`password`]) and where a request carries its
//! token ([`credential`]). Does not own: the `/auth/*` endpoints' HTTP shapes
//! (`crate::http::handlers::auth`), browser-facing checks (Origin, CORS, Host) and rate limits.
//!
//! Topics of an authenticated user live in that user's namespace, as in the Python relay: the
//! name a client writes (`orders`) is stored and routed as `<user id>/orders`
//! ([`Principal::topic`]), so two users' `orders` never meet and the Valkey keys are the Python
//! relay's (`stream:topic:<owner>/<name>` with its key templates). Frames show the name as the
//! client wrote it ([`crate::topic::public_name`]).
//!
//! Per request the cost is one HS256 verification plus two lookups in a per-shard cache (the
//! user record, the token's deny-list entry); the cache is dropped whenever the shared state
//! changes ([`store::AuthStore::generation`]), so a deactivation, a logout or a permission
//! change applies to the next request on every shard (within a second on other relays).

pub mod bootstrap;
pub mod credential;
pub mod password;
pub mod session;
pub mod store;
pub mod token;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;
use crate::http::error::ApiError;
use store::{AuthStore, User};
use token::Signer;

/// One of the Python relay's three permissions. Literal, as there: `admin` does not imply
/// `read` or `write` for publishing and subscribing, it governs users and other namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Read,
    Write,
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 3] = [Permission::Admin, Permission::Read, Permission::Write];

    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.name() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Permission::Read => 1,
            Permission::Write => 2,
            Permission::Admin => 4,
        }
    }
}

/// A set of [`Permission`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    pub const EVERY: Permissions = Permissions(7);

    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn with(self, p: Permission) -> Permissions {
        Permissions(self.0 | p.bit())
    }

    /// The names, in the Python relay's order (`admin`, `read`, `write`).
    pub fn names(self) -> Vec<&'static str> {
        Permission::ALL
            .into_iter()
            .filter(|p| self.contains(*p))
            .map(Permission::name)
            .collect()
    }

    /// From names; an unknown name is returned as the error.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        names
            .into_iter()
            .try_fold(Permissions::default(), |set, name| {
                Permission::parse(name)
                    .map(|p| set.with(p))
                    .ok_or_else(|| name.to_owned())
            })
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `None` when authentication is off: everything is allowed, topics are not namespaced.
    pub user: Option<UserPrincipal>,
    pub permissions: Permissions,
}

/// An authenticated user, as its access token and the stored record say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPrincipal {
    pub user_id: String,
    pub username: String,
    /// The access token's id (`jti`), for logout.
    pub token_id: Option<String>,
    /// Unix seconds.
    pub expires_at: u64,
    /// Unix seconds (the token's `iat`): tokens issued before an admin disconnected the user
    /// are refused.
    pub issued_at: u64,
}

impl Principal {
    /// Authentication off: the relay as it was, open to whoever reaches it.
    pub fn open() -> Principal {
        Principal {
            user: None,
            permissions: Permissions::EVERY,
        }
    }

    pub fn require(&self, permission: Permission) -> Result<(), AuthError> {
        if self.permissions.contains(permission) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "Permission '{}' required",
                permission.name()
            )))
        }
    }

    pub fn user_id(&self) -> Option<&str> {
        self.user.as_ref().map(|u| u.user_id.as_str())
    }

    pub fn is_admin(&self) -> bool {
        self.permissions.contains(Permission::Admin)
    }

    /// The stored (routed) name of the client's topic `name`: `<user id>/<name>` for a user,
    /// `name` itself when authentication is off.
    pub fn topic(&self, name: &str) -> String {
        match &self.user {
            Some(user) => namespaced(&user.user_id, name),
            None => name.to_owned(),
        }
    }

    /// [`Principal::topic`] for a name the caller owns: with authentication off the same
    /// `String` back, so the open relay's hot path (bulk items, poll topics) allocates
    /// nothing more than before.
    pub fn into_topic(&self, name: String) -> String {
        match &self.user {
            Some(user) => namespaced(&user.user_id, &name),
            None => name,
        }
    }

    /// [`Principal::topic`] in another user's namespace, which only an admin may reach.
    pub fn topic_of(&self, owner: Option<&str>, name: &str) -> Result<String, AuthError> {
        match (owner, &self.user) {
            (Some(owner), Some(user)) if owner != user.user_id => {
                self.require(Permission::Admin)?;
                Ok(namespaced(owner, name))
            }
            _ => Ok(self.topic(name)),
        }
    }
}

/// `<owner>/<name>`: the Python relay's composite topic key.
pub fn namespaced(owner: &str, name: &str) -> String {
    let mut full = String::with_capacity(owner.len() + 1 + name.len());
    full.push_str(owner);
    full.push('/');
    full.push_str(name);
    full
}

/// Why a request was refused. The messages are the Python relay's, which its clients show.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401 with `WWW-Authenticate: Bearer`: no usable credential.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// 403: authenticated, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The user or token state could not be read (Valkey down): 503.
    #[error("{0}")]
    Unavailable(String),
}

impl AuthError {
    /// The `reason` label of `relay_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated("Not authenticated") => "missing",
            AuthError::Unauthenticated("Token has been revoked") => "revoked",
            AuthError::Unauthenticated("User not found") => "unknown_user",
            AuthError::Unauthenticated(_) => "invalid",
            AuthError::Forbidden(message) if message == "User is inactive" => "inactive",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Unauthenticated(message) => ApiError {
                headers: &[("WWW-Authenticate", "Bearer")],
                ..ApiError::new(401, "UNAUTHORIZED", message)
            },
            AuthError::Forbidden(message) => ApiError::new(403, "FORBIDDEN", message),
            AuthError::Unavailable(cause) => {
                tracing::warn!(%cause, "user state unavailable");
                ApiError::unavailable("authentication state is unavailable; retry shortly")
            }
        }
    }
}

/// How long a shard trusts its cached user records without asking whether anything changed:
/// with the memory backend the check is an atomic load on every request; with Valkey it is a
/// `GET` of the generation counter at most this often, so a change made on another relay
/// applies within it.
const GENERATION_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Cached user records and deny-list answers beyond this are dropped wholesale: a bound on
/// memory against a flood of distinct tokens.
const CACHE_MAX_ENTRIES: usize = 10_000;

/// A shard's authentication: configuration, the shared state and its cache.
pub struct Auth {
    pub config: AuthConfig,
    /// `None` when authentication is off.
    pub signer: Option<Signer>,
    pub store: AuthStore,
    cache: RefCell<Cache>,
    checked_at: Cell<Option<Instant>>,
}

#[derive(Default)]
struct Cache {
    generation: u64,
    users: HashMap<String, Option<User>>,
    denied: HashMap<String, bool>,
    disconnects: HashMap<String, Option<u64>>,
    /// Verified tokens → their principal: a keep-alive client pays the signature check and
    /// the lookups once per token, not per request.
    principals: HashMap<Box<str>, Principal>,
}

impl Auth {
    pub fn new(config: AuthConfig, store: AuthStore) -> Result<Auth, String> {
        let signer = match config.jwt_secret.as_ref().filter(|_| config.enabled()) {
            Some(secret) => Some(Signer::new(
                secret.expose().as_bytes(),
                config.access_token_ttl,
            )?),
            None => None,
        };
        Ok(Auth {
            config,
            signer,
            store,
            cache: RefCell::new(Cache::default()),
            checked_at: Cell::new(None),
        })
    }

    pub fn enabled(&self) -> bool {
        self.signer.is_some()
    }

    /// The principal behind `token` (the access token as the request carried it, if any).
    /// With authentication off every request is [`Principal::open`].
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let Some(signer) = &self.signer else {
            return Ok(Principal::open());
        };
        let token = token.ok_or(AuthError::Unauthenticated("Not authenticated"))?;
        self.refresh_cache().await?;
        // A token seen since the shared state last changed: its principal as then (the cache
        // is dropped on every logout, deactivation or permission change).
        if let Some(principal) = self.cache.borrow().principals.get(token) {
            if principal
                .user
                .as_ref()
                .is_some_and(|u| u.expires_at > crate::clock::now_ms() / 1000)
            {
                return Ok(principal.clone());
            }
        }
        let principal = self.authenticate_uncached(signer, token).await?;
        let mut cache = self.cache.borrow_mut();
        if cache.principals.len() >= CACHE_MAX_ENTRIES {
            cache.principals.clear();
        }
        cache.principals.insert(token.into(), principal.clone());
        Ok(principal)
    }

    /// [`Auth::authenticate`] without the per-token cache: the signature and claims checked,
    /// the deny-list, the user and its disconnect cut-off read (through their caches).
    async fn authenticate_uncached(
        &self,
        signer: &Signer,
        token: &str,
    ) -> Result<Principal, AuthError> {
        let claims = signer
            .verify(token)
            .map_err(|_| AuthError::Unauthenticated("Invalid or expired token"))?;
        if let Some(jti) = &claims.jti {
            if self.is_denied(jti).await? {
                return Err(AuthError::Unauthenticated("Token has been revoked"));
            }
        }
        let user = self
            .user(&claims.sub)
            .await?
            .ok_or(AuthError::Unauthenticated("User not found"))?;
        if !user.active {
            return Err(AuthError::Forbidden("User is inactive".to_owned()));
        }
        if self
            .disconnected_at(&user.id)
            .await?
            .is_some_and(|at| claims.iat < at)
        {
            return Err(AuthError::Unauthenticated("Token has been revoked"));
        }
        Ok(Principal {
            permissions: user.permissions,
            user: Some(UserPrincipal {
                user_id: user.id,
                username: user.username,
                token_id: claims.jti,
                expires_at: claims.exp,
                issued_at: claims.iat,
            }),
        })
    }

    /// Whether an open stream's principal still stands: its user exists and is active, its
    /// token was not logged out and the user was not disconnected since it was issued.
    /// `Err` when the state cannot be read (the stream keeps going; asked again later).
    pub async fn still_valid(&self, user: &UserPrincipal) -> Result<bool, AuthError> {
        self.refresh_cache().await?;
        if let Some(jti) = &user.token_id {
            if self.is_denied(jti).await? {
                return Ok(false);
            }
        }
        let active = self.user(&user.user_id).await?.is_some_and(|u| u.active);
        let cut = self
            .disconnected_at(&user.user_id)
            .await?
            .is_some_and(|at| user.issued_at < at);
        Ok(active && !cut)
    }

    /// Resolves when a stream opened by `principal` must end ([`StreamEnd`]): at its token's
    /// expiry (re-read on every wake, so an in-band refresh moves it), or at the first check
    /// (every [`STREAM_RECHECK_EVERY`]) that finds it revoked. Never resolves with
    /// authentication off.
    pub async fn watch(&self, principal: &RefCell<Principal>) -> StreamEnd {
        loop {
            let Some(user) = principal.borrow().user.clone() else {
                return futures::future::pending().await;
            };
            let now = crate::clock::now_ms() / 1000;
            if user.expires_at <= now {
                return StreamEnd::Expired;
            }
            let wait = Duration::from_secs(user.expires_at - now).min(STREAM_RECHECK_EVERY);
            glommio::timer::sleep(wait).await;
            let current = principal.borrow().user.clone();
            if let Some(user) = current {
                if let Ok(false) = self.still_valid(&user).await {
                    return StreamEnd::Revoked;
                }
            }
        }
    }

    /// When an admin last disconnected `user_id` (Unix seconds), through the cache.
    async fn disconnected_at(&self, user_id: &str) -> Result<Option<u64>, AuthError> {
        if let Some(at) = self.cache.borrow().disconnects.get(user_id) {
            return Ok(*at);
        }
        let at = self.store.disconnected_at(user_id).await?;
        let mut cache = self.cache.borrow_mut();
        if cache.disconnects.len() >= CACHE_MAX_ENTRIES {
            cache.disconnects.clear();
        }
        cache.disconnects.insert(user_id.to_owned(), at);
        Ok(at)
    }

    /// Ends every session of `user_id`: tokens issued before now are refused from the next
    /// request on, and open streams close at their next check.
    pub async fn disconnect(&self, user_id: &str) -> Result<(), AuthError> {
        let now = crate::clock::now_ms() / 1000;
        // Tokens issued in this very second stay valid (`iat` has whole seconds); one more
        // second refuses those too, at the price of a token issued right after.
        self.store
            .disconnect(user_id, now + 1, self.config.access_token_ttl)
            .await?;
        self.invalidate();
        Ok(())
    }
}

/// Why a stream's principal no longer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Its token's `exp` passed without an in-band refresh.
    Expired,
    /// Logged out, deactivated, deleted or disconnected by an admin.
    Revoked,
}

impl StreamEnd {
    /// The WebSocket close code: 4001 (expired: refresh and reconnect) or 4003 (revoked: log
    /// in again). Private-use codes (RFC 6455 §7.4.2), as no standard code means either.
    pub fn close_code(self) -> u16 {
        match self {
            StreamEnd::Expired => 4001,
            StreamEnd::Revoked => 4003,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            StreamEnd::Expired => "token expired",
            StreamEnd::Revoked => "token revoked",
        }
    }
}

/// How often an open WebSocket or event stream re-checks its principal. A logout,
/// deactivation or admin disconnect closes streams within it; each check is a cache lookup
/// (a Valkey read only when the shared state changed), so 10,000 open streams cost ~700
/// lookups a second.
pub const STREAM_RECHECK_EVERY: Duration = Duration::from_secs(15);

impl Auth {
    /// The stored user `id`, through the cache.
    pub async fn user(&self, id: &str) -> Result<Option<User>, AuthError> {
        if let Some(user) = self.cache.borrow().users.get(id) {
            return Ok(user.clone());
        }
        let user = self.store.user_by_id(id).await?;
        let mut cache = self.cache.borrow_mut();
        if cache.users.len() >= CACHE_MAX_ENTRIES {
            cache.users.clear();
        }
        cache.users.insert(id.to_owned(), user.clone());
        Ok(user)
    }

    async fn is_denied(&self, jti: &str) -> Result<bool, AuthError> {
        if let Some(denied) = self.cache.borrow().denied.get(jti) {
            return Ok(*denied);
        }
        let denied = self.store.is_denied(jti).await?;
        let mut cache = self.cache.borrow_mut();
        if cache.denied.len() >= CACHE_MAX_ENTRIES {
            cache.denied.clear();
        }
        cache.denied.insert(jti.to_owned(), denied);
        Ok(denied)
    }

    /// Drops the cache when the shared state changed since it was filled.
    async fn refresh_cache(&self) -> Result<(), AuthError> {
        let due = self.store.generation_is_local()
            || self
                .checked_at
                .get()
                .is_none_or(|at| at.elapsed() >= GENERATION_CHECK_EVERY);
        if !due {
            return Ok(());
        }
        let generation = self.store.generation().await?;
        self.checked_at.set(Some(Instant::now()));
        let mut cache = self.cache.borrow_mut();
        if cache.generation != generation {
            cache.users.clear();
            cache.denied.clear();
            cache.disconnects.clear();
            cache.principals.clear();
            cache.generation = generation;
        }
        Ok(())
    }

    /// Forgets the cache at once (after a change made through this shard).
    pub fn invalidate(&self) {
        let mut cache = self.cache.borrow_mut();
        cache.users.clear();
        cache.denied.clear();
        cache.disconnects.clear();
        cache.principals.clear();
        self.checked_at.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_round_trip_in_the_python_relays_order() {
        let set = Permissions::from_names(["write", "admin"]).expect("known");
        assert_eq!(set.names(), ["admin", "write"]);
        assert!(set.contains(Permission::Admin) && !set.contains(Permission::Read));
        assert_eq!(Permissions::from_names(["root"]), Err("root".to_owned()));
        assert_eq!(Permissions::EVERY.names(), ["admin", "read", "write"]);
    }

    #[test]
    fn topics_are_namespaced_per_user_and_only_admins_reach_others() {
        let user = |permissions| Principal {
            user: Some(UserPrincipal {
                user_id: "u1".to_owned(),
                username: "alice".to_owned(),
                token_id: None,
                expires_at: 0,
                issued_at: 0,
            }),
            permissions,
        };
        let plain = user(Permissions::default().with(Permission::Write));
        assert_eq!(plain.topic("orders"), "u1/orders");
        assert_eq!(plain.topic_of(Some("u1"), "orders"), Ok("u1/orders".into()));
        assert!(matches!(
            plain.topic_of(Some("u2"), "orders"),
            Err(AuthError::Forbidden(_))
        ));
        let admin = user(Permissions::EVERY);
        assert_eq!(admin.topic_of(Some("u2"), "orders"), Ok("u2/orders".into()));
        assert_eq!(Principal::open().topic("orders"), "orders");
        assert!(Principal::open().require(Permission::Admin).is_ok());
        assert!(plain.require(Permission::Read).is_err());
    }
}
