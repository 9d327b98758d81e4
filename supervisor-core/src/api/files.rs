//! The supervisor's view of session workspaces (api.md §3.11–3.13, §11.1; isolation.md §2.7):
//! file metadata and listings, the `@` search, path validation, and the static file server.
//!
//! The supervisor is trusted and (in root mode) root; the workspace is written by an untrusted
//! worker. So every path is opened beneath a handle of the session directory and used through
//! the open descriptor (`crate::workspace`), never joined onto a host path string and never
//! "canonicalised then prefix-checked". Walks are iterative, bounded in entries and depth, hold
//! one directory open at a time, and run on a blocking thread.
//!
//! Workspace files are the agent's, not ours: the static server sends them with
//! `Content-Security-Policy: sandbox` (no script runs, whatever the type) and `nosniff`, and
//! anything but passive types (images, plain text, CSS, JSON) as a download, so an agent-written
//! page never renders on the API's origin. Where `server.workspaceOrigin` names a second origin
//! for the same server, requests arriving under it get those pages inline (still sandboxed).
//!
//! Paths are relative to the *session's* workspace (ours is per session, unlike upstream's one
//! server workspace). A leading `/` means that workspace's root, as upstream clients send it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cap_std::fs::Dir;
use serde_json::{Value, json};
use shared::ids::SessionId;

use super::body::{JsonObject, Params, parse_session_id, session_id};
use crate::error::ApiError;
use crate::principal::Principal;
use crate::state::AppState;
use crate::workspace::{AccessError, Entry, SessionDir, read_beneath, read_file};

/// Longest request path accepted.
const MAX_PATH: usize = 4096;
/// Largest file the static server sends (a sparse 1 TiB file is refused, not read).
pub const MAX_SERVED_FILE: u64 = 64 * 1024 * 1024;
/// Entries a directory listing returns at most.
const MAX_LISTING: usize = 10_000;
/// Search: deepest directory read (root = 0), results returned, entries visited at most.
const SEARCH_DEPTH: usize = 5;
const SEARCH_RESULTS: usize = 20;
const SEARCH_BUDGET: usize = 50_000;

/// The routes of this module, added to the table in `api/mod.rs`.
pub(super) fn routes(table: super::Table) -> super::Table {
    use crate::auth::Access::Member;
    table
        .route(
            "/api/v1/sessions/workspace/files",
            &["GET"],
            Member,
            get(files),
        )
        .route(
            "/api/v1/sessions/workspace/search",
            &["GET"],
            Member,
            get(search),
        )
        .route(
            "/api/v1/sessions/workspace/validate",
            &["POST"],
            Member,
            post(validate),
        )
}

/// A request path made safe to hand to cap-std: relative, no `..`, no NUL or backslash, not too
/// long. `""` is the workspace root. cap-std remains the real barrier; this gives clear 400s.
fn relative_path(raw: &str) -> Result<PathBuf, ApiError> {
    if raw.len() > MAX_PATH {
        return Err(ApiError::InvalidPath("longer than 4096 bytes"));
    }
    if raw.contains('\0') {
        return Err(ApiError::InvalidPath("contains NUL"));
    }
    if raw.contains('\\') {
        return Err(ApiError::InvalidPath("contains a backslash"));
    }
    let mut clean = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            // Upstream clients send `/`-rooted paths meaning the workspace root.
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(ApiError::InvalidPath("contains `..`")),
            Component::Normal(part) => clean.push(part),
            Component::Prefix(_) => return Err(ApiError::InvalidPath("not a Unix path")),
        }
    }
    Ok(clean)
}

/// Maps an I/O error met on a handle inside the workspace (a listing, a lookup).
fn resolve_error(e: std::io::Error) -> ApiError {
    AccessError::from(e).into()
}

