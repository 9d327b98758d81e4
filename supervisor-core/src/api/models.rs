//! Models as clients see them: the list to choose from (api.md §7.6), a session's model
//! (§7.7, and the seed's `metadata.modelConfig` on update, §17 row 9), and conversation titles
//! made by the session's model (§3.9). No response ever carries a key, a URL or a header.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};
use shared::ids::now_ms;

use super::body::{JsonObject, Params, session_id};
use crate::config::catalogue::selector_of;
use crate::error::ApiError;
use crate::sessions::Session;
use crate::state::AppState;
use crate::storage::SessionInfo;

const MISSING_MODEL_PARAMETERS: &str = "sessionId, model (with provider and id)";
const UNTITLED: &str = "Untitled Conversation";
const SUMMARY_PROMPT: &str = "You name conversations. Read the conversation the user gives you \
and answer with a JSON object {\"title\": \"...\"} whose title has at most 6 words and says what \
the conversation is about. Answer with the JSON object only.";
/// Characters of one message, and of the whole transcript, sent for a title: the opening of a
/// conversation says what it is about.
const SUMMARY_MESSAGE_CHARS: usize = 2_000;
const SUMMARY_TRANSCRIPT_CHARS: usize = 16_000;

/// `GET /api/v1/models`: the default first, then the other configured models, one per id.
pub(super) async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .gateway
        .catalogue()
        .listed()
        .iter()
        .map(|m| m.public_json())
        .collect();
    Json(json!({"models": models}))
}

/// `POST /api/v1/sessions/model`: validates the choice, stores it as `metadata.modelConfig`,
/// and retires the live worker so that the next query runs with the new model.
pub(super) async fn set_session_model(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&params, Some(&body))
        .map_err(|_| ApiError::InvalidParameters(MISSING_MODEL_PARAMETERS))?;
    let model = body
        .get("model")
        .filter(|m| m.is_object())
        .ok_or(ApiError::InvalidParameters(MISSING_MODEL_PARAMETERS))?;
    let (provider, model_id) =
        selector_of(model).ok_or(ApiError::InvalidParameters(MISSING_MODEL_PARAMETERS))?;
    if state
        .gateway
        .catalogue()
        .find(&provider, &model_id)
        .is_none()
    {
        return Err(ApiError::InvalidModel {
            provider,
            id: model_id,
        });
    }
    let session = state.session_for(&principal, &id).await?;
    let mut patch = Map::new();
    patch.insert("modelConfig".into(), model.clone());
    let info = switch_model(&state, &session, patch).await?;
    Ok(Json(
        json!({"success": true, "sessionInfo": state.shown(info)}),
    ))
}

/// Applies a metadata patch that selects a configured model: stores it, then stops the
/// session's worker, whose agent was built with the old model (the next query starts a new
/// one from the stored history). A running session is refused rather than cut off mid-run;
/// the UI disables its selector while the agent runs anyway.
///
/// # Errors
/// `SessionBusy` while a run executes; storage failures.
pub(super) async fn switch_model(
    state: &AppState,
    session: &Arc<Session>,
    patch: Map<String, Value>,
) -> Result<SessionInfo, ApiError> {
    if session.is_running().await {
        return Err(ApiError::SessionBusy(session.id.to_string()));
    }
    let info = state
        .storage
        .merge_metadata(&session.id, patch, now_ms())
        .await?;
    session.stop_worker().await;
    tracing::info!(session_id = %session.id, "session model changed; its worker was retired");
    Ok(info)
}

/// For `POST /sessions/update`: whether the patch's `modelConfig` (with the seed's `modelId`
/// folded into `id`) selects a configured model, in which case the update switches the model
/// like `/sessions/model` does.
pub(super) fn selects_configured_model(state: &AppState, patch: &mut Map<String, Value>) -> bool {
    let Some(Value::Object(model)) = patch.get_mut("modelConfig") else {
        return false;
    };
    if !model.contains_key("id")
        && let Some(alias) = model.get("modelId").cloned()
    {
        model.insert("id".into(), alias);
    }
    selector_of(&Value::Object(model.clone()))
        .is_some_and(|(provider, id)| state.gateway.catalogue().find(&provider, &id).is_some())
}

/// The plain text of an OpenAI-shaped message, images named rather than inlined.
fn message_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => "[image]".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The conversation as one transcript: a single user turn is valid for every provider (no
/// alternation or tool pairing to get right) and shows the model the whole exchange.
fn transcript(messages: &[Value]) -> String {
    let mut out = String::new();
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        let text: String = message_text(message.get("content").unwrap_or(&Value::Null))
            .chars()
            .take(SUMMARY_MESSAGE_CHARS)
            .collect();
        if text.trim().is_empty() {
            continue;
        }
        let line = format!("{role}: {}\n", text.trim());
        if out.len() + line.len() > SUMMARY_TRANSCRIPT_CHARS {
            break;
        }
        out.push_str(&line);
    }
    out
}

/// The `title` of the model's JSON answer (fenced or not), else upstream's fallback.
fn title_of(answer: &str) -> String {
    let trimmed = answer.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str::<Value>(unfenced.trim())
        .ok()
        .and_then(|v| {
            v.get("title")
                .and_then(Value::as_str)
                .map(str::trim)
                .map(str::to_owned)
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| UNTITLED.to_owned())
}

/// `POST /api/v1/sessions/generate-summary`: a short title from the session's model, made by
/// the supervisor itself (no worker is involved, nothing is stored).
pub(super) async fn generate_summary(
    State(state): State<Arc<AppState>>,
    principal: crate::principal::Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&params, Some(&body))?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or(ApiError::MessagesRequired)?;
    let session = state.session_for(&principal, &id).await?;
    let stored = state.storage.session(&session.id).await?;
    let selected = stored
        .as_ref()
        .and_then(|info| info.metadata.as_ref())
        .and_then(|m| m.get("modelConfig"));
    let model = state.gateway.catalogue().for_selector(selected).clone();
    let request = json!({
        "messages": [
            {"role": "system", "content": SUMMARY_PROMPT},
            {"role": "user", "content": format!("Conversation:\n{}", transcript(messages))},
        ],
        "temperature": 0.3,
        "max_tokens": 25,
        "response_format": {"type": "json_object"},
        "thinking": {"type": "disabled"},
    });
    let answer = state
        .gateway
        .complete(&model.selector(), request)
        .await
        .map_err(|failure| ApiError::SummaryFailed(failure.message))?;
    Ok(Json(json!({
        "summary": title_of(&answer),
        "model": model.id,
        "provider": model.provider,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles() {
        assert_eq!(
            title_of("{\"title\": \" Paris weather \"}"),
            "Paris weather"
        );
        assert_eq!(title_of("```json\n{\"title\":\"A\"}\n```"), "A");
        assert_eq!(title_of("echo: hi"), UNTITLED);
        assert_eq!(title_of("{\"name\":\"x\"}"), UNTITLED);
    }

    #[test]
    fn transcripts() {
        let text = transcript(&[
            json!({"role": "user", "content": "hello"}),
            json!({"role": "assistant", "content": null}),
            json!({"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]}),
        ]);
        assert_eq!(text, "user: hello\nuser: look [image]\n");
    }
}
