//! What one session may send through its worker (`server.sessionLimits`): every event is checked
//! here before it is numbered, stored or fanned out.
//!
//! The worker runs the session's commands and is not trusted, so its volume is capped by the
//! supervisor rather than by the agent loop's good manners: events per second (a token bucket
//! holding one second's worth), bytes per event, and bytes stored per session. The stored total
//! itself is kept by the session (it outlives any one worker); this budget only compares.

use std::time::Instant;

use crate::config::SessionLimits;

/// A limit a session went past. Its text is what the run's closing error event says, naming the
/// configuration key an operator would raise.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitExceeded {
    #[error(
        "the session sent more than {0} events per second (limit server.sessionLimits.eventsPerSecond)"
    )]
    EventRate(u64),
    #[error(
        "the session sent an event of {len} bytes, over the limit of {limit} bytes (limit server.sessionLimits.eventBytes)"
    )]
    EventBytes { len: usize, limit: u64 },
    #[error(
        "the session's stored events reached the limit of {0} bytes (limit server.sessionLimits.storedBytes)"
    )]
    StoredBytes(u64),
}

impl LimitExceeded {
    /// The key under `server.sessionLimits`, for event details and logs.
    pub fn key(&self) -> &'static str {
        match self {
            Self::EventRate(_) => "eventsPerSecond",
            Self::EventBytes { .. } => "eventBytes",
            Self::StoredBytes(_) => "storedBytes",
        }
    }

    /// The configured value that was exceeded.
    pub fn limit(&self) -> u64 {
        match self {
            Self::EventRate(limit) | Self::StoredBytes(limit) => *limit,
            Self::EventBytes { limit, .. } => *limit,
        }
    }
}

/// One worker's allowance, checked on every event it sends.
pub(super) struct EventBudget {
    per_second: u64,
    /// Events that may still be sent at once; refilled at `per_second`, up to `per_second`.
    tokens: f64,
    refilled: Instant,
    event_bytes: u64,
    stored_bytes: u64,
}

impl EventBudget {
    pub(super) fn new(limits: &SessionLimits) -> Self {
        Self::starting_at(limits, Instant::now())
    }

    fn starting_at(limits: &SessionLimits, now: Instant) -> Self {
        Self {
            per_second: limits.events_per_second,
            tokens: limits.events_per_second as f64,
            refilled: now,
            event_bytes: limits.event_bytes.0,
            stored_bytes: limits.stored_bytes.0,
        }
    }

    /// Admits one event of `len` bytes. `stored_so_far` is the session's stored total. Every
    /// event counts against it with its full length: a streaming delta is not stored as such,
    /// but its text is (the live run's text, see `crate::live_text`), and its length bounds that.
    ///
    /// # Errors
    /// The first limit the event would exceed.
    pub(super) fn admit(&mut self, len: usize, stored_so_far: u64) -> Result<(), LimitExceeded> {
        self.admit_at(len, stored_so_far, Instant::now())
    }

    fn admit_at(
        &mut self,
        len: usize,
        stored_so_far: u64,
        now: Instant,
    ) -> Result<(), LimitExceeded> {
        self.check_size(len)?;
        let rate = self.per_second as f64;
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(rate);
        self.refilled = now;
        if self.tokens < 1.0 {
            return Err(LimitExceeded::EventRate(self.per_second));
        }
        self.tokens -= 1.0;
        if stored_so_far.saturating_add(len as u64) > self.stored_bytes {
            return Err(LimitExceeded::StoredBytes(self.stored_bytes));
        }
        Ok(())
    }

    /// Checks the size of something the worker sends that is not an event of its own (a run's
    /// result, a copy of its final message).
    ///
    /// # Errors
    /// [`LimitExceeded::EventBytes`].
    pub(super) fn check_size(&self, len: usize) -> Result<(), LimitExceeded> {
        if len as u64 > self.event_bytes {
            return Err(LimitExceeded::EventBytes {
                len,
                limit: self.event_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::isolation::ByteSize;

    fn limits(per_second: u64, event_bytes: u64, stored_bytes: u64) -> SessionLimits {
        SessionLimits {
            events_per_second: per_second,
            event_bytes: ByteSize(event_bytes),
            stored_bytes: ByteSize(stored_bytes),
        }
    }

    #[test]
    fn a_burst_of_one_second_passes_and_the_rate_refills() {
        let start = Instant::now();
        let mut budget = EventBudget::starting_at(&limits(100, 1024, 1 << 20), start);
        for _ in 0..100 {
            budget.admit_at(10, 0, start).unwrap();
        }
        assert_eq!(
            budget.admit_at(10, 0, start),
            Err(LimitExceeded::EventRate(100))
        );
        // A tenth of a second later, ten more.
        let later = start + Duration::from_millis(100);
        for _ in 0..10 {
            budget.admit_at(10, 0, later).unwrap();
        }
        assert!(budget.admit_at(10, 0, later).is_err());
        // A long pause refills one second's worth, no more.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..100 {
            budget.admit_at(10, 0, much_later).unwrap();
        }
        assert!(budget.admit_at(10, 0, much_later).is_err());
    }

    #[test]
    fn event_and_stored_sizes_are_capped() {
        let now = Instant::now();
        let mut budget = EventBudget::starting_at(&limits(1000, 1024, 4096), now);
        budget.admit_at(1024, 0, now).unwrap();
        let too_big = budget.admit_at(1025, 0, now).unwrap_err();
        assert_eq!(
            too_big,
            LimitExceeded::EventBytes {
                len: 1025,
                limit: 1024
            }
        );
        assert_eq!(too_big.key(), "eventBytes");
        assert!(
            too_big
                .to_string()
                .contains("server.sessionLimits.eventBytes")
        );
        budget.admit_at(1000, 3096, now).unwrap();
        let full = budget.admit_at(1000, 3097, now).unwrap_err();
        assert_eq!(full, LimitExceeded::StoredBytes(4096));
        assert_eq!((full.key(), full.limit()), ("storedBytes", 4096));
    }
}