/// Milliseconds since the epoch as ISO 8601 UTC (`2025-09-16T12:00:00.000Z`).
fn iso8601(time: SystemTime) -> String {
    let ms = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

fn modified(meta: &cap_std::fs::Metadata) -> Value {
    meta.modified()
        .map(|t| json!(iso8601(t.into_std())))
        .unwrap_or(Value::Null)
}

/// Joins a request path (as given) with an entry name, forward slashes, rooted at `/`.
fn display_join(base: &str, name: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.is_empty() {
        format!("/{name}")
    } else if base.starts_with('/') {
        format!("{base}/{name}")
    } else {
        format!("/{base}/{name}")
    }
}

/// Runs blocking filesystem work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::WorkspaceAccess(e.to_string()))?
}

/// The session (restored if needed) and its workspace path.
async fn workspace_of(
    state: &AppState,
    principal: &Principal,
    params: &Params,
) -> Result<PathBuf, ApiError> {
    let id = session_id(params, None)?;
    let session = state.session_for(principal, &id).await?;
    Ok(session.workspace.clone())
}

/// `GET /api/v1/sessions/workspace/files?sessionId=&path=` (api.md §3.11).
async fn files(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let workspace = workspace_of(&state, &principal, &params).await?;
    let requested = params.get("path").unwrap_or("/").to_owned();
    let relative = relative_path(&requested)?;
    blocking(move || {
        // One open, beneath the session directory; what it is comes from that descriptor.
        let dir = match SessionDir::open(&workspace)?.entry(&relative)? {
            Entry::File(_, meta) => {
                let name = relative
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                return Ok(Json(json!({
                    "type": "file",
                    "name": name,
                    "size": meta.len(),
                    "modified": modified(&meta),
                    "path": requested,
                })));
            }
            Entry::Dir(dir) => dir,
        };
        let mut entries = Vec::new();
        // At most MAX_LISTING entries are read, whatever the directory holds.
        for entry in dir
            .entries()
            .map_err(resolve_error)?
            .take(MAX_LISTING)
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            // lstat-like: a symlink is reported as one, with its target text, never followed.
            let Ok(meta) = entry.metadata() else { continue };
            let mut item = json!({
                "name": name,
                "isDirectory": meta.is_dir(),
                "size": meta.len(),
                "modified": modified(&meta),
                "path": display_join(&requested, &name),
            });
            if meta.file_type().is_symlink() {
                item["isSymlink"] = json!(true);
                item["target"] = json!(
                    dir.read_link_contents(entry.file_name())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default()
                );
            }
            entries.push(item);
        }
        entries.sort_by(|a, b| {
            let dir_a = a["isDirectory"] == true;
            let dir_b = b["isDirectory"] == true;
            dir_b.cmp(&dir_a).then_with(|| {
                a["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_lowercase()
                    .cmp(&b["name"].as_str().unwrap_or_default().to_lowercase())
            })
        });
        Ok(Json(
            json!({"type": "directory", "path": requested, "files": entries}),
        ))
    })
    .await
}

