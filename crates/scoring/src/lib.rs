#![doc = include_str!("../README.md")]

mod window;

use std::cmp::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use window::ReliabilityWindow;

/// A latency at or above this normalises to 0 (`1 - ms / 1000`, clamped).
pub const LATENCY_ZERO_SCORE: Duration = Duration::from_secs(1);
/// Advertised throughput at or above this normalises to 1 (`min(x / 1e6, 1)`).
pub const THROUGHPUT_FULL_SCORE: f64 = 1_000_000.0;
/// A last good health check younger than this keeps availability at 1.
pub const AVAILABILITY_FRESH: Duration = Duration::from_secs(300);
/// Past [`AVAILABILITY_FRESH`], availability falls linearly to 0 over this long.
pub const AVAILABILITY_DECAY: Duration = Duration::from_secs(300);
/// The value of a component nothing is known about — neither measured nor
/// advertised: the midpoint, so the unknown neither beats nor loses to a
/// measured peer of middling quality.
pub const UNKNOWN_COMPONENT: f64 = 0.5;

/// How much each component counts. Validated: finite, non-negative, and
/// not all zero; the score divides by their sum, so only ratios matter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreWeights {
    /// Weight of reliability (share of good health probes).
    pub reliability: f64,
    /// Weight of latency (ping RTT).
    pub latency: f64,
    /// Weight of advertised throughput.
    pub throughput: f64,
    /// Weight of availability (age of the last good health probe).
    pub availability: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            reliability: 0.4,
            latency: 0.3,
            throughput: 0.2,
            availability: 0.1,
        }
    }
}

/// Why a set of weights is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightsError {
    /// A weight is negative, NaN or infinite.
    #[error("score weight {name} ({value}) must be a finite number >= 0")]
    Invalid {
        /// Which weight.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// Every weight is zero.
    #[error("score weights must not all be 0")]
    AllZero,
}

impl ScoreWeights {
    /// Check the weights.
    ///
    /// # Errors
    /// [`WeightsError`] naming the bad weight.
    pub fn validate(&self) -> Result<(), WeightsError> {
        for (name, value) in self.named() {
            if !value.is_finite() || value < 0.0 {
                return Err(WeightsError::Invalid { name, value });
            }
        }
        if self.sum() <= 0.0 {
            return Err(WeightsError::AllZero);
        }
        Ok(())
    }

    fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("reliability", self.reliability),
            ("latency", self.latency),
            ("throughput", self.throughput),
            ("availability", self.availability),
        ]
    }

    fn sum(&self) -> f64 {
        self.reliability + self.latency + self.throughput + self.availability
    }
}

/// What is known about one service's quality. Measured values (by this
/// node, the observer) win over advertised ones (taken on trust).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityInputs {
    /// Ping round-trip time to the serving peer. Over a relay this is the
    /// relay path's RTT: it ranks the peer lower, never hides it.
    pub measured_rtt: Option<Duration>,
    /// `measured_rtt` was measured through a relay (no direct connection
    /// yet): it scores as measured, but no latency bound filters on it.
    pub rtt_via_relay: bool,
    /// Latency the service advertises, in milliseconds.
    pub advertised_latency_ms: Option<f64>,
    /// Share of recent health probes that succeeded, in [0, 1].
    pub measured_reliability: Option<f64>,
    /// Reliability the service advertises, in [0, 1].
    pub advertised_reliability: Option<f64>,
    /// Throughput the service advertises (capped at [`THROUGHPUT_FULL_SCORE`]).
    pub advertised_throughput: Option<f64>,
    /// Time since the last successful health probe; `None` if there was none.
    pub since_last_good_check: Option<Duration>,
}

/// A score and its parts, each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreBreakdown {
    /// Reliability component.
    pub reliability: f64,
    /// Latency component.
    pub latency: f64,
    /// Throughput component.
    pub throughput: f64,
    /// Availability component.
    pub availability: f64,
    /// Weighted total.
    pub total: f64,
}

