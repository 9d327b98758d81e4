//! What both wire formats share (body pieces, SSE framing, call ids, argument fragments) and
//! the switch between them.

use serde_json::Value;

use super::conversation::Conversation;
use super::plan::{HttpFailure, Plan, PlannedCall};
use super::{anthropic, openai};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    OpenAi,
    Anthropic,
}

impl Wire {
    /// The streamed body, frame by frame.
    pub(super) fn stream(
        self,
        plan: &Plan,
        conversation: &Conversation,
        seq: u64,
        step: usize,
    ) -> Vec<Frame> {
        match self {
            Wire::OpenAi => openai::stream(plan, conversation, seq, step),
            Wire::Anthropic => anthropic::stream(plan, conversation, seq, step),
        }
    }

    /// The non-streamed body.
    pub(super) fn whole(
        self,
        plan: &Plan,
        conversation: &Conversation,
        seq: u64,
        step: usize,
    ) -> Value {
        match self {
            Wire::OpenAi => openai::whole(plan, conversation, seq, step),
            Wire::Anthropic => anthropic::whole(plan, conversation, seq, step),
        }
    }

    /// The body of an HTTP error, unless the script gave one.
    pub(super) fn error_body(self, failure: &HttpFailure) -> Value {
        match self {
            Wire::OpenAi => openai::error_body(failure),
            Wire::Anthropic => anthropic::error_body(failure),
        }
    }

    /// An error sent in the middle of a stream.
    pub(super) fn error_frame(self, message: &str) -> String {
        match self {
            Wire::OpenAi => openai::error_frame(message),
            Wire::Anthropic => anthropic::error_frame(message),
        }
    }
}

/// One piece of a response body.
pub(super) struct Frame {
    pub(super) bytes: String,
    /// Content (a token or an argument fragment), as opposed to framing.
    pub(super) unit: bool,
}

pub(super) fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(event) => format!("event: {event}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

pub(super) fn call_id(wire: Wire, step: usize, index: usize, call: &PlannedCall) -> String {
    call.id.clone().unwrap_or_else(|| match wire {
        Wire::OpenAi => format!("call_{index}"),
        Wire::Anthropic => format!("toolu_{step}_{index}"),
    })
}

pub(super) fn fragments(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

pub(super) fn units(plan: &Plan) -> u64 {
    let calls: usize = plan
        .calls
        .iter()
        .map(|c| 1 + fragments(&c.arguments, c.fragment).len())
        .sum();
    (plan.reasoning.len() + plan.text.len() + calls) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_llm::conversation::tests::openai;
    use crate::fake_llm::directives::directive_plan;
    use crate::fake_llm::state::Shared;
    use serde_json::json;

    #[test]
    fn wire_frames() {
        let c = openai(json!([{"role": "user", "content": "TOOL read {\"path\":\"a.txt\"}"}]));
        let plan = directive_plan(&Shared::default(), &c, "");
        let frames = openai::stream(&plan, &c, 1, 0);
        let text: String = frames.iter().map(|f| f.bytes.as_str()).collect();
        assert!(text.contains("\"id\":\"call_0\""));
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(!text.contains("\"usage\""));
        let frames = anthropic::stream(
            &Plan {
                reasoning: vec!["r".into()],
                ..plan
            },
            &c,
            1,
            0,
        );
        let text: String = frames.iter().map(|f| f.bytes.as_str()).collect();
        assert!(text.contains("fake-signature") && text.contains("\"stop_reason\":\"tool_use\""));
    }
}
