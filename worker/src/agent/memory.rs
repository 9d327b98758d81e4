//! Turning the session's stored events into model messages (agent.md §2.2), on every iteration.
//!
//! The event log is the memory: a worker that was killed and replaced gets the same log in its
//! `Init` and therefore sends the model the same conversation.

use serde_json::{Map, Value, json};
use shared::events::{Event, EventBody, ToolCall};
use shared::protocol::AgentSettings;

/// Parses the stored events handed over in `Init`. An event this worker cannot read (an unknown
/// type, a damaged row) is skipped: it cannot be model context, and the rest still is.
pub(crate) fn parse_history(raw: &[String]) -> Vec<Event> {
    raw.iter()
        .filter_map(|json| serde_json::from_str::<Event>(json).ok())
        .collect()
}

const DEFAULT_INSTRUCTIONS: &str = "You are a helpful assistant working in a sandboxed workspace. \
Use the available tools to inspect or change files instead of guessing, and keep replies concise.";

/// The system prompt of agent.md §1.11 (without the clock line: the request must be
/// reproducible for a given history).
fn system_prompt(settings: &AgentSettings) -> String {
    let instructions = settings
        .instructions
        .as_deref()
        .unwrap_or(DEFAULT_INSTRUCTIONS);
    format!(
        "{instructions}\n\nFile tools take paths relative to the session's workspace root; \
         nothing outside it is reachable."
    )
}

/// The OpenAI chat messages for the next model call.
pub(crate) fn build_messages(history: &[Event], settings: &AgentSettings) -> Vec<Value> {
    let mut messages = vec![json!({"role": "system", "content": system_prompt(settings)})];
    for (index, event) in history.iter().enumerate() {
        match &event.body {
            EventBody::UserMessage { content } => {
                messages.push(json!({"role": "user", "content": content}));
            }
            EventBody::EnvironmentInput {
                content,
                description,
                ..
            } => {
                if let Some(message) = environment_message(content, description.as_deref()) {
                    messages.push(message);
                }
            }
            EventBody::AssistantMessage {
                content,
                tool_calls,
                ..
            } => {
                let calls = tool_calls.as_deref().unwrap_or_default();
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
                    message.insert("tool_calls".into(), json!(calls));
                }
                messages.push(Value::Object(message));
                messages.extend(tool_messages(calls, &history[index + 1..]));
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
                messages.push(json!({
                    "role": "system",
                    "content": format!("Current plan:\n{}\n\nFollow the plan.", lines.join("\n")),
                }));
            }
            _ => {}
        }
    }
    messages
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

/// The `role: tool` answers to `calls`, in the order of `calls`, taken from the `tool_result`
/// events that follow the assistant message up to the next user or assistant message. Matching
/// is positional, not global, because some servers reuse ids like `call_1`.
fn tool_messages(calls: &[ToolCall], following: &[Event]) -> Vec<Value> {
    let mut results: Vec<(&str, &Value)> = Vec::new();
    for event in following {
        match &event.body {
            EventBody::UserMessage { .. } | EventBody::AssistantMessage { .. } => break,
            EventBody::ToolResult {
                tool_call_id,
                content,
                ..
            } => results.push((tool_call_id, content)),
            _ => {}
        }
    }
    calls
        .iter()
        .map(|call| {
            let text = match results.iter().position(|(id, _)| *id == call.id) {
                Some(at) => tool_content_text(results.remove(at).1),
                None => "Error: no result was recorded for this tool call (aborted)".to_owned(),
            };
            json!({"role": "tool", "tool_call_id": call.id, "content": text})
        })
        .collect()
}

/// A tool result's `content` as model text (agent.md §2.2): strings as they are, MCP-style text
/// parts flattened, anything else as pretty JSON.
fn tool_content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        Value::Array(parts)
            if parts
                .iter()
                .all(|p| p["type"] == "text" && p["text"].is_string()) =>
        {
            parts
                .iter()
                .map(|p| {
                    let text = p["text"].as_str().unwrap_or_default();
                    match p["name"].as_str() {
                        Some(name) => format!("{name}:\n{text}"),
                        None => text.to_owned(),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
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

    fn assistant(content: &str, calls: Option<Vec<ToolCall>>) -> Event {
        Event::new(EventBody::AssistantMessage {
            content: content.into(),
            raw_content: None,
            tool_calls: calls,
            finish_reason: Some("stop".into()),
            message_id: None,
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

    #[test]
    fn a_tool_round_becomes_assistant_then_tool_messages_in_call_order() {
        let history = vec![
            Event::new(EventBody::UserMessage {
                content: json!("read both"),
            }),
            assistant("", Some(vec![call("c1"), call("c2")])),
            result("c2", json!("second")),
            result("c1", json!([{"type": "text", "text": "first"}])),
            assistant("done", None),
        ];
        let messages = build_messages(&history, &settings());
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
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
            Event::new(EventBody::UserMessage {
                content: json!("go"),
            }),
            assistant("", Some(vec![call("c1")])),
            Event::new(EventBody::UserMessage {
                content: json!("again"),
            }),
        ];
        let messages = build_messages(&history, &settings());
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
    }
}
