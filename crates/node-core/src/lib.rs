//! The Ollamacron node: one tokio task owns the libp2p `Swarm`; everything
//! else talks to it through a cloneable [`NodeHandle`] (an mpsc command and
//! a oneshot reply per call), listens on its event bus, and reads its
//! Prometheus metrics.
//!
//! ```
//! use ollamacron_config::ConfigLoader;
//! use ollamacron_node_core::{Node, NodeState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ConfigLoader::new()
//!     .set("listen", "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1")
//!     .set("enable_mdns", "false")
//!     .set("enable_metrics", "false")
//!     .load()?;
//! let identity = libp2p::identity::Keypair::generate_ed25519();
//! let a = Node::new(config.clone()).with_keypair(identity).start().await?;
//! let b = Node::new(config)
//!     .with_keypair(libp2p::identity::Keypair::generate_ed25519())
//!     .start()
//!     .await?;
//!
//! let addr = a.dialable_addrs().await?.remove(0);
//! assert_eq!(b.dial(addr).await?, a.peer_id());
//!
//! b.shutdown().await?;
//! a.shutdown().await?;
//! assert_eq!(a.state(), NodeState::Stopped);
//! # Ok(()) }
//! ```
//!
//! What a node runs: TCP (and WebSocket when enabled) with Noise and/or
//! TLS 1.3 and Yamux, QUIC-v1, DNS resolution, identify
//! ([`PROTOCOL_VERSION`]), ping, connection limits from `conn_mgr_high`
//! with the trimming policy of [`trim`], memory-based connection limits
//! when `max_memory` is set, and Prometheus metrics on `api_listen`.

mod behaviour;
mod error;
mod event;
mod http;
mod identity;
mod metrics;
mod node;
mod state;
mod transport;
pub mod trim;

pub use behaviour::{PROTOCOL_VERSION, agent_version};
pub use error::NodeError;
pub use event::{Direction, NodeEvent};
pub use identity::{IdentityError, load_or_create_identity};
pub use metrics::MetricsSnapshot;
pub use node::{ConnectedPeer, Node, NodeHandle};
pub use state::{NodeState, StateError};

/// Re-exported so users name the same types we do.
pub use libp2p;
pub use ollamacron_config as config;
