//! Many Ollamacron node cores in one process, over an in-memory network
//! with per-link latency.
//!
//! [`SimNetwork`] is the network: node `i` listens on
//! `/memory/<base_port + i>`, every link between two nodes has its own
//! round trip (drawn once per pair from a range with a seeded generator),
//! every node's bytes sent and received are counted, and
//! [`SimNetwork::crash`] cuts every link of a node at once.
//! [`SimNetwork::transport`] is what a node is given
//! ([`Node::with_transport`](ollamacron_node_core::Node::with_transport)):
//! the latency transport upgraded with Noise and Yamux, as the node
//! upgrades TCP.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use ollamacron_node_core::Node;
//! use ollamacron_node_core::config::NodeConfig;
//! use ollamacron_node_core::libp2p::identity::Keypair;
//! use ollamacron_sim::{SimConfig, SimNetwork};
//!
//! let net = SimNetwork::new(SimConfig::new(2, Duration::from_millis(20)..=Duration::from_millis(80)));
//! let key = Keypair::generate_ed25519();
//! let config = NodeConfig {
//!     enable_mdns: false,
//!     listen: vec![net.address(0)],
//!     ..NodeConfig::default()
//! };
//! let node = Node::new(config)
//!     .with_transport(net.transport(0, &key)?)
//!     .with_keypair(key)
//!     .start()
//!     .await?;
//! # node.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The binary of this crate runs the simulation of `cargo xtask sim`.

mod latency;

pub use latency::{LatencyTransport, LinkStream, SimConfig, SimNetwork, Traffic};
