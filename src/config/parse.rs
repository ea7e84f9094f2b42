//! Value syntax: the text of a setting (from the file, a variable or a flag) to a number, a
//! size, a duration, a boolean or a list of addresses, and back to text for messages.
//!
//! Owns: the spellings accepted (`16KiB`, `24h`, `yes`, `[::1]:26379`). Does not own: the
//! ranges or what a value means (`settings`, `resolve`).

use std::ops::RangeInclusive;
use std::time::Duration;

use super::error::shown_value;
use super::settings::{GIB, KIB, MAX_RATE_COUNT, MIB, PORTS, TIB};
use super::Rate;

/// Decimal digits, optionally grouped with `_` as YAML allows (`1_000_000`).
pub(super) fn parse_uint(text: &str) -> Option<u64> {
    let grouped_ok = !text.starts_with('_') && !text.ends_with('_') && !text.contains("__");
    if text.is_empty() || !grouped_ok || !text.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    text.bytes()
        .filter(u8::is_ascii_digit)
        .try_fold(0u64, |acc, digit| {
            acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        })
}

/// Integer bytes, or a number with a unit: `KiB`/`MiB`/`GiB` (1024-based), `KB`/`MB`/`GB`
/// (1000-based), as `bytesize` reads them.
pub(super) fn parse_size(text: &str) -> Option<u64> {
    if let Some(bytes) = parse_uint(text) {
        return Some(bytes);
    }
    // bytesize reads "1e3" as 1 and unit "e3" (rejected), and "-1" as an error; it accepts
    // fractions ("1.5KiB") and a space before the unit.
    if !text.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    text.parse::<bytesize::ByteSize>()
        .ok()
        .map(|size| size.as_u64())
}

/// Integer seconds (the seeds' `PERSISTENT_TIER_RETENTION=86400`) or a humantime duration.
/// A humantime duration, or a bare integer counting `unit`s.
pub(super) fn parse_duration(text: &str, unit: Duration) -> Option<Duration> {
    if let Some(count) = parse_uint(text) {
        // Units are whole seconds (declared in `settings`).
        return count.checked_mul(unit.as_secs()).map(Duration::from_secs);
    }
    humantime::parse_duration(text).ok()
}

/// `N/s`, `N/min`, `N/h` (also `sec`, `second`, `m`, `minute`, `hour`; case-insensitive,
/// spaces around `/` allowed), or `0`/`off` for no limit.
pub(super) fn parse_rate(text: &str) -> Option<Rate> {
    if text.eq_ignore_ascii_case("off") || text == "0" {
        return Some(Rate::per_second(0));
    }
    let (count, unit) = text.split_once('/')?;
    let count = parse_uint(count.trim()).filter(|c| (1..=MAX_RATE_COUNT).contains(c))?;
    let unit = unit.trim().to_ascii_lowercase();
    let per = match unit.as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some(Rate { count, per })
}

/// Re-parseable: `1000/s`, `10/min`, `5/h`, `off`.
pub(super) fn format_rate(rate: Rate) -> String {
    if rate.count == 0 {
        return "off".to_owned();
    }
    let unit = match rate.per.as_secs() {
        1 => "s",
        60 => "min",
        _ => "h",
    };
    format!("{}/{unit}", rate.count)
}

pub(super) fn parse_bool(text: &str) -> Option<bool> {
    const TRUE: [&str; 3] = ["true", "1", "yes"];
    const FALSE: [&str; 3] = ["false", "0", "no"];
    if TRUE.iter().any(|t| t.eq_ignore_ascii_case(text)) {
        Some(true)
    } else if FALSE.iter().any(|f| f.eq_ignore_ascii_case(text)) {
        Some(false)
    } else {
        None
    }
}

