//! One live session: its worker and its current run. A run starts here (the worker first, if
//! the session has none), ends at its `agent_run_end` or with its worker, and can be aborted;
//! the events in between go through `publish`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::events::RunStatus;
use shared::ids::{SessionId, now_ms};
use shared::protocol::{AbortReason, Query, ToWorker};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::publish::{Numbering, closing_events};
use crate::bus::Bus;
use crate::metrics::METRICS;
use crate::workers::{self, StopCause, WorkerHandle};

/// How long a worker gets to wind a run down after an abort before it is killed.
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// How long stopping a worker may take before we stop waiting for it.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a run (or a worker for one) could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("session {0} was deleted")]
    Closed(SessionId),
    #[error("session {0} is already running a query")]
    Busy(SessionId),
    #[error("session {session} has stored {limit} bytes, its limit")]
    StorageFull { session: SessionId, limit: u64 },
    #[error("the worker of session {session} is unavailable: {reason}")]
    WorkerUnavailable { session: SessionId, reason: String },
}

/// What [`Session::abort`] did. Nothing running is an expected outcome, not an error: upstream
/// answers it with `success: false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortOutcome {
    /// The worker was told to stop the run.
    Aborted,
    /// No run was in progress; the session's state, which the abort left as it was.
    NothingRunning(RunStatus),
}

/// What a non-streaming caller gets when its run ends.
#[derive(Debug)]
pub struct RunOutcome {
    /// The run result (JSON) the worker reported, if it got that far.
    pub result: Option<String>,
    /// Set when the run ended because its worker died.
    pub worker_lost: Option<String>,
}

pub(super) struct ActiveRun {
    run_id: String,
    started: Instant,
    model_requests: u32,
    result: Option<String>,
    worker_lost: Option<String>,
    waiter: Option<oneshot::Sender<RunOutcome>>,
}

pub(super) struct Inner {
    worker: Option<WorkerHandle>,
    pub(super) run: Option<ActiveRun>,
    status: RunStatus,
}

/// One live session.
pub struct Session {
    pub id: SessionId,
    pub workspace: PathBuf,
    /// The tenant owning it (its record's); quotas and model usage are counted against it.
    pub tenant: String,
    pub bus: Bus,
    /// What all sessions share: storage, workers, AGIO, the exclusive slot.
    pub(super) ctx: Arc<Context>,
    /// Sequence numbering; held while an event is stored, so numbering, storage order and
    /// fan-out order are the same.
    pub(super) publisher: tokio::sync::Mutex<Numbering>,
    pub(super) inner: tokio::sync::Mutex<Inner>,
    generations: AtomicU64,
    /// Woken when a run ends (after its status is set, before its `agent_run_end` goes out).
    run_ended: tokio::sync::Notify,
    /// Cancelled when the session is deleted.
    pub(super) closed: CancellationToken,
    /// Bytes the session has in storage, checked against `server.sessionLimits.storedBytes`:
    /// its events (their JSON), counted from the log when the session is restored, then as
    /// events are stored; and its live run's streamed text (see `live_text`). The live text
    /// counts too, though it is dropped when the run ends: a run may stream for as long as it
    /// likes, and what it streams is written to disk, so leaving it out would let one run fill
    /// the disk. It is counted from the moment a delta is staged, before its batch is written,
    /// so the limit sees every delta already admitted.
    pub(super) stored_bytes: AtomicU64,
    /// What admission control and the idle reaper need to know, readable without the session's
    /// lock (one session may stop another's worker to make room).
    pub activity: Activity,
}

/// Lock-free facts about a session's worker and runs.
#[derive(Default)]
pub struct Activity {
    worker_live: AtomicBool,
    running: AtomicBool,
    last_active_ms: AtomicU64,
}

impl Activity {
    pub fn has_worker(&self) -> bool {
        self.worker_live.load(Ordering::Acquire)
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Milliseconds since the epoch of the last run start or end.
    pub fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Release);
    }
}

