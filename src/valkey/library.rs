//! Valkey Function libraries a connection needs: checked on every new connection, before it
//! carries any command, and loaded when missing or older than ours.
//!
//! Owns: reading the loaded library's version (`FUNCTION LIST LIBRARYNAME`; the version is
//! `version <n>` in its functions' descriptions) and loading ours (`FUNCTION LOAD`, with
//! `REPLACE` only over an older version). Does not own: what the library does or how its
//! functions are called (the storage layer owns the source and the calls).
//!
//! Why on every connection: functions live in the server's memory (and its RDB/AOF), so a
//! Valkey that restarted without persistence, a failover to a replica, or an operator's
//! `FUNCTION FLUSH` (noticed at the next reconnect) leaves them missing; a connection is the
//! moment the relay starts using a server.
//!
//! Several relays on one Valkey (a fleet, a rolling deploy): the library is loaded only if
//! missing (`FUNCTION LOAD` without `REPLACE`: of two relays racing, one loads it and the
//! other finds it there) or older, never replaced by an older relay, so relays of different
//! versions do not fight over it. Hence the rule in the library's source: a new version keeps
//! every function, argument and reply older versions use. What is left is a narrow race:
//! two relays of different versions that both see the same even older version loaded both
//! replace it, and the older of them may win; the newer relay puts its version back at its
//! next reconnect.

use super::connection::Connection;
use super::{Reply, ValkeyError};

/// A library of Valkey Functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionLibrary {
    /// The library's name: `#!lua name=<name>` on the source's first line.
    pub name: &'static str,
    /// This build's version; the source's functions say `version <n>` in their descriptions.
    pub version: u32,
    /// The library's code, as `FUNCTION LOAD` takes it.
    pub source: &'static str,
}

/// What [`ensure_loaded`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibraryState {
    /// Our version or a newer one was already loaded (the version found).
    Present(u32),
    /// Loaded ours; the version it replaced, if any (0: a version we cannot read).
    Loaded { replaced: Option<u32> },
}

/// Makes sure `library`, at its version or newer, is loaded on the server behind
/// `connection` (a fresh connection: nothing else in flight).
pub async fn ensure_loaded(
    connection: &mut Connection,
    library: &FunctionLibrary,
) -> Result<LibraryState, ValkeyError> {
    let mut raced = false;
    loop {
        match loaded_version(connection, library).await? {
            Some(version) if version >= library.version => {
                return Ok(LibraryState::Present(version))
            }
            Some(version) => {
                load(connection, library, true)
                    .await
                    .map_err(|e| library_error(library, e))?;
                return Ok(LibraryState::Loaded {
                    replaced: Some(version),
                });
            }
            None => match load(connection, library, false).await {
                Ok(()) => return Ok(LibraryState::Loaded { replaced: None }),
                // Another relay loaded it between our look and our load: look again, once.
                Err(ValkeyError::Server(message))
                    if message.contains("already exists") && !raced =>
                {
                    raced = true
                }
                Err(e) => return Err(library_error(library, e)),
            },
        }
    }
}

/// `FUNCTION LOAD [REPLACE] <source>`.
async fn load(
    connection: &mut Connection,
    library: &FunctionLibrary,
    replace: bool,
) -> Result<(), ValkeyError> {
    let source = library.source.as_bytes();
    if replace {
        connection
            .call(&[b"FUNCTION", b"LOAD", b"REPLACE", source])
            .await?;
    } else {
        connection.call(&[b"FUNCTION", b"LOAD", source]).await?;
    }
    Ok(())
}

/// The version of `library` loaded on the server: `None` if it is not loaded, `Some(0)` if
/// it is but says no version we can read (then ours replaces it).
async fn loaded_version(
    connection: &mut Connection,
    library: &FunctionLibrary,
) -> Result<Option<u32>, ValkeyError> {
    let reply = connection
        .call(&[
            b"FUNCTION",
            b"LIST",
            b"LIBRARYNAME",
            library.name.as_bytes(),
        ])
        .await
        .map_err(|e| library_error(library, e))?;
    Ok(parse_loaded_version(&reply, library.name))
}

