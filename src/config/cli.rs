//! The command line ([`Cli`]) and the `--help` text, whose environment-variable and
//! file-key listings are generated from the settings table.
//!
//! Owns: the flags, how `--help` lays out the settings. Does not own: what a flag's value
//! means (it is one more layer, applied in `resolve`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use super::parse::{format_duration, format_rate, format_size};
use super::settings::{self as s, Kind, Setting};

/// Pulsar Relay: a thread-per-core message relay (HTTP publish, in-memory hot tier, Valkey
/// Streams persistence).
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser)]
#[command(name = "pulsar-relay", bin_name = "pulsar-relay", version, about, long_about = None, after_help = after_help())]
pub struct Cli {
    #[arg(
        long,
        value_name = "ADDR",
        help = flag_help("Address and port to listen on, e.g. 0.0.0.0:8080", &s::LISTEN)
    )]
    pub listen: Option<SocketAddr>,

    #[arg(
        long,
        value_name = "N",
        help = flag_help(
            &format!(
                "Number of shards (threads, one per core), 1..={}; 0 = one per available CPU",
                s::MAX_SHARDS
            ),
            &s::SHARDS
        )
    )]
    pub shards: Option<u64>,

    /// YAML config file to read (it must exist); without this flag ./config.yaml is read
    /// if present
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Lines of the generated help stay within this many columns: clap wraps its own part at 100
/// and leaves this text alone, and 96 is what the hand-written text used.
const HELP_WIDTH: usize = 96;

/// A flag's help: what it does, then its default, variable and key from the declaration.
fn flag_help(what: &str, setting: &Setting) -> String {
    let default = default_text(&setting.kind).unwrap_or_else(|| "none".to_owned());
    format!(
        "{what} (default {default}; env {}; config key `{}`)",
        setting.env.join(", "),
        setting.path
    )
}

/// `--help`'s text after the options: how the layers combine, every environment variable and
/// every file key, all from [`s::ALL`].
fn after_help() -> String {
    let mut out = String::from(
        "Settings are layered, later layers winning key by key:\n  \
         built-in defaults < config file < environment variables < command-line flags\n\n\
         Environment variables (each also accepted as PULSAR_<NAME>, which wins when both are \
         set;\nan empty value counts as unset):\n",
    );
    // The Python relay's names first (which deployments of it already set), then this
    // relay's own PULSAR_-only ones.
    let (python, own): (Vec<&Setting>, Vec<&Setting>) = s::ALL
        .iter()
        .copied()
        .filter(|setting| !setting.env.is_empty())
        .partition(|setting| setting.env.len() > 1);
    for setting in python.into_iter().chain(own) {
        let mut notes: Vec<&str> = Vec::new();
        if !setting.help.is_empty() {
            notes.push(setting.help);
        }
        if setting.env.len() == 1 {
            notes.push("PULSAR_ form only");
        }
        let mut text = setting.path.to_owned();
        if let Some(syntax) = env_syntax(&setting.kind) {
            text.push_str(": ");
            text.push_str(&syntax);
        }
        if !notes.is_empty() {
            text.push_str(&format!(" ({})", notes.join("; ")));
        }
        let lead = format!("  {:<25}  ", setting.env[0]);
        push_wrapped(&mut out, &lead, text.split(' ').map(str::to_owned), " ");
    }

    out.push_str(
        "\nConfig file keys (YAML, all optional, unknown keys are errors; defaults in \
         config.yaml.example):\n",
    );
    let mut sections: Vec<&str> = Vec::new();
    for setting in s::ALL {
        if !sections.contains(&setting.section()) {
            sections.push(setting.section());
        }
    }
    let label_width = sections.iter().map(|s| s.len() + 2).max().unwrap_or(0);
    for section in sections {
        let items = s::ALL
            .iter()
            .filter(|setting| setting.section() == section)
            .map(|setting| file_key_item(setting));
        let lead = if section.is_empty() {
            "  ".to_owned()
        } else {
            format!("  {:<label_width$}", format!("{section}:"))
        };
        push_wrapped(&mut out, &lead, items, "  ");
    }
    out.push_str(
        "\nSizes: 16KiB, 64MiB, 1GiB (KB/MB/GB are powers of 1000) or integer bytes.\n\
         Durations: 500ms, 30s, 24h, or integer seconds.\n\
         Lists: comma-separated or a JSON array; in the file also a YAML list.",
    );
    out
}

/// A key as `--help` lists it under its section: the leaf name, its alias, and for a
/// setting no environment variable sets (whose line above carries them) its choices and
/// note.
fn file_key_item(setting: &Setting) -> String {
    let leaf = |path: &'static str| path.rsplit('.').next().unwrap_or(path);
    let mut item = leaf(setting.path).to_owned();
    if let Some(alias) = setting.alias {
        item.push_str(&format!(" (alias {})", leaf(alias)));
    }
    if setting.env.is_empty() {
        // Booleans and lists are YAML's own there; choices are not guessable.
        if let Kind::Choice { names, .. } = &setting.kind {
            item.push_str(&format!(": {}", names.join(" | ")));
        }
        if !setting.help.is_empty() {
            item.push_str(&format!(" ({})", setting.help));
        }
    }
    item
}

