#![doc = include_str!("../README.md")]

#[macro_use]
mod delegate;

mod addr;
mod bandwidth;
mod behaviour;
mod configs;
mod dashboard;
mod discovery;
mod error;
mod event;
mod http;
mod identity;
mod metrics;
mod models;
mod node;
mod peers;
mod registrations;
pub mod registry;
mod state;
mod status;
#[cfg(test)]
mod test_swarms;
mod transport;
pub mod trim;

pub use bandwidth::BandwidthStatus;
pub use behaviour::{PROTOCOL_VERSION, agent_version};
pub use error::NodeError;
pub use event::{Direction, NodeEvent, RecordVia};
pub use http::{
    ApiListener, MAX_BODY_BYTES, MAX_LOOKUP_LIMIT, MAX_QUERY_VALUE_BYTES, MAX_QUERY_VALUES,
    gateway_access, http_limits, start_api,
};
pub use identity::{IdentityError, load_or_create_identity};
pub use metrics::MetricsSnapshot;
pub use models::{MODEL_SERVICE_TYPES, MeshModel, ModelNode, mesh_models};
pub use node::{Node, NodeHandle};
pub use ollamacron_http as http_server;
pub use registrations::{RegistrationError, RegistrationFile};
pub use registry::{CLOCK_WARNING_OFFSET, ClockStatus, SERVICES_TOPIC};
pub use state::{NodeState, StateError};
pub use status::{
    BreakerState, ConnectedPeer, ConnectionCounts, ConnectionKind, DiscoverySource,
    DiscoveryStatus, HolePunchCounts, HttpServerStatus, HttpStatus, KnownPeer, NodeStatus,
    PeerInfo, Reachability, ServiceCounts, SourceStats, SourceStatus, TraversalStatus,
};

/// Re-exported so users name the same types we do.
pub use libp2p;
/// Re-exported: [`NodeHandle::stream_control`] hands out its `Control`.
pub use libp2p_stream;
pub use ollamacron_config as config;
