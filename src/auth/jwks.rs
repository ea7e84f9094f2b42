//! An external issuer's JSON Web Key Set, kept fresh on a thread of its own.
//!
//! Fetched once at start-up, then every `auth.external.jwks_refresh`, and early when a token
//! names a key id the set lacks (an issuer's key rotation shows first that way), at most once
//! per [`MIN_REFRESH_GAP`] however many such tokens arrive. A failed fetch keeps the keys
//! held so far; only keys usable with the pinned algorithm are kept (a key that declares
//! another `alg`, an encryption key or another key type is skipped).
//!
//! Blocking HTTP (`ureq`, TLS by rustls) on a plain thread: never on a shard's executor, whose
//! thread must not wait on the network. Shards read the current set under a mutex only when
//! their per-token cache misses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Early refreshes (unknown key ids) are at most this frequent (or as the periodic refresh,
/// when that is shorter), so a flood of tokens with made-up key ids costs the issuer one
/// request per gap.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(30);

/// While no key has ever been fetched, retry this often rather than every `refresh`.
const RETRY_WITHOUT_KEYS: Duration = Duration::from_secs(10);

/// One fetch: connect, send and read the answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A key set is a few KiB; anything near this is not one.
const MAX_DOCUMENT_BYTES: u64 = 1 << 20;

/// The key set and its refresh thread's state.
pub struct Jwks {
    url: String,
    algorithm: Algorithm,
    refresh: Duration,
    state: Mutex<State>,
    wake: Condvar,
    refreshes_ok: AtomicU64,
    refreshes_failed: AtomicU64,
    /// Bumped whenever a fetch brings a different document: the shards drop the principals
    /// they verified with the old set (a key taken out of the set is taken out at once).
    version: AtomicU64,
}

struct State {
    keys: Arc<KeySet>,
    /// A token named an unknown key id since the last fetch.
    requested: bool,
    /// The document the keys came from, to tell a changed set from the same one again.
    document: Vec<u8>,
}

/// The usable keys, by key id.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<(Option<String>, DecodingKey)>,
}

impl KeySet {
    /// The key `kid` names; without a `kid` (or one the set does not name), the only key
    /// there is when the set has a single key without an id (some issuers publish one key and
    /// still put a `kid` in tokens).
    fn find(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        let named = kid.and_then(|kid| {
            self.keys
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid))
                .map(|(_, key)| key)
        });
        named.or_else(|| match self.keys.as_slice() {
            [(None, key)] => Some(key),
            [(_, key)] if kid.is_none() => Some(key),
            _ => None,
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Refresh counts and the number of keys held, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JwksStats {
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
    pub keys: u64,
}

impl Jwks {
    /// Fetches the set once (a failure is logged: tokens are refused until a later fetch
    /// succeeds) and starts the refresh thread, which lives as long as the process.
    pub fn start(url: String, algorithm: Algorithm, refresh: Duration) -> Arc<Jwks> {
        let jwks = Arc::new(Jwks {
            url,
            algorithm,
            refresh,
            state: Mutex::new(State {
                keys: Arc::new(KeySet::default()),
                requested: false,
                document: Vec::new(),
            }),
            wake: Condvar::new(),
            refreshes_ok: AtomicU64::new(0),
            refreshes_failed: AtomicU64::new(0),
            version: AtomicU64::new(0),
        });
        jwks.refresh_now();
        let thread = jwks.clone();
        let spawned = std::thread::Builder::new()
            .name("jwks-refresh".to_owned())
            .spawn(move || thread.refresh_loop());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the JWKS refresh thread; keys stay as fetched");
        }
        jwks
    }

    /// The key for a token's `kid`, if the set has it.
    pub fn key(&self, kid: Option<&str>) -> Option<DecodingKey> {
        let keys = self.lock().keys.clone();
        keys.find(kid).cloned()
    }

    /// Asks the refresh thread to fetch the set soon (within [`MIN_REFRESH_GAP`]).
    pub fn request_refresh(&self) {
        let mut state = self.lock();
        if !state.requested {
            state.requested = true;
            self.wake.notify_one();
        }
    }

    /// Changes whenever the key set does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> JwksStats {
        JwksStats {
            refreshes_ok: self.refreshes_ok.load(Ordering::Relaxed),
            refreshes_failed: self.refreshes_failed.load(Ordering::Relaxed),
            keys: self.lock().keys.len() as u64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent state (an Arc swap or a flag).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refresh_loop(&self) {
        let mut last_fetch = Instant::now();
        loop {
            let due = {
                let mut state = self.lock();
                loop {
                    let since = last_fetch.elapsed();
                    let period = if state.keys.is_empty() {
                        RETRY_WITHOUT_KEYS
                    } else {
                        self.refresh
                    };
                    let wait = if state.requested {
                        MIN_REFRESH_GAP.min(self.refresh).saturating_sub(since)
                    } else {
                        period.saturating_sub(since)
                    };
                    if wait.is_zero() {
                        state.requested = false;
                        break true;
                    }
                    let (next, _) = self
                        .wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner());
                    state = next;
                }
            };
            if due {
                last_fetch = Instant::now();
                self.refresh_now();
            }
        }
    }

    /// One fetch; on success the set is replaced.
    fn refresh_now(&self) {
        match fetch(&self.url).and_then(|doc| Ok((parse(&doc, self.algorithm)?, doc))) {
            Ok((keys, document)) => {
                if keys.is_empty() {
                    tracing::warn!(url = %self.url, "the JWKS has no key usable with the configured algorithm");
                }
                self.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(url = %self.url, keys = keys.len(), "JWKS refreshed");
                let mut state = self.lock();
                if state.document != document {
                    state.keys = Arc::new(keys);
                    state.document = document;
                    self.version.fetch_add(1, Ordering::AcqRel);
                }
            }
            Err(e) => {
                self.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; keeping the keys held");
            }
        }
    }
}

/// The document at `url`.
fn fetch(url: &str) -> Result<Vec<u8>, String> {
    // No redirects: configuration checked this address (https, or http to loopback), not
    // wherever it might send us; and never plain http once https was asked for.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .max_redirects(0)
        .https_only(url.starts_with("https://"))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_DOCUMENT_BYTES)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

/// The keys of a JWKS document usable with `algorithm`.
pub fn parse(document: &[u8], algorithm: Algorithm) -> Result<KeySet, String> {
    // Read key by key rather than as jsonwebtoken's `JwkSet`, whose parser is all-or-nothing:
    // one key of a type it does not know must not sink the set.
    #[derive(serde::Deserialize)]
    struct Raw {
        keys: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(document).map_err(|e| format!("not a JWKS: {e}"))?;
    let keys = raw
        .keys
        .into_iter()
        .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
        .filter(|jwk| usable(jwk, algorithm))
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((jwk.common.key_id.clone(), key))
        })
        .collect();
    Ok(KeySet { keys })
}

