//! What to answer, whichever way it was chosen: text, reasoning and tool calls, with the
//! failures, delays and endings a script or directive asks for.

use serde_json::Value;
use shared::directives::words;

/// The size of a tool call's argument fragments, unless a script sets one.
pub(super) const DEFAULT_FRAGMENT: usize = 7;

#[derive(Debug, Clone)]
pub(super) struct PlannedCall {
    pub(super) id: Option<String>,
    pub(super) name: String,
    pub(super) arguments: String,
    pub(super) fragment: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Ending {
    Normal,
    /// Send this many content units, then hang until the client leaves.
    HangAfter(usize),
    /// Send this many units, then break the connection (no finish, no `[DONE]`).
    CutAfter(usize),
    /// Send this many units, then an SSE error payload.
    ErrorAfter(usize, String),
}

#[derive(Debug, Clone)]
pub(super) struct HttpFailure {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Option<Value>,
    pub(super) message: String,
}

/// What to answer.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) failure: Option<HttpFailure>,
    pub(super) hang_before_headers: bool,
    pub(super) delay_ms: u64,
    pub(super) first_token_delay_ms: u64,
    pub(super) token_delay_ms: u64,
    pub(super) reasoning: Vec<String>,
    pub(super) text: Vec<String>,
    pub(super) calls: Vec<PlannedCall>,
    pub(super) finish: Option<String>,
    pub(super) usage: Option<Value>,
    pub(super) usage_override: Option<bool>,
    pub(super) omit_done: bool,
    pub(super) ending: Ending,
}

impl Plan {
    pub(super) fn text(tokens: Vec<String>) -> Self {
        Self {
            failure: None,
            hang_before_headers: false,
            delay_ms: 0,
            first_token_delay_ms: 0,
            token_delay_ms: 0,
            reasoning: Vec::new(),
            text: tokens,
            calls: Vec::new(),
            finish: None,
            usage: None,
            usage_override: None,
            omit_done: false,
            ending: Ending::Normal,
        }
    }

    pub(super) fn fail(status: u16, message: &str) -> Self {
        Self {
            failure: Some(HttpFailure {
                status,
                headers: Vec::new(),
                body: None,
                message: message.to_owned(),
            }),
            ..Self::text(Vec::new())
        }
    }

    pub(super) fn finish_reason(&self) -> String {
        self.finish.clone().unwrap_or_else(|| {
            if self.calls.is_empty() {
                "stop".into()
            } else {
                "tool_calls".into()
            }
        })
    }
}

pub(super) fn echo(text: &str) -> Plan {
    Plan::text(words(&format!("echo: {text}")))
}
