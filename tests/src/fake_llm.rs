//! A scripted fake LLM server (agent.md §5): it speaks the real OpenAI chat-completions and
//! Anthropic Messages wire formats, streaming and not, so end-to-end tests exercise the
//! supervisor's real HTTP path: SSE parsing, retries, timeouts, cancellation, the Anthropic
//! mapping and the credential headers.
//!
//! Behaviour per request, first match wins (§5.3): the `x-fake-script` header, a
//! `[[fake:<name>]]` marker in the current query, a directive in the last message (§5.4), else
//! `echo: <text>`. It records every request with its headers **unredacted** (tests check that
//! the key arrives here and nowhere else), counts streams and client disconnects, and doubles as
//! an AGIO sink. There is no randomness: ids derive from the request's step and sequence.

use shared::directives::{numbered, words};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// `created` of every chunk: a constant, for determinism.
const CREATED: u64 = 1_700_000_000;
const DEFAULT_SLOW_MS: u64 = 50;
const DEFAULT_FRAGMENT: usize = 7;
const SIGNATURE: &str = "fake-signature";

// ------------------------------------------------------------------------------------------------
// State
// ------------------------------------------------------------------------------------------------

/// One recorded request.
#[derive(Debug, Clone)]
struct Recorded {
    seq: u64,
    path: String,
    headers: Map<String, Value>,
    body: Value,
    started_at: u64,
    outcome: String,
    client_disconnected: bool,
}

impl Recorded {
    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "path": self.path,
            "headers": self.headers,
            "body": self.body,
            "startedAt": self.started_at,
            "outcome": self.outcome,
            "clientDisconnected": self.client_disconnected,
        })
    }
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    scripts: HashMap<String, Value>,
    fail_counts: HashMap<u64, u32>,
    agio: Vec<Value>,
}

/// The server's state, shared by its handlers and the [`FakeLlm`] handle.
#[derive(Default)]
pub struct Shared {
    inner: Mutex<Inner>,
    next_seq: AtomicU64,
    started: AtomicU64,
    finished: AtomicU64,
    aborted: AtomicU64,
    request_log: Option<PathBuf>,
}

