//! The tenant's view of itself (`GET /api/v1/usage`), the audit log (`GET /api/v1/audit`,
//! admins), and the per-tenant request rate every API request passes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::body::Params;
use crate::error::ApiError;
use crate::principal::Principal;
use crate::state::AppState;

/// `GET /api/v1/usage`: the caller's tenant's use against each of its limits.
pub(super) async fn usage(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .quotas
            .usage(&state.storage, &state.sessions, &principal.tenant)
            .await?,
    ))
}

/// `GET /api/v1/audit?before=&limit=`: the audit log, newest first (admins only).
pub(super) async fn audit(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::AdminOnly);
    }
    let number = |key: &str| {
        params
            .get(key)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::InvalidRequest(format!("{key} must be a non-negative integer"))
                })
            })
            .transpose()
    };
    let before = number("before")?;
    let limit = number("limit")?.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    Ok(Json(crate::ops::audit(&state, before, limit).await?))
}

/// Refuses a request over its tenant's `requestsPerSecond` with 429 `RATE_LIMITED`, before any
/// handler runs. `/api/v1/health` is left out: probes are not a tenant's traffic.
pub(super) async fn rate_limit(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/api/v1/health" || !(path.starts_with("/api/") || path.starts_with("/s/")) {
        return next.run(request).await;
    }
    // A request without a principal (a public route before login) has no tenant to charge;
    // the routes that need one refuse it themselves.
    if let Some(principal) = request.extensions().get::<Principal>()
        && let Err(refused) = state.quotas.check_rate(&principal.tenant)
    {
        return refused.into_response();
    }
    next.run(request).await
}
