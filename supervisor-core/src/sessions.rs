//! Live sessions: each one's worker, its current run, and the event bridge that numbers, stores
//! and fans out what the worker emits (ARCHITECTURE decision 4: stored before fanned out).
//!
//! Lock order: `publisher` before `inner`; nothing awaits a worker while holding `inner` except
//! starting one, which no other task of that session can be waiting on.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use shared::events::{Event, EventBody, RunStatus, SystemLevel};
use shared::ids::{SessionId, now_ms};
use shared::protocol::{AbortReason, Query, ToWorker};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusEvent, Cursor, Lagged};
use crate::error::ApiError;
use crate::live_text;
use crate::metrics::METRICS;
use crate::state::AppState;
use crate::storage::{SharedStorage, StorageError};
use crate::workers::{self, StopCause, WorkerHandle};

/// How long a worker gets to wind a run down after an abort before it is killed.
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// Sequence numbers reserved in storage at a time (see `Storage::reserve_seq`).
const SEQ_RESERVATION: u64 = 4096;
/// Events a session's bus keeps after a run ends, for followers that are a little behind.
const RING_KEEP_AFTER_RUN: usize = 64;
/// How long stopping a worker may take before we stop waiting for it.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The table of sessions this process has live.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<SessionId, Arc<Session>>>,
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Session>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn insert(&self, session: Arc<Session>) {
        self.map().insert(session.id.clone(), session);
    }

    pub fn get(&self, id: &SessionId) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub fn remove(&self, id: &SessionId) -> Option<Arc<Session>> {
        self.map().remove(id)
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Sessions with a live worker.
    pub fn live_workers(&self) -> usize {
        self.map()
            .values()
            .filter(|s| s.activity.has_worker())
            .count()
    }

    /// The session whose idle worker was used least recently, other than `except`.
    pub fn least_recent_idle(&self, except: &SessionId) -> Option<Arc<Session>> {
        self.map()
            .values()
            .filter(|s| s.id != *except && s.activity.has_worker() && !s.activity.is_running())
            .min_by_key(|s| s.activity.last_active_ms())
            .cloned()
    }

    /// The live session, or one rebuilt from storage (the restore of api.md §2.1). A restored
    /// session has no worker yet: its first query starts one that reads the stored history.
    pub async fn get_or_restore(
        &self,
        storage: &SharedStorage,
        id: &SessionId,
    ) -> Result<Option<Arc<Session>>, StorageError> {
        if let Some(live) = self.get(id) {
            return Ok(Some(live));
        }
        let Some(info) = storage.session(id).await? else {
            return Ok(None);
        };
        let last_seq = storage.last_seq(id).await?;
        let restored = Arc::new(Session::new(
            id.clone(),
            PathBuf::from(info.workspace),
            last_seq,
        ));
        // Two concurrent restores of one id must end with one live session.
        let (session, inserted) = {
            let mut map = self.map();
            match map.get(id) {
                Some(live) => (live.clone(), false),
                None => {
                    map.insert(id.clone(), restored.clone());
                    (restored, true)
                }
            }
        };
        if inserted {
            session.close_interrupted_run(storage).await?;
        }
        Ok(Some(session))
    }
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

struct ActiveRun {
    run_id: String,
    started: Instant,
    model_requests: u32,
    result: Option<String>,
    worker_lost: Option<String>,
    waiter: Option<oneshot::Sender<RunOutcome>>,
}

struct Inner {
    worker: Option<WorkerHandle>,
    run: Option<ActiveRun>,
    status: RunStatus,
}

/// One live session.
pub struct Session {
    pub id: SessionId,
    pub workspace: PathBuf,
    pub bus: Bus,
    /// Sequence numbering; held while an event is stored, so numbering, storage order and
    /// fan-out order are the same.
    publisher: tokio::sync::Mutex<Numbering>,
    inner: tokio::sync::Mutex<Inner>,
    generations: AtomicU64,
    /// Woken when a run ends (after its status is set, before its `agent_run_end` goes out).
    run_ended: tokio::sync::Notify,
    /// Cancelled when the session is deleted.
    closed: CancellationToken,
    /// Bytes the session has in storage, checked against `server.sessionLimits.storedBytes`:
    /// its events (their JSON), counted from the log when the session is restored, then as
    /// events are stored; and its live run's streamed text (see `live_text`). The live text
    /// counts too, though it is dropped when the run ends: a run may stream for as long as it
    /// likes, and what it streams is written to disk, so leaving it out would let one run fill
    /// the disk. It is counted from the moment a delta is staged, before its batch is written,
    /// so the limit sees every delta already admitted.
    stored_bytes: AtomicU64,
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

/// A session's sequence numbers: the last one handed out, and how far storage has promised
/// that none will be reused; and the streamed text of its running run (see `live_text`).
struct Numbering {
    last: u64,
    reserved: u64,
    /// Deltas numbered but not yet shown: their text is stored first.
    staged: live_text::Staged,
    /// The seq of the running run's `agent_run_start`: its live text is what comes after.
    run_start: Option<u64>,
    /// Bytes of live-text records stored and not yet dropped (they count toward the session's
    /// stored total until they are). Dropped when the run ends; a failed drop is retried then.
    live_text_bytes: u64,
}

/// Why an event from a worker was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not an event object: {0}")]
    Invalid(String),
    #[error("event outside of a run")]
    NoRun,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct RunEndStatus {
    status: RunStatus,
}

impl Session {
    pub fn new(id: SessionId, workspace: PathBuf, last_seq: u64) -> Self {
        Self {
            id,
            workspace,
            bus: Bus::new(last_seq),
            // Nothing is reserved yet in this process: the first event reserves a block.
            publisher: tokio::sync::Mutex::new(Numbering {
                last: last_seq,
                reserved: last_seq,
                staged: live_text::Staged::default(),
                run_start: None,
                live_text_bytes: 0,
            }),
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

    /// The agent status of events.md §10.1.
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
    /// the run's outcome.
    ///
    /// # Errors
    /// `SessionBusy` while a run executes; `WorkerUnavailable` when no worker could be started.
    pub async fn start_run(
        self: &Arc<Self>,
        state: &Arc<AppState>,
        input: &Value,
        stream: bool,
    ) -> Result<oneshot::Receiver<RunOutcome>, ApiError> {
        // Held until the worker below is live: the slot counts as taken meanwhile.
        let _admission = state.admit(self).await?;
        let mut inner = self.inner.lock().await;
        if self.closed.is_cancelled() {
            return Err(ApiError::SessionNotFound(self.id.to_string()));
        }
        if inner.run.is_some() {
            return Err(ApiError::SessionBusy(self.id.to_string()));
        }
        // A full session starts nothing it could not record.
        let cap = state.config.server.session_limits.stored_bytes.0;
        if self.stored_bytes() >= cap {
            return Err(ApiError::SessionStorageFull {
                session: self.id.to_string(),
                limit: cap,
            });
        }
        let worker = match inner.worker.clone().filter(WorkerHandle::is_alive) {
            Some(worker) => worker,
            None => self.start_worker(state, &mut inner).await?,
        };
        let run_id = uuid::Uuid::new_v4().to_string();
        let (waiter, outcome) = oneshot::channel();
        let query = ToWorker::Query(Query {
            run_id: run_id.clone(),
            input: input.to_string(),
            stream,
        });
        if let Err(e) = worker.send(query).await {
            return Err(ApiError::WorkerUnavailable {
                session: self.id.to_string(),
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
        if state.config.server.exclusive {
            state.exclusive.claim(&self.id);
        }
        Ok(outcome)
    }

    /// Starts this session's worker and records it; the caller holds the session's lock.
    async fn start_worker(
        self: &Arc<Self>,
        state: &Arc<AppState>,
        inner: &mut Inner,
    ) -> Result<WorkerHandle, ApiError> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let worker = workers::start(state, self, generation)
            .await
            .inspect(|worker| {
                METRICS.worker_starts.inc();
                METRICS.worker_start_seconds.observe(worker.start_duration);
            })
            .inspect_err(|_| METRICS.worker_start_failures.inc())
            .map_err(|e| ApiError::WorkerUnavailable {
                session: self.id.to_string(),
                reason: e.to_string(),
            })?;
        inner.worker = Some(worker.clone());
        self.activity.worker_live.store(true, Ordering::Release);
        Ok(worker)
    }

    /// Replaces the worker with a fresh process, which reads the session's history from the log;
    /// followers and history are untouched. A run in progress ends as an error, recorded in the
    /// log like any lost worker's run: a stuck run is often why an operator restarts.
    ///
    /// # Errors
    /// `SessionNotFound` for a deleted session; admission refusals; `WorkerUnavailable` if the
    /// new worker cannot start.
    pub async fn restart_worker(
        self: &Arc<Self>,
        state: &Arc<AppState>,
    ) -> Result<WorkerHandle, ApiError> {
        if self.closed.is_cancelled() {
            return Err(ApiError::SessionNotFound(self.id.to_string()));
        }
        self.stop_worker().await;
        let _admission = state.admit(self).await?;
        let mut inner = self.inner.lock().await;
        match inner.worker.clone().filter(WorkerHandle::is_alive) {
            // A query raced us and started one already: that is a fresh worker too.
            Some(worker) => Ok(worker),
            None => self.start_worker(state, &mut inner).await,
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

    /// Numbers, stores and fans out one event. A streaming delta is only staged: followers get
    /// it once its text is stored (see `live_text`), at the latest before the next stored event.
    ///
    /// # Errors
    /// An invalid event, an event outside any run, or a storage failure; the event is then
    /// neither stored nor delivered.
    pub async fn publish(&self, state: &AppState, json: String) -> Result<(), PublishError> {
        let head = event_head(&json).map_err(PublishError::Invalid)?;
        self.publish_as(state, &json, head).await
    }

    /// [`Session::publish`] for an event whose head the caller has read already
    /// ([`event_head`]).
    ///
    /// # Errors
    /// As [`Session::publish`].
    pub async fn publish_as(
        &self,
        state: &AppState,
        json: &str,
        head: live_text::EventHead<'_>,
    ) -> Result<(), PublishError> {
        let delta = if head.is_delta() {
            Some(
                head.delta()
                    .map_err(|e| PublishError::Invalid(e.to_string()))?,
            )
        } else {
            None
        };
        let kind = head.kind;
        let mut numbering = self.publisher.lock().await;
        if self.inner.lock().await.run.is_none() {
            return Err(PublishError::NoRun);
        }
        if let Some(delta) = delta {
            let seq = self.next_seq(&mut numbering, &state.storage).await?;
            numbering.last = seq;
            if let Some(delta) = &delta {
                let added = numbering.staged.add_text(delta);
                self.stored_bytes.fetch_add(added, Ordering::AcqRel);
            }
            drop(delta);
            let json: Arc<str> = json.into();
            if let Some(agio) = &state.agio {
                agio.observe(&self.id, &kind, &json);
            }
            numbering.staged.hold(BusEvent {
                seq,
                json,
                ends_run: false,
            });
            if numbering.staged.len() >= live_text::MAX_STAGED {
                self.flush(&mut numbering, &state.storage).await;
            }
            return Ok(());
        }
        // Followers get the deltas before the event that follows them.
        self.flush(&mut numbering, &state.storage).await;
        let ends_run = kind == "agent_run_end";
        let event = self
            .record(&mut numbering, &state.storage, json.into(), ends_run)
            .await?;
        if kind == "agent_run_start" {
            numbering.run_start = Some(event.seq);
        }
        if let Some(agio) = &state.agio {
            agio.observe(&self.id, &kind, &event.json);
        }
        let end_seq = event.seq;
        if ends_run {
            let status = serde_json::from_str::<RunEndStatus>(&event.json)
                .map_or(RunStatus::Error, |e| e.status);
            self.finish_run(state, status).await;
        }
        self.bus.publish(event);
        if ends_run {
            self.bus.trim(RING_KEEP_AFTER_RUN);
            numbering.run_start = None;
            self.drop_live_text(&mut numbering, &state.storage, end_seq)
                .await;
        }
        Ok(())
    }

    /// Drops the live text of a run the log has closed (records up to `upto`): it will never be
    /// read again. A failure only leaves records behind that recovery ignores; they stay
    /// counted, and the next run's end tries again.
    async fn drop_live_text(&self, numbering: &mut Numbering, storage: &SharedStorage, upto: u64) {
        if numbering.live_text_bytes == 0 {
            return;
        }
        match storage.clear_live_text(&self.id, upto).await {
            Ok(()) => {
                let dropped = std::mem::take(&mut numbering.live_text_bytes);
                self.stored_bytes.fetch_sub(dropped, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::warn!(session_id = %self.id, error = %e, "could not drop the live text of an ended run");
            }
        }
    }

    /// Writes the text of the staged deltas, then shows them to followers. Deltas whose text
    /// could not be stored are dropped, never shown: a follower must not see what a crash would
    /// take away. (Their seqs stay unused, as those of missed deltas may.)
    async fn flush(&self, numbering: &mut Numbering, storage: &SharedStorage) {
        let Some(batch) = numbering.staged.take() else {
            return;
        };
        if let Some(record) = batch.record {
            let len = record.len() as u64;
            if let Err(e) = storage.append_live_text(&self.id, batch.upto, record).await {
                tracing::warn!(session_id = %self.id, error = %e, deltas = batch.events.len(), "streamed text could not be stored; its deltas are dropped");
                self.stored_bytes
                    .fetch_sub(batch.text_bytes, Ordering::AcqRel);
                return;
            }
            METRICS.live_text_writes.inc();
            // The text was counted when it was staged; the record's framing is counted now.
            self.stored_bytes
                .fetch_add(len.saturating_sub(batch.text_bytes), Ordering::AcqRel);
            numbering.live_text_bytes += len;
        }
        self.bus.publish_all(batch.events);
    }

    /// Shows the staged deltas once their text is stored. The worker's connection calls this
    /// whenever it has no further frame queued, so a burst of deltas costs one write.
    pub async fn flush_deltas(&self, storage: &SharedStorage) {
        let mut numbering = self.publisher.lock().await;
        self.flush(&mut numbering, storage).await;
    }

    /// The next sequence number (not yet taken: the caller sets `last`), reserving a block in
    /// storage when the reservation is used up.
    async fn next_seq(
        &self,
        numbering: &mut Numbering,
        storage: &SharedStorage,
    ) -> Result<u64, StorageError> {
        let seq = numbering.last + 1;
        METRICS.events_published.inc();
        if seq > numbering.reserved {
            let upto = numbering.reserved.max(numbering.last) + SEQ_RESERVATION;
            storage.reserve_seq(&self.id, upto).await?;
            numbering.reserved = upto;
        }
        Ok(seq)
    }

    /// Gives a stored event the next `seq` and stores it. The caller holds the publisher lock
    /// (`numbering`) and hands the returned event to the bus.
    async fn record(
        &self,
        numbering: &mut Numbering,
        storage: &SharedStorage,
        json: Arc<str>,
        ends_run: bool,
    ) -> Result<BusEvent, StorageError> {
        let seq = self.next_seq(numbering, storage).await?;
        storage
            .append_event(&self.id, seq, json.clone(), now_ms())
            .await?;
        self.stored_bytes
            .fetch_add(json.len() as u64, Ordering::AcqRel);
        METRICS.events_stored.inc();
        numbering.last = seq;
        Ok(BusEvent {
            seq,
            json,
            ends_run,
        })
    }

    /// A run whose `agent_run_start` has no `agent_run_end` in the log was cut short by a crash
    /// of the server. It is closed the way a crashed worker's run is, so the log stays
    /// well-bracketed and the model context stays valid; what it had streamed becomes history
    /// first. The same reading of the log counts the session's stored bytes.
    async fn close_interrupted_run(&self, storage: &SharedStorage) -> Result<(), StorageError> {
        let mut numbering = self.publisher.lock().await;
        let events = storage.events_after(&self.id, 0, usize::MAX).await?;
        let bytes: u64 = events.iter().map(|e| e.json.len() as u64).sum();
        self.stored_bytes.store(bytes, Ordering::Release);
        // (index and seq of its agent_run_start, its timestamp, iterations so far)
        let mut open: Option<(usize, u64, u64, u32)> = None;
        for (index, event) in events.iter().enumerate() {
            let Ok(head) = serde_json::from_str::<EventHeadTimed<'_>>(&event.json) else {
                continue;
            };
            match head.kind.as_ref() {
                "agent_run_start" => open = Some((index, event.seq, head.timestamp, 0)),
                "agent_run_end" => open = None,
                "assistant_message" => {
                    if let Some((.., iterations)) = open.as_mut() {
                        *iterations += 1;
                    }
                }
                _ => {}
            }
        }
        let Some((index, start_seq, started, mut iterations)) = open else {
            return Ok(());
        };
        tracing::warn!(session_id = %self.id, "closing a run the server stopped in the middle of");
        let records = storage.live_text_after(&self.id, start_seq).await?;
        numbering.live_text_bytes = records.iter().map(|r| r.json.len() as u64).sum();
        self.stored_bytes
            .fetch_add(numbering.live_text_bytes, Ordering::AcqRel);
        let mut history = live_text::interrupted_events(&events[index + 1..], &records);
        iterations += history
            .iter()
            .filter(|e| matches!(e.body, EventBody::AssistantMessage { .. }))
            .count() as u32;
        let elapsed = Duration::from_millis(now_ms().saturating_sub(started));
        let reason = "the server stopped during the run";
        let details = serde_json::json!({"kind": "run_interrupted", "reason": reason});
        history.extend(closing_events(
            &self.id, reason, details, iterations, elapsed,
        ));
        let mut end_seq = numbering.last;
        for event in history {
            let ends_run = matches!(event.body, EventBody::AgentRunEnd { .. });
            let recorded = self
                .record(&mut numbering, storage, event.to_json().into(), ends_run)
                .await?;
            end_seq = recorded.seq;
            self.bus.publish(recorded);
        }
        self.drop_live_text(&mut numbering, storage, end_seq).await;
        Ok(())
    }

    /// Turns what a lost run streamed, and no final event superseded, into history: it goes
    /// into the log before the run's closing events.
    async fn record_interrupted_text(&self, storage: &SharedStorage) -> Result<(), StorageError> {
        let mut numbering = self.publisher.lock().await;
        self.flush(&mut numbering, storage).await;
        let Some(start) = numbering
            .run_start
            .filter(|_| numbering.live_text_bytes > 0)
        else {
            return Ok(());
        };
        let records = storage.live_text_after(&self.id, start).await?;
        let run = storage.events_after(&self.id, start, usize::MAX).await?;
        for event in live_text::interrupted_events(&run, &records) {
            let recorded = self
                .record(&mut numbering, storage, event.to_json().into(), false)
                .await?;
            self.bus.publish(recorded);
        }
        Ok(())
    }

    /// Run bookkeeping at its `agent_run_end`: status, waiter, exclusive slot.
    async fn finish_run(&self, state: &AppState, status: RunStatus) {
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
        state.exclusive.release(&self.id);
        drop(inner);
        self.run_ended.notify_waiters();
    }

    /// Remembers the run result the worker reported.
    pub async fn set_result(&self, run_id: &str, json: String) {
        let mut inner = self.inner.lock().await;
        if let Some(run) = inner.run.as_mut().filter(|r| r.run_id == run_id) {
            run.result = Some(json);
        }
    }

    pub async fn note_model_request(&self) {
        if let Some(run) = self.inner.lock().await.run.as_mut() {
            run.model_requests += 1;
        }
    }

    /// Called once when a worker's process is gone. If it died during a run, the run is closed
    /// in the log the way every run is: an error `system` event, then `agent_run_end` (error).
    /// `cause` is why the supervisor stopped it, when it did so on purpose for a reason the
    /// run's client must hear (a session limit, the server shutting down).
    pub async fn worker_exited(
        &self,
        state: &AppState,
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
        if let Err(e) = self.record_interrupted_text(&state.storage).await {
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
            if let Err(e) = self.publish(state, event.to_json()).await {
                tracing::warn!(session_id = %self.id, error = %e, "could not record the end of the lost run");
                // Without the events the run must still end, or the session stays busy forever.
                self.finish_run(state, RunStatus::Error).await;
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

    /// Marks the session deleted (no new runs) and stops its worker.
    pub async fn close(&self) {
        self.closed.cancel();
        self.stop_worker().await;
    }

    /// The session's events after `cursor`, live, in order, without gaps: events that fell out
    /// of the bus's ring are read back from storage. With `until_run_end`, the stream ends after
    /// the first `agent_run_end`; it also ends when the session is deleted or the server stops.
    pub fn follow(
        self: &Arc<Self>,
        storage: SharedStorage,
        shutdown: CancellationToken,
        cursor: Cursor,
        until_run_end: bool,
    ) -> impl Stream<Item = BusEvent> + Send + 'static {
        struct Follow {
            session: Arc<Session>,
            storage: SharedStorage,
            shutdown: CancellationToken,
            cursor: Cursor,
            pending: VecDeque<BusEvent>,
            done: bool,
        }
        let start = Follow {
            session: self.clone(),
            storage,
            shutdown,
            cursor,
            pending: VecDeque::new(),
            done: false,
        };
        futures::stream::unfold(start, move |mut f| async move {
            loop {
                if f.done {
                    return None;
                }
                if let Some(event) = f.pending.pop_front() {
                    f.done = until_run_end && event.ends_run;
                    return Some((event, f));
                }
                let batch = tokio::select! {
                    batch = f.cursor.next_batch(&f.session.bus) => batch?,
                    () = f.session.closed.cancelled() => return None,
                    () = f.shutdown.cancelled() => return None,
                };
                match batch {
                    Ok(events) => f.pending.extend(events),
                    Err(Lagged { after, oldest }) => {
                        METRICS.follower_lags.inc();
                        tracing::info!(session_id = %f.session.id, after, oldest, "follower fell behind the live ring; replaying from storage");
                        let stored = f
                            .storage
                            .events_after(&f.session.id, after, usize::MAX)
                            .await
                            .ok()?;
                        f.pending
                            .extend(stored.into_iter().filter(|e| e.seq < oldest).map(|e| {
                                BusEvent {
                                    ends_run: is_run_end(&e.json),
                                    seq: e.seq,
                                    json: e.json,
                                }
                            }));
                        f.cursor.skip_to(oldest - 1);
                    }
                }
            }
        })
    }
}

/// How a run that its agent could not finish is closed: an error `system` event, then
/// `agent_run_end` with status `error` (ARCHITECTURE decision 5).
fn closing_events(
    session_id: &SessionId,
    reason: &str,
    details: Value,
    iterations: u32,
    elapsed: Duration,
) -> [Event; 2] {
    let mut message = reason.to_owned();
    if let Some(first) = message.get(..1) {
        message.replace_range(..1, &first.to_uppercase());
    }
    [
        Event::new(EventBody::System {
            level: SystemLevel::Error,
            message,
            details: Some(details),
        }),
        Event::new(EventBody::AgentRunEnd {
            session_id: session_id.to_string(),
            iterations,
            elapsed_ms: elapsed.as_millis() as u64,
            status: RunStatus::Error,
        }),
    ]
}

/// What publishing reads of an event (a JSON object) before numbering it, in one pass: its
/// `type`, which decides whether it is stored, and for a streaming delta the fields of its text
/// (see `live_text`).
///
/// # Errors
/// Not a JSON object with a string `type`.
pub fn event_head(json: &str) -> Result<live_text::EventHead<'_>, String> {
    if !json.starts_with('{') {
        return Err("not a JSON object".into());
    }
    live_text::EventHead::parse(json).map_err(|e| e.to_string())
}

/// Kills `worker` because a run aborted for `reason` did not end; a shutdown says so in the
/// run's closing events.
fn kill_for(worker: &WorkerHandle, reason: AbortReason) {
    match reason {
        AbortReason::ServerShutdown => worker.kill_for(StopCause::ServerShutdown),
        AbortReason::Requested => worker.kill(),
    }
}

#[derive(Deserialize)]
struct EventHeadTimed<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    timestamp: u64,
}

fn is_run_end(json: &str) -> bool {
    serde_json::from_str::<EventHead<'_>>(json).is_ok_and(|h| h.kind == "agent_run_end")
}

/// The exclusive-mode slot of api.md §2.2: the session currently running a query, if any.
#[derive(Default)]
pub struct ExclusiveSlot(Mutex<Option<SessionId>>);

impl ExclusiveSlot {
    pub fn holder(&self) -> Option<SessionId> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn claim(&self, session_id: &SessionId) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(session_id.clone());
    }

    /// Clears the slot if (and only if) `session_id` holds it.
    pub fn release(&self, session_id: &SessionId) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref() == Some(session_id) {
            *slot = None;
        }
    }
}
