//! Our own record: the services we offer, signed into a record and
//! published in the DHT (under our node key, as provider of each type,
//! capability and model key, pushed to every connected peer of the routing table)
//! and on the gossip topic.

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::gossipsub::IdentTopic;
use libp2p::multiaddr::Protocol;
use ollamacron_config::ServiceConfig;
use ollamacron_discovery_dht::{Record, RecordKey};
use ollamacron_service_registry::{ServiceChange, ServiceInfo, ServiceStatus, sign_record_pages};

use super::keys::{capability_key, is_model, model_key, node_record_page_key, service_type_key};
use super::{Behaviour, Event, LocalService, OwnRecord, SERVICES_TOPIC, ServiceOrigin, unix_ms};
use crate::addr::with_peer;
use crate::error::NodeError;
use crate::status::ServiceCounts;

/// Our record is put on the peers closest to its key at most this often
/// (besides the DHT's announcements); its neighbours get every version at
/// once through record sync.
pub(super) const MIN_DHT_PUT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// A service declared in the config file, as the registry holds it.
pub(crate) fn service_from_config(config: &ServiceConfig) -> ServiceInfo {
    ServiceInfo {
        id: config.effective_id().to_owned(),
        name: config.name.clone(),
        service_type: config.service_type.clone(),
        version: config.version.clone(),
        description: config.description.clone(),
        port: config.port,
        metadata: config.metadata.clone(),
        tags: config.tags.clone(),
        capabilities: config.capabilities.clone(),
        protocols: config.protocols.clone(),
        health_check_url: config.health_check_url.clone(),
        latency_ms: config.latency_ms,
        throughput: config.throughput,
        reliability: config.reliability,
        status: ServiceStatus::Available,
        ..ServiceInfo::default()
    }
}

impl Behaviour {
    /// The node runs: publish our record, and from now on whenever it changes.
    pub(crate) fn start(&mut self) {
        self.running = true;
        if !self.local.is_empty() {
            let ids: Vec<&str> = self.local.iter().map(|s| s.id.as_str()).collect();
            tracing::info!(count = ids.len(), ids = %ids.join(", "), "advertising services");
        }
        self.publish_record();
    }

