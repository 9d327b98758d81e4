//! Turning the session's stored events into model messages, on every iteration, within the
//! image window (the newest images only) and the token budget, with the reasoning of earlier
//! answers passed back for the providers that need it.
//!
//! The event log is the memory: a worker that was killed and replaced gets the same log in its
//! `Init` and therefore sends the model the same conversation. Trimming only shapes the request;
//! the log is never changed.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};
use shared::events::{Event, EventBody, ToolCall};
use shared::protocol::{AgentSettings, ContextSettings};

/// Parses the stored events handed over in `Init`. An event this worker cannot read (an unknown
/// type, a damaged row) is skipped: it cannot be model context, and the rest still is.
pub(crate) fn parse_history(raw: &[String]) -> Vec<Event> {
    raw.iter()
        .filter_map(|json| serde_json::from_str::<Event>(json).ok())
        .collect()
}

const DEFAULT_INSTRUCTIONS: &str = "You are a helpful assistant working in a sandboxed workspace. \
Use the available tools to inspect or change files instead of guessing, and keep replies concise.";

/// The budget's defaults, used when the settings leave them open.
const DEFAULT_CONTEXT_WINDOW: u64 = 128_000;
const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 8192;
const BUDGET_MARGIN: u64 = 2000;
/// What one image is assumed to cost, in tokens.
const IMAGE_TOKENS: u64 = 1000;

const IMAGE_OMITTED: &str = "[Image omitted to conserve context]";

/// The `finishReason` the supervisor gives an answer a crash cut short, stored with what had
/// streamed of it.
const INTERRUPTED: &str = "interrupted";

/// The tool calls of an answer a crash cut short: their arguments stopped wherever streaming
/// did, so those that are not JSON yet go to the model as `{}`, which every provider accepts.
fn with_complete_arguments(calls: &[ToolCall]) -> Vec<ToolCall> {
    calls
        .iter()
        .cloned()
        .map(|mut call| {
            if serde_json::from_str::<serde::de::IgnoredAny>(&call.function.arguments).is_err() {
                call.function.arguments = "{}".into();
            }
            call
        })
        .collect()
}

/// The system prompt (without the clock line: the request must be
/// reproducible for a given history).
fn system_prompt(settings: &AgentSettings) -> String {
    let instructions = settings
        .instructions
        .as_deref()
        .unwrap_or(DEFAULT_INSTRUCTIONS);
    format!(
        "{instructions}\n\nFile tools take paths relative to the session's workspace root; \
         nothing outside it is reachable. There is no command or shell tool."
    )
}

/// The token budget of a request's messages: `context.maxTokens` when
/// configured, otherwise the context window minus the answer's reservation and a margin.
pub(crate) fn budget(context: &ContextSettings) -> u64 {
    context.max_tokens.unwrap_or_else(|| {
        let window = context.context_window.unwrap_or(DEFAULT_CONTEXT_WINDOW);
        let answer = context
            .max_output_tokens
            .map_or(DEFAULT_MAX_OUTPUT_TOKENS, u64::from);
        window.saturating_sub(answer).saturating_sub(BUDGET_MARGIN)
    })
}

/// The OpenAI chat messages for the next model call, fitted into `budget` tokens.
pub(crate) fn build_messages(
    history: &[Event],
    settings: &AgentSettings,
    budget: u64,
) -> Vec<Value> {
    let system = json!({"role": "system", "content": system_prompt(settings)});
    let omitted = omitted_images(history, settings.context.max_images as usize);
    let converter = Converter {
        history,
        omitted: &omitted,
        reasoning: reasoning_by_message(history),
    };
    let turns = converter.turns();
    fit(system, turns, budget)
}

/// Converted turns kept between model calls, so that a call converts, counts and serialises only
/// what changed: the current turn, and an older turn only when the image window has moved over
/// it. The history only grows, so a turn that a later user message closed never changes
/// otherwise. A new worker (a start, a restart) begins with an empty cache and rebuilds it from
/// the history of its `Init` on its first call.
#[derive(Default)]
pub(crate) struct TurnCache {
    turns: Vec<Option<CachedTurn>>,
}

/// One closed turn, converted.
struct CachedTurn {
    /// The events it was made from: `start..end` of the history.
    start: usize,
    end: usize,
    /// Its image parts that were outside the window when it was converted.
    omitted: Vec<(usize, usize)>,
    /// Its messages, serialised and joined by commas (empty when it has none).
    json: String,
    /// Their estimated tokens.
    cost: u64,
}

