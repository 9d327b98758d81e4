//! One run: the iteration loop (model call, tool calls, again), with abort and model errors.
//!
//! Every run ends with exactly one `agent_run_end`, whatever happened (clients wait for it),
//! preceded by a `RunResult` message carrying what a non-streaming caller gets back.

use std::sync::{Arc, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::events::{Event, EventBody, FunctionCall, RunStatus, SystemLevel, ToolCall};
use shared::ids::{now_ms, prefixed_id};
use shared::protocol::{
    AbortReason, Delta, FromWorker, ModelErrorKind, ModelFailure, ModelReply, ModelRequest, Query,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Agent, memory, references, tools};

/// Calls beyond this many in one model response are answered with an error.
const MAX_TOOL_CALLS_PER_RESPONSE: usize = 32;
/// After an abort, how long a running tool gets to notice the token (file tools look between
/// files and chunks; `run_command` stops its command within this) before its call is answered
/// as aborted anyway.
const TOOL_STOP_GRACE: Duration = Duration::from_secs(1);

/// How a run is stopped: the token every step of the run watches, and why it was cancelled,
/// which the run's closing events report.
#[derive(Clone, Default)]
pub(crate) struct Abort {
    token: CancellationToken,
    reason: Arc<OnceLock<AbortReason>>,
}

impl Abort {
    /// Stops the run; the first reason given is the one its closing events name.
    pub(crate) fn abort(&self, reason: AbortReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Stops the run without a reason of its own (the supervisor is gone: nobody will read it).
    pub(crate) fn cancel(&self) {
        self.token.cancel();
    }

    fn reason(&self) -> AbortReason {
        self.reason.get().copied().unwrap_or(AbortReason::Requested)
    }
}

/// Runs `query` to its end. Never fails: every outcome becomes events.
pub(crate) async fn execute(agent: Agent, query: Query, abort: Abort) {
    let input = serde_json::from_str::<Value>(&query.input).unwrap_or(Value::String(query.input));
    let mut run = Run {
        agent,
        run_id: query.run_id,
        stream: query.stream,
        cancel: abort.token.clone(),
        abort,
        started: Instant::now(),
        iterations: 0,
    };
    let span = tracing::info_span!("run", session_id = %run.agent.session_id, run_id = %run.run_id);
    // Instrumented rather than entered: a guard held across the awaits below would tag
    // whatever else this thread polls in between with this run's span.
    async move {
        let end = run.drive(input).await;
        let _ = run
            .agent
            .outbox
            .send(FromWorker::RunResult {
                run_id: run.run_id.clone(),
                json: end.result.to_json(),
            })
            .await;
        run.emit(EventBody::AgentRunEnd {
            session_id: run.agent.session_id.clone(),
            iterations: run.iterations,
            elapsed_ms: run.started.elapsed().as_millis() as u64,
            status: end.status,
        })
        .await;
    }
    .instrument(span)
    .await;
}

struct Run {
    agent: Agent,
    run_id: String,
    stream: bool,
    cancel: CancellationToken,
    /// The abort behind `cancel` (its token), which knows why the run was stopped.
    abort: Abort,
    started: Instant,
    iterations: u32,
}

/// How a run ended: the result handed to a non-streaming caller, and the final status.
struct RunEnd {
    result: Event,
    status: RunStatus,
}

/// What one model response has delivered so far.
struct Response {
    message_id: String,
    text: String,
    reasoning: String,
    /// Anthropic continuation data, stored on the thinking event.
    signature: Option<String>,
    redacted: Vec<String>,
    reasoning_started: Option<Instant>,
    thinking_emitted: bool,
    calls: Vec<ToolCall>,
    finish_reason: Option<String>,
    sent_at: Instant,
    ttft_ms: Option<u64>,
}

impl Response {
    fn has_reasoning(&self) -> bool {
        !self.reasoning.is_empty() || !self.redacted.is_empty()
    }

    /// The `assistant_thinking_message` of this response, continuation data included.
    fn thinking_event(&self, duration_ms: Option<u64>) -> EventBody {
        EventBody::AssistantThinkingMessage {
            content: self.reasoning.clone(),
            is_complete: true,
            thinking_duration_ms: duration_ms,
            message_id: self.message_id.clone(),
            signature: self.signature.clone(),
            redacted_data: (!self.redacted.is_empty()).then(|| self.redacted.clone()),
        }
    }
}

enum ModelOutcome {
    Completed(Response),
    Aborted(Response),
    Failed(Response, ModelFailure),
}

impl Run {
    async fn drive(&mut self, input: Value) -> RunEnd {
        let settings = self.agent.settings.clone();
        let sanitized_input = if input.is_array() {
            json!("[Complex multimodal input]")
        } else {
            input.clone()
        };
        let mut run_options = json!({"input": sanitized_input, "sessionId": self.agent.session_id});
        if self.stream {
            run_options["stream"] = json!(true);
        }
        let references = input.as_str().map(references::find).unwrap_or_default();
        self.emit(EventBody::UserMessage { content: input }).await;
        if !references.is_empty() {
            let content = self.expand_references(references).await;
            let metadata = json!({"type": "codebase"});
            run_options["environmentInput"] = json!({
                "content": content,
                "description": references::DESCRIPTION,
                "metadata": metadata,
            });
            self.emit(EventBody::EnvironmentInput {
                content: json!(content),
                description: Some(references::DESCRIPTION.to_owned()),
                metadata: Some(metadata),
            })
            .await;
        }
        self.emit(EventBody::AgentRunStart {
            session_id: self.agent.session_id.clone(),
            run_options,
            provider: Some(settings.model.provider.clone()),
            model: Some(settings.model.id.clone()),
            model_display_name: settings.model.display_name.clone(),
            agent_name: Some(settings.agent_name.clone()),
        })
        .await;

        for iteration in 1..settings.max_iterations {
            if self.cancel.is_cancelled() {
                return self.close_aborted(None, &[]).await;
            }
            self.iterations = iteration;
            let mut budget = memory::budget(&settings.context);
            let mut retried = false;
            let mut response = loop {
                let messages = {
                    let history = self
                        .agent
                        .history
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    let mut turns = self
                        .agent
                        .turns
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    memory::build_messages_json(&history, &settings, budget, &mut turns)
                };
                match self.call_model(messages).await {
                    ModelOutcome::Completed(response) => break response,
                    ModelOutcome::Aborted(partial) => {
                        return self.close_aborted(Some(partial), &[]).await;
                    }
                    // The provider says the context is too long: our estimate was too generous for
                    // this model; one more try with half the budget, unless output was already
                    // shown.
                    ModelOutcome::Failed(partial, failure)
                        if failure.kind == ModelErrorKind::ContextLength
                            && !retried
                            && partial.text.is_empty()
                            && partial.reasoning.is_empty()
                            && partial.calls.is_empty() =>
                    {
                        retried = true;
                        budget /= 2;
                        tracing::info!(
                            budget,
                            "context too long for the model; retrying with half the budget"
                        );
                    }
                    ModelOutcome::Failed(partial, failure) => {
                        return self.close_failed(partial, failure).await;
                    }
                }
            };
            let message = self.emit_response(&mut response).await;
            if response.calls.is_empty() {
                return RunEnd {
                    result: message,
                    status: RunStatus::Idle,
                };
            }
            for (index, call) in response.calls.iter().enumerate() {
                if self.cancel.is_cancelled() {
                    return self.close_aborted(None, &response.calls[index..]).await;
                }
                // Calls beyond the cap still get their tool_call/tool_result pair, so the UI
                // shows them and the next request stays valid.
                let refused = (index >= MAX_TOOL_CALLS_PER_RESPONSE).then(|| {
                    format!(
                        "too many tool calls in one response (limit {MAX_TOOL_CALLS_PER_RESPONSE})"
                    )
                });
                if !self.run_tool(call, refused).await {
                    return self.close_aborted(None, &response.calls[index + 1..]).await;
                }
            }
        }

        let limit = settings.max_iterations;
        self.emit(EventBody::System {
            level: SystemLevel::Warning,
            message: format!("Maximum iterations reached ({limit}), forcing termination"),
            details: None,
        })
        .await;
        let result = self
            .emit(assistant(
                "Sorry, I could not complete this task. Maximum iterations reached.",
                "max_iterations",
                prefixed_id("msg_maxiter_", 8),
            ))
            .await;
        RunEnd {
            result,
            status: RunStatus::Idle,
        }
    }

    /// One model request through the supervisor's gateway, forwarding deltas as streaming events.
    /// `messages` is the JSON array of the conversation (see `memory::build_messages_json`).
    async fn call_model(&mut self, messages: String) -> ModelOutcome {
        let settings = self.agent.settings.clone();
        let id = prefixed_id("mr_", 8);
        let mut replies = self.agent.models.register(&id);
        // Written out rather than built as a tree: the messages are already JSON text, and at a
        // long conversation's end a tree of them was most of the worker's work per call.
        let tools = &self.agent.tool_definitions;
        let mut params = String::with_capacity(messages.len() + tools.len() + 96);
        params.push_str("{\"messages\":");
        params.push_str(&messages);
        params.push_str(",\"temperature\":");
        params.push_str(&Value::from(settings.temperature).to_string());
        if let Some(max_tokens) = settings.context.max_output_tokens {
            params.push_str(&format!(",\"max_tokens\":{max_tokens}"));
        }
        if tools.as_ref() != "[]" {
            params.push_str(",\"tools\":");
            params.push_str(tools);
            params.push_str(",\"tool_choice\":\"auto\"");
        }
        params.push('}');
        let request = ModelRequest {
            id: id.clone(),
            run_id: self.run_id.clone(),
            model: settings.model.clone(),
            stream: self.stream,
            params,
        };
        let mut response = Response {
            message_id: prefixed_id("msg_", 8),
            text: String::new(),
            reasoning: String::new(),
            signature: None,
            redacted: Vec::new(),
            reasoning_started: None,
            thinking_emitted: false,
            calls: Vec::new(),
            finish_reason: None,
            sent_at: Instant::now(),
            ttft_ms: None,
        };
        if self
            .agent
            .outbox
            .send(FromWorker::ModelRequest(Box::new(request)))
            .await
            .is_err()
        {
            self.agent.models.unregister(&id);
            return ModelOutcome::Failed(
                response,
                internal_failure("channel to the supervisor closed"),
            );
        }
        loop {
            let reply = tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    // Abort must not wait for the gateway: tell it and stop listening at once.
                    let _ = self.agent.outbox.try_send(FromWorker::ModelCancel { id: id.clone() });
                    self.agent.models.unregister(&id);
                    return ModelOutcome::Aborted(response);
                }
                reply = replies.recv() => reply,
            };
            let Some(reply) = reply else {
                self.agent.models.unregister(&id);
                return ModelOutcome::Failed(response, internal_failure("model gateway went away"));
            };
            match reply {
                ModelReply::Started { .. } => {}
                ModelReply::Retry {
                    attempt,
                    max_attempts,
                    delay_ms,
                    status,
                    message,
                    ..
                } => {
                    let what = status.map_or_else(|| message.clone(), |s| format!("HTTP {s}"));
                    self.emit(EventBody::System {
                        level: SystemLevel::Warning,
                        message: format!(
                            "Model request failed ({what}); retrying in {:.1}s (attempt {attempt} of {max_attempts})",
                            delay_ms as f64 / 1000.0
                        ),
                        details: Some(json!({"status": status, "attempt": attempt, "delayMs": delay_ms})),
                    })
                    .await;
                }
                ModelReply::Delta { delta, .. } => {
                    if response.ttft_ms.is_none() {
                        response.ttft_ms = Some(response.sent_at.elapsed().as_millis() as u64);
                    }
                    self.apply_delta(&mut response, delta).await;
                }
                ModelReply::Done { finish_reason, .. } => {
                    self.agent.models.unregister(&id);
                    response.finish_reason = Some(finish_reason);
                    return ModelOutcome::Completed(response);
                }
                ModelReply::Error { error, .. } => {
                    self.agent.models.unregister(&id);
                    return ModelOutcome::Failed(response, error);
                }
            }
        }
    }

    async fn apply_delta(&mut self, response: &mut Response, delta: Delta) {
        let message_id = response.message_id.clone();
        match delta {
            Delta::Reasoning(chunk) => {
                response.reasoning_started.get_or_insert_with(Instant::now);
                response.reasoning.push_str(&chunk);
                if self.stream {
                    self.emit(EventBody::AssistantStreamingThinkingMessage {
                        content: chunk,
                        is_complete: false,
                        message_id,
                    })
                    .await;
                }
            }
            // Continuation data: never shown, stored on the thinking event so that the next
            // request can send it back.
            Delta::ReasoningSignature(signature) => {
                response
                    .signature
                    .get_or_insert_with(String::new)
                    .push_str(&signature);
            }
            Delta::RedactedReasoning(data) => response.redacted.push(data),
            Delta::Text(chunk) => {
                self.finish_streamed_thinking(response).await;
                response.text.push_str(&chunk);
                if self.stream {
                    self.emit(EventBody::AssistantStreamingMessage {
                        content: chunk,
                        is_complete: false,
                        message_id,
                    })
                    .await;
                }
            }
            Delta::ToolCall {
                index,
                id,
                name,
                arguments,
            } => {
                self.finish_streamed_thinking(response).await;
                let index = index as usize;
                while response.calls.len() <= index {
                    response.calls.push(ToolCall {
                        id: String::new(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: String::new(),
                            arguments: String::new(),
                        },
                    });
                }
                let call = &mut response.calls[index];
                if let Some(id) = id.filter(|id| !id.is_empty()) {
                    call.id = id;
                }
                if call.id.is_empty() {
                    call.id = prefixed_id("call_", 9);
                }
                if let Some(name) = name {
                    call.function.name.push_str(&name);
                }
                call.function.arguments.push_str(&arguments);
                if self.stream && self.agent.settings.streaming_tool_call_events {
                    let (tool_call_id, tool_name) = (call.id.clone(), call.function.name.clone());
                    self.emit(EventBody::AssistantStreamingToolCall {
                        tool_call_id,
                        tool_name,
                        arguments,
                        is_complete: false,
                        message_id,
                    })
                    .await;
                }
            }
        }
    }

    /// Streaming mode: the thinking event goes out as soon as the model switches from reasoning
    /// to answering.
    async fn finish_streamed_thinking(&mut self, response: &mut Response) {
        if !self.stream || response.thinking_emitted || !response.has_reasoning() {
            return;
        }
        response.thinking_emitted = true;
        let duration = response
            .reasoning_started
            .map(|t| t.elapsed().as_millis() as u64);
        self.emit(response.thinking_event(duration)).await;
    }

    /// The complete response: thinking (before it when streaming, after it otherwise), the
    /// closing streaming tool-call events, and the `assistant_message`.
    async fn emit_response(&mut self, response: &mut Response) -> Event {
        self.finish_streamed_thinking(response).await;
        if self.stream && self.agent.settings.streaming_tool_call_events {
            for call in &response.calls {
                self.emit(EventBody::AssistantStreamingToolCall {
                    tool_call_id: call.id.clone(),
                    tool_name: call.function.name.clone(),
                    arguments: String::new(),
                    is_complete: true,
                    message_id: response.message_id.clone(),
                })
                .await;
            }
        }
        let message = self
            .emit(EventBody::AssistantMessage {
                content: response.text.clone(),
                // Upstream's native engine sends `rawContent: ""` on every answer, which reads
                // as if the answer had been lost; the field is optional (it only matters to an
                // engine that parses tool calls out of the text), so it is left out.
                raw_content: None,
                tool_calls: (!response.calls.is_empty()).then(|| response.calls.clone()),
                finish_reason: Some(
                    response
                        .finish_reason
                        .clone()
                        .unwrap_or_else(|| "stop".into()),
                ),
                message_id: Some(response.message_id.clone()),
                ttft_ms: response.ttft_ms,
                ttlt_ms: Some(response.sent_at.elapsed().as_millis() as u64),
            })
            .await;
        if !self.stream && response.has_reasoning() {
            self.emit(response.thinking_event(None)).await;
        }
        message
    }

    /// Runs one tool call, or answers it with the error `refused` without running it. Returns
    /// false when the run was aborted while it ran (its `tool_result` has then been emitted as
    /// aborted).
    async fn run_tool(&mut self, call: &ToolCall, refused: Option<String>) -> bool {
        let name = call.function.name.clone();
        let text = call.function.arguments.trim();
        let (arguments, invalid) = if let Some(reason) = refused {
            let arguments = serde_json::from_str::<Value>(text)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            (arguments, Some(reason))
        } else if text.is_empty() {
            (json!({}), None)
        } else {
            match serde_json::from_str::<Value>(text) {
                Ok(value @ Value::Object(_)) => (value, None),
                Ok(_) => (
                    json!({}),
                    Some("arguments must be a JSON object".to_owned()),
                ),
                Err(e) => (
                    json!({}),
                    Some(format!(
                        "Invalid JSON in arguments for tool \"{name}\": {e}"
                    )),
                ),
            }
        };
        self.emit(EventBody::ToolCall {
            tool_call_id: call.id.clone(),
            name: name.clone(),
            arguments: arguments.clone(),
            start_time: now_ms(),
            tool: tools::describe(&self.agent.confinement, &name),
        })
        .await;
        let started = Instant::now();
        if invalid.is_none() && !tools::exists(&self.agent.confinement, &name) {
            // Upstream's answer, with elapsedMs 0.
            let message = tools::ToolError::NotFound(name.clone()).to_string();
            self.emit_tool_result(call, Err(tools::Failure::new(message)), 0)
                .await;
            return true;
        }
        let outcome = match invalid {
            Some(message) => Err(tools::Failure::new(message)),
            None => match self.run_tool_body(&name, &arguments).await {
                Some(outcome) => outcome,
                None => {
                    self.emit_aborted_result(call, started.elapsed().as_millis() as u64)
                        .await;
                    return false;
                }
            },
        };
        self.emit_tool_result(call, outcome, started.elapsed().as_millis() as u64)
            .await;
        true
    }

    /// Runs a built-in tool under the run's token. `None` when the run was aborted before the
    /// tool finished (a tool that completed anyway reports what it did).
    async fn run_tool_body(
        &self,
        name: &str,
        arguments: &Value,
    ) -> Option<Result<Value, tools::Failure>> {
        let tool = tools::execute(
            &self.agent.workspace,
            &self.agent.confinement,
            name,
            arguments,
            &self.cancel,
        );
        tokio::pin!(tool);
        let outcome = tokio::select! {
            biased;
            outcome = &mut tool => outcome,
            () = self.cancel.cancelled() => {
                // The tool sees the same token: wait for it to stop, so that nothing it does
                // lands after the run has said it was aborted.
                tokio::time::timeout(TOOL_STOP_GRACE, &mut tool).await.ok()?
            }
        };
        match outcome {
            Err(e) if e.is_aborted() => None,
            other => Some(other.map_err(tools::Failure::from)),
        }
    }

    /// Expands the query's `@file:`/`@dir:` references on the blocking pool.
    async fn expand_references(&self, found: Vec<references::Reference>) -> String {
        let workspace = match &self.agent.workspace {
            Ok(workspace) => workspace.clone(),
            Err(e) => return format!("Error: Workspace unavailable: {e}"),
        };
        let cancel = self.cancel.clone();
        let expanded =
            tokio::task::spawn_blocking(move || references::expand(&workspace, &found, &cancel))
                .await;
        match expanded {
            Ok(Ok(text)) => text,
            // Aborted: the loop notices the token right after agent_run_start.
            Ok(Err(e)) => format!("Error: {e}"),
            Err(e) => format!("Error: the expansion failed: {e}"),
        }
    }

    async fn emit_tool_result(
        &mut self,
        call: &ToolCall,
        outcome: Result<Value, tools::Failure>,
        elapsed_ms: u64,
    ) {
        let (content, error) = match outcome {
            Ok(content) => (content, None),
            Err(failure) => (json!(failure.content()), Some(failure.message)),
        };
        self.emit(EventBody::ToolResult {
            tool_call_id: call.id.clone(),
            name: call.function.name.clone(),
            content,
            elapsed_ms,
            error,
        })
        .await;
    }

    async fn emit_aborted_result(&mut self, call: &ToolCall, elapsed_ms: u64) {
        self.emit(EventBody::ToolResult {
            tool_call_id: call.id.clone(),
            name: call.function.name.clone(),
            content: json!("Tool execution aborted"),
            elapsed_ms,
            error: Some("aborted".into()),
        })
        .await;
    }

    /// The closing sequence of an abort.
    async fn close_aborted(
        &mut self,
        partial: Option<Response>,
        unanswered: &[ToolCall],
    ) -> RunEnd {
        if let Some(mut partial) = partial {
            self.finish_streamed_thinking(&mut partial).await;
            if !partial.text.is_empty() {
                self.emit(assistant(
                    &partial.text,
                    "abort",
                    partial.message_id.clone(),
                ))
                .await;
            }
        }
        for call in unanswered {
            self.emit_aborted_result(call, 0).await;
        }
        let closing = match self.abort.reason() {
            AbortReason::Requested => "Request was aborted",
            AbortReason::ServerShutdown => {
                // A client that did not ask for the abort is told what stopped its run, in the
                // stream and in the answer a non-streaming caller gets.
                self.emit(EventBody::System {
                    level: SystemLevel::Warning,
                    message: "The server is shutting down: the run was aborted".into(),
                    details: Some(json!({"kind": "server_shutdown"})),
                })
                .await;
                "Request was aborted: the server is shutting down"
            }
        };
        let result = self
            .emit(assistant(closing, "abort", prefixed_id("msg_abort_", 8)))
            .await;
        RunEnd {
            result,
            status: RunStatus::Aborted,
        }
    }

    /// A failed model call: partial text kept, one error event, and a result
    /// message that is returned to a non-streaming caller but never enters the history.
    async fn close_failed(&mut self, partial: Response, failure: ModelFailure) -> RunEnd {
        if !partial.text.is_empty() {
            self.emit(assistant(
                &partial.text,
                "error",
                partial.message_id.clone(),
            ))
            .await;
        }
        let model = &self.agent.settings.model;
        let mut details = json!({
            "provider": model.provider,
            "model": model.id,
            "kind": failure.kind.as_str(),
            "attempts": failure.attempts,
        });
        if let Some(status) = failure.status {
            details["status"] = json!(status);
        }
        self.emit(EventBody::System {
            level: SystemLevel::Error,
            message: format!("LLM API error: {}", failure.message),
            details: Some(details),
        })
        .await;
        let result = Event::new(assistant(
            &format!(
                "Sorry, an error occurred while processing your request: {}",
                failure.message
            ),
            "error",
            prefixed_id("msg_", 8),
        ));
        RunEnd {
            result,
            status: RunStatus::Error,
        }
    }

    /// Sends one event to the supervisor, keeping it in memory when it is a stored type.
    async fn emit(&mut self, body: EventBody) -> Event {
        let event = Event::new(body);
        let json = event.to_json();
        if event.body.is_stored() {
            self.agent
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(event.clone());
        }
        // A closed outbox means the supervisor is gone; the serve loop notices and exits.
        let _ = self.agent.outbox.send(FromWorker::Event { json }).await;
        event
    }
}

