//! Worker processes: start one for a session, speak the protocol with it, and notice at once
//! when it is gone.
//!
//! Each worker is owned by one connection task, which reads its frames, dispatches them (events
//! to the session's bridge, model calls to the gateway), watches the process, and reports its
//! exit to the session exactly once. Everything from the worker is untrusted: frames are size
//! checked by the codec, events are validated and counted against the session's limits
//! (`limits`) before they are stored, and any protocol violation or exceeded limit kills the
//! worker rather than the supervisor.

mod limits;
mod spawn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shared::frame::{FrameError, read_frame, write_frame};
use shared::ids::{SessionId, now_ms};
use shared::jail::JailAudit;
use shared::protocol::{
    AgentSettings, ContextSettings, FromWorker, Init, PROTOCOL_VERSION, ToWorker,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use limits::LimitExceeded;
pub use spawn::{Spawner, probe};

use crate::sessions::Session;
use crate::state::AppState;
use crate::storage::SessionInfo;

/// How long a new worker has to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dying worker's last frames are awaited after its process has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// Frames queued towards one worker before senders wait.
const OUTBOX_CAPACITY: usize = 256;
/// Model calls one worker may have in flight (agent.md §4.1 allows two; the loop uses one).
const MAX_MODEL_CALLS: usize = 4;
/// Bytes of a worker's stderr that reach our log, per worker lifetime.
const STDERR_BUDGET: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("could not start the worker process: {0}")]
    Spawn(String),
    #[error("worker handshake failed: {0}")]
    Handshake(String),
    #[error("the worker's channel is closed")]
    Closed,
    #[error("could not read the session history: {0}")]
    History(#[from] crate::storage::StorageError),
}

/// Why the supervisor stopped a worker on purpose, when a run it cuts short must say more than
/// "stopped" in its closing events.
#[derive(Debug, Clone)]
pub enum StopCause {
    /// The server is shutting down and the run did not end in time.
    ServerShutdown,
    /// The session went past one of `server.sessionLimits`.
    Limit(LimitExceeded),
}

impl std::fmt::Display for StopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ServerShutdown => f.write_str("the server is shutting down"),
            Self::Limit(limit) => limit.fmt(f),
        }
    }
}

/// A live worker as the rest of the supervisor sees it.
#[derive(Clone)]
pub struct WorkerHandle {
    pub pid: u32,
    pub started_at: u64,
    /// From the request for a worker to its `Ready`: history read, spawn, jail, handshake.
    pub start_duration: Duration,
    pub generation: u64,
    /// What the worker reported about its jail (W13), as accepted by the supervisor.
    pub audit: Arc<JailAudit>,
    outbox: mpsc::Sender<ToWorker>,
    kill: CancellationToken,
    /// Why `kill` was cancelled, when the caller said.
    stop_cause: Arc<Mutex<Option<StopCause>>>,
    exited: CancellationToken,
    #[cfg(feature = "isolation-tests")]
    probes: probes::Pending,
}

impl WorkerHandle {
    pub fn is_alive(&self) -> bool {
        !self.exited.is_cancelled()
    }

    /// Queues a message for the worker.
    ///
    /// # Errors
    /// The worker's channel is closed.
    pub async fn send(&self, msg: ToWorker) -> Result<(), WorkerError> {
        self.outbox.send(msg).await.map_err(|_| WorkerError::Closed)
    }

    /// Kills the process (SIGKILL through its `Child` handle, never a stale pid).
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Kills the process for `cause`, which the closing events of a run it cuts short name.
    pub fn kill_for(&self, cause: StopCause) {
        self.stop_cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(cause);
        self.kill.cancel();
    }

    /// Resolves once the process is gone and the session has been told.
    pub async fn exited(&self) {
        self.exited.cancelled().await;
    }
}

