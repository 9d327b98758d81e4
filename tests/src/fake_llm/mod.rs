//! A scripted fake LLM server: it speaks the real OpenAI chat-completions and Anthropic
//! Messages wire formats, streaming and not, so end-to-end tests exercise the supervisor's real
//! HTTP path: SSE parsing, retries, timeouts, cancellation, the Anthropic mapping and the
//! credential headers.
//!
//! Behaviour per request, first match wins: the `x-fake-script` header, a `[[fake:<name>]]`
//! marker in the current query, a directive in the last message, else `echo: <text>`. It
//! records every request with its headers **unredacted** (tests check that the key arrives here
//! and nowhere else), counts streams and client disconnects, and doubles as an AGIO sink. There
//! is no randomness: ids derive from the request's step and sequence.
//!
//! A module per concern: `state` records requests and counts streams, `conversation` reduces a
//! request to what the behaviour depends on, `plan` is what to answer, chosen by `script` or
//! `directives`; `wire` renders it as `openai` or `anthropic`; `serve` routes and streams.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod anthropic;
mod conversation;
mod directives;
mod openai;
mod plan;
mod script;
mod serve;
mod state;
mod wire;

pub use serve::{no_delay, router};
pub use state::Shared;

/// A running fake LLM on `127.0.0.1:<port>`; dropping it stops the server.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeLlm {
    /// Starts an instance with no scripts.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::from_env());
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(no_delay(listener), app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// Starts an instance with `{"scripts": {...}}` loaded.
    pub async fn start_with_scripts(document: &Value) -> Result<Self> {
        let fake = Self::start().await?;
        fake.shared.load_scripts(document)?;
        Ok(fake)
    }

    /// `http://127.0.0.1:<port>` (the Anthropic base URL: the adapter adds `/v1/messages`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/v1` (an OpenAI-compatible base URL).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The AGIO sink's URL.
    pub fn agio_url(&self) -> String {
        format!("http://{}/__agio", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Recorded requests, as `GET /__admin/requests` gives them.
    pub fn requests(&self) -> Vec<Value> {
        match self.shared.requests_json() {
            Value::Array(requests) => requests,
            _ => Vec::new(),
        }
    }

    /// Recorded model requests only (chat completions and messages).
    pub fn model_requests(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/chat/completions") || p.ends_with("/messages"))
            })
            .collect()
    }

    /// Stream counters, as `GET /__admin/streams` gives them.
    pub fn streams(&self) -> Value {
        self.shared.streams_json()
    }

    /// The AGIO batch bodies received, oldest first.
    pub fn agio_batches(&self) -> Vec<Value> {
        self.shared.lock().agio.clone()
    }

    /// Loads `{"scripts": {...}}`.
    pub fn load_scripts(&self, document: &Value) -> Result<()> {
        self.shared.load_scripts(document).map(|_| ())
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}
