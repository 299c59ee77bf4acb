//! Ollamacron's DHT wire contract: its Kademlia protocol, the namespace,
//! and the keys of service types, capabilities and node records.

use libp2p::{PeerId, StreamProtocol};
use ollamacron_discovery_dht::{RecordKey, provider_key};

/// The Kademlia protocol of the private Ollamacron DHT (never the IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/ollamacron/kad/1.0.0");

/// The namespace every Ollamacron node provides.
pub const NAMESPACE: &str = "/ollamacron";

/// The provider key of the namespace, [`NAMESPACE`].
#[must_use]
pub fn namespace_key() -> RecordKey {
    provider_key(NAMESPACE)
}

/// The provider key of a service type: `/ollamacron/services/<type>`.
#[must_use]
pub fn service_type_key(service_type: &str) -> RecordKey {
    provider_key(&format!("{NAMESPACE}/services/{service_type}"))
}

/// The provider key of a capability: `/ollamacron/capabilities/<capability>`.
#[must_use]
pub fn capability_key(capability: &str) -> RecordKey {
    provider_key(&format!("{NAMESPACE}/capabilities/{capability}"))
}

/// The provider key of a model: `/ollamacron/models/<name with tag>`
/// (`llama3` and `llama3:latest` are one key). Every node that serves the
/// model provides it, so "who serves llama3:8b" is one exact query.
#[must_use]
pub fn model_key(model: &str) -> RecordKey {
    provider_key(&format!(
        "{NAMESPACE}/models/{}",
        ollamacron_service_registry::model_with_tag(model)
    ))
}

/// Service types that are models: their names get a [`model_key`].
pub const MODEL_SERVICE_TYPES: [&str; 2] = ["llm", "embedding"];

/// Whether `service` is a model, provided under its [`model_key`]: a
/// service of a [`MODEL_SERVICE_TYPES`] type, or one that speaks the
/// `ollama` protocol, with a name.
#[must_use]
pub fn is_model(service: &ollamacron_service_registry::ServiceInfo) -> bool {
    !service.name.is_empty()
        && (MODEL_SERVICE_TYPES.contains(&service.service_type.as_str())
            || service.protocols.iter().any(|p| p == "ollama"))
}

/// The key of a node's record: the UTF-8 bytes of `/ollamacron/node/<base58 peer id>`.
#[must_use]
pub fn node_record_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{NAMESPACE}/node/{peer}"))
}

/// The peer whose record `key` names, if `key` is a node record key
/// (`/ollamacron/node/<base58 peer id>`, exactly).
#[must_use]
pub fn node_record_peer(key: &RecordKey) -> Option<PeerId> {
    let text = std::str::from_utf8(key.as_ref()).ok()?;
    let peer: PeerId = text.strip_prefix(NODE_RECORD_PREFIX)?.parse().ok()?;
    // Exactly the canonical form, so one peer has one key.
    (node_record_key(&peer) == *key).then_some(peer)
}

const NODE_RECORD_PREFIX: &str = "/ollamacron/node/";

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn namespace_key_is_the_sha256_multihash_of_the_string() {
        // sha256("/ollamacron"), computed independently with `printf %s /ollamacron | sha256sum`.
        let key = namespace_key();
        assert_eq!(key.as_ref().len(), 34);
        assert_eq!(&key.as_ref()[..2], &[0x12, 0x20]);
        assert_eq!(hex(&key.as_ref()[2..]), NAMESPACE_SHA256_HEX);
        // It parses as a multihash, as a CID's would.
        let mh = libp2p::multihash::Multihash::<64>::from_bytes(key.as_ref()).unwrap();
        assert_eq!(mh.code(), 0x12);
    }

    /// Filled in from `sha256sum`, see the test above.
    const NAMESPACE_SHA256_HEX: &str =
        "8d36a9d81f16978a23c3e43e62d2a15f35d148a29b100fc7c67108479925d9be";

    #[test]
    fn other_keys_follow_the_contract() {
        assert_eq!(
            service_type_key("llm"),
            provider_key("/ollamacron/services/llm")
        );
        assert_eq!(
            capability_key("vision"),
            provider_key("/ollamacron/capabilities/vision")
        );
        assert_ne!(service_type_key("llm"), service_type_key("embedding"));
        assert_eq!(
            model_key("llama3:8b"),
            provider_key("/ollamacron/models/llama3:8b")
        );
        assert_eq!(model_key("llama3"), model_key("llama3:latest"));
        assert_ne!(model_key("llama3"), model_key("llama3:8b"));
        let peer = PeerId::random();
        assert_eq!(
            node_record_key(&peer).as_ref(),
            format!("/ollamacron/node/{peer}").as_bytes()
        );
        assert_eq!(node_record_peer(&node_record_key(&peer)), Some(peer));
        for bad in [
            "/ollamacron/node/".to_owned(),
            format!("/ollamacron/node/{peer}/x"),
            format!("/ollamacron/nodes/{peer}"),
            "/ollamacron/node/not-a-peer".to_owned(),
        ] {
            assert_eq!(node_record_peer(&RecordKey::new(&bad)), None, "{bad}");
        }
        assert_eq!(node_record_peer(&RecordKey::new(&[0xff, 0xfe])), None);
    }
}
