//! Per-session fan-out of numbered events to any number of followers.
//!
//! A broadcast channel would drop events for a follower that falls behind. Instead the bus keeps
//! the most recent events (deltas included) in a ring, and each follower keeps its own cursor and
//! reads from the ring at its own pace; a `watch` wakes followers when something new arrives. The
//! publisher never waits for a follower. A follower that falls out of the ring is told so
//! ([`Lagged`]) and catches up from storage (see `Session::follow`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::watch;

/// How many recent events a session keeps for followers, live deltas included.
const RING_CAPACITY: usize = 8192;

/// One numbered event as followers receive it.
#[derive(Debug, Clone)]
pub struct BusEvent {
    pub seq: u64,
    pub json: Arc<str>,
    /// This is an `agent_run_end`: a query's stream ends after it.
    pub ends_run: bool,
}

pub struct Bus {
    ring: Mutex<VecDeque<BusEvent>>,
    latest: watch::Sender<u64>,
    /// Where each live follower is, so trimming never drops what one has yet to read.
    followers: Mutex<Vec<Weak<AtomicU64>>>,
}

/// The follower asked for events that are no longer in the ring: everything with
/// `seq > after` and `seq < oldest` must come from storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged {
    pub after: u64,
    pub oldest: u64,
}

impl Bus {
    /// A bus whose next event will follow `last_seq`.
    pub fn new(last_seq: u64) -> Self {
        Self {
            ring: Mutex::new(VecDeque::new()),
            latest: watch::channel(last_seq).0,
            followers: Mutex::new(Vec::new()),
        }
    }

    /// The highest published `seq`.
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Adds an event (its `seq` is assigned by the session's single publisher) and wakes
    /// followers.
    pub fn publish(&self, event: BusEvent) {
        self.publish_all(std::iter::once(event));
    }

    /// Adds events in order and wakes followers once for all of them.
    pub fn publish_all(&self, events: impl IntoIterator<Item = BusEvent>) {
        let mut latest = None;
        {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            for event in events {
                if ring.len() == RING_CAPACITY {
                    ring.pop_front();
                }
                latest = Some(event.seq);
                ring.push_back(event);
            }
        }
        if let Some(seq) = latest {
            self.latest.send_replace(seq);
        }
    }

    /// A cursor positioned after `after`.
    pub fn follow_after(&self, after: u64) -> Cursor {
        let position = Arc::new(AtomicU64::new(after));
        let mut followers = self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        followers.retain(|f| f.strong_count() > 0);
        followers.push(Arc::downgrade(&position));
        Cursor {
            position,
            rx: self.latest.subscribe(),
        }
    }

    /// Drops all but the newest `keep` events, except those a live follower has yet to read.
    /// Called when a run ends: its deltas are then superseded by its stored
    /// `assistant_message`, and idle sessions should hold little; but a follower that was
    /// scheduled late (a query stream on a busy machine) must still get its run's deltas.
    pub fn trim(&self, keep: usize) {
        let slowest = {
            let mut followers = self
                .followers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            followers.retain(|f| f.strong_count() > 0);
            followers
                .iter()
                .filter_map(Weak::upgrade)
                .map(|p| p.load(Ordering::Acquire))
                .min()
        };
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(newest_cut) = ring.len().checked_sub(keep + 1).map(|i| ring[i].seq) else {
            return;
        };
        let cutoff = slowest.map_or(newest_cut, |slowest| slowest.min(newest_cut));
        let drop = ring.partition_point(|e| e.seq <= cutoff);
        ring.drain(..drop);
        let left = ring.len();
        ring.shrink_to(left.max(keep).max(16));
    }

    /// How many published events the slowest live follower has yet to read.
    pub fn max_follower_lag(&self) -> u64 {
        let latest = self.latest();
        let followers = self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        followers
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| latest.saturating_sub(p.load(Ordering::Acquire)))
            .max()
            .unwrap_or(0)
    }

    /// Events with `seq > after` that are still in the ring.
    fn read_after(&self, after: u64) -> Result<Vec<BusEvent>, Lagged> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        // An empty ring (a restored session, a trimmed one) holds nothing after `after`: all of
        // it is in storage.
        let oldest = ring.front().map_or_else(|| self.latest() + 1, |e| e.seq);
        if oldest > after + 1 {
            return Err(Lagged { after, oldest });
        }
        let start = ring.partition_point(|e| e.seq <= after);
        Ok(ring.range(start..).cloned().collect())
    }
}

/// One follower's position in a session's event sequence (shared with the bus, which reads
/// it when trimming).
pub struct Cursor {
    position: Arc<AtomicU64>,
    rx: watch::Receiver<u64>,
}

