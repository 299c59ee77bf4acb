//! The configuration loader: YAML, environment and `--set` overrides made
//! of the bytes (split at NUL bytes) load to a config or to errors that
//! name what is wrong; never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ollamacron_config::ConfigLoader;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let yaml = parts.next().unwrap_or_default();
    let env: Vec<(String, String)> = parts
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("OLLAMACRON_{k}"), v.to_owned()))
        .collect();
    let mut loader = ConfigLoader::new().yaml_str("fuzz.yaml", yaml).env(env);
    for line in parts.next().unwrap_or_default().lines() {
        if let Some((k, v)) = line.split_once('=') {
            loader = loader.set(k, v);
        }
    }
    if let Ok(config) = loader.load() {
        // A valid config validates again.
        assert!(
            config.validate().is_ok(),
            "a loaded config fails validation"
        );
    }
    let _ = loader.load_unvalidated();
});
