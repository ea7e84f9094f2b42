//! The file layer: the YAML document read into raw values, each with its position. The
//! schema (which sections and keys exist) is the settings table.
//!
//! Owns: walking the document, unknown-key and alias errors, lists written as YAML lists
//! (turned into the text form the environment uses, so one parser reads both).
//! Does not own: parsing the values (every leaf is kept as text for `resolve`).

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::error::{invalid, ConfigError, Origin};
use super::settings::{self, Kind, Setting};

/// One value set in the file.
pub(super) struct FileEntry {
    pub(super) setting: &'static Setting,
    /// The path as written: the setting's, or its alias when that was used.
    pub(super) written: &'static str,
    pub(super) value: Spanned<String>,
}

/// Reads the config file into its values. Keys are checked against [`settings::ALL`]: a
/// section or key nobody declared is an error naming it and the keys its section has, as
/// serde's `deny_unknown_fields` words it. Every leaf is read as its text (serde-saphyr keeps
/// a plain scalar's spelling when asked for a string: `007` stays `007`, `yes` stays `yes`),
/// so the file goes through the same parsers as env vars and flags and a bad value gets our
/// message, not serde's. A section is a mapping or null, so a section whose keys are all
/// commented out (`memory:` followed by comments only, as in the example file) still loads.
pub(super) fn read_file(path: &Path, text: &str) -> Result<Vec<FileEntry>, ConfigError> {
    // No source snippets in errors: a snippet around a syntax error near `password:` would
    // print the password.
    let options = serde_saphyr::options! { with_snippet: false };
    let FileEntries(entries) = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let location = e.location();
        ConfigError::Yaml {
            path: path.to_owned(),
            message: e.to_string(),
            line: location.map(|l| l.line()),
            column: location.map(|l| l.column()),
        }
    })?;
    for setting in settings::ALL {
        let Some(alias) = setting.alias else {
            continue;
        };
        let written = |as_written: &str| {
            entries
                .iter()
                .find(|e| e.setting.path == setting.path && e.written == as_written)
        };
        if let (Some(_), Some(aliased)) = (written(setting.path), written(alias)) {
            let origin = Origin::File {
                path: path.to_owned(),
                alias: Some(alias),
                line: aliased.value.referenced.line(),
                column: aliased.value.referenced.column(),
            };
            return Err(invalid(
                setting,
                &aliased.value.value,
                &origin,
                format!("only one of `{}` and its alias `{alias}`", setting.path),
            ));
        }
    }
    Ok(entries)
}

/// The sections and keys the file may contain, derived once from [`settings::ALL`]: for each
/// section path (`""` for the top level) the names it holds, subsections and aliases
/// included, in declaration order (the order an unknown-key error lists them in).
fn file_schema() -> &'static [(&'static str, Vec<&'static str>)] {
    static SCHEMA: OnceLock<Vec<(&'static str, Vec<&'static str>)>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut schema: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        let mut add = |section: &'static str, name: &'static str| {
            let at = match schema.iter().position(|(s, _)| *s == section) {
                Some(at) => at,
                None => {
                    schema.push((section, Vec::new()));
                    schema.len() - 1
                }
            };
            if !schema[at].1.contains(&name) {
                schema[at].1.push(name);
            }
        };
        for setting in settings::ALL {
            for path in std::iter::once(setting.path).chain(setting.alias) {
                // `a.b.c` adds `a` to "", `b` to `a` and `c` to `a.b`.
                let mut section = "";
                let mut rest = path;
                while let Some((name, tail)) = rest.split_once('.') {
                    add(section, name);
                    section = &path[..path.len() - tail.len() - 1];
                    rest = tail;
                }
                add(section, rest);
            }
        }
        schema
    })
}

/// The names `section` may contain.
pub(super) fn file_keys(section: &str) -> &'static [&'static str] {
    file_schema()
        .iter()
        .find(|(s, _)| *s == section)
        .map_or(&[], |(_, names)| names.as_slice())
}

/// What a key of the file is.
enum FileKey {
    Setting {
        setting: &'static Setting,
        written: &'static str,
    },
    Section(&'static str),
}

/// The file's values, in document order.
struct FileEntries(Vec<FileEntry>);

impl<'de> Deserialize<'de> for FileEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut entries = Vec::new();
        deserializer.deserialize_struct(
            "config",
            file_keys(""),
            SectionVisitor {
                section: "",
                out: &mut entries,
            },
        )?;
        Ok(FileEntries(entries))
    }
}

