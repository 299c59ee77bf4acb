//! Every record that comes in — a Kademlia PUT, a record a lookup
//! fetched, a gossip message — is verified here before it is stored,
//! forwarded or used; expired records leave here too.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use ollamacron_discovery_dht::Record;
use ollamacron_service_registry::{Accepted, RejectReason, verify_record};

use super::clock::Delivery;
use super::keys::node_record_page;
use super::{Behaviour, Event, unix_ms};
use crate::event::RecordVia;

/// A burst of peers subscribing to the topic costs one re-publication.
const GOSSIP_REPUBLISH_DEBOUNCE: Duration = Duration::from_millis(200);
/// Re-publications for new subscribers are at least this far apart, so a
/// peer that keeps re-subscribing cannot make every node flood the topic
/// (a newcomer also gets our record by a direct DHT put).
const GOSSIP_REPUBLISH_MIN_INTERVAL: Duration = Duration::from_secs(5);

impl Behaviour {
    /// Verify `envelope` as `owner`'s record and hold it; report what
    /// changed, or the rejection. `from` is who handed it to us; `floor` a
    /// sequence the record must reach (a copy we already hold elsewhere).
    pub(super) fn accept_record(
        &mut self,
        owner: PeerId,
        envelope: &[u8],
        via: RecordVia,
        from: Option<PeerId>,
        floor: Option<u64>,
    ) -> Result<Accepted, RejectReason> {
        let delivery = match via {
            _ if from != Some(owner) => Delivery::Passed,
            RecordVia::Sync | RecordVia::Get => Delivery::Synced,
            RecordVia::Put | RecordVia::Gossip => Delivery::Pushed,
        };
        self.accept_record_as(owner, envelope, via, from, floor, delivery)
    }

    /// [`Behaviour::accept_record`], saying how the record came (for its
    /// author's clock): a sync push of the owner's own record is
    /// [`Delivery::Pushed`], which `via` alone does not tell.
    pub(super) fn accept_record_as(
        &mut self,
        owner: PeerId,
        envelope: &[u8],
        via: RecordVia,
        from: Option<PeerId>,
        floor: Option<u64>,
        delivery: Delivery,
    ) -> Result<Accepted, RejectReason> {
        let now = unix_ms();
        let result = if owner == self.local_peer {
            // Only we sign our records: anything but our latest is stale or forged.
            match &self.own {
                Some(own) if own.pages.iter().any(|p| p.envelope == envelope) => {
                    Ok(Accepted::Unchanged)
                }
                own => verify_record(
                    envelope,
                    &owner,
                    now,
                    own.as_ref().map(|own| own.sequence.saturating_add(1)),
                    &self.limits,
                )
                .map(|_| Accepted::Unchanged),
            }
        } else {
            // Judged by its author's clock, as its records tell it.
            let clocks = &mut self.clocks;
            self.cache
                .accept_by_author_clock(owner, envelope, now, &self.limits, floor, |record| {
                    clocks.observe(owner, record, now, delivery)
                })
        };
        if via != RecordVia::Gossip
            && let Ok(Accepted::Stored { .. }) = &result
        {
            self.pass_on(owner, envelope);
        }
        match &result {
            Ok(Accepted::Stored { changes }) => {
                tracing::debug!(%owner, peer = ?from, via = via.as_str(), "record accepted");
                let first = !self.peer_health.contains_key(&owner);
                for change in changes {
                    if change.peer != owner {
                        // Evicted to make room: forget what we measured of it.
                        self.peer_health.remove(&change.peer);
                        self.service_health.retain(|(p, _), _| *p != change.peer);
                    }
                }
                self.emit(Event::Accepted {
                    via,
                    changes: changes.clone(),
                });
                self.emit_counts();
                if let Some(issued_at) = self.cache.get(&owner).map(|c| c.record.issued_at) {
                    self.signed_at(owner, issued_at);
                }
                if first {
                    // A first sign of the peer: check it now, not in a
                    // minute. Two nodes that learn of each other at the
                    // same moment would dial each other at once, and one
                    // of the two connections be closed again: only the
                    // smaller peer id dials now; the other node is checked
                    // by that connection, or by the next round.
                    if self.local_peer.to_bytes() < owner.to_bytes()
                        || self.connected.contains(&owner)
                    {
                        self.check_peer(owner);
                    } else {
                        self.peer_health.entry(owner).or_default();
                    }
                    self.route_to(owner);
                }
            }
            Ok(Accepted::Unchanged) => {}
            Err(reason) => {
                tracing::debug!(peer = ?from, %owner, via = via.as_str(), %reason, "record rejected");
                self.reject(from, via, reason.clone());
            }
        }
        result
    }

