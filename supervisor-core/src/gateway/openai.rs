//! The OpenAI-compatible chat-completions adapter (agent.md §4.8): OpenAI, Azure deployments,
//! DeepSeek, Ollama, vLLM, llama.cpp, LM Studio, OpenRouter and any server that speaks the same
//! dialect, each with its own small deviations, all absorbed here so the worker sees one format.

use serde_json::{Map, Value, json};
use shared::protocol::{Delta, ModelErrorKind, Usage};

use super::http::{BuildError, Dialect, Output, new_call_id};
use super::sse::SseEvent;
use crate::config::ReasoningPassback;
use crate::config::catalogue::{Adapter, ModelEntry};

/// Extension fields of our request format (agent.md §4.3) that no provider knows by these names.
const EXTENSIONS: [&str; 3] = [
    "reasoning_content",
    "reasoning_signature",
    "redacted_reasoning",
];

/// Request fields passed through as they are when set.
const PASS_THROUGH: [&str; 7] = [
    "stop",
    "response_format",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "parallel_tool_calls",
    "user",
];

/// The request URL.
pub(super) fn url(entry: &ModelEntry, base: &str) -> Result<reqwest::Url, BuildError> {
    let mut url = reqwest::Url::parse(base).map_err(BuildError::BadBase)?;
    if entry.adapter == (Adapter::OpenAi { azure: true }) {
        url.path_segments_mut()
            .map_err(|()| BuildError::CannotTakePath)?
            .pop_if_empty()
            .extend(["openai", "deployments", &entry.id, "chat", "completions"]);
        url.query_pairs_mut()
            .append_pair("api-version", &entry.settings.api_version);
    } else {
        url.path_segments_mut()
            .map_err(|()| BuildError::CannotTakePath)?
            .pop_if_empty()
            .extend(["chat", "completions"]);
    }
    Ok(url)
}

/// Authentication headers: `Authorization: Bearer` (Azure: `api-key`), none without a key.
pub(super) fn auth(
    entry: &ModelEntry,
    request: reqwest::RequestBuilder,
) -> reqwest::RequestBuilder {
    match &entry.api_key {
        None => request,
        Some(key) if entry.adapter == (Adapter::OpenAi { azure: true }) => {
            match super::http::secret_header(key) {
                Some(value) => request.header("api-key", value),
                None => request,
            }
        }
        // reqwest marks the Authorization value sensitive itself.
        Some(key) => request.bearer_auth(key.expose()),
    }
}

/// OpenAI reasoning models reject `temperature`/`top_p` and want `max_completion_tokens`.
fn is_reasoning_model(id: &str) -> bool {
    let id = id.rsplit('/').next().unwrap_or(id);
    let mut chars = id.chars();
    id.starts_with("gpt-5")
        || (chars.next() == Some('o') && chars.next().is_some_and(|c| c.is_ascii_digit()))
}

