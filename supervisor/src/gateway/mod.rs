//! The model gateway: the only way a worker reaches a model (ARCHITECTURE decision 3).
//!
//! A worker names a model as `{provider, id}`; the gateway checks that pair against the models
//! this server is configured with, adds whatever credentials the provider needs (the worker
//! never sees them), makes the call, and streams normalised deltas back over the worker's
//! channel. Each request gets exactly one terminal reply, `Done` or `Error`.

mod echo;

use std::sync::Arc;

use shared::protocol::{
    ModelErrorKind, ModelFailure, ModelRef, ModelReply, ModelRequest, ToWorker,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub struct Gateway {
    /// Every `{provider, id}` a worker may ask for.
    allowed: Vec<ModelRef>,
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

    pub(crate) async fn fail(
        &self,
        kind: ModelErrorKind,
        status: Option<u16>,
        message: impl Into<String>,
    ) {
        let error = ModelFailure {
            kind,
            status,
            message: message.into(),
            attempts: 1,
            partial: false,
        };
        self.send(ModelReply::Error {
            id: self.id(),
            error,
        })
        .await;
    }
}

impl Gateway {
    pub fn new(config: &Config) -> Self {
        Self {
            allowed: vec![config.default_model()],
        }
    }

    fn is_allowed(&self, model: &ModelRef) -> bool {
        self.allowed
            .iter()
            .any(|m| m.provider == model.provider && m.id == model.id)
    }

    /// Serves one model request in its own task; cancelling `cancel` stops it.
    pub fn start(
        self: &Arc<Self>,
        request: ModelRequest,
        outbox: mpsc::Sender<ToWorker>,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        let gateway = self.clone();
        let span = tracing::info_span!("model_call", request_id = %request.id, run_id = %request.run_id, provider = %request.model.provider);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let replies = Replies {
                    id: request.id.clone(),
                    outbox,
                };
                if !gateway.is_allowed(&request.model) {
                    let message = format!(
                        "model {}/{} is not configured on this server",
                        request.model.provider, request.model.id
                    );
                    replies
                        .fail(ModelErrorKind::UnknownModel, None, message)
                        .await;
                    return;
                }
                match request.model.provider.as_str() {
                    "echo" => echo::respond(&request, &replies, &cancel).await,
                    other => {
                        let message =
                            format!("provider {other:?} is not supported by this server yet");
                        replies.fail(ModelErrorKind::Config, None, message).await;
                    }
                }
            },
            span,
        ))
    }
}
