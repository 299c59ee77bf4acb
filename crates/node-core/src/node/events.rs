//! The node events (on the bus of [`NodeHandle::subscribe`](crate::NodeHandle::subscribe))
//! of each behaviour event: one place per behaviour, next to its metrics
//! (`impl Recorder` in `metrics.rs`).

use ollamacron_service_registry::{ChangeKind, ServiceChange};

use crate::discovery;
use crate::event::NodeEvent;
use crate::registry;

/// The node event of a service change.
fn change_event(change: ServiceChange, local: bool) -> NodeEvent {
    let ServiceChange {
        peer,
        service_id,
        service_type,
        kind,
    } = change;
    match kind {
        ChangeKind::Added => NodeEvent::ServiceAdded {
            peer_id: peer,
            service_id,
            service_type,
            local,
        },
        ChangeKind::Updated => NodeEvent::ServiceUpdated {
            peer_id: peer,
            service_id,
            service_type,
            local,
        },
        ChangeKind::Removed => NodeEvent::ServiceRemoved {
            peer_id: peer,
            service_id,
            service_type,
            local,
        },
    }
}

/// What subscribers hear of a registry event.
pub(super) fn from_registry(event: &registry::Event) -> Vec<NodeEvent> {
    match event {
        registry::Event::Accepted { changes, .. } | registry::Event::Expired(changes) => changes
            .iter()
            .map(|c| change_event(c.clone(), false))
            .collect(),
        registry::Event::LocalChanged(change) => vec![change_event(change.clone(), true)],
        registry::Event::Rejected { peer, via, reason } => vec![NodeEvent::RecordRejected {
            peer: *peer,
            via: *via,
            reason: reason.as_str(),
            detail: reason.to_string(),
        }],
        registry::Event::Published
        | registry::Event::Misbehaving { .. }
        | registry::Event::ServiceCounts { .. }
        | registry::Event::LookupAnswered { .. }
        | registry::Event::Dht(_)
        | registry::Event::Gossip(_) => Vec::new(),
    }
}

/// What subscribers hear of a discovery event.
pub(super) fn from_discovery(event: &discovery::Event) -> Option<NodeEvent> {
    match *event {
        discovery::Event::Discovered { peer, source } => Some(NodeEvent::PeerDiscovered {
            peer_id: peer,
            source,
        }),
        discovery::Event::Lost { peer, source } => Some(NodeEvent::PeerLost {
            peer_id: peer,
            source,
        }),
        discovery::Event::DialFailed {
            peer,
            source,
            retry: Some((failures, retry_in)),
        } => Some(NodeEvent::DialFailed {
            peer_id: peer,
            source,
            failures,
            retry_in,
        }),
        discovery::Event::DialFailed { retry: None, .. }
        | discovery::Event::DialSucceeded { .. }
        | discovery::Event::TableChanged { .. } => None,
    }
}
