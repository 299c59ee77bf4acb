//! The models of the mesh, each with the nodes that serve it: what the
//! API's `GET /v1/models`, the dashboard and `ollamacron-node models`
//! show, as `ollama ps` would for the whole pool.

use std::collections::BTreeMap;

use ollamacron_service_registry::metadata::{
    METADATA_IN_FLIGHT, METADATA_LOADED, METADATA_MAX_CONCURRENT, METADATA_SIZE_BYTES,
};
use ollamacron_service_registry::{RankedService, ServiceStatus, model_with_tag};
use serde::{Deserialize, Serialize};

use crate::status::{BreakerState, ConnectionKind, PeerInfo};

/// The service types that are models.
pub const MODEL_SERVICE_TYPES: [&str; 2] = ["llm", "embedding"];

/// One model of the mesh (`name:tag`) and every node that serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshModel {
    /// The model, with its tag (`llama3:latest`).
    pub name: String,
    /// Its service type: `llm` or `embedding`.
    #[serde(rename = "type")]
    pub service_type: String,
    /// How many of its nodes have it loaded in memory.
    pub loaded_on: usize,
    /// Requests its nodes have in flight for peers, all together, as they
    /// last advertised.
    pub in_flight: u64,
    /// The nodes serving it: loaded first, then best ranked.
    pub nodes: Vec<ModelNode>,
}

/// One node serving a [`MeshModel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelNode {
    /// Base58 peer id of the serving node.
    pub peer_id: String,
    /// Whether it is this node.
    pub local: bool,
    /// The service's id on its node (`ollama/llama3:latest`).
    pub service_id: String,
    /// Whether it takes requests (`available` or `busy`).
    pub status: ServiceStatus,
    /// Whether the model is loaded in that node's memory (warm); `None`
    /// when the node does not say.
    pub loaded: Option<bool>,
    /// Requests it has in flight for peers, as it last advertised.
    pub in_flight: Option<u64>,
    /// Requests it serves for peers at once, all together.
    pub max_concurrent: Option<u64>,
    /// The model's size on disk, in bytes.
    pub size_bytes: Option<u64>,
    /// The model's digest (its service version).
    pub digest: String,
    /// The node's region, when it has one.
    pub region: Option<String>,
    /// How we are connected to it; `None` for this node.
    pub connection: Option<ConnectionKind>,
    /// Latest ping round-trip time, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Where this node's gateway breaker for it stands.
    pub breaker: BreakerState,
    /// Its ranking score, in [0, 1].
    pub score: f64,
}

