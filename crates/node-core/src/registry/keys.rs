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

/// The key of page `page` of a node's record: page 0 is the node record
/// key itself (so a reader of one-page records finds it), page `n` >= 1
/// is `/ollamacron/node/<base58 peer id>/<n>`.
#[must_use]
pub fn node_record_page_key(peer: &PeerId, page: u16) -> RecordKey {
    if page == 0 {
        node_record_key(peer)
    } else {
        RecordKey::new(&format!("{NAMESPACE}/node/{peer}/{page}"))
    }
}

/// The peer and page whose record `key` names, if `key` is a node record
/// key or a page key of one, exactly in the canonical form (pages below
/// [`MAX_RECORD_PAGES`](ollamacron_service_registry::MAX_RECORD_PAGES)).
#[must_use]
pub fn node_record_page(key: &RecordKey) -> Option<(PeerId, u16)> {
    let text = std::str::from_utf8(key.as_ref()).ok()?;
    let rest = text.strip_prefix(NODE_RECORD_PREFIX)?;
    let (peer, page) = match rest.split_once('/') {
        Some((peer, page)) => (peer, page.parse::<u16>().ok()?),
        None => (rest, 0),
    };
    let peer: PeerId = peer.parse().ok()?;
    if page >= ollamacron_service_registry::MAX_RECORD_PAGES {
        return None;
    }
    // Exactly the canonical form, so one page has one key.
    (node_record_page_key(&peer, page) == *key).then_some((peer, page))
}

/// The peer whose record `key` names, if `key` is the key of page 0 of a
/// node record (`/ollamacron/node/<base58 peer id>`, exactly).
#[must_use]
pub fn node_record_peer(key: &RecordKey) -> Option<PeerId> {
    match node_record_page(key)? {
        (peer, 0) => Some(peer),
        _ => None,
    }
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
    fn the_config_and_the_record_format_agree_on_pages() {
        assert_eq!(
            ollamacron_config::MAX_RECORD_PAGES,
            usize::from(ollamacron_service_registry::MAX_RECORD_PAGES)
        );
    }

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
        assert_eq!(
            node_record_page_key(&peer, 3).as_ref(),
            format!("/ollamacron/node/{peer}/3").as_bytes()
        );
        assert_eq!(
            node_record_page(&node_record_page_key(&peer, 3)),
            Some((peer, 3))
        );
        assert_eq!(node_record_page(&node_record_key(&peer)), Some((peer, 0)));
        for bad in [
            format!("/ollamacron/node/{peer}/0"),
            format!("/ollamacron/node/{peer}/03"),
            format!("/ollamacron/node/{peer}/16"),
            format!("/ollamacron/node/{peer}/-1"),
            format!("/ollamacron/node/{peer}/1/2"),
        ] {
            assert_eq!(node_record_page(&RecordKey::new(&bad)), None, "{bad}");
        }
    }
}
