//! Topic names: the one rule every entry point (HTTP, later WebSocket and long-poll) applies.
//!
//! 1 to `max_len` (default 255) characters of `[A-Za-z0-9._-]`. The alphabet keeps names safe
//! inside Valkey key templates (`topic:{topic}:stream`), URL paths, log lines and metric
//! labels without any escaping.

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
