//! The network key parser: any text is a key or a reason; a key parsed
//! prints back to text that parses to the same key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ollamacron_config::parse_network_key;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(key) = parse_network_key(&text) {
        let again = parse_network_key(&key.to_string());
        assert_eq!(
            again.map(|k| k.fingerprint().to_string()),
            Ok(key.fingerprint().to_string()),
            "a parsed key does not round-trip"
        );
    }
});
