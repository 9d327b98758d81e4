//! The supervisor's view of session workspaces (api.md §3.11–3.13, §11.1; isolation.md §2.7):
//! file metadata and listings, the `@` search, path validation, and the static file server.
//!
//! The supervisor is trusted and (in root mode) root; the workspace is written by an untrusted
//! worker. So every path is resolved relative to a directory handle with `cap-std` (backed by
//! `openat2(RESOLVE_BENEATH)`), never joined onto a host path string and never "canonicalised
//! then prefix-checked" (racy against a worker swapping a directory for a symlink). Symlinks,
//! `..` and absolute links that leave the workspace fail; links that stay inside are followed.
//! Files are opened non-blocking and checked after opening: only regular files are read (a FIFO
//! would hang the request, a device could be anything), and only up to a size cap.
//!
//! Paths are relative to the *session's* workspace (ours is per session, unlike upstream's one
//! server workspace). A leading `/` means that workspace's root, as upstream clients send it.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt as _};
use serde_json::{Value, json};
use shared::ids::now_ms;

use super::body::{JsonObject, Params};
use crate::error::ApiError;
use crate::state::AppState;

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

/// The routes of this module, merged into the router in `api/mod.rs`.
pub(super) fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/api/v1/sessions/workspace/files", get(files))
        .route("/api/v1/sessions/workspace/search", get(search))
        .route("/api/v1/sessions/workspace/validate", post(validate))
}

/// What the file API answers when it cannot.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Session(#[from] ApiError),
    #[error("Invalid path: {0}")]
    InvalidPath(&'static str),
    #[error("Path not found")]
    NotFound,
    #[error("Invalid path type")]
    InvalidType,
    #[error("File is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("Search query parameter is required")]
    QueryRequired,
    #[error("Paths array is required")]
    PathsRequired,
    #[error("{what}: {message}")]
    Internal { what: &'static str, message: String },
}

impl IntoResponse for FileError {
    fn into_response(self) -> Response {
        let (status, code, error) = match &self {
            Self::Session(e) => return ApiError::into_response(clone_api_error(e)),
            Self::InvalidPath(_) => (StatusCode::BAD_REQUEST, "INVALID_PATH", self.to_string()),
            Self::NotFound => (StatusCode::NOT_FOUND, "PATH_NOT_FOUND", self.to_string()),
            Self::InvalidType => (
                StatusCode::BAD_REQUEST,
                "INVALID_PATH_TYPE",
                self.to_string(),
            ),
            Self::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "FILE_TOO_LARGE",
                "File too large".to_owned(),
            ),
            Self::QueryRequired => (
                StatusCode::BAD_REQUEST,
                "QUERY_PARAM_REQUIRED",
                self.to_string(),
            ),
            Self::PathsRequired => (StatusCode::BAD_REQUEST, "PATHS_REQUIRED", self.to_string()),
            Self::Internal { what, .. } => {
                tracing::error!(error = %self, "workspace file API failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL_ERROR",
                    (*what).to_owned(),
                )
            }
        };
        let message = match &self {
            Self::Internal { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let body = json!({
            "error": error,
            "code": code,
            "message": message,
            "details": {"timestamp": now_ms()},
        });
        (status, Json(body)).into_response()
    }
}

/// `ApiError` is not `Clone`; the few variants the file API can produce are rebuilt.
fn clone_api_error(e: &ApiError) -> ApiError {
    match e {
        ApiError::SessionIdRequired => ApiError::SessionIdRequired,
        ApiError::SessionNotFound(id) => ApiError::SessionNotFound(id.clone()),
        other => ApiError::Internal(other.to_string()),
    }
}

/// A request path made safe to hand to cap-std: relative, no `..`, no NUL or backslash, not too
/// long. `""` is the workspace root. cap-std remains the real barrier; this gives clear 400s.
fn relative_path(raw: &str) -> Result<PathBuf, FileError> {
    if raw.len() > MAX_PATH {
        return Err(FileError::InvalidPath("longer than 4096 bytes"));
    }
    if raw.contains('\0') {
        return Err(FileError::InvalidPath("contains NUL"));
    }
    if raw.contains('\\') {
        return Err(FileError::InvalidPath("contains a backslash"));
    }
    let mut clean = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            // Upstream clients send `/`-rooted paths meaning the workspace root.
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(FileError::InvalidPath("contains `..`")),
            Component::Normal(part) => clean.push(part),
            Component::Prefix(_) => return Err(FileError::InvalidPath("not a Unix path")),
        }
    }
    Ok(clean)
}

/// The session's workspace as a directory handle. The workspace entry itself is created and
/// owned by the server (S2) and opened without following a final symlink.
fn open_workspace(path: &Path) -> Result<Dir, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|_| FileError::NotFound)?;
    Ok(Dir::from_std_file(file))
}

