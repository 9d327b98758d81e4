//! Operations on worker processes: the live list (with memory), and restarting or stopping one
//! session's worker without touching its history or its subscribers.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::body::{JsonObject, Params, session_id};
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /api/v1/workers`: one entry per session that has a live worker.
pub(super) async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut workers = Vec::new();
    for session in state.sessions.all() {
        if let Some(worker) = session.worker().await {
            let running = session.is_running().await;
            workers.push(json!({
                "sessionId": session.id,
                "pid": worker.pid,
                "state": if running { "running" } else { "idle" },
                "startedAt": worker.started_at,
                "rssKib": resident_kib(worker.pid).await,
            }));
        }
    }
    Json(json!({"workers": workers}))
}

/// The resident set of a process in KiB (`VmRSS` of `/proc/<pid>/status`); `None` when the
/// process is already gone or the kernel does not say.
async fn resident_kib(pid: u32) -> Option<u64> {
    let status = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
        .await
        .ok()?;
    vm_rss_kib(&status)
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// `POST /api/v1/sessions/restart {sessionId}`: replaces the session's worker with a fresh one
/// (a run in progress ends as an error). The new worker rebuilds the conversation from the
/// stored log; followers and sockets stay attached to the session and see what follows.
pub(super) async fn restart(
    State(state): State<Arc<AppState>>,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let session = state.session(&session_id(&params, Some(&body))?).await?;
    let pid = session.restart_worker(&state).await?;
    tracing::info!(session_id = %session.id, pid, "worker restarted on request");
    Ok(Json(
        json!({"success": true, "sessionId": session.id, "pid": pid}),
    ))
}

/// `POST /api/v1/sessions/stop {sessionId}`: stops the session's worker (a run in progress ends
/// as an error); the next query starts a new one. `stopped` says whether one was running.
pub(super) async fn stop(
    State(state): State<Arc<AppState>>,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let session = state.session(&session_id(&params, Some(&body))?).await?;
    let stopped = session.worker().await.is_some();
    session.stop_worker().await;
    tracing::info!(session_id = %session.id, stopped, "worker stopped on request");
    Ok(Json(
        json!({"success": true, "sessionId": session.id, "stopped": stopped}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_from_proc_status() {
        let status = "Name:\tsupervisor\nVmPeak:\t  9000 kB\nVmRSS:\t    3120 kB\nThreads:\t1\n";
        assert_eq!(vm_rss_kib(status), Some(3120));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[tokio::test]
    async fn our_own_rss_is_read() {
        assert!(
            resident_kib(std::process::id())
                .await
                .is_some_and(|k| k > 0)
        );
    }
}
