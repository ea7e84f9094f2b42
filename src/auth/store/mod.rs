//! The state behind authentication: users, refresh tokens, the access-token deny-list and topic
//! ownership records, shared by every shard (and with Valkey, every relay).
//!
//! Two backends with one interface ([`AuthStore`]): [`memory`] (one map behind a mutex for the
//! whole process; touched by the `/auth/*` endpoints and by cache misses, never per message)
//! and [`valkey`] (the Python relay's key layout, so a Python relay and this one share users,
//! sessions and topics during a migration). Every change bumps a generation counter the
//! per-shard caches compare against ([`AuthStore::generation`]).

pub mod memory;
pub mod valkey;

use std::rc::Rc;
use std::sync::Arc;

use super::{AuthError, Permissions};
use crate::valkey::client::Client;

/// A user, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// A v4 UUID with hyphens.
    pub id: String,
    pub username: String,
    pub email: String,
    /// PHC string; empty for a user who cannot log in with a password.
    pub password_hash: String,
    pub active: bool,
    /// ISO 8601, UTC.
    pub created_at: String,
    pub permissions: Permissions,
    /// Names of the topics created through `POST /api/v1/topics`.
    pub owned_topics: Vec<String>,
}

/// Why a refresh token stopped being usable (the Python relay's reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokedReason {
    Rotated,
    Logout,
    Replay,
    Admin,
    Expired,
}

impl RevokedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokedReason::Rotated => "rotated",
            RevokedReason::Logout => "logout",
            RevokedReason::Replay => "replay",
            RevokedReason::Admin => "admin",
            RevokedReason::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<RevokedReason> {
        [
            RevokedReason::Rotated,
            RevokedReason::Logout,
            RevokedReason::Replay,
            RevokedReason::Admin,
            RevokedReason::Expired,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// One refresh token (its secret only as a SHA-256 hex digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshRow {
    pub jti: String,
    pub user_id: String,
    pub secret_hash: String,
    /// The token this one was rotated from.
    pub parent_jti: Option<String>,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
    pub last_used_at: Option<u64>,
    pub revoked: Option<RevokedReason>,
    pub client_hint: String,
}

/// A topic created through the API (publishing creates topics without one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicRecord {
    pub topic_id: String,
    pub name: String,
    pub owner_id: String,
    pub description: String,
    pub created_at: String,
}

/// A static API key (its secret only as a SHA-256 hex digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub key_id: String,
    /// The owner: the key acts in this user's namespace, never beyond the user's permissions.
    pub user_id: String,
    pub name: String,
    pub secret_hash: String,
    /// [`crate::auth::grant`] entries (`write`, `read:jobs.*`).
    pub grants: Vec<String>,
    /// ISO 8601, UTC.
    pub created_at: String,
    pub revoked: bool,
}

/// The shared state, in memory or in Valkey.
#[derive(Clone)]
pub enum AuthStore {
    Memory(Arc<memory::MemoryAuthDb>),
    Valkey(valkey::ValkeyAuthStore),
}

impl AuthStore {
    pub fn valkey(client: Rc<Client>) -> AuthStore {
        AuthStore::Valkey(valkey::ValkeyAuthStore::new(client))
    }

    /// Whether [`AuthStore::generation`] is a local read (cheap enough for every request).
    pub fn generation_is_local(&self) -> bool {
        matches!(self, AuthStore::Memory(_))
    }

