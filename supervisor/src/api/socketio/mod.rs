//! Socket.IO (protocol v5, path `/socket.io/`, namespace `/`) on the HTTP port: the
//! compatibility layer of api.md §12, for clients of the pre-sunset server and the seed's
//! "WebSocket" promise.
//!
//! Client events: `join-session` (a plain id or `{sessionId, after?}`; stored sessions are
//! restored), `leave-session`, `send-query` (`{sessionId, query, stream?}`), `abort-query`,
//! `ping` (acknowledged), `get-server-status`. Server events: `agent-event` (`{type, data,
//! seq}`), `agent-status`, `server-status`, `abort-result`, `error` (a string).
//!
//! Delivery is per socket, not a room broadcast: each joined socket follows the session's event
//! log with its own cursor ([`Session::follow`]), so a slow socket never loses events, and a
//! socket that joins with `after: <seq>` first receives every event after that seq (the live
//! run's deltas included). Each payload carries the `seq` of its agent event for that purpose.
//! Rooms (named by session id) carry only the transient notices that are not in the log
//! (query preparation, `aborted`).
//!
//! Each incoming event runs in its own task: a client that sends `send-query` right after
//! `join-session` should wait for the `agent-status` answering its join first.

mod bridge;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Map, Value, json};
use shared::protocol::AbortReason;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::layer::SocketIoLayer;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::task::AbortHandle;

use super::body::{BODY_LIMIT, query_input};
use crate::error::ApiError;
use crate::sessions::Session;
use crate::state::AppState;

/// Packets queued per socket before `emit` reports the buffer full (engine.io's default is 128;
/// a streamed answer produces a burst of deltas).
const SOCKET_BUFFER: usize = 1024;
/// How long a delivery task waits for a full socket buffer to drain before trying again.
const FULL_BUFFER_BACKOFF: Duration = Duration::from_millis(5);

/// The Socket.IO layer, to be mounted outside the HTTP body limit: engine.io enforces its own
/// (`max_payload`, set to the API's 20 MB so a query with images fits either way).
pub fn layer(state: Arc<AppState>) -> SocketIoLayer {
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(SOCKET_BUFFER)
        .max_payload(BODY_LIMIT as u64)
        .build_layer();
    io.ns("/", move |socket: SocketRef| {
        let state = state.clone();
        async move { connected(socket, state) }
    });
    layer
}

/// The sessions one socket has joined, each with the task delivering its events.
#[derive(Default)]
struct Joined(Mutex<HashMap<String, AbortHandle>>);