/// The request body for `params` (the worker's OpenAI-shaped request).
pub(super) fn body(entry: &ModelEntry, params: &Map<String, Value>, stream: bool) -> Value {
    let settings = &entry.settings;
    let mut body = Map::new();
    body.insert("model".into(), json!(entry.id));
    let messages: Vec<Value> = params
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .map(|m| outgoing_message(m, settings.passback))
                .collect()
        })
        .unwrap_or_default();
    body.insert("messages".into(), Value::Array(messages));
    let tools = params
        .get("tools")
        .filter(|t| settings.tools && t.as_array().is_some_and(|a| !a.is_empty()));
    if let Some(tools) = tools {
        body.insert("tools".into(), tools.clone());
        if let Some(choice) = params.get("tool_choice").filter(|c| !c.is_null()) {
            body.insert("tool_choice".into(), choice.clone());
        }
    }
    let set = |key: &str| params.get(key).filter(|v| !v.is_null()).cloned();
    let max_tokens = set("max_tokens").or_else(|| settings.max_tokens.map(|t| json!(t)));
    if is_reasoning_model(&entry.id) {
        if let Some(max) = max_tokens {
            body.insert("max_completion_tokens".into(), max);
        }
    } else {
        for key in ["temperature", "top_p"] {
            if let Some(value) = set(key) {
                body.insert(key.into(), value);
            }
        }
        if let Some(max) = max_tokens {
            body.insert("max_tokens".into(), max);
        }
    }
    for key in PASS_THROUGH {
        if let Some(value) = set(key) {
            body.insert(key.into(), value);
        }
    }
    let configured = settings.thinking.clone();
    let thinking = set("thinking").or_else(|| configured.clone());
    let native_switch = matches!(entry.provider.as_str(), "deepseek" | "volcengine");
    let send_thinking = settings
        .send_thinking
        .unwrap_or(configured.is_some() || native_switch);
    if let Some(thinking) = thinking.filter(|_| send_thinking) {
        // Tarko's `budgetTokens` is camelCase; the servers that read `thinking` want only `type`
        // (DeepSeek, Volcengine) or snake_case fields.
        let mut native = json!({"type": thinking.get("type").cloned().unwrap_or(json!("enabled"))});
        if let Some(budget) = thinking
            .get("budgetTokens")
            .or_else(|| thinking.get("budget_tokens"))
        {
            native["budget_tokens"] = budget.clone();
        }
        body.insert("thinking".into(), native);
    }
    if stream {
        body.insert("stream".into(), json!(true));
        if settings.stream_usage {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    for (key, value) in &settings.params {
        body.insert(key.clone(), value.clone());
    }
    Value::Object(body)
}

/// One message with our extension fields removed, keeping `reasoning_content` where the model's
/// `reasoningPassback` wants it (agent.md §2.5: DeepSeek rejects tool-call turns without it).
fn outgoing_message(message: &Value, passback: ReasoningPassback) -> Value {
    let Some(object) = message.as_object() else {
        return message.clone();
    };
    let mut out = object.clone();
    let keep_reasoning = object.get("role").and_then(Value::as_str) == Some("assistant")
        && match passback {
            ReasoningPassback::None => false,
            ReasoningPassback::All => true,
            ReasoningPassback::ToolCalls => object
                .get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|calls| !calls.is_empty()),
        }
        && object
            .get("reasoning_content")
            .and_then(Value::as_str)
            .is_some_and(|r| !r.is_empty());
    for key in EXTENSIONS {
        if key != "reasoning_content" || !keep_reasoning {
            out.remove(key);
        }
    }
    Value::Object(out)
}

/// One tool call being assembled from fragments.
struct Slot {
    /// The index the server gave it (servers differ: missing, reused, not starting at 0).
    upstream: Option<u64>,
    id: Option<String>,
    name: String,
    announced: bool,
    arguments_started: bool,
    /// Argument text that arrived before the call could be announced (no name yet).
    pending: String,
}

/// The accumulator hardened against the servers of agent.md §4.8: indexes renumbered 0…n−1 in
/// order of first appearance, missing ids generated, Ollama's reused index 0 split by id,
/// object arguments stringified.
#[derive(Default)]
struct ToolCalls {
    slots: Vec<Slot>,
}

impl ToolCalls {
    fn slot_for(&mut self, index: Option<u64>, id: Option<&str>) -> usize {
        let existing = match (index, id) {
            (Some(index), id) => self
                .slots
                .iter()
                .rposition(|s| s.upstream == Some(index))
                .filter(|&at| match (id, self.slots[at].id.as_deref()) {
                    (Some(new), Some(old)) => new == old,
                    _ => true,
                }),
            (None, Some(id)) => self.slots.iter().position(|s| s.id.as_deref() == Some(id)),
            (None, None) => (!self.slots.is_empty()).then_some(0),
        };
        existing.unwrap_or_else(|| {
            self.slots.push(Slot {
                upstream: index,
                id: None,
                name: String::new(),
                announced: false,
                arguments_started: false,
                pending: String::new(),
            });
            self.slots.len() - 1
        })
    }

