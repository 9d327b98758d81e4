//! The model gateway: the only way a worker reaches a model (ARCHITECTURE decision 3).
//!
//! A worker names a model as `{provider, id}`; the gateway checks that pair against the models
//! this server is configured with (the [`Catalogue`]), adds whatever credentials the provider
//! needs (the worker never sees them), makes the call, and streams normalised deltas back over
//! the worker's channel. Each request gets exactly one terminal reply, `Done` or `Error`.
//!
//! - `http`: attempts, retries, timeouts, cancellation, error classification;
//! - `openai`, `anthropic`: the two wire dialects; `sse`: event-stream framing;
//! - `echo`: the offline model; `scrub`: secrets out of error text.

mod anthropic;
mod echo;
mod http;
mod openai;
pub(crate) mod scrub;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use shared::ids::SessionId;
use shared::protocol::{
    Delta, ModelErrorKind, ModelFailure, ModelRef, ModelReply, ModelRequest, ToWorker, Usage,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agio::Agio;
use crate::config::Config;
use crate::config::catalogue::{Adapter, Catalogue};

/// A worker's request parameters, top level only: each value is its JSON text, validated but not
/// parsed.
pub(crate) type RawParams<'a> = std::collections::HashMap<String, &'a serde_json::value::RawValue>;

/// Request fields a worker may never set: they would let it choose where the supervisor sends
/// its keys (agent.md §4.1).
const FORBIDDEN_PARAMS: [&str; 6] = [
    "baseURL", "baseUrl", "apiKey", "api_key", "headers", "params",
];

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("could not build the HTTP client for model calls: {0}")]
    Client(#[source] reqwest::Error),
}

pub struct Gateway {
    catalogue: Catalogue,
    /// The tenants' own provider keys, used for their sessions' calls instead of the server's.
    tenants: crate::config::tenants::Tenants,
    http: reqwest::Client,
    agio: Option<Arc<Agio>>,
}

/// Sends the replies of one request to its worker.
pub(crate) struct Replies {
    id: String,
    outbox: mpsc::Sender<ToWorker>,
}

impl Replies {
    /// `false` once the worker is gone, so producers can stop early.
    pub(crate) async fn send(&self, reply: ModelReply) -> bool {
        self.outbox.send(ToWorker::Model(reply)).await.is_ok()
    }

    pub(crate) fn id(&self) -> String {
        self.id.clone()
    }
}

/// A response that completed.
#[derive(Debug)]
pub(crate) struct Finished {
    pub finish_reason: String,
    /// `None` until the call fills in an estimate.
    pub usage: Option<Usage>,
    /// Time to the first delta, and the whole call, retries included.
    pub ttft: Option<Duration>,
    pub total: Duration,
}

/// How a call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done(Finished),
    Failed(ModelFailure),
}

/// Counts a finished call in the server's metrics.
fn record(outcome: &Outcome) {
    let metrics = &crate::metrics::METRICS;
    metrics.model_requests.inc();
    match outcome {
        Outcome::Done(done) => {
            metrics.model_request_seconds.observe(done.total);
            if let Some(usage) = &done.usage {
                metrics.model_prompt_tokens.add(usage.prompt_tokens);
                metrics.model_completion_tokens.add(usage.completion_tokens);
            }
        }
        Outcome::Failed(_) => metrics.model_failures.inc(),
    }
}

fn failed(kind: ModelErrorKind, status: Option<u16>, message: impl Into<String>) -> Outcome {
    Outcome::Failed(ModelFailure {
        kind,
        status,
        message: message.into(),
        attempts: 0,
        partial: false,
    })
}

