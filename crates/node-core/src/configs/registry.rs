//! `NodeConfig` onto the registry's parts: record limits, score weights,
//! gossipsub.

use libp2p::gossipsub;
use libp2p::identity::Keypair;
use ollamacron_config::{MAX_RECORD_TTL, MIN_RECORD_TTL, NodeConfig};
use ollamacron_service_registry::{RecordLimits, ScoreWeights};

/// Room for gossipsub framing around the largest record.
const GOSSIP_OVERHEAD_BYTES: usize = 4 * 1024;

/// The limits every record we sign or accept must keep.
pub(crate) fn record_limits(config: &NodeConfig) -> RecordLimits {
    RecordLimits {
        max_record_bytes: usize::try_from(config.max_record_size.bytes()).unwrap_or(usize::MAX),
        max_services: config.max_services_per_record,
        max_string_bytes: config.max_string_length,
        max_list_items: config.max_list_items,
        min_ttl: MIN_RECORD_TTL,
        max_ttl: MAX_RECORD_TTL,
    }
}

/// The weights of the quality score.
pub(crate) fn score_weights(config: &NodeConfig) -> ScoreWeights {
    let w = config.score_weights;
    ScoreWeights {
        reliability: w.reliability,
        latency: w.latency,
        throughput: w.throughput,
        availability: w.availability,
    }
}

/// Gossipsub for node records: every message is signed by its author and
/// held back until the registry has verified the record in it.
pub(crate) fn gossip(
    key: &Keypair,
    config: &NodeConfig,
    topic: &str,
) -> Result<gossipsub::Behaviour, String> {
    let max_record = usize::try_from(config.max_record_size.bytes()).unwrap_or(usize::MAX);
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(max_record.saturating_add(GOSSIP_OVERHEAD_BYTES))
        .build()
        .map_err(|e| e.to_string())?;
    let mut behaviour = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )
    .map_err(str::to_owned)?;
    behaviour
        .subscribe(&gossipsub::IdentTopic::new(topic))
        .map_err(|e| e.to_string())?;
    Ok(behaviour)
}