/// A signing key of `algorithm`'s type, declaring no other algorithm.
fn usable(jwk: &Jwk, algorithm: Algorithm) -> bool {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return false;
    }
    if let Some(declared) = jwk.common.key_algorithm {
        if !same_algorithm(declared, algorithm) {
            return false;
        }
    }
    jwk.is_supported() && jwk.algorithm_family_matches(algorithm)
}

fn same_algorithm(declared: KeyAlgorithm, algorithm: Algorithm) -> bool {
    // `KeyAlgorithm` prints its JOSE name.
    declared
        .to_string()
        .parse::<Algorithm>()
        .is_ok_and(|a| a == algorithm)
}

trait FamilyMatch {
    fn algorithm_family_matches(&self, algorithm: Algorithm) -> bool;
}

impl FamilyMatch for Jwk {
    fn algorithm_family_matches(&self, algorithm: Algorithm) -> bool {
        use jsonwebtoken::jwk::AlgorithmParameters as P;
        use jsonwebtoken::jwk::EllipticCurve as C;
        match (&self.algorithm, algorithm) {
            (
                P::RSA(_),
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512,
            ) => true,
            (P::EllipticCurve(p), Algorithm::ES256) => p.curve == C::P256,
            (P::EllipticCurve(p), Algorithm::ES384) => p.curve == C::P384,
            (P::OctetKeyPair(p), Algorithm::EdDSA) => p.curve == C::Ed25519,
            (P::OctetKey(_), Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");

    fn key(file: &str) -> serde_json::Value {
        let text = std::fs::read(format!("{KEYS}/{file}")).expect("test key");
        let doc: serde_json::Value = serde_json::from_slice(&text).expect("json");
        doc["keys"][0].clone()
    }

    #[test]
    fn only_signing_keys_of_the_pinned_algorithm_are_kept() {
        let rsa = key("rsa-1.jwks.json");
        let ec = key("ec-1.jwks.json");
        let mut encryption = key("rsa-2.jwks.json");
        encryption["use"] = "enc".into();
        let mut other_alg = key("rsa-2.jwks.json");
        other_alg["alg"] = "RS512".into();
        other_alg["kid"] = "rs512".into();
        let unknown_type = serde_json::json!({"kty": "XYZ", "kid": "x"});
        let doc = serde_json::json!({"keys": [rsa, ec, encryption, other_alg, unknown_type]});
        let set = parse(doc.to_string().as_bytes(), Algorithm::RS256).expect("a JWKS");
        assert_eq!(set.len(), 1);
        assert!(set.find(Some("rsa-1")).is_some());
        assert!(set.find(Some("rs512")).is_none() && set.find(Some("ec-1")).is_none());
        // Without a key id, the only key there is.
        assert!(set.find(None).is_some());
        let ec_set = parse(doc.to_string().as_bytes(), Algorithm::ES256).expect("a JWKS");
        assert_eq!(ec_set.len(), 1);
        assert!(ec_set.find(Some("ec-1")).is_some());
        // Two keys and no key id: none is guessed.
        let two = serde_json::json!({"keys": [key("rsa-1.jwks.json"), key("rsa-2.jwks.json")]});
        let set = parse(two.to_string().as_bytes(), Algorithm::RS256).expect("a JWKS");
        assert_eq!(set.len(), 2);
        assert!(set.find(None).is_none());
        for bad in [&b"not json"[..], b"{}", b"{\"keys\": 3}"] {
            assert!(parse(bad, Algorithm::RS256).is_err());
        }
    }
}
