//! AGIO export (agent.md §6, api.md §15): operational events built from each session's event
//! stream and the gateway's usage, batched per session and posted to `agio.provider`.
//!
//! Nothing here may slow a run down or break it. The publish path only filters by event type
//! and `try_send`s into the session's bounded queue (dropping when it is full); one collector
//! task per session builds the AGIO events, and every POST runs in its own task with a 5 s
//! timeout whose result is ignored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};
use shared::ids::{SessionId, now_ms};
use shared::protocol::Usage;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// Events per batch (the CLI's AGIO provider setting).
const BATCH_SIZE: usize = 3;
/// A batch goes out this long after its first event at the latest.
const BATCH_DELAY: Duration = Duration::from_secs(5);
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Signals queued per session before new ones are dropped.
const QUEUE: usize = 1024;
/// How long shutdown waits for the last batches.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Argument keys whose values are never exported (upstream's list).
const SECRET_KEYS: [&str; 6] = ["password", "token", "key", "secret", "apikey", "auth"];

/// Agent event types the collector reads; everything else is dropped at the door.
const OBSERVED: [&str; 6] = [
    "user_message",
    "agent_run_start",
    "assistant_message",
    "tool_call",
    "tool_result",
    "agent_run_end",
];

enum Signal {
    Event(Arc<str>),
    ModelRequest {
        tools: usize,
    },
    ModelFinished {
        model: String,
        usage: Usage,
        ttft: Option<Duration>,
        total: Duration,
    },
}

struct Feed {
    queue: mpsc::Sender<Signal>,
    /// Set while the session's current streaming run has not produced its first text, so that
    /// only that one streaming delta per run reaches the collector.
    want_ttft: Arc<AtomicBool>,
}

/// What `agent_initialized` reports; fixed for the server's life.
#[derive(Clone)]
struct Static {
    temperature: f64,
    max_iterations: u32,
    max_tokens: Option<u32>,
    thinking: bool,
    providers: u32,
    include_input: bool,
}

pub struct Agio {
    endpoint: String,
    http: reqwest::Client,
    fixed: Static,
    feeds: Mutex<HashMap<SessionId, Feed>>,
    tasks: TaskTracker,
}

