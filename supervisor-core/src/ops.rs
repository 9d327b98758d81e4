//! Operations on a running server, offered both over HTTP (`/api/v1/workers`,
//! `/api/v1/sessions/restart`, `/api/v1/sessions/stop`) and over the control socket
//! (`supervisor ctl ...`), so the two can never disagree.

use std::sync::Arc;

use nix::unistd::{SysconfVar, sysconf};
use serde_json::{Value, json};
use shared::ids::{SessionId, now_ms};

use crate::audit;
use crate::error::ApiError;
use crate::principal::Principal;
use crate::state::AppState;

/// Every live worker: session, pid, state, uptime, memory, CPU time, events published and the
/// workspace's host path.
pub async fn workers(state: &AppState) -> Vec<Value> {
    let mut report = Vec::new();
    for session in state.sessions.all() {
        let Some(worker) = session.worker().await else {
            continue;
        };
        let running = session.activity.is_running();
        let mut entry = json!({
            "sessionId": session.id,
            "pid": worker.pid,
            "state": if running { "running" } else { "idle" },
            "startedAt": worker.started_at,
            "uptimeSecs": now_ms().saturating_sub(worker.started_at) / 1000,
            // Microsecond resolution: a jailed start takes a few milliseconds.
            "startMs": (worker.start_duration.as_secs_f64() * 1e6).round() / 1e3,
            "events": session.bus.latest(),
            // Where it lives on the host: for operators; session clients see the jail's path.
            "workspace": session.workspace,
        });
        if let Some(rss) = crate::metrics::rss_kib(worker.pid) {
            entry["rssKib"] = json!(rss);
        }
        if let Some(cpu) = cpu_seconds(worker.pid) {
            entry["cpuSecs"] = json!(cpu);
        }
        report.push(entry);
    }
    report.sort_by(|a, b| a["sessionId"].as_str().cmp(&b["sessionId"].as_str()));
    report
}

/// Every stored session, with whether it is loaded and has a worker, and its workspace's host
/// path.
///
/// # Errors
/// Storage failure.
pub async fn sessions(state: &AppState) -> Result<Vec<Value>, ApiError> {
    let ids = state.storage.ids_by_recency().await?;
    let mut rows = Vec::with_capacity(ids.len());
    // A page of records at a time: each row keeps only a few small fields of its record.
    for page in ids.chunks(64) {
        for info in state.storage.sessions_by_ids(page).await? {
            let live = SessionId::parse(&info.id)
                .ok()
                .and_then(|id| state.sessions.get(&id));
            rows.push(json!({
                "sessionId": info.id,
                "name": info.metadata.as_ref().and_then(|m| m.get("name")).cloned().unwrap_or(Value::Null),
                "updatedAt": info.updated_at,
                "loaded": live.is_some(),
                "worker": live.as_ref().is_some_and(|s| s.activity.has_worker()),
                "running": live.as_ref().is_some_and(|s| s.activity.is_running()),
                "workspace": info.workspace,
            }));
        }
    }
    Ok(rows)
}

/// Replaces one session's worker; the others are not touched.
///
/// # Errors
/// Unknown session, a run in progress, or a worker that cannot start.
pub async fn restart(
    state: &Arc<AppState>,
    principal: &Principal,
    session_id: &SessionId,
) -> Result<Value, ApiError> {
    let restarted = async {
        let session = state.session(session_id).await?;
        let worker = state.restart_worker(&session).await?;
        Ok(json!({"success": true, "sessionId": session.id, "pid": worker.pid}))
    }
    .await;
    audited(
        state,
        principal,
        audit::Action::WorkerRestart,
        session_id,
        &restarted,
    )
    .await;
    restarted
}

async fn audited(
    state: &AppState,
    principal: &Principal,
    action: audit::Action,
    session_id: &SessionId,
    result: &Result<Value, ApiError>,
) {
    let (outcome, detail) = match result {
        Ok(_) => (audit::Outcome::Ok, None),
        Err(e) => (audit::Outcome::Failed, Some(e.to_string())),
    };
    audit::record(
        &*state.storage,
        Some(principal),
        action,
        session_id,
        outcome,
        detail.as_deref(),
    )
    .await;
}

