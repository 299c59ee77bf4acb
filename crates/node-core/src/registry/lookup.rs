//! Ranked lookups: answered from the verified cache when it can, else
//! after a DHT walk for the providers of the query's key and a fetch of
//! each provider's record (bounded, queued, at most `lookup_timeout`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use ollamacron_discovery_dht::{self as dht, QueryId, Record, RecordKey};
use ollamacron_service_registry::{
    Accepted, Candidate, QualityInputs, RankedService, ServiceQuery, rank_services,
};
use tokio::sync::oneshot;

use super::keys::{
    capability_key, model_key, namespace_key, node_record_page_key, service_type_key,
};
use super::{Behaviour, Event, unix_ms};
use crate::event::RecordVia;

/// A lookup answered from the cache starts a walk in the background when
/// the last walk for its key is this old (or `lookup_cache_fresh`, if
/// shorter): record sync keeps the cache current, and the walk finds what
/// sync missed.
const REVALIDATE_AFTER: Duration = Duration::from_secs(30);
/// Most providers of one walk whose records are fetched.
const MAX_PROVIDERS_PER_WALK: usize = 256;
/// Most records waiting to be fetched.
const MAX_FETCH_QUEUE: usize = 1024;
/// Most keys whose last walk time is remembered.
const MAX_WALKED_KEYS: usize = 1024;
/// Most record fetches (`get_record` walks) at once; more wait their turn.
const MAX_CONCURRENT_FETCHES: usize = 32;
/// Most lookups waiting for the DHT at once; more are answered from the cache.
const MAX_PENDING_LOOKUPS: usize = 256;

/// A lookup waiting for the DHT.
pub(super) struct PendingLookup {
    key: RecordKey,
    query: ServiceQuery,
    reply: oneshot::Sender<Vec<RankedService>>,
    pub(super) deadline: Instant,
    walk_done: bool,
    /// Record pages being fetched for it.
    outstanding: HashSet<(PeerId, u16)>,
}

/// The DHT key a lookup walks: the model's (exact), else the type's, else
/// the first capability's, else the namespace (every node).
fn lookup_key(query: &ServiceQuery) -> RecordKey {
    if let Some(model) = &query.model {
        return model_key(model);
    }
    match (&query.service_type, query.capabilities.first()) {
        (Some(t), _) => service_type_key(t),
        (None, Some(c)) => capability_key(c),
        (None, None) => namespace_key(),
    }
}

fn since(at_ms: Option<u64>, now_ms: u64) -> Option<Duration> {
    at_ms.map(|at| Duration::from_millis(now_ms.saturating_sub(at)))
}

impl Behaviour {
    /// Answer `query` from the verified cache at once when it has matching
    /// services or a walk for the key finished within `lookup_cache_fresh`,
    /// walking again in the background when the last walk is older than
    /// `REVALIDATE_AFTER`; only when the cache has nothing and no fresh walk
    /// does the answer wait for the DHT walk (at most `lookup_timeout`).
    pub(crate) fn find_services(
        &mut self,
        query: ServiceQuery,
        reply: oneshot::Sender<Vec<RankedService>>,
    ) {
        let key = lookup_key(&query);
        let age = self.walked_at.get(&key).map(Instant::elapsed);
        let fresh = age.is_some_and(|a| a < self.lookup_cache_fresh);
        let revalidate_after = REVALIDATE_AFTER.min(self.lookup_cache_fresh);
        let answer = self.rank(&query);
        if self.dht().is_none()
            || fresh
            || !answer.is_empty()
            || self.lookups.len() >= MAX_PENDING_LOOKUPS
        {
            // Not while the DHT is settling: a joining node learns the
            // records of the mesh from its neighbours then.
            let settled = self.dht().is_some_and(dht::Behaviour::has_announced);
            if settled && age.is_none_or(|a| a >= revalidate_after) {
                self.start_walk(&key);
            }
            self.emit(Event::LookupAnswered { how: "cache" });
            let _ = reply.send(answer);
            return;
        }
        self.start_walk(&key);
        self.lookups.push(PendingLookup {
            key,
            query,
            reply,
            deadline: Instant::now() + self.lookup_timeout,
            walk_done: false,
            outstanding: HashSet::new(),
        });
    }

    fn start_walk(&mut self, key: &RecordKey) {
        if self.walks.values().any(|k| k == key) {
            return;
        }
        if let Some(dht) = self.inner.dht.as_mut() {
            let id = dht.get_providers(key.clone());
            self.walks.insert(id, key.clone());
        }
    }