/// The agent options of a session's worker. Its model is the one the session's stored
/// `metadata.modelConfig` selects, if that `{provider, id}` is configured, otherwise the
/// default model (api.md §9); the worker learns only the selector, never a key or a URL.
fn agent_settings(state: &AppState, stored: Option<&SessionInfo>) -> AgentSettings {
    let config = &state.config;
    let selected = stored
        .and_then(|info| info.metadata.as_ref())
        .and_then(|metadata| metadata.get("modelConfig"));
    let model = state.gateway.catalogue().for_selector(selected);
    AgentSettings {
        agent_name: config.agent_name(),
        model: model.selector(),
        instructions: config.instructions.clone(),
        max_iterations: config.max_iterations,
        temperature: config.temperature,
        streaming_tool_call_events: true,
        // The model's own window and output budget feed the worker's trimming (agent.md §2.4);
        // unset keys leave the worker's defaults.
        context: ContextSettings {
            context_window: model.settings.context_window,
            max_output_tokens: model.settings.max_tokens,
            ..ContextSettings::default()
        },
    }
}

/// Starts the worker of `session`, hands it the session's history, and waits for it to be ready.
///
/// # Errors
/// The process could not be spawned or did not complete the handshake (it is killed then).
pub async fn start(
    state: &Arc<AppState>,
    session: &Arc<Session>,
    generation: u64,
) -> Result<WorkerHandle, WorkerError> {
    let began = Instant::now();
    let history: Vec<String> = state
        .storage
        .events_after(&session.id, 0, usize::MAX)
        .await?
        .into_iter()
        .map(|e| e.json.to_string())
        .collect();
    let stored = state.storage.session(&session.id).await?;
    // Its identity and its disk quota are in place before its process exists.
    let prepared = async {
        state.host_id(&session.id).await?;
        state.ensure_workspace(session).await
    };
    prepared
        .await
        .map_err(|e| WorkerError::Spawn(e.to_string()))?;
    let spawning = std::time::Instant::now();
    let spawn::Spawned {
        mut child,
        channel,
        jail,
    } = state.spawner.spawn(&session.id, &session.workspace).await?;
    let pid = child.id().unwrap_or_default();
    let spawn_us = spawning.elapsed().as_micros() as u64;
    let (mut read, mut write) = channel.into_split();
    let isolation = state.isolation.clone();
    let mut jail_us = 0;

    let init = ToWorker::Init(Box::new(Init {
        protocol_version: PROTOCOL_VERSION,
        session_id: session.id.to_string(),
        // The workspace as the worker sees it: `/workspace` in a strict jail, `/` in a chroot.
        workspace: isolation.workspace_inside(&session.workspace),
        agent: agent_settings(state, stored.as_ref()),
        history,
    }));
    // First the jail's self-audit (W13), checked before the session is used; then Init/Ready.
    let handshake = async {
        let audit = match read_frame::<_, FromWorker>(&mut read).await {
            Ok(Some(FromWorker::Jailed(audit))) => {
                jail_us = spawning.elapsed().as_micros() as u64;
                audit
            }
            Ok(Some(FromWorker::JailFailed(f))) => {
                return Err(Some(format!(
                    "SANDBOX_SETUP_FAILED: jail step '{}' failed: {}",
                    f.step, f.message
                )));
            }
            Ok(Some(other)) => return Err(Some(format!("unexpected first message {other:?}"))),
            Ok(None) => return Err(None),
            Err(e) => return Err(Some(e.to_string())),
        };
        let problems = isolation.check_audit(&audit, jail.ids);
        if !problems.is_empty() {
            return Err(Some(format!(
                "SANDBOX_SETUP_FAILED: the worker's jail audit was refused: {}",
                problems.join("; ")
            )));
        }
        write_frame(&mut write, &init)
            .await
            .map_err(|e| Some(e.to_string()))?;
        match read_frame::<_, FromWorker>(&mut read).await {
            Ok(Some(FromWorker::Ready {
                protocol_version, ..
            })) if protocol_version == PROTOCOL_VERSION => Ok(audit),
            Ok(Some(other)) => Err(Some(format!("unexpected message {other:?}"))),
            Ok(None) => Err(None),
            Err(e) => Err(Some(e.to_string())),
        }
    };
    let audit = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(audit)) => audit,
        outcome => {
            let _ = child.start_kill();
            let reason = match outcome {
                Err(_) => "no answer in time".to_owned(),
                Ok(Err(Some(reason))) => reason,
                Ok(Err(None)) | Ok(Ok(_)) => describe_exit(child.wait().await.ok()),
            };
            // S8 for a session that never started: its processes and cgroup go now.
            let _ = child.wait().await;
            let mut jail = jail;
            jail.teardown().await;
            return Err(WorkerError::Handshake(reason));
        }
    };
    tracing::debug!(session_id = %session.id, audit = ?audit, "jail audit accepted");

    let (outbox, queued) = mpsc::channel(OUTBOX_CAPACITY);
    tokio::spawn(write_frames(write, queued));
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(log_stderr(session.id.clone(), stderr));
    }
    let handle = WorkerHandle {
        pid,
        started_at: now_ms(),
        start_duration: began.elapsed(),
        generation,
        audit: Arc::from(audit),
        outbox,
        kill: CancellationToken::new(),
        stop_cause: Arc::default(),
        exited: CancellationToken::new(),
        #[cfg(feature = "isolation-tests")]
        probes: probes::Pending::default(),
    };
    let span = tracing::info_span!("worker", session_id = %session.id, pid);
    tokio::spawn(
        Connection {
            state: state.clone(),
            session: session.clone(),
            handle: handle.clone(),
            model_calls: HashMap::new(),
            budget: limits::EventBudget::new(&state.config.server.session_limits),
            jail,
        }
        .run(child, read)
        .instrument(span),
    );
    // Spawn, jail, audit and handshake together: the latency a session's first query pays.
    let startup_us = spawning.elapsed().as_micros() as u64;
    tracing::info!(session_id = %session.id, pid, spawn_us, jail_us, startup_us, "worker ready");
    Ok(handle)
}

