//! The libp2p behaviours the NAT behaviour is made of.
//!
//! `pub` (in a private module) because the connection handler type of
//! [`Behaviour`](crate::Behaviour) names it; nothing outside uses it.
#![allow(unreachable_pub, missing_docs)]

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{autonat, dcutr, relay, upnp};

/// The parts, composed.
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
pub struct Inner {
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) relay_server: Toggle<relay::Behaviour>,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: Toggle<dcutr::Behaviour>,
    pub(crate) upnp: Toggle<upnp::tokio::Behaviour>,
}
