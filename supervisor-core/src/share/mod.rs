//! Sharing a session (api.md §10): a self-contained replay page, the UI's own `index.html`
//! with the session and its key-frame events injected, either returned for download or
//! uploaded (with the workspace images it shows) to the configured `share.provider`.
//!
//! Nothing secret reaches a shared page: the session record is cut down to what the UI shows
//! (no workspace path, no runtime settings or agent options), the UI config loses its server
//! path, and every configured API key or header value is masked wherever it appears in the
//! injected data (a user may paste one into the chat).

mod images;
pub mod links;
mod slug;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::multipart::{Form, Part};
use serde_json::{Map, Value, json};
use shared::ids::{SessionId, now_ms};

use crate::config::ShareConfig;
use crate::gateway::Gateway;
use crate::storage::{SessionInfo, SharedStorage, StorageError};
use crate::webui::{WebUi, WebUiError, inject_head, script_json};

/// How long one upload (an image or the page) may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Streaming deltas a replay does not need: the complete messages are in the log too.
const DELTA_TYPES: &[&str] = &[
    "assistant_streaming_message",
    "assistant_streaming_thinking_message",
    "assistant_streaming_tool_call",
    "final_answer_streaming",
];
const SLUG_PROMPT: &str = "Summarise the user's request as a slug: 3 to 5 lowercase English \
words joined by hyphens, ASCII only, even when the request is in another language. Answer \
with a JSON object {\"slug\": \"...\"} and nothing else.";
const REDACTED: &str = "[redacted]";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("invalid share.provider URL {url:?}: {reason}")]
    ProviderUrl { url: String, reason: String },
    #[error("could not build the HTTP client for sharing: {0}")]
    Client(#[source] reqwest::Error),
    #[error("Session not found")]
    SessionNotFound,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Page(#[from] WebUiError),
    #[error("HTTP error! status: {0}")]
    Status(u16),
    #[error("Invalid response from share provider")]
    InvalidResponse,
    #[error("Could not reach the share provider: {0}")]
    Request(String),
}

/// Sharing: the provider, when one is configured, and what a replay page is made of (the
/// stored session, the UI's page, the model that names the upload, the secrets to mask).
pub struct Sharing {
    provider: Option<Provider>,
    storage: SharedStorage,
    webui: Arc<WebUi>,
    gateway: Arc<Gateway>,
    /// Every configured API key and header value, masked wherever it appears on a page.
    secrets: Vec<String>,
}

struct Provider {
    /// Where replay pages go.
    pages: Url,
    /// Where their images go: the provider URL with its `/share` path segment made `/storage`.
    storage: Url,
    http: reqwest::Client,
}

/// The outcome of a share.
pub enum Shared {
    /// The page, for the client to save.
    Html(String),
    /// Where the uploaded page can be seen (with `replay=1`).
    Url(String),
}

impl Sharing {
    /// # Errors
    /// The provider is not a URL, or no HTTP client can be built.
    pub fn new(
        config: &ShareConfig,
        storage: SharedStorage,
        webui: Arc<WebUi>,
        gateway: Arc<Gateway>,
        secrets: Vec<String>,
    ) -> Result<Self, ShareError> {
        let provider = config.provider.as_deref().map(Provider::new).transpose()?;
        Ok(Self {
            provider,
            storage,
            webui,
            gateway,
            secrets,
        })
    }

    /// The configured provider URL (`GET /api/v1/share/config`).
    pub fn provider_url(&self) -> Option<String> {
        self.provider.as_ref().map(|p| p.pages.to_string())
    }
}

impl Provider {
    fn new(url: &str) -> Result<Self, ShareError> {
        let pages = Url::parse(url).map_err(|e| ShareError::ProviderUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let http = reqwest::Client::builder()
            .timeout(UPLOAD_TIMEOUT)
            .user_agent(concat!("agent-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ShareError::Client)?;
        Ok(Self {
            storage: storage_url(&pages),
            pages,
            http,
        })
    }
}

/// The provider URL with its first `share` path segment replaced by `storage`. Upstream
/// replaces the first `/share` anywhere, which mangles hosts like `share.example.com`.
fn storage_url(pages: &Url) -> Url {
    let mut storage = pages.clone();
    let segments: Vec<String> = pages
        .path_segments()
        .map(|s| s.map(str::to_owned).collect())
        .unwrap_or_default();
    if let Some(at) = segments.iter().position(|s| s == "share") {
        let mut changed = segments;
        changed[at] = "storage".into();
        storage.set_path(&format!("/{}", changed.join("/")));
    }
    storage
}

impl Sharing {
    /// Shares session `session_id`, whose workspace is `workspace`: uploads it when asked and a
    /// provider is configured, otherwise returns the page.
    ///
    /// # Errors
    /// The session has no record, the UI page cannot be read, or the provider refused the upload.
    pub async fn share(
        &self,
        session_id: &SessionId,
        workspace: &Path,
        upload: bool,
    ) -> Result<Shared, ShareError> {
        let info = self
            .storage
            .session(session_id)
            .await?
            .ok_or(ShareError::SessionNotFound)?;
        let mut events: Vec<Value> = self
            .storage
            .events_after(session_id, 0, usize::MAX)
            .await?
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.json).ok())
            .filter(|e| {
                !DELTA_TYPES.contains(&e.get("type").and_then(Value::as_str).unwrap_or_default())
            })
            .collect();
        let provider = self.provider.as_ref().filter(|_| upload);
        if let Some(provider) = provider {
            upload_images(provider, session_id, workspace, &mut events).await;
        }
        let html = self.replay_page(&info, &events).await?;
        let Some(provider) = provider else {
            return Ok(Shared::Html(html));
        };
        let query = first_user_text(&events);
        let slug = self.make_slug(session_id, &info, &query).await;
        let url = upload_page(provider, &info, html, &slug, &query).await?;
        tracing::info!(%session_id, %url, "session shared");
        Ok(Shared::Url(url))
    }

    /// The UI's page with the replay globals injected before its `</head>`.
    async fn replay_page(
        &self,
        info: &SessionInfo,
        events: &[Value],
    ) -> Result<String, ShareError> {
        let page = self.webui.page().await?;
        let safe = |value: Value| script_json(&redact(value, &self.secrets));
        let script = format!(
            "<script>\nwindow.AGENT_REPLAY_MODE = true;\nwindow.AGENT_SESSION_DATA = {};\n\
         window.AGENT_EVENT_STREAM = {};\nwindow.AGENT_VERSION_INFO = {};\n\
         window.AGENT_WEB_UI_CONFIG = {};\n</script>\n\
         <script>document.addEventListener('DOMContentLoaded', function () {{ setTimeout(function () {{ \
         var root = document.getElementById('root'); \
         if (root && !root.children.length) {{ window.dispatchEvent(new Event('resize')); }} }}, 1000); }});</script>",
            safe(shared_session(info)),
            safe(Value::Array(events.to_vec())),
            safe(json!({"version": env!("CARGO_PKG_VERSION")})),
            safe(self.webui.browser_config().clone()),
        );
        Ok(inject_head(&page, &script))
    }
}

/// What a replay needs of the record: name, tags, agent and model names. The workspace path,
/// runtime settings and agent options stay on the server.
fn shared_session(info: &SessionInfo) -> Value {
    let mut metadata = Map::new();
    if let Some(stored) = &info.metadata {
        for key in ["name", "tags", "agentInfo"] {
            if let Some(value) = stored.get(key) {
                metadata.insert(key.into(), value.clone());
            }
        }
        if let Some(model) = stored.get("modelConfig").and_then(Value::as_object) {
            let public: Map<String, Value> = ["id", "provider", "displayName"]
                .iter()
                .filter_map(|k| model.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                .collect();
            metadata.insert("modelConfig".into(), Value::Object(public));
        }
    }
    json!({
        "id": info.id,
        "createdAt": info.created_at,
        "updatedAt": info.updated_at,
        "workspace": "",
        "metadata": metadata,
    })
}

/// `value` with every configured secret, and anything that looks like an `sk-` key, masked in
/// every string.
fn redact(value: Value, secrets: &[String]) -> Value {
    match value {
        Value::String(text) => {
            let mut text = text;
            for secret in secrets {
                if text.contains(secret.as_str()) {
                    text = text.replace(secret.as_str(), REDACTED);
                }
            }
            Value::String(crate::gateway::scrub::scrub(&text, None))
        }
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| redact(v, secrets)).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, redact(v, secrets)))
                .collect(),
        ),
        other => other,
    }
}