/// Clamp to [0, 1]; NaN counts as the worst.
fn unit(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// Latency component: `1 - ms / 1000`, clamped; measured RTT first.
#[must_use]
pub fn latency_component(inputs: &QualityInputs) -> f64 {
    let zero_ms = LATENCY_ZERO_SCORE.as_secs_f64() * 1000.0;
    match (inputs.measured_rtt, inputs.advertised_latency_ms) {
        (Some(rtt), _) => unit(1.0 - rtt.as_secs_f64() * 1000.0 / zero_ms),
        (None, Some(ms)) if ms.is_nan() => 0.0,
        (None, Some(ms)) => unit(1.0 - ms / zero_ms),
        (None, None) => UNKNOWN_COMPONENT,
    }
}

/// Reliability component: the measured share of good probes, else the
/// advertised value, clamped.
#[must_use]
pub fn reliability_component(inputs: &QualityInputs) -> f64 {
    match (inputs.measured_reliability, inputs.advertised_reliability) {
        (Some(r), _) | (None, Some(r)) => unit(r),
        (None, None) => UNKNOWN_COMPONENT,
    }
}

/// Throughput component: `min(x / 1e6, 1)`, negative or NaN counting as 0.
#[must_use]
pub fn throughput_component(inputs: &QualityInputs) -> f64 {
    inputs
        .advertised_throughput
        .map_or(UNKNOWN_COMPONENT, |x| unit(x / THROUGHPUT_FULL_SCORE))
}

/// Availability component: 1 while the last good health check is younger
/// than 5 min, then falling linearly to 0 over the next 5 min; 0 when no
/// check ever succeeded.
#[must_use]
pub fn availability_component(inputs: &QualityInputs) -> f64 {
    let Some(age) = inputs.since_last_good_check else {
        return 0.0;
    };
    match age.checked_sub(AVAILABILITY_FRESH) {
        None => 1.0,
        Some(stale) => unit(1.0 - stale.as_secs_f64() / AVAILABILITY_DECAY.as_secs_f64()),
    }
}

/// The weighted score of `inputs`. Invalid weights (see
/// [`ScoreWeights::validate`]) fall back to the defaults, so a score is
/// always a finite number in [0, 1].
#[must_use]
pub fn score(inputs: &QualityInputs, weights: &ScoreWeights) -> ScoreBreakdown {
    let weights = if weights.validate().is_ok() {
        *weights
    } else {
        ScoreWeights::default()
    };
    let reliability = reliability_component(inputs);
    let latency = latency_component(inputs);
    let throughput = throughput_component(inputs);
    let availability = availability_component(inputs);
    let weighted = weights.reliability * reliability
        + weights.latency * latency
        + weights.throughput * throughput
        + weights.availability * availability;
    ScoreBreakdown {
        reliability,
        latency,
        throughput,
        availability,
        total: unit(weighted / weights.sum()),
    }
}

/// Rank `items` best first: by score (higher first), then by `tie_key`
/// (smaller first) so equal scores order the same way every time, then keep
/// at most `limit`. Scores are computed once per item. With distinct tie
/// keys the result does not depend on the input order.
///
/// ```
/// use ollamacron_scoring::rank;
///
/// let services = vec![("peer-b", "svc-1", 0.9), ("peer-a", "svc-2", 0.9), ("peer-c", "svc-3", 0.95)];
/// let ranked = rank(services, |s| s.2, |s| (s.0, s.1), 2);
/// let ids: Vec<&str> = ranked.iter().map(|(s, _)| s.1).collect();
/// assert_eq!(ids, ["svc-3", "svc-2"]); // the tie at 0.9 goes to peer-a
/// ```
pub fn rank<T, K: Ord>(
    items: Vec<T>,
    score: impl Fn(&T) -> f64,
    tie_key: impl Fn(&T) -> K,
    limit: usize,
) -> Vec<(T, f64)> {
    rank_by(items, score, |a, b| tie_key(a).cmp(&tie_key(b)), limit)
}

/// [`rank`] with the tie-break as a comparison, so it can look at borrowed
/// fields (`a.peer.cmp(&b.peer)`) without building keys.
pub fn rank_by<T>(
    items: Vec<T>,
    score: impl Fn(&T) -> f64,
    tie_break: impl Fn(&T, &T) -> Ordering,
    limit: usize,
) -> Vec<(T, f64)> {
    let mut scored: Vec<(T, f64)> = items
        .into_iter()
        .map(|item| {
            let s = score(&item);
            (item, if s.is_nan() { f64::NEG_INFINITY } else { s })
        })
        .collect();
    let order = |a: &(T, f64), b: &(T, f64)| -> Ordering {
        b.1.total_cmp(&a.1).then_with(|| tie_break(&a.0, &b.0))
    };
    if limit < scored.len() {
        if limit == 0 {
            return Vec::new();
        }
        // Only the best `limit` need a full sort.
        scored.select_nth_unstable_by(limit - 1, order);
        scored.truncate(limit);
    }
    scored.sort_unstable_by(order);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn default_weights_follow_the_design() {
        let inputs = QualityInputs {
            measured_rtt: Some(Duration::from_millis(100)),
            measured_reliability: Some(0.5),
            advertised_throughput: Some(2_000_000.0),
            since_last_good_check: Some(Duration::from_secs(10)),
            ..QualityInputs::default()
        };
        let s = score(&inputs, &ScoreWeights::default());
        assert!(close(s.latency, 0.9));
        assert!(close(s.reliability, 0.5));
        assert!(close(s.throughput, 1.0));
        assert!(close(s.availability, 1.0));
        assert!(close(
            s.total,
            0.4 * 0.5 + 0.3 * 0.9 + 0.2 * 1.0 + 0.1 * 1.0
        ));
    }

    #[test]
    fn measurements_beat_advertisements() {
        let inputs = QualityInputs {
            measured_rtt: Some(Duration::from_millis(800)),
            advertised_latency_ms: Some(1.0),
            measured_reliability: Some(0.2),
            advertised_reliability: Some(1.0),
            ..QualityInputs::default()
        };
        assert!(close(latency_component(&inputs), 0.2));
        assert!(close(reliability_component(&inputs), 0.2));
        let advertised_only = QualityInputs {
            advertised_latency_ms: Some(250.0),
            advertised_reliability: Some(0.9),
            ..QualityInputs::default()
        };
        assert!(close(latency_component(&advertised_only), 0.75));
        assert!(close(reliability_component(&advertised_only), 0.9));
    }

    #[test]
    fn a_relayed_peer_ranks_lower_but_stays_ranked() {
        let direct = QualityInputs {
            measured_rtt: Some(Duration::from_millis(20)),
            ..QualityInputs::default()
        };
        let relayed = QualityInputs {
            measured_rtt: Some(Duration::from_millis(400)),
            ..QualityInputs::default()
        };
        let w = ScoreWeights::default();
        let (d, r) = (score(&direct, &w).total, score(&relayed, &w).total);
        assert!(r < d && r > 0.0, "{r} {d}");
    }

    #[test]
    fn availability_decays_after_five_minutes() {
        let at = |secs| QualityInputs {
            since_last_good_check: Some(Duration::from_secs(secs)),
            ..QualityInputs::default()
        };
        assert!(close(availability_component(&at(299)), 1.0));
        assert!(close(availability_component(&at(450)), 0.5));
        assert!(close(availability_component(&at(600)), 0.0));
        assert!(close(
            availability_component(&QualityInputs::default()),
            0.0
        ));
    }

    #[test]
    fn weights_are_validated_and_only_ratios_matter() {
        let bad = ScoreWeights {
            latency: -1.0,
            ..ScoreWeights::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "score weight latency (-1) must be a finite number >= 0"
        );
        let zero = ScoreWeights {
            reliability: 0.0,
            latency: 0.0,
            throughput: 0.0,
            availability: 0.0,
        };
        assert_eq!(zero.validate(), Err(WeightsError::AllZero));
        let inputs = QualityInputs {
            measured_rtt: Some(Duration::from_millis(300)),
            measured_reliability: Some(0.7),
            ..QualityInputs::default()
        };
        let doubled = ScoreWeights {
            reliability: 0.8,
            latency: 0.6,
            throughput: 0.4,
            availability: 0.2,
        };
        assert!(close(
            score(&inputs, &doubled).total,
            score(&inputs, &ScoreWeights::default()).total
        ));
    }

    #[test]
    fn ranking_breaks_ties_by_key_and_limits_last() {
        let items = vec![("b", 0.5), ("a", 0.5), ("c", 0.9), ("d", f64::NAN)];
        let ranked: Vec<&str> = rank(items.clone(), |i| i.1, |i| i.0, 10)
            .into_iter()
            .map(|(i, _)| i.0)
            .collect();
        assert_eq!(ranked, ["c", "a", "b", "d"]);
        let top: Vec<&str> = rank(items, |i| i.1, |i| i.0, 2)
            .into_iter()
            .map(|(i, _)| i.0)
            .collect();
        assert_eq!(top, ["c", "a"]);
    }

    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            -2.0..2.0f64,
        ]
    }

    fn any_inputs() -> impl Strategy<Value = QualityInputs> {
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any_f64()),
            proptest::option::of(any_f64()),
            proptest::option::of(any_f64()),
            proptest::option::of(any_f64()),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(|(rtt, lat, mr, ar, tp, age, relayed)| QualityInputs {
                measured_rtt: rtt.map(Duration::from_nanos),
                rtt_via_relay: relayed,
                advertised_latency_ms: lat,
                measured_reliability: mr,
                advertised_reliability: ar,
                advertised_throughput: tp,
                since_last_good_check: age.map(Duration::from_millis),
            })
    }

    proptest! {
        #[test]
        fn score_is_finite_and_in_unit_range(
            inputs in any_inputs(),
            w in (any_f64(), any_f64(), any_f64(), any_f64()),
        ) {
            let weights = ScoreWeights { reliability: w.0, latency: w.1, throughput: w.2, availability: w.3 };
            let s = score(&inputs, &weights);
            for part in [s.reliability, s.latency, s.throughput, s.availability, s.total] {
                prop_assert!(part.is_finite() && (0.0..=1.0).contains(&part), "{s:?}");
            }
        }

        #[test]
        fn ranking_is_a_sorted_permutation_independent_of_input_order(
            scores in proptest::collection::vec(any_f64(), 0..200),
            limit in 0usize..250,
            seed in any::<u64>(),
        ) {
            let items: Vec<(usize, f64)> = scores.into_iter().enumerate().collect();
            let ranked = rank(items.clone(), |i| i.1, |i| i.0, usize::MAX);
            // A permutation of the input.
            let mut ids: Vec<usize> = ranked.iter().map(|(i, _)| i.0).collect();
            ids.sort_unstable();
            let n = items.len();
            prop_assert_eq!(ids, (0..n).collect::<Vec<_>>());
            // Sorted: score descending, then key ascending.
            for pair in ranked.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                prop_assert!(a.1.total_cmp(&b.1).is_gt() || (a.1.total_cmp(&b.1).is_eq() && a.0.0 < b.0.0));
            }
            // The same result from shuffled input, and `limit` keeps a prefix.
            let mut shuffled = items;
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let j = usize::try_from(state % (i as u64 + 1)).unwrap();
                shuffled.swap(i, j);
            }
            let again: Vec<usize> = rank(shuffled, |i| i.1, |i| i.0, limit).iter().map(|(i, _)| i.0).collect();
            let expected: Vec<usize> = ranked.iter().take(limit).map(|(i, _)| i.0).collect();
            prop_assert_eq!(again, expected);
        }
    }
}