impl Session {
    /// A live session whose log ends at `last_seq`, without a worker yet.
    pub(super) fn new(
        id: SessionId,
        workspace: PathBuf,
        tenant: String,
        last_seq: u64,
        ctx: Arc<Context>,
    ) -> Self {
        Self {
            id,
            workspace,
            tenant,
            bus: Bus::new(last_seq),
            ctx,
            publisher: tokio::sync::Mutex::new(Numbering::after(last_seq)),
            inner: tokio::sync::Mutex::new(Inner {
                worker: None,
                run: None,
                status: RunStatus::Idle,
            }),
            generations: AtomicU64::new(0),
            run_ended: tokio::sync::Notify::new(),
            closed: CancellationToken::new(),
            stored_bytes: AtomicU64::new(0),
            activity: Activity::default(),
        }
    }

    /// The agent status clients see (`idle`, `executing`, `aborted`, `error`).
    pub async fn status(&self) -> RunStatus {
        self.inner.lock().await.status
    }

    /// The status, but while a run executes, first waiting up to `within` for it to end.
    ///
    /// Why: the official UI sets its "running" flag from whichever status answer it reads
    /// last, also after it has seen the run's `agent_run_end` on the stream. An `executing`
    /// computed just before a short run ended, and read just after, would leave the UI
    /// "running" until a reload; an answer given after the run ended says `idle`.
    pub async fn settled_status(&self, within: Duration) -> RunStatus {
        let ended = self.run_ended.notified();
        let mut ended = std::pin::pin!(ended);
        // Registered before the status is read, so an end in between is not missed.
        ended.as_mut().enable();
        let status = self.status().await;
        if status != RunStatus::Executing {
            return status;
        }
        let _ = tokio::time::timeout(within, ended).await;
        self.status().await
    }

    /// The live worker, if any.
    pub async fn worker(&self) -> Option<WorkerHandle> {
        self.inner
            .lock()
            .await
            .worker
            .clone()
            .filter(WorkerHandle::is_alive)
    }

    pub async fn is_running(&self) -> bool {
        self.inner.lock().await.run.is_some()
    }

    /// Starts a run, starting the worker first if the session has none. Returns the receiver of
    /// the run's outcome. The caller has admitted the run (see `admission`).
    ///
    /// # Errors
    /// The session is deleted, busy or full, or no worker could be started.
    pub async fn start_run(
        self: &Arc<Self>,
        input: &Value,
        stream: bool,
    ) -> Result<oneshot::Receiver<RunOutcome>, RunError> {
        let mut inner = self.inner.lock().await;
        if self.closed.is_cancelled() {
            return Err(RunError::Closed(self.id.clone()));
        }
        if inner.run.is_some() {
            return Err(RunError::Busy(self.id.clone()));
        }
        // A full session starts nothing it could not record.
        let limit = self.ctx.stored_bytes_limit;
        if self.stored_bytes() >= limit {
            return Err(RunError::StorageFull {
                session: self.id.clone(),
                limit,
            });
        }
        let worker = match inner.worker.clone().filter(WorkerHandle::is_alive) {
            Some(worker) => worker,
            None => self.start_worker(&mut inner).await?,
        };
        let run_id = uuid::Uuid::new_v4().to_string();
        let (waiter, outcome) = oneshot::channel();
        let query = ToWorker::Query(Query {
            run_id: run_id.clone(),
            input: input.to_string(),
            stream,
        });
        if let Err(e) = worker.send(query).await {
            return Err(RunError::WorkerUnavailable {
                session: self.id.clone(),
                reason: e.to_string(),
            });
        }
        tracing::info!(session_id = %self.id, run_id = %run_id, stream, pid = worker.pid, "run started");
        inner.run = Some(ActiveRun {
            run_id,
            started: Instant::now(),
            model_requests: 0,
            result: None,
            worker_lost: None,
            waiter: Some(waiter),
        });
        inner.status = RunStatus::Executing;
        self.activity.running.store(true, Ordering::Release);
        self.activity.touch();
        METRICS.runs_started.inc();
        if self.ctx.exclusive_mode {
            self.ctx.exclusive.claim(&self.id);
        }
        Ok(outcome)
    }

