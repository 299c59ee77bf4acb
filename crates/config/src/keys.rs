//! The keys a gateway or API takes: listed in the config, and read from a
//! key file (one per line, `#` comments).

use std::path::Path;

use crate::validate::check_key;
use crate::{NodeConfig, ValidationError};

/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

impl NodeConfig {
    /// The gateway's keys: `gateway_api_keys` and the lines of
    /// `gateway_api_key_file`.
    ///
    /// # Errors
    /// The key file cannot be read, or one of its lines is not a key.
    pub fn gateway_access_keys(&self) -> Result<Vec<String>, ValidationError> {
        access_keys(
            &self.gateway_api_keys,
            self.gateway_api_key_file.as_deref(),
            "gateway_api_key_file",
        )
    }

    /// The API's keys: `api_keys` and the lines of `api_key_file`.
    ///
    /// # Errors
    /// The key file cannot be read, or one of its lines is not a key.
    pub fn api_access_keys(&self) -> Result<Vec<String>, ValidationError> {
        access_keys(&self.api_keys, self.api_key_file.as_deref(), "api_key_file")
    }
}

fn access_keys(
    listed: &[String],
    file: Option<&Path>,
    field: &str,
) -> Result<Vec<String>, ValidationError> {
    let mut keys = listed.to_vec();
    let Some(file) = file else {
        return Ok(keys);
    };
    let fail = |rule: String| ValidationError {
        field: field.to_owned(),
        value: file.display().to_string(),
        rule,
    };
    let size = std::fs::metadata(file)
        .map_err(|e| fail(format!("cannot be read: {e}")))?
        .len();
    if size > MAX_KEY_FILE_BYTES {
        return Err(fail(format!(
            "is {size} bytes, over the {MAX_KEY_FILE_BYTES}-byte limit of a key file"
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| fail(format!("cannot be read: {e}")))?;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // One key, then optionally whitespace and a `#` comment: a `#`
        // inside a key is part of it.
        let (key, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim_start();
        if !rest.is_empty() && !rest.starts_with('#') {
            return Err(fail(format!(
                "line {}: holds more than one word; write one key per line (a comment after it starts with #)",
                number + 1
            )));
        }
        check_key(key).map_err(|rule| fail(format!("line {}: the key {rule}", number + 1)))?;
        keys.push(key.to_owned());
    }
    if keys.is_empty() {
        return Err(fail(
            "holds no key (an empty key file would leave the server open)".to_owned(),
        ));
    }
    Ok(keys)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_files_add_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            "# team keys\nfirst-key\n\n  second-key  # laptop\nthird#key-with-a-hash\n",
        )
        .unwrap();
        let config = NodeConfig {
            gateway_api_keys: vec!["listed-key".into()],
            gateway_api_key_file: Some(path.clone()),
            ..NodeConfig::default()
        };
        assert_eq!(
            config.gateway_access_keys().unwrap(),
            [
                "listed-key",
                "first-key",
                "second-key",
                "third#key-with-a-hash"
            ]
        );
        assert!(config.api_access_keys().unwrap().is_empty());

        std::fs::write(&path, "good-key\nbad-key second-word\n").unwrap();
        let e = config.gateway_access_keys().unwrap_err();
        assert_eq!(e.field, "gateway_api_key_file");
        assert!(e.rule.contains("line 2"), "{e}");
        std::fs::write(&path, "short\n").unwrap();
        let e = config.gateway_access_keys().unwrap_err();
        assert!(e.rule.contains("8 to 512"), "{e}");

        std::fs::write(&path, "# nothing\n").unwrap();
        let only_comments = NodeConfig {
            api_key_file: Some(path),
            ..NodeConfig::default()
        };
        assert!(
            only_comments
                .api_access_keys()
                .unwrap_err()
                .rule
                .contains("no key")
        );

        let missing = NodeConfig {
            api_key_file: Some(dir.path().join("absent")),
            ..NodeConfig::default()
        };
        assert!(
            missing
                .api_access_keys()
                .unwrap_err()
                .rule
                .contains("cannot be read")
        );
    }
}
