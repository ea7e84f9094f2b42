//! List-valued settings: the text of a list (from a variable, a flag or the file) split into
//! its entries, and what each kind of entry may be.
//!
//! A list is written either as a JSON array of strings (`["https://a","https://b"]`, the form
//! the Python relay's pydantic settings read, so its deployments' variables keep working) or
//! comma-separated (`https://a,https://b`, what everyone else writes and what the Python relay
//! crashed on). The file's YAML lists reach here as JSON arrays (`yaml`).
//!
//! Owns: both spellings, the entry rules (origins, `Host` patterns, IP networks) with their
//! normal forms, and [`IpNet`]. Does not own: what the lists are used for (`http::guard`).

use std::fmt;
use std::net::IpAddr;

use super::error::shown_value;

/// The entries of a list written as a JSON array of strings or comma-separated; what is
/// wrong otherwise. Entries are trimmed; an empty entry is an error (`a,,b` is a typo), an
/// empty array is the empty list.
pub(super) fn split_list(text: &str) -> Result<Vec<String>, String> {
    let text = text.trim();
    if text.starts_with('[') {
        let items: Vec<String> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON array of strings ({e})"))?;
        return items
            .into_iter()
            .map(|item| {
                let item = item.trim();
                if item.is_empty() {
                    Err("an empty entry".to_owned())
                } else {
                    Ok(item.to_owned())
                }
            })
            .collect();
    }
    text.split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                Err("an empty entry".to_owned())
            } else {
                Ok(item.to_owned())
            }
        })
        .collect()
}

/// An origin in its normal form (for an allowed-origins entry and for the `Origin` header it
/// is compared with): `*`, or `scheme://host[:port]` lower-cased, the
/// scheme's default port left out (`https://a.example:443` is `https://a.example`), as a
/// browser serialises the `Origin` header, so that an exact comparison is right.
pub fn normalize_origin(entry: &str) -> Result<String, String> {
    if entry == "*" {
        return Ok(entry.to_owned());
    }
    let shown = shown_value(entry);
    let bad = |why: &str| {
        format!("`{shown}` is not an origin ({why}): write scheme://host[:port], e.g. `https://app.example.com`")
    };
    let (scheme, rest) = entry.split_once("://").ok_or_else(|| bad("no `://`"))?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(bad("bad scheme"));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(bad("a path, even `/`, is not part of an origin"));
    }
    if rest.contains('@') {
        return Err(bad("user info is not part of an origin"));
    }
    let (host, port) = split_host_port(rest).ok_or_else(|| bad("bad host or port"))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("no host"));
    }
    let scheme = scheme.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    match port {
        Some(port) if Some(port) != default_port(&scheme) => {
            Ok(format!("{scheme}://{host}:{port}"))
        }
        _ => Ok(format!("{scheme}://{host}")),
    }
}

/// The port a scheme implies when an origin or `Host` names none.
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `host[:port]`, IPv6 in brackets: the host (without brackets) and the port if any; `None`
/// for a bad port or unbalanced brackets.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            // A bare IPv6 address has several colons; a Host or origin never writes one so.
            Some((host, _)) if host.contains(':') => return None,
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((host, port))
}

/// A trusted-host pattern in its normal form: `*`, `*.suffix` or a host name (lower-case,
/// one trailing dot dropped) or IP address (canonical text, IPv6 without brackets). No port:
/// the port of a `Host` header is ignored when matching.
pub(super) fn host_pattern(entry: &str) -> Result<String, String> {
    if entry == "*" {
        return Ok(entry.to_owned());
    }
    let shown = shown_value(entry);
    let (wildcard, name) = match entry.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, entry),
    };
    if !wildcard {
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(ip.to_string());
        }
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !name.starts_with('.')
        && !name.contains("..");
    if !valid {
        return Err(format!(
            "`{shown}` is not a host name, `*.domain` or `*` (write no port or scheme: the \
             port of `Host` is ignored), e.g. `relay.example.com`"
        ));
    }
    let name = name.to_ascii_lowercase();
    Ok(if wildcard { format!("*.{name}") } else { name })
}