impl Cursor {
    fn after(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    fn set_after(&self, after: u64) {
        self.position.store(after, Ordering::Release);
    }

    /// Moves the cursor (after a catch-up from storage).
    pub fn skip_to(&mut self, after: u64) {
        self.set_after(self.after().max(after));
    }

    /// Waits for events after the cursor and returns them (at least one), advancing the cursor.
    /// `None` when the bus is gone (the session was deleted).
    pub async fn next_batch(&mut self, bus: &Bus) -> Option<Result<Vec<BusEvent>, Lagged>> {
        loop {
            let latest = *self.rx.borrow_and_update();
            if latest > self.after() {
                let batch = bus.read_after(self.after());
                if let Ok(events) = &batch {
                    match events.last() {
                        Some(last) => self.set_after(last.seq),
                        None => continue,
                    }
                }
                return Some(batch);
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> BusEvent {
        BusEvent {
            seq,
            json: format!("{{\"n\":{seq}}}").into(),
            ends_run: false,
        }
    }

    #[tokio::test]
    async fn followers_read_at_their_own_pace() {
        let bus = Bus::new(0);
        let mut early = bus.follow_after(0);
        bus.publish(ev(1));
        bus.publish(ev(2));
        let mut late = bus.follow_after(1);
        let batch = early.next_batch(&bus).await.unwrap().unwrap();
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        let batch = late.next_batch(&bus).await.unwrap().unwrap();
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
    }

    #[tokio::test]
    async fn a_batch_arrives_whole_and_in_order() {
        let bus = Bus::new(0);
        let mut cursor = bus.follow_after(0);
        bus.publish_all([ev(1), ev(2), ev(3)]);
        bus.publish_all([]);
        assert_eq!(bus.latest(), 3);
        let batch = cursor.next_batch(&bus).await.unwrap().unwrap();
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_follower_waits_for_the_next_event() {
        let bus = Arc::new(Bus::new(5));
        let mut cursor = bus.follow_after(5);
        let publisher = bus.clone();
        let task = tokio::spawn(async move {
            tokio::task::yield_now().await;
            publisher.publish(ev(6));
        });
        let batch = cursor.next_batch(&bus).await.unwrap().unwrap();
        assert_eq!(batch[0].seq, 6);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn falling_out_of_the_ring_is_reported() {
        let bus = Bus::new(0);
        let mut cursor = bus.follow_after(0);
        for seq in 1..=(RING_CAPACITY as u64 + 10) {
            bus.publish(ev(seq));
        }
        let lagged = cursor.next_batch(&bus).await.unwrap().unwrap_err();
        assert_eq!(
            lagged,
            Lagged {
                after: 0,
                oldest: 11
            }
        );
        cursor.skip_to(10);
        let batch = cursor.next_batch(&bus).await.unwrap().unwrap();
        assert_eq!(batch.first().map(|e| e.seq), Some(11));
        assert_eq!(batch.len(), RING_CAPACITY);
    }
    #[tokio::test]
    async fn trimming_spares_what_a_live_follower_has_not_read() {
        let bus = Bus::new(0);
        let mut late = bus.follow_after(0);
        let gone = bus.follow_after(0);
        for seq in 1..=10 {
            bus.publish(ev(seq));
        }
        drop(gone);
        late.skip_to(5);
        bus.trim(2);
        let batch = late.next_batch(&bus).await.unwrap().unwrap();
        assert_eq!(
            batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [6, 7, 8, 9, 10]
        );
        // Once it has read them, they go at the next trim.
        bus.trim(2);
        let mut fresh = bus.follow_after(0);
        assert_eq!(
            fresh.next_batch(&bus).await.unwrap().unwrap_err(),
            Lagged {
                after: 0,
                oldest: 9
            }
        );
    }

    #[tokio::test]
    async fn an_empty_ring_behind_the_latest_seq_sends_followers_to_storage() {
        let bus = Bus::new(7);
        let mut cursor = bus.follow_after(3);
        assert_eq!(
            cursor.next_batch(&bus).await.unwrap().unwrap_err(),
            Lagged {
                after: 3,
                oldest: 8
            }
        );

        let bus = Bus::new(0);
        for seq in 1..=10 {
            bus.publish(ev(seq));
        }
        bus.trim(2);
        let mut cursor = bus.follow_after(5);
        assert_eq!(
            cursor.next_batch(&bus).await.unwrap().unwrap_err(),
            Lagged {
                after: 5,
                oldest: 9
            }
        );
    }
}
