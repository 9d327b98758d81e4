//! The Anthropic Messages wire format: `message_start` ... `message_stop` SSE events with
//! content blocks for thinking, text and tool use, or one `message`.

use serde_json::{Value, json};

use super::conversation::Conversation;
use super::plan::{HttpFailure, Plan};
use super::wire::{Frame, Wire, call_id, fragments, sse, units};

/// The signature of every thinking block.
const SIGNATURE: &str = "fake-signature";

fn stop_reason(finish: &str) -> &str {
    match finish {
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        "stop" => "end_turn",
        other => other,
    }
}

pub(super) fn stream(
    plan: &Plan,
    conversation: &Conversation,
    seq: u64,
    step: usize,
) -> Vec<Frame> {
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
    frames.push(framing(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason(&plan.finish_reason()), "stop_sequence": null},
        "usage": {"output_tokens": output}}),
    ));
    if !plan.omit_done {
        frames.push(framing("message_stop", json!({"type": "message_stop"})));
    }
    frames
}

pub(super) fn whole(plan: &Plan, conversation: &Conversation, seq: u64, step: usize) -> Value {
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
        "content": content, "stop_reason": stop_reason(&plan.finish_reason()), "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5}})
}

fn error_type(status: u16) -> &'static str {
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

pub(super) fn error_body(failure: &HttpFailure) -> Value {
    json!({"type": "error", "error": {"type": error_type(failure.status), "message": failure.message}})
}

pub(super) fn error_frame(message: &str) -> String {
    sse(
        Some("error"),
        &json!({"type": "error", "error": {"type": "overloaded_error", "message": message}}),
    )
}