/// Exact and re-parseable: the largest binary unit that divides the value.
pub(super) fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// Exact and re-parseable, in the largest unit that divides the value (`24h`, not
/// humantime's `1day`).
pub(super) fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() != 0 {
        return format!("{}ms", duration.as_millis());
    }
    let secs = duration.as_secs();
    match secs {
        0 => "0s".to_owned(),
        // Days only from two on: `24h` reads better than `1d` for the default retention.
        s if s % 86400 == 0 && s >= 2 * 86400 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub(super) fn has_space_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `host:port[,host:port...]` (spaces around entries allowed, IPv6 as `[addr]:port`) with
/// `count` addresses; what is wrong otherwise.
pub(super) fn parse_addrs(
    text: &str,
    count: RangeInclusive<usize>,
) -> Result<Vec<(String, u16)>, String> {
    let mut addrs: Vec<(String, u16)> = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err("an empty entry".to_owned());
        }
        let shown = shown_value(entry);
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("`{shown}` has no port after `]`"))?;
            (host, port)
        } else {
            let (host, port) = entry
                .rsplit_once(':')
                .ok_or_else(|| format!("`{shown}` has no `:port`"))?;
            if host.contains(':') {
                return Err(format!("`{shown}`: write an IPv6 address as `[addr]:port`"));
            }
            (host, port)
        };
        if host.is_empty() || has_space_or_control(host) {
            return Err(format!("`{shown}` has no valid host"));
        }
        let port = parse_uint(port)
            .filter(|p| PORTS.contains(p))
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("`{shown}` has no port from 1 to 65535"))?;
        let addr = (host.to_owned(), port);
        if addrs.contains(&addr) {
            return Err(format!("`{shown}` is listed twice"));
        }
        addrs.push(addr);
    }
    if !count.contains(&addrs.len()) {
        return Err(format!("{} addresses", addrs.len()));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_duration_s(text: &str) -> Option<Duration> {
        parse_duration(text, Duration::from_secs(1))
    }

    #[test]
    fn bare_durations_count_their_unit() {
        let minute = Duration::from_secs(60);
        assert_eq!(parse_duration("10", minute), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("10s", minute), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration(&u64::MAX.to_string(), minute), None);
    }

    #[test]
    fn value_parsers_at_their_edges() {
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_uint("18446744073709551616"), None, "overflow");
        assert_eq!(parse_uint("+5"), None);
        assert_eq!(parse_uint("1_0"), Some(10));
        assert_eq!(parse_uint("1_"), None);
        assert_eq!(parse_duration_s("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration_s("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration_s("86400"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration_s("-5s"), None);
        assert_eq!(parse_duration_s("5 parsecs"), None);
        for (text, value) in [
            ("true", true),
            ("YES", true),
            ("1", true),
            ("no", false),
            ("False", false),
            ("0", false),
        ] {
            assert_eq!(parse_bool(text), Some(value), "{text}");
        }
        assert_eq!(parse_bool("on"), None);
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_rate("1000/s"), Some(Rate::per_second(1000)));
        assert_eq!(parse_rate("10 / MIN"), Some(Rate::per_minute(10)));
        assert_eq!(
            parse_rate("5/hour"),
            Some(Rate {
                count: 5,
                per: Duration::from_secs(3600)
            })
        );
        assert_eq!(parse_rate("OFF"), Some(Rate::per_second(0)));
        assert_eq!(parse_rate("0"), Some(Rate::per_second(0)));
        for bad in [
            "0/s",
            "1000",
            "10/day",
            "-1/s",
            "1000000001/s",
            "/s",
            "1.5/s",
        ] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
    }

    #[test]
    fn formatted_rates_parse_back_to_themselves() {
        for text in ["1000/s", "10/min", "5/h", "off"] {
            let rate = parse_rate(text).expect("valid");
            assert_eq!(format_rate(rate), text);
        }
    }

    #[test]
    fn formatted_defaults_parse_back_to_themselves() {
        for bytes in [1, 1000, KIB, 16 * KIB, 3 * MIB, GIB, 1024 * TIB, 1536] {
            assert_eq!(
                parse_size(&format_size(bytes).replace(" bytes", "")),
                Some(bytes)
            );
        }
        for d in [
            Duration::from_millis(1),
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::from_secs(86_400),
            Duration::from_secs(3650 * 86_400),
        ] {
            assert_eq!(parse_duration_s(&format_duration(d)), Some(d), "{d:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_size(16 * MIB), "16MiB");
    }
}
