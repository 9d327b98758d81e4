//! Socket.IO (protocol v5, path `/socket.io/`, namespace `/`) on the HTTP port: the
//! compatibility layer of api.md §12, for clients of the pre-sunset server and the seed's
//! "WebSocket" promise.
//!
//! Client events: `join-session` (a plain id or `{sessionId, after?}`; stored sessions are
//! restored), `leave-session`, `send-query` (`{sessionId, query, stream?}`), `abort-query`,
//! `ping` (acknowledged), `get-server-status`. Server events: `agent-event` (each agent event
//! itself, as stored, with its `seq`: `{type: "assistant_message", content, ..., seq}`, which
//! is what the seed's example reads), `agent-status` (`{isProcessing, state}`: the answer to a
//! join, and again when a run starts or ends), `server-status`, `abort-result`, `error` (a
//! string). A deleted session's sockets get the pseudo-event `{type: "closed", sessionId}`.
//!
//! A socket acts for the principal of its handshake: the HTTP request's (the login cookie or an
//! `Authorization` header), else the `auth: {token}` of the Socket.IO handshake; a handshake
//! with neither is refused (`connect_error`) when auth is on. Every event that names a session
//! checks it with `crate::auth::may_access` like the HTTP routes do: another tenant's session is
//! `Session not found`.
//!
//! Delivery is per socket, not a room broadcast: each joined socket follows the session's event
//! log with its own cursor ([`Session::follow`]), so a slow socket never loses events, and a
//! socket that joins with `after: <seq>` first receives every event after that seq (the live
//! run's deltas included).
//!
//! A socket's events are handled one after another, in the order the client sent them: the
//! seed's example emits `join-session` and `send-query` back to back, and the join must have
//! positioned the socket in the log before the query's first event is published, or the socket
//! would miss the answer. socketioxide runs every handler as its own task, so the handlers only
//! queue the event (synchronously, in arrival order) for one task per socket that does the work.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Map, Value, json};
use shared::ids::SessionId;
use shared::protocol::AbortReason;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::body::{BODY_LIMIT, parse_session_id, query_input};
use super::runs::abort_result;
use crate::auth::AuthError;
use crate::error::ApiError;
use crate::principal::Principal;
use crate::sessions::Session;
use crate::state::AppState;

/// Packets queued per socket before `emit` reports the buffer full (engine.io's default is 128;
/// a streamed answer produces a burst of deltas).
const SOCKET_BUFFER: usize = 1024;
/// How long a delivery task waits for a full socket buffer to drain before trying again.
const FULL_BUFFER_BACKOFF: Duration = Duration::from_millis(5);
/// Client events a socket may have waiting to be handled; past that, a client that floods the
/// server is told so instead of growing the queue.
const PENDING_COMMANDS: usize = 64;

/// The Socket.IO layer, to be mounted outside the HTTP body limit: engine.io enforces its own
/// (`max_payload`, set to the API's 20 MB so a query with images fits either way).
pub fn layer(state: Arc<AppState>) -> SocketIoLayer {
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(SOCKET_BUFFER)
        .max_payload(BODY_LIMIT as u64)
        .build_layer();
    // Not an `async` closure: socketioxide sends the client its CONNECT answer, then calls this
    // and spawns the future it returns. The handlers must be registered before that call
    // returns, or events a client sends right after connecting (its buffered emits) would find
    // no handler and be dropped.
    let handshake_state = state.clone();
    let handler = move |socket: SocketRef| -> Ready<()> {
        connected(socket, state.clone());
        ready(())
    };
    let authenticate = move |socket: SocketRef, TryData(auth): TryData<Value>| {
        let state = handshake_state.clone();
        async move { authenticate(&state, &socket, auth.ok()).await }
    };
    io.ns("/", handler.with(authenticate));
    layer
}

/// Establishes the socket's principal before it connects: the one the HTTP layer found on the
/// handshake request, else the handshake's `auth.token`.
async fn authenticate(
    state: &AppState,
    socket: &SocketRef,
    auth: Option<Value>,
) -> Result<(), AuthError> {
    let principal = match socket.req_parts().extensions.get::<Principal>() {
        Some(principal) => principal.clone(),
        None => {
            let token = auth
                .as_ref()
                .and_then(|a| a.get("token"))
                .and_then(Value::as_str)
                .ok_or(AuthError::Missing)
                .inspect_err(|e| {
                    crate::auth::record(&crate::auth::Event::Denied {
                        path: "/socket.io/",
                        reason: &e.to_string(),
                        principal: None,
                    });
                })?;
            state.auth.credential(token).await.inspect_err(|e| {
                crate::auth::record(&crate::auth::Event::Denied {
                    path: "/socket.io/",
                    reason: &e.to_string(),
                    principal: None,
                });
            })?
        }
    };
    socket.extensions.insert(principal);
    Ok(())
}

