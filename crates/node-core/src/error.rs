//! Errors of the node core.

use std::net::SocketAddr;
use std::path::PathBuf;

use libp2p::Multiaddr;

use crate::state::StateError;

/// Everything that can go wrong starting, driving or asking a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The identity key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The key's peer id is not the one `node_id` asks for.
    #[error("the key at {} belongs to peer {actual}, but node_id is {expected}; point private_key_path at the right key or fix node_id", path.display())]
    WrongIdentity {
        /// The key file.
        path: PathBuf,
        /// `node_id` from the configuration.
        expected: String,
        /// The key's peer id.
        actual: String,
    },
    /// The registration file cannot be read, holds a service the record
    /// refuses, or cannot be written.
    #[error(transparent)]
    Registration(#[from] crate::registrations::RegistrationError),
    /// The network key of a private network cannot be used.
    #[error("{0}")]
    NetworkKey(String),
    /// The transport could not be built.
    #[error("cannot build the {what} transport: {reason}")]
    Transport {
        /// Which transport.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The HTTP API address could not be bound.
    #[error("cannot serve the HTTP API on {addr} (api_listen): {source}")]
    ApiListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gateway's address could not be bound or read.
    #[error("cannot serve the gateway on {addr} (gateway_listen): {source}")]
    GatewayListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A dial failed.
    #[error("cannot dial {target}: {reason}")]
    Dial {
        /// The address or peer dialed.
        target: String,
        /// Why.
        reason: String,
    },
    /// The node did not reach `Running` in time.
    #[error("the node did not start within {0:?}")]
    StartTimeout(std::time::Duration),
    /// An illegal lifecycle transition.
    #[error(transparent)]
    State(#[from] StateError),
    /// The configuration breaks validation rules.
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Config(Vec<ollamacron_config::ValidationError>),
    /// The node ended in the `Error` state.
    #[error("the node failed; its log says why")]
    Failed,
    /// A service could not be registered.
    #[error("cannot register service: {message}")]
    Service {
        /// What is wrong.
        message: String,
        /// The service field to blame, when one is.
        field: Option<&'static str>,
    },
    /// The node's event loop has ended; it no longer takes commands.
    #[error("the node is not running (its event loop has stopped)")]
    NotRunning,
}

impl From<ollamacron_service_registry::RegisterError> for NodeError {
    fn from(e: ollamacron_service_registry::RegisterError) -> Self {
        use ollamacron_service_registry::RegisterError;
        let field = match &e {
            RegisterError::EmptyId => Some("id"),
            RegisterError::EmptyType { .. } => Some("type"),
            RegisterError::TooMany { .. } => None,
        };
        Self::Service {
            message: e.to_string(),
            field,
        }
    }
}

impl From<ollamacron_service_registry::RecordError> for NodeError {
    fn from(e: ollamacron_service_registry::RecordError) -> Self {
        use ollamacron_service_registry::{RecordError, RejectReason};
        let field = match &e {
            RecordError::Invalid(RejectReason::OverLimit { field, .. }) => Some(*field),
            RecordError::Invalid(RejectReason::DuplicateService(_)) => Some("id"),
            _ => None,
        };
        Self::Service {
            message: e.to_string(),
            field,
        }
    }
}

/// An error and its sources, joined: libp2p errors often say little at the top.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
