//! The session's agent: handshake, then one run at a time, each in its own task so that aborts
//! and model replies keep flowing while it works.

mod memory;
mod references;
mod run;
mod tools;
mod walk;
mod workspace;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use shared::events::Event;
use shared::frame::read_frame;
use shared::protocol::{AgentSettings, FromWorker, ModelReply, PROTOCOL_VERSION, ToWorker};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::WorkerError;
use crate::channel::{Outbox, spawn_writer};
use crate::jail::Confinement;

/// Why the `Init`/`Ready` handshake with the supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("expected Init, got {0}")]
    NotInit(&'static str),
    #[error("supervisor closed the channel")]
    Closed,
    #[error("supervisor speaks protocol {supervisor}, this worker {PROTOCOL_VERSION}")]
    Version { supervisor: u32 },
    #[error("Init names a different session")]
    OtherSession,
    #[error("channel closed before Ready")]
    ClosedBeforeReady,
    #[error("second Init")]
    SecondInit,
}

/// Stored events of the session, oldest first: the agent's whole memory.
pub(crate) type History = Arc<Mutex<Vec<Event>>>;

/// Where gateway replies go: one queue per in-flight model request.
#[derive(Clone, Default)]
pub(crate) struct ModelRoutes(Arc<Mutex<HashMap<String, mpsc::UnboundedSender<ModelReply>>>>);

impl ModelRoutes {
    pub(crate) fn register(&self, id: &str) -> mpsc::UnboundedReceiver<ModelReply> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), tx);
        rx
    }

    pub(crate) fn unregister(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Hands a reply to its request. Late replies for a cancelled request are dropped.
    fn deliver(&self, reply: ModelReply) {
        let routes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = routes.get(reply.request_id()) {
            let _ = tx.send(reply);
        }
    }
}

/// What every run of this session shares.
#[derive(Clone)]
pub(crate) struct Agent {
    pub(crate) session_id: String,
    pub(crate) settings: Arc<AgentSettings>,
    pub(crate) history: History,
    /// The history's turns as model messages, kept between calls (see `memory::TurnCache`).
    pub(crate) turns: Arc<Mutex<memory::TurnCache>>,
    /// The tools' definitions as the JSON array each model request carries: they never change
    /// during a worker's life.
    pub(crate) tool_definitions: Arc<str>,
    pub(crate) outbox: Outbox,
    pub(crate) models: ModelRoutes,
    /// The session's workspace, which every tool is confined to.
    pub(crate) workspace: tools::WorkspaceSlot,
    /// The jail's limits and whether programs can run, for the tools.
    pub(crate) confinement: Arc<Confinement>,
}

struct CurrentRun {
    run_id: String,
    abort: run::Abort,
    task: tokio::task::JoinHandle<()>,
}

/// Speaks the worker protocol on `stream` until the supervisor closes it.
pub(crate) async fn serve(
    session_id: &str,
    confinement: Confinement,
    stream: UnixStream,
) -> Result<(), WorkerError> {
    let (read, write) = stream.into_split();
    // Buffered: frames arrive in bursts, and each would otherwise cost two reads.
    let mut read = tokio::io::BufReader::with_capacity(64 * 1024, read);
    let outbox = spawn_writer(write);

    let init = match read_frame::<_, ToWorker>(&mut read).await? {
        Some(ToWorker::Init(init)) => init,
        Some(other) => return Err(HandshakeError::NotInit(name(&other)).into()),
        None => return Err(HandshakeError::Closed.into()),
    };
    if init.protocol_version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            supervisor: init.protocol_version,
        }
        .into());
    }
    if init.session_id != session_id {
        return Err(HandshakeError::OtherSession.into());
    }
    let history = memory::parse_history(&init.history);
    // A workspace that cannot be opened (removed behind our back) leaves the agent able to
    // talk; every tool call then says why it cannot run.
    let workspace = workspace::Workspace::open(Path::new(&init.workspace))
        .map(Arc::new)
        .map_err(Arc::new);
    if let Err(error) = &workspace {
        tracing::warn!(session_id = %init.session_id, %error, "workspace unavailable");
    }
    let agent = Agent {
        session_id: init.session_id,
        settings: Arc::new(init.agent),
        history: Arc::new(Mutex::new(history)),
        turns: Arc::default(),
        tool_definitions: tools::definitions_json(&confinement),
        outbox,
        models: ModelRoutes::default(),
        workspace,
        confinement: Arc::new(confinement),
    };
    agent
        .outbox
        .send(FromWorker::Ready {
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
        })
        .await
        .map_err(|_| HandshakeError::ClosedBeforeReady)?;

    let mut current: Option<CurrentRun> = None;
    while let Some(msg) = read_frame::<_, ToWorker>(&mut read).await? {
        match msg {
            ToWorker::Query(query) => {
                if current.as_ref().is_some_and(|run| !run.task.is_finished()) {
                    // The supervisor allows one run per session; a second one is a protocol
                    // slip on its side, answered without touching the running one.
                    tracing::warn!(run_id = %query.run_id, "query while a run is executing; ignored");
                    continue;
                }
                let abort = run::Abort::default();
                let run_id = query.run_id.clone();
                let task = tokio::spawn(run::execute(agent.clone(), query, abort.clone()));
                current = Some(CurrentRun {
                    run_id,
                    abort,
                    task,
                });
            }
            ToWorker::Abort { run_id, reason } => {
                if let Some(run) = current.as_ref().filter(|run| run.run_id == run_id) {
                    run.abort.abort(reason);
                }
            }
            ToWorker::Model(reply) => agent.models.deliver(reply),
            ToWorker::Init(_) => return Err(HandshakeError::SecondInit.into()),
            // The probe server in front of the agent answers these; without it, the
            // supervisor has no probe to send.
            #[cfg(feature = "isolation-tests")]
            ToWorker::Probe(_) => {}
        }
    }
    // The supervisor is gone: nobody can receive what a run would still produce.
    if let Some(run) = current {
        run.abort.cancel();
        run.task.abort();
    }
    Ok(())
}

/// A message's variant, for the error that says it came out of turn.
fn name(msg: &ToWorker) -> &'static str {
    match msg {
        ToWorker::Init(_) => "Init",
        ToWorker::Query(_) => "Query",
        ToWorker::Abort { .. } => "Abort",
        ToWorker::Model(_) => "Model",
        #[cfg(feature = "isolation-tests")]
        ToWorker::Probe(_) => "Probe",
    }
}