/// A client event waiting for its socket's task.
enum Command {
    Join(Option<Value>),
    Leave(Option<Value>),
    Query(Option<Value>),
    Abort(Option<Value>),
    ServerStatus,
}

/// Queues `command` for the socket's task; called synchronously by socketioxide, in the order
/// the client's packets arrived.
fn enqueue(socket: &SocketRef, commands: &mpsc::Sender<Command>, command: Command) -> Ready<()> {
    if let Err(e) = commands.try_send(command) {
        let message = match e {
            mpsc::error::TrySendError::Full(_) => "Too many requests are waiting on this socket",
            mpsc::error::TrySendError::Closed(_) => "This socket is closing",
        };
        emit_or_log(socket, "error", message);
    }
    ready(())
}

fn connected(socket: SocketRef, state: Arc<AppState>) {
    tracing::debug!(socket = %socket.id, "socket.io client connected");
    let (commands, queue) = mpsc::channel(PENDING_COMMANDS);
    let gone = CancellationToken::new();

    socket.on("ping", async |ack: AckSender| {
        // An empty fixed-size array is an empty argument list (a tuple to socketioxide), so
        // the client's callback is called with no arguments, as upstream's was.
        let no_arguments: [u8; 0] = [];
        if let Err(e) = ack.send(&no_arguments) {
            tracing::debug!(error = %e, "could not acknowledge a ping");
        }
    });

    let on = |event: &'static str, make: fn(Option<Value>) -> Command| {
        let commands = commands.clone();
        socket.on(
            event,
            move |socket: SocketRef, TryData(payload): TryData<Value>| {
                enqueue(&socket, &commands, make(payload.ok()))
            },
        );
    };
    on("join-session", Command::Join);
    on("leave-session", Command::Leave);
    on("send-query", Command::Query);
    on("abort-query", Command::Abort);
    let status_commands = commands.clone();
    socket.on("get-server-status", move |socket: SocketRef| {
        enqueue(&socket, &status_commands, Command::ServerStatus)
    });

    let on_gone = gone.clone();
    socket.on_disconnect(move |socket: SocketRef| {
        tracing::debug!(socket = %socket.id, "socket.io client disconnected");
        on_gone.cancel();
        ready(())
    });
    tokio::spawn(serve(socket, state, queue, gone));
}

/// The socket's task: handles its client events in order until the socket goes away, then
/// ends the deliveries it started.
async fn serve(
    socket: SocketRef,
    state: Arc<AppState>,
    mut queue: mpsc::Receiver<Command>,
    gone: CancellationToken,
) {
    // Set by `authenticate` before the socket connected; a socket without one serves nothing.
    let Some(principal) = socket.extensions.get::<Principal>() else {
        let _ = socket.clone().disconnect();
        return;
    };
    let mut joined = Joined::default();
    loop {
        let command = tokio::select! {
            () = gone.cancelled() => break,
            command = queue.recv() => match command {
                Some(command) => command,
                None => break,
            },
        };
        match command {
            Command::Join(payload) => {
                join(&socket, &state, &principal, &mut joined, payload).await;
            }
            Command::Leave(payload) => {
                if let Some(id) = payload.as_ref().and_then(session_id_of) {
                    joined.leave(&id);
                }
            }
            Command::Query(payload) => send_query(&socket, &state, &principal, payload).await,
            Command::Abort(payload) => abort_query(&socket, &state, &principal, payload).await,
            Command::ServerStatus => server_status(&socket, &state, &principal).await,
        }
    }
    joined.leave_all();
}

/// The sessions one socket has joined, each with the task delivering its events.
#[derive(Default)]
struct Joined(HashMap<SessionId, AbortHandle>);

impl Joined {
    /// Records the delivery task of `session`, ending the one a previous join started (joining
    /// twice re-positions instead of delivering everything twice).
    fn replace(&mut self, session: SessionId, task: AbortHandle) {
        if let Some(old) = self.0.insert(session, task) {
            old.abort();
        }
    }

    fn leave(&mut self, session: &str) {
        if let Some(task) = self.0.remove(session) {
            task.abort();
        }
    }

    fn leave_all(&mut self) {
        for (_, task) in self.0.drain() {
            task.abort();
        }
    }
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
    principal: &Principal,
    payload: Option<&Value>,
) -> Option<Arc<Session>> {
    let Some(id) = payload.and_then(session_id_of) else {
        emit_or_log(socket, "error", "Session ID is required");
        return None;
    };
    let found = match parse_session_id(&id) {
        Ok(id) => state.session_for(principal, &id).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(session) => Some(session),
        Err(e) => {
            emit_or_log(socket, "error", &lookup_error(&e));
            None
        }
    }
}

fn status_payload(status: shared::events::RunStatus) -> Value {
    json!({"isProcessing": status == shared::events::RunStatus::Executing, "state": status.as_str()})
}

