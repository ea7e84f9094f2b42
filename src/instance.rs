//! This relay process's instance id: 16 lowercase hex characters, random per process start,
//! generated once and never changed while the process runs.
//!
//! It names the relay in what it tells other relays through Valkey (the feed notifications
//! of `store::valkey::feed`), so a relay can tell its own notifications from another's, and
//! it is logged at start-up so an operator can match log lines of several relays. Random per
//! start, not configured: two relays (or one restarted) never share it by mistake, and there
//! is no setting to remember.

use std::sync::OnceLock;

static INSTANCE_ID: OnceLock<String> = OnceLock::new();

/// This process's relay instance id (see the module doc).
pub fn instance_id() -> &'static str {
    INSTANCE_ID.get_or_init(generate)
}

/// 64 random bits: the thread-local generator (seeded by the standard library's per-process
/// random hash keys) mixed with the process id and the start time, so two processes started
/// in the same instant on one host still differ.
fn generate() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed =
        fastrand::u64(..) ^ nanos.rotate_left(17) ^ u64::from(std::process::id()).rotate_left(41);
    // One more round of a keyed hash, so related inputs give unrelated ids.
    let mut rng = fastrand::Rng::with_seed(mixed);
    format!("{:016x}", rng.u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_16_hex_characters_and_stable() {
        let id = instance_id();
        assert_eq!(id.len(), 16);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(instance_id(), id);
        assert_ne!(generate(), generate());
    }
}
