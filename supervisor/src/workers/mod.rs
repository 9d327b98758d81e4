//! Worker processes: start one for a session, speak the protocol with it, and notice at once
//! when it is gone.
//!
//! Each worker is owned by one connection task, which reads its frames, dispatches them (events
//! to the session's bridge, model calls to the gateway), watches the process, and reports its
//! exit to the session exactly once. Everything from the worker is untrusted: frames are size
//! checked by the codec, events are validated before they are stored, and any protocol
//! violation kills the worker rather than the supervisor.

mod spawn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shared::frame::{FrameError, read_frame, write_frame};
use shared::ids::now_ms;
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

pub use spawn::Spawner;

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

/// A live worker as the rest of the supervisor sees it.
#[derive(Clone)]
pub struct WorkerHandle {
    pub pid: u32,
    pub started_at: u64,
    pub generation: u64,
    outbox: mpsc::Sender<ToWorker>,
    kill: CancellationToken,
    exited: CancellationToken,
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
    let history: Vec<String> = state
        .storage
        .events_after(&session.id, 0, usize::MAX)
        .await?
        .into_iter()
        .map(|e| e.json.to_string())
        .collect();
    let stored = state.storage.session(&session.id).await?;
    let spawn::Spawned { mut child, channel } = state.spawner.spawn(&session.id).await?;
    let pid = child.id().unwrap_or_default();
    let (mut read, mut write) = channel.into_split();

    let init = ToWorker::Init(Init {
        protocol_version: PROTOCOL_VERSION,
        session_id: session.id.clone(),
        workspace: session.workspace.to_string_lossy().into_owned(),
        agent: agent_settings(state, stored.as_ref()),
        history,
    });
    let handshake = async {
        write_frame(&mut write, &init).await?;
        read_frame::<_, FromWorker>(&mut read).await
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(Some(FromWorker::Ready {
            protocol_version, ..
        }))) if protocol_version == PROTOCOL_VERSION => {}
        outcome => {
            let _ = child.start_kill();
            let reason = match outcome {
                Err(_) => "no answer in time".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(None)) => describe_exit(child.wait().await.ok()),
                Ok(Ok(Some(other))) => format!("unexpected first message {other:?}"),
            };
            return Err(WorkerError::Handshake(reason));
        }
    }

    let (outbox, queued) = mpsc::channel(OUTBOX_CAPACITY);
    tokio::spawn(write_frames(write, queued));
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(log_stderr(session.id.clone(), stderr));
    }
    let handle = WorkerHandle {
        pid,
        started_at: now_ms(),
        generation,
        outbox,
        kill: CancellationToken::new(),
        exited: CancellationToken::new(),
    };
    let span = tracing::info_span!("worker", session_id = %session.id, pid);
    tokio::spawn(
        Connection {
            state: state.clone(),
            session: session.clone(),
            handle: handle.clone(),
            model_calls: HashMap::new(),
        }
        .run(child, read)
        .instrument(span),
    );
    tracing::info!(session_id = %session.id, pid, "worker ready");
    Ok(handle)
}

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
async fn log_stderr(session_id: String, stderr: impl AsyncRead + Unpin) {
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
}

struct Connection {
    state: Arc<AppState>,
    session: Arc<Session>,
    handle: WorkerHandle,
    model_calls: HashMap<String, (CancellationToken, JoinHandle<()>)>,
}

impl Connection {
    async fn run(mut self, mut child: Child, read: OwnedReadHalf) {
        // Frames are read by their own task: reading a frame is not cancel-safe, a channel
        // receive is, so the select below can never cut a frame in half.
        let (frames_tx, mut frames) = mpsc::channel::<Result<FromWorker, FrameError>>(64);
        tokio::spawn(read_frames(read, frames_tx));

        let mut exit_described = false;
        let mut reason = loop {
            tokio::select! {
                () = self.handle.kill.cancelled() => {
                    let _ = child.start_kill();
                    break "stopped by the supervisor".to_owned();
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
                    Some(Ok(msg)) => {
                        if let Err(violation) = self.dispatch(msg).await {
                            tracing::warn!(%violation, "protocol violation; killing the worker");
                            let _ = child.start_kill();
                            break format!("protocol violation: {violation}");
                        }
                    }
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
        tracing::info!(%reason, "worker gone");
        self.session
            .worker_exited(&self.state, self.handle.generation, reason)
            .await;
        self.handle.exited.cancel();
    }

    async fn dispatch(&mut self, msg: FromWorker) -> Result<(), Violation> {
        match msg {
            FromWorker::Event { json } => match self.session.publish(&self.state, json).await {
                Ok(()) => Ok(()),
                Err(crate::sessions::PublishError::Invalid(e)) => Err(Violation::Event(e)),
                Err(other) => {
                    tracing::warn!(error = %other, "event dropped");
                    Ok(())
                }
            },
            FromWorker::RunResult { run_id, json } => {
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
                    request,
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
