//! Server-level endpoints: health (upstream's and the seed's), version and agent options
//! (models are in `models.rs`, workers in `workers.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::metrics::Gauges;
use crate::state::AppState;

/// Public: whether the server answers, and whether it is open to anyone (a server started with
/// `--allow-unauthenticated` says so to every caller, which they may as well know).
pub(super) async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut body = json!({"status": "ok"});
    if unauthenticated(&state) {
        body["unauthenticated"] = json!(true);
    }
    Json(body)
}

/// A non-loopback server with no `[auth]` method (`--allow-unauthenticated`).
fn unauthenticated(state: &AppState) -> bool {
    !state.auth.enforced() && !crate::auth::guard::is_loopback_host(&state.config.server.host)
}

/// The seed's health report (api.md §17 row 3), plus workers, model and isolation level. Its
/// details (counts, storage, model, isolation) are for admins; anyone else gets the status.
pub(super) async fn system_health(
    State(state): State<Arc<AppState>>,
    principal: Option<crate::principal::Principal>,
) -> Result<Json<Value>, ApiError> {
    if !principal.is_some_and(|p| p.is_admin()) {
        let mut body = json!({"status": "healthy"});
        if unauthenticated(&state) {
            body["unauthenticated"] = json!(true);
        }
        return Ok(Json(body));
    }
    let total = state.storage.count_sessions().await?;
    let mut live_workers = 0;
    for session in state.sessions.all() {
        if session.worker().await.is_some() {
            live_workers += 1;
        }
    }
    let model = state.config.default_model();
    // The type only: where the store lives is the operator's business (`supervisor ctl`);
    // a database's URL is shown with its password masked, for telling nodes' stores apart.
    let descriptor = state.storage.descriptor();
    let mut storage = json!({"type": descriptor.kind});
    if let Some(url) = descriptor.url {
        storage["url"] = json!(url);
    }
    Ok(Json(json!({
        "status": "healthy",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": state.started.elapsed().as_secs(),
        "sessions": {"active": state.sessions.len(), "total": total},
        "workers": {"live": live_workers},
        "storage": storage,
        "model": {"provider": model.provider, "id": model.id, "offline": model.provider == "echo"},
        "isolation": state.isolation.clone().report(),
        "auth": {"required": state.auth.enforced(), "unauthenticated": unauthenticated(&state)},
    })))
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// Sanitised agent options (api.md §7.3): never a key, a URL or headers.
pub(super) async fn agent_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    let config = &state.config;
    // What a session's agent sees as its workspace, not where the server keeps them.
    let workspace = state.isolation.workspace_inside(&state.workspace_root);
    let workspace_name = std::path::Path::new(&workspace)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let mut options = json!({
        "name": config.agent_name(),
        "model": state.model_json(),
        "maxIterations": config.max_iterations,
        "temperature": config.temperature,
        "toolCallEngine": "native",
        "workspace": workspace,
        "workspaceName": workspace_name.unwrap_or_else(|| "workspace".into()),
        "isolation": state.isolation.clone().summary(),
    });
    if let Some(instructions) = &config.instructions {
        let short: String = instructions.chars().take(100).collect();
        options["instructions"] = json!(if short.len() < instructions.len() {
            format!("{short}...")
        } else {
            short
        });
    }
    Json(json!({"options": options}))
}

/// The live worker processes, one per session that has one.
pub(super) async fn workers(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"workers": crate::ops::workers(&state).await}))
}

/// Replaces a session's worker (history and followers kept).
pub(super) async fn restart(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: super::body::Params,
    super::body::JsonObject(body): super::body::JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = super::body::session_id(&params, Some(&body))?;
    Ok(Json(crate::ops::restart(&state, &principal, &id).await?))
}

/// Stops a session's worker; its next query starts a new one.
pub(super) async fn stop(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: super::body::Params,
    super::body::JsonObject(body): super::body::JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = super::body::session_id(&params, Some(&body))?;
    Ok(Json(crate::ops::stop(&state, &principal, &id).await?))
}

/// `GET /metrics`: the counters, and the gauges of the present gathered here.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let sessions = state.sessions.all();
    let mut gauges = Gauges {
        sessions_live: sessions.len(),
        workers: Vec::new(),
        follower_lags: Vec::with_capacity(sessions.len()),
        uptime: state.started.elapsed(),
    };
    for session in &sessions {
        if let Some(worker) = session.worker().await {
            gauges.workers.push((session.id.to_string(), worker.pid));
        }
        let lag = session.bus.max_follower_lag();
        gauges.follower_lags.push((session.id.to_string(), lag));
    }
    let mut body = crate::metrics::render(&gauges);
    body.push_str(&state.quotas.render_metrics(&state.sessions));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
