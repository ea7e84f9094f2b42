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
//! Per request the cost is one lookup in a per-shard cache of verified credentials. What they
//! were verified against (user records, deny-list answers) is read again whenever the shared
//! state changed ([`store::AuthStore::generation`]): a deactivation, a logout or a permission
//! change applies to the next request on every shard of this relay. With Valkey other writers
//! share the state without moving that counter (the Python relay during a migration), so there
//! it is read again at least once a second: a change made anywhere applies within a second.

pub mod api_key;
pub mod bootstrap;
pub mod credential;
pub mod external;
pub mod grant;
pub mod jwks;
pub mod password;
pub mod session;
pub mod store;
pub mod token;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;
use crate::http::error::ApiError;
use external::ExternalVerifier;
pub use grant::Grants;
use store::{ApiKeyRecord, AuthStore, TopicRecord, User};
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

    pub(crate) fn bits(self) -> u8 {
        self.0
    }

    pub(crate) fn from_bits(bits: u8) -> Permissions {
        Permissions(bits & Permissions::EVERY.0)
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
    /// What it may do: permissions on every topic it reaches, and on topics matching patterns
    /// (external tokens and API keys may carry those; built-in tokens never do).
    pub grants: Grants,
}

/// An authenticated caller, as its credential and the stored record say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPrincipal {
    /// The built-in user (also for an API key: its owner), or `ext:<subject>` for an external
    /// token's subject.
    pub user_id: String,
    pub username: String,
    /// The access token's id (`jti`), for logout.
    pub token_id: Option<String>,
    /// Unix seconds (`u64::MAX` for an API key, which lasts until revoked).
    pub expires_at: u64,
    /// Unix seconds (the token's `iat`): tokens issued before an admin disconnected the user
    /// are refused.
    pub issued_at: u64,
    pub credential: CredentialKind,
}

/// What authenticated a [`UserPrincipal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// An access token this relay (or the Python relay) issued at login or refresh.
    BuiltinToken,
    /// A JWT from an external issuer: no user record, no namespace (its topic grants decide
    /// which topics of the shared space it reaches), never revoked before it expires.
    External,
    /// A static API key of a built-in user: the owner's namespace, never more than the owner.
    ApiKey { key_id: String },
}

impl Principal {
    /// Authentication off: the relay as it was, open to whoever reaches it.
    pub fn open() -> Principal {
        Principal {
            user: None,
            grants: Grants {
                permissions: Permissions::EVERY,
                topics: Vec::new(),
            },
        }
    }

