//! Filtering, scoring and ranking the services that answer a query.

use ollamacron_scoring::{QualityInputs, ScoreBreakdown, ScoreWeights, rank_by, score};
use serde::Serialize;

use crate::service::{ServiceInfo, ServiceQuery, ServiceStatus};

/// A service that might answer a query, with what the observer knows of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The service.
    pub service: ServiceInfo,
    /// Region of its node.
    pub region: Option<String>,
    /// Measured and advertised quality.
    pub inputs: QualityInputs,
    /// Whether this node serves it.
    pub local: bool,
}

/// One answer to a query: the service, its score and the score's parts.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RankedService {
    /// The service.
    pub service: ServiceInfo,
    /// Region of its node.
    pub region: Option<String>,
    /// The score, with each component.
    pub score: ScoreBreakdown,
    /// Whether this node serves it.
    pub local: bool,
}

/// The candidates that match `query` — type, tags, capabilities, region,
/// and reliability and latency bounds on the measured values (advertised
/// ones only when unmeasured; an RTT measured through a relay is never
/// held against `max_latency_ms`) — and are taking requests (available or
/// busy), best first, cut to `query.limit`. Equal scores order by peer id,
/// then service id.
#[must_use]
pub fn rank_services(
    candidates: Vec<Candidate>,
    query: &ServiceQuery,
    weights: &ScoreWeights,
) -> Vec<RankedService> {
    let matching: Vec<(Candidate, ScoreBreakdown)> = candidates
        .into_iter()
        .filter(|c| {
            matches!(
                c.service.status,
                ServiceStatus::Available | ServiceStatus::Busy
            )
        })
        .filter(|c| query.matches(&c.service, c.region.as_deref()))
        .filter(|c| {
            let reliability = c
                .inputs
                .measured_reliability
                .or(c.inputs.advertised_reliability);
            // A relay path's RTT is not the peer's: it lowers the score
            // but never filters the peer out.
            let latency_ms = c
                .inputs
                .measured_rtt
                .map(|rtt| rtt.as_secs_f64() * 1000.0)
                .or(c.inputs.advertised_latency_ms);
            query.accepts_reliability(reliability)
                && (c.inputs.rtt_via_relay || query.accepts_latency(latency_ms))
        })
        .map(|c| {
            let s = score(&c.inputs, weights);
            (c, s)
        })
        .collect();
    let limit = query.limit.unwrap_or(usize::MAX);
    rank_by(
        matching,
        |(_, s)| s.total,
        |(a, _), (b, _)| {
            a.service
                .peer_id
                .cmp(&b.service.peer_id)
                .then_with(|| a.service.id.cmp(&b.service.id))
        },
        limit,
    )
    .into_iter()
    .map(|((c, s), _)| RankedService {
        service: c.service,
        region: c.region,
        score: s,
        local: c.local,
    })
    .collect()
}
