//! The real Python relay (`pulsar-relay` 0.2.1, installed by `scripts/install-deps` in its own
//! venv) as a child process on a free port, pointed at a test's Valkey: for the tests that run
//! it beside this relay on one Valkey (tests/python_relay_coexist.rs).
//!
//! Owns: its process (uvicorn, one worker, killed by PID when dropped), its environment (every
//! inherited `PULSAR_*`, `RATELIMIT_*`, `UVICORN_*` and `WEB_CONCURRENCY` variable removed; a
//! scratch working directory so no `config.toml` or `.env` of the caller's is read) and its
//! log. Does not own the Valkey (the
//! test's [`super::valkey::ValkeyServer`]) or anything about how it answers.
//!
//! Settings, by their names in its `config.py`: the Valkey backend with a password (its
//! start-up guard refuses Valkey without one, and `PULSAR_ALLOW_INSECURE_DEFAULTS` is not set,
//! so its check for foreign `topic:*` keys runs over what this relay wrote), the shared
//! `PULSAR_JWT_SECRET_KEY`, a bootstrap admin, the Host and Origin allow-lists its guard
//! requires, and `RATELIMIT_ENABLED=false` (slowapi's switch: its 5 logins a minute per address
//! would refuse the test's logins).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::valkey::{unique_temp_dir, ValkeyServer};

/// Its start-up (imports, Valkey connection, an argon2 hash for the bootstrap admin) takes
/// 2–3 s here; a loaded CI machine gets ten times that.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The line uvicorn logs once it listens, with the port it bound (`--port 0`).
const LISTENING: &str = "Uvicorn running on http://";

/// The venv `scripts/install-deps` puts the Python relay in.
pub fn python_relay_python() -> PathBuf {
    super::python::venv_python(
        "PULSAR_PYTHON_RELAY_VENV",
        "python-relay-venv",
        "the Python relay pulsar-relay 0.2.1",
    )
}

/// How to start the Python relay.
pub struct PythonRelayOpts<'a> {
    pub jwt_secret: &'a str,
    pub admin_username: &'a str,
    pub admin_password: &'a str,
}

/// A running Python relay; killed (by its PID) when dropped.
pub struct PythonRelay {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl PythonRelay {
    /// Starts it on `valkey` (which must have a password) and waits until it listens.
    pub fn start(valkey: &ValkeyServer, opts: &PythonRelayOpts) -> PythonRelay {
        let env = valkey.relay_env();
        let valkey_password = env
            .iter()
            .find(|(k, _)| k == "VALKEY_PASSWORD")
            .map(|(_, v)| v.clone())
            .expect("the Python relay refuses a Valkey without a password: set requirepass");
        let dir = unique_temp_dir("pulsar-python-relay");
        std::fs::create_dir_all(&dir).expect("create the Python relay's directory");
        let log_path = dir.join("relay.log");
        let log = std::fs::File::create(&log_path).expect("create the Python relay's log");
        let mut command = Command::new(python_relay_python());
        for (name, _) in std::env::vars_os() {
            let upper = name.to_string_lossy().to_ascii_uppercase();
            if ["PULSAR_", "RATELIMIT_", "UVICORN_", "WEB_CONCURRENCY"]
                .iter()
                .any(|prefix| upper.starts_with(prefix))
            {
                command.env_remove(&name);
            }
        }
        command
            .args(["-m", "uvicorn", "pulsar_relay.main:app"])
            .args(["--host", "127.0.0.1", "--port", "0", "--workers", "1"])
            .current_dir(&dir)
            .env("PULSAR_STORAGE_BACKEND", "valkey")
            .env("PULSAR_VALKEY_HOST", valkey.host())
            .env("PULSAR_VALKEY_PORT", valkey.port.to_string())
            .env("PULSAR_VALKEY_PASSWORD", valkey_password)
            .env("PULSAR_JWT_SECRET_KEY", opts.jwt_secret)
            .env("PULSAR_BOOTSTRAP_ADMIN_USERNAME", opts.admin_username)
            .env("PULSAR_BOOTSTRAP_ADMIN_PASSWORD", opts.admin_password)
            .env("PULSAR_TRUSTED_HOSTS", r#"["127.0.0.1","localhost"]"#)
            .env("PULSAR_ALLOWED_ORIGINS", r#"["http://localhost"]"#)
            .env("RATELIMIT_ENABLED", "false")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone()
                    .expect("clone the Python relay's log handle"),
            ))
            .stderr(Stdio::from(log));
        let mut child = command.spawn().expect("spawn the Python relay (uvicorn)");
        let addr = match await_listening(&mut child, &log_path) {
            Ok(addr) => addr,
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                panic!("the Python relay did not start: {why}\nits log:\n{log}");
            }
        };
        PythonRelay { child, addr, dir }
    }

    /// Its log so far (uvicorn's and the relay's), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }
}

impl Drop for PythonRelay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the Python relay said goes with the failure (its log is removed below).
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("--- the Python relay's log (last {} lines) ---", tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
        // SIGKILL by PID: uvicorn with one worker is this one process.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the log names the address uvicorn listens on; `Err` when the process exits
/// first or the deadline passes.
fn await_listening(child: &mut Child, log_path: &Path) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let log = std::fs::read(log_path).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        if let Some(at) = log.find(LISTENING) {
            let rest = &log[at + LISTENING.len()..];
            // Only once the address is followed by more of the line (not half written).
            if let Some(end) = rest.find(char::is_whitespace) {
                return rest[..end]
                    .parse()
                    .map_err(|e| format!("unreadable address in {:?}: {e}", &rest[..end]));
            }
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("it exited with {status}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("no {LISTENING:?} line within {START_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