    /// Starts this session's worker and records it; the caller holds the session's lock.
    async fn start_worker(self: &Arc<Self>, inner: &mut Inner) -> Result<WorkerHandle, RunError> {
        // Checked under the lock the teardown takes to stop the worker: a deleted session's
        // teardown either finds this worker and stops it, or this start is refused.
        if self.closed.is_cancelled() {
            return Err(RunError::Closed(self.id.clone()));
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let worker = workers::start(&self.ctx.workers, self, generation)
            .await
            .inspect(|worker| {
                METRICS.worker_starts.inc();
                METRICS.worker_start_seconds.observe(worker.start_duration);
            })
            .inspect_err(|_| METRICS.worker_start_failures.inc())
            .map_err(|e| RunError::WorkerUnavailable {
                session: self.id.clone(),
                reason: e.to_string(),
            })?;
        inner.worker = Some(worker.clone());
        self.activity.worker_live.store(true, Ordering::Release);
        Ok(worker)
    }

    /// The live worker, or a new one if the session has none (a restart after the old one was
    /// stopped; the caller has admitted it).
    ///
    /// # Errors
    /// The new worker could not be started.
    pub async fn ensure_worker(self: &Arc<Self>) -> Result<WorkerHandle, RunError> {
        let mut inner = self.inner.lock().await;
        match inner.worker.clone().filter(WorkerHandle::is_alive) {
            // A query raced us and started one already: that is a fresh worker too.
            Some(worker) => Ok(worker),
            None => self.start_worker(&mut inner).await,
        }
    }

    /// Whether the session has been deleted.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Asks the worker to abort the current run for `reason`, which its closing events name.
    /// With nothing running, says so and what the session's state is, so that a client can tell
    /// the user why nothing happened. If the worker does not end the run within
    /// [`ABORT_GRACE`], it is killed and the run ends as an error.
    pub async fn abort(self: &Arc<Self>, reason: AbortReason) -> AbortOutcome {
        let (run_id, worker) = {
            let inner = self.inner.lock().await;
            match (&inner.run, &inner.worker) {
                (Some(run), Some(worker)) => (run.run_id.clone(), worker.clone()),
                _ => return AbortOutcome::NothingRunning(inner.status),
            }
        };
        if worker
            .send(ToWorker::Abort {
                run_id: run_id.clone(),
                reason,
            })
            .await
            .is_err()
        {
            kill_for(&worker, reason);
        }
        let session = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ABORT_GRACE).await;
            if session.current_run_id().await.as_deref() == Some(run_id.as_str()) {
                tracing::warn!(session_id = %session.id, run_id, "worker ignored the abort; killing it");
                kill_for(&worker, reason);
            }
        });
        AbortOutcome::Aborted
    }

    async fn current_run_id(&self) -> Option<String> {
        self.inner
            .lock()
            .await
            .run
            .as_ref()
            .map(|r| r.run_id.clone())
    }

    /// Bytes this session has in storage (see the field).
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Acquire)
    }

    /// Run bookkeeping at its `agent_run_end`: status, waiter, exclusive slot.
    pub(super) async fn finish_run(&self, status: RunStatus) {
        let mut inner = self.inner.lock().await;
        inner.status = status;
        if let Some(mut run) = inner.run.take() {
            self.activity.running.store(false, Ordering::Release);
            self.activity.touch();
            METRICS.run_finished(status);
            tracing::info!(session_id = %self.id, run_id = %run.run_id, status = status.as_str(), "run ended");
            if let Some(waiter) = run.waiter.take() {
                let _ = waiter.send(RunOutcome {
                    result: run.result,
                    worker_lost: run.worker_lost,
                });
            }
        }
        self.ctx.exclusive.release(&self.id);
        drop(inner);
        self.run_ended.notify_waiters();
    }

    /// Remembers the run result the worker reported.
    pub(super) async fn set_result(&self, run_id: &str, json: String) {
        let mut inner = self.inner.lock().await;
        if let Some(run) = inner.run.as_mut().filter(|r| r.run_id == run_id) {
            run.result = Some(json);
        }
    }

    pub(super) async fn note_model_request(&self) {
        if let Some(run) = self.inner.lock().await.run.as_mut() {
            run.model_requests += 1;
        }
    }

    /// Called once when a worker's process is gone. If it died during a run, the run is closed
    /// in the log the way every run is: an error `system` event, then `agent_run_end` (error).
    /// `cause` is why the supervisor stopped it, when it did so on purpose for a reason the
    /// run's client must hear (a session limit, the server shutting down).
    pub(super) async fn worker_exited(
        &self,
        generation: u64,
        reason: String,
        cause: Option<StopCause>,
    ) {
        if !reason.starts_with("stopped by the supervisor") {
            METRICS.worker_crashes.inc();
        }
        let ended_run = {
            let mut inner = self.inner.lock().await;
            if inner
                .worker
                .as_ref()
                .is_some_and(|w| w.generation == generation)
            {
                inner.worker = None;
                self.activity.worker_live.store(false, Ordering::Release);
            }
            match inner.run.as_mut() {
                Some(run) => {
                    run.worker_lost = Some(reason.clone());
                    Some((run.model_requests, run.started.elapsed()))
                }
                None => None,
            }
        };
        let Some((iterations, elapsed)) = ended_run else {
            return;
        };
        tracing::warn!(session_id = %self.id, %reason, "worker exited during a run");
        if let Err(e) = self.record_interrupted_text(&self.ctx.storage).await {
            tracing::warn!(session_id = %self.id, error = %e, "could not record the streamed text of the lost run");
        }
        let (reason, details) = match cause {
            Some(StopCause::Limit(limit)) => (
                format!("{limit}; the run was stopped"),
                serde_json::json!({"kind": "session_limit", "limit": limit.key(), "value": limit.limit()}),
            ),
            Some(StopCause::ServerShutdown) => (
                "the server is shutting down: the run was stopped".to_owned(),
                serde_json::json!({"kind": "server_shutdown"}),
            ),
            None => {
                let reason = format!("worker process exited unexpectedly: {reason}");
                let details = serde_json::json!({"kind": "run_interrupted", "reason": reason});
                (reason, details)
            }
        };
        for event in closing_events(&self.id, &reason, details, iterations, elapsed) {
            if let Err(e) = self.publish(event.to_json()).await {
                tracing::warn!(session_id = %self.id, error = %e, "could not record the end of the lost run");
                // Without the events the run must still end, or the session stays busy forever.
                self.finish_run(RunStatus::Error).await;
            }
        }
    }

    /// Stops the worker (if any) and waits for its process to be gone.
    pub async fn stop_worker(&self) {
        self.stop_worker_for(None).await;
    }

    /// [`Session::stop_worker`], naming `cause` in the closing events of a run it cuts short.
    pub async fn stop_worker_for(&self, cause: Option<StopCause>) {
        let worker = self.inner.lock().await.worker.clone();
        if let Some(worker) = worker {
            match cause {
                Some(cause) => worker.kill_for(cause),
                None => worker.kill(),
            }
            if tokio::time::timeout(STOP_TIMEOUT, worker.exited())
                .await
                .is_err()
            {
                tracing::warn!(session_id = %self.id, pid = worker.pid, "worker did not exit in time");
            }
        }
    }

    /// Marks the session deleted: no new run or worker starts. Its worker is stopped by its
    /// teardown.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Stops the worker (if any) and waits, however long it takes, until its process and
    /// everything in its cgroup is gone: a teardown releases the session's uid after this.
    pub(super) async fn stop_worker_until_gone(&self, warn_every: Duration) {
        let worker = self.inner.lock().await.worker.clone();
        let Some(worker) = worker else {
            return;
        };
        worker.kill();
        while tokio::time::timeout(warn_every, worker.exited())
            .await
            .is_err()
        {
            tracing::warn!(session_id = %self.id, pid = worker.pid, "a deleted session's worker is still not gone");
        }
    }
}

/// Kills `worker` because a run aborted for `reason` did not end; a shutdown says so in the
/// run's closing events.
fn kill_for(worker: &WorkerHandle, reason: AbortReason) {
    match reason {
        AbortReason::ServerShutdown => worker.kill_for(StopCause::ServerShutdown),
        AbortReason::Requested => worker.kill(),
    }
}
