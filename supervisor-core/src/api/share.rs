//! Sharing endpoints (api.md §3.10, §7.8); the work is in `crate::share`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::body::{JsonObject, Params, session_id};
use crate::error::ApiError;
use crate::share::{ShareError, Shared};
use crate::state::AppState;

/// `GET /api/v1/share/config`.
pub(super) async fn config(State(state): State<Arc<AppState>>) -> Json<Value> {
    let provider = state.sharing.provider_url();
    Json(json!({"hasShareProvider": provider.is_some(), "shareProvider": provider}))
}

/// `POST /api/v1/sessions/share {sessionId, upload?}`: the replay page (`html`), or, with
/// `upload: true` and a provider configured, the URL it was uploaded to (`url`).
pub(super) async fn share(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, Some(&body))?)
        .await?;
    let upload = body.get("upload").and_then(Value::as_bool).unwrap_or(false);
    match state
        .sharing
        .share(&session.id, &session.workspace, upload)
        .await
    {
        Ok(Shared::Html(html)) => Ok(Json(
            json!({"success": true, "html": html, "sessionId": session.id}),
        )),
        Ok(Shared::Url(url)) => Ok(Json(
            json!({"success": true, "url": url, "sessionId": session.id}),
        )),
        Err(ShareError::SessionNotFound) => Err(ApiError::SessionNotFound(session.id.to_string())),
        Err(ShareError::Storage(e)) => Err(ApiError::Storage(e)),
        Err(e) => Err(ApiError::ShareFailed(e.to_string())),
    }
}
