//! Layered, typed configuration.
//!
//! Job: build one component's typed configuration struct from, lowest to highest precedence,
//! 1. the struct's defaults (`#[serde(default)]`; defaults are the safe choice),
//! 2. a YAML or JSON configuration file (`--config FILE`),
//! 3. environment variables (`SHCR_...`),
//! 4. command-line flags.
//!
//! Layers 3 and 4 are both clap arguments declared as `Option<T>` with `#[arg(long, env = "...")]`:
//! clap already ranks a flag above its environment variable, so this module receives them as one
//! *override* layer. An override struct derives `Serialize` with
//! `#[serde(skip_serializing_if = "Option::is_none")]` on every field; it is serialised to a JSON
//! value, deep-merged over the file's value, and the result is deserialised into the target type.
//!
//! Invariants:
//! - Target types use `#[serde(default, deny_unknown_fields)]`, so a misspelt key is an error,
//!   never a silently ignored setting. Every nested config struct has its own `Default`: a
//!   section that is present but partial is completed from that struct's defaults, not from the
//!   parent's.
//! - The file is checked against the target type on its own before merging, so an unknown key or
//!   a wrong type is reported with the file's path, the key's path and its line — not lost in the
//!   merge.
//! - An absent flag never overwrites a value from the file (`None` is not serialised).
//! - Merging is deep for maps and replaces everything else (a list from a flag replaces the file's
//!   list; it is not appended to).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Why a configuration could not be loaded. Every message names where the bad value came from;
/// the cause (with the key's path and line) is the error's `source()`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("the configuration file {path} is not valid")]
    InvalidFile {
        path: PathBuf,
        source: serde_yaml::Error,
    },

    #[error(
        "the configuration file {path} must be a mapping of settings (`key: value` lines), not a single value or a list"
    )]
    NotAMapping { path: PathBuf },

    #[error("cannot apply the `{section}` settings from flags and environment")]
    InvalidOverride {
        section: String,
        source: serde_json::Error,
    },

    #[error(
        "the `{section}` settings from flags and environment must be a struct with named fields"
    )]
    OverrideNotAStruct { section: String },

    #[error("the configuration is not valid after applying flags and environment")]
    InvalidMerged { source: serde_json::Error },
}

/// The override layer (environment and flags), one serialisable clap argument struct per section.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    root: Map<String, Value>,
}

impl Overrides {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `args` as overrides for the top-level key `section` (e.g. `"telemetry"`).
    /// Fields that serialise to nothing (absent `Option`s) leave the lower layers untouched.
    pub fn section(mut self, section: &str, args: &impl Serialize) -> Result<Self, ConfigError> {
        let value = serde_json::to_value(args).map_err(|source| ConfigError::InvalidOverride {
            section: section.to_owned(),
            source,
        })?;
        let Value::Object(fields) = value else {
            return Err(ConfigError::OverrideNotAStruct {
                section: section.to_owned(),
            });
        };
        if !fields.is_empty() {
            let mut layer = Map::new();
            layer.insert(section.to_owned(), Value::Object(fields));
            merge_maps(&mut self.root, layer);
        }
        Ok(self)
    }
}

/// Loads `C` from its defaults, then `file` (YAML or JSON; JSON is read as YAML), then `overrides`.
pub fn load<C: DeserializeOwned>(
    file: Option<&Path>,
    overrides: &Overrides,
) -> Result<C, ConfigError> {
    let mut merged = match file {
        Some(path) => read_file::<C>(path)?,
        None => Map::new(),
    };
    merge_maps(&mut merged, overrides.root.clone());
    serde_json::from_value(Value::Object(merged))
        .map_err(|source| ConfigError::InvalidMerged { source })
}

/// Reads and checks the file against `C`, returning its settings as a JSON map for merging.
fn read_file<C: DeserializeOwned>(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |source| ConfigError::InvalidFile {
        path: path.to_owned(),
        source,
    };
    let value: Value = serde_yaml::from_str(&text).map_err(invalid)?;
    match value {
        // An empty file (or one holding only comments) sets nothing.
        Value::Null => Ok(Map::new()),
        Value::Object(map) => {
            // Deserialising straight from the text keeps serde_yaml's key path and line number
            // in the error; the merged value below would have lost both.
            serde_yaml::from_str::<C>(&text).map_err(invalid)?;
            Ok(map)
        }
        _ => Err(ConfigError::NotAMapping {
            path: path.to_owned(),
        }),
    }
}