    /// Addresses peers can reach us at, for the services in our record.
    fn record_addresses(&self) -> Vec<String> {
        let max = self.limits.max_list_items;
        // Relay addresses only as confirmed (the one we reserved through).
        self.external_addrs
            .iter()
            .chain(
                self.listen_addrs
                    .iter()
                    .filter(|a| !ollamacron_nat::is_relayed(a)),
            )
            .filter(|a| self.loopback_only || !ollamacron_nat::is_loopback(a))
            .filter(|a| !crate::addr::is_link_local(a))
            .filter(|a| {
                !a.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_unspecified(),
                    Protocol::Ip6(ip) => ip.is_unspecified(),
                    _ => false,
                })
            })
            .map(|a| with_peer(a.clone(), self.local_peer).to_string())
            .filter(|a| a.len() <= self.limits.max_string_bytes)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .take(max)
            .collect()
    }

    /// Our addresses changed (a relay reservation came or went): publish a
    /// record that lists them and re-announce as provider, so peers that
    /// find our services can dial us.
    pub(crate) fn announce_addresses(&mut self) {
        if !self.running {
            return;
        }
        self.publish_record();
        if let Some(dht) = self.inner.dht.as_mut() {
            dht.refresh_now();
        }
    }

    /// Sign a new record of our services and publish it: in the DHT under
    /// our node key, as provider of every type and capability key, and on
    /// the gossip topic. An empty record is published once, to withdraw
    /// what we advertised before.
    pub(crate) fn publish_record(&mut self) {
        if self.local.is_empty() && !self.advertising {
            return;
        }
        let addresses = self.record_addresses();
        let record = self.local.next_record(
            unix_ms(),
            self.ttl,
            self.region.as_deref(),
            &self.node_tags,
            &addresses,
        );
        let pages = match sign_record_pages(&record, &self.keypair, &self.limits) {
            Ok(pages) => pages,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign our service record; not published");
                return;
            }
        };
        self.advertising = !record.services.is_empty();
        self.own = Some(OwnRecord {
            sequence: record.sequence,
            pages: pages.clone(),
        });
        let model_keys: HashSet<RecordKey> = record
            .services
            .iter()
            .filter(|s| is_model(s))
            .map(|s| model_key(&s.name))
            .collect();
        let keys: HashSet<RecordKey> = record
            .services
            .iter()
            .flat_map(|s| {
                std::iter::once(service_type_key(&s.service_type))
                    .chain(s.capabilities.iter().map(|c| capability_key(c)))
            })
            .chain(model_keys.iter().cloned())
            .collect();
        if let Some(dht) = self.inner.dht.as_mut() {
            // A model key finds every node that serves the model, so it
            // follows the network as it grows; the namespace, type and
            // capability keys, which every node of a kind provides, do not.
            dht.set_exact_keys(model_keys);
            dht.set_provided_keys(keys);
            let expires = Some(Instant::now() + self.ttl);
            let records = pages
                .iter()
                .map(|page| Record {
                    key: node_record_page_key(&self.local_peer, page.page),
                    value: page.envelope.clone(),
                    publisher: Some(self.local_peer),
                    expires,
                })
                .collect();
            self.publish_in_dht(records);
        }
        self.push_own_record_to_all();
        for page in &pages {
            self.gossip_publish(page.envelope.clone());
        }
        tracing::debug!(
            sequence = record.sequence,
            services = record.services.len(),
            pages = pages.len(),
            "published our service record"
        );
        self.emit(Event::Published);
    }

    /// Store our record locally and on the peers closest to its key now,
    /// and again on every DHT refresh, until replaced. A put still running
    /// is not interrupted; its successor starts when it ends.
    ///
    /// Besides the closest peers, every connected peer of the routing
    /// table gets the record directly now, and every peer that joins the
    /// routing table later gets it when it does: in a small mesh every
    /// node holds every record without a lookup.
    fn publish_in_dht(&mut self, records: Vec<Record>) {
        self.own_dht.clone_from(&records);
        self.pushed.clear();
        let connected: Vec<PeerId> = self
            .dht()
            .map(|dht| {
                dht.routing_peers()
                    .filter(|p| self.connected.contains(p) && !self.sync.peers.contains(p))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        self.push_own_record(connected);
        // The newest one is stored locally at once (peers asking us get
        // it); the walk to the closest peers waits for the DHT's first
        // announcement, for a put still running, and for
        // `MIN_DHT_PUT_INTERVAL` since the last one.
        let Some(dht) = self.inner.dht.as_mut() else {
            return;
        };
        for record in records {
            if let Err(e) = dht.store_record(record) {
                tracing::warn!(error = %e, "cannot store our own record");
            }
        }
        if !dht.has_announced() {
            return;
        }
        if !self.own_puts.is_empty() {
            self.own_outdated = true;
            return;
        }
        if let Some(at) = self.own_put_at
            && at.elapsed() < MIN_DHT_PUT_INTERVAL
        {
            self.own_put_due = Some(at + MIN_DHT_PUT_INTERVAL);
            return;
        }
        self.put_own_record();
    }

    /// PUT every page of our record on the peers closest to its key (one
    /// round at a time).
    pub(super) fn put_own_record(&mut self) {
        if self.own_dht.is_empty() || !self.own_puts.is_empty() {
            return;
        }
        let Some(dht) = self.inner.dht.as_mut() else {
            return;
        };
        self.own_put_due = None;
        self.own_put_at = Some(Instant::now());
        for record in self.own_dht.clone() {
            match dht.put_record(record) {
                Ok(id) => {
                    self.own_puts.insert(id);
                }
                Err(e) => tracing::warn!(error = %e, "cannot store our own record"),
            }
        }
    }

    /// PUT our record to `peers` directly (not a walk); each connected
    /// peer gets each version once.
    pub(super) fn push_own_record(&mut self, peers: Vec<PeerId>) {
        if self.own_dht.is_empty() {
            return;
        }
        let peers: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| self.pushed.insert(*p))
            .collect();
        if peers.is_empty() {
            return;
        }
        let Some(dht) = self.inner.dht.as_mut() else {
            return;
        };
        tracing::debug!(?peers, "pushing our record");
        for record in self.own_dht.clone() {
            let id = dht.put_record_to(record, peers.iter().copied());
            self.pushes.insert(id);
        }
    }

    pub(super) fn gossip_publish(&mut self, envelope: Vec<u8>) {
        if let Some(gossip) = self.inner.gossip.as_mut()
            && let Err(e) = gossip.publish(IdentTopic::new(SERVICES_TOPIC), envelope)
        {
            // No subscribed peer yet is normal; they get it when they subscribe.
            tracing::debug!(error = %e, "record not gossiped");
        }
    }

    /// Add or replace a local service and publish at once. The new record
    /// is signed on a copy first, so a service that would make the record
    /// invalid is refused with the reason and changes nothing.
    pub(crate) fn register_service(&mut self, service: &ServiceInfo) -> Result<(), NodeError> {
        let changes = self.try_register(std::slice::from_ref(service))?;
        self.origins.insert(service.id.clone(), ServiceOrigin::Api);
        for change in changes {
            self.emit(Event::LocalChanged(change));
        }
        self.emit_counts();
        self.publish_record();
        Ok(())
    }

    /// Add or replace every one of `services` if the record stays valid
    /// with all of them (registered and signed on a trial copy, once);
    /// otherwise the first reason, and nothing changes. Nothing is
    /// published.
    fn try_register(&mut self, services: &[ServiceInfo]) -> Result<Vec<ServiceChange>, NodeError> {
        let mut trial = self.local.clone();
        let now = unix_ms();
        let changes = services
            .iter()
            .map(|s| trial.register(s.clone(), now).map_err(NodeError::from))
            .collect::<Result<Vec<_>, _>>()?;
        let addresses = self.record_addresses();
        let record = trial.next_record(
            now,
            self.ttl,
            self.region.as_deref(),
            &self.node_tags,
            &addresses,
        );
        sign_record_pages(&record, &self.keypair, &self.limits).map_err(NodeError::from)?;
        self.local = trial;
        Ok(changes)
    }

    /// Remove the services with the ids in `remove`, add or replace each of
    /// `add`, and publish one record for all of it. A service of `add` that
    /// would make the record invalid is left out; those come back with
    /// their ids and reasons.
    pub(crate) fn update_services(
        &mut self,
        add: Vec<ServiceInfo>,
        remove: &[String],
    ) -> Vec<(String, NodeError)> {
        let mut changed = false;
        // An id in both lists is replaced (one update), not removed and added.
        for id in remove.iter().filter(|id| !add.iter().any(|s| s.id == **id)) {
            if let Some(change) = self.local.unregister(id) {
                self.origins.remove(id);
                self.emit(Event::LocalChanged(change));
                changed = true;
            }
        }
        let mut refused = Vec::new();
        let added: Vec<String> = add.iter().map(|s| s.id.clone()).collect();
        // All at once on a trial copy, signed once; only when that record
        // would be refused is each service tried on its own (each trial
        // signs every page).
        let changes = match self.try_register(&add) {
            Ok(changes) => changes,
            Err(_) => {
                let mut changes = Vec::new();
                for service in add {
                    match self.try_register(std::slice::from_ref(&service)) {
                        Ok(one) => changes.extend(one),
                        Err(e) => refused.push((service.id, e)),
                    }
                }
                changes
            }
        };
        for id in added {
            if !refused.iter().any(|(r, _)| *r == id) {
                self.origins.insert(id, ServiceOrigin::Ollama);
            }
        }
        for change in changes {
            self.emit(Event::LocalChanged(change));
            changed = true;
        }
        if changed {
            self.emit_counts();
            self.publish_record();
        }
        refused
    }

    /// Remove a local service and publish at once; false if there was none.
    pub(crate) fn unregister_service(&mut self, id: &str) -> bool {
        let Some(change) = self.local.unregister(id) else {
            return false;
        };
        self.origins.remove(id);
        self.emit(Event::LocalChanged(change));
        self.emit_counts();
        self.publish_record();
        true
    }

    /// The services this node offers, with where each came from.
    pub(crate) fn local_services_with_origin(&self) -> Vec<LocalService> {
        self.local
            .iter()
            .map(|s| LocalService {
                service: s.clone(),
                origin: self
                    .origins
                    .get(&s.id)
                    .copied()
                    .unwrap_or(ServiceOrigin::Api),
            })
            .collect()
    }

    /// How far our clock is from our peers'.
    pub(crate) fn clock_status(&self) -> super::ClockStatus {
        self.clocks.status()
    }

    /// Services ours and of the verified records we hold.
    pub(crate) fn service_counts(&self) -> ServiceCounts {
        ServiceCounts {
            local: self.local.len(),
            remote: self
                .cache
                .iter()
                .map(|(_, c)| c.record.services.len())
                .sum(),
            nodes: self.cache.len(),
        }
    }

    pub(super) fn emit_counts(&mut self) {
        let counts = self.service_counts();
        self.emit(Event::ServiceCounts {
            local: counts.local,
            remote: counts.remote,
        });
    }
}