/// Where each turn starts and ends: a turn is a `user_message` and everything up to the next
/// one (events before the first form a turn of their own).
fn turn_ranges(history: &[Event]) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (index, event) in history.iter().enumerate() {
        if matches!(event.body, EventBody::UserMessage { .. }) || ranges.is_empty() {
            ranges.push((index, index + 1));
        } else if let Some(last) = ranges.last_mut() {
            last.1 = index + 1;
        }
    }
    ranges
}

/// The messages of `history[start..end]`. Reasoning is looked up within the turn: an answer's
/// thinking event comes right before it, in the same run.
fn convert_turn(
    history: &[Event],
    omitted: &HashSet<(usize, usize)>,
    start: usize,
    end: usize,
) -> Vec<Value> {
    let converter = Converter {
        history,
        omitted,
        reasoning: reasoning_by_message(&history[start..end]),
    };
    let mut messages = Vec::new();
    for (index, event) in history.iter().enumerate().take(end).skip(start) {
        converter.convert(index, event, &mut messages);
    }
    messages
}

fn join_json(messages: &[Value]) -> String {
    let mut json = String::new();
    for message in messages {
        if !json.is_empty() {
            json.push(',');
        }
        json.push_str(&message.to_string());
    }
    json
}

/// [`build_messages`] as the JSON array text a model request carries, byte for byte what
/// serialising its result gives, converting only the current turn and the closed turns `cache`
/// does not hold yet. The budget works exactly as there: costs of closed turns are kept with
/// them, and only the current turn is ever shortened.
pub(crate) fn build_messages_json(
    history: &[Event],
    settings: &AgentSettings,
    budget: u64,
    cache: &mut TurnCache,
) -> String {
    let ranges = turn_ranges(history);
    let Some((&(current_start, current_end), closed)) = ranges.split_last() else {
        return Value::Array(build_messages(history, settings, budget)).to_string();
    };
    let omitted = omitted_images(history, settings.context.max_images as usize);
    let mut current = convert_turn(history, &omitted, current_start, current_end);
    if current.is_empty() {
        // Only an opening turn without a user message can be empty; nothing to save there.
        return Value::Array(build_messages(history, settings, budget)).to_string();
    }
    cache.turns.resize_with(closed.len(), || None);
    for (slot, &(start, end)) in cache.turns.iter_mut().zip(closed) {
        let mut within: Vec<(usize, usize)> = omitted
            .iter()
            .filter(|(event, _)| (start..end).contains(event))
            .copied()
            .collect();
        within.sort_unstable();
        let fresh = slot
            .as_ref()
            .is_some_and(|t| t.start == start && t.end == end && t.omitted == within);
        if !fresh {
            let messages = convert_turn(history, &omitted, start, end);
            *slot = Some(CachedTurn {
                start,
                end,
                omitted: within,
                json: join_json(&messages),
                cost: messages.iter().map(estimate).sum(),
            });
        }
    }
    let kept: Vec<&CachedTurn> = cache
        .turns
        .iter()
        .flatten()
        .filter(|t| !t.json.is_empty())
        .collect();
    let system = json!({"role": "system", "content": system_prompt(settings)});
    let current_cost: u64 = current.iter().map(estimate).sum();
    let mut total = estimate(&system) + kept.iter().map(|t| t.cost).sum::<u64>() + current_cost;
    // The same trimming as `fit`, over the closed turns and then the current one.
    let mut dropped = 0;
    while total > budget && dropped < kept.len() {
        total -= kept[dropped].cost;
        dropped += 1;
    }
    let mut json = String::from("[");
    json.push_str(&system.to_string());
    if dropped > 0 {
        let note = json!({
            "role": "user",
            "content": format!(
                "[{dropped} earlier conversation turns were omitted to fit the context window]"
            ),
        });
        total += estimate(&note);
        json.push(',');
        json.push_str(&note.to_string());
    }
    if total > budget {
        shorten_old_tool_results(&mut current, &mut total, budget);
    }
    for turn in &kept[dropped..] {
        json.push(',');
        json.push_str(&turn.json);
    }
    json.push(',');
    json.push_str(&join_json(&current));
    json.push(']');
    json
}

/// Reasoning recorded for one answer.
struct Reasoning<'a> {
    content: &'a str,
    signature: Option<&'a str>,
    redacted: Option<&'a [String]>,
}

fn reasoning_by_message(history: &[Event]) -> HashMap<&str, Reasoning<'_>> {
    history
        .iter()
        .filter_map(|event| match &event.body {
            EventBody::AssistantThinkingMessage {
                content,
                message_id,
                signature,
                redacted_data,
                ..
            } => Some((
                message_id.as_str(),
                Reasoning {
                    content,
                    signature: signature.as_deref(),
                    redacted: redacted_data.as_deref(),
                },
            )),
            _ => None,
        })
        .collect()
}