fn merge_maps(base: &mut Map<String, Value>, layer: Map<String, Value>) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(Value::Object(base_map)), Value::Object(layer_map)) => {
                merge_maps(base_map, layer_map)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use clap::Parser;
    use serde::Deserialize;

    use super::*;

    /// The message a user sees: the error and its causes, as `anyhow`'s `{:#}` prints them.
    fn chain(error: &ConfigError) -> String {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct ExampleConfig {
        server: ServerConfig,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct ServerConfig {
        listen: String,
        workers: u32,
        log: String,
    }

    impl Default for ServerConfig {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:8080".into(),
                workers: 4,
                log: "info".into(),
            }
        }
    }

    // Env var names unique to this test module, so nothing else in the test binary reads them.
    #[derive(Debug, Parser, Serialize)]
    struct ServerArgs {
        #[arg(long, env = "SHCR_CONFIG_TEST_WORKERS")]
        #[serde(skip_serializing_if = "Option::is_none")]
        workers: Option<u32>,
        #[arg(long, env = "SHCR_CONFIG_TEST_LOG")]
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
    }

    fn yaml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("create temp file");
        file.write_all(text.as_bytes()).expect("write temp file");
        file
    }

    fn load_with(file: Option<&Path>, argv: &[&str]) -> Result<ExampleConfig, ConfigError> {
        let args = ServerArgs::try_parse_from(std::iter::once("test").chain(argv.iter().copied()))
            .expect("test arguments parse");
        load(file, &Overrides::new().section("server", &args)?)
    }

    #[test]
    fn each_layer_overrides_the_one_below() {
        // SAFETY: these variables are unique to this test and every environment access in this
        // test binary goes through `std::env`, which serialises reads and writes.
        unsafe {
            std::env::remove_var("SHCR_CONFIG_TEST_WORKERS");
            std::env::remove_var("SHCR_CONFIG_TEST_LOG");
        }

        let defaults = load_with(None, &[]).expect("defaults load");
        assert_eq!(defaults, ExampleConfig::default());

        let file = yaml_file("server:\n  workers: 8\n  log: debug\n");
        let from_file = load_with(Some(file.path()), &[]).expect("file loads");
        assert_eq!(from_file.server.workers, 8);
        assert_eq!(from_file.server.log, "debug");
        assert_eq!(
            from_file.server.listen, "127.0.0.1:8080",
            "keys absent from the file keep their defaults"
        );

        // SAFETY: as above.
        unsafe { std::env::set_var("SHCR_CONFIG_TEST_WORKERS", "16") };
        let from_env = load_with(Some(file.path()), &[]).expect("env applies");
        assert_eq!(from_env.server.workers, 16, "environment beats the file");
        assert_eq!(
            from_env.server.log, "debug",
            "unset variables leave the file alone"
        );

        let from_flag = load_with(Some(file.path()), &["--workers", "32", "--log", "trace"])
            .expect("flags apply");
        // SAFETY: as above.
        unsafe { std::env::remove_var("SHCR_CONFIG_TEST_WORKERS") };
        assert_eq!(from_flag.server.workers, 32, "a flag beats the environment");
        assert_eq!(from_flag.server.log, "trace", "a flag beats the file");
    }

    #[test]
    fn json_files_are_accepted() {
        let mut file = tempfile::Builder::new()
            .suffix(".json")
            .tempfile()
            .expect("create temp file");
        file.write_all(br#"{"server": {"listen": "0.0.0.0:9000"}}"#)
            .expect("write temp file");
        let config: ExampleConfig = load(Some(file.path()), &Overrides::new()).expect("loads");
        assert_eq!(config.server.listen, "0.0.0.0:9000");
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        let file = yaml_file("# nothing configured yet\n");
        let config: ExampleConfig = load(Some(file.path()), &Overrides::new()).expect("loads");
        assert_eq!(config, ExampleConfig::default());
    }

    #[test]
    fn an_unknown_key_is_named_with_the_file() {
        let file = yaml_file("server:\n  workers: 8\n  wrokers: 9\n");
        let error = load::<ExampleConfig>(Some(file.path()), &Overrides::new())
            .expect_err("unknown key is rejected");
        let message = chain(&error);
        assert!(message.contains("wrokers"), "{message}");
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn a_wrong_type_is_named_with_the_file() {
        let file = yaml_file("server:\n  workers: many\n");
        let error = load::<ExampleConfig>(Some(file.path()), &Overrides::new())
            .expect_err("wrong type is rejected");
        let message = chain(&error);
        assert!(message.contains("server.workers"), "{message}");
        assert!(message.contains("invalid type"), "{message}");
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn a_missing_file_says_which() {
        let error =
            load::<ExampleConfig>(Some(Path::new("/nonexistent/shcr.yaml")), &Overrides::new())
                .expect_err("missing file is an error");
        assert!(
            error.to_string().contains("/nonexistent/shcr.yaml"),
            "{error}"
        );
    }

    #[test]
    fn a_list_is_not_a_configuration() {
        let file = yaml_file("- server\n");
        let error = load::<ExampleConfig>(Some(file.path()), &Overrides::new())
            .expect_err("a list is rejected");
        assert!(matches!(error, ConfigError::NotAMapping { .. }), "{error}");
    }
}
