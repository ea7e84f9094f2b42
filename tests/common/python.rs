//! The real Python client (`pulsar-relay-client`, pinned by `scripts/install-deps`) for the
//! compatibility tests: where its venv is, and running a script of `tests/python/` with it.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `python` of a venv `scripts/install-deps` made: `$<env_var>` if set, else
/// `~/.cache/pulsar-relay/<dir>` (`$XDG_CACHE_HOME` honoured); `what` names what it holds.
pub fn venv_python(env_var: &str, dir: &str, what: &str) -> PathBuf {
    let venv = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
                });
            cache.join("pulsar-relay").join(dir)
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/install-deps (it installs {what} in a venv)",
        python.display()
    );
    python
}

/// The venv `scripts/install-deps` puts the Python client in.
pub fn client_python() -> PathBuf {
    venv_python("PULSAR_CLIENT_VENV", "client-venv", "pulsar-relay-client")
}

/// Runs `tests/python/<script>` with `args` in the client's venv; returns the JSON object it
/// prints (panics with its stderr when it fails).
pub fn run_script(script: &str, args: &[&str]) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = Command::new(client_python())
        .arg(&path)
        .args(args)
        .output()
        .expect("run the Python client");
    assert!(
        output.status.success(),
        "{script}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