/// Which image parts fall outside the window: images are counted from the
/// newest event backwards across user messages, environment input and tool results, both
/// `image_url` and `image` parts; the newest `keep` stay. Keys are (event index, part index).
fn omitted_images(history: &[Event], keep: usize) -> HashSet<(usize, usize)> {
    let mut seen = 0;
    let mut omitted = HashSet::new();
    for (index, event) in history.iter().enumerate().rev() {
        let content = match &event.body {
            EventBody::UserMessage { content }
            | EventBody::EnvironmentInput { content, .. }
            | EventBody::ToolResult { content, .. } => content,
            _ => continue,
        };
        let parts: Vec<usize> = match content {
            Value::Array(parts) => (0..parts.len())
                .filter(|&i| is_image(&parts[i]))
                .rev()
                .collect(),
            object @ Value::Object(_) if is_image(object) => vec![0],
            _ => continue,
        };
        for part in parts {
            seen += 1;
            if seen > keep {
                omitted.insert((index, part));
            }
        }
    }
    omitted
}

/// Whether a content part or tool result element carries an image.
fn is_image(part: &Value) -> bool {
    let kind = part["type"].as_str().unwrap_or_default();
    kind == "image_url"
        || ((kind.contains("image") || kind.contains("screenshot")) && part["data"].is_string())
}

/// An image element as an OpenAI `image_url` part.
fn image_url_part(part: &Value) -> Value {
    if part["type"] == "image_url" {
        return part.clone();
    }
    let data = part["data"].as_str().unwrap_or_default();
    if data.starts_with("data:") {
        return json!({"type": "image_url", "image_url": {"url": data}});
    }
    let mime = part["mimeType"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| sniff_base64_mime(data).to_owned());
    json!({"type": "image_url", "image_url": {"url": format!("data:{mime};base64,{data}")}})
}

/// The image type of base64 data, from the encoded signature.
fn sniff_base64_mime(data: &str) -> &'static str {
    if data.starts_with("/9j/") {
        "image/jpeg"
    } else if data.starts_with("R0lGOD") {
        "image/gif"
    } else if data.starts_with("UklGR") {
        "image/webp"
    } else {
        "image/png"
    }
}

/// The messages of one conversation turn: a `user_message` and everything up to the next one.
struct Turn {
    messages: Vec<Value>,
}

struct Converter<'a> {
    history: &'a [Event],
    omitted: &'a HashSet<(usize, usize)>,
    reasoning: HashMap<&'a str, Reasoning<'a>>,
}