    fn fragment(&mut self, fragment: &Value, out: &mut Vec<Delta>) {
        let id = fragment
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty());
        let at = self.slot_for(fragment.get("index").and_then(Value::as_u64), id);
        let slot = &mut self.slots[at];
        let index = at as u32;
        if slot.id.is_none() {
            slot.id = id.map(str::to_owned);
        }
        let function = fragment.get("function").unwrap_or(&Value::Null);
        if let Some(name) = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            if !slot.announced {
                slot.name.push_str(name);
            } else if !slot.arguments_started {
                // A name split over fragments: the worker appends name pieces.
                slot.name.push_str(name);
                out.push(Delta::ToolCall {
                    index,
                    id: None,
                    name: Some(name.to_owned()),
                    arguments: String::new(),
                });
            }
        }
        match function.get("arguments") {
            Some(Value::String(text)) => slot.pending.push_str(text),
            None | Some(Value::Null) => {}
            Some(object) => slot.pending.push_str(&object.to_string()),
        }
        if !slot.announced && !slot.name.is_empty() {
            Self::announce(slot, index, out);
        } else if slot.announced && !slot.pending.is_empty() {
            slot.arguments_started = true;
            out.push(Delta::ToolCall {
                index,
                id: None,
                name: None,
                arguments: std::mem::take(&mut slot.pending),
            });
        }
    }

    fn announce(slot: &mut Slot, index: u32, out: &mut Vec<Delta>) {
        let id = slot.id.get_or_insert_with(new_call_id).clone();
        let arguments = std::mem::take(&mut slot.pending);
        slot.announced = true;
        slot.arguments_started = !arguments.is_empty();
        out.push(Delta::ToolCall {
            index,
            id: Some(id),
            name: Some(slot.name.clone()),
            arguments,
        });
    }

    /// Calls that never got a name are still delivered, so the worker can answer them with an
    /// error instead of losing them.
    fn flush(&mut self, out: &mut Vec<Delta>) {
        for (at, slot) in self.slots.iter_mut().enumerate() {
            if !slot.announced {
                Self::announce(slot, at as u32, out);
            }
        }
    }
}

/// Text of a `content` that some servers send as parts instead of a string.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Array(parts) => {
            let text: String = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!text.is_empty()).then_some(text)
        }
        _ => None,
    }
}

fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage").filter(|u| u.is_object())?;
    let count = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
    let (prompt, completion) = (count("prompt_tokens"), count("completion_tokens"));
    let total = usage
        .get("total_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(prompt + completion);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
        estimated: false,
    })
}

/// A top-level `{"error": …}` payload.
fn error_of(value: &Value) -> Option<String> {
    let error = value.get("error").filter(|e| !e.is_null())?;
    Some(
        error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_owned),
    )
}

#[derive(Default)]
pub(super) struct OpenAiDialect {
    calls: ToolCalls,
}

impl OpenAiDialect {
    /// One `delta` (streaming) or `message` (whole response), in the order reasoning → text →
    /// tool calls.
    fn apply(&mut self, delta: &Value, out: &mut Output) {
        let reasoning = delta
            .get("reasoning_content")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .or_else(|| {
                delta
                    .get("reasoning")
                    .and_then(Value::as_str)
                    .filter(|r| !r.is_empty())
            });
        if let Some(reasoning) = reasoning {
            out.deltas.push(Delta::Reasoning(reasoning.to_owned()));
        }
        if let Some(text) = delta.get("content").and_then(content_text) {
            out.deltas.push(Delta::Text(text));
        }
        if let Some(refusal) = delta
            .get("refusal")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
        {
            out.deltas.push(Delta::Text(refusal.to_owned()));
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                self.calls.fragment(call, &mut out.deltas);
            }
        }
    }

    fn choice(&mut self, chunk: &Value, key: &str, out: &mut Output) {
        if let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        {
            if let Some(delta) = choice.get(key) {
                self.apply(delta, out);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                out.finish_reason = Some(reason.to_owned());
            }
        }
        if let Some(usage) = usage_of(chunk) {
            out.usage = Some(usage);
        }
    }
}

