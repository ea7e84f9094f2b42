//! Password hashes: argon2id in PHC form with the Python relay's parameters (m = 64 MiB,
//! t = 3, p = 4), so users created by either relay log in on both. Verification reads the
//! parameters from the stored string.
//!
//! A hash costs ~0.1–0.3 s of CPU and 64 MiB: it never runs on a shard's executor
//! ([`hash_off_shard`], [`verify_off_shard`] use glommio's blocking pool).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

fn hasher() -> Argon2<'static> {
    let params = Params::new(65_536, 3, 4, Some(32))
        // Constant, valid parameters.
        .expect("argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A PHC string for `password` with a fresh random salt.
pub fn hash(password: &str) -> String {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the OS random source is available");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .expect("hashing with valid parameters cannot fail")
        .to_string()
}

/// Whether `password` matches `phc`; a malformed stored hash matches nothing.
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// A hash computed for no one, verified against when the user is unknown so that a login
/// takes as long for a missing user as for a wrong password (no user enumeration by timing).
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash("no user has this password"))
}

pub async fn hash_off_shard(password: String) -> String {
    glommio::executor()
        .spawn_blocking(move || hash(&password))
        .await
}

pub async fn verify_off_shard(password: String, phc: String) -> bool {
    glommio::executor()
        .spawn_blocking(move || verify(&password, &phc))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_with_the_python_relays_parameters() {
        let phc = hash("correct horse");
        assert!(phc.starts_with("$argon2id$v=19$m=65536,t=3,p=4$"), "{phc}");
        assert!(verify("correct horse", &phc));
        assert!(!verify("wrong horse", &phc));
        assert!(!verify("correct horse", "not a hash"));
        assert!(!verify("x", dummy_hash()));
    }

    #[test]
    fn other_parameters_verify_too() {
        // A PHC string with other parameters (argon2-cffi's older defaults, say) verifies by
        // the parameters it names.
        let params = Params::new(1024, 1, 1, Some(32)).expect("valid");
        let light = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        let phc = light.hash_password(b"pw", &salt).expect("hash").to_string();
        assert!(verify("pw", &phc));
    }
}
