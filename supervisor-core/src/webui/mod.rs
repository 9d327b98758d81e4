//! The web UI, served on every GET that is not an API call (api.md §11.2–§11.4): a UI directory
//! from `webui.staticPath` (the official Tarko UI that `scripts/fetch-webui.sh` fetches), or,
//! when none is configured, the built-in UI embedded in the binary, so that a browser is all a
//! user needs.
//!
//! Either way, pages get the same treatment: `index.html` with a script injected before its
//! first `</head>` that sets `window.AGENT_BASE_URL` and `window.AGENT_WEB_UI_CONFIG`, for every
//! path that is not an asset (the SPA fallback: `/`, `/<sessionId>`, `/creating`, ...).

mod base;
mod builtin;

use std::path::{Component, Path, PathBuf};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

pub use base::Base;

use crate::config::Config;

/// Paths with these endings are assets: served from the UI directory if they exist, never
/// answered with the page (api.md §11.2 step 2).
const ASSET_EXTENSIONS: &[&str] = &[
    ".js", ".css", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".woff", ".woff2", ".ttf",
    ".eot", ".map",
];

/// The logo the browser gets unless one is configured: inline, because upstream's default is
/// a remote URL, which a server without internet access (or a shared page opened offline)
/// shows as a broken image.
const DEFAULT_LOGO: &str = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' \
viewBox='0 0 32 32'%3E%3Crect width='32' height='32' rx='7' fill='%231f2937'/%3E%3Cpath \
d='M16 5l9 11-9 11-9-11z' fill='%2360a5fa'/%3E%3C/svg%3E";