    /// Answer every lookup whose record fetches are done and whose walk is
    /// done or already found a match, or whose deadline passed (with what
    /// it has); `all` answers every one (shutdown).
    pub(crate) fn answer_lookups(&mut self, all: bool) {
        let now = Instant::now();
        let mut waiting = Vec::new();
        for lookup in std::mem::take(&mut self.lookups) {
            let settled = lookup.outstanding.is_empty();
            // With no fetch in flight, a lookup answers once the walk is
            // done or, before that, as soon as a verified record matches:
            // the walk goes on and later lookups see what else it finds.
            let answer = (all || settled || lookup.deadline <= now)
                .then(|| self.rank(&lookup.query))
                .filter(|answer| {
                    all || lookup.deadline <= now || lookup.walk_done || !answer.is_empty()
                });
            match answer {
                Some(answer) => {
                    let how = match (settled, lookup.walk_done) {
                        (true, true) => "walk",
                        (true, false) if !answer.is_empty() => "first_match",
                        _ => "deadline",
                    };
                    self.emit(Event::LookupAnswered { how });
                    let _ = lookup.reply.send(answer);
                }
                None => waiting.push(lookup),
            }
        }
        self.lookups = waiting;
    }

    /// Every matching service we know — ours and those of unexpired
    /// verified records — scored on what we measured, best first.
    fn rank(&self, query: &ServiceQuery) -> Vec<RankedService> {
        let now = unix_ms();
        let mut candidates = Vec::new();
        // Only matching services are cloned into candidates: with a
        // thousand records held, a model lookup (every gateway request)
        // scores a handful, not every service of the mesh.
        for service in self
            .local
            .iter()
            .filter(|s| query.matches(s, self.region.as_deref()))
        {
            let health = self
                .service_health
                .get(&(self.local_peer, service.id.clone()));
            candidates.push(Candidate {
                service: service.clone(),
                region: self.region.clone(),
                inputs: QualityInputs {
                    measured_rtt: Some(Duration::ZERO),
                    measured_reliability: health.and_then(|h| h.window.ratio()),
                    advertised_reliability: service.reliability,
                    advertised_throughput: service.throughput,
                    since_last_good_check: health
                        .map_or(Some(Duration::ZERO), |h| since(h.last_good_ms, now)),
                    ..QualityInputs::default()
                },
                local: true,
            });
        }
        for (peer, cached) in self.cache.iter() {
            let record = &cached.record;
            if record.expires_at <= now {
                continue;
            }
            let peer_health = self.peer_health.get(peer);
            let path = self.paths.get(peer);
            let rtt = path.map(|(rtt, _)| *rtt);
            let rtt_via_relay = path.is_some_and(|(_, via_relay)| *via_relay);
            for service in record
                .services
                .iter()
                .filter(|s| query.matches(s, record.region.as_deref()))
            {
                let service_health = self.service_health.get(&(*peer, service.id.clone()));
                // A service with its own probe is judged by it; else by its node's.
                let health = service_health.or(peer_health);
                candidates.push(Candidate {
                    service: service.clone(),
                    region: record.region.clone(),
                    inputs: QualityInputs {
                        measured_rtt: rtt,
                        rtt_via_relay,
                        advertised_latency_ms: service.latency_ms,
                        measured_reliability: health.and_then(|h| h.window.ratio()),
                        advertised_reliability: service.reliability,
                        advertised_throughput: service.throughput,
                        since_last_good_check: health.and_then(|h| since(h.last_good_ms, now)),
                    },
                    local: false,
                });
            }
        }
        rank_services(candidates, query, &self.weights)
    }

    /// A walk found providers of `key`: fetch the records we lack.
    pub(super) fn on_walk_progress(&mut self, key: &RecordKey, providers: HashSet<PeerId>) {
        let now = unix_ms();
        let refresh_ms = u64::try_from(self.refresh_interval.as_millis()).unwrap_or(0);
        for provider in providers.into_iter().take(MAX_PROVIDERS_PER_WALK) {
            if provider == self.local_peer {
                continue;
            }
            // A record we hold that is not past its owner's refresh is current.
            let current = self
                .cache
                .get(&provider)
                .is_some_and(|c| c.record.issued_at.saturating_add(refresh_ms) > now);
            if current {
                continue;
            }
            if self.queue_fetch(provider, 0) {
                for lookup in self.lookups.iter_mut().filter(|l| l.key == *key) {
                    lookup.outstanding.insert((provider, 0));
                }
            }
        }
    }