/// Maps an I/O error from a resolution under the handle: anything that did not resolve inside
/// the workspace is "not found" to the client.
fn resolve_error(e: std::io::Error) -> FileError {
    match e.kind() {
        std::io::ErrorKind::NotFound
        | std::io::ErrorKind::PermissionDenied
        | std::io::ErrorKind::NotADirectory => FileError::NotFound,
        _ => match e.raw_os_error() {
            Some(libc::ELOOP | libc::EXDEV | libc::ENAMETOOLONG) => FileError::NotFound,
            _ => FileError::Internal {
                what: "Failed to access workspace files",
                message: e.to_string(),
            },
        },
    }
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
    work: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FileError::Internal {
            what: "Failed to access workspace files",
            message: e.to_string(),
        })?
}

/// The session (restored if needed) and its workspace path.
async fn workspace_of(state: &AppState, params: &Params) -> Result<PathBuf, FileError> {
    let id = params
        .get("sessionId")
        .filter(|id| !id.is_empty())
        .ok_or(ApiError::SessionIdRequired)?;
    let session = state.session(id).await?;
    Ok(session.workspace.clone())
}

/// `GET /api/v1/sessions/workspace/files?sessionId=&path=` (api.md §3.11).
async fn files(
    State(state): State<Arc<AppState>>,
    params: Params,
) -> Result<Json<Value>, FileError> {
    let workspace = workspace_of(&state, &params).await?;
    let requested = params.get("path").unwrap_or("/").to_owned();
    let relative = relative_path(&requested)?;
    blocking(move || {
        let root = open_workspace(&workspace)?;
        let meta = if relative.as_os_str().is_empty() {
            root.dir_metadata().map_err(resolve_error)?
        } else {
            root.metadata(&relative).map_err(resolve_error)?
        };
        if meta.is_file() {
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
        if !meta.is_dir() {
            return Err(FileError::InvalidType);
        }
        let dir = if relative.as_os_str().is_empty() {
            root
        } else {
            root.open_dir(&relative).map_err(resolve_error)?
        };
        let mut entries = Vec::new();
        for entry in dir.entries().map_err(resolve_error)?.flatten() {
            if entries.len() >= MAX_LISTING {
                break;
            }
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
                    dir.read_link_contents(&name)
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
    params: Params,
) -> Result<Json<Value>, FileError> {
    let workspace = workspace_of(&state, &params).await?;
    let query = params.get("q").ok_or(FileError::QueryRequired)?.to_owned();
    let kind = params.get("type").unwrap_or("all").to_owned();
    blocking(move || {
        let root = open_workspace(&workspace)?;
        let mut found = Vec::new();
        let wanted = |is_dir: bool| match kind.as_str() {
            "file" => !is_dir,
            "directory" => is_dir,
            _ => true,
        };
        if query.is_empty() {
            for entry in root.entries().map_err(resolve_error)?.flatten() {
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
            // Iterative walk; real directories only (a symlink is a leaf, never descended).
            let mut stack: Vec<(Option<Dir>, String, usize)> = vec![(None, String::new(), 0)];
            let mut visited = 0usize;
            while let Some((dir, prefix, depth)) = stack.pop() {
                let entries = match &dir {
                    None => root.entries(),
                    Some(d) => d.entries(),
                };
                let Ok(entries) = entries else { continue };
                for entry in entries.flatten() {
                    visited += 1;
                    if visited > SEARCH_BUDGET {
                        break;
                    }
                    let name = entry.file_name().to_string_lossy().into_owned();
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
                        let child = match &dir {
                            None => root.open_dir(&name),
                            Some(d) => d.open_dir(&name),
                        };
                        if let Ok(child) = child {
                            stack.push((Some(child), relative, depth + 1));
                        }
                    }
                }
                if visited > SEARCH_BUDGET {
                    break;
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
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, FileError> {
    let workspace = workspace_of(&state, &params).await?;
    let paths: Vec<String> = body
        .get("paths")
        .and_then(Value::as_array)
        .ok_or(FileError::PathsRequired)?
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_owned())
        .collect();
    blocking(move || {
        let root = open_workspace(&workspace)?;
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

/// The session a static request belongs to: `sessionId` in the query, the `x-session-id`
/// header, or the last segment of the Referer path (api.md §11.1).
fn static_session(uri: &Uri, headers: &HeaderMap) -> Option<String> {
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
    let from_referer = || {
        headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.split('?').next())
            .and_then(|r| r.trim_end_matches('/').rsplit('/').next())
            .map(str::to_owned)
    };
    from_query
        .or_else(from_header)
        .or_else(from_referer)
        .filter(|id| shared::ids::is_valid_session_id(id))
}

/// The static workspace server (api.md §11.1), tried before the JSON 404 for paths outside
/// `/api/` that contain a `.` or start with `/static/` or `/assets/`.
pub(super) async fn workspace_static(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match serve_static(&state, &method, &uri, &headers).await {
        Some(response) => response,
        None => super::web_ui_or_not_found(State(state), method, uri).await,
    }
}

async fn serve_static(
    state: &AppState,
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
    let id = static_session(uri, headers)?;
    let workspace = state.session(&id).await.ok()?.workspace.clone();
    let decoded = percent_decode(&path)?;
    let relative = relative_path(&decoded).ok()?;
    let query_suffix = format!("?sessionId={id}");
    let served = blocking(move || {
        let served = read_for_static(&workspace, &relative, &decoded, &query_suffix);
        // A missing path falls through (the web UI's own assets are requested with a session
        // in the Referer); an entry that exists but may not be served (a symlink leading out,
        // a FIFO, ...) is refused outright rather than answered with the UI's page.
        let present = served.is_err()
            && open_workspace(&workspace)
                .is_ok_and(|root| root.symlink_metadata(&relative).is_ok());
        Ok((served, present))
    })
    .await
    .unwrap_or((Err(FileError::NotFound), false));
    match served {
        (Ok(Some(response)), _) => Some(response),
        (Ok(None), _) => None,
        (Err(e @ (FileError::TooLarge { .. } | FileError::InvalidType)), _) => {
            Some(e.into_response())
        }
        (Err(_), true) => Some(FileError::NotFound.into_response()),
        (Err(_), false) => None,
    }
}

/// Opens the file under the handle (non-blocking: a FIFO must not hang us), checks the opened
/// handle's type and size, and reads it; a directory gives its `index.html` or a listing.
fn read_for_static(
    workspace: &Path,
    relative: &Path,
    shown: &str,
    query_suffix: &str,
) -> Result<Option<Response>, FileError> {
    let root = open_workspace(workspace)?;
    let meta = if relative.as_os_str().is_empty() {
        root.dir_metadata().map_err(resolve_error)?
    } else {
        root.metadata(relative).map_err(resolve_error)?
    };
    if meta.is_dir() {
        let dir = if relative.as_os_str().is_empty() {
            root
        } else {
            root.open_dir(relative).map_err(resolve_error)?
        };
        if let Ok(Some(index)) = read_regular(&dir, Path::new("index.html")) {
            return Ok(Some(file_response("index.html", index)));
        }
        return Ok(Some(listing(&dir, shown, query_suffix)));
    }
    match read_regular(&root, relative)? {
        Some(bytes) => Ok(Some(file_response(shown, bytes))),
        None => Ok(None),
    }
}

/// Reads a regular file under `dir`. `Ok(None)` if it does not exist.
fn read_regular(dir: &Dir, relative: &Path) -> Result<Option<Vec<u8>>, FileError> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
    let file = match dir.open_with(relative, &options) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(resolve_error(e)),
    };
    // The type of what was opened, not of what a path pointed at a moment earlier.
    let meta = file.metadata().map_err(resolve_error)?;
    if !meta.is_file() {
        return Err(FileError::InvalidType);
    }
    if meta.len() > MAX_SERVED_FILE {
        return Err(FileError::TooLarge {
            limit: MAX_SERVED_FILE,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.into_std()
        .take(MAX_SERVED_FILE)
        .read_to_end(&mut bytes)
        .map_err(resolve_error)?;
    Ok(Some(bytes))
}

fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
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

fn file_response(name: &str, bytes: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    // Workspace content is the worker's: never let a browser run it as our origin's script
    // with a sniffed type.
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn listing(dir: &Dir, shown: &str, query_suffix: &str) -> Response {
    let mut rows: Vec<(bool, String, u64)> = dir
        .entries()
        .map(|entries| {
            entries
                .flatten()
                .take(MAX_LISTING)
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
    file_response("listing.html", html.into_bytes())
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

    #[test]
    fn escapes_stay_inside_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(dir.path().join("secret.txt"), "host").unwrap();
        std::fs::write(ws.join("a.txt"), "inside").unwrap();
        std::os::unix::fs::symlink("../secret.txt", ws.join("rel")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), ws.join("abs")).unwrap();
        std::os::unix::fs::symlink("a.txt", ws.join("ok")).unwrap();
        let root = open_workspace(&ws).unwrap();
        assert!(read_regular(&root, Path::new("rel")).is_err());
        assert!(read_regular(&root, Path::new("abs")).is_err());
        assert_eq!(
            read_regular(&root, Path::new("ok")).unwrap().unwrap(),
            b"inside"
        );
        nix::unistd::mkfifo(&ws.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            read_regular(&root, Path::new("pipe")),
            Err(FileError::InvalidType)
        ));
    }
}
