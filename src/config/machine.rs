//! [`Machine`]: facts about the host that size two defaults (shards, memory budget), and the
//! probes that read them: the only I/O of loading besides the config file.
//!
//! Owns: reading /proc and cgroup v2 files. Does not own: what the numbers become (the
//! `shards` and `memory.max_bytes` rules in `resolve`).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

/// Facts about the host that size two defaults. Public so
/// [`load_from_parts`](super::load_from_parts) can be called with a fixed machine (tests,
/// fuzzing).
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// CPUs this process may run on (affinity and cgroup CPU quota included).
    pub cpus: usize,
    /// `min(MemTotal, cgroup v2 memory.max)`, or `None` when neither could be read.
    pub memory_bytes: Option<u64>,
}

impl Machine {
    pub fn detect() -> Self {
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            memory_bytes: detect_memory_bytes(),
        }
    }
}

fn detect_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_v2_path(&text).map(str::to_owned))
        .and_then(|path| cgroup_memory_max(&path));
    match (total, cgroup) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, limit) => total.or(limit),
    }
}

/// The effective cgroup v2 limit is the smallest `memory.max` from the process's cgroup up
/// to the root: a parent's limit binds its children even when theirs says `max`.
fn cgroup_memory_max(cgroup_path: &str) -> Option<u64> {
    const ROOT: &str = "/sys/fs/cgroup";
    let mut dir = PathBuf::from(ROOT);
    dir.extend(
        cgroup_path
            .split('/')
            .filter(|part| !part.is_empty() && *part != "." && *part != ".."),
    );
    let mut limit: Option<u64> = None;
    loop {
        if let Some(found) = std::fs::read_to_string(dir.join("memory.max"))
            .ok()
            .and_then(|text| parse_memory_max(&text))
        {
            limit = Some(limit.map_or(found, |l| l.min(found)));
        }
        if dir == Path::new(ROOT) || !dir.pop() {
            return limit;
        }
    }
}

/// `MemTotal:       16314204 kB` → bytes.
fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The cgroup v2 entry of /proc/self/cgroup (`0::/system.slice/relay.service`).
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
}

/// `memory.max` holds bytes or `max` (no limit).
fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::MIB;

    #[test]
    fn machine_probe_parsers() {
        let meminfo = "MemTotal:       16314204 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(16_314_204 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: 12\n"), None, "unit required");
        assert_eq!(
            cgroup_v2_path("12:cpu:/x\n0::/system.slice/relay.service\n"),
            Some("/system.slice/relay.service")
        );
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(
            cgroup_v2_path("4:memory:/docker/abc\n"),
            None,
            "cgroup v1 only"
        );
        assert_eq!(parse_memory_max("536870912\n"), Some(536_870_912));
        assert_eq!(parse_memory_max("max\n"), None);
    }

    #[test]
    fn machine_detection_yields_usable_values() {
        let machine = Machine::detect();
        assert!(machine.cpus >= 1);
        if let Some(bytes) = machine.memory_bytes {
            assert!(bytes >= MIB, "{bytes}");
        }
    }
}