    /// A counter every change of users, tokens or the deny-list increments.
    pub async fn generation(&self) -> Result<u64, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.generation()),
            AuthStore::Valkey(v) => v.generation().await,
        }
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.user_by_id(id)),
            AuthStore::Valkey(v) => v.user_by_id(id).await,
        }
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.user_by_name(name)),
            AuthStore::Valkey(v) => v.user_by_name(name).await,
        }
    }

    /// Stores a new user; `false` (and nothing stored) when the name is taken.
    pub async fn create_user(&self, user: &User) -> Result<bool, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.create_user(user)),
            AuthStore::Valkey(v) => v.create_user(user).await,
        }
    }

    /// Replaces a stored user's record (its name unchanged).
    pub async fn put_user(&self, user: &User) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.put_user(user);
                Ok(())
            }
            AuthStore::Valkey(v) => v.put_user(user).await,
        }
    }

    pub async fn delete_user(&self, user: &User) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.delete_user(user);
                Ok(())
            }
            AuthStore::Valkey(v) => v.delete_user(user).await,
        }
    }

    pub async fn users(&self) -> Result<Vec<User>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.users()),
            AuthStore::Valkey(v) => v.users().await,
        }
    }

    pub async fn put_refresh(&self, row: &RefreshRow) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.put_refresh(row);
                Ok(())
            }
            AuthStore::Valkey(v) => v.put_refresh(row).await,
        }
    }

    pub async fn refresh(&self, jti: &str) -> Result<Option<RefreshRow>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.refresh(jti)),
            AuthStore::Valkey(v) => v.refresh(jti).await,
        }
    }

    /// Atomically marks a live token rotated; `false` when it already was revoked (another
    /// refresh won the race, or it was revoked meanwhile).
    pub async fn rotate(&self, jti: &str) -> Result<bool, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.rotate(jti)),
            AuthStore::Valkey(v) => v.rotate(jti).await,
        }
    }

    pub async fn revoke(&self, jti: &str, reason: RevokedReason) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.revoke(jti, reason);
                Ok(())
            }
            AuthStore::Valkey(v) => v.revoke(jti, reason).await,
        }
    }

    /// Every refresh token of a user (revoked ones included).
    pub async fn refresh_of_user(&self, user_id: &str) -> Result<Vec<RefreshRow>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.refresh_of_user(user_id)),
            AuthStore::Valkey(v) => v.refresh_of_user(user_id).await,
        }
    }

    /// Deny-lists an access token until `until` (Unix seconds, its expiry).
    pub async fn deny(&self, jti: &str, until: u64) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.deny(jti, until);
                Ok(())
            }
            AuthStore::Valkey(v) => v.deny(jti, until).await,
        }
    }

    pub async fn is_denied(&self, jti: &str) -> Result<bool, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.is_denied(jti)),
            AuthStore::Valkey(v) => v.is_denied(jti).await,
        }
    }

    /// Records that `user_id`'s tokens issued before `at` (Unix seconds) no longer count;
    /// kept for `keep` (the longest an access token lives), after which none are left.
    pub async fn disconnect(
        &self,
        user_id: &str,
        at: u64,
        keep: std::time::Duration,
    ) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.disconnect(user_id, at);
                Ok(())
            }
            AuthStore::Valkey(v) => v.disconnect(user_id, at, keep).await,
        }
    }

    pub async fn disconnected_at(&self, user_id: &str) -> Result<Option<u64>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.disconnected_at(user_id)),
            AuthStore::Valkey(v) => v.disconnected_at(user_id).await,
        }
    }

    /// Stores a new key. The generation does not move: no cache holds a key not yet made.
    pub async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.put_api_key(key, false);
                Ok(())
            }
            AuthStore::Valkey(v) => v.put_api_key(key, false).await,
        }
    }

    /// Stores a key's revocation (the generation moves: caches drop it).
    pub async fn revoke_api_key(&self, key: &ApiKeyRecord) -> Result<(), AuthError> {
        let revoked = ApiKeyRecord {
            revoked: true,
            ..key.clone()
        };
        match self {
            AuthStore::Memory(db) => {
                db.put_api_key(&revoked, true);
                Ok(())
            }
            AuthStore::Valkey(v) => v.put_api_key(&revoked, true).await,
        }
    }

    pub async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.api_key(key_id)),
            AuthStore::Valkey(v) => v.api_key(key_id).await,
        }
    }

    /// The keys `user_id` owns, revoked ones included, oldest first.
    pub async fn api_keys_of(&self, user_id: &str) -> Result<Vec<ApiKeyRecord>, AuthError> {
        let mut keys = match self {
            AuthStore::Memory(db) => db.api_keys_of(user_id),
            AuthStore::Valkey(v) => v.api_keys_of(user_id).await?,
        };
        keys.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.key_id.cmp(&b.key_id))
        });
        Ok(keys)
    }

    /// Creates a topic record; `false` when the owner already has one of that name.
    pub async fn create_topic(&self, topic: &TopicRecord) -> Result<bool, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.create_topic(topic)),
            AuthStore::Valkey(v) => v.create_topic(topic).await,
        }
    }

    pub async fn topic(&self, owner: &str, name: &str) -> Result<Option<TopicRecord>, AuthError> {
        match self {
            AuthStore::Memory(db) => Ok(db.topic(owner, name)),
            AuthStore::Valkey(v) => v.topic(owner, name).await,
        }
    }

    pub async fn delete_topic(&self, owner: &str, name: &str) -> Result<(), AuthError> {
        match self {
            AuthStore::Memory(db) => {
                db.delete_topic(owner, name);
                Ok(())
            }
            AuthStore::Valkey(v) => v.delete_topic(owner, name).await,
        }
    }
}

/// Unix seconds as the Python relay stores instants: ISO 8601 with microseconds and `+00:00`.
pub fn iso8601(unix_secs: u64) -> String {
    let formatted = humantime::format_rfc3339_micros(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs),
    )
    .to_string();
    match formatted.strip_suffix('Z') {
        Some(naive) => format!("{naive}+00:00"),
        None => formatted,
    }
}

/// The Unix seconds of an instant the Python relay stored (`…+00:00` or `…Z`).
pub fn parse_iso8601(text: &str) -> Option<u64> {
    let text = text.trim();
    let utc = match text.strip_suffix("+00:00") {
        Some(naive) => format!("{naive}Z"),
        None => text.to_owned(),
    };
    let at = humantime::parse_rfc3339_weak(&utc)
        .or_else(|_| humantime::parse_rfc3339(&utc))
        .ok()?;
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_in_the_python_form() {
        let text = iso8601(1_796_000_000);
        assert_eq!(text, "2026-11-30T00:53:20.000000+00:00");
        assert_eq!(parse_iso8601(&text), Some(1_796_000_000));
        assert_eq!(
            parse_iso8601("2026-11-30T00:53:20.123456+00:00"),
            Some(1_796_000_000)
        );
        assert_eq!(parse_iso8601("2026-11-30T00:53:20Z"), Some(1_796_000_000));
        assert_eq!(parse_iso8601("yesterday"), None);
    }
}
