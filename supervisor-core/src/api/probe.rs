//! Test builds only (feature `isolation-tests`): the HTTP side of the in-jail probe server the
//! isolation tests drive. `POST /api/v1/debug/probe {sessionId, name, args}` runs a probe (a
//! `shared::probe::Probe`, named by `name` with `args` as its fields) inside the session's live
//! worker and answers `{ok, errno, errname, detail}`; `GET /api/v1/debug/jail?sessionId=`
//! returns the worker's accepted self-audit. Release builds have no such routes.

#[cfg(not(feature = "isolation-tests"))]
pub(super) fn routes(table: super::Table) -> super::Table {
    table
}

/// Admin only: a probe runs inside any session's jail.
#[cfg(feature = "isolation-tests")]
pub(super) fn routes(table: super::Table) -> super::Table {
    use crate::auth::Access::Admin;
    use axum::routing::{get, post};
    table
        .route("/api/v1/debug/probe", &["POST"], Admin, post(debug::probe))
        .route("/api/v1/debug/jail", &["GET"], Admin, get(debug::jail))
}

#[cfg(feature = "isolation-tests")]
mod debug {
    use std::sync::Arc;

    use axum::Json;
    use axum::extract::State;
    use serde_json::{Value, json};

    use shared::ids::SessionId;
    use shared::probe::Probe;

    use crate::api::body::{JsonObject, Params, session_id};
    use crate::error::ApiError;
    use crate::state::AppState;
    use crate::workers::WorkerHandle;

    async fn live_worker(state: &AppState, id: &SessionId) -> Result<WorkerHandle, ApiError> {
        let session = state.session(id).await?;
        session
            .worker()
            .await
            .ok_or_else(|| ApiError::WorkerUnavailable {
                session: id.to_string(),
                reason: "no live worker (run a query first)".into(),
            })
    }

    pub(super) async fn probe(
        State(state): State<Arc<AppState>>,
        params: Params,
        JsonObject(body): JsonObject,
    ) -> Result<Json<Value>, ApiError> {
        let id = session_id(&params, Some(&body))?;
        let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
        let args = body.get("args").cloned().unwrap_or(json!({}));
        let probe = Probe::from_name_and_args(name, args)
            .map_err(|e| ApiError::InvalidRequest(format!("probe {name:?}: {e}")))?;
        let worker = live_worker(&state, &id).await?;
        let outcome = worker
            .probe(probe)
            .await
            .map_err(|e| ApiError::WorkerUnavailable {
                session: id.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Json(json!({
            "ok": outcome.ok,
            "errno": outcome.errno,
            "errname": outcome.errname,
            "detail": serde_json::from_str::<Value>(&outcome.detail).unwrap_or(Value::Null),
        })))
    }

    pub(super) async fn jail(
        State(state): State<Arc<AppState>>,
        params: Params,
    ) -> Result<Json<Value>, ApiError> {
        let id = session_id(&params, None)?;
        let worker = live_worker(&state, &id).await?;
        let audit = serde_json::to_value(worker.audit.as_ref())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(Json(json!({"launcherPid": worker.pid, "audit": audit})))
    }
}
