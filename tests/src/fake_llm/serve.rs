//! The fake's HTTP side: its admin and AGIO routes, and a model call served from its plan,
//! token by token, with the scripted delays, hangs, cuts and errors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::conversation::conversation;
use super::directives::directive_plan;
use super::plan::{Ending, HttpFailure};
use super::script::{script_plan, selected_script};
use super::state::Shared;
use super::wire::{Frame, Wire};

/// The listener with Nagle's algorithm off on every connection: a response goes out as headers
/// plus small chunks, and a client's delayed ACK would otherwise hold each one back ~40 ms.
pub fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    })
}

/// The fake's routes; everything goes through one dispatcher because provider paths come with
/// any prefix (`/v1/chat/completions`, `/openai/deployments/x/chat/completions`, ...).
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/__admin/requests") => axum::Json(shared.requests_json()).into_response(),
        (&Method::GET, "/__admin/streams") => axum::Json(shared.streams_json()).into_response(),
        (&Method::POST, "/__admin/reset") => {
            shared.reset();
            axum::Json(json!({"ok": true})).into_response()
        }
        (&Method::POST, "/__admin/script") => {
            let loaded = serde_json::from_slice::<Value>(&body)
                .map_err(anyhow::Error::from)
                .and_then(|doc| shared.load_scripts(&doc));
            match loaded {
                Ok(n) => axum::Json(json!({"ok": true, "loaded": n})).into_response(),
                Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
            }
        }
        (&Method::POST, "/__agio") => {
            let batch = serde_json::from_slice::<Value>(&body)
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
            shared.lock().agio.push(batch);
            axum::Json(json!({"ok": true})).into_response()
        }
        (&Method::GET, "/__agio") => {
            axum::Json(json!({"batches": shared.lock().agio.clone()})).into_response()
        }
        (&Method::GET, p) if p.ends_with("/models") => {
            let mut data = vec![json!({"id": "fake-model", "object": "model"})];
            data.extend(
                shared
                    .lock()
                    .scripts
                    .keys()
                    .map(|name| json!({"id": name, "object": "model"})),
            );
            axum::Json(json!({"object": "list", "data": data})).into_response()
        }
        (&Method::POST, p) if p.ends_with("/chat/completions") => {
            model_call(shared, Wire::OpenAi, &path, &headers, &body).await
        }
        (&Method::POST, p) if p.ends_with("/messages") => {
            model_call(shared, Wire::Anthropic, &path, &headers, &body).await
        }
        _ => (
            StatusCode::NOT_FOUND,
            format!("no fake route for {method} {path}"),
        )
            .into_response(),
    }
}