/// The one writer towards a worker: everything for it (probes of test builds included) is a
/// `ToWorker` in its outbox, written in bursts.
async fn write_frames(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut queued: mpsc::Receiver<ToWorker>,
) {
    while let Some(msg) = queued.recv().await {
        if let Err(e) = shared::frame::write_batch(&mut write, msg, &mut queued).await {
            tracing::debug!(error = %e, "stopped writing to a worker");
            break;
        }
    }
}

/// Copies a worker's stderr into our log, escaped and within a budget, so a chatty or hostile
/// worker cannot flood it.
async fn log_stderr(session_id: SessionId, stderr: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stderr).lines();
    let mut budget = STDERR_BUDGET;
    while let Ok(Some(line)) = lines.next_line().await {
        if budget == 0 {
            continue;
        }
        let line: String = line.chars().take(budget.min(4096)).collect();
        budget = budget.saturating_sub(line.len());
        tracing::warn!(session_id = %session_id, line = %line.escape_debug(), "worker stderr");
    }
}

fn describe_exit(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.signal().is_some() => {
            format!("killed by signal {}", s.signal().unwrap_or_default())
        }
        Some(s) => format!("exited with status {}", s.code().unwrap_or_default()),
        None => "exit status unknown".to_owned(),
    }
}

/// What the worker did that the supervisor will not accept.
#[derive(Debug, thiserror::Error)]
enum Violation {
    #[error("invalid event: {0}")]
    Event(String),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("too many model calls in flight")]
    TooManyModelCalls,
    #[error("{0}")]
    Limit(LimitExceeded),
}

struct Connection {
    state: Arc<AppState>,
    session: Arc<Session>,
    handle: WorkerHandle,
    model_calls: HashMap<String, (CancellationToken, JoinHandle<()>)>,
    /// What the session may still send (`server.sessionLimits`).
    budget: limits::EventBudget,
    /// The host side of the worker's jail: its identity and cgroup (removed when it is gone).
    jail: spawn::SessionJail,
}

