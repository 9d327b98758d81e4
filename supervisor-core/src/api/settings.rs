//! Per-session runtime settings (api.md §7.4, §7.5): the configured schema, a session's
//! values, and replacing them.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};
use shared::ids::{SessionId, now_ms};

use super::body::{JsonObject, Params, session_id};
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /api/v1/runtime-settings[?sessionId=]`: the schema, and the session's values completed
/// with the schema's defaults (`{}` without a session). Not under the restore rule: an unknown
/// session simply has no values.
pub(super) async fn get(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let Some(configured) = &state.config.server.runtime_settings else {
        return Ok(Json(
            json!({"schema": {"type": "object", "properties": {}}, "currentValues": {}}),
        ));
    };
    let schema = &configured.schema;
    let Some(id) = params.get("sessionId").filter(|id| !id.is_empty()) else {
        return Ok(Json(json!({"schema": schema, "currentValues": {}})));
    };
    // An id that cannot be one, or names another tenant's session, has no stored settings.
    let stored = if let Ok(id) = SessionId::parse(id) {
        state
            .storage
            .session(&id)
            .await?
            .filter(|info| crate::auth::may_access(&principal, info.tenant()))
            .and_then(|info| info.metadata)
            .and_then(|m| m.get("runtimeSettings").and_then(Value::as_object).cloned())
            .unwrap_or_default()
    } else {
        Map::new()
    };
    Ok(Json(
        json!({"schema": schema, "currentValues": with_defaults(stored, schema)}),
    ))
}

/// `values` completed with the `default` of every schema property it lacks.
fn with_defaults(mut values: Map<String, Value>, schema: &Value) -> Map<String, Value> {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (key, property) in properties {
            if let Some(default) = property.get("default")
                && values.get(key).is_none_or(Value::is_null)
            {
                values.insert(key.clone(), default.clone());
            }
        }
    }
    values
}

/// `POST /api/v1/runtime-settings {sessionId, runtimeSettings}`: replaces the session's
/// settings. Upstream rebuilds the agent because a configured transform may turn settings into
/// agent options; a declarative config has no such transform, so the worker is left as it is.
pub(super) async fn set(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&params, Some(&body))?;
    let settings = body
        .get("runtimeSettings")
        .filter(|v| v.is_object())
        .cloned()
        .ok_or(ApiError::RuntimeSettingsRequired)?;
    let session = state.session_for(&principal, &id).await?;
    let mut patch = Map::new();
    patch.insert("runtimeSettings".into(), settings.clone());
    let info = state
        .storage
        .merge_metadata(&session.id, patch, now_ms())
        .await?;
    Ok(Json(
        json!({"session": state.shown(info), "runtimeSettings": settings}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_is_missing() {
        let schema = json!({"type": "object", "properties": {
            "a": {"type": "boolean", "default": true},
            "b": {"type": "string", "default": "x"},
            "c": {"type": "number"},
        }});
        let values = json!({"b": "y"}).as_object().cloned().unwrap();
        assert_eq!(
            Value::Object(with_defaults(values, &schema)),
            json!({"a": true, "b": "y"})
        );
    }
}
