//! Every error a client can see, and the one place that maps it to a status and a JSON body
//! (ARCHITECTURE decision 6): `{"error", "code", "message", "details"}`. `error` is the short
//! string upstream clients already print; the query family keeps upstream's object form there.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shared::ids::{InvalidSessionId, now_ms};

use crate::provision::ProvisionError;
use crate::sessions::RunError;
use crate::storage::{StorageError, TooLarge};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Invalid JSON body: {0}")]
    InvalidJson(String),
    #[error("Request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(
        "The request body did not arrive in time (server.http.bodyReadTimeoutSecs); send it whole"
    )]
    BodyTimedOut,
    /// A session record would be over one of its limits; `details.field` names which.
    #[error("{0}")]
    RecordTooLarge(TooLarge),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("Session ID is required")]
    SessionIdRequired,
    #[error("Query is required")]
    QueryRequired,
    #[error("Messages are required")]
    MessagesRequired,
    #[error("Missing required parameters: {0}")]
    InvalidParameters(&'static str),
    #[error("Model {provider}/{id} is not one of the configured models")]
    InvalidModel { provider: String, id: String },
    #[error("{0}")]
    SummaryFailed(String),
    #[error("Runtime settings object is required")]
    RuntimeSettingsRequired,
    #[error("{0}")]
    ShareFailed(String),
    #[error("Session {0} does not exist")]
    SessionNotFound(String),
    #[error("Session {0} does not exist in storage")]
    SessionNotFoundInStorage(String),
    #[error("No session has been stored yet")]
    NoSessions,
    #[error("No route for {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("Server is in exclusive mode and session {running} is currently running")]
    ExclusiveModeBusy { running: String },
    #[error(
        "Session {0} is already executing a task. Complete or abort the current task before starting a new one."
    )]
    SessionBusy(String),
    #[error("The worker of session {session} is unavailable: {reason}")]
    WorkerUnavailable { session: String, reason: String },
    #[error("The worker of session {session} exited during the run: {reason}")]
    WorkerCrashed { session: String, reason: String },
    #[error(
        "Session {session} has stored {limit} bytes of events, its limit (server.sessionLimits.storedBytes); delete it or start a new session"
    )]
    SessionStorageFull { session: String, limit: u64 },
    #[error("The server cannot take this now: {reason}")]
    Overloaded {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("The server is shutting down or draining and starts no new runs")]
    Draining,
    #[error("Invalid path: {0}")]
    InvalidPath(&'static str),
    #[error("Path not found")]
    PathNotFound,
    #[error("Invalid path type")]
    InvalidPathType,
    #[error("File is larger than the limit of {limit} bytes")]
    FileTooLarge { limit: u64 },
    #[error("Search query parameter is required")]
    SearchQueryRequired,
    #[error("Paths array is required")]
    PathsRequired,
    /// The host failed us while reading a workspace (not the client's doing).
    #[error("{0}")]
    WorkspaceAccess(String),
    /// No principal, or a refused credential (see `crate::auth::AuthError`).
    #[error("{0}")]
    Unauthenticated(String),
    #[error("Only an admin may do this")]
    AdminOnly,
    /// A browser page of another origin (see `crate::auth::guard`).
    #[error(
        "Requests from origin {0} are not allowed; add it to server.allowedOrigins to permit it"
    )]
    OriginNotAllowed(String),
    /// A `Host` this server does not answer to (DNS rebinding).
    #[error("This server does not answer to host {0}; add it to server.allowedHosts to permit it")]
    HostNotAllowed(String),
    #[error("This route takes a JSON body (Content-Type: application/json), not {0}")]
    UnsupportedMediaType(String),
    /// A tenant quota (`[tenants.<name>]`) would be exceeded; `limit` is its key.
    #[error("Tenant {tenant} has reached its {limit} quota ({used} of {max})")]
    QuotaExceeded {
        tenant: String,
        limit: &'static str,
        used: u64,
        max: u64,
        retry_after_secs: u64,
    },
    #[error("Tenant {tenant} is over its rate of {limit} requests per second (requestsPerSecond)")]
    RateLimited {
        tenant: String,
        limit: u32,
        retry_after_secs: u64,
    },
    /// A share link that does not exist, was revoked or has expired: all three look the same.
    #[error("No such share link")]
    ShareLinkNotFound,
    #[error("Storage failed: {0}")]
    Storage(StorageError),
    #[error("Internal error: {0}")]
    Internal(String),
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::TooLarge(too_large) => Self::RecordTooLarge(too_large),
            other => Self::Storage(other),
        }
    }
}

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Closed(id) => Self::SessionNotFound(id.into()),
            RunError::Busy(id) => Self::SessionBusy(id.into()),
            RunError::StorageFull { session, limit } => Self::SessionStorageFull {
                session: session.into(),
                limit,
            },
            RunError::WorkerUnavailable { session, reason } => Self::WorkerUnavailable {
                session: session.into(),
                reason,
            },
        }
    }
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::Storage(e) => e.into(),
            ProvisionError::HostId { ref session, .. }
            | ProvisionError::Quota { ref session, .. } => Self::WorkerUnavailable {
                session: session.to_string(),
                reason: e.to_string(),
            },
            ProvisionError::NewQuota(_) | ProvisionError::Interrupted(_) => {
                Self::Internal(e.to_string())
            }
        }
    }
}

