//! Provider keys.

use libp2p::kad::RecordKey;
use sha2::{Digest, Sha256};

/// multihash code of sha2-256.
const SHA2_256_CODE: u8 = 0x12;
/// Length of a sha2-256 digest, as the multihash length byte.
const SHA2_256_LEN: u8 = 32;

/// The provider key of `name`: the sha2-256 multihash (`0x12 0x20` +
/// digest) of its UTF-8 bytes, so any libp2p implementation can look it up
/// as the raw-codec CIDv1 of that multihash.
#[must_use]
pub fn provider_key(name: &str) -> RecordKey {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = Vec::with_capacity(2 + digest.len());
    bytes.push(SHA2_256_CODE);
    bytes.push(SHA2_256_LEN);
    bytes.extend_from_slice(&digest);
    RecordKey::new(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn provider_key_is_the_sha256_multihash_of_the_string() {
        // sha256("/ollamacron"), computed independently with `printf %s /ollamacron | sha256sum`.
        let key = provider_key("/ollamacron");
        assert_eq!(key.as_ref().len(), 34);
        assert_eq!(&key.as_ref()[..2], &[0x12, 0x20]);
        assert_eq!(hex(&key.as_ref()[2..]), OLLAMACRON_SHA256_HEX);
        // It parses as a multihash, as a CID's would.
        let mh = libp2p::multihash::Multihash::<64>::from_bytes(key.as_ref()).unwrap();
        assert_eq!(mh.code(), 0x12);
        assert_eq!(mh.digest().len(), 32);
    }

    /// Filled in from `sha256sum`, see the test above.
    const OLLAMACRON_SHA256_HEX: &str =
        "8d36a9d81f16978a23c3e43e62d2a15f35d148a29b100fc7c67108479925d9be";

    #[test]
    fn different_names_have_different_keys() {
        assert_ne!(provider_key("/my-app"), provider_key("/my-app/"));
        assert_ne!(provider_key(""), provider_key("/my-app"));
        assert_eq!(provider_key("/my-app"), provider_key("/my-app"));
    }
}
