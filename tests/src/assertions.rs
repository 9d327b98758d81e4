//! What the tests check answers against: a response's status and error shape, the frames and
//! events of a run, the texts the echo model's directives produce, and the shapes of ids and
//! timestamps.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::http::Resp;
use crate::sse::Frame;

impl Resp {
    pub fn expect_status(&self, status: u16, what: &str) -> Result<()> {
        ensure!(
            self.status == status,
            "{what}: expected HTTP {status}, got {} with body {}",
            self.status,
            self.text
        );
        Ok(())
    }

    /// Asserts a structured JSON error: HTTP `status`, top-level string `code` == `code`,
    /// string `message`, and an `error` field that is either a string (then `details` must be
    /// an object) or an object carrying the same `code` (query family).
    pub fn expect_error(&self, status: u16, code: &str, what: &str) -> Result<()> {
        self.expect_status(status, what)?;
        ensure!(
            self.json.is_object(),
            "{what}: error body is not a JSON object: {:?}",
            self.text
        );
        let ct = self.header("content-type").unwrap_or_default();
        ensure!(
            ct.starts_with("application/json"),
            "{what}: error content-type is {ct:?}, body {}",
            self.text
        );
        ensure!(
            self.code() == Some(code),
            "{what}: expected code {code:?}, body {}",
            self.text
        );
        ensure!(
            self.json["message"].is_string(),
            "{what}: `message` is not a string in {}",
            self.text
        );
        match &self.json["error"] {
            Value::String(_) => ensure!(
                self.json["details"].is_object(),
                "{what}: `details` is not an object in {}",
                self.text
            ),
            Value::Object(inner) => {
                ensure!(
                    inner.get("code").and_then(Value::as_str) == Some(code),
                    "{what}: error.code differs from code in {}",
                    self.text
                );
                ensure!(
                    inner.get("message").is_some_and(Value::is_string),
                    "{what}: error.message missing in {}",
                    self.text
                );
            }
            _ => bail!(
                "{what}: `error` is neither string nor object in {}",
                self.text
            ),
        }
        Ok(())
    }

    /// Like [`Resp::expect_error`] and additionally requires the plain shape
    /// (`error` is a string).
    pub fn expect_plain_error(&self, status: u16, code: &str, what: &str) -> Result<()> {
        self.expect_error(status, code, what)?;
        ensure!(
            self.json["error"].is_string(),
            "{what}: `error` should be a string in {}",
            self.text
        );
        Ok(())
    }
}

/// `type` of each frame.
pub fn types(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(|f| f.ty().to_string()).collect()
}

/// `type` of each event.
pub fn event_types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Concatenated `content` of all `assistant_streaming_message` frames.
pub fn concat_deltas(frames: &[Frame]) -> String {
    frames
        .iter()
        .filter(|f| f.ty() == "assistant_streaming_message")
        .map(|f| f.data["content"].as_str().unwrap_or_default())
        .collect()
}

/// Frames whose `type` is `ty`.
pub fn of_type<'a>(frames: &'a [Frame], ty: &str) -> Vec<&'a Frame> {
    frames.iter().filter(|f| f.ty() == ty).collect()
}

/// Asserts that every frame that has an id has a strictly greater id than the previous one,
/// and that all agent event frames carry an id. Returns the ids.
pub fn check_seq(frames: &[Frame]) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for f in frames {
        if f.ty() == "session_created" {
            continue;
        }
        let id =
            f.id.with_context(|| format!("agent event frame without `id:`: {:?}", f.data))?;
        if let Some(prev) = ids.last() {
            ensure!(
                id > *prev,
                "SSE ids not strictly increasing: {prev} then {id}"
            );
        }
        ids.push(id);
    }
    Ok(ids)
}

/// The text `SLOW n` would produce in full: `t0 t1 ... t{n-1}`.
pub fn slow_text(n: usize) -> String {
    (0..n)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The text `FLOOD n` produces: `w0 w1 ... w{n-1}`.
pub fn flood_text(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `s` looks like a session id: 21 chars from `[A-Za-z0-9_-]`.
pub fn is_session_id(s: &str) -> bool {
    s.len() == 21
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `s` looks like a UUID (8-4-4-4-12 hex).
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8usize, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `v` is an integer millisecond timestamp after 2020-01-01.
pub fn is_ms_timestamp(v: &Value) -> bool {
    v.as_u64().is_some_and(|t| t > 1_577_836_800_000)
        || v.as_f64()
            .is_some_and(|t| t.fract() == 0.0 && t > 1_577_836_800_000.0)
}
