//! The token life cycle, transport-free: password login, refresh with rotation and replay
//! detection, revocation, logout, sessions, and user management, as the Python relay has them.
//!
//! Refresh tokens are opaque `<jti>.<secret>`: the jti names the stored row, the secret (32
//! random bytes, URL-safe base64) is kept only as its SHA-256 and compared in constant time.
//! A refresh marks the row `rotated` (an atomic compare-and-set) and issues a child row; a
//! rotated token presented again is a replay: its whole chain (the connected rows through
//! `parent_jti`) is revoked, the thief's and the owner's alike, as in the Python relay.

use std::collections::{HashSet, VecDeque};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::password;
use super::store::{iso8601, RefreshRow, RevokedReason, User};
use super::{Auth, AuthError, Permissions};
use crate::clock::now_ms;

/// What a successful login or refresh returns (the Python relay's `TokenResponse`).
#[derive(Debug)]
pub struct Tokens {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: String,
}

/// Why a login failed.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    /// Unknown user or wrong password (not told apart).
    BadCredentials,
    Inactive,
    Auth(AuthError),
}

impl From<AuthError> for LoginError {
    fn from(e: AuthError) -> LoginError {
        LoginError::Auth(e)
    }
}

/// Why a refresh failed.
#[derive(Debug, PartialEq, Eq)]
pub enum RefreshError {
    /// Malformed, unknown, wrong secret, revoked, expired or replayed.
    Invalid,
    /// The user was deleted or deactivated (the token is revoked too).
    UserGone,
    Auth(AuthError),
}

impl From<AuthError> for RefreshError {
    fn from(e: AuthError) -> RefreshError {
        RefreshError::Auth(e)
    }
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

pub(crate) fn sha256_hex(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

pub(crate) fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
}

/// `<jti>.<secret>` split at the first `.`; `None` when either half is empty.
pub fn split_refresh_token(token: &str) -> Option<(&str, &str)> {
    let (jti, secret) = token.split_once('.')?;
    (!jti.is_empty() && !secret.is_empty()).then_some((jti, secret))
}

impl Auth {
    fn signer_or_off(&self) -> Result<&super::token::Signer, AuthError> {
        self.signer
            .as_ref()
            .ok_or(AuthError::Forbidden("authentication is off".to_owned()))
    }

    /// Checks a password (off the shard's executor) and issues tokens.
    pub async fn login(&self, username: &str, password: &str) -> Result<Tokens, LoginError> {
        self.signer_or_off()?;
        let user = self.store.user_by_name(username).await?;
        let phc = user
            .as_ref()
            .map(|u| u.password_hash.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| password::dummy_hash().to_owned());
        let matches = password::verify_off_shard(password.to_owned(), phc).await;
        let user = match user {
            Some(user) if matches && !user.password_hash.is_empty() => user,
            _ => return Err(LoginError::BadCredentials),
        };
        if !user.active {
            return Err(LoginError::Inactive);
        }
        Ok(self.issue(&user, None, "password-login").await?)
    }

    /// A new access token and a new refresh row (a child of `parent`, if rotating).
    async fn issue(
        &self,
        user: &User,
        parent: Option<&RefreshRow>,
        client_hint: &str,
    ) -> Result<Tokens, AuthError> {
        let signer = self.signer_or_off()?;
        let access = signer.issue(
            &user.id,
            &user.username,
            user.permissions
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        );
        let jti = uuid::Uuid::new_v4().to_string();
        let secret = random_secret();
        let now = now_secs();
        let row = RefreshRow {
            jti: jti.clone(),
            user_id: user.id.clone(),
            secret_hash: sha256_hex(&secret),
            parent_jti: parent.map(|p| p.jti.clone()),
            issued_at: now,
            expires_at: now + self.config.refresh_token_ttl.as_secs(),
            last_used_at: None,
            revoked: None,
            client_hint: client_hint.to_owned(),
        };
        self.store.put_refresh(&row).await?;
        Ok(Tokens {
            access_token: access.token,
            expires_in: access.expires_in,
            refresh_token: format!("{jti}.{secret}"),
        })
    }

    /// The row of a refresh token whose secret matches, else `None`.
    async fn verified_row(&self, token: &str) -> Result<Option<RefreshRow>, AuthError> {
        let Some((jti, secret)) = split_refresh_token(token) else {
            return Ok(None);
        };
        let Some(row) = self.store.refresh(jti).await? else {
            return Ok(None);
        };
        let presented = sha256_hex(secret);
        let equal: bool = presented
            .as_bytes()
            .ct_eq(row.secret_hash.as_bytes())
            .into();
        Ok(equal.then_some(row))
    }