/// Stops one session's worker (a running run ends as an error); the next query starts a new one.
/// `stopped` says whether there was a worker to stop.
///
/// # Errors
/// Unknown session.
pub async fn stop(
    state: &AppState,
    principal: &Principal,
    session_id: &SessionId,
) -> Result<Value, ApiError> {
    let stopped = async {
        let session = state.session(session_id).await?;
        let had_worker = session.activity.has_worker();
        session.stop_worker().await;
        Ok(json!({"success": true, "sessionId": session.id, "stopped": had_worker}))
    }
    .await;
    audited(
        state,
        principal,
        audit::Action::WorkerStop,
        session_id,
        &stopped,
    )
    .await;
    stopped
}

/// The audit log, newest first: up to `limit` entries (at most [`AUDIT_PAGE_MAX`]) with an id
/// below `before`, and the cursor of the next page (`null` on the last).
///
/// # Errors
/// Storage failure.
pub async fn audit(
    state: &AppState,
    before: Option<u64>,
    limit: Option<usize>,
) -> Result<Value, ApiError> {
    let limit = limit.unwrap_or(AUDIT_PAGE_DEFAULT).clamp(1, AUDIT_PAGE_MAX);
    let mut entries = state.storage.audit_page(before, limit + 1).await?;
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next = entries.last().filter(|_| more).map(|e| e.id);
    Ok(json!({"success": true, "entries": entries, "nextBefore": next}))
}

/// The largest page of the audit log.
pub const AUDIT_PAGE_MAX: usize = 500;
const AUDIT_PAGE_DEFAULT: usize = 100;

/// Refuses new runs (running ones finish), or takes them again.
pub fn set_draining(state: &AppState, draining: bool) -> Value {
    state.admission.set_draining(draining);
    tracing::info!(draining, "drain mode changed");
    json!({"success": true, "draining": draining})
}

/// A token record as the operator sees it: everything but the hash.
fn shown_token(token: &crate::storage::TokenRecord) -> Value {
    let mut value = json!(token);
    if let Some(fields) = value.as_object_mut() {
        fields.remove("hash");
    }
    value
}

/// Creates an API token; the answer holds its secret, which is shown nowhere else.
///
/// # Errors
/// A bad tenant, user or name; storage failed.
pub async fn create_token(
    state: &AppState,
    new: crate::auth::tokens::NewToken,
) -> Result<Value, ApiError> {
    use crate::auth::tokens::TokenError;
    let (record, secret) = crate::auth::tokens::create(&*state.storage, new, now_ms())
        .await
        .map_err(|e| match e {
            TokenError::Invalid(message) => ApiError::InvalidRequest(message),
            TokenError::Storage(e) => e.into(),
        })?;
    crate::auth::record(&crate::auth::Event::TokenCreated {
        id: &record.id,
        tenant: &record.tenant,
    });
    let mut answer = json!({"success": true, "token": shown_token(&record), "secret": secret});
    if !state.config.auth.as_ref().is_some_and(|a| a.tokens) {
        answer["warning"] = json!("this server does not accept tokens until [auth] tokens = true");
    }
    Ok(answer)
}

/// Every API token, without hashes.
///
/// # Errors
/// Storage failed.
pub async fn list_tokens(state: &AppState) -> Result<Value, ApiError> {
    let tokens: Vec<Value> = state
        .storage
        .tokens()
        .await?
        .iter()
        .map(shown_token)
        .collect();
    Ok(json!({"success": true, "tokens": tokens}))
}

/// Revokes a token: refused from the next request on (tokens are read on every use).
///
/// # Errors
/// Storage failed.
pub async fn revoke_token(state: &AppState, id: &str) -> Result<Value, ApiError> {
    if !state.storage.revoke_token(id, now_ms()).await? {
        return Ok(json!({
            "success": false,
            "code": "TOKEN_NOT_FOUND",
            "message": format!("no token {id}"),
        }));
    }
    crate::auth::record(&crate::auth::Event::TokenRevoked { id });
    Ok(json!({"success": true, "id": id, "revoked": true}))
}

/// User plus system CPU time of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after the last ')' do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = sysconf(SysconfVar::CLK_TCK).ok().flatten()?;
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}
