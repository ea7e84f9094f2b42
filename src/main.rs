//! The `pulsar-relay` binary: parse flags, load the configuration, start logging, run the
//! shards until a signal, exit with a status that says how it went.

use std::process::ExitCode;

use clap::Parser;

use pulsar_relay::config::{self, Cli, LogFormat};

/// jemalloc, not glibc's malloc: after a spike of connections glibc kept what they freed in
/// each shard thread's arena (RSS stayed at the peak for good), while jemalloc's background
/// thread returns freed pages to the kernel within its decay time (10 s); it also costs fewer
/// instructions per request. Figures: docs/performance.md ("Memory after a spike").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load_from_process(&cli) {
        Ok(c) => c,
        Err(e) => {
            report(format_args!("pulsar-relay: configuration error: {e}"));
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    raise_open_files_limit();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        instance = pulsar_relay::instance::id(),
        listen = %config.listen,
        shards = config.shards,
        "starting"
    );
    if config.security.trusted_hosts.is_empty() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "security.trusted_hosts (TRUSTED_HOSTS) is not set and the relay listens beyond \
             loopback: every Host is answered, so a page using DNS rebinding can reach it \
             through a browser on its network; list the names clients use (docs/security.md)"
        );
    }
    if let Some(external) = &config.auth.external {
        tracing::info!(
            algorithm = ?external.algorithm,
            issuer = external.issuer.as_deref().unwrap_or("(any)"),
            "external tokens accepted"
        );
        if external.audience.is_none() {
            tracing::warn!(
                "auth.external.audience (PULSAR_EXTERNAL_JWT_AUDIENCE) is not set: a token the \
                 issuer made for any other application is accepted here too; set the audience \
                 the issuer puts in tokens meant for this relay (docs/auth.md#external-tokens)"
            );
        }
    }
    match pulsar_relay::shard::runtime::run(config) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Printed rather than logged: it must reach the operator whatever LOG_LEVEL says.
            report(format_args!("pulsar-relay: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Prints a fatal error on stderr. Unlike `eprintln!`, a stderr that cannot be written (a
/// closed pipe) does not panic: the exit status still says what happened.
fn report(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn init_logging(config: &config::Config) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::new(config.log_level.as_filter_str());
    // Colour codes only for a person at a terminal: in a log file or a collector they are
    // noise, and they would make an escape sequence in the log look legitimate.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a pipe whose reader left) is dropped.
        // With internal-error logging on, tracing-subscriber reports the failed write with
        // `eprintln!` to the same closed stderr, which panics, killing whichever thread
        // logged: the signal thread, then SIGTERM and SIGINT were ignored for good.
        .log_internal_errors(false);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Raises the soft open-files limit to the hard one: every client connection is a descriptor,
/// and the usual soft default (1024) would refuse connections long before memory or CPU run
/// out. Logged either way, so an operator sees the ceiling the relay runs under.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
}
