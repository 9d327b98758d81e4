//! Worker processes: start one for a session, speak the protocol with it, and notice at once
//! when it is gone.
//!
//! - [`start`]: the session's history read, its host uid and disk quota in place, the process
//!   spawned (`spawn`: the spawner thread and its pool of launchers), its jail's self-audit
//!   checked, then the `Init`/`Ready` handshake;
//! - `connection`: the task that owns a live worker, dispatches what it sends and reports its
//!   exit to its session exactly once;
//! - `limits`: what a session may send through its worker (`server.sessionLimits`).
//!
//! A worker reaches its session only through [`SessionLink`], and gets everything else from a
//! [`Context`]: this module sits below sessions, which start workers.

mod connection;
mod limits;
#[cfg(feature = "isolation-tests")]
mod probes;
mod spawn;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shared::frame::{read_frame, write_frame};
use shared::ids::{SessionId, now_ms};
#[cfg(feature = "isolation-tests")]
use shared::jail::JailAudit;
use shared::protocol::{
    AgentSettings, ContextSettings, FromWorker, Init, PROTOCOL_VERSION, ToWorker,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use connection::Connection;
pub use limits::LimitExceeded;
pub use spawn::{Spawner, probe};

use crate::config::{Config, SessionLimits};
use crate::gateway::Gateway;
use crate::isolation::Isolation;
use crate::live_text::{EventHead, InvalidEvent};
use crate::provision::{ProvisionError, Provisioner};
use crate::storage::{SessionInfo, SharedStorage};

/// How long a new worker has to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one worker before senders wait.
const OUTBOX_CAPACITY: usize = 256;
/// Bytes of a worker's stderr that reach our log, per worker lifetime.
const STDERR_BUDGET: usize = 1024 * 1024;

/// What starting and serving a session's worker needs, and nothing more.
pub struct Context {
    /// The session's history and record, read at start.
    pub storage: SharedStorage,
    /// Its host uid and disk quota, in place before its process exists.
    pub provisioner: Provisioner,
    pub spawner: Spawner,
    /// What its jail must look like (the audit check, the workspace path inside, limits).
    pub isolation: Arc<Isolation>,
    /// Where its model calls go.
    pub gateway: Arc<Gateway>,
    pub agent: AgentDefaults,
    /// What a session may send through its worker.
    pub limits: SessionLimits,
}

/// The agent options every worker starts with (its model is chosen per session).
pub struct AgentDefaults {
    pub name: String,
    pub instructions: Option<String>,
    pub max_iterations: u32,
    pub temperature: f64,
}

impl AgentDefaults {
    pub fn from_config(config: &Config) -> Self {
        Self {
            name: config.agent_name(),
            instructions: config.instructions.clone(),
            max_iterations: config.max_iterations,
            temperature: config.temperature,
        }
    }
}

/// The session a worker serves, as its connection sees it: where the worker's events go and
/// what the session must hear about. Implemented by `sessions::Session`; a trait so that this
/// module, which sessions use to start their workers, does not know sessions in turn.
pub trait SessionLink: Send + Sync + 'static {
    fn id(&self) -> &SessionId;

    /// The tenant owning the session: its model calls use the tenant's keys and budget.
    fn tenant(&self) -> &str;

    /// The session's workspace on the host.
    fn workspace(&self) -> &Path;

    /// Bytes the session has in storage, which its events are counted against.
    fn stored_bytes(&self) -> u64;

    /// Numbers, stores and fans out one event whose head was read. An event that could not be
    /// stored is the session's business (it is dropped and logged).
    ///
    /// # Errors
    /// The event is invalid: the worker is at fault.
    fn publish(
        &self,
        json: &str,
        head: EventHead<'_>,
    ) -> impl Future<Output = Result<(), InvalidEvent>> + Send;

    /// Shows staged streaming deltas once their text is stored; called whenever the worker has
    /// no further frame queued, so a burst of deltas costs one write.
    fn flush_deltas(&self) -> impl Future<Output = ()> + Send;

    /// The run result the worker reported for `run_id`.
    fn set_result(&self, run_id: &str, json: String) -> impl Future<Output = ()> + Send;

    /// The worker asked for a model call (one iteration of its run).
    fn note_model_request(&self) -> impl Future<Output = ()> + Send;

    /// The worker's process of `generation` is gone, for `reason`; `cause` is why the
    /// supervisor stopped it, when it did so on purpose for a reason the run's client must
    /// hear. Called exactly once per worker.
    fn worker_exited(
        &self,
        generation: u64,
        reason: String,
        cause: Option<StopCause>,
    ) -> impl Future<Output = ()> + Send;
}

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
    /// Its host uid or disk quota could not be had: its process is never started.
    #[error("could not start the worker process: {0}")]
    Provision(#[from] ProvisionError),
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
    /// What the worker reported about its jail, as accepted by the supervisor (the isolation
    /// suite reads it back).
    #[cfg(feature = "isolation-tests")]
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
/// default model; the worker learns only the selector, never a key or a URL.
fn agent_settings(ctx: &Context, stored: Option<&SessionInfo>) -> AgentSettings {
    let agent = &ctx.agent;
    let selected = stored
        .and_then(|info| info.metadata.as_ref())
        .and_then(|metadata| metadata.get("modelConfig"));
    let model = ctx.gateway.catalogue().for_selector(selected);
    AgentSettings {
        agent_name: agent.name.clone(),
        model: model.selector(),
        instructions: agent.instructions.clone(),
        max_iterations: agent.max_iterations,
        temperature: agent.temperature,
        streaming_tool_call_events: true,
        // The model's own window and output budget feed the worker's trimming of the
        // conversation; unset keys leave the worker's defaults.
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
pub async fn start<S: SessionLink>(
    ctx: &Arc<Context>,
    session: &Arc<S>,
    generation: u64,
) -> Result<WorkerHandle, WorkerError> {
    let began = Instant::now();
    let (id, workspace) = (session.id(), session.workspace());
    let history: Vec<String> = ctx
        .storage
        .events_after(id, 0, usize::MAX)
        .await?
        .into_iter()
        .map(|e| e.json.to_string())
        .collect();
    let stored = ctx.storage.session(id).await?;
    // Its identity and its disk quota are in place before its process exists.
    ctx.provisioner.host_id(id).await?;
    ctx.provisioner.ensure(id, workspace).await?;
    let spawning = std::time::Instant::now();
    let spawn::Spawned {
        mut child,
        channel,
        jail,
    } = ctx.spawner.spawn(id, workspace).await?;
    let pid = child.id().unwrap_or_default();
    let spawn_us = spawning.elapsed().as_micros() as u64;
    let (mut read, mut write) = channel.into_split();
    let isolation = &ctx.isolation;
    let mut jail_us = 0;

    let init = ToWorker::Init(Box::new(Init {
        protocol_version: PROTOCOL_VERSION,
        session_id: id.to_string(),
        // The workspace as the worker sees it: `/workspace` in a strict jail, `/` in a chroot.
        workspace: isolation.workspace_inside(workspace),
        agent: agent_settings(ctx, stored.as_ref()),
        history,
    }));
    // First the jail's self-audit (what its jail achieved), checked before the session is used; then Init/Ready.
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
            // A session that never started leaves nothing: its processes and cgroup go now.
            let _ = child.wait().await;
            let mut jail = jail;
            jail.teardown().await;
            return Err(WorkerError::Handshake(reason));
        }
    };
    tracing::debug!(session_id = %id, audit = ?audit, "jail audit accepted");

    let (outbox, queued) = mpsc::channel(OUTBOX_CAPACITY);
    tokio::spawn(write_frames(write, queued));
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(log_stderr(id.clone(), stderr));
    }
    let handle = WorkerHandle {
        pid,
        started_at: now_ms(),
        start_duration: began.elapsed(),
        generation,
        #[cfg(feature = "isolation-tests")]
        audit: Arc::from(audit),
        outbox,
        kill: CancellationToken::new(),
        stop_cause: Arc::default(),
        exited: CancellationToken::new(),
        #[cfg(feature = "isolation-tests")]
        probes: probes::Pending::default(),
    };
    let span = tracing::info_span!("worker", session_id = %id, pid);
    tokio::spawn(
        Connection {
            ctx: ctx.clone(),
            session: session.clone(),
            handle: handle.clone(),
            model_calls: HashMap::new(),
            budget: limits::EventBudget::new(&ctx.limits),
            jail,
        }
        .run(child, read)
        .instrument(span),
    );
    // Spawn, jail, audit and handshake together: the latency a session's first query pays.
    let startup_us = spawning.elapsed().as_micros() as u64;
    tracing::info!(session_id = %id, pid, spawn_us, jail_us, startup_us, "worker ready");
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

/// How a worker's process ended, in words for its session's error event.
pub(crate) fn describe_exit(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.signal().is_some() => {
            format!("killed by signal {}", s.signal().unwrap_or_default())
        }
        Some(s) => format!("exited with status {}", s.code().unwrap_or_default()),
        None => "exit status unknown".to_owned(),
    }
}