async fn join(
    socket: &SocketRef,
    state: &Arc<AppState>,
    principal: &Principal,
    joined: &mut Joined,
    payload: Option<Value>,
) {
    let Some(session) = find_session(socket, state, principal, payload.as_ref()).await else {
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
    emit_or_log(
        socket,
        "agent-status",
        &status_payload(session.status().await),
    );
    let events = session.follow(state.storage.clone(), state.shutdown.clone(), cursor, false);
    let task = tokio::spawn(deliver(socket.clone(), session.clone(), events));
    joined.replace(session.id.clone(), task.abort_handle());
    tracing::debug!(socket = %socket.id, session_id = %session.id, after, "socket joined a session");
}

/// The `agent-status` a run start or end announces, if `event` is one.
fn run_status_change(event: &Map<String, Value>) -> Option<Value> {
    match event.get("type").and_then(Value::as_str)? {
        "agent_run_start" => Some(json!({"isProcessing": true, "state": "executing"})),
        "agent_run_end" => {
            let state = event
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("idle");
            Some(json!({"isProcessing": false, "state": state}))
        }
        _ => None,
    }
}

/// Sends every event of `events` to `socket` as an `agent-event` (the event with its `seq`),
/// and an `agent-status` after each run start and end, until the socket goes away or the
/// stream ends (the session was deleted: `closed`; or the server stops).
async fn deliver(
    socket: SocketRef,
    session: Arc<Session>,
    events: impl futures::Stream<Item = crate::bus::BusEvent>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(&event.json) else {
            continue;
        };
        let status = run_status_change(&fields);
        fields.insert("seq".into(), json!(event.seq));
        if !emit_lossless(&socket, "agent-event", &Value::Object(fields)).await {
            return;
        }
        if let Some(status) = status
            && !emit_lossless(&socket, "agent-status", &status).await
        {
            return;
        }
    }
    if session.is_closed() {
        let closed = json!({"type": "closed", "sessionId": session.id});
        emit_lossless(&socket, "agent-event", &closed).await;
    }
}

/// Emits `event`, waiting while the socket's buffer is full: the follower behind it waits too
/// (and catches up from storage if it falls out of the live ring), so nothing is dropped.
/// `false` once the socket is gone.
async fn emit_lossless(socket: &SocketRef, event: &str, payload: &Value) -> bool {
    loop {
        match socket.emit(event, payload) {
            Ok(()) => return true,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                tokio::time::sleep(FULL_BUFFER_BACKOFF).await;
            }
            Err(SendError::Socket(SocketError::Closed)) => return false,
            Err(e) => {
                tracing::warn!(socket = %socket.id, event, error = %e, "could not encode an event");
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

/// Starts a run; its events reach every joined socket through their followers. `stream: true`
/// (our addition) asks for a streaming run, so sockets also see the
/// `assistant_streaming_message` deltas; upstream's socket queries were non-streaming.
async fn send_query(
    socket: &SocketRef,
    state: &Arc<AppState>,
    principal: &Principal,
    payload: Option<Value>,
) {
    let Some(session) = find_session(socket, state, principal, payload.as_ref()).await else {
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
            emit_or_log(socket, "error", &e.to_string());
            return;
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if let Err(e) = state.start_run(&session, &input, stream).await {
        emit_or_log(socket, "error", &e.to_string());
    }
}

async fn abort_query(
    socket: &SocketRef,
    state: &Arc<AppState>,
    principal: &Principal,
    payload: Option<Value>,
) {
    let Some(session) = find_session(socket, state, principal, payload.as_ref()).await else {
        return;
    };
    let outcome = session.abort(AbortReason::Requested).await;
    emit_or_log(socket, "abort-result", &abort_result(outcome));
}

async fn server_status(socket: &SocketRef, state: &AppState, principal: &Principal) {
    let mut running = state.sessions.exclusive().holder();
    // Another tenant's running session is not named, only counted as busy.
    let busy = running.is_some();
    if let Some(id) = &running
        && state.check_access(principal, id).await.is_err()
    {
        running = None;
    }
    let exclusive = state.config.server.exclusive;
    emit_or_log(
        socket,
        "server-status",
        &json!({
            "isExclusive": exclusive,
            "runningSessionId": running,
            "canAcceptNewRequest": !exclusive || !busy,
        }),
    );
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

    #[test]
    fn run_starts_and_ends_announce_the_status() {
        let event = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(
            run_status_change(&event(json!({"type": "agent_run_start"}))),
            Some(json!({"isProcessing": true, "state": "executing"}))
        );
        assert_eq!(
            run_status_change(&event(
                json!({"type": "agent_run_end", "status": "aborted"})
            )),
            Some(json!({"isProcessing": false, "state": "aborted"}))
        );
        assert_eq!(
            run_status_change(&event(json!({"type": "assistant_message"}))),
            None
        );
    }
}
