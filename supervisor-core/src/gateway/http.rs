//! One model call over HTTP (agent.md §4.11): attempts with backoff, the three timeouts,
//! cancellation that drops the connection at once, error classification (§4.5), and the stream
//! loop that forwards each provider's deltas as they arrive.
//!
//! A retry happens only before the first delta was forwarded: after that the worker has shown
//! text to clients, and repeating the call would show it twice.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use serde_json::{Map, Value};
use shared::ids::now_ms;
use shared::protocol::{Delta, ModelErrorKind, ModelFailure, ModelReply, ModelRequest, Usage};
use tokio_util::sync::CancellationToken;

use super::anthropic::{self, AnthropicDialect};
use super::openai::{self, OpenAiDialect};
use super::scrub::scrub;
use super::sse::SseParser;
use super::{Finished, Outcome, Replies};
use crate::config::catalogue::{Adapter, ModelEntry};

/// Retry-After values above this fail at once instead of waiting (agent.md §4.11).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Bytes of an error body kept for the message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Largest non-streaming response accepted.
const WHOLE_BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Bytes of an unparsable error body quoted in the message.
const QUOTED_BODY: usize = 300;

/// What a provider's response said so far, normalised.
#[derive(Debug, Default)]
pub(super) struct Output {
    /// Deltas not yet forwarded, in order.
    pub deltas: Vec<Delta>,
    pub finish_reason: Option<String>,
    /// The last usage the provider reported.
    pub usage: Option<Usage>,
    /// The provider's own end marker (`[DONE]`, `message_stop`) was seen.
    pub ended: bool,
    /// A failure reported inside the response body.
    pub failure: Option<(ModelErrorKind, String)>,
}

/// A provider's response format.
pub(super) trait Dialect: Send {
    /// One server-sent event of a streaming response.
    fn event(&mut self, event: super::sse::SseEvent, out: &mut Output);
    /// The stream ended; deliver whatever is still held back.
    fn end(&mut self, out: &mut Output);
    /// A whole non-streaming response.
    fn whole(&mut self, body: Value, out: &mut Output);
}

/// A tool-call id for servers that send none: `call_<ms>_<random>` (agent.md §4.2).
pub(super) fn new_call_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}_{}", now_ms(), &random[..8])
}

/// Why a request could not be built: the model's configuration is at fault, not the provider.
#[derive(Debug, thiserror::Error)]
pub(super) enum BuildError {
    #[error("model {0} has no base URL")]
    NoBaseUrl(String),
    #[error("bad base URL: {0}")]
    BadBase(#[source] <reqwest::Url as std::str::FromStr>::Err),
    #[error("the base URL cannot take a path")]
    CannotTakePath,
    #[error("could not encode: {0}")]
    Encode(serde_json::Error),
}

/// A key as a header value marked sensitive, so that no debug output of the request shows it.
/// `None` for a key that cannot be a header value (the call then goes out without it and the
/// provider answers 401, which says what is wrong without echoing anything).
pub(super) fn secret_header(key: &crate::config::Secret) -> Option<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(key.expose()).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A uniformly distributed number in [0, 1).
fn random_unit() -> f64 {
    // The low 53 bits of a v4 UUID are all random (its fixed version and variant bits are
    // higher up).
    let bits = uuid::Uuid::new_v4().as_u128() as u64 & ((1u64 << 53) - 1);
    bits as f64 / (1u64 << 53) as f64
}

/// `min(8 s, base · 2^(attempt−1))` with ±25 % jitter; `attempt` is the one that failed.
pub(super) fn backoff(base: Duration, attempt: u32) -> Duration {
    let exponential = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exponential
        .min(MAX_BACKOFF)
        .mul_f64(0.75 + random_unit() * 0.5)
}

/// `retry-after-ms`, else `Retry-After` in seconds or as an HTTP date.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let seconds = |value: f64| {
        (value.is_finite() && value >= 0.0).then(|| Duration::from_secs_f64(value.min(1e9)))
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return seconds(ms / 1000.0);
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Why one attempt failed.
#[derive(Debug)]
pub(super) struct AttemptError {
    kind: ModelErrorKind,
    status: Option<u16>,
    message: String,
    retry_after: Option<Duration>,
    /// `x-should-retry` (an OpenAI SDK convention) overrides the status rule.
    should_retry: Option<bool>,
}

impl AttemptError {
    fn new(kind: ModelErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
            should_retry: None,
        }
    }

