//! Topic → owning shard.
//!
//! The mapping must be stable across processes and releases: with the Valkey backend a topic's
//! stream outlives any one relay process, and tools (loadgen, tests) may want to predict which
//! shard owns a topic. So it is a fixed hash (XXH3-64, whose output is specified and does not
//! depend on the platform or on a random seed), not `std`'s randomly keyed `DefaultHasher`.

use xxhash_rust::xxh3::xxh3_64;

/// The shard (0-based) that owns `topic` when the relay runs `shards` shards.
///
/// Plain modulo over a 64-bit hash: with at most 1024 shards the bias is below 2^-50, and
/// unlike jump or rendezvous hashing it costs nothing; re-partitioning on a change of the
/// shard count is not a concern because shard state is rebuilt at start-up.
pub fn owner_of(topic: &str, shards: usize) -> usize {
    debug_assert!(shards > 0, "a relay always runs at least one shard");
    (xxh3_64(topic.as_bytes()) % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_stable() {
        // Pinned values: changing the hash would silently move every topic.
        assert_eq!(owner_of("orders", 1), 0);
        let a = owner_of("orders", 2);
        assert_eq!(a, owner_of("orders", 2));
        assert_eq!(xxh3_64(b"orders") % 2, a as u64);
    }

    #[test]
    fn topics_spread_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[owner_of(&format!("topic-{i}"), 4)] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