    /// The permission somewhere (the gate of a publish, a stream or a poll, whose topics are
    /// then each checked by [`Principal::topic`]); on everything for `admin`.
    pub fn require(&self, permission: Permission) -> Result<(), AuthError> {
        if self.grants.allows_any(permission) {
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
        self.grants.permissions.contains(Permission::Admin)
    }

    /// Whose namespace the principal's topic names are in: the user's (or the API key
    /// owner's); none with authentication off or for an external token.
    pub fn namespace(&self) -> Option<&str> {
        self.user
            .as_ref()
            .filter(|u| u.credential != CredentialKind::External)
            .map(|u| u.user_id.as_str())
    }

    /// The same caller with the same kind of credential and the same grants (what an in-band
    /// token refresh may change is the lifetime, nothing else).
    pub fn same_rights(&self, other: &Principal) -> bool {
        let kind = |p: &Principal| {
            p.user
                .as_ref()
                .map(|u| (u.user_id.clone(), std::mem::discriminant(&u.credential)))
        };
        kind(self) == kind(other) && self.grants == other.grants
    }

    /// Whether `permission` is granted on the client's topic `name`.
    pub fn may(&self, permission: Permission, name: &str) -> bool {
        self.grants.allows(permission, name)
    }

    /// The stored (routed) name of the client's topic `name`, once `permission` on it is
    /// checked: `<user id>/<name>` in a namespace, `name` itself without one.
    pub fn topic(&self, permission: Permission, name: &str) -> Result<String, AuthError> {
        self.require_on(permission, name)?;
        Ok(self.stored_name(name))
    }

    /// [`Principal::topic`] for a name the caller owns: without a namespace the same
    /// `String` back, so the open relay's hot path (bulk items, poll topics) allocates
    /// nothing more than before.
    pub fn into_topic(&self, permission: Permission, name: String) -> Result<String, AuthError> {
        self.require_on(permission, &name)?;
        Ok(match self.namespace() {
            Some(namespace) => namespaced(namespace, &name),
            None => name,
        })
    }

    /// The stored name of `name` without a permission check: for leaving what was joined.
    pub fn stored_name(&self, name: &str) -> String {
        match self.namespace() {
            Some(namespace) => namespaced(namespace, name),
            None => name.to_owned(),
        }
    }

    /// [`Principal::topic`] in another user's namespace, which only an admin may reach. An
    /// admin logged in reaches it whole (as the Python relay's admins manage everything); an
    /// API key or an external token only within what it grants on the topic, so `admin`
    /// beside `read:jobs.*` reads another user's `jobs.1` but not their `billing`.
    pub fn topic_of(
        &self,
        permission: Permission,
        owner: Option<&str>,
        name: &str,
    ) -> Result<String, AuthError> {
        match (owner, self.namespace()) {
            (Some(owner), own) if Some(owner) != own => {
                self.require(Permission::Admin)?;
                let logged_in = self
                    .user
                    .as_ref()
                    .is_some_and(|u| u.credential == CredentialKind::BuiltinToken);
                if !logged_in {
                    self.require_on(permission, name)?;
                }
                Ok(namespaced(owner, name))
            }
            _ => self.topic(permission, name),
        }
    }

    /// `permission` on the client's topic `name`, or the 403 saying so.
    pub fn require_on(&self, permission: Permission, name: &str) -> Result<(), AuthError> {
        if self.grants.allows(permission, name) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "Permission '{}' required on topic '{}'",
                permission.name(),
                name.escape_debug()
            )))
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
    #[error("{}", .0.message())]
    Unauthenticated(Refusal),
    /// 403: the user (or an API key's owner) is deactivated.
    #[error("User is inactive")]
    Inactive,
    /// 403: authenticated, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The user or token state could not be read (Valkey down): 503.
    #[error("{0}")]
    Unavailable(String),
}

/// Why a credential was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// None was sent.
    Missing,
    /// Not ours, not intact, expired, or an unknown or forged API key (not told apart).
    Invalid,
    /// Logged out, revoked, or issued before an admin disconnect.
    Revoked,
    /// Its user no longer exists.
    UnknownUser,
    /// A login's name or password is wrong.
    BadCredentials,
    /// A refresh token that cannot be used (any reason, not told apart).
    InvalidRefresh,
}

impl Refusal {
    /// What the client is told (the Python relay's words).
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "Not authenticated",
            Refusal::Invalid => "Invalid or expired token",
            Refusal::Revoked => "Token has been revoked",
            Refusal::UnknownUser => "User not found",
            Refusal::BadCredentials => "Incorrect username or password",
            Refusal::InvalidRefresh => "invalid refresh token",
        }
    }
}

impl AuthError {
    /// The `reason` label of `relay_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated(Refusal::Missing) => "missing",
            AuthError::Unauthenticated(Refusal::Revoked) => "revoked",
            AuthError::Unauthenticated(Refusal::UnknownUser) => "unknown_user",
            AuthError::Unauthenticated(Refusal::BadCredentials) => "login_failed",
            AuthError::Unauthenticated(Refusal::Invalid | Refusal::InvalidRefresh) => "invalid",
            AuthError::Inactive => "inactive",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Unauthenticated(refusal) => ApiError {
                headers: &[("WWW-Authenticate", "Bearer")],
                ..ApiError::new(401, "UNAUTHORIZED", refusal.message())
            },
            AuthError::Inactive => ApiError::new(403, "FORBIDDEN", "User is inactive"),
            AuthError::Forbidden(message) => ApiError::new(403, "FORBIDDEN", message),
            AuthError::Unavailable(cause) => {
                tracing::warn!(%cause, "user state unavailable");
                ApiError::unavailable("authentication state is unavailable; retry shortly")
            }
        }
    }
}