    /// The DHT learns the addresses of a node whose record we hold: its
    /// routing table fills from the records of the mesh, with no walk.
    fn route_to(&mut self, owner: PeerId) {
        if self.dht().is_none_or(|d| d.is_in_routing_table(&owner)) {
            return;
        }
        let addresses: Vec<libp2p::Multiaddr> = self
            .record_addresses_of(&owner)
            .into_iter()
            .map(|mut a| {
                // The routing table holds addresses without the peer id.
                if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                    a.pop();
                }
                a
            })
            .collect();
        if let Some(dht) = self.inner.dht.as_mut() {
            for address in addresses {
                dht.add_address(&owner, address);
            }
        }
    }

    /// A peer asks us to store a record: only a verified node record for
    /// the peer its key names is stored.
    pub(super) fn on_inbound_put(&mut self, source: PeerId, record: Record) {
        let Some((owner, page)) = node_record_page(&record.key) else {
            let reason = RejectReason::Malformed(format!(
                "key {:?} is not /ollamacron/node/<peer id>[/<page>]",
                String::from_utf8_lossy(record.key.as_ref())
            ));
            tracing::debug!(peer = %source, %reason, "record rejected");
            self.reject(Some(source), RecordVia::Put, reason);
            return;
        };
        if owner == self.local_peer {
            // Our own key: we hold our latest record; check and count the rest.
            let _ = self.accept_record(owner, &record.value, RecordVia::Put, Some(source), None);
            return;
        }
        // The copy in the DHT store counts too: the cache may have evicted it.
        // Judged, like the record itself, by its author's clock.
        let author_now = self.clocks.author_now(&owner, unix_ms());
        let stored_sequence = self
            .dht()
            .and_then(|dht| dht.stored_record(&record.key))
            .and_then(|stored| {
                verify_record(&stored.value, &owner, author_now, None, &self.limits)
                    .ok()
                    .map(|r| r.sequence)
            });
        if self
            .accept_record(
                owner,
                &record.value,
                RecordVia::Put,
                Some(source),
                stored_sequence,
            )
            .is_err()
        {
            return;
        }
        // Kept in the store exactly as long as the record itself is valid.
        // Only under its own page's key.
        let Some(expires_at) = self
            .cache
            .get(&owner)
            .and_then(|c| c.page(page))
            .filter(|p| p.envelope == record.value)
            .map(|p| p.record.expires_at)
        else {
            tracing::debug!(%owner, page, "a page put under another page's key is not stored");
            return;
        };
        let lifetime = Duration::from_millis(expires_at.saturating_sub(unix_ms()));
        let record = Record {
            expires: Some(Instant::now() + lifetime),
            ..record
        };
        if let Some(dht) = self.inner.dht.as_mut()
            && let Err(e) = dht.store_record(record)
        {
            tracing::debug!(%owner, error = %e, "verified record not stored in the DHT");
        }
    }

    /// A gossiped record: verified like any other before gossipsub may
    /// forward it. A new subscriber gets our record soon (debounced).
    pub(super) fn on_gossip(&mut self, event: &gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = match message.source {
                    Some(author) => {
                        // Handed over by the propagation source: straight
                        // from its author only when that is the author.
                        match self.accept_record(
                            author,
                            &message.data,
                            RecordVia::Gossip,
                            Some(*propagation_source),
                            None,
                        ) {
                            Ok(Accepted::Stored { .. }) => MessageAcceptance::Accept,
                            Ok(Accepted::Unchanged) | Err(RejectReason::StaleSequence { .. }) => {
                                MessageAcceptance::Ignore
                            }
                            Err(_) => MessageAcceptance::Reject,
                        }
                    }
                    None => MessageAcceptance::Reject,
                };
                if let Some(gossip) = self.inner.gossip.as_mut() {
                    gossip.report_message_validation_result(
                        message_id,
                        propagation_source,
                        acceptance,
                    );
                }
            }
            gossipsub::Event::Subscribed { peer_id, .. } => {
                tracing::debug!(%peer_id, "peer subscribed to service records");
                if self.own.is_some() && self.gossip_republish_at.is_none() {
                    let earliest = self
                        .gossip_republished
                        .map_or(Instant::now(), |at| at + GOSSIP_REPUBLISH_MIN_INTERVAL);
                    self.gossip_republish_at =
                        Some(earliest.max(Instant::now() + GOSSIP_REPUBLISH_DEBOUNCE));
                }
            }
            _ => {}
        }
    }

    /// A record `from` handed us via `via` was refused for `reason`: tell
    /// subscribers (and metrics), and count it towards `from`'s ban when no
    /// honest node would have passed it on.
    pub(super) fn reject(&mut self, from: Option<PeerId>, via: RecordVia, reason: RejectReason) {
        let counted = from
            .filter(|p| *p != self.local_peer)
            .and_then(|peer| Some((peer, self.invalid.count(peer, &reason)?)));
        self.emit(Event::Rejected {
            peer: from,
            via,
            reason: reason.clone(),
        });
        if let Some((peer, invalid_records)) = counted {
            self.emit(Event::Misbehaving {
                peer,
                invalid_records,
                reason,
            });
        }
    }

    /// Drop expired records (their services leave every answer at once;
    /// this tells subscribers).
    pub(super) fn expire_records(&mut self) {
        self.clocks.expire();
        self.invalid.expire();
        let gone = self.cache.expire(unix_ms());
        if gone.is_empty() {
            return;
        }
        let peers: HashSet<PeerId> = gone.iter().map(|c| c.peer).collect();
        for peer in peers {
            if self.cache.get(&peer).is_none() {
                self.peer_health.remove(&peer);
                self.service_health.retain(|(p, _), _| *p != peer);
            }
        }
        self.emit(Event::Expired(gone));
        self.emit_counts();
    }
}
