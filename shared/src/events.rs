//! Agent events as clients see them (the Tarko event stream): a JSON object with `id`, `type`,
//! `timestamp` and the type's own fields at the top level. Absent optional fields are omitted,
//! never `null`, because upstream clients test for presence.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{new_event_id, now_ms};

/// One agent event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(flatten)]
    pub body: EventBody,
    pub timestamp: u64,
}

impl Event {
    /// A new event with a fresh id, stamped now.
    pub fn new(body: EventBody) -> Self {
        Self {
            id: new_event_id(),
            body,
            timestamp: now_ms(),
        }
    }

    /// Compact single-line JSON, as SSE frames and storage want it.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail: all keys are strings and no custom
        // serializer is involved.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `tool_call.tool`: the description of the tool being run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolInfo {
    pub name: String,
    pub description: String,
    pub schema: Value,
}

/// A tool call in OpenAI chat format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// `ToolCall.function`: `arguments` is the raw JSON text the model produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// The event types this server emits or reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum EventBody {
    UserMessage {
        content: Value,
    },
    EnvironmentInput {
        content: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Value>,
    },
    AgentRunStart {
        session_id: String,
        run_options: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model_display_name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_name: Option<String>,
    },
    AssistantStreamingThinkingMessage {
        content: String,
        is_complete: bool,
        message_id: String,
    },
    AssistantThinkingMessage {
        content: String,
        is_complete: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thinking_duration_ms: Option<u64>,
        message_id: String,
        /// Provider continuation data: Anthropic's signature of this thinking.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
        /// Anthropic `redacted_thinking` blocks, opaque.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        redacted_data: Option<Vec<String>>,
    },
    AssistantStreamingMessage {
        content: String,
        is_complete: bool,
        message_id: String,
    },
    AssistantStreamingToolCall {
        tool_call_id: String,
        tool_name: String,
        arguments: String,
        is_complete: bool,
        message_id: String,
    },
    AssistantMessage {
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raw_content: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool_calls: Option<Vec<ToolCall>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish_reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttft_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttlt_ms: Option<u64>,
    },
    ToolCall {
        tool_call_id: String,
        name: String,
        arguments: Value,
        start_time: u64,
        tool: ToolInfo,
    },
    ToolResult {
        tool_call_id: String,
        name: String,
        content: Value,
        elapsed_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    System {
        level: SystemLevel,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        details: Option<Value>,
    },
    AgentRunEnd {
        session_id: String,
        iterations: u32,
        elapsed_ms: u64,
        status: RunStatus,
    },
    PlanUpdate {
        #[serde(default)]
        session_id: String,
        steps: Vec<PlanStep>,
    },
}

impl EventBody {
    /// Whether the event is persisted and becomes memory; streaming deltas are not.
    pub fn is_stored(&self) -> bool {
        !matches!(
            self,
            Self::AssistantStreamingMessage { .. }
                | Self::AssistantStreamingThinkingMessage { .. }
                | Self::AssistantStreamingToolCall { .. }
        )
    }
}

/// A step of a planner's plan; read back for context only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanStep {
    pub content: String,
    pub done: bool,
}

/// `system.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemLevel {
    Info,
    Warning,
    Error,
}

/// Agent status, also the final status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Idle,
    Executing,
    Aborted,
    Error,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Executing => "executing",
            Self::Aborted => "aborted",
            Self::Error => "error",
        }
    }
}

/// Event types that are delivered live but never stored.
pub fn is_streaming_type(kind: &str) -> bool {
    matches!(
        kind,
        "assistant_streaming_message"
            | "assistant_streaming_thinking_message"
            | "assistant_streaming_tool_call"
            | "final_answer_streaming"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_flat_with_camel_case_fields() {
        let ev = Event::new(EventBody::AssistantMessage {
            content: "hi".into(),
            raw_content: None,
            tool_calls: None,
            finish_reason: Some("stop".into()),
            message_id: Some("msg_1".into()),
            ttft_ms: None,
            ttlt_ms: None,
        });
        let v: Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["type"], "assistant_message");
        assert_eq!(v["finishReason"], "stop");
        assert_eq!(v["messageId"], "msg_1");
        assert!(v.get("rawContent").is_none());
        assert!(v["timestamp"].as_u64().is_some());
        let back: Event = serde_json::from_value(v).unwrap();
        assert!(
            matches!(back.body, EventBody::AssistantMessage { content, .. } if content == "hi")
        );
    }

    #[test]
    fn run_end_status_is_lower_case() {
        let ev = Event::new(EventBody::AgentRunEnd {
            session_id: "s".into(),
            iterations: 1,
            elapsed_ms: 3,
            status: RunStatus::Aborted,
        });
        let v: Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["status"], "aborted");
        assert_eq!(v["elapsedMs"], 3);
    }
}
