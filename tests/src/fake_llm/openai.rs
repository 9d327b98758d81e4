//! The OpenAI chat-completions wire format: `chat.completion.chunk` SSE frames ending in
//! `[DONE]`, or one `chat.completion`.

use serde_json::{Value, json};

use super::conversation::Conversation;
use super::plan::{HttpFailure, Plan};
use super::wire::{Frame, Wire, call_id, fragments, sse, units};

/// `created` of every chunk: a constant, for determinism.
const CREATED: u64 = 1_700_000_000;

fn usage(plan: &Plan) -> Value {
    plan.usage.clone().unwrap_or_else(|| {
        let completion = units(plan);
        json!({"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion})
    })
}

pub(super) fn stream(
    plan: &Plan,
    conversation: &Conversation,
    seq: u64,
    step: usize,
) -> Vec<Frame> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion.chunk",
            "created": CREATED, "model": conversation.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut frames = vec![Frame {
        bytes: sse(
            None,
            &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        ),
        unit: false,
    }];
    for r in &plan.reasoning {
        frames.push(Frame {
            bytes: sse(None, &chunk(json!({"reasoning_content": r}), Value::Null)),
            unit: true,
        });
    }
    for t in &plan.text {
        frames.push(Frame {
            bytes: sse(None, &chunk(json!({"content": t}), Value::Null)),
            unit: true,
        });
    }
    for (i, call) in plan.calls.iter().enumerate() {
        let first = json!({"tool_calls": [{"index": i, "id": call_id(Wire::OpenAi, step, i, call), "type": "function",
            "function": {"name": call.name, "arguments": ""}}]});
        frames.push(Frame {
            bytes: sse(None, &chunk(first, Value::Null)),
            unit: true,
        });
        for fragment in fragments(&call.arguments, call.fragment) {
            let delta = json!({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]});
            frames.push(Frame {
                bytes: sse(None, &chunk(delta, Value::Null)),
                unit: true,
            });
        }
    }
    frames.push(Frame {
        bytes: sse(None, &chunk(json!({}), json!(plan.finish_reason()))),
        unit: false,
    });
    if plan.usage_override.unwrap_or(conversation.include_usage) {
        let usage = json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion.chunk",
            "created": CREATED, "model": conversation.model, "choices": [], "usage": usage(plan)});
        frames.push(Frame {
            bytes: sse(None, &usage),
            unit: false,
        });
    }
    if !plan.omit_done {
        frames.push(Frame {
            bytes: "data: [DONE]\n\n".into(),
            unit: false,
        });
    }
    frames
}

pub(super) fn whole(plan: &Plan, conversation: &Conversation, seq: u64, step: usize) -> Value {
    let mut message = json!({"role": "assistant", "content": plan.text.concat()});
    if !plan.reasoning.is_empty() {
        message["reasoning_content"] = json!(plan.reasoning.concat());
    }
    if !plan.calls.is_empty() {
        if plan.text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = Value::Array(
            plan.calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({"id": call_id(Wire::OpenAi, step, i, c), "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect(),
        );
    }
    json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion", "created": CREATED,
        "model": conversation.model,
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason()}],
        "usage": plan.usage.clone().unwrap_or_else(|| json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}))})
}

pub(super) fn error_body(failure: &HttpFailure) -> Value {
    let kind = if failure.status == 429 {
        "rate_limit_error"
    } else if failure.status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json!({"error": {"message": failure.message, "type": kind}})
}

pub(super) fn error_frame(message: &str) -> String {
    sse(
        None,
        &json!({"error": {"message": message, "type": "server_error"}}),
    )
}
