//! The Anthropic Messages adapter (agent.md §4.9): the worker's OpenAI-shaped request mapped to
//! Messages (system split out, strict role alternation, tool_use / tool_result blocks, signed
//! thinking passed back, images as base64 blocks), and Messages' typed stream mapped back to
//! normalised deltas.

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use shared::protocol::{Delta, ModelErrorKind, Usage};

use super::http::{BuildError, Dialect, Output};
use super::sse::SseEvent;
use crate::config::catalogue::ModelEntry;

const API_VERSION: &str = "2023-06-01";
/// Upstream's default `max_tokens`; Anthropic requires one.
const DEFAULT_MAX_TOKENS: u64 = 8192;
const MIN_THINKING_BUDGET: u64 = 1024;
const DEFAULT_THINKING_BUDGET: u64 = 4096;
/// Upstream's placeholder when a conversation does not start with a user turn.
const PLACEHOLDER: &str = "Empty";

/// `{base}/v1/messages`, accepting a base URL that already ends in `/v1`.
pub(super) fn url(base: &str) -> Result<reqwest::Url, BuildError> {
    let mut url = reqwest::Url::parse(base).map_err(BuildError::BadBase)?;
    let has_version = url.path().trim_end_matches('/').ends_with("/v1");
    let mut segments = url
        .path_segments_mut()
        .map_err(|()| BuildError::CannotTakePath)?;
    segments.pop_if_empty();
    if !has_version {
        segments.push("v1");
    }
    segments.push("messages");
    drop(segments);
    Ok(url)
}

pub(super) fn auth(
    entry: &ModelEntry,
    request: reqwest::RequestBuilder,
) -> reqwest::RequestBuilder {
    let request = request.header("anthropic-version", API_VERSION);
    match entry.api_key.as_ref().and_then(super::http::secret_header) {
        Some(key) => request.header("x-api-key", key),
        None => request,
    }
}

/// The text of an OpenAI `content` (a string, or the `text` of its parts).
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// An OpenAI `image_url` part as an Anthropic image block. A `data:` URL becomes base64; an
/// http(s) URL stays a URL source (upstream downloads it; the supervisor fetches nothing a
/// worker names).
fn image_block(url: &str) -> Option<Value> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',')?;
        let media_type = meta.strip_suffix(";base64")?;
        return Some(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    (url.starts_with("http://") || url.starts_with("https://"))
        .then(|| json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn user_blocks(content: Option<&Value>) -> Vec<Value> {
    match content {
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => part
                    .get("text")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                    .map(|t| json!({"type": "text", "text": t})),
                Some("image_url") => part
                    .get("image_url")
                    .and_then(|i| i.get("url").or(Some(i)))
                    .and_then(Value::as_str)
                    .and_then(image_block),
                _ => None,
            })
            .collect(),
        other => {
            let text = text_of(other);
            if text.is_empty() {
                Vec::new()
            } else {
                vec![json!({"type": "text", "text": text})]
            }
        }
    }
}

fn assistant_blocks(message: &Value, thinking: bool) -> Vec<Value> {
    let mut blocks = Vec::new();
    if thinking {
        let reasoning = message.get("reasoning_content").and_then(Value::as_str);
        let signature = message.get("reasoning_signature").and_then(Value::as_str);
        if let (Some(reasoning), Some(signature)) = (reasoning, signature) {
            blocks.push(json!({"type": "thinking", "thinking": reasoning, "signature": signature}));
        }
        for data in message
            .get("redacted_reasoning")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            blocks.push(json!({"type": "redacted_thinking", "data": data}));
        }
    }
    let text = text_of(message.get("content"));
    // Anthropic rejects empty text blocks.
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let function = call.get("function").unwrap_or(&Value::Null);
        let input = function
            .get("arguments")
            .and_then(Value::as_str)
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        blocks.push(json!({
            "type": "tool_use",
            "id": call.get("id").and_then(Value::as_str).unwrap_or_default(),
            "name": function.get("name").and_then(Value::as_str).unwrap_or_default(),
            "input": input,
        }));
    }
    blocks
}

