//! Session records: list, create, details, events, status, update, delete, restore (api.md §3).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use shared::events::RunStatus;
use shared::ids::{SessionId, now_ms};

use super::body::{JsonObject, Params, session_id};
use super::raw_json;
use crate::error::ApiError;
use crate::principal::Principal;
use crate::sessions::Session;
use crate::state::AppState;
use crate::storage::{PageCursor, SessionInfo, StorageError, StoredEvent};

/// The largest page `GET /sessions?limit=` gives; a larger `limit` gets this many.
const MAX_PAGE: usize = 100;
/// The page size when only `cursor` is given.
const DEFAULT_PAGE: usize = 50;
/// Records fetched per step of a full listing, and so at most held per listing at once.
const STREAM_PAGE: usize = 32;

/// `GET /sessions`. With `limit` or `cursor`: one page in creation order, newest first, and
/// `nextCursor` (null on the last page); see [`PageCursor`] for what a walk guarantees.
/// Without either: every session, most recently updated first, as upstream answers; the body
/// is built and streamed a few records at a time.
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Response, ApiError> {
    let limit = number_param(&params, "limit")?;
    let cursor = params
        .get("cursor")
        .filter(|c| !c.is_empty())
        .map(parse_cursor)
        .transpose()?;
    if limit.is_none() && cursor.is_none() {
        return full_listing(state, principal).await;
    }
    let limit = match limit {
        Some(0) => {
            return Err(ApiError::InvalidRequest("limit must be at least 1".into()));
        }
        Some(n) => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
        None => DEFAULT_PAGE,
    };
    // One more than asked tells whether another page exists. Pages are read until enough of
    // the caller's tenant's sessions are found, so a page is full whoever else has sessions.
    let mut page = Vec::new();
    let mut after = cursor;
    let more = loop {
        let read = state
            .storage
            .sessions_page(after.as_ref(), limit + 1)
            .await?;
        let last_read = read.len() <= limit;
        after = read.last().map(PageCursor::after);
        page.extend(
            read.into_iter()
                .filter(|info| crate::auth::may_access(&principal, info.tenant())),
        );
        if page.len() > limit {
            break true;
        }
        if last_read {
            break false;
        }
    };
    page.truncate(limit);
    let next = page
        .last()
        .filter(|_| more)
        .map(|last| format_cursor(&PageCursor::after(last)));
    let page: Vec<SessionInfo> = page.into_iter().map(|info| state.shown(info)).collect();
    Ok(Json(json!({"sessions": page, "nextCursor": next})).into_response())
}

/// A cursor as clients see it: `<createdAt>.<id>`. Session ids never contain a dot.
fn format_cursor(cursor: &PageCursor) -> String {
    format!("{}.{}", cursor.created_at, cursor.id)
}

fn parse_cursor(text: &str) -> Result<PageCursor, ApiError> {
    text.split_once('.')
        .and_then(|(created, id)| {
            let created_at = created.parse().ok()?;
            SessionId::parse(id).ok().map(|id| PageCursor {
                created_at,
                id: id.into(),
            })
        })
        .ok_or_else(|| {
            ApiError::InvalidRequest("cursor must be a nextCursor this server gave".into())
        })
}

/// `records`, as clients see them, as the items of a JSON array, each preceded by a comma
/// unless it is the very first of the array.
fn array_items(
    state: &AppState,
    principal: &Principal,
    records: Vec<SessionInfo>,
    first: &mut bool,
) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    for record in records
        .into_iter()
        .filter(|info| crate::auth::may_access(principal, info.tenant()))
    {
        if !std::mem::take(first) {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &state.shown(record))
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    }
    Ok(out)
}