impl Connection {
    async fn run(mut self, mut child: Child, read: OwnedReadHalf) {
        // Frames are read by their own task: reading a frame is not cancel-safe, a channel
        // receive is, so the select below can never cut a frame in half.
        let (frames_tx, mut frames) = mpsc::channel::<Result<FromWorker, FrameError>>(64);
        tokio::spawn(read_frames(read, frames_tx));

        let mut exit_described = false;
        let mut cause = None;
        let mut reason = loop {
            tokio::select! {
                () = self.handle.kill.cancelled() => {
                    let _ = child.start_kill();
                    cause = self.handle.stop_cause.lock().unwrap_or_else(PoisonError::into_inner).take();
                    break match &cause {
                        Some(cause) => format!("stopped by the supervisor: {cause}"),
                        None => "stopped by the supervisor".to_owned(),
                    };
                }
                status = child.wait() => {
                    // Its last events may still be in the socket buffer.
                    while let Ok(Some(Ok(msg))) = tokio::time::timeout(DRAIN_TIMEOUT, frames.recv()).await {
                        if self.dispatch(msg).await.is_err() {
                            break;
                        }
                    }
                    exit_described = true;
                    break describe_exit(status.ok());
                }
                frame = frames.recv() => match frame {
                    Some(Ok(msg)) => match self.dispatch(msg).await {
                        // Deltas reach followers once their text is stored: write when the
                        // worker has nothing more queued, so a burst costs one write.
                        Ok(()) => {
                            if frames.is_empty() {
                                self.session.flush_deltas(&self.state.storage).await;
                            }
                        }
                        // Stopped at once: whatever else it sends would be refused too, and a
                        // worker that keeps flooding would keep the supervisor busy.
                        Err(Violation::Limit(limit)) => {
                            tracing::warn!(%limit, limit_key = limit.key(), "session limit exceeded; stopping the worker");
                            crate::metrics::METRICS.limit_kills.inc();
                            let _ = child.start_kill();
                            let stop = StopCause::Limit(limit);
                            let reason = format!("stopped by the supervisor: {stop}");
                            cause = Some(stop);
                            break reason;
                        }
                        Err(violation) => {
                            tracing::warn!(%violation, "protocol violation; killing the worker");
                            let _ = child.start_kill();
                            break format!("protocol violation: {violation}");
                        }
                    },
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "bad frame; killing the worker");
                        let _ = child.start_kill();
                        break format!("sent a bad frame: {e}");
                    }
                    None => break "closed its channel".to_owned(),
                },
            }
        };
        for (token, _) in self.model_calls.values() {
            token.cancel();
        }
        // Reap the process; if it outlives its channel, kill it.
        let status = match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        };
        if !exit_described && !reason.starts_with("stopped") {
            reason = format!("{reason} ({})", describe_exit(status));
        }
        if !reason.starts_with("stopped") {
            reason = self.explain_limit(reason, status);
        }
        // S8: whatever the session left behind goes with it.
        self.jail.teardown().await;
        tracing::info!(%reason, "worker gone");
        self.session
            .worker_exited(&self.state, self.handle.generation, reason, cause)
            .await;
        self.handle.exited.cancel();
    }

    /// Names the resource limit behind an abnormal exit, from the cgroup's counters or the
    /// signal, so the session's error event says which limit it hit.
    fn explain_limit(&self, reason: String, status: Option<std::process::ExitStatus>) -> String {
        use std::os::unix::process::ExitStatusExt;
        let abnormal = status.is_none_or(|s| !s.success());
        if !abnormal {
            return reason;
        }
        let isolation = self.state.isolation.clone();
        if let Some(limit) = self.jail.limit_hit() {
            if limit == "memory" {
                crate::metrics::METRICS.oom_kills.inc();
            } else {
                crate::metrics::METRICS.limit_kills.inc();
            }
            return format!("{} ({reason})", isolation.describe_limit(limit));
        }
        match status
            .and_then(|s| s.signal())
            .and_then(|sig| isolation.describe_signal(sig))
        {
            Some(words) => format!("{words} ({reason})"),
            None => reason,
        }
    }

    async fn dispatch(&mut self, msg: FromWorker) -> Result<(), Violation> {
        match msg {
            FromWorker::Event { json } => {
                let head = crate::sessions::event_head(&json).map_err(Violation::Event)?;
                // Admitted here once, whether it is stored at once or, a delta, held back until
                // its text is written: a delta's text is stored too (see `live_text`).
                self.budget
                    .admit(json.len(), self.session.stored_bytes())
                    .map_err(Violation::Limit)?;
                match self.session.publish_as(&self.state, &json, head).await {
                    Ok(()) => Ok(()),
                    Err(crate::sessions::PublishError::Invalid(e)) => Err(Violation::Event(e)),
                    Err(other) => {
                        tracing::warn!(error = %other, "event dropped");
                        Ok(())
                    }
                }
            }
            FromWorker::RunResult { run_id, json } => {
                self.budget
                    .check_size(json.len())
                    .map_err(Violation::Limit)?;
                if serde_json::from_str::<serde_json::Value>(&json).is_err() {
                    return Err(Violation::Event("run result is not JSON".into()));
                }
                self.session.set_result(&run_id, json).await;
                Ok(())
            }
            FromWorker::ModelRequest(request) => {
                self.model_calls.retain(|_, (_, task)| !task.is_finished());
                if self.model_calls.len() >= MAX_MODEL_CALLS {
                    return Err(Violation::TooManyModelCalls);
                }
                self.session.note_model_request().await;
                let cancel = CancellationToken::new();
                let id = request.id.clone();
                let task = self.state.gateway.start(
                    &self.session.id,
                    *request,
                    self.handle.outbox.clone(),
                    cancel.clone(),
                );
                self.model_calls.insert(id, (cancel, task));
                Ok(())
            }
            FromWorker::ModelCancel { id } => {
                if let Some((token, _)) = self.model_calls.remove(&id) {
                    token.cancel();
                }
                Ok(())
            }
            FromWorker::Ready { .. } => Err(Violation::Unexpected("a second Ready")),
            FromWorker::Jailed(_) | FromWorker::JailFailed(_) | FromWorker::ProbeReport { .. } => {
                Err(Violation::Unexpected("a jail report after the handshake"))
            }
            #[cfg(feature = "isolation-tests")]
            FromWorker::ProbeAnswer(answer) => {
                self.handle.probes.deliver(answer);
                Ok(())
            }
        }
    }
}