    /// Fetch page `page` of `owner`'s record (queued); false when the
    /// queue is full.
    fn queue_fetch(&mut self, owner: PeerId, page: u16) -> bool {
        let pending = self.fetch_queued.contains(&(owner, page))
            || self.fetches.values().any(|f| *f == (owner, page));
        if !pending {
            if self.fetch_queue.len() >= MAX_FETCH_QUEUE {
                return false;
            }
            self.fetch_queue.push_back((owner, page));
            self.fetch_queued.insert((owner, page));
            self.fetch_next();
        }
        true
    }

    /// Start queued fetches while fewer than `MAX_CONCURRENT_FETCHES` run.
    pub(super) fn fetch_next(&mut self) {
        while self.fetches.len() < MAX_CONCURRENT_FETCHES {
            let Some((owner, page)) = self.fetch_queue.pop_front() else {
                return;
            };
            self.fetch_queued.remove(&(owner, page));
            let Some(dht) = self.inner.dht.as_mut() else {
                return;
            };
            let id = dht.get_record(node_record_page_key(&owner, page));
            self.fetches.insert(id, (owner, page));
        }
    }

    pub(super) fn on_walk_done(&mut self, key: &RecordKey) {
        if self.walked_at.len() >= MAX_WALKED_KEYS {
            let fresh = self.lookup_cache_fresh;
            self.walked_at.retain(|_, at| at.elapsed() < fresh);
        }
        if self.walked_at.len() < MAX_WALKED_KEYS {
            self.walked_at.insert(key.clone(), Instant::now());
        }
        for lookup in self.lookups.iter_mut().filter(|l| l.key == *key) {
            lookup.walk_done = true;
        }
        self.answer_lookups(false);
    }

    /// A fetch found a record: one newer verified answer will do, so the
    /// fetch stops there.
    pub(super) fn on_fetch_progress(
        &mut self,
        query: QueryId,
        (owner, page): (PeerId, u16),
        record: &Record,
        from: Option<PeerId>,
    ) {
        if record.key != node_record_page_key(&owner, page) {
            return;
        }
        let newer = matches!(
            self.accept_record(owner, &record.value, RecordVia::Get, from, None),
            Ok(Accepted::Stored { .. })
        );
        if newer {
            if let Some(dht) = self.inner.dht.as_mut() {
                dht.finish_query(query);
            }
            self.on_fetch_done(owner, page);
        }
    }

    /// A fetch of `owner`'s page ended. After page 0, the other pages of
    /// its record that we hold older (or not at all) are fetched too, and
    /// the lookups waiting for page 0 wait for them.
    pub(super) fn on_fetch_done(&mut self, owner: PeerId, page: u16) {
        if page == 0
            && let Some(held) = self.cache.get(&owner)
        {
            let sequence = held.record.sequence;
            let missing: Vec<u16> = (1..held.record.pages)
                .filter(|p| {
                    self.cache
                        .held_page_sequence(&owner, *p)
                        .is_none_or(|s| s < sequence)
                })
                .collect();
            for more in missing {
                if self.queue_fetch(owner, more) {
                    for lookup in &mut self.lookups {
                        if lookup.outstanding.contains(&(owner, 0)) {
                            lookup.outstanding.insert((owner, more));
                        }
                    }
                }
            }
        }
        for lookup in &mut self.lookups {
            lookup.outstanding.remove(&(owner, page));
        }
        self.answer_lookups(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_walk_the_most_specific_key() {
        let by_type = ServiceQuery {
            service_type: Some("llm".into()),
            capabilities: vec!["vision".into()],
            ..ServiceQuery::default()
        };
        assert_eq!(lookup_key(&by_type), service_type_key("llm"));
        let by_capability = ServiceQuery {
            capabilities: vec!["vision".into()],
            ..ServiceQuery::default()
        };
        assert_eq!(lookup_key(&by_capability), capability_key("vision"));
        assert_eq!(lookup_key(&ServiceQuery::default()), namespace_key());
        let by_model = ServiceQuery {
            model: Some("llama3".into()),
            ..by_type
        };
        assert_eq!(lookup_key(&by_model), model_key("llama3:latest"));
    }
}