/// Every session, most recently updated first. The order is read once (ids only); the records
/// are then read and sent [`STREAM_PAGE`] at a time, so a listing holds one page of records,
/// however many sessions there are. A session updated meanwhile is listed once, at the place
/// it had when the listing began; one deleted meanwhile is left out. A storage failure before
/// the first records is an error answer; after it, the body is cut short.
async fn full_listing(state: Arc<AppState>, principal: Principal) -> Result<Response, ApiError> {
    let ids = state.storage.ids_by_recency().await?;
    let first_end = ids.len().min(STREAM_PAGE);
    let first_page = state.storage.sessions_by_ids(&ids[..first_end]).await?;
    let mut first = true;
    let mut head = b"{\"sessions\":[".to_vec();
    head.extend(array_items(&state, &principal, first_page, &mut first)?);
    let rest = futures::stream::try_unfold(
        (state, principal, ids, first_end, first),
        |(state, principal, ids, at, mut first)| async move {
            if at >= ids.len() {
                return Ok(None);
            }
            let end = (at + STREAM_PAGE).min(ids.len());
            let page = state.storage.sessions_by_ids(&ids[at..end]).await?;
            let chunk = Bytes::from(array_items(&state, &principal, page, &mut first)?);
            Ok(Some((chunk, (state, principal, ids, end, first))))
        },
    )
    .inspect(|item: &Result<Bytes, StorageError>| {
        if let Err(e) = item {
            tracing::error!(error = %e, "session listing cut short");
        }
    });
    let body = futures::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(rest)
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"]}"))
        }));
    Ok((
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Refuses new sessions while another one runs in exclusive mode (api.md §2.2).
pub(super) fn check_exclusive(state: &AppState) -> Result<(), ApiError> {
    if !state.config.server.exclusive {
        return Ok(());
    }
    match state.sessions.exclusive().holder() {
        Some(running) => Err(ApiError::ExclusiveModeBusy {
            running: running.into(),
        }),
        None => Ok(()),
    }
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    check_exclusive(&state)?;
    let mut extra = Map::new();
    for key in ["runtimeSettings", "agentOptions"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(value @ Value::Object(_)) => {
                extra.insert(key.to_owned(), value.clone());
            }
            Some(_) => return Err(ApiError::InvalidRequest(format!("{key} must be an object"))),
        }
    }
    let (session, info) = state.create_session(&principal, extra).await?;
    let body = json!({"sessionId": session.id, "session": state.shown(info), "events": []});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn stored_info(state: &AppState, session: &Session) -> Result<SessionInfo, ApiError> {
    state
        .storage
        .session(&session.id)
        .await?
        .ok_or_else(|| ApiError::SessionNotFound(session.id.to_string()))
}

pub(super) async fn details(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, None)?)
        .await?;
    let info = state.shown(stored_info(&state, &session).await?);
    let mut value = serde_json::to_value(info).map_err(|e| ApiError::Internal(e.to_string()))?;
    value["active"] = json!(state.sessions.get(&session.id).is_some());
    Ok(Json(json!({"session": value})))
}

/// A JSON array of stored events, each as stored with its `seq` added as the first field, so a
/// client can page (`after=<seq>`) and resume streams from what it has.
fn events_json(events: &[StoredEvent]) -> String {
    let mut out =
        String::with_capacity(events.iter().map(|e| e.json.len() + 16).sum::<usize>() + 2);
    out.push('[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Stored events are JSON objects (checked when they were published).
        let rest = event.json.strip_prefix('{').unwrap_or(&event.json);
        let sep = if rest.trim_start().starts_with('}') {
            ""
        } else {
            ","
        };
        out.push_str(&format!("{{\"seq\":{}{sep}{rest}", event.seq));
    }
    out.push(']');
    out
}

/// A non-negative integer query parameter, if present.
fn number_param(params: &Params, key: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(key)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::InvalidRequest(format!("{key} must be a non-negative integer"))
            })
        })
        .transpose()
}

/// The stored history, all of it or a page: `after=<seq>` (exclusive) and `limit=<n>`.
pub(super) async fn events(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Response, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, None)?)
        .await?;
    let after = number_param(&params, "after")?.unwrap_or(0);
    let limit = number_param(&params, "limit")?;
    let wanted = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    // One more than asked tells whether another page exists.
    let mut events = state
        .storage
        .events_after(&session.id, after, wanted.saturating_add(1))
        .await?;
    let has_more = events.len() > wanted;
    events.truncate(wanted);
    let body = match limit {
        Some(_) => format!(
            "{{\"events\":{},\"hasMore\":{has_more}}}",
            events_json(&events)
        ),
        None => format!("{{\"events\":{}}}", events_json(&events)),
    };
    Ok(raw_json(body))
}