impl Agio {
    /// The exporter, when `agio.provider` is set.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn from_config(config: &Config) -> Result<Option<Arc<Self>>, reqwest::Error> {
        let Some(endpoint) = config.agio.provider.clone() else {
            return Ok(None);
        };
        let model = config.catalogue.default_model();
        let http = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .connect_timeout(POST_TIMEOUT)
            .build()?;
        Ok(Some(Arc::new(Self {
            endpoint,
            http,
            fixed: Static {
                temperature: config.temperature,
                max_iterations: config.max_iterations,
                max_tokens: model.settings.max_tokens,
                thinking: model
                    .settings
                    .thinking
                    .as_ref()
                    .and_then(|t| t.get("type"))
                    .and_then(Value::as_str)
                    == Some("enabled"),
                providers: u32::from(!config.catalogue.is_offline()),
                include_input: config.agio.include_input,
            },
            feeds: Mutex::default(),
            tasks: TaskTracker::new(),
        })))
    }

    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Feed>> {
        self.feeds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `signal` for the session's collector, starting it on first use. Never waits.
    fn signal(self: &Arc<Self>, session_id: &SessionId, signal: Signal) {
        let mut feeds = self.feeds();
        let feed = feeds.entry(session_id.clone()).or_insert_with(|| {
            let (queue, inbox) = mpsc::channel(QUEUE);
            let want_ttft = Arc::new(AtomicBool::new(false));
            let collector = Collector::new(self.clone(), session_id.clone(), want_ttft.clone());
            self.tasks.spawn(collector.run(inbox));
            Feed { queue, want_ttft }
        });
        if feed.queue.try_send(signal).is_err() {
            tracing::debug!(%session_id, "AGIO queue full; event dropped");
        }
    }

    /// An agent event the session just published (its `type` is already known).
    pub fn observe(self: &Arc<Self>, session_id: &SessionId, kind: &str, json: &Arc<str>) {
        let wanted = OBSERVED.contains(&kind)
            || (kind == "assistant_streaming_message" && self.wants_ttft(session_id));
        if wanted {
            self.signal(session_id, Signal::Event(json.clone()));
        }
    }

    fn wants_ttft(&self, session_id: &SessionId) -> bool {
        self.feeds()
            .get(session_id)
            .is_some_and(|f| f.want_ttft.load(Ordering::Relaxed))
    }

    /// A worker asked for a model call: the start of a loop iteration.
    pub fn model_request(self: &Arc<Self>, session_id: &SessionId, params: &str) {
        #[derive(Deserialize)]
        struct Tools {
            #[serde(default)]
            tools: Vec<IgnoredAny>,
        }
        let tools = serde_json::from_str::<Tools>(params).map_or(0, |t| t.tools.len());
        self.signal(session_id, Signal::ModelRequest { tools });
    }

    /// A model call completed: its usage (if known), the time to its first delta, and its
    /// whole duration, retries included.
    pub(crate) fn model_finished(
        self: &Arc<Self>,
        session_id: &SessionId,
        model: &str,
        usage: Option<&Usage>,
        ttft: Option<Duration>,
        total: Duration,
    ) {
        self.signal(
            session_id,
            Signal::ModelFinished {
                model: model.to_owned(),
                usage: usage.cloned().unwrap_or_default(),
                ttft,
                total,
            },
        );
    }

    /// The session is gone: its collector sends what it holds and stops.
    pub fn close(&self, session_id: &SessionId) {
        self.feeds().remove(session_id);
    }

    /// Server shutdown: every collector flushes; waits a bounded time for the last posts.
    pub async fn shutdown(&self) {
        self.feeds().clear();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::debug!("AGIO posts still pending at shutdown");
        }
    }

    /// Starts a session's poster: it sends that session's batches one after another, so the
    /// collector receives them in order; the outcome of each is only logged.
    fn poster(self: &Arc<Self>) -> mpsc::Sender<Vec<Value>> {
        let (batches, mut queue) = mpsc::channel::<Vec<Value>>(QUEUE);
        let agio = self.clone();
        self.tasks.spawn(async move {
            while let Some(events) = queue.recv().await {
                let request = agio
                    .http
                    .post(&agio.endpoint)
                    .json(&json!({"events": events}));
                match request.send().await {
                    Ok(response) if !response.status().is_success() => {
                        tracing::debug!(
                            status = response.status().as_u16(),
                            "AGIO collector refused a batch"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e.without_url(), "AGIO batch not delivered"),
                }
            }
        });
        batches
    }
}

/// One run as the collector follows it.
struct Run {
    id: String,
    started_at: u64,
    streaming: bool,
    iteration: u32,
    loop_started_at: Option<u64>,
    /// Tool results still expected before the current iteration ends.
    pending_results: usize,
    iteration_usage: Option<Usage>,
    totals: Option<(u64, u64, u64)>,
    model: Option<String>,
}

/// An `agent_run_start` waiting for the first model call, which tells the tool count that
/// `agent_initialized` reports.
struct PendingStart {
    event: Value,
    provider: Option<String>,
    model: Option<String>,
}

struct Collector {
    agio: Arc<Agio>,
    /// This session's batches, posted in order by its poster task.
    posts: mpsc::Sender<Vec<Value>>,
    session_id: SessionId,
    want_ttft: Arc<AtomicBool>,
    buffer: Vec<Value>,
    deadline: Option<tokio::time::Instant>,
    initialized: bool,
    last_input: Option<Value>,
    pending_start: Option<PendingStart>,
    run: Option<Run>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    timestamp: u64,
}

