//! The `Host` allow-list, the defence against DNS rebinding: a page on `evil.example` that
//! re-points its own name at 127.0.0.1 can make the browser talk to a local relay, but the
//! browser still sends `Host: evil.example`, which a relay answering only its own names
//! refuses.
//!
//! `security.trusted_hosts` entries are exact names, `*.domain` (any name below `domain`, not
//! `domain` itself) or `*`; the port of `Host` is ignored. An empty list means: on a loopback
//! `listen` address, `localhost` and loopback addresses only (the quick start is safe with no
//! configuration); on any other address, every name (the relay cannot guess the names it is
//! reached by; start-up warns). A request without `Host` (HTTP/1.0; HTTP/1.1 requires one and
//! the decoder refuses its absence) comes from no browser and passes.
//!
//! Owns: the matching. Does not own: the answer to a refused host (`guard`).

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{split_host_port, Config};

/// Which `Host` values the relay answers.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    /// From the settings; empty: the default.
    patterns: Vec<Pattern>,
    /// The default for an empty list: loopback names only (a loopback `listen`), or any.
    loopback_only: bool,
    /// The last `Host` value allowed, byte for byte: clients send the same one on every
    /// request, and judging it anew (UTF-8, port split, address parse, pattern match) was
    /// ~700 instructions of each publish. One entry per shard (the policy is per shard), at
    /// most [`MEMO_MAX_BYTES`]; only allowed values are kept, so a refused one is always
    /// judged.
    last_allowed: RefCell<Option<Box<[u8]>>>,
}

/// The longest `Host` value remembered as allowed (a real one is far shorter).
const MEMO_MAX_BYTES: usize = 256;

/// One `security.trusted_hosts` entry, prepared so that matching allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    /// A lower-case name.
    Name(String),
    /// `*.domain`: the lower-case `.domain` a name must end with (and be longer than).
    Below(String),
    Ip(IpAddr),
}

impl Pattern {
    /// From the settings' normal form (see `config::lists`).
    fn new(entry: &str) -> Pattern {
        if entry == "*" {
            return Pattern::Any;
        }
        if let Some(suffix) = entry.strip_prefix('*') {
            return Pattern::Below(suffix.to_owned());
        }
        match entry.parse::<IpAddr>() {
            Ok(ip) => Pattern::Ip(ip),
            Err(_) => Pattern::Name(entry.to_owned()),
        }
    }

    fn matches(&self, host: &Host<'_>) -> bool {
        match (self, host) {
            (Pattern::Any, _) => true,
            (Pattern::Ip(ip), Host::Ip(host)) => ip == host,
            (Pattern::Name(name), Host::Name(host)) => name.eq_ignore_ascii_case(host),
            (Pattern::Below(suffix), Host::Name(host)) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
            _ => false,
        }
    }
}

/// The host part of a `Host` value: an address, or a name without its port and trailing dot.
enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

impl HostPolicy {
    pub fn new(config: &Config) -> HostPolicy {
        HostPolicy {
            patterns: config
                .security
                .trusted_hosts
                .iter()
                .map(|entry| Pattern::new(entry))
                .collect(),
            loopback_only: config.listen.ip().is_loopback(),
            last_allowed: RefCell::new(None),
        }
    }

    /// Whether a request with this `Host` header value (or none) is answered.
    pub fn allows(&self, host: Option<&[u8]>) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.is_open() || self.last_allowed.borrow().as_deref() == Some(host) {
            return true;
        }
        let allowed = self.judge(host);
        if allowed && host.len() <= MEMO_MAX_BYTES {
            *self.last_allowed.borrow_mut() = Some(host.into());
        }
        allowed
    }

    /// Whether this `Host` value names a host the relay answers to.
    fn judge(&self, host: &[u8]) -> bool {
        let Some(host) = parse_host(host) else {
            return false;
        };
        if self.patterns.is_empty() {
            return match host {
                Host::Ip(ip) => ip.is_loopback(),
                Host::Name(name) => name.eq_ignore_ascii_case("localhost"),
            };
        }
        self.patterns.iter().any(|pattern| pattern.matches(&host))
    }

    /// Whether every host is answered because the list is empty on a non-loopback address
    /// (start-up warns about it, in `main`).
    pub fn is_open(&self) -> bool {
        self.patterns.is_empty() && !self.loopback_only
    }
}

