//! Request inputs: a JSON object body (with upstream's leniency and our strictness) and the
//! query string, each failing with the structured errors of `error.rs`.

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use serde_json::{Map, Value};
use shared::ids::SessionId;

use crate::error::ApiError;

/// Largest accepted request body (upstream's 20 MB).
pub const BODY_LIMIT: usize = 20 * 1024 * 1024;

/// A JSON object body. An empty body counts as `{}` (upstream handlers see an empty object);
/// anything that is not a JSON object is `INVALID_JSON`. A body must say it is JSON: a form or
/// `text/plain` body is what a page of another site can POST without asking first (no CORS
/// preflight), so it is refused (415) rather than parsed.
pub struct JsonObject(pub Map<String, Value>);

/// Whether a `Content-Type` is JSON (`application/json`, `application/<x>+json`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: BODY_LIMIT }
            } else if timed_out(&rejection) {
                ApiError::BodyTimedOut
            } else {
                ApiError::InvalidRequest(rejection.body_text())
            }
        })?;
        let empty = bytes.iter().all(u8::is_ascii_whitespace);
        match content_type {
            Some(ct) if !is_json(&ct) => return Err(ApiError::UnsupportedMediaType(ct)),
            None if !empty => return Err(ApiError::UnsupportedMediaType("no Content-Type".into())),
            _ => {}
        }
        parse_object(&bytes).map(JsonObject)
    }
}

/// Whether the body failed because it did not arrive in time (the connection's deadline).
fn timed_out(rejection: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(rejection);
    while let Some(e) = cause {
        if e.is::<crate::connections::BodyTimedOut>() {
            return true;
        }
        cause = e.source();
    }
    false
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// The query string as a map.
pub struct Params(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Query(map)| Params(map))
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))
    }
}

impl Params {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// `sessionId` from the query string if non-empty, else from the body, as upstream reads it.
/// It is checked here, once: one that cannot be a session id names no session.
///
/// # Errors
/// `SessionIdRequired` when neither has one, `SessionNotFound` for one that is not an id.
pub fn session_id(
    params: &Params,
    body: Option<&Map<String, Value>>,
) -> Result<SessionId, ApiError> {
    let raw = params
        .get("sessionId")
        .filter(|id| !id.is_empty())
        .or_else(|| {
            body.and_then(|b| b.get("sessionId"))
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
        })
        .ok_or(ApiError::SessionIdRequired)?;
    parse_session_id(raw)
}

/// A session id a client sent: one that cannot be an id names no session.
///
/// # Errors
/// `SessionIdRequired` for an empty one, else `SessionNotFound`, naming what was sent.
pub fn parse_session_id(raw: &str) -> Result<SessionId, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::SessionIdRequired);
    }
    Ok(SessionId::parse(raw)?)
}

/// Image MIME types a query may carry (agent.md §1.8).
const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const MAX_IMAGES: usize = 10;

/// Validates a query input: a non-empty string, or an array of `text` and `image_url` parts.
/// Upstream treats every falsy value as missing (`Query is required`).
pub fn query_input(body: &Map<String, Value>) -> Result<Value, ApiError> {
    let input = body.get("query").cloned().unwrap_or(Value::Null);
    match &input {
        Value::Null | Value::Bool(false) => Err(ApiError::QueryRequired),
        Value::String(s) if s.is_empty() => Err(ApiError::QueryRequired),
        Value::Number(n) if n.as_f64() == Some(0.0) => Err(ApiError::QueryRequired),
        Value::String(_) => Ok(input),
        Value::Array(parts) => {
            if parts.is_empty() {
                return Err(ApiError::InvalidRequest(
                    "query must not be an empty array".into(),
                ));
            }
            let mut images = 0;
            for part in parts {
                match part["type"].as_str() {
                    Some("text") if part["text"].is_string() => {}
                    Some("image_url") => {
                        images += 1;
                        let url = part["image_url"]["url"].as_str().unwrap_or_default();
                        let allowed = if let Some(data) = url.strip_prefix("data:") {
                            IMAGE_TYPES
                                .iter()
                                .any(|t| data.starts_with(&format!("{t};base64,")))
                        } else {
                            url.starts_with("https://") || url.starts_with("http://")
                        };
                        if !allowed {
                            return Err(ApiError::InvalidRequest(
                                "image_url.url must be an http(s) URL or a base64 data URL of a png, jpeg, gif or webp image".into(),
                            ));
                        }
                    }
                    _ => {
                        return Err(ApiError::InvalidRequest(
                            "query parts must be {type:\"text\", text} or {type:\"image_url\", image_url:{url}}".into(),
                        ));
                    }
                }
            }
            if images > MAX_IMAGES {
                return Err(ApiError::InvalidRequest(format!(
                    "at most {MAX_IMAGES} images per query"
                )));
            }
            Ok(input)
        }
        _ => Err(ApiError::InvalidRequest(
            "query must be a string or an array of content parts".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies() {
        assert!(parse_object(b"").unwrap().is_empty());
        assert!(parse_object(b"  \n").unwrap().is_empty());
        assert_eq!(parse_object(br#"{"a":1}"#).unwrap()["a"], 1);
        for bad in [&b"{\"a\":"[..], b"[1]", b"42", b"\"s\""] {
            assert!(matches!(parse_object(bad), Err(ApiError::InvalidJson(_))));
        }
    }

    #[test]
    fn query_inputs() {
        let body = |v: Value| json!({ "query": v }).as_object().cloned().unwrap();
        assert!(matches!(
            query_input(&Map::new()),
            Err(ApiError::QueryRequired)
        ));
        assert!(matches!(
            query_input(&body(json!(""))),
            Err(ApiError::QueryRequired)
        ));
        assert!(query_input(&body(json!("hi"))).is_ok());
        assert!(query_input(&body(json!([{"type": "text", "text": "hi"}]))).is_ok());
        let png =
            json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]);
        assert!(query_input(&body(png)).is_ok());
        let svg =
            json!([{"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,AAAA"}}]);
        assert!(matches!(
            query_input(&body(svg)),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            query_input(&body(json!({"x": 1}))),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            query_input(&body(json!([{"type": "audio"}]))),
            Err(ApiError::InvalidRequest(_))
        ));
    }
}