/// `(system, messages)`: leading system messages become `system`; the rest become strictly
/// alternating turns, consecutive same-role blocks merged (tool results and the images that
/// follow them land in one user turn).
fn convert(messages: &[Value], thinking: bool) -> (String, Vec<Value>) {
    let role = |m: &Value| {
        m.get("role")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let leading = messages.iter().take_while(|m| role(m) == "system").count();
    let system = messages[..leading]
        .iter()
        .map(|m| text_of(m.get("content")))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let mut push = |turn_role: &'static str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == turn_role => existing.extend(blocks),
            _ => turns.push((turn_role, blocks)),
        }
    };
    for message in &messages[leading..] {
        match role(message).as_str() {
            "system" => {
                let text = text_of(message.get("content"));
                push(
                    "user",
                    vec![json!({"type": "text", "text": format!("System: {text}")})],
                );
            }
            "assistant" => push("assistant", assistant_blocks(message, thinking)),
            "tool" => push(
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id").and_then(Value::as_str).unwrap_or_default(),
                    "content": text_of(message.get("content")),
                })],
            ),
            _ => push("user", user_blocks(message.get("content"))),
        }
    }
    if turns.first().is_none_or(|(r, _)| *r != "user") {
        turns.insert(
            0,
            ("user", vec![json!({"type": "text", "text": PLACEHOLDER})]),
        );
    }
    let messages = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    (system, messages)
}

fn tools(tools: &[Value]) -> Vec<Value> {
    tools
        .iter()
        .filter_map(|tool| {
            let function = tool.get("function")?;
            let mut schema = function
                .get("parameters")
                .cloned()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            if schema.get("type").is_none() {
                schema["type"] = json!("object");
            }
            let mut out = json!({"name": function.get("name")?, "input_schema": schema});
            if let Some(description) = function.get("description") {
                out["description"] = description.clone();
            }
            Some(out)
        })
        .collect()
}

/// The request body for `params` (the worker's OpenAI-shaped request).
pub(super) fn body(entry: &ModelEntry, params: &Map<String, Value>, stream: bool) -> Value {
    let settings = &entry.settings;
    let set = |key: &str| params.get(key).filter(|v| !v.is_null());
    let thinking = set("thinking")
        .cloned()
        .or_else(|| settings.thinking.clone());
    let thinking_on = thinking
        .as_ref()
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        == Some("enabled");
    let messages = set("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let (system, messages) = convert(messages, thinking_on);
    let mut max_tokens = set("max_tokens")
        .and_then(Value::as_u64)
        .or(settings.max_tokens.map(u64::from))
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut body = Map::new();
    body.insert("model".into(), json!(entry.id));
    if !system.is_empty() {
        body.insert("system".into(), json!(system));
    }
    body.insert("messages".into(), Value::Array(messages));
    let choice = set("tool_choice");
    let offered = set("tools").and_then(Value::as_array).filter(|t| {
        !t.is_empty() && settings.tools && choice.and_then(Value::as_str) != Some("none")
    });
    if let Some(offered) = offered {
        body.insert("tools".into(), Value::Array(tools(offered)));
        let mapped = match choice {
            Some(Value::String(c)) if c == "required" => Some(json!({"type": "any"})),
            Some(Value::String(c)) if c == "auto" => Some(json!({"type": "auto"})),
            Some(Value::Object(named)) => named
                .get("function")
                .and_then(|f| f.get("name"))
                .map(|name| json!({"type": "tool", "name": name})),
            _ => None,
        };
        if let Some(mapped) = mapped {
            body.insert("tool_choice".into(), mapped);
        }
    }
    if thinking_on {
        let budget = thinking
            .as_ref()
            .and_then(|t| t.get("budgetTokens").or_else(|| t.get("budget_tokens")))
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_THINKING_BUDGET)
            .max(MIN_THINKING_BUDGET);
        if budget >= max_tokens {
            max_tokens = budget + MIN_THINKING_BUDGET;
        }
        body.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
    } else if let Some(t) = set("temperature").and_then(Value::as_f64) {
        // OpenAI's 0–2 range onto Anthropic's 0–1, as upstream; never with top_p as well.
        body.insert("temperature".into(), json!((t / 2.0).clamp(0.0, 1.0)));
    } else if let Some(top_p) = set("top_p") {
        body.insert("top_p".into(), top_p.clone());
    }
    body.insert("max_tokens".into(), json!(max_tokens));
    match set("stop") {
        Some(Value::String(stop)) => {
            body.insert("stop_sequences".into(), json!([stop]));
        }
        Some(stops @ Value::Array(_)) => {
            body.insert("stop_sequences".into(), stops.clone());
        }
        _ => {}
    }
    if stream {
        body.insert("stream".into(), json!(true));
    }
    for (key, value) in &settings.params {
        body.insert(key.clone(), value.clone());
    }
    Value::Object(body)
}

fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything new
        _ => "stop",
    }
}

#[derive(Debug, Clone, Copy)]
enum Block {
    Text,
    Thinking,
    Tool(u32),
    Other,
}

#[derive(Default)]
pub(super) struct AnthropicDialect {
    blocks: HashMap<u64, Block>,
    tools: u32,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl AnthropicDialect {
    fn record_usage(&mut self, usage: Option<&Value>, out: &mut Output) {
        let Some(usage) = usage else { return };
        let count = |key: &str| usage.get(key).and_then(Value::as_u64);
        let input = [
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ]
        .iter()
        .filter_map(|k| count(k))
        .reduce(|a, b| a + b);
        if input.is_some() {
            self.input_tokens = input;
        }
        if let Some(output) = count("output_tokens") {
            self.output_tokens = Some(output);
        }
        let (prompt, completion) = (
            self.input_tokens.unwrap_or(0),
            self.output_tokens.unwrap_or(0),
        );
        out.usage = Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            estimated: false,
        });
    }

    fn block_start(&mut self, index: u64, block: &Value, out: &mut Output) {
        let text = |key: &str| {
            block
                .get(key)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        };
        let kind = match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                out.deltas.extend(text("text").map(Delta::Text));
                Block::Text
            }
            Some("thinking") => {
                out.deltas.extend(text("thinking").map(Delta::Reasoning));
                out.deltas
                    .extend(text("signature").map(Delta::ReasoningSignature));
                Block::Thinking
            }
            Some("redacted_thinking") => {
                out.deltas
                    .extend(text("data").map(Delta::RedactedReasoning));
                Block::Other
            }
            Some("tool_use") => {
                let tool = self.tools;
                self.tools += 1;
                let input = block
                    .get("input")
                    .filter(|i| i.as_object().is_some_and(|o| !o.is_empty()))
                    .map(Value::to_string)
                    .unwrap_or_default();
                out.deltas.push(Delta::ToolCall {
                    index: tool,
                    id: Some(text("id").unwrap_or_else(super::http::new_call_id)),
                    name: Some(text("name").unwrap_or_default()),
                    arguments: input,
                });
                Block::Tool(tool)
            }
            _ => Block::Other,
        };
        self.blocks.insert(index, kind);
    }

    fn block_delta(&mut self, index: u64, delta: &Value, out: &mut Output) {
        let text = |key: &str| {
            delta
                .get(key)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        };
        match delta.get("type").and_then(Value::as_str) {
            Some("text_delta") => out.deltas.extend(text("text").map(Delta::Text)),
            Some("thinking_delta") => out.deltas.extend(text("thinking").map(Delta::Reasoning)),
            Some("signature_delta") => out
                .deltas
                .extend(text("signature").map(Delta::ReasoningSignature)),
            Some("input_json_delta") => {
                if let (Some(Block::Tool(tool)), Some(fragment)) =
                    (self.blocks.get(&index), text("partial_json"))
                {
                    out.deltas.push(Delta::ToolCall {
                        index: *tool,
                        id: None,
                        name: None,
                        arguments: fragment,
                    });
                }
            }
            _ => {}
        }
    }
}

fn error_failure(value: &Value) -> (ModelErrorKind, String) {
    let error = value.get("error").unwrap_or(value);
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| error.to_string(), str::to_owned);
    let kind = match error.get("type").and_then(Value::as_str) {
        Some("overloaded_error") => ModelErrorKind::Overloaded,
        Some("api_error") => ModelErrorKind::Server,
        _ => ModelErrorKind::StreamInterrupted,
    };
    (kind, message)
}

