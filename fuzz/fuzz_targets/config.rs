//! The configuration loader on untrusted text: YAML (serde-saphyr), environment variables and
//! command-line flags (clap) merged by `config::load_from_parts`, the entry point the process
//! path uses after reading the file, with a fixed machine and no access to the real
//! environment or filesystem.
//!
//! Input: `[knob, text...]` with text split at NUL bytes into YAML, environment lines
//! (`NAME=value`, one per line) and flags (split at whitespace). `knob` picks the machine the
//! defaults are sized for. An accepted config must satisfy the documented relations between
//! its values, its key templates must round-trip, and neither the config's `Debug` nor an
//! error message may contain the Valkey password.

#![no_main]

use std::collections::HashMap;
use std::path::Path;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use pulsar_relay::config::{load_from_parts, Cli, Config, ConfigError, Machine};

const MACHINES: [Machine; 3] = [
    Machine {
        cpus: 2,
        memory_bytes: Some(8 << 30),
    },
    Machine {
        cpus: 1,
        memory_bytes: None,
    },
    Machine {
        cpus: 4096,
        memory_bytes: Some(1),
    },
];

const PASSWORD_VARS: [&str; 2] = ["VALKEY_PASSWORD", "PULSAR_VALKEY_PASSWORD"];

fn load(
    cli: &Cli,
    env: &HashMap<String, String>,
    yaml: &str,
    machine: &Machine,
) -> Result<Config, ConfigError> {
    let lookup = |name: &str| env.get(name).cloned();
    let yaml = (!yaml.is_empty()).then_some((Path::new("fuzz.yaml"), yaml));
    load_from_parts(cli, &lookup, yaml, machine)
}

fn describe(result: &Result<Config, ConfigError>) -> String {
    match result {
        Ok(config) => format!("{config:?}"),
        Err(e) => format!("{e} {e:?}"),
    }
}

fn check_config(config: &Config, topic: &str) {
    assert!((1..=1024).contains(&config.shards));
    assert!(config.ws.ping_interval < config.ws.idle_timeout);
    assert!(config.longpoll.default_timeout <= config.longpoll.max_timeout);
    assert!(config.longpoll.default_limit <= config.longpoll.max_limit);
    assert!(config.api.default_page_limit <= config.api.max_page_limit);
    let (stream, meta) = (&config.valkey.stream_key, &config.valkey.meta_key);
    assert_ne!(stream, meta);
    for template in [stream, meta] {
        let parsed = pulsar_relay::config::KeyTemplate::parse(&template.to_string());
        assert_eq!(
            parsed.as_ref(),
            Some(template),
            "a template prints back as itself"
        );
    }
    if pulsar_relay::topic::validate(topic, config.api.max_topic_name_len).is_ok() {
        let stream_key = stream.render(topic);
        assert_eq!(stream.topic_of(&stream_key), Some(topic));
        assert_eq!(stream_key.len(), stream.rendered_len(topic));
        // The stream of one topic must never be the metadata hash of another.
        if let Some(other) = meta.topic_of(&stream_key) {
            assert!(
                pulsar_relay::topic::validate(other, config.api.max_topic_name_len).is_err(),
                "stream key {stream_key:?} of topic {topic:?} is the meta key of topic {other:?}"
            );
        }
        let meta_key = meta.render(topic);
        if let Some(other) = stream.topic_of(&meta_key) {
            assert!(
                pulsar_relay::topic::validate(other, config.api.max_topic_name_len).is_err(),
                "meta key {meta_key:?} of topic {topic:?} is the stream key of topic {other:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, text)) = data.split_first() else {
        return;
    };
    let machine = &MACHINES[usize::from(knob) % MACHINES.len()];
    let text = String::from_utf8_lossy(text);
    let mut parts = text.split('\0');
    let yaml = parts.next().unwrap_or("");
    let env: HashMap<String, String> = parts
        .next()
        .unwrap_or("")
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let flags = parts.next().unwrap_or("");
    let topic = parts.next().unwrap_or("orders");
    let args = std::iter::once("pulsar-relay").chain(flags.split_whitespace());
    // Clap exits on --help/--version only with `parse`; `try_parse_from` returns them.
    let cli = Cli::try_parse_from(args).unwrap_or_default();
    let result = load(&cli, &env, yaml, machine);
    if let Ok(config) = &result {
        check_config(config, topic);
    }
    // The password must not leak. It is checked only when it is distinctive: long, and not
    // found in what the loader produces without it.
    if let Some(password) = PASSWORD_VARS
        .iter()
        .filter_map(|name| env.get(*name))
        .find(|p| p.trim().len() >= 12)
    {
        let shown = describe(&result);
        if shown.contains(password.trim()) {
            let mut without = env.clone();
            for name in PASSWORD_VARS {
                without.remove(name);
            }
            let baseline = describe(&load(&cli, &without, yaml, machine));
            assert!(
                baseline.contains(password.trim())
                    || yaml.contains(password.trim())
                    || flags.contains(password.trim())
                    || env.iter().any(|(k, v)| !PASSWORD_VARS.contains(&k.as_str())
                        && (k.contains(password.trim()) || v.contains(password.trim()))),
                "the Valkey password shows in {shown}"
            );
        }
    }
});
