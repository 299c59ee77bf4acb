//! The reservation state machine (`ollamacron_nat::reservations`) on the
//! paths the behaviour takes per event: every `poll` asks it for actions,
//! every relay answer (accepted, renewed, closed) updates one target and is
//! followed by another poll, and identify feeds it relay candidates that a
//! poll promotes when no relay is configured.
//!
//! Ids read `reservations/<path>/<size>`, e.g.
//! `reservations/accept_and_renew/8_relays`.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use libp2p::core::transport::ListenerId;
use libp2p::{Multiaddr, PeerId};
use ollamacron_nat::reservations::{ReservationAction, Reservations};
use tokio::time::Instant;

/// Configured relays: one, a generous operator list, and far more than any.
const RELAY_COUNTS: [usize; 3] = [1, 8, 64];
/// Discovered relay candidates: a small swarm, and the most the state keeps.
const CANDIDATE_COUNTS: [usize; 2] = [16, 256];
/// The crate's defaults (`Config::default()`).
const MAX_DISCOVERED_RELAYS: usize = 2;
const MAX_DISCOVERED_RELAY_FAILURES: u32 = 3;
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Hosts in the documentation range 203.0.113.0/24 used for relay addresses.
const DOC_RANGE_HOSTS: usize = 254;

/// A direct relay address without `/p2p` (as identify reports it).
fn direct_address(i: usize) -> Multiaddr {
    format!("/ip4/203.0.113.{}/tcp/4001", i % DOC_RANGE_HOSTS + 1)
        .parse()
        .unwrap_or_else(|_| Multiaddr::empty())
}

/// `n` configured relay addresses, each ending in `/p2p/<relay>`.
fn configured_relays(n: usize) -> Vec<Multiaddr> {
    (0..n)
        .map(|i| {
            direct_address(i)
                .with_p2p(PeerId::random())
                .unwrap_or_else(|a| a)
        })
        .collect()
}

fn reservations(configured: &[Multiaddr]) -> Reservations {
    let mut r = Reservations::new(
        configured,
        MAX_DISCOVERED_RELAYS,
        MAX_DISCOVERED_RELAY_FAILURES,
        BACKOFF_INITIAL,
        BACKOFF_MAX,
    );
    let _ = r.set_wanted(true);
    r
}

/// Open a listener for every `Listen` action, as the behaviour does;
/// returns the relays and their listener ids.
fn listen_all(r: &mut Reservations, now: Instant) -> Vec<(PeerId, ListenerId)> {
    let (actions, _) = r.poll_actions(now);
    actions
        .into_iter()
        .filter_map(|action| match action {
            ReservationAction::Listen { relay, .. } => {
                let id = ListenerId::next();
                r.listening(&relay, id);
                Some((relay, id))
            }
            ReservationAction::Close { .. } => None,
        })
        .collect()
}

/// Every relay holds an accepted reservation.
fn held(n: usize, now: Instant) -> (Reservations, Vec<(PeerId, ListenerId)>) {
    let mut r = reservations(&configured_relays(n));
    let listeners = listen_all(&mut r, now);
    for (relay, _) in &listeners {
        r.accepted(relay);
    }
    (r, listeners)
}

fn bench_reservations(c: &mut Criterion) {
    let mut group = c.benchmark_group("reservations");
    let now = Instant::now();

    for n in RELAY_COUNTS {
        let id = BenchmarkId::new("poll_idle", format!("{n}_relays"));
        // Every behaviour poll: nothing to do, all reservations held.
        let (mut r, _) = held(n, now);
        group.bench_function(id, |b| b.iter(|| black_box(r.poll_actions(black_box(now)))));
    }

    for n in RELAY_COUNTS {
        let id = BenchmarkId::new("accept_and_renew", format!("{n}_relays"));
        let relays = configured_relays(n);
        group.bench_with_input(id, &relays, |b, relays| {
            b.iter_batched(
                || reservations(relays),
                |mut r| {
                    // Request all, then each acceptance and each renewal is
                    // one event followed by one poll.
                    let listeners = listen_all(&mut r, now);
                    for (relay, _) in &listeners {
                        r.accepted(relay);
                        black_box(r.poll_actions(now));
                    }
                    for (relay, _) in &listeners {
                        r.accepted(relay);
                        black_box(r.poll_actions(now));
                    }
                    black_box(r.active());
                    r
                },
                BatchSize::SmallInput,
            );
        });
    }

    for n in RELAY_COUNTS {
        let id = BenchmarkId::new("close_and_backoff", format!("{n}_relays"));
        group.bench_function(id, |b| {
            b.iter_batched(
                || held(n, now),
                |(mut r, listeners)| {
                    // Every reservation is lost: find its relay, back off,
                    // and poll for the next retry deadline.
                    for (_, listener) in &listeners {
                        black_box(r.closed(*listener, now));
                        black_box(r.poll_actions(now));
                    }
                    r
                },
                BatchSize::SmallInput,
            );
        });
    }

    for n in CANDIDATE_COUNTS {
        let id = BenchmarkId::new("discover_and_promote", format!("{n}_candidates"));
        let candidates: Vec<(PeerId, Multiaddr)> = (0..n)
            .map(|i| (PeerId::random(), direct_address(i)))
            .collect();
        group.bench_with_input(id, &candidates, |b, candidates| {
            b.iter_batched(
                || reservations(&[]),
                |mut r| {
                    // Identify reports relays; a poll picks some at random
                    // and requests reservations on them.
                    for (peer, address) in candidates {
                        r.add_candidate(*peer, address.clone(), now);
                    }
                    black_box(listen_all(&mut r, now));
                    r
                },
                BatchSize::SmallInput,
            );
        });
    }

    group.finish();
}

criterion_group!(benches, bench_reservations);
criterion_main!(benches);
