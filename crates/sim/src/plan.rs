//! What the simulation runs: every node's key, configuration and
//! services, all drawn from the seed.

use std::time::Duration;

use ollamacron_node_core::config::{NodeConfig, Reachability};
use ollamacron_node_core::libp2p::PeerId;
use ollamacron_node_core::libp2p::identity::Keypair;
use ollamacron_node_core::libp2p::multiaddr::Protocol;
use ollamacron_node_core::registry::ServiceInfo;
use ollamacron_sim::SimNetwork;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Models held by many nodes: each node holds its own model and up to two
/// of these.
const POPULAR_MODELS: usize = 8;
/// The type every simulated service has.
pub(crate) const SERVICE_TYPE: &str = "llm";
/// Record lifetime and refresh of a churn run: short, so that crashed
/// nodes' records lapse within the run (the defaults are 5 min and 2 min;
/// the same 5:2 ratio).
pub(crate) const CHURN_RECORD_TTL: Duration = Duration::from_secs(60);
pub(crate) const CHURN_RECORD_REFRESH: Duration = Duration::from_secs(24);

/// One node of the plan.
pub(crate) struct PlannedNode {
    pub(crate) key: Keypair,
    pub(crate) peer: PeerId,
    pub(crate) config: NodeConfig,
    pub(crate) services: Vec<ServiceInfo>,
}

/// A model service as the simulated nodes offer it.
pub(crate) fn model_service(name: &str) -> ServiceInfo {
    ServiceInfo {
        id: name.to_owned(),
        name: name.to_owned(),
        service_type: SERVICE_TYPE.to_owned(),
        capabilities: vec!["completion".to_owned()],
        protocols: vec!["ollama".to_owned()],
        ..ServiceInfo::default()
    }
}

/// The model only node `i` holds.
pub(crate) fn own_model(i: usize) -> String {
    format!("model-{i}:latest")
}

/// Node `i` of `net`: `base` (the defaults and `--set`) with mDNS off, its
/// memory address, 1–3 earlier nodes to bootstrap from, reachability
/// forced public (no NAT in the simulation), and (for a churn run) the
/// short record lifetime. It holds `model-<i>:latest`, which no other node
/// does, and 0–2 of the popular models `model-<N>:latest` ….
pub(crate) fn plan(
    net: &SimNetwork,
    base: &NodeConfig,
    seed: u64,
    churn: bool,
) -> Vec<PlannedNode> {
    let n = net.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes: Vec<PlannedNode> = Vec::with_capacity(n);
    for i in 0..n {
        let mut secret = [0u8; 32];
        rng.fill(&mut secret);
        let key =
            Keypair::ed25519_from_bytes(secret).unwrap_or_else(|_| Keypair::generate_ed25519());
        let peer = key.public().to_peer_id();
        let bootstrap = if i == 0 {
            Vec::new()
        } else {
            let count = rng.gen_range(1..=3).min(i);
            rand::seq::index::sample(&mut rng, i, count)
                .into_iter()
                .map(|m| net.address(m).with(Protocol::P2p(nodes[m].peer)))
                .collect()
        };
        let mut config = NodeConfig {
            enable_mdns: false,
            listen: vec![net.address(i)],
            bootstrap,
            force_reachability: Some(Reachability::Public),
            ..base.clone()
        };
        if churn {
            config.record_ttl = CHURN_RECORD_TTL;
            config.record_refresh_interval = CHURN_RECORD_REFRESH;
        }
        let mut services = vec![model_service(&own_model(i))];
        let mut popular: Vec<usize> = (0..POPULAR_MODELS).collect();
        popular.shuffle(&mut rng);
        let extra = rng.gen_range(0..=2);
        for p in popular.into_iter().take(extra) {
            services.push(model_service(&format!("model-{}:latest", n + p)));
        }
        nodes.push(PlannedNode {
            key,
            peer,
            config,
            services,
        });
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use ollamacron_sim::SimConfig;

    #[test]
    fn the_plan_is_reproducible_and_follows_the_rules() {
        let net = SimNetwork::new(SimConfig::new(
            120,
            Duration::from_millis(20)..=Duration::from_millis(80),
        ));
        let a = plan(&net, &NodeConfig::default(), 7, false);
        let b = plan(&net, &NodeConfig::default(), 7, false);
        assert_eq!(a.len(), 120);
        let mut holders = std::collections::HashMap::<String, usize>::new();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.peer, y.peer);
            assert_eq!(x.config.bootstrap, y.config.bootstrap);
            assert!((1..=3).contains(&x.services.len()));
            assert!(x.config.bootstrap.len() <= 3);
            assert_eq!(x.config.bootstrap.is_empty(), i == 0);
            assert!(
                x.config.validate().is_err(),
                "memory addresses: node-core's to accept"
            );
            for s in &x.services {
                *holders.entry(s.name.clone()).or_default() += 1;
            }
        }
        let single = holders.values().filter(|&&c| c == 1).count();
        assert!(single >= 120, "{single}");
        assert!(holders.values().any(|&c| c > 5), "some models are popular");
    }
}
