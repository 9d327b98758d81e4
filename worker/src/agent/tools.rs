//! The tools the agent offers the model, and the dispatch of a model's tool call to one.
//!
//! No built-in tool is registered yet (the workspace tools arrive with the agent-runtime work),
//! so every call is answered the way upstream answers a call to a tool it does not have.

use serde_json::{Value, json};
use shared::events::ToolInfo;

/// Tool definitions in OpenAI `tools` format, as sent to the model.
pub(crate) fn definitions() -> Vec<Value> {
    Vec::new()
}

/// What `tool_call.tool` says about `name`.
pub(crate) fn describe(name: &str) -> ToolInfo {
    ToolInfo {
        name: name.to_owned(),
        description: "Unknown tool".to_owned(),
        schema: json!({"type": "object", "properties": {}}),
    }
}

/// The outcome of one tool call: `Ok(content)` or `Err(message)` (agent.md §1.4).
pub(crate) async fn execute(name: &str, _arguments: &Value) -> Result<Value, String> {
    Err(format!("Tool \"{name}\" not found"))
}
