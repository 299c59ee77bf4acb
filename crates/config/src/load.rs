//! Merging the layers: defaults < YAML file < environment < overrides.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::NodeConfig;
use crate::validate::ValidationError;

/// Prefix of the environment variables that set config fields
/// (`OLLAMACRON_CONN_MGR_LOW=50` sets `conn_mgr_low`).
pub const ENV_PREFIX: &str = "OLLAMACRON_";

/// `OLLAMACRON_*` variables that are not config fields (read by the CLI).
pub const RESERVED_ENV_VARS: &[&str] = &["OLLAMACRON_CONFIG"];

/// A config file larger than this is refused rather than read.
const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Where a value came from, named in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A YAML file (or named YAML text).
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line override of the given key.
    Override(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("the built-in default"),
            Self::File(path) => write!(f, "config file {}", path.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::Override(_) => f.write_str("the command line"),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is larger than the limit.
    #[error("config file {} is {size} bytes, over the {MAX_CONFIG_FILE_BYTES}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The config file is not YAML.
    #[error("{origin} is not valid YAML: {message}")]
    Yaml {
        /// The file.
        origin: Origin,
        /// What the YAML parser said.
        message: String,
    },
    /// The config file is YAML but not a mapping of keys to values.
    #[error("{origin} must be a mapping of `key: value` lines, found {found}")]
    NotAMapping {
        /// The file.
        origin: Origin,
        /// What it holds instead.
        found: &'static str,
    },
    /// A key that is not a config field.
    #[error("unknown key `{key}` in {origin}{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownKey {
        /// The unknown key, as written.
        key: String,
        /// Where it was written.
        origin: Origin,
        /// The closest known key, if any is close.
        suggestion: Option<String>,
    },
    /// An environment variable whose value is not UTF-8.
    #[error("environment variable {name} is not valid UTF-8")]
    NotUnicode {
        /// The variable.
        name: String,
    },
    /// A value of the wrong type or form.
    #[error("{field} (from {origin}): {message}")]
    InvalidValue {
        /// The field path, e.g. `listen[1]`.
        field: String,
        /// Where the value came from.
        origin: Origin,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// Values that parse but break a rule.
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ValidationError>),
    /// The configuration could not be written as YAML.
    #[error("cannot serialise configuration: {0}")]
    Serialize(String),
}

/// Builds a [`NodeConfig`] from its layers. The call order does not matter:
/// defaults < file < environment < overrides, always.
#[derive(Debug, Default, Clone)]
pub struct ConfigLoader {
    file: Option<FileSource>,
    env: Vec<(OsString, OsString)>,
    overrides: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
enum FileSource {
    Path(PathBuf),
    Text { name: PathBuf, text: String },
}

impl ConfigLoader {
    /// A loader with nothing but the defaults.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Read the YAML file at `path`.
    #[must_use]
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(FileSource::Path(path.into()));
        self
    }

    /// Use YAML text as the file layer; `name` is used in messages.
    #[must_use]
    pub fn yaml_str(mut self, name: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        self.file = Some(FileSource::Text {
            name: name.into(),
            text: text.into(),
        });
        self
    }

    /// Use these variables as the environment layer; only those starting
    /// with [`ENV_PREFIX`] are read.
    #[must_use]
    pub fn env<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Use the process environment as the environment layer.
    #[must_use]
    pub fn process_env(self) -> Self {
        self.env(std::env::vars_os())
    }

    /// Override one field (`key` as in YAML; `-` may stand for `_`), given
    /// as text the way it would be written in an environment variable.
    /// Lists are comma-separated.
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, raw: impl Into<String>) -> Self {
        self.overrides.push((key.into(), raw.into()));
        self
    }

    /// Merge the layers, deserialise and validate.
    ///
    /// # Errors
    /// The first layer or field that cannot be read, or every rule the
    /// merged configuration breaks.
    pub fn load(&self) -> Result<NodeConfig, ConfigError> {
        let config = self.load_unvalidated()?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// Merge and deserialise, without the validation rules.
    ///
    /// # Errors
    /// The first layer or field that cannot be read.
    pub fn load_unvalidated(&self) -> Result<NodeConfig, ConfigError> {
        let defaults = default_mapping()?;
        let mut merged = defaults.clone();
        let mut origins: HashMap<String, Origin> = HashMap::new();

        if let Some(file) = &self.file {
            let (origin, text) = match file {
                FileSource::Path(path) => (Origin::File(path.clone()), read_file(path)?),
                FileSource::Text { name, text } => (Origin::File(name.clone()), text.clone()),
            };
            for (key, value) in parse_file(&origin, &text)? {
                check_known(&defaults, &key, &origin, |k| k.to_owned())?;
                // `listen: /ip4/…` is a list of that one address (and
                // `a, b` of two, as in the environment); `services` holds
                // mappings, so text there stays an error about its type.
                let value = match (defaults.get(key.as_str()), value) {
                    (Some(Value::Sequence(_)), Value::String(text)) if key != "services" => {
                        raw_value(&defaults, &key, &text)
                    }
                    (_, value) => value,
                };
                origins.insert(key.clone(), origin.clone());
                merged.insert(Value::String(key), value);
            }
        }

        for (name, raw) in &self.env {
            let Some(name) = name.to_str() else {
                let lossy = name.to_string_lossy();
                if lossy.starts_with(ENV_PREFIX) {
                    return Err(ConfigError::NotUnicode {
                        name: lossy.into_owned(),
                    });
                }
                continue;
            };
            let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if RESERVED_ENV_VARS.contains(&name) {
                continue;
            }
            let origin = Origin::Env(name.to_owned());
            let key = suffix.to_ascii_lowercase();
            check_known(&defaults, &key, &origin, |k| {
                format!("{ENV_PREFIX}{}", k.to_ascii_uppercase())
            })
            .map_err(|e| match e {
                ConfigError::UnknownKey {
                    origin, suggestion, ..
                } => ConfigError::UnknownKey {
                    key: name.to_owned(),
                    origin,
                    suggestion,
                },
                other => other,
            })?;
            let raw = raw.to_str().ok_or_else(|| ConfigError::NotUnicode {
                name: name.to_owned(),
            })?;
            merged.insert(Value::String(key.clone()), raw_value(&defaults, &key, raw));
            origins.insert(key, origin);
        }

        for (key, raw) in &self.overrides {
            let key = key.replace('-', "_");
            let origin = Origin::Override(key.clone());
            check_known(&defaults, &key, &origin, |k| k.to_owned())?;
            merged.insert(Value::String(key.clone()), raw_value(&defaults, &key, raw));
            origins.insert(key, origin);
        }

        let merged = Value::Mapping(merged);
        serde_path_to_error::deserialize::<_, NodeConfig>(&merged).map_err(|e| {
            let field = e.path().to_string();
            let top = field
                .split(['.', '['])
                .next()
                .unwrap_or_default()
                .to_owned();
            let value = (field == top).then(|| merged.get(top.as_str())).flatten();
            ConfigError::InvalidValue {
                origin: origins.get(&top).cloned().unwrap_or(Origin::Default),
                message: plain_message(
                    &e.into_inner().to_string(),
                    value,
                    defaults.get(top.as_str()),
                ),
                field,
            }
        })
    }
}

