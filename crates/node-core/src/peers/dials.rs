//! Dials someone awaits (`NodeHandle::dial`): later dials of the same peer
//! join the first, and every waiter gets the outcome with the address.

use libp2p::PeerId;
use libp2p::swarm::DialError;
use tokio::sync::oneshot;

use crate::error::{NodeError, error_chain};

/// A dial someone awaits.
pub(super) struct PendingDial {
    /// The address asked for, as the user wrote it.
    pub(super) target: String,
    /// The peer it names, if it names one.
    pub(super) peer: Option<PeerId>,
    pub(super) replies: Vec<oneshot::Sender<Result<PeerId, NodeError>>>,
}

impl PendingDial {
    pub(super) fn succeed(self, peer: PeerId) {
        for reply in self.replies {
            let _ = reply.send(Ok(peer));
        }
    }

    pub(super) fn fail(self, reason: &str) {
        for reply in self.replies {
            let _ = reply.send(Err(NodeError::Dial {
                target: self.target.clone(),
                reason: reason.to_owned(),
            }));
        }
    }
}

/// Why a dial failed: each address tried and its error, or the error.
pub(super) fn dial_error_reason(error: &DialError) -> String {
    match error {
        DialError::Transport(attempts) => attempts
            .iter()
            .map(|(addr, e)| format!("{addr}: {}", error_chain(e)))
            .collect::<Vec<_>>()
            .join("; "),
        other => error_chain(other),
    }
}