impl Dialect for AnthropicDialect {
    fn event(&mut self, event: SseEvent, out: &mut Output) {
        let data: Value = match serde_json::from_str(&event.data) {
            Ok(data) => data,
            Err(e) => {
                out.failure = Some((ModelErrorKind::Protocol, format!("unparsable event: {e}")));
                return;
            }
        };
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&event.event)
            .to_owned();
        let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind.as_str() {
            "message_start" => {
                self.record_usage(data.get("message").and_then(|m| m.get("usage")), out);
            }
            "content_block_start" => {
                if let Some(block) = data.get("content_block") {
                    self.block_start(index, block, out);
                }
            }
            "content_block_delta" => {
                if let Some(delta) = data.get("delta") {
                    self.block_delta(index, delta, out);
                }
            }
            "message_delta" => {
                if let Some(reason) = data
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    out.finish_reason = Some(finish_reason(reason).to_owned());
                }
                self.record_usage(data.get("usage"), out);
            }
            "message_stop" => out.ended = true,
            "error" => out.failure = Some(error_failure(&data)),
            // ping, content_block_stop and future events
            _ => {}
        }
    }

    fn end(&mut self, _out: &mut Output) {}

    fn whole(&mut self, body: Value, out: &mut Output) {
        if body.get("type").and_then(Value::as_str) == Some("error") {
            out.failure = Some(error_failure(&body));
            return;
        }
        for (index, block) in body
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            self.block_start(index as u64, block, out);
            if let (Some(Block::Tool(tool)), Some(input)) =
                (self.blocks.get(&(index as u64)), block.get("input"))
            {
                // Whole responses carry the input as an object: the first delta already has it
                // unless it was empty.
                if input.as_object().is_some_and(serde_json::Map::is_empty) {
                    out.deltas.push(Delta::ToolCall {
                        index: *tool,
                        id: None,
                        name: None,
                        arguments: "{}".into(),
                    });
                }
            }
        }
        if let Some(reason) = body.get("stop_reason").and_then(Value::as_str) {
            out.finish_reason = Some(finish_reason(reason).to_owned());
        }
        self.record_usage(body.get("usage"), out);
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

    #[test]
    fn urls_with_and_without_version() {
        assert_eq!(
            url("https://api.anthropic.com").unwrap().as_str(),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            url("http://h:1/proxy/v1/").unwrap().as_str(),
            "http://h:1/proxy/v1/messages"
        );
    }

    #[test]
    fn request_mapping() {
        let e = entry(
            r#"{"model":{"provider":"anthropic","id":"claude-x","apiKey":"k","thinking":{"type":"enabled","budgetTokens":2000},"maxTokens":1000}}"#,
        );
        let params = json!({
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "reasoning_content": "think", "reasoning_signature": "sig",
                 "redacted_reasoning": ["opaque"],
                 "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "read", "arguments": "{\"p\":1}"}},
                                {"id": "t2", "type": "function", "function": {"name": "bad", "arguments": "{\"p\": "}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "one"},
                {"role": "tool", "tool_call_id": "t2", "content": "two"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "system", "content": "plan"}
            ],
            "tools": [{"type": "function", "function": {"name": "read", "description": "d", "parameters": {"properties": {}}}}],
            "tool_choice": "required",
            "temperature": 0.7,
            "stop": "END"
        });
        let body = body(&e, params.as_object().unwrap(), true);
        assert_eq!(body["system"], "be brief");
        let turns = body["messages"].as_array().unwrap();
        let roles: Vec<_> = turns.iter().map(|t| t["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant", "user"]);
        assert_eq!(turns[0]["content"][0]["text"], "Empty");
        assert_eq!(turns[2]["content"][1]["source"]["type"], "base64");
        assert_eq!(turns[2]["content"][1]["source"]["media_type"], "image/png");
        let assistant = &turns[3]["content"];
        assert_eq!(
            assistant[0],
            json!({"type": "thinking", "thinking": "think", "signature": "sig"})
        );
        assert_eq!(assistant[1]["type"], "redacted_thinking");
        assert_eq!(assistant[2]["input"], json!({"p": 1}));
        assert_eq!(assistant[3]["input"], json!({}));
        assert_eq!(
            assistant.as_array().unwrap().len(),
            4,
            "no empty text block"
        );
        let last = &turns[4]["content"];
        assert_eq!(last[0]["type"], "tool_result");
        assert_eq!(last[1]["tool_use_id"], "t2");
        assert_eq!(last[2]["source"]["type"], "url");
        assert_eq!(last[3]["text"], "System: plan");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(body["tool_choice"], json!({"type": "any"}));
        assert!(body.get("temperature").is_none(), "not with thinking");
        assert_eq!(body["thinking"]["budget_tokens"], 2000);
        assert_eq!(body["max_tokens"], 3024);
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["stream"], true);
    }

    #[test]
    fn temperature_and_none_choice_without_thinking() {
        let e = entry(r#"{"model":{"provider":"anthropic","id":"c","apiKey":"k"}}"#);
        let params = json!({"messages": [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "x", "reasoning_content": "r", "reasoning_signature": "s"}],
            "tools": [{"type": "function", "function": {"name": "t"}}], "tool_choice": "none",
            "temperature": 3.0, "top_p": 0.5});
        let body = body(&e, params.as_object().unwrap(), false);
        assert_eq!(body["temperature"], 1.0);
        assert!(body.get("top_p").is_none());
        assert!(body.get("tools").is_none());
        assert_eq!(body["max_tokens"], 8192);
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type": "text", "text": "x"}])
        );
    }

    fn feed(events: &[Value]) -> Output {
        let mut dialect = AnthropicDialect::default();
        let mut out = Output::default();
        for data in events {
            let event = data["type"].as_str().unwrap().to_owned();
            dialect.event(
                SseEvent {
                    event,
                    data: data.to_string(),
                },
                &mut out,
            );
        }
        out
    }

    #[test]
    fn stream_mapping() {
        let out = feed(&[
            json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "opaque"}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "ok"}}),
            json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "tu", "name": "read", "input": {}}}),
            json!({"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
            json!({"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": ":1}"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
            json!({"type": "message_stop"}),
        ]);
        assert_eq!(
            out.deltas,
            [
                Delta::Reasoning("hm".into()),
                Delta::ReasoningSignature("sig".into()),
                Delta::RedactedReasoning("opaque".into()),
                Delta::Text("ok".into()),
                Delta::ToolCall {
                    index: 0,
                    id: Some("tu".into()),
                    name: Some("read".into()),
                    arguments: String::new()
                },
                Delta::ToolCall {
                    index: 0,
                    id: None,
                    name: None,
                    arguments: "{\"a\"".into()
                },
                Delta::ToolCall {
                    index: 0,
                    id: None,
                    name: None,
                    arguments: ":1}".into()
                },
            ]
        );
        assert_eq!(out.finish_reason.as_deref(), Some("tool_calls"));
        let usage = out.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (15, 7));
        assert!(out.ended);
    }

    #[test]
    fn errors_and_whole_responses() {
        let out = feed(&[
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
        ]);
        assert_eq!(
            out.failure,
            Some((ModelErrorKind::Overloaded, "busy".into()))
        );
        let mut out = Output::default();
        AnthropicDialect::default().whole(
            json!({"content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "text", "text": "hi"},
                {"type": "tool_use", "id": "a", "name": "f", "input": {"x": 1}},
                {"type": "tool_use", "id": "b", "name": "g", "input": {}}],
             "stop_reason": "max_tokens", "usage": {"input_tokens": 2, "output_tokens": 3}}),
            &mut out,
        );
        assert_eq!(out.deltas.len(), 6);
        assert!(
            matches!(&out.deltas[3], Delta::ToolCall { index: 0, arguments, .. } if arguments == "{\"x\":1}")
        );
        assert!(
            matches!(&out.deltas[5], Delta::ToolCall { index: 1, arguments, .. } if arguments == "{}")
        );
        assert_eq!(out.finish_reason.as_deref(), Some("length"));
        assert_eq!(out.usage.unwrap().total_tokens, 5);
    }
}
