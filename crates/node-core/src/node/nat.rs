//! NAT traversal events in the swarm task: reachability (which sets the
//! DHT's mode), relay reservations, hole punching, relay service, UPnP.

use libp2p::PeerId;
use ollamacron_nat::{self as nat, RELAY_HOP_PROTOCOL, Reachability, RelayServerEvent, is_relayed};

use super::task::SwarmTask;
use crate::configs::dht_mode;
use crate::event::NodeEvent;
use crate::metrics::{HolePunchOutcome, RelayOutcome};

/// Most addresses of a relay candidate handed to the NAT behaviour.
const MAX_RELAY_CANDIDATE_ADDRESSES: usize = 8;

impl SwarmTask {
    pub(super) fn on_nat(&mut self, event: nat::Event) {
        match event {
            nat::Event::ReachabilityChanged {
                reachability,
                address,
            } => {
                self.metrics.set_reachability(reachability.as_str());
                self.traversal.confirmed_at = address.clone();
                let why = reachability_reason(
                    &self.swarm.behaviour().nat,
                    &self.config,
                    address.as_ref(),
                );
                tracing::info!(%reachability, %why, "reachability changed");
                let mode = dht_mode(&self.config, reachability);
                self.swarm.behaviour_mut().registry.set_dht_mode(mode);
                self.emit(NodeEvent::ReachabilityChanged {
                    reachability,
                    address,
                });
            }
            nat::Event::ReservationRequested { relay, address } => {
                tracing::debug!(%relay, %address, "asking a relay for a reservation");
            }
            nat::Event::ReservationAccepted { relay, renewal } => {
                self.metrics.relay_reservation(RelayOutcome::Accepted);
                if !renewal {
                    tracing::info!(%relay, "relay reservation accepted: peers can reach us through it");
                    self.emit(NodeEvent::RelayReservation {
                        relay,
                        active: true,
                    });
                }
            }
            nat::Event::ReservationClosed {
                relay,
                reason,
                retry_in,
            } => {
                self.metrics.relay_reservation(RelayOutcome::Failed);
                let reason = reason.unwrap_or_else(|| "closed".to_owned());
                match retry_in {
                    Some(retry_in) => tracing::warn!(
                        %relay,
                        %reason,
                        retry_in = %humantime::format_duration(retry_in),
                        "relay reservation lost or refused; retrying"
                    ),
                    None => {
                        tracing::warn!(%relay, %reason, "relay reservation failed repeatedly; trying another relay");
                    }
                }
                self.emit(NodeEvent::RelayReservation {
                    relay,
                    active: false,
                });
            }
            nat::Event::RelayedConnection { peer, inbound } => {
                tracing::debug!(%peer, inbound, "relayed connection established");
            }
            nat::Event::HolePunch { peer, result } => {
                let error = match result {
                    Ok(_) => {
                        self.metrics.hole_punch(HolePunchOutcome::Success);
                        self.traversal.hole_punch.succeeded += 1;
                        tracing::info!(%peer, "hole punch succeeded: direct connection");
                        None
                    }
                    Err(reason) => {
                        self.metrics.hole_punch(HolePunchOutcome::Failure);
                        self.traversal.hole_punch.failed += 1;
                        tracing::info!(%peer, %reason, "hole punch failed: staying on the relay");
                        Some(reason)
                    }
                };
                self.emit(NodeEvent::HolePunch {
                    peer_id: peer,
                    success: error.is_none(),
                    error,
                });
            }
            nat::Event::RelayServer(event) => self.on_relay_server(event),
            nat::Event::PortMapped { local, external } => {
                tracing::info!(%local, %external, "UPnP port mapping added");
            }
            nat::Event::PortMappingExpired { external } => {
                tracing::warn!(%external, "UPnP port mapping could not be renewed");
            }
            nat::Event::PortMappingUnavailable { reason } => {
                tracing::warn!(%reason, "UPnP port mapping unavailable; continuing without it");
            }
        }
    }

