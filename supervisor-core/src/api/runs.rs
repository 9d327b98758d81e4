//! Queries: non-streaming, streaming (SSE), abort, and the one-shot variants (api.md §4, §6).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use shared::ids::now_ms;
use shared::protocol::AbortReason;

use super::body::{JsonObject, Params, query_input, session_id};
use super::sessions::check_exclusive;
use super::{raw_json, sse};
use crate::error::{ApiError, QueryError};
use crate::principal::Principal;
use crate::sessions::{AbortOutcome, RunOutcome, Session};
use crate::state::AppState;

/// Every failure of this route, a malformed body or a missing field included, has the query
/// family's shape (`error` is an object), so a client reads `error.code` whatever went wrong.
pub(super) async fn query(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Result<Params, ApiError>,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, QueryError> {
    let (params, JsonObject(body)) = (params?, body?);
    let id = session_id(&params, Some(&body))?;
    let input = query_input(&body)?;
    let session = state.session_for(&principal, &id).await?;
    let result = run_to_end(&state, &session, &input).await?;
    Ok(raw_json(format!("{{\"result\":{result}}}")))
}

/// Runs a query and waits for its result (the final `assistant_message`, events.md §3.2).
async fn run_to_end(
    state: &Arc<AppState>,
    session: &Arc<Session>,
    input: &Value,
) -> Result<String, ApiError> {
    let outcome = state.start_run(session, input, false).await?;
    match outcome.await {
        Ok(RunOutcome {
            result: Some(result),
            ..
        }) => Ok(result),
        Ok(RunOutcome {
            worker_lost: Some(reason),
            ..
        }) => Err(ApiError::WorkerCrashed {
            session: session.id.to_string(),
            reason,
        }),
        Ok(RunOutcome { .. }) | Err(_) => Err(ApiError::WorkerCrashed {
            session: session.id.to_string(),
            reason: "the run ended without a result".into(),
        }),
    }
}

pub(super) async fn query_stream(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let id = session_id(&params, Some(&body))?;
    let input = query_input(&body)?;
    let session = state.session_for(&principal, &id).await?;
    let frames = stream_run(&state, &session, &input).await?;
    Ok(sse::response(frames))
}

/// Starts a streaming run and returns its frames: every event from `user_message` to
/// `agent_run_end`. A client that goes away does not stop the run.
async fn stream_run(
    state: &Arc<AppState>,
    session: &Arc<Session>,
    input: &Value,
) -> Result<impl futures::Stream<Item = bytes::Bytes> + Send + 'static, ApiError> {
    // Follow from the current position before starting, so the run's first event is seen.
    let cursor = session.bus.follow_after(session.bus.latest());
    state.start_run(session, input, true).await?;
    let events = session.follow(state.storage.clone(), state.shutdown.clone(), cursor, true);
    Ok(sse::batched(events, sse::event_frame))
}

pub(super) async fn abort(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, Some(&body))?)
        .await?;
    let outcome = session.abort(AbortReason::Requested).await;
    Ok(axum::Json(abort_result(outcome)).into_response())
}

/// The answer to an abort, over HTTP and Socket.IO alike. Upstream clients read only `success`
/// (the official UI clears its "running" flag on `true`); when nothing was running, `reason`
/// tells a person why the abort did nothing, and `state` is the session's unchanged state.
pub(super) fn abort_result(outcome: AbortOutcome) -> Value {
    match outcome {
        AbortOutcome::Aborted => json!({"success": true}),
        AbortOutcome::NothingRunning(status) => json!({
            "success": false,
            "reason": format!(
                "Nothing to abort: no query is running in this session (its state is {}).",
                status.as_str()
            ),
            "state": status.as_str(),
        }),
    }
}

/// `sessionName`/`sessionTags` of a one-shot body as session metadata.
fn oneshot_metadata(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut metadata = Map::new();
    if let Some(name) = body.get("sessionName").filter(|v| !v.is_null()) {
        if !name.is_string() {
            return Err(ApiError::InvalidRequest(
                "sessionName must be a string".into(),
            ));
        }
        metadata.insert("name".into(), name.clone());
    }
    if let Some(tags) = body.get("sessionTags").filter(|v| !v.is_null()) {
        if !tags
            .as_array()
            .is_some_and(|t| t.iter().all(Value::is_string))
        {
            return Err(ApiError::InvalidRequest(
                "sessionTags must be an array of strings".into(),
            ));
        }
        metadata.insert("tags".into(), tags.clone());
    }
    if !metadata.is_empty() {
        metadata.insert("version".into(), json!(1));
    }
    Ok(metadata)
}

/// Creates a session and runs one query in it. The record is created before the agent runs
/// (fixing upstream's ordering bug, api.md §4.4).
/// Failures have the query family's shape, like [`query`]'s.
pub(super) async fn oneshot(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, Response> {
    let failed = |e: ApiError| QueryError(e).into_response();
    let JsonObject(body) = body.map_err(failed)?;
    check_exclusive(&state).map_err(failed)?;
    let input = query_input(&body).map_err(failed)?;
    let metadata = oneshot_metadata(&body).map_err(failed)?;
    let (session, _) = state
        .create_session(&principal, metadata)
        .await
        .map_err(failed)?;
    match run_to_end(&state, &session, &input).await {
        Ok(result) => {
            let id = serde_json::to_string(&session.id).unwrap_or_default();
            Ok(raw_json(format!(
                "{{\"sessionId\":{id},\"result\":{result}}}"
            )))
        }
        Err(e) => {
            let mut body = e.query_body();
            body["sessionId"] = json!(session.id);
            Err((e.status(), axum::Json(body)).into_response())
        }
    }
}

pub(super) async fn oneshot_stream(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    check_exclusive(&state)?;
    let input = query_input(&body)?;
    let metadata = oneshot_metadata(&body)?;
    let (session, _) = state.create_session(&principal, metadata).await?;
    let created =
        json!({"type": "session_created", "sessionId": session.id, "timestamp": now_ms()});
    let first = futures::stream::once(async move { sse::data_frame(&created.to_string()) });
    let frames = stream_run(&state, &session, &input).await?;
    Ok(sse::response(first.chain(frames)))
}