/// How a value is written where the kind alone does not tell (an environment variable).
/// Sizes and durations are explained once, at the end of the help.
fn env_syntax(kind: &Kind) -> Option<String> {
    match kind {
        Kind::Choice { names, .. } => Some(names.join(" | ")),
        Kind::Bool { .. } => Some("true|false|1|0|yes|no".to_owned()),
        Kind::AddrList { .. } => Some("host:port,host:port".to_owned()),
        Kind::List { .. } => Some(r#"a,b or ["a","b"]"#.to_owned()),
        Kind::Rate { .. } => Some("N/s | N/min | N/h | off".to_owned()),
        _ => None,
    }
}

/// The declared default as the loader would print it; `None` for a setting that is unset
/// by default.
fn default_text(kind: &Kind) -> Option<String> {
    match kind {
        Kind::Addr { default } => Some(default.to_string()),
        Kind::Uint { default, .. } => Some(default.to_string()),
        Kind::Size { default, .. } => Some(format_size(*default)),
        Kind::Duration { default, .. } => Some(format_duration(*default)),
        Kind::Bool { default } => Some(default.to_string()),
        Kind::Choice { default, .. } => Some((*default).to_owned()),
        Kind::Name { default, .. } => default.map(str::to_owned),
        Kind::Template { default, .. } => Some((*default).to_owned()),
        Kind::List { default, .. } if !default.is_empty() => Some(default.join(",")),
        Kind::Rate { default } => Some(format_rate(*default)),
        Kind::OptionalAddr { .. } | Kind::Text | Kind::AddrList { .. } | Kind::List { .. } => None,
    }
}

/// Appends `lead` and `items` separated by `sep`, starting a new line (indented to `lead`'s
/// width) before an item that would pass [`HELP_WIDTH`]; an item is never split.
fn push_wrapped(out: &mut String, lead: &str, items: impl Iterator<Item = String>, sep: &str) {
    let indent = " ".repeat(lead.chars().count());
    let mut line = lead.to_owned();
    let mut line_is_empty = true;
    for item in items {
        let width = line.chars().count() + sep.len() + item.chars().count();
        if !line_is_empty && width > HELP_WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line.clone_from(&indent);
            line_is_empty = true;
        }
        if !line_is_empty {
            line.push_str(sep);
        }
        line.push_str(&item);
        line_is_empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_documents_every_option_variable_and_key() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for option in [
            "--listen <ADDR>",
            "--shards <N>",
            "--config <PATH>",
            "--version",
            "--help",
        ] {
            assert!(help.contains(option), "{option} missing from --help");
        }
        for spec in s::ALL {
            for var in spec.env {
                // The prefixed forms are documented once, as PULSAR_<NAME>.
                let unprefixed = var.strip_prefix("PULSAR_").unwrap_or(var);
                assert!(
                    help.contains(var) || spec.env.contains(&unprefixed),
                    "{var} missing from --help"
                );
            }
            let (section, leaf) = spec.path.rsplit_once('.').unwrap_or(("", spec.path));
            // The section's line and its continuation lines (indented past the section
            // names; `valkey` needs four since Sentinel and idempotency keys joined it).
            let mut section_lines = help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(&format!("{section}:")));
            let section_line = section_lines
                .next()
                .into_iter()
                .chain(section_lines.take_while(|l| l.starts_with("               ")))
                // Joined with a space: the last listed key must not run into the next line.
                .collect::<Vec<_>>()
                .join(" ");
            let listed = if section.is_empty() {
                help.lines()
                    .any(|l| l.starts_with("  listen") && l.split_whitespace().any(|w| w == leaf))
            } else {
                section_line
                    .split_whitespace()
                    .any(|w| w.trim_end_matches(':') == leaf)
            };
            assert!(listed, "{} missing from --help", spec.path);
        }
    }

    #[test]
    fn flags_parse_and_version_is_offered() {
        let cli = Cli::try_parse_from([
            "pulsar-relay",
            "--listen",
            "[::]:80",
            "--shards",
            "8",
            "--config",
            "/etc/relay.yaml",
        ])
        .expect("valid flags");
        assert_eq!(cli.listen, Some("[::]:80".parse().expect("literal")));
        assert_eq!(cli.shards, Some(8));
        assert_eq!(cli.config, Some(PathBuf::from("/etc/relay.yaml")));
        let version = Cli::try_parse_from(["pulsar-relay", "--version"]).map(|_| ());
        assert!(matches!(
            version.map_err(|e| e.kind()),
            Err(clap::error::ErrorKind::DisplayVersion)
        ));
        assert!(Cli::try_parse_from(["pulsar-relay", "--listen", "localhost:80"]).is_err());
    }
}