    fn on_relay_server(&mut self, event: RelayServerEvent) {
        match event {
            RelayServerEvent::ReservationAccepted { peer, renewed } => {
                self.metrics.relay_served(RelayOutcome::Accepted, false);
                tracing::debug!(%peer, renewed, "relay: reservation accepted");
            }
            RelayServerEvent::ReservationDenied { peer, status } => {
                self.metrics.relay_served(RelayOutcome::Denied, false);
                tracing::debug!(%peer, %status, "relay: reservation refused");
            }
            RelayServerEvent::ReservationEnded { peer } => {
                tracing::debug!(%peer, "relay: reservation ended");
            }
            RelayServerEvent::CircuitAccepted { src, dst } => {
                self.metrics.relay_served(RelayOutcome::Accepted, true);
                self.traversal.circuits_served += 1;
                tracing::debug!(%src, %dst, "relay: circuit opened");
            }
            RelayServerEvent::CircuitDenied { src, dst, status } => {
                self.metrics.relay_served(RelayOutcome::Denied, true);
                tracing::debug!(%src, %dst, %status, "relay: circuit refused");
            }
            RelayServerEvent::CircuitClosed { src, dst } => {
                tracing::debug!(%src, %dst, "relay: circuit closed");
            }
            RelayServerEvent::Serving(serving) => {
                if serving {
                    tracing::info!("serving as a relay for peers behind NAT");
                } else {
                    tracing::info!("not serving as a relay (not publicly reachable)");
                }
            }
        }
    }

    /// A peer identified itself as a relay: a candidate for reservations
    /// when none are configured. Addresses we dialed come first.
    pub(super) fn note_relay_candidate(&mut self, peer: PeerId, info: &libp2p::identify::Info) {
        if !info.protocols.contains(&RELAY_HOP_PROTOCOL) {
            return;
        }
        // Addresses we dialed it at first; then what it says it listens
        // on, if usable (the NAT behaviour takes only direct ones).
        let mut addresses = self.swarm.behaviour().peers.dialed_addresses(&peer);
        addresses.extend(
            info.listen_addrs
                .iter()
                .filter(|a| self.loopback_only || !crate::addr::is_loopback(a))
                .cloned(),
        );
        addresses.retain(|a| !is_relayed(a));
        addresses.truncate(MAX_RELAY_CANDIDATE_ADDRESSES);
        self.swarm
            .behaviour_mut()
            .nat
            .add_relay_candidate(peer, &addresses);
    }
}

/// Why a node is or is not reachable, for `status`: the verdict and where
/// it comes from, the reservations held, and what an operator can do.
pub(super) fn reachability_reason(
    nat: &ollamacron_nat::Behaviour,
    config: &ollamacron_config::NodeConfig,
    confirmed_at: Option<&libp2p::Multiaddr>,
) -> String {
    let relays = nat.active_relays().len();
    let through = match relays {
        0 => None,
        1 => Some("reachable through 1 relay reservation".to_owned()),
        n => Some(format!("reachable through {n} relay reservations")),
    };
    let reservations = || {
        through.clone().unwrap_or_else(|| {
            if !config.enable_auto_relay {
                "no relay reservation (enable_auto_relay is off)".to_owned()
            } else if config.relay_nodes.is_empty() {
                "no relay reservation yet: set relay_nodes, or connect to a public relay".to_owned()
            } else {
                "no relay reservation yet (asking the configured relay_nodes)".to_owned()
            }
        })
    };
    let reachability = nat.reachability();
    if nat.is_forced() {
        return match reachability {
            Reachability::Public => {
                "public (force_reachability): peers dial this node directly".to_owned()
            }
            _ => format!("{reachability} (force_reachability); {}", reservations()),
        };
    }
    match reachability {
        Reachability::Public => match confirmed_at {
            Some(address) => format!("public: AutoNAT peers dialed this node back at {address}"),
            None => "public: AutoNAT peers dialed this node back".to_owned(),
        },
        Reachability::Private => format!(
            "private: AutoNAT peers could not dial this node back (behind NAT or a firewall); {}",
            reservations()
        ),
        Reachability::Unknown => {
            let undecided = if config.autonat_only_global_ips {
                "AutoNAT has not decided (it asks peers on global addresses only; \
                 autonat_only_global_ips)"
            } else {
                "AutoNAT has not decided yet (it needs connected peers to dial it back)"
            };
            format!("unknown: {undecided}; {}", reservations())
        }
    }
}