pub(crate) fn default_mapping() -> Result<Mapping, ConfigError> {
    match serde_yaml_ng::to_value(NodeConfig::default()) {
        Ok(Value::Mapping(m)) => Ok(m),
        Ok(_) => Err(ConfigError::Serialize(
            "defaults are not a mapping".to_owned(),
        )),
        Err(e) => Err(ConfigError::Serialize(e.to_string())),
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

fn parse_file(origin: &Origin, text: &str) -> Result<Vec<(String, Value)>, ConfigError> {
    let value: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Yaml {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    let mapping = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Mapping(m) => m,
        other => {
            return Err(ConfigError::NotAMapping {
                origin: origin.clone(),
                found: kind(&other),
            });
        }
    };
    mapping
        .into_iter()
        .map(|(k, v)| match k {
            Value::String(s) => Ok((s, v)),
            other => Err(ConfigError::UnknownKey {
                key: format!("{other:?}"),
                origin: origin.clone(),
                suggestion: None,
            }),
        })
        .collect()
}

/// Serde's wording in the words of the config file: "a list", not "a
/// sequence"; "a whole number", not "u32"; an address that does not parse
/// is shown with the field's default as an example of one that does.
fn plain_message(message: &str, value: Option<&Value>, default: Option<&Value>) -> String {
    if message.contains("invalid socket address syntax") {
        let shown = match value {
            Some(Value::String(s)) => format!("{s:?}"),
            _ => "the value".to_owned(),
        };
        let example = match default {
            Some(Value::String(s)) => s.clone(),
            _ => "127.0.0.1:11437".to_owned(),
        };
        return format!("{shown} is not an IP address and port (write e.g. {example})");
    }
    let parts = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "));
    let Some((found, expected)) = parts else {
        return message.replace("a sequence", "a list");
    };
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        other => other,
    };
    let found = match found {
        "sequence" => "a list".to_owned(),
        "map" => "a mapping".to_owned(),
        "unit value" => "nothing".to_owned(),
        other => other.replace('`', ""),
    };
    format!("expected {expected}, found {found}")
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn check_known(
    defaults: &Mapping,
    key: &str,
    origin: &Origin,
    spell: impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if defaults.contains_key(key) {
        return Ok(());
    }
    Err(ConfigError::UnknownKey {
        key: key.to_owned(),
        origin: origin.clone(),
        suggestion: closest_key(defaults, key).map(|k| spell(&k)),
    })
}

/// The known key closest to `key`, if it is close enough to be a typo.
fn closest_key(defaults: &Mapping, key: &str) -> Option<String> {
    let key = key.to_ascii_lowercase();
    defaults
        .keys()
        .filter_map(Value::as_str)
        .map(|known| (strsim::damerau_levenshtein(&key, known), known))
        .filter(|(distance, known)| *distance <= (known.len() / 3).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known.to_owned())
}

/// Turn text from the environment or the command line into a YAML value:
/// list fields are comma-separated, empty text unsets, canonical booleans
/// and numbers are typed, and everything else is a string.
fn raw_value(defaults: &Mapping, key: &str, raw: &str) -> Value {
    // Structured fields take YAML flow syntax: `{latency: 1}` for a mapping,
    // `[{name: a, type: llm}]` for a list of mappings.
    let structured = match defaults.get(key) {
        Some(Value::Mapping(_)) => true,
        Some(Value::Sequence(_)) => raw.trim_start().starts_with('['),
        _ => false,
    };
    if structured && let Ok(value) = serde_yaml_ng::from_str::<Value>(raw) {
        return value;
    }
    if matches!(defaults.get(key), Some(Value::Sequence(_))) {
        return Value::Sequence(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        );
    }
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Value::Null;
    }
    // Keep a boolean or number only when the text is exactly its canonical
    // spelling: `007`, `~`, `#x` or `null` stay the strings they were written as.
    match serde_yaml_ng::from_str::<Value>(trimmed) {
        Ok(Value::Bool(b)) if b.to_string() == trimmed => Value::Bool(b),
        Ok(Value::Number(n)) if n.to_string() == trimmed => Value::Number(n),
        _ => Value::String(trimmed.to_owned()),
    }
}