/// The version in a `FUNCTION LIST` reply for the library named `name` (see
/// [`loaded_version`]). `LIBRARYNAME` is a glob pattern, so other libraries may be listed
/// too: only the one with exactly this name counts.
fn parse_loaded_version(reply: &Reply, name: &str) -> Option<u32> {
    let libraries = reply.as_array()?;
    let library = libraries.iter().find_map(|library| {
        let fields = library.as_array()?;
        (field(fields, "library_name")?.as_str()? == name).then_some(fields)
    })?;
    let version = field(library, "functions")
        .and_then(Reply::as_array)
        .into_iter()
        .flatten()
        .filter_map(|function| {
            let description = field(function.as_array()?, "description")?.as_str()?;
            description
                .strip_prefix("version ")?
                .trim()
                .parse::<u32>()
                .ok()
        })
        .min();
    Some(version.unwrap_or(0))
}

/// The value after the field named `name` in a flat `[name, value, ...]` array.
fn field<'a>(fields: &'a [Reply], name: &str) -> Option<&'a Reply> {
    fields
        .chunks(2)
        .find(|pair| pair.first().and_then(Reply::as_str) == Some(name))
        .and_then(|pair| pair.get(1))
}

/// Names the library in an error reply, so the log line says what failed (say an ACL user
/// without `FUNCTION` rights, or a server without scripting).
fn library_error(library: &FunctionLibrary, error: ValkeyError) -> ValkeyError {
    match error {
        ValkeyError::Server(message) => ValkeyError::Server(format!(
            "loading the Valkey function library `{}` (version {}): {message}",
            library.name, library.version
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::testing::{run_local, ValkeyServer};
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn listing(name: &str, descriptions: &[&str]) -> Reply {
        let functions = descriptions
            .iter()
            .map(|d| {
                Reply::Array(vec![
                    bulk("name"),
                    bulk("f"),
                    bulk("description"),
                    bulk(d),
                    bulk("flags"),
                    Reply::Array(vec![]),
                ])
            })
            .collect();
        Reply::Array(vec![
            bulk("library_name"),
            bulk(name),
            bulk("engine"),
            bulk("LUA"),
            bulk("functions"),
            Reply::Array(functions),
        ])
    }

    #[test]
    fn version_is_read_from_the_named_library_only() {
        let reply = Reply::Array(vec![
            listing("pulsarx", &["version 9"]),
            listing("pulsar", &["version 3", "version 4"]),
        ]);
        assert_eq!(parse_loaded_version(&reply, "pulsar"), Some(3));
        assert_eq!(parse_loaded_version(&reply, "other"), None);
        let unversioned = Reply::Array(vec![listing("pulsar", &["something"])]);
        assert_eq!(parse_loaded_version(&unversioned, "pulsar"), Some(0));
        assert_eq!(parse_loaded_version(&Reply::Array(vec![]), "pulsar"), None);
    }

    const V1: FunctionLibrary = FunctionLibrary {
        name: "pulsartest",
        version: 1,
        source: "#!lua name=pulsartest\nredis.register_function{function_name='pulsartest_v', callback=function() return 1 end, description='version 1'}",
    };
    const V2: FunctionLibrary = FunctionLibrary {
        name: "pulsartest",
        version: 2,
        source: "#!lua name=pulsartest\nredis.register_function{function_name='pulsartest_v', callback=function() return 2 end, description='version 2'}",
    };

    #[test]
    fn loads_when_missing_upgrades_when_older_and_never_downgrades() {
        let server = ValkeyServer::start(&[]);
        let config = server.config();
        run_local(move || async move {
            let mut c = Connection::connect(&config).await.expect("connect");
            assert_eq!(
                ensure_loaded(&mut c, &V1).await.expect("load"),
                LibraryState::Loaded { replaced: None }
            );
            assert_eq!(
                c.call(&[b"FCALL", b"pulsartest_v", b"0"]).await,
                Ok(Reply::Integer(1))
            );
            assert_eq!(
                ensure_loaded(&mut c, &V1).await.expect("present"),
                LibraryState::Present(1)
            );
            assert_eq!(
                ensure_loaded(&mut c, &V2).await.expect("upgrade"),
                LibraryState::Loaded { replaced: Some(1) }
            );
            // An older relay finds the newer version and leaves it.
            assert_eq!(
                ensure_loaded(&mut c, &V1).await.expect("present"),
                LibraryState::Present(2)
            );
            assert_eq!(
                c.call(&[b"FCALL", b"pulsartest_v", b"0"]).await,
                Ok(Reply::Integer(2))
            );
        });
    }
}