/// `GET /api/v1/sessions/workspace/search?sessionId=&q=&type=` (api.md §3.12).
async fn search(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    let workspace = workspace_of(&state, &principal, &params).await?;
    let query = params
        .get("q")
        .ok_or(ApiError::SearchQueryRequired)?
        .to_owned();
    let kind = params.get("type").unwrap_or("all").to_owned();
    blocking(move || {
        let session_dir = SessionDir::open(&workspace)?;
        let root = session_dir.dir();
        let mut found = Vec::new();
        let wanted = |is_dir: bool| match kind.as_str() {
            "file" => !is_dir,
            "directory" => is_dir,
            _ => true,
        };
        if query.is_empty() {
            for entry in root
                .entries()
                .map_err(resolve_error)?
                .take(SEARCH_BUDGET)
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || name == "node_modules" {
                    continue;
                }
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if wanted(is_dir) {
                    found.push((0i64, is_dir, name.clone(), name));
                }
            }
        } else {
            let needle = query.to_lowercase();
            // Iterative walk, one directory open at a time: the stack holds paths (at most one
            // per entry visited), each opened beneath the handle when its turn comes. Real
            // directories only: a symlink is a leaf, never descended.
            let mut stack: Vec<(PathBuf, String, usize)> = vec![(PathBuf::new(), String::new(), 0)];
            let mut visited = 0usize;
            while let Some((path, prefix, depth)) = stack.pop() {
                if visited >= SEARCH_BUDGET {
                    break;
                }
                let entries = if path.as_os_str().is_empty() {
                    root.entries()
                } else {
                    root.open_dir(&path).and_then(|d| d.entries())
                };
                let Ok(entries) = entries else { continue };
                for entry in entries.take(SEARCH_BUDGET - visited) {
                    visited += 1;
                    let Ok(entry) = entry else { continue };
                    let os_name = entry.file_name();
                    let name = os_name.to_string_lossy().into_owned();
                    if name.starts_with('.') || name == "node_modules" {
                        continue;
                    }
                    let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                    let relative = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}/{name}")
                    };
                    let lower_name = name.to_lowercase();
                    let lower_rel = relative.to_lowercase();
                    if (lower_name.contains(&needle) || lower_rel.contains(&needle))
                        && wanted(is_dir)
                    {
                        let score = rank(&lower_name, &lower_rel, &needle, is_dir);
                        found.push((score, is_dir, name.clone(), relative.clone()));
                    }
                    if is_dir && depth < SEARCH_DEPTH {
                        stack.push((path.join(&os_name), relative, depth + 1));
                    }
                }
            }
        }
        found.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| b.1.cmp(&a.1))
                .then_with(|| a.2.to_lowercase().cmp(&b.2.to_lowercase()))
        });
        let items: Vec<Value> = found
            .into_iter()
            .take(SEARCH_RESULTS)
            .map(|(_, is_dir, name, relative)| {
                json!({
                    "name": name,
                    "path": format!("/{relative}"),
                    "type": if is_dir { "directory" } else { "file" },
                    "relativePath": relative,
                })
            })
            .collect();
        Ok(Json(json!({"items": items})))
    })
    .await
}

/// The ranking of api.md §3.12 (inputs already lower-cased).
fn rank(name: &str, relative: &str, query: &str, is_dir: bool) -> i64 {
    let mut score = 0i64;
    if name == query {
        score += 1000;
    } else if name.starts_with(query) {
        score += 800;
    } else if name.ends_with(query) {
        score += 700;
    } else if name.contains(query) {
        score += 500;
    }
    if relative.ends_with(query) {
        score += 600;
    } else if relative.contains(query) {
        score += 300;
    }
    let segments: Vec<&str> = relative.split('/').collect();
    score += (50 - 5 * segments.len() as i64).max(0);
    if is_dir && query.contains('/') {
        score += 100;
    }
    if segments.len() > 4 && !name.contains(query) {
        score -= 200;
    }
    let parts: Vec<&str> = query.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() > 1 {
        let mut matched = 0;
        let mut next = 0;
        for segment in &segments {
            if next < parts.len() && segment.contains(parts[next]) {
                matched += 1;
                next += 1;
            }
        }
        score += if matched == parts.len() {
            400
        } else {
            100 * matched as i64
        };
    }
    score
}

/// `POST /api/v1/sessions/workspace/validate?sessionId=` (api.md §3.13).
async fn validate(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let workspace = workspace_of(&state, &principal, &params).await?;
    let paths: Vec<String> = body
        .get("paths")
        .and_then(Value::as_array)
        .ok_or(ApiError::PathsRequired)?
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_owned())
        .collect();
    blocking(move || {
        let session_dir = SessionDir::open(&workspace)?;
        let root = session_dir.dir();
        let results = paths
            .into_iter()
            .map(|input| {
                let relative = match relative_path(&input) {
                    Ok(r) => r,
                    Err(_) => {
                        return json!({"path": input, "exists": false, "error": "Path outside workspace"});
                    }
                };
                let meta = if relative.as_os_str().is_empty() {
                    root.dir_metadata()
                } else {
                    root.metadata(&relative)
                };
                match meta {
                    Ok(m) => json!({"path": input, "exists": true,
                                    "type": if m.is_dir() { "directory" } else { "file" }}),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        json!({"path": input, "exists": false})
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied
                        || e.raw_os_error() == Some(libc::EXDEV) =>
                    {
                        json!({"path": input, "exists": false, "error": "Path outside workspace"})
                    }
                    Err(_) => json!({"path": input, "exists": false, "error": "Access denied"}),
                }
            })
            .collect::<Vec<_>>();
        Ok(Json(json!({"results": results})))
    })
    .await
}

