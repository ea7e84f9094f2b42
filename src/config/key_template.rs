//! [`KeyTemplate`]: a Valkey key with `{topic}` in it, rendered per publish, and the checks
//! that keep two templates from ever naming the same key.
//!
//! Owns: rendering, `SCAN` patterns, the key-overlap automaton. Does not own: which
//! templates are the defaults (`settings`) or which overlaps are refused (`resolve`).

use std::fmt;

/// The placeholder a Valkey key template must contain exactly once.
pub const TOPIC_PLACEHOLDER: &str = "{topic}";

/// A Valkey key with `{topic}` in it, split once at load so rendering a key per publish is
/// two copies and no search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate {
    /// Text before `{topic}`.
    prefix: String,
    /// Text after `{topic}`.
    suffix: String,
}

impl KeyTemplate {
    /// `None` unless `template` contains [`TOPIC_PLACEHOLDER`] exactly once.
    pub fn parse(template: &str) -> Option<Self> {
        let (prefix, suffix) = template.split_once(TOPIC_PLACEHOLDER)?;
        if suffix.contains(TOPIC_PLACEHOLDER) {
            return None;
        }
        Some(KeyTemplate {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// Appends the key for `topic` to `out` (a RESP command buffer, say).
    pub fn render_into(&self, topic: &str, out: &mut Vec<u8>) {
        out.reserve(self.rendered_len(topic));
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(self.suffix.as_bytes());
    }

    /// The key for `topic` as its three parts (prefix, topic, suffix), to be written back to
    /// back without building the key first.
    pub fn parts<'a>(&'a self, topic: &'a str) -> [&'a [u8]; 3] {
        [
            self.prefix.as_bytes(),
            topic.as_bytes(),
            self.suffix.as_bytes(),
        ]
    }

    pub fn render(&self, topic: &str) -> String {
        let mut key = String::with_capacity(self.rendered_len(topic));
        key.push_str(&self.prefix);
        key.push_str(topic);
        key.push_str(&self.suffix);
        key
    }

    pub fn rendered_len(&self, topic: &str) -> usize {
        self.prefix.len() + topic.len() + self.suffix.len()
    }

    /// A `SCAN MATCH` glob matching every key this template renders, with glob
    /// metacharacters of the fixed parts escaped.
    pub fn scan_pattern(&self) -> String {
        fn escape(s: &str, out: &mut String) {
            for c in s.chars() {
                if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        let mut pattern = String::with_capacity(self.prefix.len() + self.suffix.len() + 4);
        escape(&self.prefix, &mut pattern);
        pattern.push('*');
        escape(&self.suffix, &mut pattern);
        pattern
    }

    /// Whether every key rendered from this template has the topic name as its Valkey
    /// Cluster hash tag: the key's first `{` ends the text before `{topic}` and the text
    /// after it starts with `}` (topic names have no braces), as `topic:{{topic}}:stream`.
    /// Then a topic's keys share the slot of its name, which the client routes by.
    pub fn hash_tag_is_topic(&self) -> bool {
        self.prefix.find('{') == Some(self.prefix.len().wrapping_sub(1))
            && self.suffix.starts_with('}')
    }

    /// The topic a rendered key names, or `None` if `key` does not fit the template.
    pub fn topic_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())
            .filter(|t| !t.is_empty())
    }
}

/// One step of a key template seen as a pattern over bytes (see [`KeyTemplate::may_share_key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyToken {
    /// A byte of the fixed prefix or suffix.
    Byte(u8),
    /// The topic's first byte.
    TopicByte,
    /// The rest of the topic: zero or more topic bytes.
    TopicRest,
    /// The first byte of a tail appended after the rendered template (an idempotency key).
    TailByte,
    /// The rest of that tail: zero or more of its bytes.
    TailRest,
}

impl KeyToken {
    /// Whether this token can match `byte` (a literal only itself).
    fn matches(self, byte: u8) -> bool {
        match self {
            KeyToken::Byte(x) => x == byte,
            KeyToken::TopicByte | KeyToken::TopicRest => crate::topic::is_name_byte(byte),
            KeyToken::TailByte | KeyToken::TailRest => crate::store::idempotency::is_key_byte(byte),
        }
    }

    /// Matches zero or more bytes, staying in place.
    fn repeats(self) -> bool {
        matches!(self, KeyToken::TopicRest | KeyToken::TailRest)
    }
}

impl KeyTemplate {
    /// Whether a key rendered from `self` for some valid topic can equal a key rendered from
    /// `other` for some (possibly different) valid topic. `s:{topic}` and `s:{topic}.m` can
    /// (`s:a.m` is topic `a.m` under the first and topic `a` under the second), while
    /// `topic:{topic}:stream` and `topic:{topic}:meta` cannot, as `:` is not a topic byte.
    /// Topic length limits are ignored, which errs only towards reporting a clash.
    pub fn may_share_key(&self, other: &KeyTemplate) -> bool {
        keys_may_meet(&self.tokens(false), &other.tokens(false))
    }