/// `services` (of any type; only [`MODEL_SERVICE_TYPES`] are kept)
/// grouped into models by name, with each serving node's connection from
/// `peers`; models sorted by name.
#[must_use]
pub fn mesh_models(services: Vec<RankedService>, peers: &[PeerInfo]) -> Vec<MeshModel> {
    let peers: BTreeMap<String, &PeerInfo> =
        peers.iter().map(|p| (p.peer_id.to_string(), p)).collect();
    let mut models: BTreeMap<String, MeshModel> = BTreeMap::new();
    for ranked in services {
        let service = ranked.service;
        if !MODEL_SERVICE_TYPES.contains(&service.service_type.as_str()) {
            continue;
        }
        let name = model_with_tag(&service.name).into_owned();
        let number = |key: &str| {
            service
                .metadata
                .get(key)
                .and_then(|v| v.parse::<u64>().ok())
        };
        let peer = peers.get(&service.peer_id);
        let node = ModelNode {
            local: ranked.local,
            service_id: service.id.clone(),
            status: service.status,
            loaded: service
                .metadata
                .get(METADATA_LOADED)
                .and_then(|v| v.parse::<bool>().ok()),
            in_flight: number(METADATA_IN_FLIGHT),
            max_concurrent: number(METADATA_MAX_CONCURRENT),
            size_bytes: number(METADATA_SIZE_BYTES),
            digest: service.version.clone(),
            region: ranked.region,
            connection: if ranked.local {
                None
            } else {
                Some(peer.map_or(ConnectionKind::None, |p| p.connection))
            },
            latency_ms: peer.and_then(|p| p.latency_ms),
            breaker: peer.map_or(BreakerState::Closed, |p| p.breaker),
            score: ranked.score.total,
            peer_id: service.peer_id,
        };
        let model = models.entry(name.clone()).or_insert_with(|| MeshModel {
            name,
            service_type: service.service_type,
            loaded_on: 0,
            in_flight: 0,
            nodes: Vec::new(),
        });
        // One node serves a model once, even when two of its services
        // name it (the best ranked is kept: they come best first).
        if model.nodes.iter().any(|n| n.peer_id == node.peer_id) {
            continue;
        }
        model.loaded_on += usize::from(node.loaded == Some(true));
        model.in_flight = model.in_flight.saturating_add(node.in_flight.unwrap_or(0));
        model.nodes.push(node);
    }
    let mut models: Vec<MeshModel> = models.into_values().collect();
    for model in &mut models {
        // Stable: among equally warm nodes the ranking's order stays.
        model.nodes.sort_by_key(|n| n.loaded != Some(true));
    }
    models
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;
    use ollamacron_service_registry::{ScoreBreakdown, ServiceInfo};

    fn ranked(peer: &PeerId, name: &str, kind: &str, loaded: &str, local: bool) -> RankedService {
        let mut service = ServiceInfo {
            id: format!("ollama/{name}"),
            name: name.to_owned(),
            service_type: kind.to_owned(),
            peer_id: peer.to_string(),
            ..ServiceInfo::default()
        };
        service
            .metadata
            .insert(METADATA_LOADED.to_owned(), loaded.to_owned());
        service
            .metadata
            .insert(METADATA_IN_FLIGHT.to_owned(), "2".to_owned());
        RankedService {
            service,
            region: None,
            score: ScoreBreakdown {
                reliability: 1.0,
                latency: 1.0,
                throughput: 1.0,
                availability: 1.0,
                total: 1.0,
            },
            local,
        }
    }

    fn peer(id: PeerId, connection: ConnectionKind) -> PeerInfo {
        PeerInfo {
            peer_id: id,
            sources: Vec::new(),
            addresses: Vec::new(),
            connected: connection != ConnectionKind::None,
            connection,
            latency_ms: Some(1.5),
            last_seen_ms: 0,
            agent_version: None,
            failures: 0,
            breaker: BreakerState::Open,
        }
    }

    #[test]
    fn services_group_into_models_with_their_nodes() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let services = vec![
            ranked(&a, "llama3", "llm", "false", true),
            ranked(&b, "llama3:latest", "llm", "true", false),
            ranked(&b, "llama3:latest", "llm", "true", false),
            ranked(&c, "nomic-embed-text", "embedding", "true", false),
            ranked(&c, "a-translator", "translation", "true", false),
        ];
        let peers = [
            peer(b, ConnectionKind::Relayed),
            peer(c, ConnectionKind::Direct),
        ];
        let models = mesh_models(services, &peers);
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["llama3:latest", "nomic-embed-text:latest"]);
        let llama = &models[0];
        assert_eq!(llama.loaded_on, 1);
        assert_eq!(llama.in_flight, 4, "two nodes with 2 each, b once");
        // The warm node first, though the cold one ranked first.
        assert_eq!(llama.nodes[0].peer_id, b.to_string());
        assert_eq!(llama.nodes[0].connection, Some(ConnectionKind::Relayed));
        assert_eq!(llama.nodes[0].breaker, BreakerState::Open);
        assert_eq!(llama.nodes[1].peer_id, a.to_string());
        assert_eq!(llama.nodes[1].connection, None, "this node");
        assert_eq!(llama.nodes[1].loaded, Some(false));
        assert_eq!(models[1].service_type, "embedding");
        assert_eq!(models[1].nodes[0].latency_ms, Some(1.5));
    }
}