/// The host of a `Host` value; `None` for a value that is no host at all.
fn parse_host(value: &[u8]) -> Option<Host<'_>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let bracketed = text.starts_with('[');
    let (host, _port) = split_host_port(text)?;
    // `Host` writes an IPv6 address in brackets, and an IPv4 address starts with a digit: a
    // name (the usual case) is not put through both address parsers.
    if bracketed {
        return host
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    if host.starts_with(|c: char| c.is_ascii_digit()) {
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Some(Host::Ip(IpAddr::V4(ip)));
        }
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(Host::Name(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(listen: &str, hosts: &[&str]) -> HostPolicy {
        HostPolicy {
            patterns: hosts.iter().map(|h| Pattern::new(h)).collect(),
            loopback_only: listen
                .parse::<std::net::SocketAddr>()
                .expect("literal")
                .ip()
                .is_loopback(),
            last_allowed: RefCell::new(None),
        }
    }

    #[test]
    fn the_remembered_host_is_the_last_allowed_one_byte_for_byte() {
        let p = policy("127.0.0.1:8080", &[]);
        assert!(!allows(&p, ""), "nothing remembered matches an empty Host");
        assert!(allows(&p, "localhost:8080"));
        assert!(allows(&p, "localhost:8080"), "remembered");
        for refused in ["localhost:8080.evil", "localhos:8080", "evil.example", ""] {
            assert!(!allows(&p, refused), "{refused}");
        }
        assert!(allows(&p, "localhost:8080"), "a refusal is not remembered");

        let p = policy("127.0.0.1:8080", &["*.example"]);
        assert!(allows(&p, "a.example"));
        let long = format!("{}.example", "a".repeat(MEMO_MAX_BYTES));
        assert!(allows(&p, &long));
        assert_eq!(
            p.last_allowed.borrow().as_deref(),
            Some(&b"a.example"[..]),
            "a value longer than the memo's bound is judged every time"
        );
    }

    fn allows(policy: &HostPolicy, host: &str) -> bool {
        policy.allows(Some(host.as_bytes()))
    }

    #[test]
    fn loopback_listen_answers_loopback_names_only_by_default() {
        let p = policy("127.0.0.1:8080", &[]);
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.3.2.1:1",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(allows(&p, ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "",
            "::1",
            "local host",
        ] {
            assert!(!allows(&p, refused), "{refused}");
        }
        assert!(p.allows(None), "HTTP/1.0 without Host");
        assert!(!p.is_open());
        let p = policy("[::1]:8080", &[]);
        assert!(allows(&p, "localhost") && !allows(&p, "evil.example"));
    }

    #[test]
    fn other_listen_answers_any_host_by_default() {
        let p = policy("0.0.0.0:8080", &[]);
        assert!(allows(&p, "evil.example") && allows(&p, "localhost") && allows(&p, ""));
        assert!(p.is_open());
    }

    #[test]
    fn an_explicit_list_is_exact_names_wildcards_and_star() {
        let p = policy(
            "127.0.0.1:8080",
            &["relay.example.com", "*.svc.example", "::1"],
        );
        assert!(allows(&p, "relay.example.com"));
        assert!(allows(&p, "Relay.Example.Com:443"));
        assert!(allows(&p, "a.svc.example") && allows(&p, "b.a.svc.example:1"));
        assert!(allows(&p, "[::1]:80"));
        assert!(
            !allows(&p, "svc.example"),
            "the wildcard is below the domain only"
        );
        assert!(!allows(&p, "xsvc.example"));
        assert!(
            !allows(&p, "localhost"),
            "an explicit list replaces the default"
        );
        assert!(!allows(&p, "127.0.0.1"));
        assert!(!allows(&p, "relay.example.com.evil"));
        let any = policy("127.0.0.1:8080", &["*"]);
        assert!(allows(&any, "anything.example"));
    }
}