/// How long a shard trusts what it read of the shared state: with the memory backend the
/// generation check is an atomic load on every request; with Valkey it is a `GET` of the
/// generation counter at most this often, and every successful one starts a new epoch: user
/// records, deny-list answers and the like are read again, and each cached principal is
/// verified again on its next use. Not only when the counter moved: the Python relay (and any
/// script) changes these keys without moving it, so a change made anywhere applies within
/// this. The cost is a few reads per credential in use, per shard and second.
const GENERATION_CHECK_EVERY: Duration = Duration::from_secs(1);

/// While the generation cannot be read (Valkey restarting or failing over), principals cached
/// before are still honoured for this long since the last good read, so a brief outage does
/// not turn every request of an already-authenticated client into a 503; a credential not yet
/// cached still needs the state and gets 503. Beyond it the relay fails closed: it could be
/// missing a revocation.
const STALE_CACHE_FOR: Duration = Duration::from_secs(30);

/// Cached user records and deny-list answers beyond this are dropped wholesale: a bound on
/// memory against a flood of distinct tokens.
const CACHE_MAX_ENTRIES: usize = 10_000;

/// How long a shard remembers that a topic has its ownership record, so a publish does not ask
/// again ([`Auth::needs_topic_record`]). Records go away only when a topic is deleted; one
/// deleted through another shard or relay (or the Python relay) comes back with the first
/// publish through this shard after at most this long.
const TOPIC_RECORDS_TRUSTED_FOR: Duration = Duration::from_secs(60);

/// A shard's authentication: configuration, the shared state and its cache.
pub struct Auth {
    pub config: AuthConfig,
    /// The built-in tokens' signer; `None` unless `auth.mode` is `builtin`.
    pub signer: Option<Signer>,
    /// Tokens issued elsewhere; shared by every shard (one JWKS refresh thread).
    pub external: Option<Arc<ExternalVerifier>>,
    pub store: AuthStore,
    cache: RefCell<Cache>,
    checked_at: Cell<Option<Instant>>,
    /// The last time the generation was read successfully.
    confirmed_at: Cell<Option<Instant>>,
    /// The last read of the generation failed: the state is unreachable.
    unconfirmed: Cell<bool>,
    topic_records: RefCell<TopicRecords>,
}

/// Stored topic names this shard has seen an ownership record for (or written one), and since
/// when it remembers them.
#[derive(Default)]
struct TopicRecords {
    known: HashSet<Box<str>>,
    since: Option<Instant>,
}

#[derive(Default)]
struct Cache {
    generation: u64,
    /// Moves whenever the answers below are dropped: a principal verified in an earlier epoch
    /// is verified again before it is used (and serves, while the state is unreachable, as
    /// what the shard last knew).
    epoch: u64,
    /// [`ExternalVerifier::keys_version`] when the principals were verified.
    external_keys: u64,
    users: HashMap<String, Option<User>>,
    denied: HashMap<String, bool>,
    disconnects: HashMap<String, Option<u64>>,
    api_keys: HashMap<String, Option<ApiKeyRecord>>,
    /// Verified tokens → their principal and the epoch it was verified in: a keep-alive
    /// client pays the signature check and the lookups once per token and epoch, not per
    /// request.
    principals: HashMap<Box<str>, (Principal, u64)>,
}

impl Cache {
    /// Drops what was read of the shared state and starts a new epoch; principals stay, to be
    /// verified again.
    fn new_epoch(&mut self) {
        self.users.clear();
        self.denied.clear();
        self.disconnects.clear();
        self.api_keys.clear();
        self.epoch += 1;
    }
}