impl Joined {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the delivery task of `session`, ending the one a previous join started (joining
    /// twice re-positions instead of delivering everything twice).
    fn replace(&self, session: String, task: AbortHandle) {
        if let Some(old) = self.map().insert(session, task) {
            old.abort();
        }
    }

    fn leave(&self, session: &str) -> bool {
        self.map()
            .remove(session)
            .map(|task| task.abort())
            .is_some()
    }

    fn leave_all(&self) {
        for (_, task) in self.map().drain() {
            task.abort();
        }
    }
}

fn connected(socket: SocketRef, state: Arc<AppState>) {
    tracing::debug!(socket = %socket.id, "socket.io client connected");
    let joined = Arc::new(Joined::default());

    socket.on("ping", async |ack: AckSender| {
        // An empty fixed-size array is an empty argument list (a tuple to socketioxide), so
        // the client's callback is called with no arguments, as upstream's was.
        let no_arguments: [u8; 0] = [];
        if let Err(e) = ack.send(&no_arguments) {
            tracing::debug!(error = %e, "could not acknowledge a ping");
        }
    });

    let (s, j) = (state.clone(), joined.clone());
    socket.on(
        "join-session",
        move |socket: SocketRef, TryData(payload): TryData<Value>| {
            let (state, joined) = (s.clone(), j.clone());
            async move { join(socket, state, joined, payload.ok()).await }
        },
    );

    let j = joined.clone();
    socket.on(
        "leave-session",
        move |socket: SocketRef, TryData(payload): TryData<Value>| {
            let joined = j.clone();
            async move {
                if let Some(id) = payload.ok().as_ref().and_then(session_id_of) {
                    joined.leave(&id);
                    socket.leave(id);
                }
            }
        },
    );

    let s = state.clone();
    socket.on(
        "send-query",
        move |socket: SocketRef, TryData(payload): TryData<Value>| {
            let state = s.clone();
            async move { send_query(socket, state, payload.ok()).await }
        },
    );

    let s = state.clone();
    socket.on(
        "abort-query",
        move |socket: SocketRef, TryData(payload): TryData<Value>| {
            let state = s.clone();
            async move { abort_query(socket, state, payload.ok()).await }
        },
    );

    let s = state;
    socket.on("get-server-status", move |socket: SocketRef| {
        let state = s.clone();
        async move {
            let running = state.exclusive.holder();
            let exclusive = state.config.server.exclusive;
            emit_or_log(
                &socket,
                "server-status",
                &json!({
                    "isExclusive": exclusive,
                    "runningSessionId": running,
                    "canAcceptNewRequest": !exclusive || running.is_none(),
                }),
            );
        }
    });

    socket.on_disconnect(async move |socket: SocketRef| {
        tracing::debug!(socket = %socket.id, "socket.io client disconnected");
        joined.leave_all();
    });
}

/// The session id of a payload: a plain string (upstream) or `{sessionId}` (the seed).
fn session_id_of(payload: &Value) -> Option<String> {
    match payload {
        Value::String(id) => Some(id.clone()),
        Value::Object(map) => map
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
    .filter(|id| !id.is_empty())
}

/// The `error` text for a failed lookup: upstream's `Session not found` where it applies.
fn lookup_error(error: &ApiError) -> String {
    match error {
        ApiError::SessionNotFound(_) | ApiError::SessionNotFoundInStorage(_) => {
            "Session not found".into()
        }
        ApiError::SessionIdRequired => "Session ID is required".into(),
        other => other.to_string(),
    }
}

async fn find_session(
    socket: &SocketRef,
    state: &AppState,
    payload: Option<&Value>,
) -> Option<Arc<Session>> {
    let Some(id) = payload.and_then(session_id_of) else {
        emit_or_log(socket, "error", "Session ID is required");
        return None;
    };
    match state.session(&id).await {
        Ok(session) => Some(session),
        Err(e) => {
            emit_or_log(socket, "error", &lookup_error(&e));
            None
        }
    }
}

async fn join(
    socket: SocketRef,
    state: Arc<AppState>,
    joined: Arc<Joined>,
    payload: Option<Value>,
) {
    let Some(session) = find_session(&socket, &state, payload.as_ref()).await else {
        return;
    };
    // Positioned before the status is read, so nothing published after it is missed; a seq
    // from the future (another server's) is clamped to what exists.
    let latest = session.bus.latest();
    let after = payload
        .as_ref()
        .and_then(|p| p.get("after"))
        .and_then(Value::as_u64)
        .map_or(latest, |after| after.min(latest));
    let cursor = session.bus.follow_after(after);
    socket.join(session.id.clone());
    let status = session.status().await;
    emit_or_log(
        &socket,
        "agent-status",
        &json!({"isProcessing": status == shared::events::RunStatus::Executing, "state": status.as_str()}),
    );
    let events = session.follow(state.storage.clone(), state.shutdown.clone(), cursor, false);
    let task = tokio::spawn(deliver(socket.clone(), session.clone(), events));
    joined.replace(session.id.clone(), task.abort_handle());
    tracing::debug!(socket = %socket.id, session_id = %session.id, after, "socket joined a session");
}

/// Sends every event of `events` to `socket` as `agent-event`s until the socket goes away or
/// the stream ends (the session was deleted: `closed`; or the server stops).
async fn deliver(
    socket: SocketRef,
    session: Arc<Session>,
    events: impl futures::Stream<Item = crate::bus::BusEvent>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let Ok(value) = serde_json::from_str::<Value>(&event.json) else {
            continue;
        };
        for emission in bridge::translate(&value) {
            let payload = json!({"type": emission.kind, "data": emission.data, "seq": event.seq});
            if !emit_lossless(&socket, &payload).await {
                return;
            }
        }
    }
    if session.is_closed() {
        let payload = json!({"type": "closed", "data": {"sessionId": session.id}});
        emit_lossless(&socket, &payload).await;
    }
}

/// Emits an `agent-event`, waiting while the socket's buffer is full: the follower behind it
/// waits too (and catches up from storage if it falls out of the live ring), so nothing is
/// dropped. `false` once the socket is gone.
async fn emit_lossless(socket: &SocketRef, payload: &Value) -> bool {
    loop {
        match socket.emit("agent-event", payload) {
            Ok(()) => return true,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                tokio::time::sleep(FULL_BUFFER_BACKOFF).await;
            }
            Err(SendError::Socket(SocketError::Closed)) => return false,
            Err(e) => {
                tracing::warn!(socket = %socket.id, error = %e, "could not encode an agent-event");
                return true;
            }
        }
    }
}