impl Collector {
    fn new(agio: Arc<Agio>, session_id: SessionId, want_ttft: Arc<AtomicBool>) -> Self {
        Self {
            posts: agio.poster(),
            agio,
            session_id,
            want_ttft,
            buffer: Vec::new(),
            deadline: None,
            initialized: false,
            last_input: None,
            pending_start: None,
            run: None,
        }
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Signal>) {
        loop {
            let deadline = self.deadline;
            tokio::select! {
                signal = inbox.recv() => match signal {
                    Some(signal) => self.handle(signal),
                    None => break,
                },
                () = async { if let Some(at) = deadline { tokio::time::sleep_until(at).await } }, if deadline.is_some() => {
                    self.flush();
                }
            }
        }
        self.release_start(0);
        self.flush();
    }

    fn flush(&mut self) {
        self.deadline = None;
        if !self.buffer.is_empty() {
            // Never wait on the collector: a full queue means it is down or far behind.
            if self
                .posts
                .try_send(std::mem::take(&mut self.buffer))
                .is_err()
            {
                tracing::debug!(session_id = %self.session_id, "AGIO queue full; batch dropped");
            }
        }
    }

    /// Queues one AGIO event with the common fields.
    fn push(&mut self, kind: &str, timestamp: u64, mut payload: Map<String, Value>) {
        payload.insert("type".into(), json!(kind));
        payload.insert("timestamp".into(), json!(timestamp));
        payload.insert("sessionId".into(), json!(self.session_id));
        if let Some(run) = &self.run {
            payload.insert("runId".into(), json!(run.id));
        }
        self.buffer.push(Value::Object(payload));
        if self.buffer.len() >= BATCH_SIZE {
            self.flush();
        } else if self.deadline.is_none() {
            self.deadline = Some(tokio::time::Instant::now() + BATCH_DELAY);
        }
    }

    fn handle(&mut self, signal: Signal) {
        match signal {
            Signal::Event(json) => {
                let Ok(event) = serde_json::from_str::<Value>(&json) else {
                    return;
                };
                let Ok(head) = Head::deserialize(&event) else {
                    return;
                };
                self.event(&head, &event);
            }
            Signal::ModelRequest { tools } => {
                self.release_start(tools);
                self.end_loop(now_ms());
                if let Some(run) = self.run.as_mut() {
                    run.iteration += 1;
                    run.loop_started_at = Some(now_ms());
                    run.pending_results = 0;
                    run.iteration_usage = None;
                    let iteration = run.iteration;
                    self.push(
                        "agent_loop_start",
                        now_ms(),
                        obj(json!({"iteration": iteration})),
                    );
                }
            }
            Signal::ModelFinished {
                model,
                usage,
                ttft,
                total,
            } => {
                let Some(run) = self.run.as_mut() else { return };
                let (input, output, sum) = run.totals.unwrap_or_default();
                run.totals = Some((
                    input + usage.prompt_tokens,
                    output + usage.completion_tokens,
                    sum + usage.total_tokens,
                ));
                run.iteration_usage = Some(usage.clone());
                run.model = Some(model.clone());
                if let Some(ttft) = ttft.filter(|_| !usage.estimated && usage.completion_tokens > 0)
                {
                    let generating = total.saturating_sub(ttft).as_secs_f64();
                    if generating > 0.0 {
                        let tps = usage.completion_tokens as f64 / generating;
                        self.push(
                            "agent_tps",
                            now_ms(),
                            obj(json!({"tps": tps, "tokenCount": usage.completion_tokens, "modelName": model})),
                        );
                    }
                }
            }
        }
    }

