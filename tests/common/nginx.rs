//! The real nginx, run with the shipped load-balancer configuration
//! (`deploy/cluster/nginx.conf`) in front of relays started by the tests.
//!
//! Owns: finding the binary (a missing nginx fails the test with what to install, never a
//! skip), rendering the shipped file for a test (only the `server relay-N:8080` upstream
//! lines, the `listen` port, the access log and the temp directories change; everything else
//! is what operators run), running it in the foreground with its own prefix directory, its
//! access log, and stopping it by PID (also on a panic). Does not own: the relays
//! ([`super::fleet::RelayFleet`]) or what the load balancer must do (the tests check it).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::valkey::free_port;
use super::{eventually, Conn};

/// The load balancer's configuration as shipped, relative to the crate root.
pub const SHIPPED_CONFIG: &str = "deploy/cluster/nginx.conf";

/// nginx starts in milliseconds; 20 s absorbs a loaded CI machine.
const START_DEADLINE: Duration = Duration::from_secs(20);

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// The nginx binary: on PATH, else Debian's /usr/sbin/nginx (not on a non-root PATH).
/// Panics with the fix when absent: a load-balancer test that skipped itself would pass CI
/// without testing anything.
pub fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: the load-balancer tests run the real nginx. Install it \
                 with scripts/install-deps (or `apt-get install nginx`)"
            )
        })
}

/// `config` (the shipped file's text) for a test: upstream `server relay-N:PORT ...` lines
/// point at `relays` in order, nginx listens on `127.0.0.1:listen_port`, and the access log and
/// temp directories live in `dir`. Panics if the file does not have the lines this relies on
/// (one `listen`, one upstream line per relay), so a drifted config fails loudly.
pub fn render_config(config: &str, relays: &[SocketAddr], listen_port: u16, dir: &Path) -> String {
    let mut out = String::with_capacity(config.len() + 512);
    let mut upstreams = 0;
    let mut listens = 0;
    let mut access_logs = 0;
    for line in config.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if let Some(rest) = trimmed.strip_prefix("server relay-") {
            // `server relay-1:8080 max_fails=2 fail_timeout=10s;`: keep the parameters.
            let params = rest
                .split_once(' ')
                .map(|(_, p)| p)
                .unwrap_or_else(|| panic!("upstream line without parameters: {line:?}"));
            let relay = relays.get(upstreams).unwrap_or_else(|| {
                panic!("{SHIPPED_CONFIG} names more upstream relays than the test started")
            });
            out.push_str(&format!("{indent}server {relay} {params}\n"));
            upstreams += 1;
        } else if trimmed.starts_with("listen ") {
            out.push_str(&format!("{indent}listen 127.0.0.1:{listen_port};\n"));
            listens += 1;
        } else if trimmed.starts_with("access_log ") {
            let format = trimmed
                .trim_end_matches(';')
                .split_whitespace()
                .nth(2)
                .unwrap_or("combined");
            let log = dir.join("access.log");
            out.push_str(&format!("{indent}access_log {} {format};\n", log.display()));
            access_logs += 1;
        } else if trimmed.starts_with("http {") {
            out.push_str(line);
            out.push('\n');
            // Debian's compiled-in temp paths are under /var/lib/nginx.
            for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                let path = dir.join(kind);
                out.push_str(&format!("    {kind}_temp_path {};\n", path.display()));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(
        upstreams,
        relays.len(),
        "{SHIPPED_CONFIG}: want one `server relay-N:8080` line per relay"
    );
    assert_eq!(listens, 1, "{SHIPPED_CONFIG}: want exactly one `listen`");
    assert_eq!(
        access_logs, 1,
        "{SHIPPED_CONFIG}: want exactly one `access_log`"
    );
    out
}

/// A running nginx (master process and its workers), stopped when dropped.
pub struct Nginx {
    /// The master process; `None` once stopped.
    child: Option<Child>,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Prefix directory: the rendered config, pid file, logs, temp directories.
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with the shipped configuration in front of `relays` and waits until it
    /// proxies a request (`GET /health` through it answers 200).
    pub fn start(relays: &[SocketAddr]) -> Nginx {
        let binary = nginx_binary();
        let shipped =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED_CONFIG))
                .unwrap_or_else(|e| panic!("read {SHIPPED_CONFIG}: {e}"));
        let dir = std::env::temp_dir().join(format!(
            "pulsar-relay-nginx-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create nginx dir");
        let port = free_port();
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, render_config(&shipped, relays, port, &dir))
            .expect("write nginx.conf");
        let error_log = dir.join("error.log");
        // Foreground (`daemon off`), so the child is the master and its PID stops it all;
        // `-e`: the error log from the first line on (Debian's default is stderr, nginx's
        // own default a root-only path).
        let child = Command::new(&binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(&error_log)
            .arg("-g")
            .arg(format!(
                "daemon off; pid {};",
                dir.join("nginx.pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut nginx = Nginx {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let started = Instant::now();
        let up = eventually(START_DEADLINE, || {
            if let Some(Ok(Some(status))) = nginx.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nginx exited at start-up with {status}\nerror log:\n{}",
                    nginx.error_log()
                );
            }
            TcpStream::connect_timeout(&nginx.addr, Duration::from_millis(200)).is_ok()
                && Conn::connect(nginx.addr)
                    .try_request("GET", "/health", None)
                    .is_ok_and(|r| r.status == 200)
        });
        assert!(
            up,
            "nginx did not proxy GET /health within {:?}\nerror log:\n{}",
            started.elapsed(),
            nginx.error_log()
        );
        nginx
    }

    /// The access log so far (the shipped `relay` format: `upstream=` names the relays a
    /// request went to, comma-separated when nginx moved it on).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// The error log so far, for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// SIGTERM to the master (fast shutdown: it stops its workers), waiting up to 10 s, then
    /// SIGKILL.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let exited = eventually(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