    /// Whether a key rendered from `self` and followed by a non-empty idempotency key (any
    /// printable ASCII) can equal a key rendered from `other`: `topic:{topic}:idem:` and
    /// `topic:{topic}:stream` cannot (`idem:` is not `stream`), `i:{topic}:` and
    /// `i:{topic}:stream` can (the idempotency key `stream`).
    pub fn may_prefix_key(&self, other: &KeyTemplate) -> bool {
        keys_may_meet(&self.tokens(true), &other.tokens(false))
    }

    /// Whether the text after `{topic}` starts with a byte no topic name has, so that a key
    /// rendered from this template and followed by anything still names exactly one topic.
    pub fn topic_is_delimited(&self) -> bool {
        self.suffix
            .bytes()
            .next()
            .is_some_and(|b| !crate::topic::is_name_byte(b))
    }

    fn tokens(&self, tail: bool) -> Vec<KeyToken> {
        let mut tokens: Vec<KeyToken> = self.prefix.bytes().map(KeyToken::Byte).collect();
        tokens.extend([KeyToken::TopicByte, KeyToken::TopicRest]);
        tokens.extend(self.suffix.bytes().map(KeyToken::Byte));
        if tail {
            tokens.extend([KeyToken::TailByte, KeyToken::TailRest]);
        }
        tokens
    }
}

/// Whether one byte string can match both token sequences. Decided by walking both in step
/// over one candidate key (the product of two small automata): a state is a position in
/// each, and the key can end where both end. Linear in the templates' lengths: only a
/// literal byte, or any byte both classes share when neither side needs a literal, can
/// extend the key (every class holds `a`, so `a` stands for that case).
fn keys_may_meet(a: &[KeyToken], b: &[KeyToken]) -> bool {
    // Positions reachable without consuming a byte: a repeating token may match nothing.
    let closure = |tokens: &[KeyToken], i: usize| -> [Option<usize>; 2] {
        match tokens.get(i) {
            Some(t) if t.repeats() => [Some(i), Some(i + 1)],
            _ => [Some(i), None],
        }
    };
    let step = |tokens: &[KeyToken], i: usize, byte: u8| -> Option<usize> {
        let token = tokens.get(i)?;
        match token.matches(byte) {
            true if token.repeats() => Some(i),
            true => Some(i + 1),
            false => None,
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut todo = Vec::new();
    let mut visit = |i: usize, j: usize, todo: &mut Vec<(usize, usize)>| {
        for i in closure(a, i).into_iter().flatten() {
            for j in closure(b, j).into_iter().flatten() {
                if seen.insert((i, j)) {
                    todo.push((i, j));
                }
            }
        }
    };
    visit(0, 0, &mut todo);
    while let Some((i, j)) = todo.pop() {
        if i == a.len() && j == b.len() {
            return true;
        }
        let byte = match (a.get(i), b.get(j)) {
            (Some(KeyToken::Byte(x)), _) | (_, Some(KeyToken::Byte(x))) => *x,
            _ => b'a',
        };
        if let (Some(i), Some(j)) = (step(a, i, byte), step(b, j, byte)) {
            visit(i, j, &mut todo);
        }
    }
    false
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{TOPIC_PLACEHOLDER}{}", self.prefix, self.suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> KeyTemplate {
        KeyTemplate::parse(text).expect("valid template")
    }

    #[test]
    fn key_templates_render_around_the_placeholder() {
        let t = template("topic:{topic}:stream");
        assert_eq!(t.render("orders"), "topic:orders:stream");
        let mut out = b"*2\r\n".to_vec();
        t.render_into("a", &mut out);
        assert_eq!(out, b"*2\r\ntopic:a:stream");
        assert_eq!(t.rendered_len("abc"), "topic:abc:stream".len());
        assert_eq!(t.to_string(), "topic:{topic}:stream");
        assert_eq!(template("{topic}").render("x"), "x");
        assert_eq!(KeyTemplate::parse("topic:stream"), None);
        assert_eq!(KeyTemplate::parse("{topic}{topic}"), None);
        assert_eq!(KeyTemplate::parse("{Topic}"), None);
    }

    #[test]
    fn hash_tag_is_topic_only_for_braces_right_around_the_placeholder() {
        let tagged = |t: &str| template(t).hash_tag_is_topic();
        assert!(tagged("topic:{{topic}}:stream"));
        assert!(tagged("{{topic}}"));
        assert!(!tagged("topic:{topic}:stream"));
        assert!(!tagged("{x}{{topic}}"));
        assert!(!tagged("x{{topic}.}"));
        assert!(!tagged("x{{topic}"));
    }
}
