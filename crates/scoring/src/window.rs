//! Reliability from the outcomes of recent health probes.

use std::collections::VecDeque;

/// The last `capacity` health-probe outcomes of one service; the share that
/// succeeded is its measured reliability.
///
/// ```
/// use ollamacron_scoring::ReliabilityWindow;
///
/// let mut window = ReliabilityWindow::new(4);
/// assert_eq!(window.ratio(), None);
/// for ok in [true, true, false, true, true] {
///     window.record(ok);
/// }
/// // Only the last four count: true, false, true, true.
/// assert_eq!(window.ratio(), Some(0.75));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReliabilityWindow {
    outcomes: VecDeque<bool>,
    capacity: usize,
}

impl ReliabilityWindow {
    /// Probes remembered by [`ReliabilityWindow::default`].
    pub const DEFAULT_CAPACITY: usize = 20;

    /// A window of the last `capacity` outcomes (at least one).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            outcomes: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Add one outcome, forgetting the oldest beyond the capacity.
    pub fn record(&mut self, success: bool) {
        if self.outcomes.len() == self.capacity {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(success);
    }

    /// Share of successes, or `None` before the first probe.
    #[must_use]
    pub fn ratio(&self) -> Option<f64> {
        if self.outcomes.is_empty() {
            return None;
        }
        let good = self.outcomes.iter().filter(|ok| **ok).count();
        let (good, total) = (
            u32::try_from(good).unwrap_or(u32::MAX),
            u32::try_from(self.outcomes.len()).unwrap_or(u32::MAX),
        );
        Some(f64::from(good) / f64::from(total))
    }
}

impl Default for ReliabilityWindow {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}
