//! Static API keys: long-lived credentials for producers (a job runner posting status), owned
//! by a built-in user and revocable.
//!
//! A key reads `prk_<key id>.<secret>`: the id finds the record, the secret (256 random bits)
//! is compared with the stored SHA-256 digest in constant time. A fast hash is enough for a
//! secret of full entropy (nothing to guess by dictionary), and keeps a cache miss cheap;
//! the secret is shown once, at creation. The key acts in its owner's namespace with its own
//! grants ([`super::grant`]), never beyond the owner's current permissions: demoting or
//! deactivating the owner narrows or stops the key at once, like a revocation (every change
//! bumps the generation the shards' caches follow).

use subtle::ConstantTimeEq;

use super::session::{random_secret, sha256_hex};
use super::store::{iso8601, ApiKeyRecord};
use super::{Auth, AuthError, CredentialKind, Grants, Principal, Refusal, UserPrincipal};
use crate::clock::now_ms;

/// What every key starts with, so the entrance (and a secret scanner) knows one at a glance.
pub const PREFIX: &str = "prk_";

/// `(key id, secret)` of a presented key; `None` when it is not shaped like one. The id is
/// what the relay makes (32 lowercase hex digits), so nothing else a client writes reaches a
/// storage key.
pub fn split(key: &str) -> Option<(&str, &str)> {
    let (id, secret) = key.strip_prefix(PREFIX)?.split_once('.')?;
    let id_ok = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (id_ok && !secret.is_empty()).then_some((id, secret))
}

/// A key just created: the record and the one time its text is known.
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    pub key: String,
}

impl Auth {
    /// Creates a key for `user_id` with `grants` (already checked against what the creator may
    /// hand out).
    pub async fn create_api_key(
        &self,
        user_id: &str,
        name: &str,
        grants: &Grants,
    ) -> Result<CreatedKey, AuthError> {
        let key_id = uuid::Uuid::new_v4().simple().to_string();
        let secret = random_secret();
        let record = ApiKeyRecord {
            key_id: key_id.clone(),
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            secret_hash: sha256_hex(&secret),
            grants: grants.entries(),
            created_at: iso8601(now_ms() / 1000),
            revoked: false,
        };
        self.store.create_api_key(&record).await?;
        Ok(CreatedKey {
            key: format!("{PREFIX}{key_id}.{secret}"),
            record,
        })
    }

    /// Revokes a key; `false` when there is no such key.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<bool, AuthError> {
        let Some(record) = self.store.api_key(key_id).await? else {
            return Ok(false);
        };
        if !record.revoked {
            self.store.revoke_api_key(&record).await?;
            self.invalidate();
        }
        Ok(true)
    }

    /// The principal of a presented key: its record found, its secret matching, not revoked,
    /// its owner active.
    pub(super) async fn authenticate_api_key(&self, key: &str) -> Result<Principal, AuthError> {
        let invalid = AuthError::Unauthenticated(Refusal::Invalid);
        let (key_id, secret) = split(key).ok_or(invalid.clone())?;
        let record = self.api_key_record(key_id).await?.ok_or(invalid.clone())?;
        let presented = sha256_hex(secret);
        let equal: bool = presented
            .as_bytes()
            .ct_eq(record.secret_hash.as_bytes())
            .into();
        if !equal {
            return Err(invalid);
        }
        if record.revoked {
            return Err(AuthError::Unauthenticated(Refusal::Revoked));
        }
        let owner = self
            .user(&record.user_id)
            .await?
            .ok_or(AuthError::Unauthenticated(Refusal::UnknownUser))?;
        if !owner.active {
            return Err(AuthError::Inactive);
        }
        let grants = Grants::parse_lenient(record.grants.iter().map(String::as_str));
        Ok(Principal {
            grants: grants.within(owner.permissions),
            user: Some(UserPrincipal {
                user_id: owner.id,
                username: owner.username,
                token_id: None,
                expires_at: u64::MAX,
                issued_at: 0,
                credential: CredentialKind::ApiKey {
                    key_id: record.key_id,
                },
            }),
        })
    }

    /// Whether a key still stands (for open streams): not revoked, its owner active.
    pub(super) async fn api_key_still_valid(&self, key_id: &str) -> Result<bool, AuthError> {
        Ok(self
            .api_key_record(key_id)
            .await?
            .is_some_and(|k| !k.revoked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_id_and_secret() {
        const ID: &str = "0123456789abcdef0123456789abcdef";
        assert_eq!(split(&format!("prk_{ID}.def")), Some((ID, "def")));
        assert_eq!(split(&format!("prk_{ID}.de.f")), Some((ID, "de.f")));
        let upper = ID.to_uppercase();
        for bad in [
            format!("{ID}.def"),
            "prk_.def".to_owned(),
            format!("prk_{ID}."),
            format!("prk_{ID}"),
            format!("Bearer prk_{ID}.b"),
            "prk_user:u1.x".to_owned(),
            format!("prk_{upper}.x"),
            format!("prk_{ID}0.x"),
        ] {
            assert_eq!(split(&bad), None, "{bad:?}");
        }
    }
}
