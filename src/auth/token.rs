//! Access tokens: HS256 JWTs with the Python relay's claims, so a token either relay issued
//! with the shared secret is good on the other.
//!
//! Claims: `sub` (the user id), `username`, `permissions` (informational: permissions always
//! come from the stored user, so a demotion applies before the token expires), `exp`, `iat`
//! (Unix seconds) and `jti` (a random id, deny-listed on logout). `exp` is checked without
//! leeway, as there; the algorithm is pinned to HS256, so a token cannot pick its own.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: String,
    pub username: String,
    #[serde(default)]
    pub permissions: Vec<String>,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// Signs and verifies access tokens with one secret.
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

/// A token that is not ours, not intact or no longer valid; deliberately not told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken;

/// A freshly issued access token.
pub struct Issued {
    pub token: String,
    /// Seconds until it expires (`expires_in` of the token response).
    pub expires_in: u64,
    pub jti: String,
}

impl Signer {
    /// Fails on a key the HMAC refuses (empty; configuration requires 32 bytes or more).
    pub fn new(secret: &[u8], ttl: Duration) -> Result<Signer, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let key_error = |e: jsonwebtoken::errors::Error| format!("unusable JWT secret: {e}");
        Ok(Signer {
            encoding: EncodingKey::from_secret(secret).map_err(key_error)?,
            decoding: DecodingKey::from_secret(secret).map_err(key_error)?,
            validation,
            ttl,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for `user_id`/`username` valid for the configured lifetime from now.
    pub fn issue(&self, user_id: &str, username: &str, permissions: Vec<String>) -> Issued {
        self.issue_at(user_id, username, permissions, now_ms() / 1000)
    }

    /// [`Signer::issue`] as if it were Unix second `now` (tests mint expired tokens with it).
    pub fn issue_at(
        &self,
        user_id: &str,
        username: &str,
        permissions: Vec<String>,
        now: u64,
    ) -> Issued {
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let claims = AccessClaims {
            sub: user_id.to_owned(),
            username: username.to_owned(),
            permissions,
            exp: now + self.ttl.as_secs(),
            iat: now,
            jti: Some(jti.clone()),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            // HS256 signing of a serializable struct has no failure path.
            .expect("HS256 signing cannot fail");
        Issued {
            token,
            expires_in: self.ttl.as_secs(),
            jti,
        }
    }

    pub fn verify(&self, token: &str) -> Result<AccessClaims, InvalidToken> {
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map_err(|_| InvalidToken)?;
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn issued_tokens_verify_and_carry_the_python_claims() {
        let signer = Signer::new(SECRET, Duration::from_secs(600)).expect("key");
        let issued = signer.issue("u1", "alice", vec!["read".into()]);
        assert_eq!(issued.expires_in, 600);
        let claims = signer.verify(&issued.token).expect("valid");
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.username, "alice");
        assert_eq!(claims.exp - claims.iat, 600);
        assert_eq!(claims.jti.as_deref(), Some(issued.jti.as_str()));
        assert_eq!(issued.jti.len(), 32);
    }

    #[test]
    fn other_secrets_algorithms_expiry_and_garbage_are_refused() {
        let signer = Signer::new(SECRET, Duration::from_secs(600)).expect("key");
        let other = Signer::new(
            b"another secret of at least 32 bytes!",
            Duration::from_secs(600),
        )
        .expect("key");
        let issued = other.issue("u1", "alice", vec![]);
        assert_eq!(signer.verify(&issued.token), Err(InvalidToken));
        let now = now_ms() / 1000;
        let expired = AccessClaims {
            sub: "u1".into(),
            username: "alice".into(),
            permissions: vec![],
            exp: now - 1,
            iat: now - 601,
            jti: None,
        };
        let key = EncodingKey::from_secret(SECRET).expect("key");
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key).expect("sign");
        assert_eq!(signer.verify(&token), Err(InvalidToken));
        // `alg: none` and another HMAC are refused: the algorithm is pinned.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &AccessClaims {
                exp: now + 60,
                ..expired.clone()
            },
            &key,
        )
        .expect("sign");
        assert_eq!(signer.verify(&hs512), Err(InvalidToken));
        let unsigned = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                serde_json::to_vec(&AccessClaims {
                    exp: now + 60,
                    ..expired
                })
                .expect("json")
            )
        );
        assert_eq!(signer.verify(&unsigned), Err(InvalidToken));
        for garbage in ["", "a.b.c", "not a token", "...."] {
            assert_eq!(signer.verify(garbage), Err(InvalidToken), "{garbage:?}");
        }
    }
}