/// Every event after `after` (query) or `Last-Event-ID` (header, set by a reconnecting
/// EventSource; it wins), then the live stream, for as long as the client stays.
pub(super) async fn follow(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, None)?)
        .await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ApiError::InvalidRequest("Last-Event-ID must be a sequence number".into())
            })
        })
        .transpose()?;
    let after = match last_event_id {
        Some(id) => id,
        None => number_param(&params, "after")?.unwrap_or(0),
    };
    let cursor = session.bus.follow_after(after);
    let events = session.follow(state.storage.clone(), state.shutdown.clone(), cursor, false);
    Ok(super::sse::response(super::sse::batched(
        events,
        super::sse::follow_frame,
    )))
}

/// Events of the most recently updated session; a `sessionId` is accepted and ignored
/// (upstream requires one only by accident, api.md §2.3).
pub(super) async fn latest_events(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Response, ApiError> {
    // The caller's tenant's most recent session.
    let mut info = None;
    for chunk in state.storage.ids_by_recency().await?.chunks(STREAM_PAGE) {
        info = state
            .storage
            .sessions_by_ids(chunk)
            .await?
            .into_iter()
            .find(|info| crate::auth::may_access(&principal, info.tenant()));
        if info.is_some() {
            break;
        }
    }
    let Some(info) = info else {
        return Err(ApiError::NoSessions);
    };
    let events = events_json(&state.storage.events_after(&info.id, 0, usize::MAX).await?);
    let info_json = serde_json::to_string(&state.shown(info.clone()))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let id = serde_json::to_string(&info.id).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(raw_json(format!(
        "{{\"sessionId\":{id},\"sessionInfo\":{info_json},\"events\":{events}}}"
    )))
}

/// How long `GET /sessions/status` waits for an executing run to end before answering
/// (see `Session::settled_status`); well under the official UI's 3 s timeout.
const STATUS_SETTLE: Duration = Duration::from_millis(1000);

fn status_value(state: RunStatus) -> Value {
    json!({"isProcessing": state == RunStatus::Executing, "state": state.as_str()})
}

async fn status_json(session: &Session) -> Value {
    status_value(session.status().await)
}

pub(super) async fn status(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, None)?)
        .await?;
    let settled = session.settled_status(STATUS_SETTLE).await;
    Ok(Json(
        json!({"sessionId": session.id, "status": status_value(settled)}),
    ))
}

/// Shallow metadata merge; seed-style top-level `name` and `tags` fold into the metadata.
pub(super) async fn update(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, Some(&body))?)
        .await?;
    let mut patch = match body.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "metadata must be an object".into(),
            ));
        }
    };
    if let Some(name) = body.get("name").filter(|_| !patch.contains_key("name")) {
        if !name.is_string() {
            return Err(ApiError::InvalidRequest("name must be a string".into()));
        }
        patch.insert("name".into(), name.clone());
    }
    if let Some(tags) = body.get("tags").filter(|_| !patch.contains_key("tags")) {
        if !tags
            .as_array()
            .is_some_and(|t| t.iter().all(Value::is_string))
        {
            return Err(ApiError::InvalidRequest(
                "tags must be an array of strings".into(),
            ));
        }
        patch.insert("tags".into(), tags.clone());
    }
    // The seed switches models through `metadata.modelConfig` (api.md §17 row 9).
    let info = if super::models::selects_configured_model(&state, &mut patch) {
        super::models::switch_model(&state, &session, patch).await?
    } else {
        state
            .storage
            .merge_metadata(&session.id, patch, now_ms())
            .await?
    };
    Ok(Json(json!({"session": state.shown(info)})))
}

pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, Some(&body))?)
        .await?;
    state.delete_session(&principal, &session).await?;
    Ok(Json(json!({"success": true})))
}

/// The seed's explicit restore: make a stored session live again (api.md §17 row 2).
pub(super) async fn restore(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .session_for(&principal, &session_id(&params, Some(&body))?)
        .await?;
    let info = stored_info(&state, &session).await?;
    Ok(Json(json!({
        "success": true,
        "sessionId": session.id,
        "session": state.shown(info),
        "status": status_json(&session).await,
    })))
}
