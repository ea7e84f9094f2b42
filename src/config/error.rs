//! What a failed load reports: [`ConfigError`], and [`Origin`], where a value came from.
//!
//! Owns: the error wording shared by every rule ("invalid value `v` for `key` (origin):
//! expected …"), the redaction of secrets and the shortening of long values in it. Does not
//! own: the rules themselves (`resolve`) or what each kind of value expects.

use std::fmt;
use std::path::PathBuf;

use super::settings::Setting;

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File {
        path: PathBuf,
        /// The key as written when it was an alias (`valkey.pool_size`).
        alias: Option<&'static str>,
        /// 1-based; 0 when the parser could not tell.
        line: u64,
        column: u64,
    },
    Env(&'static str),
    Flag(&'static str),
}

impl Origin {
    /// Precedence, used to blame the more deliberate of two conflicting settings.
    pub(super) fn rank(&self) -> u8 {
        match self {
            Origin::Default => 0,
            Origin::File { .. } => 1,
            Origin::Env(_) => 2,
            Origin::Flag(_) => 3,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File {
                path,
                alias,
                line,
                column,
            } => {
                f.write_str("from ")?;
                if let Some(alias) = alias {
                    write!(f, "`{alias}` in ")?;
                }
                write!(f, "{}", path.display())?;
                if *line > 0 {
                    write!(f, ":{line}:{column}")?;
                }
                Ok(())
            }
            Origin::Env(var) => write!(f, "from env {var}"),
            Origin::Flag(flag) => write!(f, "from flag {flag}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read config file `{}`: {io}", path.display())]
    ReadFile {
        path: PathBuf,
        /// In the message rather than `#[source]`: start-up prints the error with `{}`, and a
        /// missing file's reason must not need `{:#}` to show.
        io: std::io::Error,
    },

    /// Not YAML, not a mapping, an unknown or duplicate key, or a section that is not a
    /// mapping. `message` is the parser's and ends with its location.
    #[error("cannot parse config file `{}`: {message}", path.display())]
    Yaml {
        path: PathBuf,
        message: String,
        line: Option<u64>,
        column: Option<u64>,
    },

    /// A value that does not parse or is out of range. `value` is `<redacted>` for secrets.
    #[error("invalid value `{value}` for `{key}` ({origin}): expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        expected: String,
    },
}

pub(super) fn invalid(
    setting: &Setting,
    text: &str,
    origin: &Origin,
    expected: String,
) -> ConfigError {
    let value = if setting.secret {
        "<redacted>".to_owned()
    } else {
        shown_value(text)
    };
    ConfigError::Invalid {
        key: setting.path,
        value,
        origin: origin.clone(),
        expected,
    }
}

/// Escapes control characters and shortens long values so one bad line stays one line.
pub(super) fn shown_value(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    let mut shown: String = text
        .chars()
        .take(MAX_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        shown.push('…');
    }
    shown
}