/// An IP network: an address and how many leading bits of it count (`10.0.0.0/8`; a bare
/// address is a network of one). Host bits beyond the prefix are cleared when parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// `addr` or `addr/prefix` (IPv6 with or without brackets); what is wrong otherwise.
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let shown = shown_value(text);
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{shown}` is not an IP address or network such as `10.0.0.0/8`")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{shown}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(IpNet {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is inside. IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`, how a socket
    /// bound to `[::]` sees IPv4 peers) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `ip` with every bit after the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & keep).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_as_json_arrays_or_commas() {
        let ok = |text: &str| split_list(text).expect("valid list");
        assert_eq!(
            ok(r#"["https://a","https://b"]"#),
            ["https://a", "https://b"]
        );
        assert_eq!(ok(r#" [ " https://a " ] "#), ["https://a"]);
        assert_eq!(ok("https://a, https://b"), ["https://a", "https://b"]);
        assert_eq!(ok("one"), ["one"]);
        assert!(ok("[]").is_empty());
        for bad in [r#"["https://a","#, "[1, 2]", r#"["a", ""]"#, "a,,b", "a,"] {
            assert!(split_list(bad).is_err(), "{bad}");
        }
        let message = split_list(r#"["https://a""#).expect_err("unterminated");
        assert!(
            message.starts_with("not a JSON array of strings ("),
            "{message}"
        );
    }

    #[test]
    fn origins_take_their_serialised_form() {
        let ok = |text: &str| normalize_origin(text).expect("valid origin");
        assert_eq!(ok("*"), "*");
        assert_eq!(ok("HTTPS://App.Example.com"), "https://app.example.com");
        assert_eq!(ok("https://a.example:443"), "https://a.example");
        assert_eq!(ok("http://a.example:80"), "http://a.example");
        assert_eq!(ok("http://localhost:5173"), "http://localhost:5173");
        assert_eq!(ok("http://[::1]:8080"), "http://[::1]:8080");
        for bad in [
            "https://a.example/",
            "a.example",
            "https://",
            "https://a.example:port",
            "https://a.example:99999",
            "https://user@a.example",
            "1http://a",
            "https://a b",
        ] {
            assert!(normalize_origin(bad).is_err(), "{bad}");
        }
        assert!(normalize_origin("https://a.example/").is_err_and(|e| e.contains("path")));
    }

    #[test]
    fn host_patterns_are_names_wildcards_or_addresses() {
        let ok = |text: &str| host_pattern(text).expect("valid pattern");
        assert_eq!(ok("*"), "*");
        assert_eq!(ok("Relay.Example.COM."), "relay.example.com");
        assert_eq!(ok("*.Example.com"), "*.example.com");
        assert_eq!(ok("[::1]"), "::1");
        assert_eq!(ok("0:0::1"), "::1");
        assert_eq!(ok("127.0.0.1"), "127.0.0.1");
        for bad in [
            "relay.example.com:8080",
            "https://relay",
            "*.",
            "a..b",
            "*.*.a",
            "a/b",
            "",
        ] {
            assert!(host_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("a:80"), Some(("a", Some(80))));
        assert_eq!(split_host_port("a"), Some(("a", None)));
        assert_eq!(split_host_port("[::1]:8080"), Some(("::1", Some(8080))));
        assert_eq!(split_host_port("[::1]"), Some(("::1", None)));
        assert_eq!(split_host_port("::1"), None);
        assert_eq!(split_host_port("a:"), None);
        assert_eq!(split_host_port("a:70000"), None);
        assert_eq!(split_host_port("[::1"), None);
        assert_eq!(split_host_port("[::1]x"), None);
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net = |text: &str| IpNet::parse(text).expect("valid network");
        let ip = |text: &str| text.parse::<IpAddr>().expect("literal");
        assert!(net("127.0.0.0/8").contains(ip("127.9.8.7")));
        assert!(!net("127.0.0.0/8").contains(ip("128.0.0.1")));
        assert!(
            net("127.0.0.0/8").contains(ip("::ffff:127.0.0.2")),
            "mapped"
        );
        assert!(net("::1").contains(ip("::1")));
        assert!(!net("::1").contains(ip("127.0.0.1")));
        assert!(
            net("10.1.2.3/8").contains(ip("10.200.0.1")),
            "host bits cleared"
        );
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(net("[fd00::]/8").contains(ip("fdff::1")));
        assert_eq!(net("10.1.2.3/8").to_string(), "10.0.0.0/8");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "localhost",
            "10.0.0.0/x",
            "",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }
}