/// An HTTP error in the wire's format, with the script's headers.
fn error_response(wire: Wire, failure: &HttpFailure) -> Response {
    let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = failure
        .body
        .clone()
        .unwrap_or_else(|| wire.error_body(failure));
    let mut response = (status, axum::Json(body)).into_response();
    for (name, value) in &failure.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            header::HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Marks the request's stream finished, or aborted by the client when dropped unfinished.
struct StreamGuard {
    shared: Arc<Shared>,
    seq: u64,
    done: bool,
}

impl StreamGuard {
    fn finish(&mut self, outcome: &str) {
        if !self.done {
            self.done = true;
            self.shared.finished.fetch_add(1, Ordering::SeqCst);
            self.shared.set_outcome(self.seq, outcome, false);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.aborted.fetch_add(1, Ordering::SeqCst);
            self.shared
                .set_outcome(self.seq, "client disconnected", true);
        }
    }
}

/// How many frames go out before a scripted hang, cut or error after `units` content units:
/// up to the next unit, or up to the end of the content when it has fewer (nothing at all when
/// there is no content, so `HANG` sends not a byte after the headers).
fn cutoff(frames: &[Frame], units: usize) -> usize {
    let mut seen = 0;
    let mut after_last_unit = 0;
    for (index, frame) in frames.iter().enumerate() {
        if frame.unit {
            if seen == units {
                return index;
            }
            seen += 1;
            after_last_unit = index + 1;
        }
    }
    after_last_unit
}

/// Body items produced by a plan.
enum Item {
    Bytes(String),
    /// The body ends normally.
    End,
    /// The connection is broken (no terminating chunk).
    Cut,
}

async fn model_call(
    shared: Arc<Shared>,
    wire: Wire,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let seq = shared.record(path, headers, body);
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        shared.set_outcome(seq, "http 400", false);
        let failure = HttpFailure {
            status: 400,
            headers: Vec::new(),
            body: None,
            message: "the body is not JSON".into(),
        };
        return error_response(wire, &failure);
    };
    let conversation = conversation(wire, &request);
    let step = conversation.step();
    let auth_key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_owned())
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let plan = match selected_script(&shared, headers, &conversation) {
        Some((name, script)) => script_plan(&shared, &name, &script, &conversation),
        None => directive_plan(&shared, &conversation, &auth_key),
    };
    if plan.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(plan.delay_ms)).await;
    }
    if plan.hang_before_headers {
        let mut guard = StreamGuard {
            shared: shared.clone(),
            seq,
            done: false,
        };
        shared.started.fetch_add(1, Ordering::SeqCst);
        shared.set_outcome(seq, "hanging before headers", false);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        guard.finish("gave up hanging");
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    }
    if let Some(failure) = &plan.failure {
        shared.set_outcome(seq, &format!("http {}", failure.status), false);
        return error_response(wire, failure);
    }

    let (frames, content_type) = if conversation.stream {
        (
            wire.stream(&plan, &conversation, seq, step),
            "text/event-stream",
        )
    } else {
        let whole = wire.whole(&plan, &conversation, seq, step);
        (
            vec![Frame {
                bytes: whole.to_string(),
                unit: true,
            }],
            "application/json",
        )
    };
    let ending = plan.ending.clone();
    let (first_delay, token_delay) = (plan.first_token_delay_ms, plan.token_delay_ms);
    let error_bytes = match &ending {
        Ending::ErrorAfter(_, message) => wire.error_frame(message),
        _ => String::new(),
    };

    let (tx, rx) = mpsc::channel::<Item>(16);
    shared.started.fetch_add(1, Ordering::SeqCst);
    shared.set_outcome(seq, "streaming", false);
    let cutoff = match &ending {
        Ending::Normal => frames.len(),
        Ending::HangAfter(n) | Ending::CutAfter(n) | Ending::ErrorAfter(n, _) => {
            cutoff(&frames, *n)
        }
    };
    tokio::spawn(async move {
        let mut sent_units = 0usize;
        for frame in frames.into_iter().take(cutoff) {
            if frame.unit {
                let delay = if sent_units == 0 {
                    first_delay
                } else {
                    token_delay
                };
                if delay > 0 {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        () = tx.closed() => return,
                    }
                }
                sent_units += 1;
            }
            if tx.send(Item::Bytes(frame.bytes)).await.is_err() {
                return;
            }
        }
        let last = match ending {
            Ending::Normal => Item::End,
            Ending::HangAfter(_) => {
                // Until the client leaves (the body is dropped, closing the channel).
                tx.closed().await;
                return;
            }
            Ending::CutAfter(_) => {
                // Let the body go idle first, so hyper flushes the tokens already written
                // before the connection is torn down.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Item::Cut
            }
            Ending::ErrorAfter(..) => {
                if tx.send(Item::Bytes(error_bytes)).await.is_err() {
                    return;
                }
                Item::End
            }
        };
        let _ = tx.send(last).await;
    });

    let guard = StreamGuard {
        shared,
        seq,
        done: false,
    };
    let stream = futures::stream::unfold((rx, guard), |(mut rx, mut guard)| async move {
        match rx.recv().await {
            Some(Item::Bytes(bytes)) => Some((Ok(Bytes::from(bytes)), (rx, guard))),
            Some(Item::Cut) => {
                guard.finish("cut");
                Some((Err(std::io::Error::other("cut by the script")), (rx, guard)))
            }
            Some(Item::End) | None => {
                guard.finish("ok");
                None
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