/// Where a static request names its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    /// `sessionId` in the query or the `x-session-id` header: the request is for a workspace
    /// file, and a missing session or file is answered as such.
    Explicitly,
    /// Only the Referer's last path segment: the web UI's own assets come this way too, so a
    /// missing file falls through to the UI.
    ByReferer,
}

/// The session a static request belongs to: `sessionId` in the query, the `x-session-id`
/// header, or the last segment of the Referer path (api.md §11.1). An explicit id that is not a
/// valid session id is returned as it is (and found nowhere).
fn static_session(uri: &Uri, headers: &HeaderMap) -> Option<(String, Named)> {
    let from_query = uri.query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "sessionId")
            .map(|(_, v)| v.to_owned())
    });
    let from_header = || {
        headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(id) = from_query.or_else(from_header) {
        return Some((id, Named::Explicitly));
    }
    headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.split('?').next())
        .and_then(|r| r.trim_end_matches('/').rsplit('/').next())
        .filter(|id| SessionId::parse(id).is_ok())
        .map(|id| (id.to_owned(), Named::ByReferer))
}

/// The static workspace server (api.md §11.1), tried before the JSON 404 for paths outside
/// `/api/` that contain a `.` or start with `/static/` or `/assets/`.
pub(super) async fn workspace_static(
    State(state): State<Arc<AppState>>,
    principal: Option<Principal>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match serve_static(&state, principal.as_ref(), &method, &uri, &headers).await {
        Some(response) => response,
        None => super::web_ui_or_not_found(State(state), method, uri).await,
    }
}

/// A workspace file, a 404/400 JSON answer, or `None` to let the web UI answer.
async fn serve_static(
    state: &AppState,
    principal: Option<&Principal>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Response> {
    let path = uri.path().to_owned();
    let eligible = method == Method::GET || method == Method::HEAD;
    if !eligible
        || path.starts_with("/api/")
        || !(path.contains('.') || path.starts_with("/static/") || path.starts_with("/assets/"))
    {
        return None;
    }
    let (id, named) = static_session(uri, headers)?;
    let explicit = named == Named::Explicitly;
    // A request without a principal (auth on, no credential) sees no workspace: it is answered
    // like one naming a session that does not exist.
    let found = match (parse_session_id(&id), principal) {
        (Ok(id), Some(principal)) => state.session_for(principal, &id).await,
        (Ok(id), None) => Err(ApiError::SessionNotFound(id.to_string())),
        (Err(e), _) => Err(e),
    };
    let session = match found {
        Ok(session) => session,
        Err(e) if explicit => return Some(ApiError::into_response(e)),
        Err(_) => return None,
    };
    let workspace = session.workspace.clone();
    let decoded = match percent_decode(&path) {
        Some(decoded) => decoded,
        None if explicit => {
            return Some(ApiError::InvalidPath("malformed percent-encoding").into_response());
        }
        None => return None,
    };
    let relative = match relative_path(&decoded) {
        Ok(relative) => relative,
        Err(e) if explicit => return Some(e.into_response()),
        Err(_) => return None,
    };
    let query_suffix = format!("?sessionId={}", percent_encode(&id));
    let inline = inline_allowed(state, uri, headers);
    let served = tokio::task::spawn_blocking(move || {
        read_for_static(&workspace, &relative, &decoded, &query_suffix, inline)
    })
    .await;
    match served {
        Ok(Ok(response)) => Some(response),
        // A missing path falls through to the web UI only when the session came from the
        // Referer (the UI's own assets are requested that way).
        Ok(Err(AccessError::NotFound)) if !explicit => None,
        // An entry that exists but may not be served (a symlink leading out, a FIFO, ...) is
        // refused outright rather than answered with the UI's page.
        Ok(Err(e)) => Some(ApiError::from(e).into_response()),
        Err(e) => Some(ApiError::WorkspaceAccess(e.to_string()).into_response()),
    }
}

/// Whether agent-written active content (HTML, SVG, scripts, ...) may be shown inline: only on
/// the separate `server.workspaceOrigin`, recognised by the request's `Host`.
fn inline_allowed(state: &AppState, uri: &Uri, headers: &HeaderMap) -> bool {
    let Some(origin) = state.config.server.workspace_origin() else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    host.is_some_and(|host| origin.matches_host(host))
}

/// Opens `relative` beneath the session directory once and answers from that descriptor: a
/// regular file's bytes (up to [`MAX_SERVED_FILE`]), or for a directory its `index.html` or a
/// listing.
fn read_for_static(
    workspace: &Path,
    relative: &Path,
    shown: &str,
    query_suffix: &str,
    inline: bool,
) -> Result<Response, AccessError> {
    match SessionDir::open(workspace)?.entry(relative)? {
        Entry::File(file, meta) => {
            let bytes = read_file(file, &meta, MAX_SERVED_FILE)?;
            Ok(file_response(shown, bytes, inline))
        }
        Entry::Dir(dir) => match read_beneath(&dir, Path::new("index.html"), MAX_SERVED_FILE) {
            Ok(index) => Ok(file_response("index.html", index, inline)),
            Err(_) => Ok(listing(&dir, shown, query_suffix)),
        },
    }
}

fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "xhtml" => "application/xhtml+xml",
        "xml" => "application/xml",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" | "md" | "log" | "csv" | "rs" | "py" | "ts" | "toml" | "yaml" | "yml" => {
            "text/plain; charset=utf-8"
        }
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