    /// Queues the held `agent_run_start` (and, once per session, `agent_initialized` first).
    fn release_start(&mut self, tools: usize) {
        let Some(start) = self.pending_start.take() else {
            return;
        };
        let timestamp = start.event["timestamp"].as_u64().unwrap_or_else(now_ms);
        if !self.initialized {
            self.initialized = true;
            let fixed = self.agio.fixed.clone();
            let mut config = json!({
                "toolCallEngine": "native",
                "temperature": fixed.temperature,
                "maxIterations": fixed.max_iterations,
                "plannerEnabled": false,
                "thinkingEnabled": fixed.thinking,
                "snapshotEnabled": false,
                "researchEnabled": false,
                "customMcpServers": false,
            });
            if let Some(provider) = start.provider {
                config["modelProvider"] = json!(provider);
            }
            if let Some(model) = start.model {
                config["modelName"] = json!(model);
            }
            if let Some(max) = fixed.max_tokens {
                config["maxTokens"] = json!(max);
            }
            let count = json!({"modelProvidersCount": fixed.providers, "toolsCount": tools, "mcpServersCount": 0});
            self.push(
                "agent_initialized",
                timestamp,
                obj(json!({"config": config, "count": count})),
            );
        }
        self.push("agent_run_start", timestamp, obj(start.event));
    }

    /// Ends the current loop iteration, if one is open.
    fn end_loop(&mut self, now: u64) {
        let Some(run) = self.run.as_mut() else { return };
        let Some(started) = run.loop_started_at.take() else {
            return;
        };
        let mut payload =
            json!({"iteration": run.iteration, "durationMs": now.saturating_sub(started)});
        if let Some(usage) = run.iteration_usage.take() {
            payload["tokenUsage"] = json!({"input": usage.prompt_tokens, "output": usage.completion_tokens, "total": usage.total_tokens});
        }
        self.push("agent_loop_end", now, obj(payload));
    }

    fn event(&mut self, head: &Head, event: &Value) {
        let at = if head.timestamp > 0 {
            head.timestamp
        } else {
            now_ms()
        };
        match head.kind.as_str() {
            "user_message" => self.last_input = event.get("content").cloned(),
            "agent_run_start" => {
                let options = event.get("runOptions").cloned().unwrap_or(Value::Null);
                let streaming = options.get("stream").and_then(Value::as_bool) == Some(true);
                let input = if self.agio.fixed.include_input {
                    options.get("input").cloned().unwrap_or(json!(""))
                } else {
                    json!("")
                };
                // Upstream reads the sanitised input, so its flag is always false; the real
                // input (the user_message just before) says whether it was multimodal.
                let multimodal = self.last_input.as_ref().is_some_and(|c| {
                    c.as_array().is_some_and(|parts| {
                        parts
                            .iter()
                            .any(|p| p.get("type").and_then(Value::as_str) != Some("text"))
                    })
                });
                self.run = Some(Run {
                    id: head.id.clone(),
                    started_at: at,
                    streaming,
                    iteration: 0,
                    loop_started_at: None,
                    pending_results: 0,
                    iteration_usage: None,
                    totals: None,
                    model: event
                        .get("model")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                });
                self.want_ttft.store(streaming, Ordering::Relaxed);
                self.pending_start = Some(PendingStart {
                    event: json!({"input": input, "isMultimodalInput": multimodal, "streaming": streaming, "timestamp": at}),
                    provider: event
                        .get("provider")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    model: event
                        .get("model")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                });
            }
            "assistant_streaming_message" => {
                let has_text = event
                    .get("content")
                    .and_then(Value::as_str)
                    .is_some_and(|c| !c.is_empty());
                let Some(run) = self.run.as_ref().filter(|r| r.streaming) else {
                    return;
                };
                if !has_text || !self.want_ttft.swap(false, Ordering::Relaxed) {
                    return;
                }
                let mut payload = json!({"ttftMs": at.saturating_sub(run.started_at)});
                if let Some(model) = &run.model {
                    payload["modelName"] = json!(model);
                }
                self.push("agent_ttft", at, obj(payload));
            }
            "assistant_message" => {
                let calls = event
                    .get("toolCalls")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                match self.run.as_mut() {
                    Some(run) if calls > 0 => run.pending_results = calls,
                    Some(_) => self.end_loop(at),
                    None => {}
                }
            }
            "tool_call" => {
                let arguments = event.get("arguments").cloned().unwrap_or(json!({}));
                let size = arguments.to_string().len();
                let payload = json!({
                    "toolName": event.get("name"),
                    "toolCallId": event.get("toolCallId"),
                    "arguments": sanitize(&arguments),
                    "argumentsSize": size,
                    "mcpServer": "builtin",
                });
                self.push("tool_call", at, obj(payload));
            }
            "tool_result" => {
                let content = event.get("content").unwrap_or(&Value::Null);
                let (content_type, size) = describe_content(content);
                let payload = json!({
                    "toolName": event.get("name"),
                    "toolCallId": event.get("toolCallId"),
                    "executionTimeMs": event.get("elapsedMs").and_then(Value::as_u64).unwrap_or(0),
                    "successful": event.get("error").is_none_or(Value::is_null),
                    "resultSize": size,
                    "contentType": content_type,
                });
                self.push("tool_result", at, obj(payload));
                if let Some(run) = self.run.as_mut()
                    && run.pending_results > 0
                {
                    run.pending_results -= 1;
                    if run.pending_results == 0 {
                        self.end_loop(at);
                    }
                }
            }
            "agent_run_end" => {
                self.release_start(0);
                self.end_loop(at);
                self.want_ttft.store(false, Ordering::Relaxed);
                let status = event
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                let mut payload = json!({
                    "executionTimeMs": event.get("elapsedMs").and_then(Value::as_u64).unwrap_or(0),
                    "loopCount": event.get("iterations").and_then(Value::as_u64).unwrap_or(0),
                    "successful": status != "error",
                    "error": if status == "error" { "AgentRunError" } else { "" },
                });
                if let Some((input, output, total)) = self.run.as_ref().and_then(|r| r.totals) {
                    payload["tokenUsage"] =
                        json!({"input": input, "output": output, "total": total});
                }
                self.push("agent_run_end", at, obj(payload));
                self.run = None;
                self.flush();
            }
            _ => {}
        }
    }
}

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Tool arguments as AGIO may see them: secret-looking keys redacted, long strings cut.
fn sanitize(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let lower = key.to_ascii_lowercase();
                    let value = if SECRET_KEYS.iter().any(|s| lower.contains(s)) {
                        json!("[REDACTED]")
                    } else {
                        sanitize(value)
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(sanitize).collect()),
        Value::String(text) if text.chars().count() > 1000 => {
            let head: String = text.chars().take(100).collect();
            json!(format!("{head}...[TRUNCATED]"))
        }
        other => other.clone(),
    }
}