impl Auth {
    /// `external` is the verifier built once for the process from `config.external`
    /// ([`ExternalVerifier::new`]), `None` when that is unset.
    pub fn new(
        config: AuthConfig,
        store: AuthStore,
        external: Option<Arc<ExternalVerifier>>,
    ) -> Result<Auth, String> {
        let signer = match config.jwt_secret.as_ref().filter(|_| config.builtin()) {
            Some(secret) => Some(Signer::new(
                secret.expose().as_bytes(),
                config.access_token_ttl,
            )?),
            None => None,
        };
        Ok(Auth {
            config,
            signer,
            external,
            store,
            cache: RefCell::new(Cache::default()),
            checked_at: Cell::new(None),
            confirmed_at: Cell::new(None),
            unconfirmed: Cell::new(false),
            topic_records: RefCell::new(TopicRecords::default()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// The principal behind `token` (the credential as the request carried it, if any: a
    /// built-in access token, an external token or an API key). With authentication off every
    /// request is [`Principal::open`].
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        if !self.enabled() {
            return Ok(Principal::open());
        }
        let token = token.ok_or(AuthError::Unauthenticated(Refusal::Missing))?;
        self.refresh_cache().await?;
        let now = crate::clock::now_ms() / 1000;
        let cached = {
            let cache = self.cache.borrow();
            cache
                .principals
                .get(token)
                .filter(|(p, _)| p.user.as_ref().is_some_and(|u| u.expires_at > now))
                .map(|(p, epoch)| (p.clone(), *epoch == cache.epoch))
        };
        match cached {
            // Verified in this epoch (the state as read since it last changed).
            Some((principal, true)) => return Ok(principal),
            // The state is unreachable, within the window `refresh_cache` allows.
            Some((principal, false)) if self.unconfirmed.get() && self.recently_confirmed() => {
                return Ok(principal)
            }
            _ => {}
        }
        let principal = match self.authenticate_uncached(token).await {
            Ok(principal) => principal,
            // Unreachable since the last read of the generation: what the shard knew (and
            // until the next read, no more attempts for other cached principals).
            Err(AuthError::Unavailable(cause)) => {
                self.unconfirmed.set(true);
                match cached {
                    Some((principal, _)) if self.recently_confirmed() => return Ok(principal),
                    _ => return Err(AuthError::Unavailable(cause)),
                }
            }
            Err(e) => return Err(e),
        };
        let mut cache = self.cache.borrow_mut();
        if cache.principals.len() >= CACHE_MAX_ENTRIES {
            cache.principals.clear();
        }
        let epoch = cache.epoch;
        cache
            .principals
            .insert(token.into(), (principal.clone(), epoch));
        Ok(principal)
    }

    /// [`Auth::authenticate`] without the per-token cache, by the credential's kind: an API
    /// key (`prk_…`, built-in users only), else a built-in token, else an external one.
    async fn authenticate_uncached(&self, token: &str) -> Result<Principal, AuthError> {
        let invalid = AuthError::Unauthenticated(Refusal::Invalid);
        if token.starts_with(api_key::PREFIX) && self.config.builtin() {
            return self.authenticate_api_key(token).await;
        }
        if let Some(signer) = &self.signer {
            if let Ok(claims) = signer.verify(token) {
                return self.builtin_principal(claims).await;
            }
        }
        match &self.external {
            Some(external) => match external.verify(token) {
                Ok(claims) => Ok(Principal {
                    grants: claims.grants,
                    user: Some(UserPrincipal {
                        user_id: format!("ext:{}", claims.subject),
                        username: claims.subject,
                        token_id: None,
                        expires_at: claims.expires_at,
                        issued_at: claims.issued_at,
                        credential: CredentialKind::External,
                    }),
                }),
                Err(refusal) => {
                    tracing::debug!(%refusal, "external token refused");
                    Err(invalid)
                }
            },
            None => Err(invalid),
        }
    }

    /// The principal of a verified built-in token: the deny-list, the user and its
    /// disconnect cut-off read (through their caches).
    async fn builtin_principal(&self, claims: token::AccessClaims) -> Result<Principal, AuthError> {
        if let Some(jti) = &claims.jti {
            if self.is_denied(jti).await? {
                return Err(AuthError::Unauthenticated(Refusal::Revoked));
            }
        }
        let user = self
            .user(&claims.sub)
            .await?
            .ok_or(AuthError::Unauthenticated(Refusal::UnknownUser))?;
        if !user.active {
            return Err(AuthError::Inactive);
        }
        if self
            .disconnected_at(&user.id)
            .await?
            .is_some_and(|at| claims.iat < at)
        {
            return Err(AuthError::Unauthenticated(Refusal::Revoked));
        }
        Ok(Principal {
            grants: Grants {
                permissions: user.permissions,
                topics: Vec::new(),
            },
            user: Some(UserPrincipal {
                user_id: user.id,
                username: user.username,
                token_id: claims.jti,
                expires_at: claims.exp,
                issued_at: claims.iat,
                credential: CredentialKind::BuiltinToken,
            }),
        })
    }

    /// Whether an open stream's principal still stands: its user exists and is active, its
    /// token was not logged out and the user was not disconnected since it was issued.
    /// `Err` when the state cannot be read (the stream keeps going; asked again later).
    pub async fn still_valid(&self, user: &UserPrincipal) -> Result<bool, AuthError> {
        self.refresh_cache().await?;
        match &user.credential {
            // Nothing revokes an external token before it expires.
            CredentialKind::External => return Ok(true),
            CredentialKind::ApiKey { key_id } => {
                if !self.api_key_still_valid(key_id).await? {
                    return Ok(false);
                }
                return Ok(self.user(&user.user_id).await?.is_some_and(|u| u.active));
            }
            CredentialKind::BuiltinToken => {}
        }
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
/// (with Valkey, reads of the user, deny-list and disconnect keys when a new epoch started
/// since: at most once a second per user and token), so 10,000 open streams cost ~700
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

    /// The stored API key `key_id`, through the cache.
    async fn api_key_record(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, AuthError> {
        if let Some(record) = self.cache.borrow().api_keys.get(key_id) {
            return Ok(record.clone());
        }
        let record = self.store.api_key(key_id).await?;
        let mut cache = self.cache.borrow_mut();
        if cache.api_keys.len() >= CACHE_MAX_ENTRIES {
            cache.api_keys.clear();
        }
        cache.api_keys.insert(key_id.to_owned(), record.clone());
        Ok(record)
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

    /// Whether the generation was read successfully within [`STALE_CACHE_FOR`].
    fn recently_confirmed(&self) -> bool {
        self.confirmed_at
            .get()
            .is_some_and(|at| at.elapsed() < STALE_CACHE_FOR)
    }

    /// Starts a new epoch when the shared state may have changed since the last one: with
    /// the memory backend when its counter moved, with Valkey at every successful read of
    /// the counter (at most once a second). While Valkey cannot be read the epoch stays, for
    /// up to [`STALE_CACHE_FOR`] since the last good read; then `Err`.
    async fn refresh_cache(&self) -> Result<(), AuthError> {
        // The external keys first: an atomic load, every request.
        if let Some(external) = &self.external {
            let version = external.keys_version();
            let mut cache = self.cache.borrow_mut();
            if cache.external_keys != version {
                cache.principals.clear();
                cache.external_keys = version;
            }
        }
        let local = self.store.generation_is_local();
        let due = local
            || self
                .checked_at
                .get()
                .is_none_or(|at| at.elapsed() >= GENERATION_CHECK_EVERY);
        if !due {
            return Ok(());
        }
        let generation = match self.store.generation().await {
            Ok(generation) => generation,
            Err(e) => {
                // Asked again in a second, not on every request meanwhile.
                self.checked_at.set(Some(Instant::now()));
                self.unconfirmed.set(true);
                return if self.recently_confirmed() {
                    Ok(())
                } else {
                    Err(e)
                };
            }
        };
        self.checked_at.set(Some(Instant::now()));
        self.confirmed_at.set(Some(Instant::now()));
        self.unconfirmed.set(false);
        let mut cache = self.cache.borrow_mut();
        // Our relays move the counter on every change; with Valkey other writers (the Python
        // relay) change the same keys without moving it.
        if cache.generation != generation || !local {
            cache.new_epoch();
            cache.generation = generation;
        }
        Ok(())
    }

    /// Whether a publish by `principal` to its topic `stored` (`<owner>/<name>`) must write the
    /// topic's ownership record first ([`Auth::write_topic_record`]): with authentication on,
    /// unless this shard knows the record exists.
    pub fn needs_topic_record(&self, principal: &Principal, stored: &str) -> bool {
        // Only topics in a user's namespace have records (not those of the open relay, nor
        // the shared space of external tokens).
        if principal.user.is_none() || crate::topic::owner_of(stored).is_none() {
            return false;
        }
        let mut records = self.topic_records.borrow_mut();
        if records
            .since
            .is_some_and(|at| at.elapsed() >= TOPIC_RECORDS_TRUSTED_FOR)
        {
            records.known.clear();
            records.since = None;
        }
        !records.known.contains(stored)
    }

    /// Writes the ownership record of `principal`'s topic `stored` unless there is one, as a
    /// publish on the Python relay creates its topic: `topic:<owner>/<name>` (description
    /// `Auto-created topic by <username>`), the name in the owner's topics. The Python relay
    /// knows a topic by that record only: without it its history and `GET` of the topic answer
    /// 404, its topic list leaves it out and its `POST /api/v1/topics` creates it again.
    /// A failure is logged and not returned: the record never holds up a publish (the next
    /// publish through this shard tries again).
    pub async fn write_topic_record(&self, principal: &Principal, stored: &str) {
        let (Some(user), Some(owner)) = (&principal.user, crate::topic::owner_of(stored)) else {
            return;
        };
        let record = TopicRecord {
            topic_id: uuid::Uuid::new_v4().to_string(),
            name: crate::topic::public_name(stored).to_owned(),
            owner_id: owner.to_owned(),
            description: format!("Auto-created topic by {}", user.username),
            created_at: store::iso8601(crate::clock::now_ms() / 1000),
        };
        match self.store.create_topic(&record).await {
            Ok(_) => {
                let mut records = self.topic_records.borrow_mut();
                if records.known.len() >= CACHE_MAX_ENTRIES {
                    records.known.clear();
                }
                if records.known.is_empty() {
                    records.since = Some(Instant::now());
                }
                records.known.insert(stored.into());
            }
            Err(e) => {
                tracing::warn!(topic = stored, error = %e, "topic ownership record not written")
            }
        }
    }

    /// Forgets that `stored` has its ownership record (it was deleted through this shard).
    pub fn forget_topic_record(&self, stored: &str) {
        self.topic_records.borrow_mut().known.remove(stored);
    }

    /// Forgets the cache at once (after a change made through this shard), principals too:
    /// none of them is served again without being verified against the state.
    pub fn invalidate(&self) {
        let mut cache = self.cache.borrow_mut();
        cache.new_epoch();
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

    fn principal(grants: Grants, credential: CredentialKind) -> Principal {
        Principal {
            user: Some(UserPrincipal {
                user_id: "u1".to_owned(),
                username: "alice".to_owned(),
                token_id: None,
                expires_at: 0,
                issued_at: 0,
                credential,
            }),
            grants,
        }
    }

    fn grants(entries: &[&str]) -> Grants {
        Grants::parse_strict(entries.iter().copied()).expect("known entries")
    }

    #[test]
    fn topics_are_namespaced_per_user_and_only_admins_reach_others() {
        let user = |entries: &[&str]| principal(grants(entries), CredentialKind::BuiltinToken);
        let plain = user(&["write"]);
        assert_eq!(
            plain.topic(Permission::Write, "orders"),
            Ok("u1/orders".into())
        );
        assert!(plain.topic(Permission::Read, "orders").is_err());
        assert_eq!(
            plain.topic_of(Permission::Write, Some("u1"), "orders"),
            Ok("u1/orders".into())
        );
        assert!(matches!(
            plain.topic_of(Permission::Write, Some("u2"), "orders"),
            Err(AuthError::Forbidden(_))
        ));
        let admin = user(&["admin", "read", "write"]);
        assert_eq!(
            admin.topic_of(Permission::Read, Some("u2"), "orders"),
            Ok("u2/orders".into())
        );
        assert_eq!(
            Principal::open().topic(Permission::Write, "orders"),
            Ok("orders".into())
        );
        assert!(Principal::open().require(Permission::Admin).is_ok());
        assert!(plain.require(Permission::Read).is_err());
    }

    #[test]
    fn topic_grants_confine_external_tokens_and_api_keys() {
        let external = principal(grants(&["read:jobs.*"]), CredentialKind::External);
        // No namespace: the shared topic space, confined by the patterns.
        assert_eq!(external.namespace(), None);
        assert_eq!(
            external.topic(Permission::Read, "jobs.1"),
            Ok("jobs.1".into())
        );
        assert!(external.topic(Permission::Read, "other").is_err());
        assert!(external.topic(Permission::Write, "jobs.1").is_err());
        assert!(external.require(Permission::Read).is_ok());
        assert!(external.require(Permission::Write).is_err());
        assert!(external
            .topic_of(Permission::Read, Some("u2"), "jobs.1")
            .is_err());

        let key = principal(
            grants(&["write:jobs.*"]),
            CredentialKind::ApiKey {
                key_id: "k".to_owned(),
            },
        );
        // The owner's namespace.
        assert_eq!(key.namespace(), Some("u1"));
        assert_eq!(
            key.into_topic(Permission::Write, "jobs.9".to_owned()),
            Ok("u1/jobs.9".into())
        );
        assert!(key.into_topic(Permission::Write, "x".to_owned()).is_err());
        assert_eq!(key.stored_name("x"), "u1/x");
    }

    /// A flood of distinct valid tokens (each verified once) never grows a shard's cache of
    /// verified principals beyond its bound; the tokens keep working.
    #[test]
    fn the_principal_cache_is_bounded() {
        let mut config = crate::config::built_in().auth;
        config.mode = crate::config::AuthMode::Builtin;
        config.jwt_secret = Some(crate::config::Secret::new(
            "cache-bound-secret-0123456789abcdef0123",
        ));
        let db = std::sync::Arc::new(store::memory::MemoryAuthDb::new());
        let user = User {
            id: "u1".to_owned(),
            username: "alice".to_owned(),
            email: String::new(),
            password_hash: String::new(),
            active: true,
            created_at: String::new(),
            permissions: Permissions::EVERY,
            owned_topics: Vec::new(),
        };
        assert!(db.create_user(&user));
        let auth = Auth::new(config, AuthStore::Memory(db), None).expect("auth");
        let signer = auth.signer.as_ref().expect("builtin");
        futures::executor::block_on(async {
            for i in 0..CACHE_MAX_ENTRIES + 500 {
                let token = signer.issue("u1", "alice", Vec::new()).token;
                let principal = auth.authenticate(Some(&token)).await;
                assert!(principal.is_ok(), "token {i}: {principal:?}");
                assert!(auth.cache.borrow().principals.len() <= CACHE_MAX_ENTRIES);
            }
        });
        let cache = auth.cache.borrow();
        assert!(
            cache.principals.len() < CACHE_MAX_ENTRIES,
            "cleared once past the bound"
        );
        assert!(cache.denied.len() <= CACHE_MAX_ENTRIES);
    }
}