/// Types a browser only displays: no script, no markup that could carry any. Everything else
/// (HTML, XHTML, SVG, XML, scripts, PDF, unknown types) is active.
fn is_passive(content_type: &str) -> bool {
    matches!(
        content_type,
        "image/png"
            | "image/jpeg"
            | "image/gif"
            | "image/webp"
            | "text/plain; charset=utf-8"
            | "text/css; charset=utf-8"
            | "application/json"
    )
}

/// A workspace file as the static server sends it: sandboxed, never sniffed, and when active
/// and not on the workspace origin (`inline` false), a download.
fn file_response(name: &str, bytes: Vec<u8>, inline: bool) -> Response {
    let kind = content_type(name);
    let mut response = sandboxed(kind, bytes);
    if !inline && !is_passive(kind) {
        let file_name = name.rsplit('/').next().unwrap_or(name);
        // The plain name for old clients (ASCII, no quote or backslash), the exact one encoded.
        let plain: String = file_name
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let disposition = format!(
            "attachment; filename=\"{plain}\"; filename*=UTF-8''{}",
            percent_encode(file_name)
        );
        if let Ok(value) = HeaderValue::from_str(&disposition) {
            response
                .headers_mut()
                .insert(header::CONTENT_DISPOSITION, value);
        }
    }
    response
}