/// Anything that did not resolve inside the workspace is "not found" to the client: it learns
/// nothing about what lies outside.
impl From<crate::workspace::AccessError> for ApiError {
    fn from(e: crate::workspace::AccessError) -> Self {
        use crate::workspace::AccessError;
        match e {
            AccessError::NotFound | AccessError::Outside => Self::PathNotFound,
            AccessError::NotRegular => Self::InvalidPathType,
            AccessError::TooLarge { limit } => Self::FileTooLarge { limit },
            AccessError::Io(e) => Self::WorkspaceAccess(e.to_string()),
        }
    }
}

/// A session id that cannot be one names no session.
impl From<InvalidSessionId> for ApiError {
    fn from(e: InvalidSessionId) -> Self {
        Self::SessionNotFound(e.0)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidRequest(_)
            | Self::SessionIdRequired
            | Self::QueryRequired
            | Self::MessagesRequired
            | Self::InvalidParameters(_)
            | Self::InvalidModel { .. }
            | Self::RuntimeSettingsRequired
            | Self::InvalidPath(_)
            | Self::InvalidPathType
            | Self::SearchQueryRequired
            | Self::PathsRequired => StatusCode::BAD_REQUEST,
            Self::FileTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::PathNotFound => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } | Self::RecordTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SessionNotFound(_)
            | Self::SessionNotFoundInStorage(_)
            | Self::NotFound { .. }
            | Self::NoSessions => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTimedOut => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::AdminOnly | Self::OriginNotAllowed(_) | Self::HostNotAllowed(_) => {
                StatusCode::FORBIDDEN
            }
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::ExclusiveModeBusy { .. } | Self::SessionBusy(_) => StatusCode::CONFLICT,
            Self::WorkerUnavailable { .. }
            | Self::Draining
            | Self::Storage(StorageError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Overloaded { .. } | Self::QuotaExceeded { .. } | Self::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::ShareLinkNotFound => StatusCode::NOT_FOUND,
            Self::SessionStorageFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            Self::Storage(StorageError::NotFound(_)) => StatusCode::NOT_FOUND,
            Self::WorkerCrashed { .. }
            | Self::Storage(_)
            | Self::Internal(_)
            | Self::WorkspaceAccess(_)
            | Self::SummaryFailed(_)
            | Self::ShareFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "INVALID_JSON",
            Self::BodyTimedOut => "REQUEST_TIMEOUT",
            Self::PayloadTooLarge { .. } | Self::RecordTooLarge(_) => "PAYLOAD_TOO_LARGE",
            Self::InvalidRequest(_) => "INVALID_REQUEST",
            Self::SessionIdRequired => "SESSION_ID_REQUIRED",
            Self::QueryRequired => "QUERY_REQUIRED",
            Self::MessagesRequired => "MESSAGES_REQUIRED",
            Self::InvalidParameters(_) => "INVALID_PARAMETERS",
            Self::InvalidModel { .. } => "INVALID_MODEL",
            Self::RuntimeSettingsRequired => "RUNTIME_SETTINGS_REQUIRED",
            Self::ShareFailed(_) => "SHARE_FAILED",
            Self::SessionNotFound(_)
            | Self::SessionNotFoundInStorage(_)
            | Self::Storage(StorageError::NotFound(_)) => "SESSION_NOT_FOUND",
            Self::NotFound { .. } => "NOT_FOUND",
            Self::NoSessions => "NO_SESSIONS",
            Self::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Self::Unauthenticated(_) => "UNAUTHORIZED",
            Self::AdminOnly => "FORBIDDEN",
            Self::OriginNotAllowed(_) => "ORIGIN_NOT_ALLOWED",
            Self::HostNotAllowed(_) => "HOST_NOT_ALLOWED",
            Self::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
            Self::ExclusiveModeBusy { .. } => "EXCLUSIVE_MODE_BUSY",
            Self::SessionBusy(_) => "SESSION_BUSY",
            Self::WorkerUnavailable { .. } => "WORKER_UNAVAILABLE",
            Self::Overloaded { .. } => "SERVER_OVERLOADED",
            Self::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::ShareLinkNotFound => "SHARE_LINK_NOT_FOUND",
            Self::SessionStorageFull { .. } => "SESSION_STORAGE_FULL",
            Self::Draining => "SERVER_DRAINING",
            Self::WorkerCrashed { .. } => "WORKER_CRASHED",
            Self::Storage(StorageError::Unavailable(_)) => "STORAGE_UNAVAILABLE",
            Self::Storage(_) => "STORAGE_ERROR",
            Self::InvalidPath(_) => "INVALID_PATH",
            Self::PathNotFound => "PATH_NOT_FOUND",
            Self::InvalidPathType => "INVALID_PATH_TYPE",
            Self::FileTooLarge { .. } => "FILE_TOO_LARGE",
            Self::SearchQueryRequired => "QUERY_PARAM_REQUIRED",
            Self::PathsRequired => "PATHS_REQUIRED",
            Self::Internal(_) | Self::SummaryFailed(_) | Self::WorkspaceAccess(_) => {
                "INTERNAL_ERROR"
            }
        }
    }

    /// The short `error` string upstream clients print (api.md §1.5).
    fn short(&self) -> String {
        match self {
            Self::InvalidJson(_) => "Invalid JSON".into(),
            Self::BodyTimedOut => "Request timeout".into(),
            Self::PayloadTooLarge { .. } | Self::RecordTooLarge(_) => "Payload too large".into(),
            Self::InvalidRequest(m) => m.clone(),
            Self::SessionIdRequired => "Session ID is required".into(),
            Self::QueryRequired => "Query is required".into(),
            Self::MessagesRequired => "Messages are required".into(),
            Self::InvalidParameters(_) => self.to_string(),
            Self::InvalidModel { .. } => "Invalid model configuration".into(),
            Self::SummaryFailed(_) => "Failed to generate summary".into(),
            Self::RuntimeSettingsRequired => "Runtime settings object is required".into(),
            // The UI's share dialog prints `error` as it is: the reason itself.
            Self::ShareFailed(reason) => reason.clone(),
            Self::SessionNotFound(_) | Self::Storage(StorageError::NotFound(_)) => {
                "Session not found".into()
            }
            Self::SessionNotFoundInStorage(_) => "Session not found in storage".into(),
            Self::NotFound { .. } => "Not found".into(),
            Self::NoSessions => "No sessions found".into(),
            Self::MethodNotAllowed { .. } => "Method not allowed".into(),
            Self::Unauthenticated(_) => "Unauthorized".into(),
            Self::AdminOnly => "Forbidden".into(),
            Self::OriginNotAllowed(_) => "Origin not allowed".into(),
            Self::HostNotAllowed(_) => "Host not allowed".into(),
            Self::UnsupportedMediaType(_) => "Unsupported media type".into(),
            Self::ExclusiveModeBusy { .. } => {
                "Server is in exclusive mode and another session is currently running".into()
            }
            Self::SessionBusy(_) => "Agent is already executing a task".into(),
            Self::WorkerUnavailable { .. } => "Worker unavailable".into(),
            Self::Overloaded { .. } => "Server overloaded".into(),
            Self::QuotaExceeded { .. } => "Quota exceeded".into(),
            Self::RateLimited { .. } => "Rate limited".into(),
            Self::ShareLinkNotFound => "Not found".into(),
            Self::SessionStorageFull { .. } => "Session storage full".into(),
            Self::Draining => "Server draining".into(),
            Self::WorkerCrashed { .. } => "Worker crashed".into(),
            Self::Storage(StorageError::Unavailable(_)) => "Storage unavailable".into(),
            Self::Storage(_) => "Storage error".into(),
            Self::Internal(_) => "Internal server error".into(),
            Self::FileTooLarge { .. } => "File too large".into(),
            Self::WorkspaceAccess(_) => "Failed to access workspace files".into(),
            Self::InvalidPath(_)
            | Self::PathNotFound
            | Self::InvalidPathType
            | Self::SearchQueryRequired
            | Self::PathsRequired => self.to_string(),
        }
    }

    fn details(&self) -> Value {
        let mut details = json!({"timestamp": now_ms()});
        match self {
            Self::SessionNotFound(id)
            | Self::SessionNotFoundInStorage(id)
            | Self::SessionBusy(id)
            | Self::WorkerUnavailable { session: id, .. }
            | Self::WorkerCrashed { session: id, .. } => details["sessionId"] = json!(id),
            Self::ExclusiveModeBusy { running } => details["runningSessionId"] = json!(running),
            Self::SessionStorageFull { session, limit } => {
                details["sessionId"] = json!(session);
                details["limit"] = json!(limit);
            }
            Self::InvalidModel { provider, id } => {
                details["provider"] = json!(provider);
                details["id"] = json!(id);
            }
            Self::PayloadTooLarge { limit } => {
                details["limit"] = json!(limit);
                details["unit"] = json!("bytes");
            }
            Self::RecordTooLarge(t) => {
                details["field"] = json!(t.field);
                details["size"] = json!(t.size);
                details["limit"] = json!(t.limit);
                details["unit"] = json!(t.unit);
            }
            Self::OriginNotAllowed(origin) => details["origin"] = json!(origin),
            Self::HostNotAllowed(host) => details["host"] = json!(host),
            Self::UnsupportedMediaType(ty) => details["contentType"] = json!(ty),
            Self::QuotaExceeded {
                tenant,
                limit,
                used,
                max,
                ..
            } => {
                details["tenant"] = json!(tenant);
                details["limit"] = json!(limit);
                details["used"] = json!(used);
                details["max"] = json!(max);
            }
            Self::RateLimited { tenant, limit, .. } => {
                details["tenant"] = json!(tenant);
                details["limit"] = json!("requestsPerSecond");
                details["max"] = json!(limit);
            }
            Self::NotFound { method, path } | Self::MethodNotAllowed { method, path } => {
                details["method"] = json!(method);
                details["path"] = json!(path);
            }
            _ => {}
        }
        details
    }

    /// Client mistakes are not worth a log line; server-side failures are.
    fn log(&self) {
        if self.status().is_server_error() {
            tracing::error!(code = self.code(), error = %self, "request failed");
        }
    }

    /// The body of the query family (`/sessions/query`, `/oneshot/query`), where upstream's
    /// `error` is an object: `{"success": false, "error": {code, message, details}, ...}`, with
    /// `code`, `message` and `details` repeated at the top like every other error body.
    pub fn query_body(&self) -> Value {
        let details = self.details();
        let inner = json!({"code": self.code(), "message": self.to_string(), "details": details});
        json!({
            "success": false,
            "error": inner,
            "code": self.code(),
            "message": self.to_string(),
            "details": details,
        })
    }

    fn body(&self) -> Value {
        let mut body = json!({
            "error": self.short(),
            "code": self.code(),
            "message": self.to_string(),
            "details": self.details(),
        });
        if let Self::ExclusiveModeBusy { running } = self {
            body["runningSessionId"] = json!(running);
        }
        body
    }
}

impl ApiError {
    /// `Retry-After` for refusals that pass: overload, draining, a database coming back.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded {
                retry_after_secs, ..
            }
            | Self::QuotaExceeded {
                retry_after_secs, ..
            }
            | Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::Draining => Some(5),
            Self::Storage(StorageError::Unavailable(_)) => Some(2),
            _ => None,
        }
    }

    fn respond(&self, body: Value) -> Response {
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if let Self::Unauthenticated(_) = self {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        self.respond(self.body())
    }
}

/// An [`ApiError`] rendered in the query family's shape.
#[derive(Debug)]
pub struct QueryError(pub ApiError);

impl From<ApiError> for QueryError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        self.0.log();
        let mut body = self.0.query_body();
        if let ApiError::ExclusiveModeBusy { running } = &self.0 {
            body["runningSessionId"] = json!(running);
        }
        self.0.respond(body)
    }
}