impl Dialect for OpenAiDialect {
    fn event(&mut self, event: SseEvent, out: &mut Output) {
        let data = event.data.trim();
        if data.is_empty() {
            return;
        }
        if data == "[DONE]" {
            out.ended = true;
            return;
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                out.failure = Some((ModelErrorKind::Protocol, format!("unparsable chunk: {e}")));
                return;
            }
        };
        if event.event == "error" || chunk.get("error").is_some_and(|e| !e.is_null()) {
            let message = error_of(&chunk).unwrap_or_else(|| chunk.to_string());
            out.failure = Some((ModelErrorKind::StreamInterrupted, message));
            return;
        }
        self.choice(&chunk, "delta", out);
    }

    fn end(&mut self, out: &mut Output) {
        self.calls.flush(&mut out.deltas);
    }

    fn whole(&mut self, body: Value, out: &mut Output) {
        if let Some(message) = error_of(&body) {
            out.failure = Some((ModelErrorKind::StreamInterrupted, message));
            return;
        }
        self.choice(&body, "message", out);
        self.calls.flush(&mut out.deltas);
        out.ended = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, load_with_env};

    fn entry(config: &str) -> std::sync::Arc<ModelEntry> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, config).unwrap();
        let c = load_with_env(Some(&path), &Overrides::default(), |_| None).unwrap();
        c.catalogue.default_model().clone()
    }

    fn run(chunks: &[Value]) -> Output {
        let mut dialect = OpenAiDialect::default();
        let mut out = Output::default();
        for chunk in chunks {
            dialect.event(
                SseEvent {
                    event: "message".into(),
                    data: chunk.to_string(),
                },
                &mut out,
            );
        }
        dialect.end(&mut out);
        out
    }

    fn call(index: Option<u64>, id: Option<&str>, name: Option<&str>, args: Value) -> Value {
        let mut call = json!({"function": {"arguments": args}});
        if let Some(i) = index {
            call["index"] = json!(i);
        }
        if let Some(id) = id {
            call["id"] = json!(id);
        }
        if let Some(name) = name {
            call["function"]["name"] = json!(name);
        }
        json!({"choices": [{"delta": {"tool_calls": [call]}}]})
    }

    #[test]
    fn body_strips_extensions_and_applies_rules() {
        let e = entry(
            r#"{"model":{"provider":"deepseek","id":"deepseek-reasoner","apiKey":"k","maxTokens":99,"params":{"x":1}}}"#,
        );
        let params = json!({
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "reasoning_content": "r1", "reasoning_signature": "s",
                 "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
                {"role": "assistant", "content": "done", "reasoning_content": "r2", "redacted_reasoning": ["x"]}
            ],
            "tools": [], "temperature": 0.5, "top_p": null,
            "thinking": {"type": "enabled", "budgetTokens": 2000}
        });
        let body = body(&e, params.as_object().unwrap(), true);
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages[1]["reasoning_content"], "r1");
        assert!(messages[1].get("reasoning_signature").is_none());
        assert!(messages[3].get("reasoning_content").is_none());
        assert!(messages[3].get("redacted_reasoning").is_none());
        assert!(body.get("tools").is_none());
        assert_eq!(body["temperature"], 0.5);
        assert!(body.get("top_p").is_none());
        assert_eq!(body["max_tokens"], 99);
        assert_eq!(
            body["thinking"],
            json!({"type": "enabled", "budget_tokens": 2000})
        );
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["x"], 1);
    }

    #[test]
    fn reasoning_models_and_plain_openai() {
        let e = entry(r#"{"model":{"provider":"openai","id":"o3-mini","apiKey":"k"}}"#);
        let params = json!({"messages": [], "temperature": 0.3, "max_tokens": 10,
            "thinking": {"type": "enabled"}, "response_format": {"type": "json_object"}});
        let body = body(&e, params.as_object().unwrap(), false);
        assert!(body.get("temperature").is_none());
        assert_eq!(body["max_completion_tokens"], 10);
        assert!(
            body.get("thinking").is_none(),
            "openai gets no thinking field"
        );
        assert!(body.get("stream").is_none());
        assert_eq!(body["response_format"]["type"], "json_object");
        assert!(!is_reasoning_model("gpt-4o") && is_reasoning_model("openai/o1"));
    }

    #[test]
    fn urls() {
        let e =
            entry(r#"{"model":{"provider":"ollama","id":"x","baseURL":"http://127.0.0.1:1/v1/"}}"#);
        assert_eq!(
            url(&e, e.base_url.as_deref().unwrap()).unwrap().as_str(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
        let e = entry(
            r#"{"model":{"provider":"azure-openai","id":"dep 1","apiKey":"k","baseURL":"https://r.openai.azure.com"}}"#,
        );
        assert_eq!(
            url(&e, e.base_url.as_deref().unwrap()).unwrap().as_str(),
            "https://r.openai.azure.com/openai/deployments/dep%201/chat/completions?api-version=2024-10-01-preview"
        );
    }

    #[test]
    fn stream_order_reasoning_usage_and_done() {
        let out = run(&[
            json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"delta": {"content": "b", "reasoning": "a"}}]}),
            json!({"choices": [{"delta": {"reasoning_content": "c"}}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
        ]);
        assert_eq!(
            out.deltas,
            [
                Delta::Reasoning("a".into()),
                Delta::Text("b".into()),
                Delta::Reasoning("c".into())
            ]
        );
        assert_eq!(out.finish_reason.as_deref(), Some("stop"));
        assert_eq!(out.usage.unwrap().total_tokens, 5);
    }

    #[test]
    fn tool_calls_are_renumbered_and_completed() {
        let out = run(&[
            call(Some(3), Some("a"), Some("read"), json!("")),
            call(Some(3), None, None, json!("{\"p\":")),
            call(Some(3), None, None, json!("1}")),
            // Ollama: index 0 again, but another id: a new call.
            call(Some(0), Some("b"), Some("list"), json!({"x": 1})),
            call(Some(0), Some("c"), Some("list"), json!({})),
            // No index, no id, no name yet: arguments wait for the name.
            call(Some(7), None, None, json!("{")),
            call(Some(7), None, Some("late"), json!("}")),
        ]);
        let expected = [
            Delta::ToolCall {
                index: 0,
                id: Some("a".into()),
                name: Some("read".into()),
                arguments: String::new(),
            },
            Delta::ToolCall {
                index: 0,
                id: None,
                name: None,
                arguments: "{\"p\":".into(),
            },
            Delta::ToolCall {
                index: 0,
                id: None,
                name: None,
                arguments: "1}".into(),
            },
            Delta::ToolCall {
                index: 1,
                id: Some("b".into()),
                name: Some("list".into()),
                arguments: "{\"x\":1}".into(),
            },
            Delta::ToolCall {
                index: 2,
                id: Some("c".into()),
                name: Some("list".into()),
                arguments: "{}".into(),
            },
        ];
        assert_eq!(out.deltas[..5], expected[..]);
        match &out.deltas[5] {
            Delta::ToolCall {
                index: 3,
                id: Some(id),
                name: Some(name),
                arguments,
            } => {
                assert!(id.starts_with("call_"));
                assert_eq!((name.as_str(), arguments.as_str()), ("late", "{}"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out.deltas.len(), 6);
    }

    #[test]
    fn split_names_and_nameless_calls() {
        let out = run(&[
            call(Some(0), Some("x"), Some("read_"), json!("")),
            call(Some(0), None, Some("file"), json!("")),
            call(Some(0), None, None, json!("{}")),
            call(Some(0), None, Some("ignored"), json!("")),
            call(Some(1), Some("y"), None, json!("{}")),
        ]);
        assert_eq!(out.deltas.len(), 4);
        assert!(matches!(&out.deltas[1], Delta::ToolCall { name: Some(n), .. } if n == "file"));
        assert!(
            matches!(&out.deltas[3], Delta::ToolCall { index: 1, id: Some(id), name: Some(n), arguments } if id == "y" && n.is_empty() && arguments == "{}")
        );
    }

    #[test]
    fn errors_and_whole_responses() {
        let out = run(&[json!({"error": {"message": "boom"}})]);
        assert_eq!(
            out.failure,
            Some((ModelErrorKind::StreamInterrupted, "boom".into()))
        );
        let mut out = Output::default();
        let mut dialect = OpenAiDialect::default();
        dialect.event(
            SseEvent {
                event: "message".into(),
                data: "{oops".into(),
            },
            &mut out,
        );
        assert!(matches!(out.failure, Some((ModelErrorKind::Protocol, _))));

        let mut out = Output::default();
        OpenAiDialect::default().whole(
            json!({"choices": [{"message": {"role": "assistant", "content": "hi", "reasoning_content": "r",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
            &mut out,
        );
        assert_eq!(out.deltas.len(), 3);
        assert_eq!(out.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(out.usage.unwrap().total_tokens, 2);
        assert!(out.ended);
    }
}
