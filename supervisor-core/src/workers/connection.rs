//! One worker's connection: the task that owns the worker, reads its frames, dispatches them
//! (events to its session, model calls to the gateway), watches the process, and reports its
//! exit to the session exactly once. Everything from the worker is untrusted: frames are size
//! checked by the codec, events are validated and counted against the session's limits before
//! they are stored, and any protocol violation or exceeded limit kills the worker rather than
//! the supervisor.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use shared::frame::{FrameError, read_frame};
use shared::protocol::FromWorker;
use tokio::io::BufReader;
use tokio::net::unix::OwnedReadHalf;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::limits::{EventBudget, LimitExceeded};
use super::spawn::SessionJail;
use super::{Context, SessionLink, StopCause, WorkerHandle, describe_exit};
use crate::live_text::{EventHead, InvalidEvent};
use crate::metrics::METRICS;

/// How long a dying worker's last frames are awaited after its process has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// Model calls one worker may have in flight (its agent loop makes one at a time).
const MAX_MODEL_CALLS: usize = 4;

/// What the worker did that the supervisor will not accept.
#[derive(Debug, thiserror::Error)]
/// What the worker did that the supervisor will not accept.
enum Violation {
    #[error("invalid event: {0}")]
    Event(#[from] InvalidEvent),
    #[error("invalid event: run result is not JSON")]
    ResultNotJson,
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("too many model calls in flight")]
    TooManyModelCalls,
    #[error("{0}")]
    Limit(LimitExceeded),
}

pub(super) struct Connection<S> {
    pub(super) ctx: Arc<Context>,
    pub(super) session: Arc<S>,
    pub(super) handle: WorkerHandle,
    pub(super) model_calls: HashMap<String, (CancellationToken, JoinHandle<()>)>,
    /// What the session may still send (`server.sessionLimits`).
    pub(super) budget: EventBudget,
    /// The host side of the worker's jail: its identity and cgroup (removed when it is gone).
    pub(super) jail: SessionJail,
}

impl<S: SessionLink> Connection<S> {
    /// Serves the worker until its process is gone, then tells the session, once.
    pub(super) async fn run(mut self, mut child: Child, read: OwnedReadHalf) {
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
                                self.session.flush_deltas().await;
                            }
                        }
                        // Stopped at once: whatever else it sends would be refused too, and a
                        // worker that keeps flooding would keep the supervisor busy.
                        Err(Violation::Limit(limit)) => {
                            tracing::warn!(%limit, limit_key = limit.key(), "session limit exceeded; stopping the worker");
                            METRICS.limit_kills.inc();
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
        // Whatever the session left behind (processes, its cgroup) goes with it.
        self.jail.teardown().await;
        tracing::info!(%reason, "worker gone");
        self.session
            .worker_exited(self.handle.generation, reason, cause)
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
        let isolation = &self.ctx.isolation;
        if let Some(limit) = self.jail.limit_hit() {
            if limit == "memory" {
                METRICS.oom_kills.inc();
            } else {
                METRICS.limit_kills.inc();
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
                let head = EventHead::of(&json)?;
                // Admitted here once, whether it is stored at once or, a delta, held back until
                // its text is written: a delta's text is stored too (see `live_text`).
                self.budget
                    .admit(json.len(), self.session.stored_bytes())
                    .map_err(Violation::Limit)?;
                Ok(self.session.publish(&json, head).await?)
            }
            FromWorker::RunResult { run_id, json } => {
                self.budget
                    .check_size(json.len())
                    .map_err(Violation::Limit)?;
                if serde_json::from_str::<serde_json::Value>(&json).is_err() {
                    return Err(Violation::ResultNotJson);
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
                let task = self.ctx.gateway.start(
                    self.session.id(),
                    self.session.tenant(),
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

/// Reads the worker's frames into `frames` until its channel ends or a frame is bad.
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
