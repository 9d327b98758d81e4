//! Messages between the supervisor and a worker, carried in [`crate::frame`]s on fd 3.
//!
//! The conversation is: supervisor sends a [`crate::jail::JailSpec`] (the launcher's "go"); the
//! jailed worker answers [`FromWorker::Jailed`] with its self-audit (or [`FromWorker::JailFailed`]);
//! supervisor sends [`ToWorker::Init`]; worker answers [`FromWorker::Ready`] with the same
//! [`PROTOCOL_VERSION`]; then queries, events and model calls flow until either side closes the
//! channel. The worker holds no secrets and no network: a model
//! call is a [`ModelRequest`] naming `{provider, id}`, answered by a stream of [`ModelReply`]s.
//!
//! Arbitrary JSON (events, query input, model parameters) travels as strings, because bincode
//! cannot encode `serde_json::Value`. No `skip_serializing_if` here: bincode needs every field.

use serde::{Deserialize, Serialize};

use crate::jail::{JailAudit, JailFailure};

/// Bumped whenever a message below changes shape. Supervisor and worker ship in one binary, so a
/// mismatch means a stale executable on disk, which the handshake reports instead of misparsing.
pub const PROTOCOL_VERSION: u32 = 6;

/// A model as the worker may name it: a selector, never a URL or a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub provider: String,
    pub id: String,
    pub display_name: Option<String>,
}

/// Supervisor → worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Boxed: it is sent once, and the largest variant sets the size of every slot in the
    /// channels that carry the many small model replies.
    Init(Box<Init>),
    Query(Query),
    /// Abort the run with this id, if it is still the current one.
    Abort {
        run_id: String,
        reason: AbortReason,
    },
    /// A reply from the model gateway to one of the worker's [`ModelRequest`]s.
    Model(ModelReply),
    /// Test builds only: a probe for the in-jail probe server, which answers it before the agent
    /// sees it. Last, so the variants above keep their wire index in every build.
    #[cfg(feature = "isolation-tests")]
    Probe(crate::probe::ProbeRequest),
}

/// Why a run is aborted: the run's closing events say it, so a client that did not ask for the
/// abort learns what stopped its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// A client asked (`/sessions/abort`, Socket.IO `abort-query`).
    Requested,
    /// The server is shutting down and the run outlived the shutdown grace period.
    ServerShutdown,
}

/// First message on a fresh channel: everything the worker needs to be this session's agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    pub protocol_version: u32,
    pub session_id: String,
    /// The session's workspace directory as the worker sees it (absolute). Every tool path is
    /// resolved beneath it; inside the jail it will be `/workspace` (or `/` for the chroot
    /// layout), so the worker is told rather than left to guess.
    pub workspace: String,
    pub agent: AgentSettings,
    /// The session's stored events, oldest first, each a JSON object: the agent's memory.
    pub history: Vec<String>,
}

/// Agent options the worker obeys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSettings {
    pub agent_name: String,
    pub model: ModelRef,
    pub instructions: Option<String>,
    pub max_iterations: u32,
    pub temperature: f64,
    pub streaming_tool_call_events: bool,
    /// What the model request may hold.
    pub context: ContextSettings,
}

/// The inputs of the context budget and of the image window. Defaults
/// mean "not configured": the worker then applies the spec's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextSettings {
    /// `context.maxImagesCount`: images kept in the request, newest first.
    pub max_images: u32,
    /// `context.maxTokens`: an explicit budget for the request's messages.
    pub max_tokens: Option<u64>,
    /// The model's context window in tokens (default 128 000).
    pub context_window: Option<u64>,
    /// `maxTokens` of the model call, sent as `max_tokens` when set; also reserved from the
    /// budget (8192 when unset).
    pub max_output_tokens: Option<u32>,
}

impl Default for ContextSettings {
    fn default() -> Self {
        Self {
            max_images: 5,
            max_tokens: None,
            context_window: None,
            max_output_tokens: None,
        }
    }
}

/// Start a run.
#[derive(Debug, Serialize, Deserialize)]
pub struct Query {
    pub run_id: String,
    /// JSON: a string, or an array of OpenAI content parts.
    pub input: String,
    pub stream: bool,
}

/// Worker → supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The jail is complete: the worker's self-audit. The first frame a worker
    /// sends; the supervisor checks it before it sends `Init`.
    Jailed(Box<JailAudit>),
    /// A jail step failed; the worker exits after sending this.
    JailFailed(JailFailure),
    /// Start-up probe mode only: what the probe saw inside the jail (JSON object).
    ProbeReport { json: String },
    /// Handshake answer; `pid` is the worker's own pid as it sees it.
    Ready { protocol_version: u32, pid: u32 },
    /// One agent event (a JSON object with `id`, `type`, `timestamp`).
    Event { json: String },
    /// The result of a run (JSON), sent just before its `agent_run_end` event.
    RunResult { run_id: String, json: String },
    /// Boxed for the same reason as [`ToWorker::Init`]: events are the common case.
    ModelRequest(Box<ModelRequest>),
    /// Stop the model call with this id; no acknowledgement is awaited.
    ModelCancel { id: String },
    /// Test builds only: the answer to a `ToWorker::Probe`. Last, like that one.
    #[cfg(feature = "isolation-tests")]
    ProbeAnswer(crate::probe::ProbeAnswer),
}

