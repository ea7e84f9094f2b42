//! Tokens issued elsewhere (an identity provider, a job scheduler): their verification and
//! what their claims grant.
//!
//! One algorithm is accepted, the configured one: a token naming another is refused before its
//! signature is looked at, and jsonwebtoken refuses a key of another family, so neither
//! `alg: none` nor an HS256 token keyed with an RSA public key gets through. `exp` is required;
//! `nbf`, `iss` and `aud` are checked (the last two when configured) with the configured
//! leeway for the issuer's clock.
//!
//! The claims map to a principal: the subject claim names it (`ext:<subject>`, for rate limits
//! and logs), the permissions claim grants it ([`super::grant`]: `read`, `write`, `admin`,
//! `read:jobs.*`, as a JSON list or a space-separated OAuth `scope`). External principals have
//! no user record and no namespace: their topic names are the shared space's, and topic
//! patterns are how an issuer confines them.
//!
//! Keys: a secret, a PEM public key, or a JWKS document refreshed in the background
//! ([`super::jwks`]). Shared by every shard (`Send + Sync`); verification runs on the shard
//! only when its per-token cache misses.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::Jwks;
use super::Grants;
use crate::config::{ExternalJwtConfig, ExternalKeySource};

/// Verifies external tokens with the configured keys.
pub struct ExternalVerifier {
    validation: Validation,
    keys: Keys,
    permissions_claim: String,
    subject_claim: String,
}

enum Keys {
    Fixed(DecodingKey),
    Jwks(Arc<Jwks>),
}

/// What an external token says, once verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalClaims {
    pub subject: String,
    pub grants: Grants,
    /// Unix seconds.
    pub expires_at: u64,
    pub issued_at: u64,
}

/// Why an external token was refused: for the log (at debug), never for the client, which is
/// told "Invalid or expired token" whatever the cause.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExternalRefusal {
    #[error("{0}")]
    Invalid(String),
    #[error("no key with id {0:?} in the key set")]
    UnknownKey(Option<String>),
    #[error("no `{0}` claim naming the subject")]
    NoSubject(String),
}

impl ExternalVerifier {
    /// Builds the verifier; for a JWKS URL this fetches the key set once and starts its
    /// refresh thread (a failed first fetch is logged and retried: tokens are refused until
    /// keys arrive).
    pub fn new(config: &ExternalJwtConfig) -> Result<ExternalVerifier, String> {
        let keys = match &config.key {
            ExternalKeySource::Secret(secret) => Keys::Fixed(
                DecodingKey::from_secret(secret.expose().as_bytes())
                    .map_err(|e| format!("auth.external.secret: {e}"))?,
            ),
            ExternalKeySource::PublicKeyPem(pem) => {
                Keys::Fixed(decoding_key_from_pem(config.algorithm, pem)?)
            }
            ExternalKeySource::Jwks { url, refresh } => {
                Keys::Jwks(Jwks::start(url.clone(), config.algorithm, *refresh))
            }
        };
        Ok(ExternalVerifier::with_keys(config, keys))
    }

    fn with_keys(config: &ExternalJwtConfig, keys: Keys) -> ExternalVerifier {
        let mut validation = Validation::new(config.algorithm);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &config.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        ExternalVerifier {
            validation,
            keys,
            permissions_claim: config.permissions_claim.clone(),
            subject_claim: config.subject_claim.clone(),
        }
    }

    /// The key set's refresh state, for metrics; `None` without a JWKS URL.
    pub fn jwks(&self) -> Option<&Jwks> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Fixed(_) => None,
        }
    }

    /// Changes whenever the keys do (a JWKS refresh that brought a different set); fixed
    /// keys never change.
    pub fn keys_version(&self) -> u64 {
        self.jwks().map_or(0, Jwks::version)
    }

    pub fn verify(&self, token: &str) -> Result<ExternalClaims, ExternalRefusal> {
        let invalid = |e: jsonwebtoken::errors::Error| ExternalRefusal::Invalid(e.to_string());
        let data = match &self.keys {
            Keys::Fixed(key) => {
                jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
                    .map_err(invalid)?
            }
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                let Some(key) = jwks.key(header.kid.as_deref()) else {
                    jwks.request_refresh();
                    return Err(ExternalRefusal::UnknownKey(header.kid));
                };
                jsonwebtoken::decode::<Map<String, Value>>(token, &key, &self.validation)
                    .map_err(invalid)?
            }
        };
        let claims = data.claims;
        let subject = match claims.get(&self.subject_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(ExternalRefusal::NoSubject(self.subject_claim.clone())),
        };
        let grants = match claims.get(&self.permissions_claim) {
            Some(Value::Array(entries)) => {
                Grants::parse_lenient(entries.iter().filter_map(Value::as_str))
            }
            Some(Value::String(scope)) => Grants::parse_lenient(scope.split_ascii_whitespace()),
            _ => Grants::default(),
        };
        // NumericDate may have a fraction (RFC 7519 §2); whole seconds are enough here.
        let seconds = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
        };
        Ok(ExternalClaims {
            subject,
            grants,
            // Required and checked above, with the leeway; a stream lives as long as the
            // token would still be accepted.
            expires_at: seconds("exp")
                .unwrap_or(0)
                .saturating_add(self.validation.leeway),
            issued_at: seconds("iat").unwrap_or(0),
        })
    }
}

