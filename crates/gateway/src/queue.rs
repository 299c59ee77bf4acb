//! The gateway's request queue: each serving node takes at most as many of
//! this gateway's requests at once as it advertises it serves for one
//! peer; a request that finds every node with its model full waits, in
//! arrival order, for the first slot that frees on any of them, as Ollama
//! queues a burst instead of refusing it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// A node a request may go to, and how many of our requests it takes at
/// once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    /// The serving peer (or this node).
    pub(crate) key: String,
    /// Our requests it takes at once.
    pub(crate) limit: usize,
}

/// Why a request was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueRefusal {
    /// The queue holds its maximum already.
    Full,
    /// No slot freed within the queue timeout.
    TimedOut,
}

/// Slots in use per node, and the requests waiting for one.
#[derive(Debug)]
pub(crate) struct RequestQueue {
    state: Mutex<QueueState>,
    max_waiting: usize,
}

#[derive(Debug, Default)]
struct QueueState {
    in_flight: HashMap<String, usize>,
    waiting: VecDeque<Waiter>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    choices: Vec<Choice>,
    grant: oneshot::Sender<Slot>,
}

/// One request's place on a node, given back when dropped (the next
/// waiter that can use that node then gets it).
#[derive(Debug)]
pub(crate) struct Slot {
    queue: Arc<RequestQueue>,
    key: String,
    /// False once the slot is given back by hand, under the lock.
    held: bool,
}

impl Slot {
    /// The node this slot is on.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.queue.release(&self.key);
        }
    }
}

/// A request's place in the queue, left when dropped.
struct Place<'a> {
    queue: &'a RequestQueue,
    ticket: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.queue
            .lock()
            .waiting
            .retain(|w| w.ticket != self.ticket);
    }
}

impl QueueState {
    /// The first of `choices` with a free slot.
    fn free(&self, choices: &[Choice]) -> Option<String> {
        choices
            .iter()
            .find(|c| self.in_flight.get(&c.key).copied().unwrap_or(0) < c.limit)
            .map(|c| c.key.clone())
    }

    fn take(&mut self, key: &str) {
        *self.in_flight.entry(key.to_owned()).or_default() += 1;
    }

    fn give_back(&mut self, key: &str) {
        if let Some(count) = self.in_flight.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.in_flight.remove(key);
            }
        }
    }
}

impl RequestQueue {
    /// A queue that holds at most `max_waiting` requests.
    pub(crate) fn new(max_waiting: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            max_waiting,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Our requests in flight on `key` now.
    pub(crate) fn in_flight(&self, key: &str) -> usize {
        self.lock().in_flight.get(key).copied().unwrap_or(0)
    }

    /// Requests waiting now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// A slot on the first of `choices` (in the caller's order of
    /// preference) that has one free; else wait, behind the requests
    /// that came earlier, at most `timeout`.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        choices: Vec<Choice>,
        timeout: Duration,
    ) -> Result<Slot, QueueRefusal> {
        let (ticket, granted) = {
            let mut state = self.lock();
            // A free slot is one no earlier waiter can use (each release
            // hands slots to the waiters first), so taking it keeps
            // arrival order.
            if let Some(key) = state.free(&choices) {
                state.take(&key);
                return Ok(self.slot(key));
            }
            if state.waiting.len() >= self.max_waiting {
                return Err(QueueRefusal::Full);
            }
            let (grant, granted) = oneshot::channel();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiting.push_back(Waiter {
                ticket,
                choices,
                grant,
            });
            (ticket, granted)
        };
        // Leaves the queue however the wait ends, the client going away
        // (this future dropped) included.
        let _place = Place {
            queue: self,
            ticket,
        };
        let mut granted = granted;
        match tokio::time::timeout(timeout, &mut granted).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(QueueRefusal::TimedOut),
            Err(_) => {
                self.lock().waiting.retain(|w| w.ticket != ticket);
                // A slot granted just as the wait ran out is used.
                granted.try_recv().map_err(|_| QueueRefusal::TimedOut)
            }
        }
    }

    fn slot(self: &Arc<Self>, key: String) -> Slot {
        Slot {
            queue: self.clone(),
            key,
            held: true,
        }
    }

    /// A slot on `key` is free again: hand slots to the waiters, in order,
    /// that can use them.
    fn release(self: &Arc<Self>, key: &str) {
        let mut state = self.lock();
        state.give_back(key);
        let mut i = 0;
        while i < state.waiting.len() {
            let Some(key) = state.free(&state.waiting[i].choices) else {
                i += 1;
                continue;
            };
            let Some(waiter) = state.waiting.remove(i) else {
                break;
            };
            state.take(&key);
            if let Err(mut slot) = waiter.grant.send(self.slot(key)) {
                // The waiter went away: the slot goes back, here, under
                // the lock (its drop must not take the lock again).
                slot.held = false;
                state.give_back(&slot.key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn choice(key: &str, limit: usize) -> Choice {
        Choice {
            key: key.to_owned(),
            limit,
        }
    }

    #[tokio::test]
    async fn slots_go_to_waiters_in_arrival_order_on_any_node() {
        let queue = RequestQueue::new(8);
        let both = vec![choice("a", 1), choice("b", 1)];
        let first = queue
            .acquire(both.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        let second = queue
            .acquire(both.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((first.key(), second.key()), ("a", "b"));
        let (q1, q2) = (queue.clone(), queue.clone());
        let (c1, c2) = (both.clone(), both.clone());
        let third = tokio::spawn(async move { q1.acquire(c1, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        while queue.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let fourth = tokio::spawn(async move { q2.acquire(c2, Duration::from_secs(5)).await });
        while queue.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        drop(second);
        let third = third.await.unwrap().unwrap();
        assert_eq!(
            third.key(),
            "b",
            "the earlier waiter gets the first free slot"
        );
        assert_eq!(queue.waiting(), 1);
        drop(first);
        assert_eq!(fourth.await.unwrap().unwrap().key(), "a");
        assert_eq!(
            queue.in_flight("a"),
            0,
            "dropped at the end of the statement"
        );
    }

    #[tokio::test]
    async fn a_request_that_goes_away_leaves_the_queue() {
        let queue = RequestQueue::new(1);
        let only = vec![choice("a", 1)];
        let held = queue
            .acquire(only.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        let q = queue.clone();
        let c = only.clone();
        let gone = tokio::spawn(async move { q.acquire(c, Duration::from_secs(5)).await });
        while queue.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(queue.waiting(), 0, "its place is free");
        drop(held);
        assert_eq!(queue.in_flight("a"), 0);
        assert!(queue.acquire(only, Duration::from_secs(5)).await.is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_and_a_timeout_refuse() {
        let queue = RequestQueue::new(1);
        let only = vec![choice("a", 1)];
        let _held = queue
            .acquire(only.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        let q = queue.clone();
        let c = only.clone();
        let waiting = tokio::spawn(async move { q.acquire(c, Duration::from_millis(200)).await });
        while queue.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queue
                .acquire(only.clone(), Duration::from_secs(5))
                .await
                .unwrap_err(),
            QueueRefusal::Full
        );
        assert_eq!(waiting.await.unwrap().unwrap_err(), QueueRefusal::TimedOut);
        assert_eq!(queue.waiting(), 0);
        assert_eq!(queue.in_flight("a"), 1);
    }
}