impl Converter<'_> {
    fn turns(&self) -> Vec<Turn> {
        let mut turns: Vec<Turn> = Vec::new();
        for (index, event) in self.history.iter().enumerate() {
            if matches!(event.body, EventBody::UserMessage { .. }) || turns.is_empty() {
                turns.push(Turn {
                    messages: Vec::new(),
                });
            }
            let Some(turn) = turns.last_mut() else {
                continue;
            };
            self.convert(index, event, &mut turn.messages);
        }
        turns.retain(|turn| !turn.messages.is_empty());
        turns
    }

    fn convert(&self, index: usize, event: &Event, out: &mut Vec<Value>) {
        match &event.body {
            EventBody::UserMessage { content } => {
                out.push(json!({"role": "user", "content": self.user_content(index, content)}));
            }
            EventBody::EnvironmentInput {
                content,
                description,
                ..
            } => {
                let content = self.user_content(index, content);
                if let Some(message) = environment_message(&content, description.as_deref()) {
                    out.push(message);
                }
            }
            EventBody::AssistantMessage {
                content,
                tool_calls,
                message_id,
                finish_reason,
                ..
            } => {
                let calls = tool_calls.as_deref().unwrap_or_default();
                let interrupted = finish_reason.as_deref() == Some(INTERRUPTED);
                let mut message = Map::new();
                message.insert("role".into(), json!("assistant"));
                if calls.is_empty() {
                    message.insert("content".into(), json!(content));
                } else {
                    let text = if content.is_empty() {
                        Value::Null
                    } else {
                        json!(content)
                    };
                    message.insert("content".into(), text);
                    let calls = if interrupted {
                        json!(with_complete_arguments(calls))
                    } else {
                        json!(calls)
                    };
                    message.insert("tool_calls".into(), calls);
                }
                if let Some(reasoning) = message_id.as_deref().and_then(|id| self.reasoning.get(id))
                {
                    add_reasoning(&mut message, reasoning);
                }
                out.push(Value::Object(message));
                self.tool_messages(calls, index + 1, out);
            }
            EventBody::PlanUpdate { steps, .. } => {
                let lines: Vec<String> = steps
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        format!(
                            "{}. [{}] {}",
                            i + 1,
                            if s.done { "DONE" } else { "TODO" },
                            s.content
                        )
                    })
                    .collect();
                out.push(json!({
                    "role": "system",
                    "content": format!("Current plan:\n{}\n\nFollow the plan.", lines.join("\n")),
                }));
            }
            _ => {}
        }
    }

    /// A user or environment content: a string as is, parts with out-of-window images replaced.
    fn user_content(&self, index: usize, content: &Value) -> Value {
        match content {
            Value::Array(parts) => Value::Array(
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, part)| {
                        if self.omitted.contains(&(index, i)) {
                            json!({"type": "text", "text": IMAGE_OMITTED})
                        } else if is_image(part) {
                            image_url_part(part)
                        } else {
                            part.clone()
                        }
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// The `role: tool` answers to `calls`, in the order of `calls`, taken from the
    /// `tool_result` events that follow the assistant message (from `from`) up to the next user
    /// or assistant message. Matching is positional, not global, because some servers reuse
    /// ids like `call_1`. Images of the results follow as user messages after all the tool
    /// messages: OpenAI wants an assistant's tool messages to be contiguous.
    fn tool_messages(&self, calls: &[ToolCall], from: usize, out: &mut Vec<Value>) {
        let mut results: Vec<(usize, &str, &Value)> = Vec::new();
        for (index, event) in self.history.iter().enumerate().skip(from) {
            match &event.body {
                EventBody::UserMessage { .. } | EventBody::AssistantMessage { .. } => break,
                EventBody::ToolResult {
                    tool_call_id,
                    content,
                    ..
                } => results.push((index, tool_call_id, content)),
                _ => {}
            }
        }
        let mut images = Vec::new();
        for call in calls {
            let text = match results.iter().position(|(_, id, _)| *id == call.id) {
                Some(at) => {
                    let (index, _, content) = results.remove(at);
                    let (text, parts) = self.tool_content(index, content);
                    if !parts.is_empty() {
                        images.push(json!({"role": "user", "content": parts}));
                    }
                    text
                }
                None => "Error: no result was recorded for this tool call (aborted)".to_owned(),
            };
            out.push(json!({"role": "tool", "tool_call_id": call.id, "content": text}));
        }
        out.extend(images);
    }

    /// A tool result's `content` as model text plus image parts (upstream's
    /// `convertToMultimodalToolCallResult`, with MCP text parts flattened).
    fn tool_content(&self, index: usize, content: &Value) -> (String, Vec<Value>) {
        let mut images = Vec::new();
        let mut omitted = 0;
        let mut keep_image = |i: usize, part: &Value, images: &mut Vec<Value>| {
            if self.omitted.contains(&(index, i)) {
                omitted += 1;
            } else {
                images.push(image_url_part(part));
            }
        };
        let mut text = match content {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            Value::Array(parts) => {
                let mut rest = Vec::new();
                for (i, part) in parts.iter().enumerate() {
                    if is_image(part) {
                        keep_image(i, part, &mut images);
                    } else {
                        rest.push(part);
                    }
                }
                flatten(&rest)
            }
            object @ Value::Object(map) if is_image(object) => {
                keep_image(0, object, &mut images);
                let others: Map<String, Value> = map
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "type" | "data" | "mimeType"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if others.is_empty() {
                    String::new()
                } else {
                    pretty(&Value::Object(others))
                }
            }
            other => pretty(other),
        };
        for _ in 0..omitted {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(IMAGE_OMITTED);
        }
        if text.is_empty() && !images.is_empty() {
            text = "(the image is attached in the next message)".into();
        }
        (text, images)
    }
}

/// Non-image result elements as text: MCP text parts flattened (`<NAME>:\n<text>` when named,
/// joined with `\n`), anything else as one pretty JSON text.
fn flatten(parts: &[&Value]) -> String {
    if parts.is_empty() {
        return String::new();
    }
    if parts
        .iter()
        .all(|p| p["type"] == "text" && p["text"].is_string())
    {
        return parts
            .iter()
            .map(|p| {
                let text = p["text"].as_str().unwrap_or_default();
                match p["name"].as_str() {
                    Some(name) => format!("{name}:\n{text}"),
                    None => text.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    pretty(&Value::Array(parts.iter().map(|p| (*p).clone()).collect()))
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// The gateway's extension fields on an assistant message (the reasoning a provider wants back).
fn add_reasoning(message: &mut Map<String, Value>, reasoning: &Reasoning<'_>) {
    if !reasoning.content.is_empty() {
        message.insert("reasoning_content".into(), json!(reasoning.content));
    }
    if let Some(signature) = reasoning.signature {
        message.insert("reasoning_signature".into(), json!(signature));
    }
    if let Some(redacted) = reasoning.redacted.filter(|r| !r.is_empty()) {
        message.insert("redacted_reasoning".into(), json!(redacted));
    }
}

/// `[Environment: <description>] <text>` as a user message.
fn environment_message(content: &Value, description: Option<&str>) -> Option<Value> {
    match content {
        Value::String(text) => Some(json!({
            "role": "user",
            "content": format!("[Environment: {}] {text}", description.unwrap_or("Environment Input")),
        })),
        Value::Array(parts) => {
            let description = description?;
            let prefix = format!("[Environment: {description}]");
            let mut parts = parts.clone();
            match parts.iter_mut().find(|p| p["type"] == "text") {
                Some(part) => {
                    let text = part["text"].as_str().unwrap_or_default();
                    part["text"] = json!(format!("{prefix} {text}"));
                }
                None => parts.insert(0, json!({"type": "text", "text": prefix})),
            }
            Some(json!({"role": "user", "content": parts}))
        }
        _ => None,
    }
}

/// Estimated tokens of a message: UTF-8 bytes / 4 for text, a fixed cost per
/// image (never the bytes of its data URL).
fn estimate(message: &Value) -> u64 {
    fn measure(value: &Value, bytes: &mut u64, images: &mut u64) {
        match value {
            Value::Object(map) if map.get("type").and_then(Value::as_str) == Some("image_url") => {
                *images += 1;
            }
            Value::Object(map) => {
                for (key, value) in map {
                    *bytes += key.len() as u64;
                    measure(value, bytes, images);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| measure(v, bytes, images)),
            Value::String(text) => *bytes += text.len() as u64,
            _ => *bytes += 4,
        }
    }
    let (mut bytes, mut images) = (0, 0);
    measure(message, &mut bytes, &mut images);
    bytes.div_ceil(4) + images * IMAGE_TOKENS + 4
}

/// When the messages are over budget: drop whole turns, oldest first, never the current one, with a
/// note; then shorten the current turn's older tool results, oldest first, keeping the newest
/// iteration's. What still does not fit is sent as is: the provider's answer decides.
fn fit(system: Value, mut turns: Vec<Turn>, budget: u64) -> Vec<Value> {
    let costs: Vec<u64> = turns
        .iter()
        .map(|t| t.messages.iter().map(estimate).sum())
        .collect();
    let mut total: u64 = estimate(&system) + costs.iter().sum::<u64>();
    let mut dropped = 0;
    while total > budget && dropped + 1 < turns.len() {
        total -= costs[dropped];
        dropped += 1;
    }
    let mut messages = vec![system];
    if dropped > 0 {
        let note = json!({
            "role": "user",
            "content": format!(
                "[{dropped} earlier conversation turns were omitted to fit the context window]"
            ),
        });
        total += estimate(&note);
        messages.push(note);
    }
    let mut current = turns.split_off(dropped);
    if total > budget
        && let Some(turn) = current.last_mut()
    {
        shorten_old_tool_results(&mut turn.messages, &mut total, budget);
    }
    messages.extend(current.into_iter().flat_map(|t| t.messages));
    messages
}

fn shorten_old_tool_results(messages: &mut [Value], total: &mut u64, budget: u64) {
    let Some(last_assistant) = messages.iter().rposition(|m| m["role"] == "assistant") else {
        return;
    };
    for message in &mut messages[..last_assistant] {
        if *total <= budget {
            return;
        }
        if message["role"] != "tool" {
            continue;
        }
        let Some(text) = message["content"].as_str() else {
            continue;
        };
        let before = estimate(message);
        let chars = text.chars().count();
        message["content"] = json!(format!(
            "[tool result omitted to fit the context window: {chars} chars]"
        ));
        *total = total.saturating_sub(before.saturating_sub(estimate(message)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::events::FunctionCall;
    use shared::protocol::ModelRef;

    fn settings() -> AgentSettings {
        AgentSettings {
            agent_name: "t".into(),
            model: ModelRef {
                provider: "echo".into(),
                id: "echo".into(),
                display_name: None,
            },
            instructions: Some("Be terse.".into()),
            max_iterations: 10,
            temperature: 0.7,
            streaming_tool_call_events: false,
            context: Default::default(),
        }
    }

    fn build(history: &[Event]) -> Vec<Value> {
        build_messages(history, &settings(), u64::MAX)
    }

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "read_file".into(),
                arguments: "{}".into(),
            },
        }
    }

    fn user(content: Value) -> Event {
        Event::new(EventBody::UserMessage { content })
    }

    fn assistant(content: &str, calls: Option<Vec<ToolCall>>) -> Event {
        assistant_with_id(content, calls, None)
    }

    fn assistant_with_id(content: &str, calls: Option<Vec<ToolCall>>, id: Option<&str>) -> Event {
        Event::new(EventBody::AssistantMessage {
            content: content.into(),
            raw_content: None,
            tool_calls: calls,
            finish_reason: Some("stop".into()),
            message_id: id.map(str::to_owned),
            ttft_ms: None,
            ttlt_ms: None,
        })
    }

    fn result(id: &str, content: Value) -> Event {
        Event::new(EventBody::ToolResult {
            tool_call_id: id.into(),
            name: "read_file".into(),
            content,
            elapsed_ms: 1,
            error: None,
        })
    }

    fn image(n: u32) -> Value {
        json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,IMG{n}")}})
    }

    fn roles(messages: &[Value]) -> Vec<&str> {
        messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_tool_round_becomes_assistant_then_tool_messages_in_call_order() {
        let history = vec![
            user(json!("read both")),
            assistant("", Some(vec![call("c1"), call("c2")])),
            result("c2", json!("second")),
            result("c1", json!([{"type": "text", "text": "first"}])),
            assistant("done", None),
        ];
        let messages = build(&history);
        assert_eq!(
            roles(&messages),
            ["system", "user", "assistant", "tool", "tool", "assistant"]
        );
        assert!(
            messages[0]["content"]
                .as_str()
                .unwrap()
                .starts_with("Be terse.")
        );
        assert_eq!(messages[2]["content"], Value::Null);
        assert_eq!(messages[3]["tool_call_id"], "c1");
        assert_eq!(messages[3]["content"], "first");
        assert_eq!(messages[4]["content"], "second");
    }

    #[test]
    fn a_call_without_a_recorded_result_still_gets_an_answer() {
        let history = vec![
            user(json!("go")),
            assistant("", Some(vec![call("c1")])),
            user(json!("again")),
        ];
        let messages = build(&history);
        assert_eq!(messages[3]["role"], "tool");
        assert!(
            messages[3]["content"]
                .as_str()
                .unwrap()
                .contains("no result was recorded")
        );
        assert_eq!(messages[4]["content"], "again");
    }

    #[test]
    fn an_interrupted_call_goes_to_the_model_with_valid_arguments() {
        let mut cut = call("c1");
        cut.function.arguments = "{\"path\": \"no".into();
        let mut whole = call("c2");
        whole.function.arguments = "{\"path\":\"a\"}".into();
        let mut interrupted = assistant("half", Some(vec![cut.clone(), whole]));
        if let EventBody::AssistantMessage { finish_reason, .. } = &mut interrupted.body {
            *finish_reason = Some(INTERRUPTED.into());
        }
        let history = vec![user(json!("go")), interrupted, user(json!("again"))];
        let messages = build(&history);
        assert_eq!(messages[2]["content"], "half");
        let calls = &messages[2]["tool_calls"];
        assert_eq!(calls[0]["function"]["arguments"], "{}");
        assert_eq!(calls[1]["function"]["arguments"], "{\"path\":\"a\"}");
        assert_eq!(
            (messages[3]["role"].clone(), messages[4]["role"].clone()),
            (json!("tool"), json!("tool"))
        );

        // A completed answer keeps what the model wrote, valid or not.
        let history = vec![user(json!("go")), assistant("", Some(vec![cut]))];
        assert_eq!(
            build(&history)[2]["tool_calls"][0]["function"]["arguments"],
            "{\"path\": \"no"
        );
    }

    #[test]
    fn unreadable_history_rows_are_skipped() {
        let good = Event::new(EventBody::UserMessage {
            content: json!("hi"),
        })
        .to_json();
        let parsed = parse_history(&[good, "{not json".into(), r#"{"type":"plan_start"}"#.into()]);
        assert_eq!(parsed.len(), 1);
    }

    #[test]
    fn environment_input_is_prefixed() {
        let msg = environment_message(&json!("ctx"), Some("Expanded")).unwrap();
        assert_eq!(msg["content"], "[Environment: Expanded] ctx");
        let msg = environment_message(&json!([image(1)]), Some("Shot")).unwrap();
        assert_eq!(msg["content"][0]["text"], "[Environment: Shot]");
        assert!(environment_message(&json!([image(1)]), None).is_none());
    }

    #[test]
    fn named_text_parts_are_flattened_and_other_json_is_pretty() {
        let history = vec![
            user(json!("x")),
            assistant("", Some(vec![call("a"), call("b"), call("c")])),
            result(
                "a",
                json!([{"type": "text", "name": "STDOUT", "text": "out"}, {"type": "text", "name": "STDERR", "text": "err"}]),
            ),
            result("b", json!({"ok": true})),
            result("c", Value::Null),
        ];
        let messages = build(&history);
        assert_eq!(messages[3]["content"], "STDOUT:\nout\nSTDERR:\nerr");
        assert_eq!(messages[4]["content"], "{\n  \"ok\": true\n}");
        assert_eq!(messages[5]["content"], "");
    }

    #[test]
    fn tool_result_images_follow_all_tool_messages_as_user_messages() {
        let history = vec![
            user(json!("look")),
            assistant("", Some(vec![call("a"), call("b")])),
            result(
                "a",
                json!([{"type": "image", "data": "iVBORw0KGgo", "mimeType": "image/png"}]),
            ),
            result(
                "b",
                json!([{"type": "text", "text": "t"}, {"type": "image", "data": "/9j/4AAQ"}]),
            ),
        ];
        let messages = build(&history);
        assert_eq!(
            roles(&messages),
            [
                "system",
                "user",
                "assistant",
                "tool",
                "tool",
                "user",
                "user"
            ]
        );
        assert_eq!(
            messages[3]["content"],
            "(the image is attached in the next message)"
        );
        assert_eq!(messages[4]["content"], "t");
        assert_eq!(
            messages[5]["content"][0]["image_url"]["url"],
            "data:image/png;base64,iVBORw0KGgo"
        );
        assert_eq!(
            messages[6]["content"][0]["image_url"]["url"],
            "data:image/jpeg;base64,/9j/4AAQ"
        );
    }

    #[test]
    fn only_the_five_newest_images_are_kept_across_event_kinds() {
        let history = vec![
            user(json!([{"type": "text", "text": "a"}, image(1), image(2)])),
            assistant("", Some(vec![call("c")])),
            result(
                "c",
                json!([{"type": "image", "data": "iVBOR3", "mimeType": "image/png"}]),
            ),
            Event::new(EventBody::EnvironmentInput {
                content: json!([image(4)]),
                description: Some("Shot".into()),
                metadata: None,
            }),
            assistant("ok", None),
            user(json!([image(5), image(6), {"type": "text", "text": "b"}, image(7)])),
        ];
        let messages = build(&history);
        let all = serde_json::to_string(&messages).unwrap();
        for kept in ["IMG7", "IMG6", "IMG5", "IMG4", "iVBOR3"] {
            assert!(all.contains(kept), "{kept} should be kept");
        }
        for gone in ["IMG1", "IMG2"] {
            assert!(!all.contains(gone), "{gone} should be omitted");
        }
        assert_eq!(messages[1]["content"][1]["text"], IMAGE_OMITTED);
        assert_eq!(messages[1]["content"][2]["text"], IMAGE_OMITTED);

        let mut few = settings();
        few.context.max_images = 1;
        let messages = build_messages(&history, &few, u64::MAX);
        let all = serde_json::to_string(&messages).unwrap();
        assert!(all.contains("IMG7") && !all.contains("IMG6") && !all.contains("iVBOR3"));
        // The omitted tool image leaves a note in the tool text.
        assert_eq!(messages[3]["content"], IMAGE_OMITTED);
    }

    #[test]
    fn reasoning_is_passed_back_on_the_matching_assistant_message() {
        let history = vec![
            user(json!("q")),
            Event::new(EventBody::AssistantThinkingMessage {
                content: "let me think".into(),
                is_complete: true,
                thinking_duration_ms: None,
                message_id: "m1".into(),
                signature: Some("sig".into()),
                redacted_data: Some(vec!["opaque".into()]),
            }),
            assistant_with_id("", Some(vec![call("c")]), Some("m1")),
            result("c", json!("r")),
            assistant_with_id("final", None, Some("m2")),
        ];
        let messages = build(&history);
        assert_eq!(messages[2]["reasoning_content"], "let me think");
        assert_eq!(messages[2]["reasoning_signature"], "sig");
        assert_eq!(messages[2]["redacted_reasoning"], json!(["opaque"]));
        assert!(messages[4].get("reasoning_content").is_none());
    }

    #[test]
    fn the_budget_follows_the_settings() {
        let mut context = ContextSettings::default();
        assert_eq!(budget(&context), 128_000 - 8192 - 2000);
        context.context_window = Some(32_000);
        context.max_output_tokens = Some(1000);
        assert_eq!(budget(&context), 29_000);
        context.max_tokens = Some(5000);
        assert_eq!(budget(&context), 5000);
    }

    #[test]
    fn old_turns_are_dropped_whole_with_a_note() {
        let big = "x".repeat(4000);
        let history = vec![
            user(json!(format!("one {big}"))),
            assistant("", Some(vec![call("c")])),
            result("c", json!(big)),
            assistant("a1", None),
            user(json!(format!("two {big}"))),
            assistant("a2", None),
            user(json!("three")),
        ];
        let all = build(&history);
        let messages = build_messages(&history, &settings(), estimate_all(&all) - 10);
        assert_eq!(
            messages[1]["content"],
            "[1 earlier conversation turns were omitted to fit the context window]"
        );
        assert!(messages[2]["content"].as_str().unwrap().starts_with("two"));
        let messages = build_messages(&history, &settings(), 50);
        assert_eq!(
            messages[1]["content"],
            "[2 earlier conversation turns were omitted to fit the context window]"
        );
        assert_eq!(roles(&messages), ["system", "user", "user"]);
        assert_eq!(messages[2]["content"], "three");
    }

    #[test]
    fn a_huge_current_turn_loses_its_older_tool_results_first() {
        let big = "y".repeat(8000);
        let history = vec![
            user(json!("go")),
            assistant("", Some(vec![call("c1")])),
            result("c1", json!(big)),
            assistant("", Some(vec![call("c2")])),
            result("c2", json!(big)),
            assistant("", Some(vec![call("c3")])),
            result("c3", json!(big)),
        ];
        let messages = build_messages(&history, &settings(), 3000);
        let contents: Vec<&str> = messages
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(
            contents[..2],
            [
                "[tool result omitted to fit the context window: 8000 chars]",
                "[tool result omitted to fit the context window: 8000 chars]"
            ]
        );
        assert_eq!(contents[2], big, "the newest iteration's result stays");
        // Only as many as needed go.
        let messages = build_messages(&history, &settings(), 5000);
        let omitted = messages
            .iter()
            .filter(|m| {
                m["content"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("[tool result omitted"))
            })
            .count();
        assert_eq!(omitted, 1);
    }

    /// The incremental build gives, after every event of a long generated conversation, exactly
    /// the request a from-scratch build gives: tool rounds, answers with reasoning, images
    /// falling out of the window, plans, environment input, and budgets that drop turns and
    /// shorten tool results.
    #[test]
    fn the_incremental_build_matches_a_build_from_scratch() {
        let mut seed = 7_u64;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        let mut history: Vec<Event> = Vec::new();
        let mut caches: Vec<(u64, TurnCache)> = [u64::MAX, 4000, 900, 150]
            .into_iter()
            .map(|b| (b, TurnCache::default()))
            .collect();
        let mut settings = settings();
        settings.context.max_images = 3;
        let mut images = 0;
        for step in 0..400 {
            let text = "x".repeat(next(300) as usize);
            let event = match next(9) {
                0 | 1 => user(json!(format!("q{step} {text}"))),
                2 => {
                    images += 1;
                    user(json!([{"type": "text", "text": "look"}, image(images)]))
                }
                3 => {
                    let id = format!("m{step}");
                    history.push(Event::new(EventBody::AssistantThinkingMessage {
                        content: format!("thinking {step}"),
                        is_complete: true,
                        thinking_duration_ms: None,
                        message_id: id.clone(),
                        signature: (step % 2 == 0).then(|| "sig".to_owned()),
                        redacted_data: None,
                    }));
                    assistant_with_id(&format!("a{step}"), None, Some(&id))
                }
                4 => {
                    let first = format!("c{step}a");
                    let second = format!("c{step}b");
                    history.push(assistant("", Some(vec![call(&first), call(&second)])));
                    history.push(result(&second, json!(format!("second {text}"))));
                    images += 1;
                    result(
                        &first,
                        json!([{"type": "text", "text": "shot"}, image(images)]),
                    )
                }
                5 => Event::new(EventBody::EnvironmentInput {
                    content: json!(format!("env {step}")),
                    description: Some("Files".into()),
                    metadata: None,
                }),
                6 => Event::new(EventBody::PlanUpdate {
                    session_id: String::new(),
                    steps: Vec::new(),
                }),
                7 => assistant(&format!("answer {text}"), None),
                _ => result(&format!("c{step}"), json!(text)),
            };
            history.push(event);
            for (budget, cache) in &mut caches {
                let expected =
                    Value::Array(build_messages(&history, &settings, *budget)).to_string();
                let incremental = build_messages_json(&history, &settings, *budget, cache);
                assert_eq!(incremental, expected, "step {step}, budget {budget}");
            }
        }
    }

    fn estimate_all(messages: &[Value]) -> u64 {
        messages.iter().map(estimate).sum()
    }
}
