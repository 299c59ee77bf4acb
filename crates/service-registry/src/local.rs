//! The services this node offers, and the record that advertises them.

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;

use crate::cache::{ChangeKind, ServiceChange, diff};
use crate::record::{NodeRecord, RECORD_VERSION};
use crate::service::ServiceInfo;

/// Why a local service cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The service has no id.
    #[error("service id must not be empty")]
    EmptyId,
    /// The service has no type.
    #[error("service {id}: type must not be empty")]
    EmptyType {
        /// The service.
        id: String,
    },
    /// One more service would exceed the node's limit.
    #[error("cannot add service {id}: this node already offers the maximum of {max} services")]
    TooMany {
        /// The service.
        id: String,
        /// The limit.
        max: usize,
    },
}

/// This node's services, and the sequence of its record.
///
/// [`LocalServices::next_record`] makes one record of all of them;
/// [`sign_record_pages`](crate::sign_record_pages) splits it into as many
/// pages as it needs.
///
/// ```
/// use std::time::Duration;
/// use libp2p::identity::Keypair;
/// use ollamacron_service_registry::{LocalServices, RecordLimits, ServiceInfo, sign_record_pages};
///
/// let key = Keypair::generate_ed25519();
/// let me = key.public().to_peer_id();
/// let limits = RecordLimits::default();
/// // Up to 64 services a page, 16 pages.
/// let mut local = LocalServices::new(me, limits.max_paged_services());
/// for i in 0..100 {
///     let model = ServiceInfo { id: format!("m{i}"), service_type: "llm".into(), ..ServiceInfo::default() };
///     local.register(model, 1_000)?;
/// }
/// let first = local.next_record(1_000, Duration::from_secs(300), None, &[], &[]);
/// let second = local.next_record(1_000, Duration::from_secs(300), None, &[], &[]);
/// assert!(second.sequence > first.sequence);
/// assert_eq!(first.services.len(), 100);
/// assert_eq!(first.services[0].peer_id, me.to_string());
/// // 100 services are more than one page holds.
/// let pages = sign_record_pages(&second, &key, &limits)?;
/// assert_eq!(pages.len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LocalServices {
    peer: PeerId,
    services: BTreeMap<String, ServiceInfo>,
    max_services: usize,
    sequence: u64,
}

impl LocalServices {
    /// No services yet, for node `peer`, holding at most `max_services` in
    /// all. A node that pages its record passes the per-page limit times
    /// [`MAX_RECORD_PAGES`](crate::MAX_RECORD_PAGES)
    /// ([`RecordLimits::max_paged_services`](crate::RecordLimits::max_paged_services));
    /// one that signs a single record with
    /// [`sign_record`](crate::sign_record), the per-page limit itself.
    #[must_use]
    pub fn new(peer: PeerId, max_services: usize) -> Self {
        Self {
            peer,
            services: BTreeMap::new(),
            max_services,
            sequence: 0,
        }
    }

    /// Add or replace a service (by id). Its peer id becomes this node's;
    /// `registered_at` is kept from an earlier registration.
    ///
    /// # Errors
    /// [`RegisterError`] for an empty id or type, or one service too many.
    pub fn register(
        &mut self,
        mut service: ServiceInfo,
        now_ms: u64,
    ) -> Result<ServiceChange, RegisterError> {
        if service.id.is_empty() {
            return Err(RegisterError::EmptyId);
        }
        if service.service_type.is_empty() {
            return Err(RegisterError::EmptyType { id: service.id });
        }
        let existing = self.services.get(&service.id);
        if existing.is_none() && self.services.len() >= self.max_services {
            return Err(RegisterError::TooMany {
                id: service.id,
                max: self.max_services,
            });
        }
        service.peer_id = self.peer.to_string();
        service.registered_at = existing.map_or(now_ms, |e| e.registered_at);
        service.updated_at = now_ms;
        let old: Vec<ServiceInfo> = existing.cloned().into_iter().collect();
        let mut changes = diff(self.peer, &old, std::slice::from_ref(&service));
        self.services.insert(service.id.clone(), service.clone());
        Ok(changes.pop().unwrap_or(ServiceChange {
            peer: self.peer,
            service_id: service.id,
            service_type: service.service_type,
            kind: ChangeKind::Updated,
        }))
    }

    /// Remove a service; `None` if there was none with that id.
    pub fn unregister(&mut self, id: &str) -> Option<ServiceChange> {
        self.services.remove(id).map(|s| ServiceChange {
            peer: self.peer,
            service_id: s.id,
            service_type: s.service_type,
            kind: ChangeKind::Removed,
        })
    }

    /// The services, by id.
    pub fn iter(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    /// One service.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&ServiceInfo> {
        self.services.get(id)
    }

    /// Number of services.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Record a health probe of a local service.
    pub fn set_last_health_check(&mut self, id: &str, at_ms: u64) {
        if let Some(s) = self.services.get_mut(id) {
            s.last_health_check = Some(at_ms);
        }
    }

    /// The next record: a sequence above every earlier one (and, being at
    /// least the time in milliseconds, above those of an earlier run of the
    /// node), issued now, expiring after `ttl`, with every service stamped
    /// with the node's `addresses` and the expiry. It holds every service,
    /// as page 0 of 1 in format [`RECORD_VERSION`]; sign it with
    /// [`sign_record_pages`](crate::sign_record_pages) to split it into
    /// pages when it is more than one page holds.
    pub fn next_record(
        &mut self,
        now_ms: u64,
        ttl: Duration,
        region: Option<&str>,
        node_tags: &[String],
        addresses: &[String],
    ) -> NodeRecord {
        self.sequence = (self.sequence + 1).max(now_ms);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires_at = now_ms.saturating_add(ttl_ms);
        let services = self
            .services
            .values()
            .map(|s| ServiceInfo {
                addresses: addresses.to_vec(),
                expires_at,
                ..s.clone()
            })
            .collect();
        NodeRecord {
            version: RECORD_VERSION,
            peer_id: self.peer.to_string(),
            sequence: self.sequence,
            issued_at: now_ms,
            expires_at,
            region: region.map(str::to_owned),
            node_tags: node_tags.to_vec(),
            services,
            page: 0,
            pages: 1,
        }
    }
}