impl Shared {
    /// State that appends each request to `REQUEST_LOG` (one JSON line) when that is set.
    pub fn from_env() -> Self {
        Self {
            request_log: std::env::var_os("REQUEST_LOG").map(PathBuf::from),
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces or adds the named scripts of a `{"scripts": {...}}` document.
    pub fn load_scripts(&self, document: &Value) -> Result<usize> {
        let scripts = document
            .get("scripts")
            .and_then(Value::as_object)
            .context("a script document is {\"scripts\": {<name>: {\"steps\": [...]}}}")?;
        let mut inner = self.lock();
        for (name, script) in scripts {
            inner.scripts.insert(name.clone(), script.clone());
        }
        Ok(scripts.len())
    }

    fn reset(&self) {
        *self.lock() = Inner::default();
        for counter in [&self.started, &self.finished, &self.aborted] {
            counter.store(0, Ordering::SeqCst);
        }
    }

    fn requests_json(&self) -> Value {
        Value::Array(self.lock().requests.iter().map(Recorded::to_json).collect())
    }

    fn streams_json(&self) -> Value {
        let started = self.started.load(Ordering::SeqCst);
        let finished = self.finished.load(Ordering::SeqCst);
        let aborted = self.aborted.load(Ordering::SeqCst);
        json!({
            "started": started,
            "open": started.saturating_sub(finished + aborted),
            "finished": finished,
            "aborted": aborted,
        })
    }

    fn record(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut names = Map::new();
        for (name, value) in headers {
            names.insert(
                name.as_str().to_owned(),
                json!(String::from_utf8_lossy(value.as_bytes())),
            );
        }
        let body =
            serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)));
        let recorded = Recorded {
            seq,
            path: path.to_owned(),
            headers: names,
            body,
            started_at: now_ms(),
            outcome: "pending".into(),
            client_disconnected: false,
        };
        if let Some(path) = &self.request_log
            && let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(file, "{}", recorded.to_json());
        }
        self.lock().requests.push(recorded);
        seq
    }

    fn set_outcome(&self, seq: u64, outcome: &str, disconnected: bool) {
        let mut inner = self.lock();
        if let Some(r) = inner.requests.iter_mut().find(|r| r.seq == seq) {
            r.outcome = outcome.to_owned();
            r.client_disconnected |= disconnected;
        }
    }

    /// Counts one more failure for `key`; `true` while fewer than `times` failures were served.
    fn should_fail(&self, key: u64, times: u32) -> bool {
        let mut inner = self.lock();
        let count = inner.fail_counts.entry(key).or_insert(0);
        if *count < times {
            *count += 1;
            true
        } else {
            false
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ------------------------------------------------------------------------------------------------
// Handle
// ------------------------------------------------------------------------------------------------

/// A running fake LLM on `127.0.0.1:<port>`; dropping it stops the server.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeLlm {
    /// Starts an instance with no scripts.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::from_env());
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(no_delay(listener), app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// Starts an instance with `{"scripts": {...}}` loaded.
    pub async fn start_with_scripts(document: &Value) -> Result<Self> {
        let fake = Self::start().await?;
        fake.shared.load_scripts(document)?;
        Ok(fake)
    }

    /// `http://127.0.0.1:<port>` (the Anthropic base URL: the adapter adds `/v1/messages`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/v1` (an OpenAI-compatible base URL).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The AGIO sink's URL.
    pub fn agio_url(&self) -> String {
        format!("http://{}/__agio", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Recorded requests, as `GET /__admin/requests` gives them.
    pub fn requests(&self) -> Vec<Value> {
        match self.shared.requests_json() {
            Value::Array(requests) => requests,
            _ => Vec::new(),
        }
    }

    /// Recorded model requests only (chat completions and messages).
    pub fn model_requests(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/chat/completions") || p.ends_with("/messages"))
            })
            .collect()
    }

    /// Stream counters, as `GET /__admin/streams` gives them.
    pub fn streams(&self) -> Value {
        self.shared.streams_json()
    }

    /// The AGIO batch bodies received, oldest first.
    pub fn agio_batches(&self) -> Vec<Value> {
        self.shared.lock().agio.clone()
    }

    /// Loads `{"scripts": {...}}`.
    pub fn load_scripts(&self, document: &Value) -> Result<()> {
        self.shared.load_scripts(document).map(|_| ())
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

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

// ------------------------------------------------------------------------------------------------
// Conversations
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
    /// OpenAI `tool` messages, and Anthropic user turns carrying `tool_result` blocks.
    Tool,
}

#[derive(Debug, Clone)]
struct Msg {
    role: Role,
    text: String,
}

/// A request reduced to what the fake's behaviour depends on.
struct Conversation {
    messages: Vec<Msg>,
    tools: Vec<String>,
    stream: bool,
    include_usage: bool,
    model: String,
    /// The raw `messages`, hashed for the per-step failure counters.
    key_material: String,
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn conversation(wire: Wire, body: &Value) -> Conversation {
    let raw = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut messages = Vec::new();
    for message in &raw {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let content = message.get("content").unwrap_or(&Value::Null);
        let msg = match (wire, role) {
            (_, "system") => Msg {
                role: Role::System,
                text: text_of(content),
            },
            (_, "assistant") => Msg {
                role: Role::Assistant,
                text: text_of(content),
            },
            (Wire::OpenAi, "tool") => Msg {
                role: Role::Tool,
                text: text_of(content),
            },
            (Wire::Anthropic, _) => {
                let results: Vec<&Value> = content
                    .as_array()
                    .map(|blocks| {
                        blocks
                            .iter()
                            .filter(|b| {
                                b.get("type").and_then(Value::as_str) == Some("tool_result")
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                match results.last() {
                    Some(last) => Msg {
                        role: Role::Tool,
                        text: text_of(last.get("content").unwrap_or(&Value::Null)),
                    },
                    None => Msg {
                        role: Role::User,
                        text: text_of(content),
                    },
                }
            }
            _ => Msg {
                role: Role::User,
                text: text_of(content),
            },
        };
        messages.push(msg);
    }
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| {
                    t.get("function")
                        .and_then(|f| f.get("name"))
                        .or_else(|| t.get("name"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    Conversation {
        messages,
        tools,
        stream: body.get("stream").and_then(Value::as_bool) == Some(true),
        include_usage: body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("fake-model")
            .to_owned(),
        key_material: Value::Array(raw).to_string(),
    }
}

impl Conversation {
    /// The index of the current query: the last user message not directly after a tool
    /// message (OpenAI: such a user message only carries tool images).
    fn query_index(&self) -> Option<usize> {
        (0..self.messages.len()).rev().find(|&i| {
            self.messages[i].role == Role::User
                && (i == 0 || self.messages[i - 1].role != Role::Tool)
        })
    }

    /// Step = assistant messages after the current query (0 for the run's first call).
    fn step(&self) -> usize {
        let from = self.query_index().map_or(0, |i| i + 1);
        self.messages[from.min(self.messages.len())..]
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count()
    }

    fn query_text(&self) -> String {
        self.query_index()
            .map(|i| self.messages[i].text.clone())
            .unwrap_or_default()
    }

    fn last_tool_result(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Tool)
            .map(|m| m.text.clone())
            .unwrap_or_default()
    }

    /// A key for "this conversation at this step", for `FLAKY` and `failTimes`.
    fn counter_key(&self, label: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        label.hash(&mut hasher);
        self.key_material.hash(&mut hasher);
        self.step().hash(&mut hasher);
        hasher.finish()
    }

    /// The first offered tool whose name contains `name`, else `name` itself.
    fn tool_named(&self, name: &str) -> String {
        self.tools
            .iter()
            .find(|t| t.contains(name))
            .cloned()
            .unwrap_or_else(|| name.to_owned())
    }
}

// ------------------------------------------------------------------------------------------------
// Plans
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PlannedCall {
    id: Option<String>,
    name: String,
    arguments: String,
    fragment: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Ending {
    Normal,
    /// Send this many content units, then hang until the client leaves.
    HangAfter(usize),
    /// Send this many units, then break the connection (no finish, no `[DONE]`).
    CutAfter(usize),
    /// Send this many units, then an SSE error payload.
    ErrorAfter(usize, String),
}

#[derive(Debug, Clone)]
struct HttpFailure {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<Value>,
    message: String,
}

/// What to answer.
#[derive(Debug, Clone)]
struct Plan {
    failure: Option<HttpFailure>,
    hang_before_headers: bool,
    delay_ms: u64,
    first_token_delay_ms: u64,
    token_delay_ms: u64,
    reasoning: Vec<String>,
    text: Vec<String>,
    calls: Vec<PlannedCall>,
    finish: Option<String>,
    usage: Option<Value>,
    usage_override: Option<bool>,
    omit_done: bool,
    ending: Ending,
}

impl Plan {
    fn text(tokens: Vec<String>) -> Self {
        Self {
            failure: None,
            hang_before_headers: false,
            delay_ms: 0,
            first_token_delay_ms: 0,
            token_delay_ms: 0,
            reasoning: Vec::new(),
            text: tokens,
            calls: Vec::new(),
            finish: None,
            usage: None,
            usage_override: None,
            omit_done: false,
            ending: Ending::Normal,
        }
    }

    fn fail(status: u16, message: &str) -> Self {
        Self {
            failure: Some(HttpFailure {
                status,
                headers: Vec::new(),
                body: None,
                message: message.to_owned(),
            }),
            ..Self::text(Vec::new())
        }
    }

    fn finish_reason(&self) -> String {
        self.finish.clone().unwrap_or_else(|| {
            if self.calls.is_empty() {
                "stop".into()
            } else {
                "tool_calls".into()
            }
        })
    }
}

fn echo(text: &str) -> Plan {
    Plan::text(words(&format!("echo: {text}")))
}

/// The directive grammar of agent.md §5.4 applied to the last message.
fn directive_plan(shared: &Shared, conversation: &Conversation, auth_key: &str) -> Plan {
    let Some(last) = conversation.messages.last() else {
        return echo("");
    };
    if last.role == Role::Tool {
        return Plan::text(words(&format!("tool said: {}", last.text)));
    }
    let mut query = last.text.trim().to_owned();
    let mut usage_override = None;
    for (prefix, value) in [("USAGE ", true), ("NOUSAGE ", false)] {
        if let Some(rest) = query.strip_prefix(prefix) {
            usage_override = Some(value);
            query = rest.trim().to_owned();
        }
    }
    let (directive, rest) = query
        .split_once(char::is_whitespace)
        .unwrap_or((&query, ""));
    let rest = rest.trim();
    let numbers: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let number = |i: usize, default: u64| numbers.get(i).copied().unwrap_or(default);
    let mut plan = match directive {
        "FAIL500" => Plan::fail(500, "scripted failure"),
        "FAIL" => {
            let status = u16::try_from(number(0, 500)).unwrap_or(500);
            let message = if status == 401 {
                // Like OpenAI, echo the key back: the supervisor must scrub it.
                format!("Incorrect API key provided: {auth_key}")
            } else {
                format!("scripted failure {status}")
            };
            let mut plan = Plan::fail(status, &message);
            if let (Some(secs), Some(failure)) = (numbers.get(1), plan.failure.as_mut()) {
                failure
                    .headers
                    .push(("retry-after".into(), secs.to_string()));
            }
            plan
        }
        "FLAKY" => {
            let status = u16::try_from(number(0, 500)).unwrap_or(500);
            let times = u32::try_from(number(1, 1)).unwrap_or(1);
            if shared.should_fail(conversation.counter_key(&query), times) {
                Plan::fail(status, &format!("flaky failure {status}"))
            } else {
                echo(&query)
            }
        }
        "SLOW" => Plan {
            token_delay_ms: number(1, DEFAULT_SLOW_MS),
            first_token_delay_ms: 0,
            ..Plan::text(numbered("t", number(0, 100) as usize))
        },
        "FLOOD" => Plan::text(numbered("w", number(0, 1000) as usize)),
        "HANG" => Plan {
            ending: Ending::HangAfter(0),
            ..Plan::text(Vec::new())
        },
        "HANG_HEADERS" => Plan {
            hang_before_headers: true,
            ..Plan::text(Vec::new())
        },
        "STALL" => Plan {
            ending: Ending::HangAfter(number(0, 1) as usize),
            ..Plan::text(numbered("t", number(0, 1) as usize + 1000))
        },
        "CUT" => Plan {
            ending: Ending::CutAfter(number(0, 1) as usize),
            ..Plan::text(numbered("t", number(0, 1) as usize + 1000))
        },
        "SSEERR" => Plan {
            ending: Ending::ErrorAfter(number(0, 1) as usize, "mid-stream failure".into()),
            ..Plan::text(numbered("t", number(0, 1) as usize + 1000))
        },
        "THINK" => Plan {
            reasoning: words(rest),
            ..echo(rest)
        },
        "BADJSON" => Plan {
            calls: vec![PlannedCall {
                id: None,
                name: conversation.tool_named("read"),
                arguments: "{\"path\": ".into(),
                fragment: DEFAULT_FRAGMENT,
            }],
            ..Plan::text(Vec::new())
        },
        "TOOL" if !rest.is_empty() => Plan {
            calls: vec![parse_call(conversation, rest)],
            ..Plan::text(Vec::new())
        },
        "TOOLS" if !rest.is_empty() => Plan {
            calls: rest
                .split(";;")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| parse_call(conversation, c))
                .collect(),
            ..Plan::text(Vec::new())
        },
        _ => echo(&query),
    };
    plan.usage_override = usage_override;
    plan
}

/// `<name> <json>` of `TOOL`/`TOOLS`.
fn parse_call(conversation: &Conversation, spec: &str) -> PlannedCall {
    let (name, arguments) = spec.split_once(char::is_whitespace).unwrap_or((spec, ""));
    let arguments = arguments.trim();
    PlannedCall {
        id: None,
        name: conversation.tool_named(name),
        arguments: if arguments.is_empty() {
            "{}".into()
        } else {
            arguments.to_owned()
        },
        fragment: DEFAULT_FRAGMENT,
    }
}

/// The script named by the header or a marker in the current query, if any.
fn selected_script(
    shared: &Shared,
    headers: &HeaderMap,
    conversation: &Conversation,
) -> Option<(String, Value)> {
    let inner = shared.lock();
    let by_header = headers
        .get("x-fake-script")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let by_marker = || {
        let query = conversation.query_text();
        let start = query.find("[[fake:")? + "[[fake:".len();
        let end = query[start..].find("]]")? + start;
        Some(query[start..end].to_owned())
    };
    let name = by_header.or_else(by_marker)?;
    inner.scripts.get(&name).cloned().map(|s| (name, s))
}

fn template(text: &str, conversation: &Conversation) -> String {
    text.replace("{{lastUser}}", &conversation.query_text())
        .replace("{{lastToolResult}}", &conversation.last_tool_result())
        .replace("{{toolNames}}", &conversation.tools.join(", "))
}

/// Step `conversation.step()` of a script (agent.md §5.5).
fn script_plan(shared: &Shared, name: &str, script: &Value, conversation: &Conversation) -> Plan {
    let step_index = conversation.step();
    let Some(step) = script
        .get("steps")
        .and_then(Value::as_array)
        .and_then(|steps| steps.get(step_index))
    else {
        // More steps than scripted: an answer that ends the run.
        return echo(&conversation.query_text());
    };
    let strings = |key: &str| -> Vec<String> {
        step.get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|t| template(t, conversation))
                    .collect()
            })
            .unwrap_or_default()
    };
    let number = |key: &str| step.get(key).and_then(Value::as_u64).unwrap_or(0);
    let after = |key: &str| {
        step.get(key)
            .and_then(|v| v.get("afterTokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize
    };
    let mut plan = Plan::text(strings("text"));
    plan.reasoning = strings("reasoning");
    plan.delay_ms = number("delayMs");
    plan.first_token_delay_ms = number("firstTokenDelayMs");
    plan.token_delay_ms = number("tokenDelayMs");
    plan.finish = step
        .get("finishReason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    plan.usage = step.get("usage").cloned();
    plan.omit_done = step.get("omitDone").and_then(Value::as_bool) == Some(true);
    let bad_arguments = step.get("badArguments").and_then(Value::as_bool) == Some(true);
    plan.calls = step
        .get("toolCalls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|call| PlannedCall {
            id: call.get("id").and_then(Value::as_str).map(str::to_owned),
            name: call
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("tool")
                .to_owned(),
            arguments: if bad_arguments {
                "{\"path\": ".to_owned()
            } else {
                match call.get("arguments") {
                    Some(Value::String(text)) => template(text, conversation),
                    Some(other) => other.to_string(),
                    None => "{}".to_owned(),
                }
            },
            fragment: call
                .get("fragment")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_FRAGMENT, |f| f.max(1) as usize),
        })
        .collect();
    match step.get("hang").and_then(Value::as_str) {
        Some("before_headers") => plan.hang_before_headers = true,
        Some("after_headers") => plan.ending = Ending::HangAfter(0),
        Some("mid_stream") => {
            let after_tokens = step.get("afterTokens").and_then(Value::as_u64).unwrap_or(1);
            plan.ending = Ending::HangAfter(after_tokens as usize);
        }
        _ => {}
    }
    if step.get("cut").is_some() {
        plan.ending = Ending::CutAfter(after("cut"));
    }
    if let Some(error) = step.get("sseError") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("mid-stream failure")
            .to_owned();
        plan.ending = Ending::ErrorAfter(after("sseError"), message);
    }
    if let Some(http) = step.get("http") {
        let times = step.get("failTimes").and_then(Value::as_u64);
        let fail = match times {
            None => true,
            Some(times) => shared.should_fail(
                conversation.counter_key(&format!("script:{name}")),
                u32::try_from(times).unwrap_or(u32::MAX),
            ),
        };
        if fail {
            let status = http
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(500);
            plan.failure = Some(HttpFailure {
                status,
                headers: http
                    .get("headers")
                    .and_then(Value::as_object)
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| {
                                (
                                    k.clone(),
                                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                body: http.get("body").cloned(),
                message: format!("scripted failure {status}"),
            });
        }
    }
    plan
}

// ------------------------------------------------------------------------------------------------
// Wire rendering
// ------------------------------------------------------------------------------------------------

/// One piece of a response body.
struct Frame {
    bytes: String,
    /// Content (a token or an argument fragment), as opposed to framing.
    unit: bool,
}

fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(event) => format!("event: {event}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

fn call_id(wire: Wire, step: usize, index: usize, call: &PlannedCall) -> String {
    call.id.clone().unwrap_or_else(|| match wire {
        Wire::OpenAi => format!("call_{index}"),
        Wire::Anthropic => format!("toolu_{step}_{index}"),
    })
}

fn fragments(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

fn units(plan: &Plan) -> u64 {
    let calls: usize = plan
        .calls
        .iter()
        .map(|c| 1 + fragments(&c.arguments, c.fragment).len())
        .sum();
    (plan.reasoning.len() + plan.text.len() + calls) as u64
}

fn openai_usage(plan: &Plan) -> Value {
    plan.usage.clone().unwrap_or_else(|| {
        let completion = units(plan);
        json!({"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion})
    })
}

fn openai_stream(plan: &Plan, conversation: &Conversation, seq: u64, step: usize) -> Vec<Frame> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion.chunk",
            "created": CREATED, "model": conversation.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut frames = vec![Frame {
        bytes: sse(
            None,
            &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        ),
        unit: false,
    }];
    for r in &plan.reasoning {
        frames.push(Frame {
            bytes: sse(None, &chunk(json!({"reasoning_content": r}), Value::Null)),
            unit: true,
        });
    }
    for t in &plan.text {
        frames.push(Frame {
            bytes: sse(None, &chunk(json!({"content": t}), Value::Null)),
            unit: true,
        });
    }
    for (i, call) in plan.calls.iter().enumerate() {
        let first = json!({"tool_calls": [{"index": i, "id": call_id(Wire::OpenAi, step, i, call), "type": "function",
            "function": {"name": call.name, "arguments": ""}}]});
        frames.push(Frame {
            bytes: sse(None, &chunk(first, Value::Null)),
            unit: true,
        });
        for fragment in fragments(&call.arguments, call.fragment) {
            let delta = json!({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]});
            frames.push(Frame {
                bytes: sse(None, &chunk(delta, Value::Null)),
                unit: true,
            });
        }
    }
    frames.push(Frame {
        bytes: sse(None, &chunk(json!({}), json!(plan.finish_reason()))),
        unit: false,
    });
    if plan.usage_override.unwrap_or(conversation.include_usage) {
        let usage = json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion.chunk",
            "created": CREATED, "model": conversation.model, "choices": [], "usage": openai_usage(plan)});
        frames.push(Frame {
            bytes: sse(None, &usage),
            unit: false,
        });
    }
    if !plan.omit_done {
        frames.push(Frame {
            bytes: "data: [DONE]\n\n".into(),
            unit: false,
        });
    }
    frames
}

fn openai_whole(plan: &Plan, conversation: &Conversation, seq: u64, step: usize) -> Value {
    let mut message = json!({"role": "assistant", "content": plan.text.concat()});
    if !plan.reasoning.is_empty() {
        message["reasoning_content"] = json!(plan.reasoning.concat());
    }
    if !plan.calls.is_empty() {
        if plan.text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = Value::Array(
            plan.calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({"id": call_id(Wire::OpenAi, step, i, c), "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect(),
        );
    }
    json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion", "created": CREATED,
        "model": conversation.model,
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason()}],
        "usage": plan.usage.clone().unwrap_or_else(|| json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}))})
}

fn anthropic_stop_reason(finish: &str) -> &str {
    match finish {
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        "stop" => "end_turn",
        other => other,
    }
}

fn anthropic_stream(plan: &Plan, conversation: &Conversation, seq: u64, step: usize) -> Vec<Frame> {
    let framing = |event: &str, data: Value| Frame {
        bytes: sse(Some(event), &data),
        unit: false,
    };
    let unit = |event: &str, data: Value| Frame {
        bytes: sse(Some(event), &data),
        unit: true,
    };
    let mut frames = vec![framing(
        "message_start",
        json!({"type": "message_start", "message": {"id": format!("msg_fake_{seq}"), "type": "message",
            "role": "assistant", "model": conversation.model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    )];
    let mut index = 0;
    if !plan.reasoning.is_empty() {
        frames.push(framing(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "thinking", "thinking": ""}}),
        ));
        for r in &plan.reasoning {
            frames.push(unit(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "thinking_delta", "thinking": r}}),
            ));
        }
        frames.push(framing(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "signature_delta", "signature": SIGNATURE}}),
        ));
        frames.push(framing(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    if !plan.text.is_empty() {
        frames.push(framing(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "text", "text": ""}}),
        ));
        for t in &plan.text {
            frames.push(unit(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        frames.push(framing(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for (i, call) in plan.calls.iter().enumerate() {
        frames.push(unit("content_block_start", json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": call_id(Wire::Anthropic, step, i, call), "name": call.name, "input": {}}})));
        for fragment in fragments(&call.arguments, call.fragment) {
            frames.push(unit(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": fragment}}),
            ));
        }
        frames.push(framing(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    let output = plan
        .usage
        .as_ref()
        .and_then(|u| {
            u.get("completion_tokens")
                .or_else(|| u.get("output_tokens"))
        })
        .and_then(Value::as_u64)
        .unwrap_or_else(|| units(plan));
    frames.push(framing("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": anthropic_stop_reason(&plan.finish_reason()), "stop_sequence": null},
        "usage": {"output_tokens": output}})));
    if !plan.omit_done {
        frames.push(framing("message_stop", json!({"type": "message_stop"})));
    }
    frames
}

fn anthropic_whole(plan: &Plan, conversation: &Conversation, seq: u64, step: usize) -> Value {
    let mut content = Vec::new();
    if !plan.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": plan.reasoning.concat(), "signature": SIGNATURE}));
    }
    if !plan.text.is_empty() {
        content.push(json!({"type": "text", "text": plan.text.concat()}));
    }
    for (i, call) in plan.calls.iter().enumerate() {
        let input = serde_json::from_str::<Value>(&call.arguments).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call_id(Wire::Anthropic, step, i, call), "name": call.name, "input": input}));
    }
    json!({"id": format!("msg_fake_{seq}"), "type": "message", "role": "assistant", "model": conversation.model,
        "content": content, "stop_reason": anthropic_stop_reason(&plan.finish_reason()), "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5}})
}

fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_response(wire: Wire, failure: &HttpFailure) -> Response {
    let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = failure.body.clone().unwrap_or_else(|| match wire {
        Wire::OpenAi => {
            let kind = if failure.status == 429 { "rate_limit_error" } else if failure.status >= 500 { "server_error" } else { "invalid_request_error" };
            json!({"error": {"message": failure.message, "type": kind}})
        }
        Wire::Anthropic => json!({"type": "error", "error": {"type": anthropic_error_type(failure.status), "message": failure.message}}),
    });
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

// ------------------------------------------------------------------------------------------------
// Serving a model call
// ------------------------------------------------------------------------------------------------

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
        let frames = match wire {
            Wire::OpenAi => openai_stream(&plan, &conversation, seq, step),
            Wire::Anthropic => anthropic_stream(&plan, &conversation, seq, step),
        };
        (frames, "text/event-stream")
    } else {
        let whole = match wire {
            Wire::OpenAi => openai_whole(&plan, &conversation, seq, step),
            Wire::Anthropic => anthropic_whole(&plan, &conversation, seq, step),
        };
        (
            vec![Frame {
                bytes: whole.to_string(),
                unit: true,
            }],
            "application/json",
        )
    };
    let error_frame = |message: &str| match wire {
        Wire::OpenAi => sse(
            None,
            &json!({"error": {"message": message, "type": "server_error"}}),
        ),
        Wire::Anthropic => sse(
            Some("error"),
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": message}}),
        ),
    };
    let ending = plan.ending.clone();
    let (first_delay, token_delay) = (plan.first_token_delay_ms, plan.token_delay_ms);
    let error_bytes = match &ending {
        Ending::ErrorAfter(_, message) => error_frame(message),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn openai(messages: Value) -> Conversation {
        conversation(
            Wire::OpenAi,
            &json!({"messages": messages, "tools": [
            {"type": "function", "function": {"name": "read_file"}}]}),
        )
    }

    #[test]
    fn steps_and_queries() {
        let c = openai(json!([
            {"role": "system", "content": "s"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "TOOL read {\"path\":\"x\"} [[fake:demo]]"},
            {"role": "assistant", "content": null},
            {"role": "tool", "content": "file text"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]},
        ]));
        assert_eq!(c.step(), 1);
        assert!(c.query_text().starts_with("TOOL"));
        assert_eq!(c.last_tool_result(), "file text");
        assert_eq!(c.tool_named("read"), "read_file");
    }

    #[test]
    fn directives() {
        let shared = Shared::default();
        let plan = |text: &str| {
            directive_plan(
                &shared,
                &openai(json!([{"role": "user", "content": text}])),
                "k",
            )
        };
        assert_eq!(plan("hello there").text.concat(), "echo: hello there");
        assert_eq!(
            plan("FAIL 429 2").failure.unwrap().headers,
            [("retry-after".to_owned(), "2".to_owned())]
        );
        assert!(plan("FAIL 401").failure.unwrap().message.contains('k'));
        let tools = plan("TOOLS read {\"a\":1} ;; other");
        assert_eq!(tools.calls.len(), 2);
        assert_eq!(tools.calls[1].arguments, "{}");
        assert_eq!(tools.finish_reason(), "tool_calls");
        assert!(plan("FLAKY 503 1").failure.is_some());
        assert!(plan("FLAKY 503 1").failure.is_none());
        assert_eq!(plan("SLOW 3 5").token_delay_ms, 5);
        assert_eq!(plan("STALL 2").ending, Ending::HangAfter(2));
        assert_eq!(plan("THINK a b").reasoning, ["a", " b"]);
        assert!(plan("NOUSAGE hi").usage_override == Some(false));
        let tool_turn =
            openai(json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]));
        assert_eq!(
            directive_plan(&shared, &tool_turn, "").text.concat(),
            "tool said: 42"
        );
    }

    #[test]
    fn anthropic_tool_turns() {
        let c = conversation(
            Wire::Anthropic,
            &json!({"messages": [
                {"role": "user", "content": [{"type": "text", "text": "go"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "done"}]},
            ]}),
        );
        assert_eq!(c.step(), 1);
        assert_eq!(c.query_text(), "go");
        let plan = directive_plan(&Shared::default(), &c, "");
        assert_eq!(plan.text.concat(), "tool said: done");
    }

    #[test]
    fn wire_frames() {
        let c = openai(json!([{"role": "user", "content": "TOOL read {\"path\":\"a.txt\"}"}]));
        let plan = directive_plan(&Shared::default(), &c, "");
        let frames = openai_stream(&plan, &c, 1, 0);
        let text: String = frames.iter().map(|f| f.bytes.as_str()).collect();
        assert!(text.contains("\"id\":\"call_0\""));
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(!text.contains("\"usage\""));
        let frames = anthropic_stream(
            &Plan {
                reasoning: vec!["r".into()],
                ..plan
            },
            &c,
            1,
            0,
        );
        let text: String = frames.iter().map(|f| f.bytes.as_str()).collect();
        assert!(text.contains("fake-signature") && text.contains("\"stop_reason\":\"tool_use\""));
    }
}