    fn retryable(&self) -> bool {
        if self.kind == ModelErrorKind::Cancelled {
            return false;
        }
        if let Some(decided) = self.should_retry {
            return decided;
        }
        match self.kind {
            ModelErrorKind::Network
            | ModelErrorKind::Timeout
            | ModelErrorKind::RateLimited
            | ModelErrorKind::Overloaded
            | ModelErrorKind::StreamInterrupted
            | ModelErrorKind::Protocol => true,
            ModelErrorKind::Server => {
                matches!(self.status, None | Some(408 | 409 | 500 | 502 | 503 | 504))
            }
            _ => false,
        }
    }

    fn into_failure(self, attempts: u32, partial: bool) -> ModelFailure {
        ModelFailure {
            kind: self.kind,
            status: self.status,
            message: self.message,
            attempts,
            partial,
        }
    }
}

/// The failure an HTTP error response stands for (agent.md §4.5). Both OpenAI-style
/// `{"error":{"message","code"}}` and Anthropic-style `{"type":"error","error":{"type","message"}}`
/// bodies are read.
pub(super) fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> AttemptError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let error = json.as_ref().and_then(|j| j.get("error"));
    let field = |key: &str| {
        error
            .and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message = field("message")
        .or_else(|| error.and_then(Value::as_str).map(str::to_owned))
        .or_else(|| {
            json.as_ref()
                .and_then(|j| j.get("message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| {
            let end = body.len().min(QUOTED_BODY);
            let quoted = String::from_utf8_lossy(&body[..end]);
            format!("HTTP {}: {}", status.as_u16(), quoted.trim())
        });
    let code = field("code").unwrap_or_default();
    let kind_name = field("type").unwrap_or_default();
    let lower = message.to_ascii_lowercase();
    let kind = match status.as_u16() {
        _ if kind_name == "overloaded_error" => ModelErrorKind::Overloaded,
        429 => ModelErrorKind::RateLimited,
        529 => ModelErrorKind::Overloaded,
        401 => ModelErrorKind::Auth,
        403 => ModelErrorKind::Permission,
        404 => ModelErrorKind::NotFound,
        400 | 413 | 422
            if code == "context_length_exceeded"
                || lower.contains("prompt is too long")
                || lower.contains("maximum context length")
                || lower.contains("context length") =>
        {
            ModelErrorKind::ContextLength
        }
        400 | 422 if code == "content_filter" || code == "content_policy_violation" => {
            ModelErrorKind::ContentFilter
        }
        500..=599 | 408 | 409 => ModelErrorKind::Server,
        _ => ModelErrorKind::BadRequest,
    };
    let should_retry = headers
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| match v.trim() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
    AttemptError {
        kind,
        status: Some(status.as_u16()),
        message,
        retry_after: retry_after(headers),
        should_retry,
    }
}

/// A transport error, without the URL (the worker and clients have no business with it) but
/// with its cause chain, which says what actually went wrong ("Connection refused").
fn transport(error: &reqwest::Error, forwarded: bool) -> AttemptError {
    let mut message = if error.is_connect() {
        "could not connect to the provider".to_owned()
    } else if error.is_body() || error.is_decode() {
        "the connection to the provider broke".to_owned()
    } else {
        "the request to the provider failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    let mut last = String::new();
    while let Some(cause) = source {
        let text = cause.to_string();
        if text != last {
            message.push_str(": ");
            message.push_str(&text);
            last = text;
        }
        source = cause.source();
    }
    let kind = if forwarded {
        ModelErrorKind::StreamInterrupted
    } else if error.is_timeout() {
        ModelErrorKind::Timeout
    } else {
        ModelErrorKind::Network
    };
    AttemptError::new(kind, message)
}

fn cancelled() -> AttemptError {
    AttemptError::new(ModelErrorKind::Cancelled, "cancelled")
}

/// One call of an HTTP model on behalf of `request`.
pub(super) struct HttpCall<'a> {
    pub http: &'a reqwest::Client,
    pub entry: &'a ModelEntry,
    pub request: &'a ModelRequest,
    pub params: &'a Map<String, Value>,
    pub replies: &'a Replies,
    pub cancel: &'a CancellationToken,
}

/// Progress of a call across its attempts.
#[derive(Default)]
struct Progress {
    forwarded: u64,
    streamed_chars: u64,
    first_delta: Option<Instant>,
}

impl HttpCall<'_> {
    fn key(&self) -> Option<&str> {
        self.entry.api_key.as_ref().map(|k| k.expose())
    }

    /// Runs the call to its end: a finished response or the failure to report.
    pub(super) async fn run(&self) -> Outcome {
        let started = Instant::now();
        let stream = self.request.stream && self.entry.settings.streaming;
        let (url, body) = match self.prepare(stream) {
            Ok(prepared) => prepared,
            Err(e) => {
                return Outcome::Failed(failure(ModelErrorKind::Config, e.to_string(), 0));
            }
        };
        let settings = &self.entry.settings;
        let max_attempts = settings.max_attempts;
        let mut progress = Progress::default();
        let mut attempt = 1;
        loop {
            let error = match self
                .attempt(attempt, &url, &body, stream, &mut progress)
                .await
            {
                Ok(mut done) => {
                    done.ttft = progress.first_delta.map(|t| t - started);
                    done.total = started.elapsed();
                    if done.usage.is_none() {
                        done.usage = Some(estimate(body.len(), progress.streamed_chars));
                    }
                    return Outcome::Done(done);
                }
                Err(mut error) => {
                    error.message = scrub(&error.message, self.key());
                    error
                }
            };
            let partial = progress.forwarded > 0;
            tracing::warn!(
                provider = %self.entry.provider,
                model = %self.entry.id,
                attempt,
                kind = error.kind.as_str(),
                status = error.status,
                error = %error.message,
                "model call attempt failed"
            );
            if partial || attempt >= max_attempts || !error.retryable() {
                return Outcome::Failed(error.into_failure(attempt, partial));
            }
            if let Some(wait) = error.retry_after.filter(|w| *w > MAX_RETRY_AFTER) {
                let mut error = error;
                error.message = format!(
                    "{} (the provider asks to retry after {} s; not waiting that long)",
                    error.message,
                    wait.as_secs()
                );
                return Outcome::Failed(error.into_failure(attempt, false));
            }
            let delay = error
                .retry_after
                .unwrap_or_else(|| backoff(settings.retry_base_delay, attempt));
            let retry = ModelReply::Retry {
                id: self.replies.id(),
                attempt: attempt + 1,
                max_attempts,
                delay_ms: delay.as_millis() as u64,
                status: error.status,
                message: error.message.clone(),
            };
            if !self.replies.send(retry).await {
                return Outcome::Failed(cancelled().into_failure(attempt, false));
            }
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    return Outcome::Failed(cancelled().into_failure(attempt, false));
                }
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// The URL and body, built once: every attempt sends the same bytes.
    fn prepare(&self, stream: bool) -> Result<(reqwest::Url, Bytes), BuildError> {
        let base = self
            .entry
            .base_url
            .as_deref()
            .ok_or_else(|| BuildError::NoBaseUrl(self.entry.id.clone()))?;
        let (url, body) = match self.entry.adapter {
            Adapter::Anthropic => (
                anthropic::url(base)?,
                anthropic::body(self.entry, self.params, stream),
            ),
            _ => (
                openai::url(self.entry, base)?,
                openai::body(self.entry, self.params, stream),
            ),
        };
        let body = serde_json::to_vec(&body).map_err(BuildError::Encode)?;
        Ok((url, Bytes::from(body)))
    }

    fn dialect(&self) -> Box<dyn Dialect> {
        match self.entry.adapter {
            Adapter::Anthropic => Box::new(AnthropicDialect::default()),
            _ => Box::new(OpenAiDialect::default()),
        }
    }

    async fn attempt(
        &self,
        attempt: u32,
        url: &reqwest::Url,
        body: &Bytes,
        stream: bool,
        progress: &mut Progress,
    ) -> Result<Finished, AttemptError> {
        let timeouts = self.entry.settings.timeouts;
        let deadline = tokio::time::Instant::now() + timeouts.total;
        let soon = |limit: Duration| (tokio::time::Instant::now() + limit).min(deadline);

        let mut request = self
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                ACCEPT,
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .body(body.clone());
        request = match self.entry.adapter {
            Adapter::Anthropic => anthropic::auth(self.entry, request),
            _ => openai::auth(self.entry, request),
        };
        for (name, value) in &self.entry.headers {
            request = request.header(name, value);
        }
        let response = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Err(cancelled()),
            sent = tokio::time::timeout_at(soon(timeouts.headers), request.send()) => match sent {
                Err(_) => {
                    return Err(AttemptError::new(
                        ModelErrorKind::Timeout,
                        format!("no response from the provider within {:.1} s", timeouts.headers.min(timeouts.total).as_secs_f64()),
                    ));
                }
                Ok(Err(e)) => return Err(transport(&e, false)),
                Ok(Ok(response)) => response,
            },
        };
        let status = response.status();
        if !status.is_success() {
            let headers = response.headers().clone();
            let mut body = response.bytes_stream();
            let mut kept = Vec::new();
            while kept.len() < ERROR_BODY_LIMIT {
                let next = tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => return Err(cancelled()),
                    next = tokio::time::timeout_at(soon(timeouts.idle), body.next()) => next,
                };
                match next {
                    Ok(Some(Ok(chunk))) => kept.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            return Err(classify(status, &headers, &kept));
        }
        if !self
            .replies
            .send(ModelReply::Started {
                id: self.replies.id(),
                attempt,
            })
            .await
        {
            return Err(cancelled());
        }

        let mut dialect = self.dialect();
        let mut parser = SseParser::default();
        let mut out = Output::default();
        let mut whole = Vec::new();
        let mut body = response.bytes_stream();
        loop {
            let next = tokio::select! {
                biased;
                // Returning drops `body`, which closes the connection: the provider stops
                // generating (and billing) at once.
                () = self.cancel.cancelled() => return Err(cancelled()),
                next = tokio::time::timeout_at(soon(timeouts.idle), body.next()) => next,
            };
            let chunk = match next {
                Err(_) => {
                    let kind = if progress.forwarded > 0 {
                        ModelErrorKind::StreamInterrupted
                    } else {
                        ModelErrorKind::Timeout
                    };
                    return Err(AttemptError::new(
                        kind,
                        format!(
                            "the provider sent nothing for {:.1} s",
                            timeouts.idle.min(timeouts.total).as_secs_f64()
                        ),
                    ));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(transport(&e, progress.forwarded > 0)),
                Ok(Some(Ok(chunk))) => chunk,
            };
            if !stream {
                if whole.len() + chunk.len() > WHOLE_BODY_LIMIT {
                    return Err(AttemptError::new(
                        ModelErrorKind::Protocol,
                        "the response is larger than 32 MiB",
                    ));
                }
                whole.extend_from_slice(&chunk);
                continue;
            }
            let events = parser
                .feed(&chunk)
                .map_err(|e| AttemptError::new(ModelErrorKind::Protocol, e.to_string()))?;
            for event in events {
                dialect.event(event, &mut out);
            }
            self.forward(&mut out, progress).await?;
            if out.ended {
                break;
            }
        }
        if stream {
            if let Some(event) = parser.finish() {
                dialect.event(event, &mut out);
            }
        } else {
            match serde_json::from_slice::<Value>(&whole) {
                Ok(value) => dialect.whole(value, &mut out),
                Err(e) => {
                    return Err(AttemptError::new(
                        ModelErrorKind::Protocol,
                        format!("the response is not JSON: {e}"),
                    ));
                }
            }
        }
        dialect.end(&mut out);
        self.forward(&mut out, progress).await?;
        if out.finish_reason.is_none() && !out.ended {
            return Err(AttemptError::new(
                ModelErrorKind::StreamInterrupted,
                "the response ended before the model finished",
            ));
        }
        Ok(Finished {
            finish_reason: out.finish_reason.unwrap_or_else(|| "stop".into()),
            usage: out.usage,
            ttft: None,
            total: Duration::ZERO,
        })
    }

    /// Sends the deltas `out` holds, then reports a failure the body announced.
    async fn forward(&self, out: &mut Output, progress: &mut Progress) -> Result<(), AttemptError> {
        for delta in out.deltas.drain(..) {
            progress.first_delta.get_or_insert_with(Instant::now);
            progress.streamed_chars += match &delta {
                Delta::Reasoning(t) | Delta::Text(t) => t.chars().count() as u64,
                Delta::ToolCall { arguments, .. } => arguments.chars().count() as u64,
                _ => 0,
            };
            progress.forwarded += 1;
            let reply = ModelReply::Delta {
                id: self.replies.id(),
                delta,
            };
            if !self.replies.send(reply).await {
                return Err(cancelled());
            }
        }
        match out.failure.take() {
            None => Ok(()),
            Some((kind, message)) => {
                let kind = if progress.forwarded > 0 && kind != ModelErrorKind::Protocol {
                    ModelErrorKind::StreamInterrupted
                } else {
                    kind
                };
                Err(AttemptError::new(kind, message))
            }
        }
    }
}

fn failure(kind: ModelErrorKind, message: String, attempts: u32) -> ModelFailure {
    ModelFailure {
        kind,
        status: None,
        message,
        attempts,
        partial: false,
    }
}

/// Usage when the provider reported none (agent.md §4.6): about four bytes per token.
fn estimate(request_bytes: usize, streamed_chars: u64) -> Usage {
    let prompt = request_bytes as u64 / 4;
    let completion = streamed_chars.div_ceil(4);
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        estimated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_millis(500);
        for _ in 0..50 {
            let first = backoff(base, 1);
            assert!(first >= Duration::from_millis(375) && first <= Duration::from_millis(625));
            let fifth = backoff(base, 5);
            assert!(fifth >= Duration::from_secs(6) && fifth <= Duration::from_secs(10));
            assert!(backoff(base, 40) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "150"), ("retry-after", "9")])),
            Some(Duration::from_millis(150))
        );
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let parsed = retry_after(&headers(&[("retry-after", &later)])).unwrap();
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn classification() {
        let c = |status: u16, body: &str, h: &[(&'static str, &str)]| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                &headers(h),
                body.as_bytes(),
            )
        };
        let e = c(
            429,
            r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
            &[],
        );
        assert_eq!(
            (e.kind, e.message.as_str(), e.retryable()),
            (ModelErrorKind::RateLimited, "slow down", true)
        );
        let e = c(
            500,
            r#"{"error":{"message":"scripted failure","type":"server_error"}}"#,
            &[],
        );
        assert!(e.kind == ModelErrorKind::Server && e.retryable());
        assert!(!c(501, "", &[]).retryable());
        let e = c(401, r#"{"error":{"message":"bad key"}}"#, &[]);
        assert!(e.kind == ModelErrorKind::Auth && !e.retryable());
        assert!(c(401, "", &[("x-should-retry", "true")]).retryable());
        assert!(!c(503, "", &[("x-should-retry", "false")]).retryable());
        let e = c(
            400,
            r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#,
            &[],
        );
        assert_eq!(e.kind, ModelErrorKind::ContextLength);
        let e = c(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 300000 tokens"}}"#,
            &[],
        );
        assert_eq!(e.kind, ModelErrorKind::ContextLength);
        let e = c(400, r#"{"error":{"message":"nope"}}"#, &[]);
        assert_eq!(e.kind, ModelErrorKind::BadRequest);
        let e = c(
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &[],
        );
        assert!(e.kind == ModelErrorKind::Overloaded && e.retryable());
        let e = c(502, "<html>bad gateway</html>", &[("retry-after", "1")]);
        assert_eq!(e.message, "HTTP 502: <html>bad gateway</html>");
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(c(404, "", &[]).kind, ModelErrorKind::NotFound);
        assert_eq!(c(403, "", &[]).kind, ModelErrorKind::Permission);
    }

    #[test]
    fn estimates_and_ids() {
        let u = estimate(400, 10);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.estimated),
            (100, 3, true)
        );
        let a = new_call_id();
        assert!(a.starts_with("call_") && a != new_call_id());
        for _ in 0..100 {
            let x = random_unit();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