/// `(contentType, resultSize)` of a tool result's content.
fn describe_content(content: &Value) -> (&'static str, usize) {
    match content {
        Value::Null => ("empty", 0),
        Value::String(text) if text.is_empty() => ("empty", 0),
        Value::String(_) => ("text", content.to_string().len()),
        Value::Array(_) => ("array", content.to_string().len()),
        Value::Object(_) => ("object", content.to_string().len()),
        _ => ("unknown", content.to_string().len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_sanitised() {
        let long = "x".repeat(1001);
        let got = sanitize(
            &json!({"path": "a", "apiKey": "k", "nested": {"Authorization": "b", "text": long}}),
        );
        assert_eq!(got["path"], "a");
        assert_eq!(got["apiKey"], "[REDACTED]");
        assert_eq!(got["nested"]["Authorization"], "[REDACTED]");
        assert_eq!(
            got["nested"]["text"].as_str().unwrap().len(),
            100 + "...[TRUNCATED]".len()
        );
    }

    #[test]
    fn content_kinds() {
        assert_eq!(describe_content(&Value::Null), ("empty", 0));
        assert_eq!(describe_content(&json!("")).0, "empty");
        assert_eq!(describe_content(&json!("ab")), ("text", 4));
        assert_eq!(describe_content(&json!([1])).0, "array");
        assert_eq!(describe_content(&json!({})).0, "object");
        assert_eq!(describe_content(&json!(1)).0, "unknown");
    }
}
