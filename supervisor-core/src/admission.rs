//! Admission control: whether a run may start now. A run that needs a new worker commits that
//! worker's full limits (memory and processes, used or not), so admission counts them against
//! the sessions' totals and the worker slots before any process exists, and the host cannot be
//! overrun however the sessions behave.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::WorkerPolicy;
use crate::error::ApiError;
use crate::isolation::Isolation;
use crate::metrics::METRICS;
use crate::sessions::{Session, Sessions};

/// How long a run waits for a deleted session's worker to leave before it is refused: its
/// teardown kills it at once, so this is only ever reached by a worker that will not die.
const DYING_WORKER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The admission policy and its state.
pub struct Admission {
    policy: WorkerPolicy,
    isolation: Arc<Isolation>,
    /// Set by `ctl drain` and at SIGTERM: running runs finish, no new run starts.
    draining: AtomicBool,
    /// Workers admitted but not live yet (see [`Slot`]).
    starting: Arc<AtomicUsize>,
    /// Makes the count-and-reserve one step.
    lock: Mutex<()>,
}

/// A worker slot held from admission until the worker is live or its start failed, so that two
/// first queries racing for the last slot cannot both have it.
#[must_use = "the slot is released when this is dropped"]
pub struct Slot {
    starting: Option<Arc<AtomicUsize>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(starting) = &self.starting {
            starting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Admission {
    pub fn new(policy: WorkerPolicy, isolation: Arc<Isolation>) -> Self {
        Self {
            policy,
            isolation,
            draining: AtomicBool::new(false),
            starting: Arc::default(),
            lock: Mutex::new(()),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Refuses new runs (running ones finish), or takes them again.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Admission for a run of `session`: refused while draining; and when the session needs a
    /// new worker, refused with 429 if the host is short of memory, or if one more worker would
    /// take the sessions past a cap: the worker slots (`server.workers.max`), or the sum of the
    /// sessions' memory or process limits past `isolation.limits.totalMemory` / `totalPids`. An
    /// idle worker (least recently used first) is stopped to make room: it hibernates, and
    /// wakes on its next query with its history intact.
    ///
    /// # Errors
    /// `Draining`, or `Overloaded` with a retry delay and the cap that was reached.
    pub async fn admit(&self, sessions: &Sessions, session: &Session) -> Result<Slot, ApiError> {
        if self.is_draining() {
            return Err(ApiError::Draining);
        }
        if session.activity.has_worker() {
            return Ok(Slot { starting: None });
        }
        let policy = &self.policy;
        if let Some(available) = available_memory_mb()
            && available < policy.min_free_memory_mb
        {
            METRICS.admissions_refused.inc();
            return Err(ApiError::Overloaded {
                reason: format!(
                    "the host has {available} MiB of memory available, below the reserve of {} MiB",
                    policy.min_free_memory_mb
                ),
                retry_after_secs: 5,
            });
        }
        let totals = self.isolation.totals();
        let (memory, pids) = self.isolation.session_commitment();
        let by_memory = usize::try_from(totals.memory / memory.max(1)).unwrap_or(usize::MAX);
        let by_pids = usize::try_from(totals.pids / pids.max(1)).unwrap_or(usize::MAX);
        let cap = policy.max.min(by_memory).min(by_pids);
        loop {
            let committed = {
                let _one_at_a_time = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                // A deleted session's worker counts until its processes are gone.
                let committed = sessions.live_workers()
                    + sessions.teardowns().dying_workers()
                    + self.starting.load(Ordering::Acquire);
                if committed < cap {
                    self.starting.fetch_add(1, Ordering::AcqRel);
                    return Ok(Slot {
                        starting: Some(self.starting.clone()),
                    });
                }
                committed
            };
            let Some(victim) = sessions.least_recent_idle(&session.id) else {
                // A deleted session's worker is on its way out: its slot frees in milliseconds.
                if sessions
                    .teardowns()
                    .wait_for_dying_worker(DYING_WORKER_WAIT)
                    .await
                {
                    continue;
                }
                METRICS.admissions_refused.inc();
                let reason = if cap == by_memory && by_memory <= by_pids && by_memory < policy.max {
                    format!(
                        "the sessions' memory total is committed: {committed} workers × {} reach isolation.limits.totalMemory ({})",
                        shared::jail::human_bytes(memory),
                        shared::jail::human_bytes(totals.memory)
                    )
                } else if cap == by_pids && by_pids < policy.max {
                    format!(
                        "the sessions' process total is committed: {committed} workers × {pids} processes reach isolation.limits.totalPids ({})",
                        totals.pids
                    )
                } else {
                    format!("all {} worker slots are running queries", policy.max)
                };
                return Err(ApiError::Overloaded {
                    reason,
                    retry_after_secs: 2,
                });
            };
            tracing::info!(session_id = %victim.id, "hibernating the least recently used idle worker to make room");
            METRICS.hibernations.inc();
            victim.stop_worker().await;
        }
    }
}

/// `MemAvailable` of the host, if it can be read.
fn available_memory_mb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024)
}