/// A direct reply; if the socket's buffer is full or it has gone, there is nobody to tell.
fn emit_or_log<T: serde::Serialize + ?Sized>(socket: &SocketRef, event: &str, data: &T) {
    if let Err(e) = socket.emit(event, data) {
        tracing::debug!(socket = %socket.id, event, error = %e, "could not reply on a socket");
    }
}

/// A notice for every socket in the session's room; not part of the event log.
async fn notify_room(socket: &SocketRef, session: &str, kind: &str, data: Value) {
    let payload = json!({"type": kind, "data": data});
    if let Err(e) = socket
        .within(session.to_owned())
        .emit("agent-event", &payload)
        .await
    {
        tracing::debug!(session_id = %session, error = %e, "could not notify a session's sockets");
    }
}

/// Starts a run; its events reach every joined socket through their followers. `stream: true`
/// (our addition) asks for a streaming run, so sockets see `streaming_message` deltas;
/// upstream's socket queries were non-streaming.
async fn send_query(socket: SocketRef, state: Arc<AppState>, payload: Option<Value>) {
    let Some(session) = find_session(&socket, &state, payload.as_ref()).await else {
        return;
    };
    let body = payload
        .as_ref()
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(Map::new);
    let input = match query_input(&body) {
        Ok(input) => input,
        Err(e) => {
            emit_or_log(&socket, "error", &e.to_string());
            return;
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (phase, message, estimate) = if stream {
        (
            "streaming_preparation",
            "Preparing streaming response...",
            "3-10 seconds for first token",
        )
    } else {
        (
            "query_preparation",
            "Preparing to process your request...",
            "5-15 seconds",
        )
    };
    notify_room(
        &socket,
        &session.id,
        "agent-status",
        json!({"isProcessing": true, "state": "initializing", "phase": phase, "message": message, "estimatedTime": estimate}),
    )
    .await;
    if let Err(e) = session.start_run(&state, &input, stream).await {
        let message = e.to_string();
        notify_room(&socket, &session.id, "error", json!({"message": message})).await;
        emit_or_log(&socket, "error", &message);
    }
}

async fn abort_query(socket: SocketRef, state: Arc<AppState>, payload: Option<Value>) {
    let Some(session) = find_session(&socket, &state, payload.as_ref()).await else {
        return;
    };
    let success = session.abort(AbortReason::Requested).await;
    if success {
        notify_room(
            &socket,
            &session.id,
            "aborted",
            json!({"sessionId": session.id}),
        )
        .await;
    }
    emit_or_log(&socket, "abort-result", &json!({"success": success}));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_payloads() {
        assert_eq!(session_id_of(&json!("abc")).as_deref(), Some("abc"));
        assert_eq!(
            session_id_of(&json!({"sessionId": "abc", "after": 3})).as_deref(),
            Some("abc")
        );
        assert_eq!(session_id_of(&json!("")), None);
        assert_eq!(session_id_of(&json!({"id": "abc"})), None);
        assert_eq!(session_id_of(&json!(7)), None);
    }
}
