//! An independent libp2p peer, built with nothing of ours: TCP + Noise +
//! Yamux, identify and ping. It proves a node speaks plain libp2p.

use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, SwarmBuilder, identify, noise, ping, tcp, yamux};

/// What the probe learned of the remote node.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The remote's peer id.
    pub peer_id: PeerId,
    /// Its identify protocol version.
    pub protocol_version: String,
    /// Its identify agent version.
    pub agent_version: String,
    /// The protocols it announced.
    pub protocols: Vec<StreamProtocol>,
    /// One ping round trip.
    pub rtt: Duration,
}

#[derive(NetworkBehaviour)]
struct ProbeBehaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Dial `addr` over TCP, wait for identify and one ping, within `timeout`.
///
/// # Errors
/// A description of what failed or what did not arrive in time.
pub async fn probe(addr: Multiaddr, timeout: Duration) -> Result<ProbeReport, String> {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| format!("cannot build the probe transport: {e}"))?
        .with_behaviour(|key| ProbeBehaviour {
            identify: identify::Behaviour::new(identify::Config::new(
                "/probe/1.0.0".to_owned(),
                key.public(),
            )),
            ping: ping::Behaviour::new(
                ping::Config::new().with_interval(Duration::from_millis(200)),
            ),
        })
        .map_err(|e| format!("cannot build the probe behaviour: {e}"))?
        .build();
    swarm
        .dial(addr.clone())
        .map_err(|e| format!("cannot dial {addr}: {e}"))?;

    let run = async {
        let mut identified: Option<(PeerId, identify::Info)> = None;
        let mut rtt: Option<Duration> = None;
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(ProbeBehaviourEvent::Identify(
                    identify::Event::Received { peer_id, info, .. },
                )) => identified = Some((peer_id, info)),
                SwarmEvent::Behaviour(ProbeBehaviourEvent::Ping(ping::Event {
                    result: Ok(d),
                    ..
                })) => rtt = Some(d),
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    return Err(format!("cannot connect to {addr}: {error}"));
                }
                _ => {}
            }
            if let (Some((peer_id, info)), Some(rtt)) = (&identified, rtt) {
                return Ok(ProbeReport {
                    peer_id: *peer_id,
                    protocol_version: info.protocol_version.clone(),
                    agent_version: info.agent_version.clone(),
                    protocols: info.protocols.clone(),
                    rtt,
                });
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("no identify and ping from {addr} within {timeout:?}"))?
}