/// The text of the first `user_message`: its string content, or its first text part.
fn first_user_text(events: &[Value]) -> String {
    let Some(content) = events
        .iter()
        .find(|e| e.get("type").and_then(Value::as_str) == Some("user_message"))
        .and_then(|e| e.get("content"))
    else {
        return String::new();
    };
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .find(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .and_then(|p| p.get("text"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

impl Sharing {
    /// The slug: the session's model summarises the first request; if it cannot (or answers
    /// something else), the request's own words are used.
    async fn make_slug(&self, session_id: &SessionId, info: &SessionInfo, query: &str) -> String {
        if query.trim().is_empty() {
            return slug::slug("", session_id);
        }
        let selected = info.metadata.as_ref().and_then(|m| m.get("modelConfig"));
        let model = self.gateway.catalogue().for_selector(selected).clone();
        let excerpt: String = query.chars().take(2_000).collect();
        let request = json!({
            "messages": [
                {"role": "system", "content": SLUG_PROMPT},
                {"role": "user", "content": excerpt},
            ],
            "temperature": 0.3,
            "max_tokens": 100,
            "response_format": {"type": "json_object"},
            "thinking": {"type": "disabled"},
        });
        let suggested = match self.gateway.complete(&model.selector(), request).await {
            Ok(answer) => slug::from_answer(&answer),
            Err(failure) => {
                tracing::info!(%session_id, error = %failure.message, "no slug from the model; using the request");
                None
            }
        };
        slug::slug(suggested.as_deref().unwrap_or(query), session_id)
    }
}

/// Uploads the images that `write_file` contents reference and rewrites those references.
/// A failed upload leaves its reference as it was.
async fn upload_images(
    provider: &Provider,
    session_id: &SessionId,
    workspace: &Path,
    events: &mut [Value],
) {
    let mut urls: HashMap<String, String> = HashMap::new();
    let mut failed: Vec<String> = Vec::new();
    for event in events.iter_mut() {
        if event.get("type").and_then(Value::as_str) != Some("tool_call")
            || event.get("name").and_then(Value::as_str) != Some("write_file")
        {
            continue;
        }
        let Some(content) = event.pointer_mut("/arguments/content") else {
            continue;
        };
        let Some(text) = content.as_str() else {
            continue;
        };
        for reference in images::references(text) {
            if urls.contains_key(&reference) || failed.contains(&reference) {
                continue;
            }
            match upload_image(provider, session_id, workspace, &reference).await {
                Some(url) => {
                    urls.insert(reference, url);
                }
                None => failed.push(reference),
            }
        }
        let rewritten = images::rewrite(text, &urls);
        *content = Value::String(rewritten);
    }
}

async fn upload_image(
    provider: &Provider,
    session_id: &SessionId,
    workspace: &Path,
    reference: &str,
) -> Option<String> {
    let (workspace, relative) = (workspace.to_owned(), reference.to_owned());
    let read = tokio::task::spawn_blocking(move || images::read(&workspace, &relative)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            tracing::info!(%session_id, reference, error = %e, "a referenced image is not uploaded");
            return None;
        }
        Err(e) => {
            tracing::warn!(%session_id, reference, error = %e, "reading a workspace image did not finish");
            return None;
        }
    };
    let name = Path::new(reference)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    let part = Part::bytes(bytes)
        .file_name(name)
        .mime_str(images::mime_of(Path::new(reference)))
        .ok()?;
    let form = Form::new()
        .part("file", part)
        .text("type", "image")
        .text("originalPath", reference.to_owned());
    let reply = post(provider, provider.storage.clone(), form).await;
    match reply {
        Ok(body) => body
            .get("cdnUrl")
            .or_else(|| body.get("url"))
            .and_then(Value::as_str)
            .map(images::force_https),
        Err(e) => {
            tracing::warn!(%session_id, reference, error = %e, "could not upload a workspace image");
            None
        }
    }
}

async fn upload_page(
    provider: &Provider,
    info: &SessionInfo,
    html: String,
    slug: &str,
    query: &str,
) -> Result<String, ShareError> {
    let file = Part::text(html)
        .file_name(format!("agent-replay-{}-{}.html", info.id, now_ms()))
        .mime_str("text/html")
        .map_err(|e| ShareError::Request(e.to_string()))?;
    let mut form = Form::new()
        .part("file", file)
        .text("sessionId", info.id.clone())
        .text("type", "html");
    if !slug.is_empty() {
        form = form.text("slug", slug.to_owned());
    }
    if !query.is_empty() {
        form = form.text("query", query.to_owned());
    }
    let metadata = info.metadata.as_ref();
    if let Some(name) = metadata.and_then(|m| m.get("name")).and_then(Value::as_str) {
        form = form.text("name", name.to_owned());
    }
    if let Some(tags) = metadata
        .and_then(|m| m.get("tags"))
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
    {
        form = form.text("tags", Value::Array(tags.clone()).to_string());
    }
    let reply = post(provider, provider.pages.clone(), form).await?;
    let url = reply
        .get("url")
        .and_then(Value::as_str)
        .ok_or(ShareError::InvalidResponse)?;
    let mut url = Url::parse(url).map_err(|_| ShareError::InvalidResponse)?;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "replay")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("replay", "1");
    Ok(url.to_string())
}

/// One multipart POST, answered with JSON.
async fn post(provider: &Provider, url: Url, form: Form) -> Result<Value, ShareError> {
    let response = provider
        .http
        .post(url)
        .multipart(form)
        .send()
        .await
        .map_err(|e| ShareError::Request(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(ShareError::Status(response.status().as_u16()));
    }
    response
        .json::<Value>()
        .await
        .map_err(|_| ShareError::InvalidResponse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls() {
        let url = |s: &str| storage_url(&Url::parse(s).unwrap()).to_string();
        assert_eq!(
            url("https://share.example.com/api/share"),
            "https://share.example.com/api/storage"
        );
        assert_eq!(
            url("http://127.0.0.1:9/share/upload"),
            "http://127.0.0.1:9/storage/upload"
        );
        assert_eq!(
            url("http://127.0.0.1:9/upload"),
            "http://127.0.0.1:9/upload"
        );
    }

    #[test]
    fn secrets_are_masked_everywhere() {
        let value =
            json!({"a": ["key sk-live-1234567890abcdef here", {"b": "mysecretvalue!"}], "n": 1});
        let out = redact(value, &["mysecretvalue".to_owned()]);
        let text = out.to_string();
        assert!(!text.contains("1234567890abcdef") && !text.contains("mysecretvalue"));
        assert!(text.contains(REDACTED));
        assert_eq!(out["n"], 1);
    }

    #[test]
    fn the_shared_record_keeps_only_what_the_ui_shows() {
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 2,
            workspace: "/srv/ws/s".into(),
            tenant: "default".into(),
            metadata: serde_json::from_value(json!({
                "name": "n", "tags": ["t"], "runtimeSettings": {"k": 1},
                "modelConfig": {"id": "m", "provider": "p", "apiKey": "x", "baseURL": "http://in"},
            }))
            .unwrap(),
        };
        let shared = shared_session(&info);
        assert_eq!(shared["workspace"], "");
        assert_eq!(shared["metadata"]["name"], "n");
        assert_eq!(
            shared["metadata"]["modelConfig"],
            json!({"id": "m", "provider": "p"})
        );
        assert!(shared["metadata"].get("runtimeSettings").is_none());
    }

    #[test]
    fn the_first_request() {
        let events = [
            json!({"type": "agent_run_start"}),
            json!({"type": "user_message", "content": [{"type": "image_url"}, {"type": "text", "text": "look"}]}),
            json!({"type": "user_message", "content": "later"}),
        ];
        assert_eq!(first_user_text(&events), "look");
        assert_eq!(first_user_text(&[]), "");
    }
}