    /// Rotates a refresh token: the old one is spent, a new pair is returned.
    pub async fn refresh(&self, token: &str) -> Result<Tokens, RefreshError> {
        self.signer_or_off()?;
        let row = self
            .verified_row(token)
            .await?
            .ok_or(RefreshError::Invalid)?;
        match row.revoked {
            Some(RevokedReason::Rotated) => {
                self.revoke_chain(&row, RevokedReason::Replay).await?;
                return Err(RefreshError::Invalid);
            }
            Some(_) => return Err(RefreshError::Invalid),
            None => {}
        }
        if row.expires_at <= now_secs() {
            self.store.revoke(&row.jti, RevokedReason::Expired).await?;
            return Err(RefreshError::Invalid);
        }
        let user = match self.store.user_by_id(&row.user_id).await? {
            Some(user) if user.active => user,
            _ => {
                self.store.revoke(&row.jti, RevokedReason::Logout).await?;
                return Err(RefreshError::UserGone);
            }
        };
        if !self.store.rotate(&row.jti).await? {
            // Another refresh of the same token won the race: a replay.
            self.revoke_chain(&row, RevokedReason::Replay).await?;
            return Err(RefreshError::Invalid);
        }
        self.invalidate();
        let hint = row.client_hint.clone();
        let tokens = self.issue(&user, Some(&row), &hint).await?;
        // A concurrent replay of the same token marks it `replay` before it looks for the
        // chain (see `revoke_chain`): either it finds the child stored above, or this read
        // sees its mark and the child is revoked here. Without this, a replay that read the
        // chain between the rotation and the child's storing missed the child.
        let parent = self.store.refresh(&row.jti).await?;
        if parent.is_none_or(|p| p.revoked != Some(RevokedReason::Rotated)) {
            if let Some((child, _)) = split_refresh_token(&tokens.refresh_token) {
                self.store.revoke(child, RevokedReason::Replay).await?;
            }
            self.invalidate();
            return Err(RefreshError::Invalid);
        }
        Ok(tokens)
    }

    /// Revokes every row connected to `row` through `parent_jti` (up and down).
    pub async fn revoke_chain(
        &self,
        row: &RefreshRow,
        reason: RevokedReason,
    ) -> Result<(), AuthError> {
        // The presented token first: a refresh that rotated it and is storing its child
        // checks this mark after storing (see `refresh`), so no child escapes the walk below.
        self.store.revoke(&row.jti, reason).await?;
        let rows = self.store.refresh_of_user(&row.user_id).await?;
        let mut chain: HashSet<String> = HashSet::new();
        let mut queue = VecDeque::from([row.jti.clone()]);
        while let Some(jti) = queue.pop_front() {
            if !chain.insert(jti.clone()) {
                continue;
            }
            for r in &rows {
                if r.parent_jti.as_deref() == Some(jti.as_str()) {
                    queue.push_back(r.jti.clone());
                }
                if r.jti == jti {
                    if let Some(parent) = &r.parent_jti {
                        queue.push_back(parent.clone());
                    }
                }
            }
        }
        for jti in chain {
            self.store.revoke(&jti, reason).await?;
        }
        self.invalidate();
        Ok(())
    }

    /// `/auth/token/revoke`: revokes the token (and its chain if asked) when it verifies;
    /// silent otherwise, so the endpoint is no oracle.
    pub async fn revoke_refresh(&self, token: &str, chain: bool) -> Result<(), AuthError> {
        let Some(row) = self.verified_row(token).await? else {
            return Ok(());
        };
        if chain {
            self.revoke_chain(&row, RevokedReason::Logout).await
        } else {
            self.store.revoke(&row.jti, RevokedReason::Logout).await
        }
    }

    /// `/auth/logout`: deny-lists the access token for the rest of its life.
    pub async fn logout(&self, token_id: &str, expires_at: u64) -> Result<(), AuthError> {
        self.store.deny(token_id, expires_at).await?;
        self.invalidate();
        Ok(())
    }

    /// A user's live refresh tokens.
    pub async fn sessions(&self, user_id: &str) -> Result<Vec<RefreshRow>, AuthError> {
        let mut rows: Vec<RefreshRow> = self
            .store
            .refresh_of_user(user_id)
            .await?
            .into_iter()
            .filter(|r| r.revoked.is_none())
            .collect();
        rows.sort_by_key(|r| r.issued_at);
        Ok(rows)
    }

    /// Revokes one of `user_id`'s sessions; `false` when it has no such session.
    pub async fn revoke_session(&self, user_id: &str, jti: &str) -> Result<bool, AuthError> {
        match self.store.refresh(jti).await? {
            Some(row) if row.user_id == user_id => {
                self.store.revoke(jti, RevokedReason::Logout).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Creates a user; `None` when the name is taken.
    pub async fn create_user(
        &self,
        username: &str,
        email: &str,
        password: &str,
        permissions: Permissions,
    ) -> Result<Option<User>, AuthError> {
        let user = User {
            id: uuid::Uuid::new_v4().to_string(),
            username: username.to_owned(),
            email: email.to_owned(),
            password_hash: password::hash_off_shard(password.to_owned()).await,
            active: true,
            created_at: iso8601(now_secs()),
            permissions,
            owned_topics: Vec::new(),
        };
        let created = self.store.create_user(&user).await?;
        self.invalidate();
        Ok(created.then_some(user))
    }

    /// Stores a changed user (through every shard's cache).
    pub async fn update_user(&self, user: &User) -> Result<(), AuthError> {
        self.store.put_user(user).await?;
        self.invalidate();
        Ok(())
    }

    /// Deletes a user and revokes all its refresh tokens.
    pub async fn delete_user(&self, user: &User) -> Result<(), AuthError> {
        for row in self.store.refresh_of_user(&user.id).await? {
            if row.revoked.is_none() {
                self.store.revoke(&row.jti, RevokedReason::Admin).await?;
            }
        }
        self.store.delete_user(user).await?;
        self.invalidate();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_split_at_the_first_dot() {
        assert_eq!(split_refresh_token("a.b.c"), Some(("a", "b.c")));
        assert_eq!(split_refresh_token("a."), None);
        assert_eq!(split_refresh_token(".b"), None);
        assert_eq!(split_refresh_token("ab"), None);
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let (a, b) = (random_secret(), random_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(sha256_hex("abc").len(), 64);
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