async fn read_frames(read: OwnedReadHalf, frames: mpsc::Sender<Result<FromWorker, FrameError>>) {
    // Buffered: frames arrive in bursts, and each would otherwise cost two reads.
    let mut read = BufReader::with_capacity(64 * 1024, read);
    loop {
        let frame = read_frame::<_, FromWorker>(&mut read).await;
        let stop = !matches!(frame, Ok(Some(_)));
        let item = match frame {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        if frames.send(item).await.is_err() || stop {
            break;
        }
    }
}

/// Test builds only: probe requests in flight towards a worker, for the in-jail probe server
/// the isolation tests drive (see `shared::probe`).
#[cfg(feature = "isolation-tests")]
mod probes {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    use shared::probe::{Probe, ProbeAnswer, ProbeOutcome, ProbeRequest};
    use shared::protocol::ToWorker;
    use tokio::sync::oneshot;

    use super::{WorkerError, WorkerHandle};

    #[derive(Clone, Default)]
    pub(super) struct Pending {
        next: Arc<AtomicU64>,
        waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<ProbeOutcome>>>>,
    }

    impl Pending {
        pub(super) fn deliver(&self, answer: ProbeAnswer) {
            let waiter = self
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&answer.id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(answer.outcome);
            }
        }
    }

    impl WorkerHandle {
        /// Runs `probe` inside this worker's jail and returns what it found.
        ///
        /// # Errors
        /// The worker is gone before it answered.
        pub async fn probe(&self, probe: Probe) -> Result<ProbeOutcome, WorkerError> {
            let id = self.probes.next.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.probes
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, tx);
            self.send(ToWorker::Probe(ProbeRequest { id, probe }))
                .await?;
            tokio::select! {
                answer = rx => answer.map_err(|_| WorkerError::Closed),
                () = self.exited() => Err(WorkerError::Closed),
            }
        }
    }
}
