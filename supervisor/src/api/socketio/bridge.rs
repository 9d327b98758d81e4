//! The translation of agent events into the `agent-event` payloads of the pre-sunset Socket.IO
//! layer (api.md §12.4): each agent event becomes one or more `{type, data}` pairs, in order.

use serde_json::{Value, json};

/// One `agent-event` payload before its `seq` is attached.
#[derive(Debug, Clone, PartialEq)]
pub struct Emission {
    pub kind: &'static str,
    pub data: Value,
}

fn emit(kind: &'static str, data: Value) -> Emission {
    Emission { kind, data }
}

fn status(state: &str, phase: &str, message: String) -> Emission {
    emit(
        "agent-status",
        json!({"isProcessing": true, "state": state, "phase": phase, "message": message}),
    )
}

/// The emissions for one agent event (the table of api.md §12.4).
pub fn translate(event: &Value) -> Vec<Emission> {
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let field = |name: &str| event.get(name).cloned().unwrap_or(Value::Null);
    match kind {
        "agent_run_start" => vec![status(
            "initializing",
            "model_initialization",
            "Initializing model and processing request...".into(),
        )],
        "agent_run_end" => {
            let state = event
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("idle");
            vec![emit(
                "agent-status",
                json!({"isProcessing": false, "state": state}),
            )]
        }
        "user_message" => vec![
            status(
                "processing",
                "request_processing",
                "Processing your request...".into(),
            ),
            emit("query", json!({"text": field("content")})),
        ],
        "assistant_message" => vec![emit("answer", json!({"text": field("content")}))],
        "assistant_streaming_message" => {
            let complete = event
                .get("isComplete")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut out = Vec::with_capacity(2);
            if !complete {
                out.push(status(
                    "streaming",
                    "first_token_received",
                    "Generating response...".into(),
                ));
            }
            out.push(emit(
                "streaming_message",
                json!({
                    "content": field("content"),
                    "isComplete": complete,
                    "messageId": field("messageId"),
                }),
            ));
            out
        }
        "tool_call" => {
            let name = event.get("name").and_then(Value::as_str).unwrap_or("tool");
            vec![
                status(
                    "executing_tools",
                    "tool_execution",
                    format!("Executing {name}..."),
                ),
                emit(
                    "event",
                    json!({
                        "type": "tool_call",
                        "name": name,
                        "toolCallId": field("toolCallId"),
                        "arguments": field("arguments"),
                    }),
                ),
            ]
        }
        "tool_result" => vec![emit(
            "event",
            json!({
                "type": "tool_result",
                "name": field("name"),
                "toolCallId": field("toolCallId"),
                "content": field("content"),
                "error": field("error"),
            }),
        )],
        "system" => system(event),
        _ => vec![emit("event", event.clone())],
    }
}

fn system(event: &Value) -> Vec<Emission> {
    let message = event
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let level = match event.get("level").and_then(Value::as_str) {
        Some("warning") => "warning",
        Some("error") => "error",
        _ => "info",
    };
    let mut out = Vec::new();
    if message.contains("model warming up") {
        out.push(status(
            "warming_up",
            "model_warmup",
            "Warming up model...".into(),
        ));
    } else if message.contains("generating") {
        out.push(status(
            "generating",
            "response_generation",
            "Generating response...".into(),
        ));
    }
    out.push(emit(level, json!({"message": message})));
    if message.contains("aborted") {
        out.push(emit("aborted", json!({"message": message})));
        out.push(emit(
            "agent-status",
            json!({"isProcessing": false, "state": "idle"}),
        ));
    }
    if message.contains("status") {
        out.push(emit("status", json!({"message": message})));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(event: Value) -> Vec<&'static str> {
        translate(&event).into_iter().map(|e| e.kind).collect()
    }

    #[test]
    fn the_table() {
        assert_eq!(
            kinds(json!({"type": "user_message", "content": "hi"})),
            ["agent-status", "query"]
        );
        assert_eq!(
            translate(&json!({"type": "user_message", "content": "hi"}))[1].data,
            json!({"text": "hi"})
        );
        assert_eq!(
            kinds(
                json!({"type": "assistant_streaming_message", "content": "a", "isComplete": false})
            ),
            ["agent-status", "streaming_message"]
        );
        assert_eq!(
            kinds(
                json!({"type": "assistant_streaming_message", "content": "", "isComplete": true})
            ),
            ["streaming_message"]
        );
        assert_eq!(
            kinds(json!({"type": "tool_call", "name": "write_file"})),
            ["agent-status", "event"]
        );
        let end = translate(&json!({"type": "agent_run_end", "status": "aborted"}));
        assert_eq!(
            end[0].data,
            json!({"isProcessing": false, "state": "aborted"})
        );
        assert_eq!(
            kinds(json!({"type": "system", "level": "warning", "message": "Request was aborted"})),
            ["warning", "aborted", "agent-status"]
        );
        assert_eq!(
            kinds(json!({"type": "environment_input", "content": "x"})),
            ["event"]
        );
    }
}
