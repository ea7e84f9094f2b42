//! What a credential may do beyond its namespace-wide permissions: a permission on the topics
//! matching a pattern (`read:jobs.*`), as external tokens' claims and API keys carry them.
//!
//! One grammar for both, so an operator writes the same entry in an identity provider's claim
//! and in `POST /auth/api-keys`: `read`, `write` or `admin` alone is that permission on every
//! topic the principal can reach; `read:<pattern>` or `write:<pattern>` is the permission on
//! matching topics only. A pattern is a topic name in which `*` stands for any run of
//! characters (`jobs.*`, `*.status`, `*`); nothing else is special, so a topic name is a
//! pattern matching itself. `admin` is never scoped: it governs users and other namespaces,
//! which are not topics.
//!
//! Hand-written rather than a glob crate: one wildcard, no character classes, no path
//! separators; the matcher is a dozen lines, and a pattern holds only topic-name characters
//! besides `*`.

use super::{Permission, Permissions};

/// A topic name with `*` wildcards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern(Box<str>);

impl TopicPattern {
    /// `None` unless it is a topic name's characters and `*`s (so `jobs/#` is refused, not
    /// kept as a pattern nothing can match).
    pub fn new(text: &str) -> Option<TopicPattern> {
        let valid = !text.is_empty()
            && text
                .bytes()
                .all(|b| b == b'*' || crate::topic::is_name_byte(b));
        valid.then(|| TopicPattern(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches: `*` spans any run of characters, including none and dots.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = self.0.split('*');
        // `split` always yields a first part.
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = topic.strip_prefix(first) else {
            return false;
        };
        let mut parts: Vec<&str> = parts.collect();
        let Some(last) = parts.pop() else {
            // No `*`: the whole name.
            return rest.is_empty();
        };
        for middle in parts {
            match rest.find(middle) {
                // Leftmost match is enough: later parts can only gain from more room.
                Some(at) => rest = &rest[at + middle.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// One permission on the topics matching a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicGrant {
    pub permission: Permission,
    pub pattern: TopicPattern,
}

/// Permissions and topic grants read from a list of entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// On every topic the principal reaches.
    pub permissions: Permissions,
    pub topics: Vec<TopicGrant>,
}

/// An entry the grammar does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownEntry(pub String);

impl Grants {
    /// Every entry must be known (API keys: a typo is an error, not a silently narrower key).
    pub fn parse_strict<'a>(
        entries: impl IntoIterator<Item = &'a str>,
    ) -> Result<Grants, UnknownEntry> {
        let mut grants = Grants::default();
        for entry in entries {
            if !grants.add(entry) {
                return Err(UnknownEntry(entry.to_owned()));
            }
        }
        Ok(grants)
    }

    /// Unknown entries skipped (an identity provider's claim carries `openid`, `email`, …).
    pub fn parse_lenient<'a>(entries: impl IntoIterator<Item = &'a str>) -> Grants {
        let mut grants = Grants::default();
        for entry in entries {
            grants.add(entry);
        }
        grants
    }

    /// Adds one entry; `false` when it is not one.
    fn add(&mut self, entry: &str) -> bool {
        let entry = entry.trim();
        match entry.split_once(':') {
            None => match Permission::parse(entry) {
                Some(p) => {
                    self.permissions = self.permissions.with(p);
                    true
                }
                None => false,
            },
            Some((name, pattern)) => {
                let permission = match Permission::parse(name) {
                    Some(p @ (Permission::Read | Permission::Write)) => p,
                    _ => return false,
                };
                let Some(pattern) = TopicPattern::new(pattern) else {
                    return false;
                };
                if pattern.as_str() == "*" {
                    self.permissions = self.permissions.with(permission);
                } else {
                    self.topics.push(TopicGrant {
                        permission,
                        pattern,
                    });
                }
                true
            }
        }
    }

    /// The entries back, in the form [`Grants::parse_strict`] reads.
    pub fn entries(&self) -> Vec<String> {
        let mut entries: Vec<String> = self
            .permissions
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        entries.extend(
            self.topics
                .iter()
                .map(|g| format!("{}:{}", g.permission.name(), g.pattern.as_str())),
        );
        entries
    }

    /// Whether these grants allow `permission` on some topic (a stream may be opened, a publish
    /// attempted; each topic is then checked with [`Grants::allows`]).
    pub fn allows_any(&self, permission: Permission) -> bool {
        self.permissions.contains(permission)
            || self.topics.iter().any(|g| g.permission == permission)
    }

    /// Whether these grants allow `permission` on `topic` (its name as the client wrote it).
    pub fn allows(&self, permission: Permission, topic: &str) -> bool {
        self.permissions.contains(permission)
            || self
                .topics
                .iter()
                .any(|g| g.permission == permission && g.pattern.matches(topic))
    }

    /// Only what both allow, for a credential acting for a user (an API key is never more
    /// than its owner): namespace-wide permissions of both; a key's topic grants whose
    /// permission the user holds.
    pub fn within(mut self, user: Permissions) -> Grants {
        self.permissions = Permissions::from_bits(self.permissions.bits() & user.bits());
        self.topics.retain(|g| user.contains(g.permission));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> TopicPattern {
        TopicPattern::new(text).expect("non-empty")
    }

    #[test]
    fn star_spans_any_run_including_dots_and_nothing() {
        let cases = [
            ("jobs.*", "jobs.1", true),
            ("jobs.*", "jobs.", true),
            ("jobs.*", "jobs.1.status", true),
            ("jobs.*", "jobs", false),
            ("jobs.*", "myjobs.1", false),
            ("*.status", "jobs.1.status", true),
            ("*.status", "status", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "a-c-b", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("*", "", true),
            ("*", "anything", true),
            ("exact", "exact", true),
            ("exact", "exact.1", false),
            ("**", "x", true),
        ];
        for (p, topic, expected) in cases {
            assert_eq!(pattern(p).matches(topic), expected, "{p} vs {topic}");
        }
    }

    /// The matcher against a straightforward recursive definition, on every short pattern and
    /// name over a small alphabet.
    #[test]
    fn matcher_agrees_with_the_recursive_definition() {
        fn reference(p: &[u8], t: &[u8]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
                Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
            }
        }
        fn words(alphabet: &[u8], max: usize) -> Vec<String> {
            let mut all = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|w| alphabet.iter().map(move |&c| format!("{w}{}", c as char)))
                    .collect();
                all.extend(last.iter().cloned());
            }
            all
        }
        let patterns = words(b"a.*", 5);
        let topics = words(b"a.", 6);
        for p in patterns.iter().filter(|p| !p.is_empty()) {
            for t in &topics {
                assert_eq!(
                    pattern(p).matches(t),
                    reference(p.as_bytes(), t.as_bytes()),
                    "{p:?} vs {t:?}"
                );
            }
        }
    }

    #[test]
    fn entries_parse_into_permissions_and_topic_grants() {
        let grants = Grants::parse_strict(["write", "read:jobs.*", "read:*"]).expect("known");
        assert_eq!(grants.permissions.names(), ["read", "write"]);
        assert!(grants.topics.iter().any(|g| g.pattern.as_str() == "jobs.*"));
        let scoped = Grants::parse_strict(["read:jobs.*", "write:jobs.*.status"]).expect("known");
        assert!(scoped.allows(Permission::Read, "jobs.7"));
        assert!(!scoped.allows(Permission::Read, "other"));
        assert!(scoped.allows(Permission::Write, "jobs.7.status"));
        assert!(!scoped.allows(Permission::Write, "jobs.7"));
        assert!(scoped.allows_any(Permission::Write));
        assert!(!scoped.allows_any(Permission::Admin));
        assert_eq!(scoped.entries(), ["read:jobs.*", "write:jobs.*.status"]);
        for bad in [
            "root",
            "admin:jobs.*",
            "read:",
            "",
            "delete:x",
            "write:jobs/#",
            "read:a b",
        ] {
            assert_eq!(
                Grants::parse_strict([bad]),
                Err(UnknownEntry(bad.to_owned())),
                "{bad:?}"
            );
        }
        let lenient = Grants::parse_lenient(["openid", "email", "read:jobs.*", "admin:x"]);
        assert_eq!(lenient.permissions, Permissions::default());
        assert_eq!(lenient.entries(), ["read:jobs.*"]);
    }

    #[test]
    fn a_key_is_never_more_than_its_owner() {
        let key = Grants::parse_strict(["admin", "write", "read:jobs.*"]).expect("known");
        let owner = Permissions::from_names(["write"]).expect("known");
        let effective = key.within(owner);
        assert_eq!(effective.entries(), ["write"]);
    }
}