fn assistant(content: &str, finish_reason: &str, message_id: String) -> EventBody {
    EventBody::AssistantMessage {
        content: content.to_owned(),
        raw_content: None,
        tool_calls: None,
        finish_reason: Some(finish_reason.to_owned()),
        message_id: Some(message_id),
        ttft_ms: None,
        ttlt_ms: None,
    }
}

fn internal_failure(message: &str) -> ModelFailure {
    ModelFailure {
        kind: ModelErrorKind::Internal,
        status: None,
        message: message.to_owned(),
        attempts: 0,
        partial: false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use shared::protocol::{AgentSettings, ContextSettings, ModelRef, Usage};
    use tokio::sync::mpsc;

    use super::*;
    use crate::agent::ModelRoutes;
    use crate::agent::workspace::Workspace;

    /// A worker agent on a temporary workspace whose gateway is the test itself. The outbox
    /// holds one message, so the run is never more than one event ahead of the test: what the
    /// test does on seeing an event happens before the run goes on.
    struct Harness {
        agent: Agent,
        outbox: mpsc::Receiver<FromWorker>,
        tmp: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, outbox) = mpsc::channel(1);
        let agent = Agent {
            session_id: "s".into(),
            settings: Arc::new(AgentSettings {
                agent_name: "test".into(),
                model: ModelRef {
                    provider: "fake".into(),
                    id: "fake".into(),
                    display_name: None,
                },
                instructions: None,
                max_iterations: 10,
                temperature: 0.7,
                streaming_tool_call_events: true,
                context: ContextSettings::default(),
            }),
            history: Arc::new(Mutex::new(Vec::new())),
            turns: Arc::default(),
            tool_definitions: tools::definitions_json(&crate::jail::Confinement::unconfined()),
            outbox: tx,
            models: ModelRoutes::default(),
            workspace: Ok(Arc::new(Workspace::open(tmp.path()).unwrap())),
            confinement: Arc::new(crate::jail::Confinement::unconfined()),
        };
        Harness { agent, outbox, tmp }
    }

    /// What the scripted gateway sends for one request.
    enum Reply {
        Delta(Delta),
        Done(&'static str),
        Fail(ModelErrorKind),
    }

    fn call(index: u32, name: &str, arguments: &str) -> Reply {
        Reply::Delta(Delta::ToolCall {
            index,
            id: Some(format!("c{index}")),
            name: Some(name.into()),
            arguments: arguments.into(),
        })
    }

    struct Outcome {
        events: Vec<Value>,
        /// The `params` of every model request, in order.
        requests: Vec<Value>,
    }

    impl Outcome {
        fn of_type(&self, ty: &str) -> Vec<&Value> {
            self.events.iter().filter(|e| e["type"] == ty).collect()
        }

        fn types(&self) -> Vec<&str> {
            self.events
                .iter()
                .map(|e| e["type"].as_str().unwrap())
                .filter(|t| !t.starts_with("assistant_streaming"))
                .collect()
        }
    }

    /// Runs `input` to its `agent_run_end`, answering the n-th model request with
    /// `script(n)`, and calling `on_event` (with the run's token) for every event as it comes.
    async fn drive(
        h: &mut Harness,
        input: &str,
        stream: bool,
        script: impl Fn(usize) -> Vec<Reply>,
        on_event: impl Fn(&Value, &Abort),
    ) -> Outcome {
        let abort = Abort::default();
        let query = Query {
            run_id: "r".into(),
            input: json!(input).to_string(),
            stream,
        };
        let run = tokio::spawn(execute(h.agent.clone(), query, abort.clone()));
        let mut outcome = Outcome {
            events: Vec::new(),
            requests: Vec::new(),
        };
        while let Some(message) = h.outbox.recv().await {
            match message {
                FromWorker::Event { json } => {
                    let event: Value = serde_json::from_str(&json).unwrap();
                    on_event(&event, &abort);
                    let end = event["type"] == "agent_run_end";
                    outcome.events.push(event);
                    if end {
                        break;
                    }
                }
                FromWorker::ModelRequest(request) => {
                    let n = outcome.requests.len();
                    outcome
                        .requests
                        .push(serde_json::from_str(&request.params).unwrap());
                    let id = request.id;
                    for reply in script(n) {
                        h.agent.models.deliver(match reply {
                            Reply::Delta(delta) => ModelReply::Delta {
                                id: id.clone(),
                                delta,
                            },
                            Reply::Done(finish_reason) => ModelReply::Done {
                                id: id.clone(),
                                finish_reason: finish_reason.into(),
                                usage: Usage::default(),
                            },
                            Reply::Fail(kind) => ModelReply::Error {
                                id: id.clone(),
                                error: ModelFailure {
                                    kind,
                                    status: Some(400),
                                    message: "scripted".into(),
                                    attempts: 1,
                                    partial: false,
                                },
                            },
                        });
                    }
                }
                FromWorker::RunResult { .. } | FromWorker::ModelCancel { .. } => {}
                // Handshake, jail and probe messages never come from a run.
                other => panic!("not a run's message: {other:?}"),
            }
        }
        run.await.unwrap();
        outcome
    }

    fn text_answer(text: &str) -> Vec<Reply> {
        vec![Reply::Delta(Delta::Text(text.into())), Reply::Done("stop")]
    }

    #[tokio::test]
    async fn calls_beyond_the_cap_are_paired_and_refused() {
        let mut h = harness();
        std::fs::write(h.tmp.path().join("a.txt"), "hello").unwrap();
        let out = drive(
            &mut h,
            "read it many times",
            false,
            |n| match n {
                0 => (0..33)
                    .map(|i| call(i, "read_file", r#"{"path":"a.txt"}"#))
                    .chain([Reply::Done("tool_calls")])
                    .collect(),
                _ => text_answer("done"),
            },
            |_, _| {},
        )
        .await;
        let calls = out.of_type("tool_call");
        let results = out.of_type("tool_result");
        assert_eq!((calls.len(), results.len()), (33, 33));
        for (i, (call, result)) in calls.iter().zip(&results).enumerate() {
            assert_eq!(call["toolCallId"], format!("c{i}"));
            assert_eq!(result["toolCallId"], format!("c{i}"));
        }
        assert_eq!(
            results[0]["content"],
            json!([{"type": "text", "text": "hello"}])
        );
        assert!(results[31].get("error").is_none());
        assert_eq!(
            results[32]["error"],
            "too many tool calls in one response (limit 32)"
        );
        assert_eq!(calls[32]["arguments"], json!({"path": "a.txt"}));
        let second = &out.requests[1]["messages"];
        let tool_messages = second
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "tool")
            .count();
        assert_eq!(tool_messages, 33);
        assert_eq!(out.events.last().unwrap()["status"], "idle");
    }

    #[tokio::test]
    async fn abort_during_the_tools_answers_every_call() {
        let mut h = harness();
        let out = drive(
            &mut h,
            "list twice",
            true,
            |n| match n {
                0 => vec![
                    call(0, "list_directory", "{}"),
                    call(1, "list_directory", "{}"),
                    Reply::Done("tool_calls"),
                ],
                _ => text_answer("unreachable"),
            },
            |event, abort| {
                if event["type"] == "tool_call" && event["toolCallId"] == "c0" {
                    abort.abort(AbortReason::Requested);
                }
            },
        )
        .await;
        assert_eq!(
            out.types(),
            [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "tool_call",
                "tool_result",
                "tool_result",
                "assistant_message",
                "agent_run_end"
            ]
        );
        let results = out.of_type("tool_result");
        assert_eq!(results[0]["toolCallId"], "c0");
        assert_eq!(results[1]["toolCallId"], "c1");
        assert_eq!(results[1]["content"], "Tool execution aborted");
        assert_eq!(results[1]["error"], "aborted");
        let closing = out.of_type("assistant_message")[1];
        assert_eq!(closing["content"], "Request was aborted");
        assert_eq!(closing["finishReason"], "abort");
        assert_eq!(out.events.last().unwrap()["status"], "aborted");
        assert_eq!(out.requests.len(), 1);
    }

    #[tokio::test]
    async fn a_shutdown_abort_says_the_server_is_shutting_down() {
        let mut h = harness();
        let out = drive(
            &mut h,
            "list",
            true,
            |n| match n {
                0 => vec![call(0, "list_directory", "{}"), Reply::Done("tool_calls")],
                _ => text_answer("unreachable"),
            },
            |event, abort| {
                if event["type"] == "tool_call" {
                    abort.abort(AbortReason::ServerShutdown);
                    // A later reason does not replace the first.
                    abort.abort(AbortReason::Requested);
                }
            },
        )
        .await;
        let system = out.of_type("system");
        assert_eq!(system.len(), 1, "{:?}", out.events);
        assert_eq!(system[0]["level"], "warning");
        assert_eq!(
            system[0]["message"],
            "The server is shutting down: the run was aborted"
        );
        assert_eq!(system[0]["details"]["kind"], "server_shutdown");
        let closing = *out.of_type("assistant_message").last().unwrap();
        assert_eq!(
            closing["content"],
            "Request was aborted: the server is shutting down"
        );
        assert_eq!(out.events.last().unwrap()["status"], "aborted");
        assert_eq!(
            &out.types()[out.types().len() - 3..],
            ["system", "assistant_message", "agent_run_end"]
        );
    }

    #[tokio::test]
    async fn reasoning_continuation_is_stored_and_sent_back() {
        let mut h = harness();
        let out = drive(
            &mut h,
            "think, then list",
            true,
            |n| match n {
                0 => vec![
                    Reply::Delta(Delta::Reasoning("think".into())),
                    Reply::Delta(Delta::ReasoningSignature("sig".into())),
                    Reply::Delta(Delta::RedactedReasoning("opaque".into())),
                    call(0, "list_directory", "{}"),
                    Reply::Done("tool_calls"),
                ],
                _ => text_answer("ok"),
            },
            |_, _| {},
        )
        .await;
        let thinking = out.of_type("assistant_thinking_message")[0];
        assert_eq!(thinking["content"], "think");
        assert_eq!(thinking["signature"], "sig");
        assert_eq!(thinking["redactedData"], json!(["opaque"]));
        let messages = out.requests[1]["messages"].as_array().unwrap();
        let assistant = messages.iter().find(|m| m["role"] == "assistant").unwrap();
        assert_eq!(assistant["reasoning_content"], "think");
        assert_eq!(assistant["reasoning_signature"], "sig");
        assert_eq!(assistant["redacted_reasoning"], json!(["opaque"]));
        assert_eq!(assistant["tool_calls"][0]["id"], "c0");
    }

    #[tokio::test]
    async fn a_context_length_error_is_retried_once() {
        let mut h = harness();
        let out = drive(
            &mut h,
            "hi",
            false,
            |n| match n {
                0 => vec![Reply::Fail(ModelErrorKind::ContextLength)],
                _ => text_answer("ok"),
            },
            |_, _| {},
        )
        .await;
        assert_eq!(out.requests.len(), 2);
        assert!(out.of_type("system").is_empty());
        assert_eq!(out.of_type("assistant_message")[0]["content"], "ok");

        let out = drive(
            &mut h,
            "again",
            false,
            |_| vec![Reply::Fail(ModelErrorKind::ContextLength)],
            |_, _| {},
        )
        .await;
        assert_eq!(out.requests.len(), 2, "only one retry");
        assert_eq!(
            out.of_type("system")[0]["message"],
            "LLM API error: scripted"
        );
        assert_eq!(out.events.last().unwrap()["status"], "error");
    }

    #[tokio::test]
    async fn file_references_are_expanded_before_the_run_starts() {
        let mut h = harness();
        std::fs::write(h.tmp.path().join("a.txt"), "alpha").unwrap();
        let out = drive(
            &mut h,
            "see @file:a.txt",
            true,
            |_| text_answer("ok"),
            |_, _| {},
        )
        .await;
        assert_eq!(
            out.types()[..3],
            ["user_message", "environment_input", "agent_run_start"]
        );
        let env = out.of_type("environment_input")[0];
        assert_eq!(env["content"], "<file path=\"a.txt\">\nalpha\n</file>");
        assert_eq!(env["metadata"], json!({"type": "codebase"}));
        let start = out.of_type("agent_run_start")[0];
        assert_eq!(
            start["runOptions"]["environmentInput"]["content"],
            env["content"]
        );
        let messages = out.requests[0]["messages"].as_array().unwrap();
        assert_eq!(messages[1]["content"], "see @file:a.txt");
        assert_eq!(
            messages[2]["content"],
            "[Environment: Expanded context from contextual references] <file path=\"a.txt\">\nalpha\n</file>"
        );
    }
}