/// One model call, in a provider-neutral format (OpenAI chat-completions shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRequest {
    pub id: String,
    pub run_id: String,
    pub model: ModelRef,
    pub stream: bool,
    /// JSON object in OpenAI chat-completions shape: `messages`, `tools`, `temperature`, ...
    pub params: String,
}

/// Gateway → worker, for one request id. Exactly one `Done` or `Error` ends a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ModelReply {
    Started {
        id: String,
        attempt: u32,
    },
    Retry {
        id: String,
        attempt: u32,
        max_attempts: u32,
        delay_ms: u64,
        status: Option<u16>,
        message: String,
    },
    Delta {
        id: String,
        delta: Delta,
    },
    Done {
        id: String,
        finish_reason: String,
        usage: Usage,
    },
    Error {
        id: String,
        error: ModelFailure,
    },
}

impl ModelReply {
    /// The request this reply belongs to.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Started { id, .. }
            | Self::Retry { id, .. }
            | Self::Delta { id, .. }
            | Self::Done { id, .. }
            | Self::Error { id, .. } => id,
        }
    }
}

/// One normalised piece of model output; each delta carries one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Delta {
    Reasoning(String),
    /// Anthropic only: the signature that must accompany the thinking text when it is sent back.
    ReasoningSignature(String),
    /// Anthropic only: an opaque `redacted_thinking` block.
    RedactedReasoning(String),
    Text(String),
    /// The first delta of a call has `id` and `name`; later ones only argument fragments.
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
}

/// Token usage of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub estimated: bool,
}

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFailure {
    pub kind: ModelErrorKind,
    pub status: Option<u16>,
    pub message: String,
    pub attempts: u32,
    /// Whether some deltas had already been forwarded when it failed.
    pub partial: bool,
}

/// What kind of failure a model call ended in; the gateway maps every provider's errors here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelErrorKind {
    Cancelled,
    UnknownModel,
    Config,
    Network,
    Timeout,
    RateLimited,
    Overloaded,
    Server,
    Auth,
    Permission,
    NotFound,
    ContextLength,
    BadRequest,
    ContentFilter,
    StreamInterrupted,
    Protocol,
    BudgetExceeded,
    Internal,
}

impl ModelErrorKind {
    /// The snake_case name used in event details.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::UnknownModel => "unknown_model",
            Self::Config => "config",
            Self::Network => "network",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::Server => "server",
            Self::Auth => "auth",
            Self::Permission => "permission",
            Self::NotFound => "not_found",
            Self::ContextLength => "context_length",
            Self::BadRequest => "bad_request",
            Self::ContentFilter => "content_filter",
            Self::StreamInterrupted => "stream_interrupted",
            Self::Protocol => "protocol",
            Self::BudgetExceeded => "budget_exceeded",
            Self::Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{read_frame_blocking, write_frame_blocking};

    fn round_trip(msg: &ToWorker) -> ToWorker {
        let mut bytes = Vec::new();
        write_frame_blocking(&mut bytes, msg).unwrap();
        read_frame_blocking(&mut bytes.as_slice(), usize::MAX)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        let init = ToWorker::Init(Box::new(Init {
            protocol_version: PROTOCOL_VERSION,
            session_id: "s".into(),
            workspace: "/workspace".into(),
            agent: AgentSettings {
                agent_name: "a".into(),
                model: ModelRef {
                    provider: "echo".into(),
                    id: "echo".into(),
                    display_name: None,
                },
                instructions: Some("be brief".into()),
                max_iterations: 10,
                temperature: 0.7,
                streaming_tool_call_events: true,
                context: ContextSettings::default(),
            },
            history: vec!["{}".into()],
        }));
        let back = round_trip(&init);
        assert!(
            matches!(back, ToWorker::Init(i) if i.agent.max_iterations == 10 && i.history.len() == 1 && i.workspace == "/workspace")
        );

        let reply = ToWorker::Model(ModelReply::Delta {
            id: "m".into(),
            delta: Delta::ToolCall {
                index: 0,
                id: Some("c".into()),
                name: None,
                arguments: "{".into(),
            },
        });
        let back = round_trip(&reply);
        assert!(matches!(back, ToWorker::Model(r) if r.request_id() == "m"));

        let abort = ToWorker::Abort {
            run_id: "r".into(),
            reason: AbortReason::ServerShutdown,
        };
        let back = round_trip(&abort);
        assert!(matches!(
            back,
            ToWorker::Abort { run_id, reason: AbortReason::ServerShutdown } if run_id == "r"
        ));
    }
}
