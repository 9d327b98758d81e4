//! A model request reduced to what the fake's behaviour depends on: the messages by role, the
//! offered tools, whether to stream, and the step of the run (assistant turns since the query).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::Value;

use super::wire::Wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    System,
    User,
    Assistant,
    /// OpenAI `tool` messages, and Anthropic user turns carrying `tool_result` blocks.
    Tool,
}

#[derive(Debug, Clone)]
pub(super) struct Msg {
    pub(super) role: Role,
    pub(super) text: String,
}

/// A request reduced to what the fake's behaviour depends on.
pub(super) struct Conversation {
    pub(super) messages: Vec<Msg>,
    pub(super) tools: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) model: String,
    /// The raw `messages`, hashed for the per-step failure counters.
    pub(super) key_material: String,
}

pub(super) fn text_of(content: &Value) -> String {
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

pub(super) fn conversation(wire: Wire, body: &Value) -> Conversation {
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
    pub(super) fn query_index(&self) -> Option<usize> {
        (0..self.messages.len()).rev().find(|&i| {
            self.messages[i].role == Role::User
                && (i == 0 || self.messages[i - 1].role != Role::Tool)
        })
    }

    /// Step = assistant messages after the current query (0 for the run's first call).
    pub(super) fn step(&self) -> usize {
        let from = self.query_index().map_or(0, |i| i + 1);
        self.messages[from.min(self.messages.len())..]
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count()
    }

    pub(super) fn query_text(&self) -> String {
        self.query_index()
            .map(|i| self.messages[i].text.clone())
            .unwrap_or_default()
    }

    pub(super) fn last_tool_result(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Tool)
            .map(|m| m.text.clone())
            .unwrap_or_default()
    }

    /// A key for "this conversation at this step", for `FLAKY` and `failTimes`.
    pub(super) fn counter_key(&self, label: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        label.hash(&mut hasher);
        self.key_material.hash(&mut hasher);
        self.step().hash(&mut hasher);
        hasher.finish()
    }

    /// The first offered tool whose name contains `name`, else `name` itself.
    pub(super) fn tool_named(&self, name: &str) -> String {
        self.tools
            .iter()
            .find(|t| t.contains(name))
            .cloned()
            .unwrap_or_else(|| name.to_owned())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    /// A conversation in OpenAI's format that offers a `read_file` tool.
    pub(in crate::fake_llm) fn openai(messages: Value) -> Conversation {
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
}
