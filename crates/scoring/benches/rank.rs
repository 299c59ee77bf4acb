//! Ranking cost: score and sort 10k and 100k candidate services (held in a
//! cache, ranked by reference), keeping the best 10 (a lookup) and all of
//! them (a full listing).

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ollamacron_scoring::{QualityInputs, ScoreWeights, rank, score};

struct Candidate {
    peer: String,
    service: String,
    inputs: QualityInputs,
}

/// Deterministic, varied candidates (a small xorshift, no I/O).
fn candidates(n: usize) -> Vec<Candidate> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|i| Candidate {
            peer: format!("12D3KooW{:020}", next() % 1000),
            service: format!("service-{i}"),
            inputs: QualityInputs {
                measured_rtt: Some(Duration::from_micros(next() % 500_000)),
                measured_reliability: Some((next() % 1000) as f64 / 1000.0),
                advertised_throughput: Some((next() % 2_000_000) as f64),
                since_last_good_check: Some(Duration::from_secs(next() % 900)),
                ..QualityInputs::default()
            },
        })
        .collect()
}

fn bench_rank(c: &mut Criterion) {
    let weights = ScoreWeights::default();
    let mut group = c.benchmark_group("rank");
    for n in [10_000usize, 100_000] {
        for (label, limit) in [("top10", 10usize), ("all", usize::MAX)] {
            // A lookup ranks references into its cache of services.
            let pool = candidates(n);
            group.bench_with_input(BenchmarkId::new(label, n), &pool, |b, pool| {
                b.iter(|| {
                    let items: Vec<&Candidate> = pool.iter().collect();
                    black_box(rank(
                        items,
                        |c| score(&c.inputs, &weights).total,
                        |c| (c.peer.as_str(), c.service.as_str()),
                        limit,
                    ))
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_rank);
criterion_main!(benches);
