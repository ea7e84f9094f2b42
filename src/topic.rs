//! Topic names: the one rule every entry point (HTTP, later WebSocket and long-poll) applies.
//!
//! 1 to `max_len` (default 255) characters of `[A-Za-z0-9._-]`. The alphabet keeps names safe
//! inside Valkey key templates (`topic:{topic}:stream`), URL paths, log lines and metric
//! labels without any escaping.

/// A map keyed by topic name, for the per-topic maps on the request path (hot tier index,
/// subscriber registry, Valkey ordering slots, write-behind counts).
///
/// Hashed with foldhash rather than std's SipHash-1-3: a topic name is hashed several times
/// per publish, and SipHash cost ~360 instructions of a Valkey publish (docs/performance.md).
///
/// HashDoS: topic names are chosen by clients, so an attacker could try to make them
/// collide. `foldhash::fast::RandomState` seeds every map from a per-process random seed (as
/// std does), so collisions cannot be computed offline; the names are short and restricted
/// to `[A-Za-z0-9._-]` (plus the server-chosen owner-id prefix of a namespaced topic) before
/// they reach a map (validated at every entry point), and the
/// topics a shard holds are bounded by memory and retention, so an attacker who somehow
/// learnt the seed could slow lookups of one shard's topics, not grow memory. foldhash is
/// the hasher hashbrown itself defaults to. Maps keyed by anything else (user names, tokens,
/// Valkey node addresses) keep std's hasher.
pub type TopicMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A set of topic names; see [`TopicMap`].
pub type TopicSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Why a topic name was refused, phrased for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopic {
    #[error("topic must not be empty")]
    Empty,
    #[error("topic is longer than {0} characters")]
    TooLong(usize),
    #[error("topic may contain only letters, digits, '.', '_' and '-'")]
    BadCharacter,
}

/// A byte a topic name may contain: `[A-Za-z0-9._-]`.
pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The name a client knows a stored topic by: a namespaced topic (`<owner id>/<name>`, see
/// [`crate::auth::Principal::topic`]) without its namespace; other names as they are. Every
/// frame and response that names a topic writes this.
pub fn public_name(stored: &str) -> &str {
    stored.rsplit_once('/').map_or(stored, |(_, name)| name)
}

/// The namespace (owner id) of a stored topic name, if it has one.
pub fn owner_of(stored: &str) -> Option<&str> {
    stored.rsplit_once('/').map(|(owner, _)| owner)
}

/// Whether `stored` is a name the relay itself stores: a valid topic name, or one in a user's
/// namespace (`<owner id>/<name>`, the owner id of letters, digits and `-`). For names found
/// in storage (discovery), never for names from a client.
pub fn is_stored_name(stored: &str) -> bool {
    match stored.split_once('/') {
        None => validate(stored, usize::MAX).is_ok(),
        Some((owner, name)) => {
            !owner.is_empty()
                && owner
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && validate(name, usize::MAX).is_ok()
        }
    }
}

pub fn validate(name: &str, max_len: usize) -> Result<(), InvalidTopic> {
    if name.is_empty() {
        return Err(InvalidTopic::Empty);
    }
    if name.len() > max_len {
        return Err(InvalidTopic::TooLong(max_len));
    }
    if !name.bytes().all(is_name_byte) {
        return Err(InvalidTopic::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_names_drop_the_namespace() {
        assert_eq!(public_name("orders"), "orders");
        assert_eq!(public_name("0b1c-9/orders"), "orders");
        assert_eq!(owner_of("0b1c-9/orders"), Some("0b1c-9"));
        assert_eq!(owner_of("orders"), None);
        assert!(is_stored_name("orders") && is_stored_name("0b1c-9/orders"));
        for bad in ["/orders", "a/b/c", "a b/c", "u/", "u/a:b"] {
            assert!(!is_stored_name(bad), "{bad}");
        }
    }

    #[test]
    fn accepts_the_alphabet() {
        assert_eq!(validate("a", 255), Ok(()));
        assert_eq!(validate("Orders.v2_eu-west", 255), Ok(()));
        assert_eq!(validate(&"x".repeat(255), 255), Ok(()));
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(validate("", 255), Err(InvalidTopic::Empty));
        assert_eq!(
            validate(&"x".repeat(256), 255),
            Err(InvalidTopic::TooLong(255))
        );
        for bad in ["a b", "a/b", "a:b", "{a}", "é", "a\nb", "a*", "a%20"] {
            assert_eq!(
                validate(bad, 255),
                Err(InvalidTopic::BadCharacter),
                "{bad:?}"
            );
        }
    }
}
