//! This process's relay instance id: 16 hex digits, random per process start, chosen once
//! (the first time it is asked for; `main` asks at start-up and logs it).
//!
//! It names the relay in what it tells other relays through Valkey: every append notifies
//! the topic's feed channel with `<instance id> <last id>` (`store/valkey/publish.lua`), so a
//! relay can tell its own appends from other relays' (which it must read from the stream).
//! Random rather than derived from the host or the listen address: two relays on one host,
//! or a relay restarted on the same address, are different writers.

use std::sync::OnceLock;

static ID: OnceLock<String> = OnceLock::new();

/// The instance id. Shard code copies it once (the Valkey tier keeps its own copy), so the
/// publish path never touches this shared cell.
pub fn id() -> &'static str {
    ID.get_or_init(|| format!("{:016x}", fastrand::u64(..)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_id_is_sixteen_hex_digits_and_stable() {
        let id = super::id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(super::id(), id);
    }
}