impl Gateway {
    /// # Errors
    /// The HTTP client could not be built (no TLS provider installed, no trust store).
    pub fn new(config: &Config, agio: Option<Arc<Agio>>) -> Result<Self, GatewayError> {
        let connect = config.catalogue.default_model().settings.timeouts.connect;
        let http = reqwest::Client::builder()
            .connect_timeout(connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("agent-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(GatewayError::Client)?;
        Ok(Self {
            catalogue: config.catalogue.clone(),
            tenants: config.tenant_limits.clone(),
            http,
            agio,
        })
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// Serves one model request of `session_id`'s worker in its own task; cancelling `cancel`
    /// (the worker's `ModelCancel`, or the worker going away) stops it and drops the provider
    /// connection. The call uses `tenant`'s own key for the provider if it has one, and its
    /// tokens count against `tenant`'s daily budget.
    pub fn start(
        self: &Arc<Self>,
        session_id: &SessionId,
        tenant: &str,
        request: ModelRequest,
        outbox: mpsc::Sender<ToWorker>,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        let gateway = self.clone();
        let session_id = session_id.clone();
        let tenant = tenant.to_owned();
        let span = tracing::info_span!(
            "model_call",
            session_id = %session_id,
            tenant = %tenant,
            request_id = %request.id,
            run_id = %request.run_id,
            provider = %request.model.provider,
            model = %request.model.id,
        );
        tokio::spawn(
            async move {
                if let Some(agio) = &gateway.agio {
                    agio.model_request(&session_id, &request.params);
                }
                let replies = Replies {
                    id: request.id.clone(),
                    outbox,
                };
                let outcome = gateway
                    .call(&request, Some(&tenant), &replies, &cancel)
                    .await;
                record(&outcome);
                if let Outcome::Done(Finished {
                    usage: Some(usage), ..
                }) = &outcome
                {
                    crate::token_ledger::TOKENS.add(
                        &tenant,
                        usage.total_tokens,
                        shared::ids::now_ms(),
                    );
                }
                if let (Some(agio), Outcome::Done(done)) = (&gateway.agio, &outcome) {
                    let usage = done.usage.as_ref();
                    agio.model_finished(
                        &session_id,
                        &request.model.id,
                        usage,
                        done.ttft,
                        done.total,
                    );
                }
                finish(&replies, outcome).await;
            }
            .instrument(span),
        )
    }

    /// One call, run to its outcome; deltas and progress go to `replies` on the way. With a
    /// `tenant` that has its own key for the model's provider, that key is sent.
    async fn call(
        &self,
        request: &ModelRequest,
        tenant: Option<&str>,
        replies: &Replies,
        cancel: &CancellationToken,
    ) -> Outcome {
        let Some(entry) = self
            .catalogue
            .find(&request.model.provider, &request.model.id)
        else {
            return failed(
                ModelErrorKind::UnknownModel,
                None,
                format!(
                    "model {}/{} is not configured on this server",
                    request.model.provider, request.model.id
                ),
            );
        };
        // Only the top level is parsed here: the messages, which grow with the conversation,
        // are checked for being valid JSON but stay raw text (a tree of them cost most of the
        // supervisor's work per call). Keys are decoded, so an escaped forbidden key is caught.
        let Ok(params) = serde_json::from_str::<RawParams<'_>>(&request.params) else {
            return failed(
                ModelErrorKind::BadRequest,
                None,
                "the request parameters must be a JSON object",
            );
        };
        if !params
            .get("messages")
            .is_some_and(|m| m.get().starts_with('['))
        {
            return failed(
                ModelErrorKind::BadRequest,
                None,
                "messages must be an array",
            );
        }
        if let Some(field) = FORBIDDEN_PARAMS.iter().find(|f| params.contains_key(**f)) {
            tracing::warn!(
                field,
                "a worker tried to set a supervisor-only request field"
            );
            return failed(
                ModelErrorKind::BadRequest,
                None,
                format!("the request field {field:?} is not allowed"),
            );
        }
        if let Some(problem) = &entry.unusable {
            return failed(ModelErrorKind::Config, None, problem.clone());
        }
        let tenant_key = tenant.and_then(|t| self.tenants.key(t, &entry.provider));
        let keyed;
        let entry: &crate::config::catalogue::ModelEntry = match tenant_key {
            Some(key) => {
                keyed = crate::config::catalogue::ModelEntry {
                    api_key: Some(key.clone()),
                    ..(**entry).clone()
                };
                &keyed
            }
            None => entry,
        };
        match entry.adapter {
            Adapter::Echo => echo::respond(request, &params, replies, cancel).await,
            Adapter::OpenAi { .. } | Adapter::Anthropic => {
                // A provider's body is rewritten message by message: that needs the tree.
                let params: Map<String, Value> = match serde_json::from_str(&request.params) {
                    Ok(Value::Object(params)) => params,
                    _ => {
                        return failed(
                            ModelErrorKind::BadRequest,
                            None,
                            "the request parameters must be a JSON object",
                        );
                    }
                };
                http::HttpCall {
                    http: &self.http,
                    entry,
                    request,
                    params: &params,
                    replies,
                    cancel,
                }
                .run()
                .await
            }
        }
    }

    /// A whole answer from `model`, for the supervisor's own use (titles): the same path as a
    /// worker's call, collected into one text. Dropping the future drops the provider call.
    ///
    /// # Errors
    /// The call's failure, as a worker would have received it.
    pub async fn complete(&self, model: &ModelRef, params: Value) -> Result<String, ModelFailure> {
        let (outbox, mut inbox) = mpsc::channel(64);
        let request = ModelRequest {
            id: shared::ids::prefixed_id("mr_", 8),
            run_id: String::new(),
            model: model.clone(),
            stream: false,
            params: params.to_string(),
        };
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let call = async {
            let replies = Replies {
                id: request.id.clone(),
                outbox,
            };
            let outcome = self.call(&request, None, &replies, &cancel).await;
            finish(&replies, outcome).await;
        };
        let collect = async {
            let mut text = String::new();
            while let Some(ToWorker::Model(reply)) = inbox.recv().await {
                match reply {
                    ModelReply::Delta {
                        delta: Delta::Text(chunk),
                        ..
                    } => text.push_str(&chunk),
                    ModelReply::Done { .. } => return Ok(text),
                    ModelReply::Error { error, .. } => return Err(error),
                    _ => {}
                }
            }
            Err(ModelFailure {
                kind: ModelErrorKind::Internal,
                status: None,
                message: "the call ended without an answer".into(),
                attempts: 0,
                partial: false,
            })
        };
        let ((), result) = tokio::join!(call, collect);
        result
    }
}

/// The one terminal reply of a request.
async fn finish(replies: &Replies, outcome: Outcome) {
    let reply = match outcome {
        Outcome::Done(done) => ModelReply::Done {
            id: replies.id(),
            finish_reason: done.finish_reason,
            usage: done.usage.unwrap_or_default(),
        },
        Outcome::Failed(error) => {
            if error.kind != ModelErrorKind::Cancelled {
                tracing::warn!(kind = error.kind.as_str(), status = error.status, attempts = error.attempts, error = %error.message, "model call failed");
            }
            ModelReply::Error {
                id: replies.id(),
                error,
            }
        }
    };
    replies.send(reply).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one request of `params` (raw JSON text) through the offline model.
    async fn outcome_of(params: &str) -> Outcome {
        let config =
            crate::config::load_with_env(None, &Default::default(), |_| None).expect("config");
        let gateway = Gateway::new(&config, None).expect("gateway");
        let request = ModelRequest {
            id: "mr_1".into(),
            run_id: String::new(),
            model: config.catalogue.default_model().selector(),
            stream: false,
            params: params.to_owned(),
        };
        let (outbox, _inbox) = mpsc::channel(64);
        let replies = Replies {
            id: request.id.clone(),
            outbox,
        };
        gateway
            .call(&request, None, &replies, &CancellationToken::new())
            .await
    }

    fn refused(outcome: &Outcome) -> Option<&str> {
        match outcome {
            Outcome::Failed(f) if f.kind == ModelErrorKind::BadRequest => Some(&f.message),
            _ => None,
        }
    }

    /// The top level is all the gateway parses now: a forbidden field is still caught when
    /// its name is escaped, and malformed JSON anywhere, however deep, is still refused.
    #[tokio::test]
    async fn a_hostile_request_is_refused_without_a_full_parse() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ok = outcome_of(r#"{"messages":[{"role":"user","content":"hi"}]}"#).await;
        assert!(matches!(ok, Outcome::Done(_)), "control: {ok:?}");
        let escaped = outcome_of(
            r#"{"messages":[{"role":"user","content":"hi"}],"base\u0055RL":"http://evil"}"#,
        )
        .await;
        assert!(
            refused(&escaped).is_some_and(|m| m.contains("baseURL")),
            "{escaped:?}"
        );
        for bad in [
            r#"{"messages":[{"role":"user","content":"hi"},{"role":]}"#,
            r#"{"messages":{"role":"user"}}"#,
            r#"{"messages":"[]"}"#,
            r#"[{"messages":[]}]"#,
            r#"{"messages":[]} trailing"#,
        ] {
            let outcome = outcome_of(bad).await;
            assert!(refused(&outcome).is_some(), "{bad}: {outcome:?}");
        }
    }
}