#[derive(Debug, thiserror::Error)]
pub enum WebUiError {
    #[error("could not open the web UI directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not read the web UI page {path}: {source}")]
    Page {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the UI's files come from.
#[derive(Debug)]
enum Source {
    /// A UI directory (canonical path), read on every request so it can be replaced live.
    Directory(PathBuf),
    /// The UI compiled into the binary.
    BuiltIn,
}

/// The configured web UI.
#[derive(Debug)]
pub struct WebUi {
    source: Source,
    base: Option<Base>,
    /// The UI config the browser sees (`AGENT_WEB_UI_CONFIG`).
    browser_config: Value,
}

impl WebUi {
    /// The UI the configuration asks for.
    ///
    /// # Errors
    /// The configured directory cannot be resolved.
    pub fn from_config(config: &Config) -> Result<Self, WebUiError> {
        let webui = config.webui.clone().unwrap_or_default();
        let source = match webui.static_path() {
            Some(dir) => Source::Directory(
                std::fs::canonicalize(&dir)
                    .map_err(|source| WebUiError::Directory { path: dir, source })?,
            ),
            None => Source::BuiltIn,
        };
        Ok(Self {
            source,
            base: webui.base().map(Base::parse),
            browser_config: browser_config(config, &webui.0),
        })
    }

    /// Whether the official (or another directory) UI is served rather than the built-in one.
    pub fn is_directory(&self) -> bool {
        matches!(self.source, Source::Directory(_))
    }

    /// The merged UI config as the browser gets it.
    pub fn browser_config(&self) -> &Value {
        &self.browser_config
    }

    /// For `<base>/api/...`: the API path to route it to (api.md §11.4). `None` for every other
    /// path, and always without a base.
    pub fn api_path(&self, path: &str) -> Option<String> {
        let inner = self.base.as_ref()?.extract(path)?;
        inner.starts_with("/api/").then_some(inner)
    }

    /// The answer to a GET of `path`, or `None` to fall through to the JSON 404.
    pub async fn serve(&self, path: &str) -> Option<Response> {
        let inner = match &self.base {
            Some(base) => base.extract(path)?,
            None => path.to_owned(),
        };
        if inner.starts_with("/api/") {
            return None;
        }
        if is_asset(&inner) {
            return match &self.source {
                Source::Directory(root) => {
                    let (bytes, mime) = read_asset(root, &inner).await?;
                    Some(asset_response(bytes, &mime))
                }
                Source::BuiltIn => {
                    let (bytes, mime) = builtin::asset(&inner)?;
                    Some(asset_response(bytes, &mime))
                }
            };
        }
        match self.page().await {
            Ok(page) => Some(html_response(&inject_head(&page, &self.boot_script()))),
            Err(e) => {
                tracing::error!(error = %e, "cannot serve the web UI");
                None
            }
        }
    }

    /// The UI's `index.html`, untouched: for the live UI and for shared replay pages.
    ///
    /// # Errors
    /// The configured directory's `index.html` cannot be read.
    pub async fn page(&self) -> Result<String, WebUiError> {
        match &self.source {
            Source::Directory(root) => {
                let path = root.join("index.html");
                tokio::fs::read_to_string(&path)
                    .await
                    .map_err(|source| WebUiError::Page { path, source })
            }
            Source::BuiltIn => Ok(builtin::page().to_owned()),
        }
    }

    /// What the live UI needs before its own scripts run: the API base (same origin) and its
    /// config (api.md §11.2 step 4).
    fn boot_script(&self) -> String {
        format!(
            "<script>window.AGENT_BASE_URL = \"\";\nwindow.AGENT_WEB_UI_CONFIG = {};</script>",
            script_json(&self.browser_config)
        )
    }
}

/// The UI config the browser gets: upstream CLI's defaults under the configured `webui`
/// object. `staticPath` stays on the server: it is a server path, and the UI never reads it.
fn browser_config(config: &Config, webui: &Map<String, Value>) -> Value {
    let title = config.name.clone().unwrap_or_else(|| "Tarko".into());
    let mut merged = json!({
        "type": "static",
        "title": title,
        "subtitle": "Build your own effective Agents and run anywhere!",
        "welcomTitle": format!("Hello, {title}!"),
        "welcomePrompts": ["Introduce yourself"],
        "logo": DEFAULT_LOGO,
    });
    deep_merge(&mut merged, &Value::Object(webui.clone()));
    if let Some(object) = merged.as_object_mut() {
        object.remove("staticPath");
    }
    merged
}

/// Merges `over` into `into`: nested objects key by key, everything else replaced; `null`
/// never overwrites (JavaScript's `undefined` in upstream's merge).
fn deep_merge(into: &mut Value, over: &Value) {
    match (into, over) {
        (Value::Object(into), Value::Object(over)) => {
            for (key, value) in over {
                if value.is_null() {
                    continue;
                }
                match into.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        deep_merge(existing, value);
                    }
                    _ => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (into, over) => *into = over.clone(),
    }
}

/// JSON that is safe inside a `<script>` element: no `<`, `>` or `/` can close it or open a
/// comment (api.md §10 step 5), and the two line separators JavaScript once rejected in
/// strings are escaped too.
pub fn script_json(value: &Value) -> String {
    let text = value.to_string();
    let mut out = String::with_capacity(text.len() + text.len() / 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003C"),
            '>' => out.push_str("\\u003E"),
            '/' => out.push_str("\\/"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// `html` with `script` inserted right before its first `</head>` (at the very start when it
/// has none, which still runs it before the page's own scripts).
pub fn inject_head(html: &str, script: &str) -> String {
    let at = html.find("</head>").unwrap_or(0);
    let mut out = String::with_capacity(html.len() + script.len() + 1);
    out.push_str(&html[..at]);
    out.push_str(script);
    out.push('\n');
    out.push_str(&html[at..]);
    out
}

fn is_asset(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ASSET_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

/// `%XX` sequences decoded; `None` when they do not make UTF-8.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A file under `root` named by a URL path, if it is a regular file that really lies inside
/// `root` (no `..`, no symlink out of it).
async fn read_asset(root: &Path, url_path: &str) -> Option<(Vec<u8>, String)> {
    let decoded = percent_decode(url_path)?;
    let relative = Path::new(decoded.trim_start_matches('/'));
    if decoded.contains('\0')
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return None;
    }
    let resolved = tokio::fs::canonicalize(root.join(relative)).await.ok()?;
    if !resolved.starts_with(root) || !tokio::fs::metadata(&resolved).await.ok()?.is_file() {
        return None;
    }
    let bytes = tokio::fs::read(&resolved).await.ok()?;
    let mime = mime_guess::from_path(&resolved)
        .first_or_octet_stream()
        .to_string();
    Some((bytes, mime))
}

fn asset_response(bytes: impl Into<axum::body::Body>, mime: &str) -> Response {
    let mut response = (StatusCode::OK, bytes.into()).into_response();
    if let Ok(value) = HeaderValue::from_str(mime) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn html_response(html: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page carries the live config; a cached copy would hide a changed one.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        html.to_owned(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_safe_json() {
        let value = json!({"a": "</script><!-- \u{2028}"});
        let text = script_json(&value);
        assert!(!text.contains('<') && !text.contains('>') && !text.contains("</"));
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn injection_goes_before_the_first_head_end() {
        let html = "<html><head><title>x</title></head><body></body></html>";
        let out = inject_head(html, "<script>1</script>");
        assert!(out.starts_with("<html><head><title>x</title><script>1</script>"));
        assert_eq!(inject_head("<p>", "<s>"), "<s>\n<p>");
    }

    #[test]
    fn config_merges_over_defaults_and_hides_the_path() {
        let config = crate::config::load_with_env(None, &Default::default(), |_| None).unwrap();
        let webui = json!({"staticPath": "/srv/ui", "title": "Mine", "layout": {"enableHome": false}, "subtitle": null});
        let merged = browser_config(&config, webui.as_object().unwrap());
        assert_eq!(merged["title"], "Mine");
        assert_eq!(merged["type"], "static");
        assert_eq!(merged["layout"]["enableHome"], false);
        assert!(merged["subtitle"].is_string());
        assert!(merged.get("staticPath").is_none());
    }

    #[test]
    fn assets_and_decoding() {
        assert!(is_asset("/static/font/a.WOFF2"));
        assert!(!is_asset("/V1StGXR8_Z5jdHi6B-myT"));
        assert_eq!(percent_decode("/a%20b").as_deref(), Some("/a b"));
        assert_eq!(percent_decode("/a%2"), None);
    }

    #[tokio::test]
    async fn assets_stay_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("static")).unwrap();
        std::fs::write(root.join("static/a.css"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("static/link.css")).unwrap();
        let (bytes, mime) = read_asset(&root, "/static/a.css").await.unwrap();
        assert_eq!((bytes.as_slice(), mime.as_str()), (&b"x"[..], "text/css"));
        assert!(
            read_asset(&root, "/static/../../outside.css")
                .await
                .is_none()
        );
        assert!(
            read_asset(&root, "/static/%2e%2e/%2e%2e/outside.css")
                .await
                .is_none()
        );
        assert!(read_asset(&root, "/static/link.css").await.is_none());
        assert!(read_asset(&root, "/static/none.css").await.is_none());
    }
}