/// Reads the mapping of `section` into `out`.
struct SectionVisitor<'a> {
    section: &'static str,
    out: &'a mut Vec<FileEntry>,
}

impl<'de> serde::de::Visitor<'de> for SectionVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.section {
            "" => f.write_str("a mapping of configuration keys"),
            section => write!(f, "a mapping of `{section}` keys, or null"),
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        while let Some(key) = map.next_key_seed(KeySeed {
            section: self.section,
        })? {
            match key {
                FileKey::Setting { setting, written } => {
                    let value = if matches!(setting.kind, Kind::AddrList { .. }) {
                        map.next_value::<Option<Spanned<CommaList>>>()?
                            .map(|list| Spanned::new(list.value.0, list.referenced, list.defined))
                    } else if matches!(setting.kind, Kind::List { .. }) {
                        map.next_value::<Option<Spanned<JsonList>>>()?
                            .map(|list| Spanned::new(list.value.0, list.referenced, list.defined))
                    } else {
                        map.next_value::<Option<Spanned<String>>>()?
                    };
                    if let Some(value) = value {
                        out.push(FileEntry {
                            setting,
                            written,
                            value,
                        });
                    }
                }
                FileKey::Section(section) => map.next_value_seed(SectionSeed {
                    section,
                    out: &mut *out,
                })?,
            }
        }
        Ok(())
    }
}

/// A nested section: a mapping, or null for one whose keys are all commented out.
struct SectionSeed<'a> {
    section: &'static str,
    out: &'a mut Vec<FileEntry>,
}

impl<'de> serde::de::DeserializeSeed<'de> for SectionSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SectionSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a mapping of `{}` keys, or null", self.section)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_struct(
            "section",
            file_keys(self.section),
            SectionVisitor {
                section: self.section,
                out: self.out,
            },
        )
    }
}

/// A key of `section`, rejected while it is read (as a derived struct's field name is) so the
/// error carries the key's position.
struct KeySeed {
    section: &'static str,
}

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = FileKey;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<FileKey, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = FileKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a configuration key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<FileKey, E> {
        let path = match self.section {
            "" => key.to_owned(),
            section => format!("{section}.{key}"),
        };
        for setting in settings::ALL {
            if setting.path == path {
                let written = setting.path;
                return Ok(FileKey::Setting { setting, written });
            }
            if let Some(written) = setting.alias.filter(|alias| *alias == path) {
                return Ok(FileKey::Setting { setting, written });
            }
        }
        match file_schema().iter().find(|(section, _)| *section == path) {
            Some((section, _)) => Ok(FileKey::Section(section)),
            None => Err(E::unknown_field(key, file_keys(self.section))),
        }
    }
}

/// A leaf written either as a YAML list of scalars or as one comma-separated string (the
/// environment variable's form), read as that string so both take one parser
/// (`valkey.sentinels: ["10.0.0.1:26379", "10.0.0.2:26379"]`).
struct CommaList(String);

impl<'de> Deserialize<'de> for CommaList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CommaList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of `host:port` strings, or one comma-separated string")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<CommaList, E> {
                Ok(CommaList(text.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut items: A,
            ) -> Result<CommaList, A::Error> {
                let mut all: Vec<String> = Vec::new();
                while let Some(item) = items.next_element::<String>()? {
                    all.push(item);
                }
                Ok(CommaList(all.join(",")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A [`Kind::List`] leaf: a YAML list of scalars, read as the JSON array of its entries (so an
/// entry keeps any comma it has), or one string in either of the environment's forms.
struct JsonList(String);

impl<'de> Deserialize<'de> for JsonList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = JsonList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings, or one string (a JSON array or comma-separated)")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<JsonList, E> {
                Ok(JsonList(text.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut items: A,
            ) -> Result<JsonList, A::Error> {
                let mut all: Vec<String> = Vec::new();
                while let Some(item) = items.next_element::<String>()? {
                    all.push(item);
                }
                // A Vec<String> always serialises.
                serde_json::to_string(&all)
                    .map(JsonList)
                    .map_err(serde::de::Error::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