/// The public key of a PEM file for `algorithm`'s family.
fn decoding_key_from_pem(algorithm: Algorithm, pem: &[u8]) -> Result<DecodingKey, String> {
    let key = match algorithm {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        other => return Err(format!("{other:?} takes a secret, not a public key")),
    };
    key.map_err(|e| format!("auth.external.public_key_file: not a {algorithm:?} public key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Permission;
    use crate::clock::now_ms;
    use crate::config::Secret;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::time::Duration;

    const SECRET: &str = "an external issuer's secret of 32+ bytes";

    fn config(issuer: Option<&str>, audience: Option<&str>) -> ExternalJwtConfig {
        ExternalJwtConfig {
            algorithm: Algorithm::HS256,
            key: ExternalKeySource::Secret(Secret::new(SECRET)),
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            leeway: Duration::from_secs(30),
            permissions_claim: "permissions".to_owned(),
            subject_claim: "sub".to_owned(),
        }
    }

    fn sign(alg: Algorithm, claims: &Value) -> String {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
        jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("sign")
    }

    fn now() -> u64 {
        now_ms() / 1000
    }

    #[test]
    fn claims_map_to_subject_and_grants() {
        let verifier = ExternalVerifier::new(&config(None, None)).expect("verifier");
        let token = sign(
            Algorithm::HS256,
            &json!({"sub": "runner-7", "exp": now() + 60, "iat": now(),
                    "permissions": ["write", "read:jobs.*", "openid"]}),
        );
        let claims = verifier.verify(&token).expect("valid");
        assert_eq!(claims.subject, "runner-7");
        assert!(claims.grants.allows(Permission::Write, "anything"));
        assert!(claims.grants.allows(Permission::Read, "jobs.1"));
        assert!(!claims.grants.allows(Permission::Read, "other"));
        let scope = sign(
            Algorithm::HS256,
            &json!({"sub": "s", "exp": now() + 60, "permissions": "openid read:jobs.* email"}),
        );
        let claims = verifier.verify(&scope).expect("valid");
        assert_eq!(claims.grants.entries(), ["read:jobs.*"]);
    }

    #[test]
    fn a_fractional_exp_is_its_whole_seconds_plus_the_leeway() {
        let verifier = ExternalVerifier::new(&config(None, None)).expect("verifier");
        let iat = now();
        let exp = iat + 60;
        let token = sign(
            Algorithm::HS256,
            &json!({"sub": "s", "exp": exp as f64 + 0.5, "iat": iat as f64 + 0.25}),
        );
        let claims = verifier.verify(&token).expect("valid");
        assert_eq!(claims.expires_at, exp + 30);
        assert_eq!(claims.issued_at, iat);
    }

    #[test]
    fn every_registered_claim_is_checked() {
        let verifier =
            ExternalVerifier::new(&config(Some("https://idp"), Some("relay"))).expect("verifier");
        let base = json!({"sub": "s", "iss": "https://idp", "aud": "relay",
                          "exp": now() + 60, "permissions": ["read"]});
        assert!(verifier.verify(&sign(Algorithm::HS256, &base)).is_ok());
        let with = |key: &str, value: Value| {
            let mut claims = base.clone();
            claims[key] = value;
            sign(Algorithm::HS256, &claims)
        };
        let without = |key: &str| {
            let mut claims = base.clone();
            claims.as_object_mut().expect("object").remove(key);
            sign(Algorithm::HS256, &claims)
        };
        let refused = [
            ("expired beyond leeway", with("exp", json!(now() - 31))),
            ("not yet valid", with("nbf", json!(now() + 120))),
            ("other issuer", with("iss", json!("https://evil"))),
            ("other audience", with("aud", json!(["other"]))),
            ("no exp", without("exp")),
            ("no iss", without("iss")),
            ("no aud", without("aud")),
            ("no subject", without("sub")),
            ("HS512", sign(Algorithm::HS512, &base)),
        ];
        for (what, token) in refused {
            assert!(verifier.verify(&token).is_err(), "{what} accepted");
        }
        // Within the leeway, both ways.
        assert!(verifier.verify(&with("exp", json!(now() - 5))).is_ok());
        assert!(verifier.verify(&with("nbf", json!(now() + 5))).is_ok());
        assert!(verifier
            .verify(&with("aud", json!(["other", "relay"])))
            .is_ok());
    }
}