/// A response carrying workspace content: `Content-Security-Policy: sandbox` (a unique opaque
/// origin, no script, no forms, no plugins, whatever the document is) and `nosniff` (the type
/// we name is the type the browser uses).
fn sandboxed(kind: &'static str, bytes: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(bytes));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Our own page listing a directory (names escaped), shown inline, still sandboxed. At most
/// [`MAX_LISTING`] entries are read.
fn listing(dir: &Dir, shown: &str, query_suffix: &str) -> Response {
    let mut rows: Vec<(bool, String, u64)> = dir
        .entries()
        .map(|entries| {
            entries
                .take(MAX_LISTING)
                .flatten()
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    Some((
                        meta.is_dir(),
                        e.file_name().to_string_lossy().into_owned(),
                        meta.len(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let base = shown.trim_end_matches('/');
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Agent Workspace</title></head><body><h1>Agent Workspace: {}</h1><table><tr><th>Name</th><th>Size</th></tr>",
        html_escape(shown)
    );
    for (is_dir, name, size) in rows {
        let href = format!("{base}/{}{}", percent_encode(&name), query_suffix);
        let label = if is_dir { format!("{name}/") } else { name };
        html.push_str(&format!(
            "<tr><td><a href=\"{}\">{}</a></td><td>{}</td></tr>",
            html_escape(&href),
            html_escape(&label),
            if is_dir {
                String::new()
            } else {
                size.to_string()
            }
        ));
    }
    html.push_str("</table></body></html>");
    sandboxed("text/html; charset=utf-8", html.into_bytes())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Decodes `%XX` escapes of a URI path; `None` for malformed escapes or non-UTF-8 results.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_are_checked() {
        assert_eq!(relative_path("/").unwrap(), PathBuf::new());
        assert_eq!(
            relative_path("/src/a.rs").unwrap(),
            PathBuf::from("src/a.rs")
        );
        assert_eq!(relative_path("docs/./x").unwrap(), PathBuf::from("docs/x"));
        assert!(relative_path("../../etc/passwd").is_err());
        assert!(relative_path("a/../b").is_err());
        assert!(relative_path("a\0b").is_err());
        assert!(relative_path("a\\..\\b").is_err());
        assert!(relative_path(&"x".repeat(5000)).is_err());
    }

    #[test]
    fn iso_dates() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_758_024_000_123);
        assert_eq!(iso8601(t), "2025-09-16T12:00:00.123Z");
        assert_eq!(iso8601(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(percent_decode("/%2e%2e/x").as_deref(), Some("/../x"));
        assert_eq!(percent_decode("/a%zz"), None);
    }

    #[test]
    fn ranking_prefers_exact_names() {
        assert!(
            rank("app.ts", "src/app.ts", "app.ts", false)
                > rank("myapp.ts", "src/myapp.ts", "app.ts", false)
        );
    }

    async fn body(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn static_reads_stay_inside_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(dir.path().join("secret.txt"), "host").unwrap();
        std::fs::write(ws.join("a.txt"), "inside").unwrap();
        std::os::unix::fs::symlink("../secret.txt", ws.join("rel")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), ws.join("abs")).unwrap();
        std::os::unix::fs::symlink("a.txt", ws.join("ok")).unwrap();
        nix::unistd::mkfifo(&ws.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let read = |path: &str| read_for_static(&ws, Path::new(path), path, "", false);
        assert!(matches!(read("rel"), Err(AccessError::Outside)));
        assert!(matches!(read("abs"), Err(AccessError::Outside)));
        assert!(matches!(read("pipe"), Err(AccessError::NotRegular)));
        assert!(matches!(read("missing"), Err(AccessError::NotFound)));
        assert_eq!(body(read("ok").unwrap()).await, b"inside");
        let listing = read("").unwrap();
        assert_eq!(
            listing.headers()[header::CONTENT_SECURITY_POLICY],
            "sandbox"
        );
        assert!(
            String::from_utf8(body(listing).await)
                .unwrap()
                .contains("a.txt")
        );
    }

    #[test]
    fn active_types_are_sandboxed_downloads_unless_inline() {
        let cases = [
            ("report.html", true),
            ("chart.svg", true),
            ("page.xhtml", true),
            ("feed.xml", true),
            ("app.js", true),
            ("doc.pdf", true),
            ("blob.bin", true),
            ("a.png", false),
            ("b.JPG", false),
            ("notes.txt", false),
            ("data.json", false),
        ];
        for (name, active) in cases {
            for inline in [false, true] {
                let response = file_response(&format!("dir/{name}"), Vec::new(), inline);
                let headers = response.headers();
                assert_eq!(
                    headers[header::CONTENT_SECURITY_POLICY],
                    "sandbox",
                    "{name}"
                );
                assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{name}");
                let disposition = headers.get(header::CONTENT_DISPOSITION);
                if active && !inline {
                    let disposition = disposition.unwrap().to_str().unwrap();
                    assert!(
                        disposition.starts_with(&format!("attachment; filename=\"{name}\"")),
                        "{disposition}"
                    );
                } else {
                    assert!(disposition.is_none(), "{name} inline={inline}");
                }
            }
        }
        let odd = file_response("r\u{e9}p\"ort.html", Vec::new(), false);
        assert_eq!(
            odd.headers()[header::CONTENT_DISPOSITION],
            "attachment; filename=\"r_p_ort.html\"; filename*=UTF-8''r%C3%A9p%22ort.html"
        );
    }
}
