//! The HTTP surface: every route in one table, plus the layers every response passes through.
//!
//! From the outside in: the browser guard and the principal (`crate::auth::layer`); Socket.IO
//! at `/socket.io/` (outside the body limit, which engine.io enforces itself); the
//! `<webui.base>/api/...` rewrite; then the routes, each behind its access check
//! (`crate::auth::require`), and for every other GET the web UI, else a JSON 404.

mod auth;
mod body;
mod files;
mod models;
mod probe;
mod runs;
mod sessions;
mod settings;
mod share;
mod share_links;
mod socketio;
mod sse;
mod system;
mod tenancy;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tracing::Instrument;

use crate::auth::Access;
use crate::error::ApiError;
use crate::state::AppState;

pub use body::BODY_LIMIT;

/// Who may call one route: its path, its methods, and the [`Access`] its route layer enforces.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteSpec {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    pub access: Access,
}

/// The routes being assembled: every route is added through [`Table::route`], which puts the
/// access check on it and records it, so the list of routes and their access cannot drift
/// from the router (the route access matrix test walks [`route_table`]).
pub(crate) struct Table {
    router: Router<Arc<AppState>>,
    specs: Vec<RouteSpec>,
}

impl Table {
    pub(crate) fn route(
        mut self,
        path: &'static str,
        methods: &'static [&'static str],
        access: Access,
        handler: MethodRouter<Arc<AppState>>,
    ) -> Self {
        let handler = handler.route_layer(middleware::from_fn(move |request, next| {
            crate::auth::require(access, request, next)
        }));
        self.router = self.router.route(path, handler);
        self.specs.push(RouteSpec {
            path,
            methods,
            access,
        });
        self
    }
}

/// Every route of the API.
fn table() -> Table {
    use Access::{Admin, Member, Public};
    let table = Table {
        router: Router::new(),
        specs: Vec::new(),
    }
    .route("/api/v1/health", &["GET"], Public, get(system::health))
    // Public, with its details for admins only.
    .route(
        "/api/v1/system/health",
        &["GET"],
        Public,
        get(system::system_health),
    )
    .route("/api/v1/version", &["GET"], Member, get(system::version))
    .route(
        "/api/v1/agent/options",
        &["GET"],
        Member,
        get(system::agent_options),
    )
    .route("/api/v1/models", &["GET"], Member, get(models::list))
    .route("/api/v1/workers", &["GET"], Admin, get(system::workers))
    .route(
        "/api/v1/sessions/restart",
        &["POST"],
        Admin,
        post(system::restart),
    )
    .route(
        "/api/v1/sessions/stop",
        &["POST"],
        Admin,
        post(system::stop),
    )
    .route(
        "/api/v1/runtime-settings",
        &["GET", "POST"],
        Member,
        get(settings::get).post(settings::set),
    )
    .route("/api/v1/share/config", &["GET"], Member, get(share::config))
    .route("/api/v1/sessions", &["GET"], Member, get(sessions::list))
    .route(
        "/api/v1/sessions/create",
        &["POST"],
        Member,
        post(sessions::create),
    )
    .route(
        "/api/v1/sessions/details",
        &["GET"],
        Member,
        get(sessions::details),
    )
    .route(
        "/api/v1/sessions/events",
        &["GET"],
        Member,
        get(sessions::events),
    )
    .route(
        "/api/v1/sessions/events/latest",
        &["GET"],
        Member,
        get(sessions::latest_events),
    )
    .route(
        crate::auth::TICKET_ROUTE,
        &["GET"],
        Member,
        get(sessions::follow),
    )
    .route(
        "/api/v1/sessions/status",
        &["GET"],
        Member,
        get(sessions::status),
    )
    .route(
        "/api/v1/sessions/update",
        &["POST"],
        Member,
        post(sessions::update),
    )
    .route(
        "/api/v1/sessions/delete",
        &["POST"],
        Member,
        post(sessions::delete),
    )
    .route(
        "/api/v1/sessions/restore",
        &["POST"],
        Member,
        post(sessions::restore),
    )
    .route(
        "/api/v1/sessions/share",
        &["POST"],
        Member,
        post(share::share),
    )
    .route(
        "/api/v1/sessions/model",
        &["POST"],
        Member,
        post(models::set_session_model),
    )
    .route(
        "/api/v1/sessions/generate-summary",
        &["POST"],
        Member,
        post(models::generate_summary),
    )
    .route(
        "/api/v1/sessions/query",
        &["POST"],
        Member,
        post(runs::query),
    )
    .route(
        "/api/v1/sessions/query/stream",
        &["POST"],
        Member,
        post(runs::query_stream),
    )
    .route(
        "/api/v1/sessions/abort",
        &["POST"],
        Member,
        post(runs::abort),
    )
    .route(
        "/api/v1/oneshot/query",
        &["POST"],
        Member,
        post(runs::oneshot),
    )
    .route(
        "/api/v1/oneshot/query/stream",
        &["POST"],
        Member,
        post(runs::oneshot_stream),
    )
    .route("/api/v1/auth/login", &["POST"], Public, post(auth::login))
    .route("/api/v1/auth/logout", &["POST"], Public, post(auth::logout))
    .route("/api/v1/auth/me", &["GET"], Member, get(auth::me))
    .route("/api/v1/auth/ticket", &["POST"], Member, post(auth::ticket))
    .route("/api/v1/usage", &["GET"], Member, get(tenancy::usage))
    .route("/api/v1/audit", &["GET"], Admin, get(tenancy::audit))
    .route("/api/v1/shares", &["GET"], Member, get(share_links::list))
    .route(
        "/api/v1/shares/create",
        &["POST"],
        Member,
        post(share_links::create),
    )
    .route(
        "/api/v1/shares/revoke",
        &["POST"],
        Member,
        post(share_links::revoke),
    )
    // Public: the unguessable token in the path is the credential.
    .route("/s/{token}", &["GET"], Public, get(share_links::open))
    .route("/metrics", &["GET"], Admin, get(system::metrics));
    probe::routes(files::routes(table))
}

/// Every route with its methods and who may call it, as the router enforces it.
pub fn route_table() -> Vec<RouteSpec> {
    table().specs
}

/// The application: routes, body limit, the browser guard and the principal, Socket.IO, the
/// web UI and the JSON 404/405 answers.
pub fn router(state: Arc<AppState>) -> Router {
    let routes = table()
        .router
        // The workspace static server (api.md §11.1) first, then the web UI, then a JSON 404.
        // Each checks what it serves itself: the web UI is public, workspace files are not.
        .fallback(files::workspace_static)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            tenancy::rate_limit,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(http_span))
        .with_state(state.clone());
    // The rewrite must run before `routes` matches a path, so it wraps it from outside.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            strip_web_ui_base,
        ))
        .layer(socketio::layer(state.clone()))
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            crate::auth::layer,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), level_header))
}

/// One span per request, named by the route that matched (`/api/v1/sessions/query`, not the
/// raw path, which would carry ids and query strings into the logs). Instrumented rather than
/// entered, so that no guard is held across the handler's awaits.
async fn http_span(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!("http", method = %request.method(), route = %route);
    next.run(request).instrument(span).await
}

/// Adds `X-Isolation-Level` to every response: clients and proxies can see what protects the
/// sessions without asking for the health report.
async fn level_header(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let level = state.isolation.level.as_str();
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert("x-isolation-level", HeaderValue::from_static(level));
    response
}

/// `<webui.base>/api/...` is the API (api.md §11.4): with a base configured, the official UI
/// prefixes its calls with it, and upstream needed a reverse proxy to strip it again.
async fn strip_web_ui_base(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(path) = state.webui.api_path(request.uri().path()) {
        let rewritten = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        match rewritten.parse::<Uri>() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(e) => tracing::debug!(error = %e, "could not rewrite a web UI base path"),
        }
    }
    next.run(request).await
}

/// Every path no route claims: the web UI for a GET or HEAD outside `/api/`, else a JSON 404.
async fn web_ui_or_not_found(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
) -> Response {
    if (method == Method::GET || method == Method::HEAD)
        && !uri.path().starts_with("/api/")
        && let Some(page) = state.webui.serve(uri.path()).await
    {
        return page;
    }
    not_found(method, uri).await.into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// A JSON body built from already-serialised parts, so stored events are sent as they were
/// stored, without parsing and re-serialising them.
fn raw_json(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    fn test_state() -> Arc<AppState> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap().keep();
        let config = crate::config::load_with_env(None, &Default::default(), |_| None).unwrap();
        // Unprobed: it jails nothing, so these tests never start a worker.
        let isolation = Arc::new(crate::isolation::Isolation::default());
        let spawner = crate::workers::Spawner::start(
            "/bin/false".into(),
            tokio::runtime::Handle::current(),
            isolation.clone(),
        )
        .unwrap();
        let webui = Arc::new(crate::webui::WebUi::from_config(&config).unwrap());
        let gateway = Arc::new(crate::gateway::Gateway::new(&config, None).unwrap());
        let storage: crate::storage::SharedStorage = Arc::new(crate::storage::MemoryStorage::new());
        let sharing = crate::share::Sharing::new(
            &config.share,
            storage.clone(),
            webui.clone(),
            gateway.clone(),
            Vec::new(),
        )
        .unwrap();
        let auth = crate::auth::Auth::new(&config, storage.clone()).unwrap();
        Arc::new(AppState::new(crate::state::Parts {
            auth,
            config,
            workspace_root: dir,
            storage,
            isolation,
            spawner,
            gateway,
            agio: None,
            webui,
            sharing,
        }))
    }

    async fn call(
        app: Router,
        method: Method,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Body::from(body.to_owned())).unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn structured_errors_for_bad_requests() {
        let app = router(test_state());
        let (status, body) = call(
            app.clone(),
            Method::POST,
            "/api/v1/sessions/query",
            "{\"x\":",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "INVALID_JSON");
        // The query family's shape: `error` is an object, for a malformed body too.
        assert!(body["message"].is_string() && body["details"].is_object());
        assert_eq!(body["error"]["code"], "INVALID_JSON");
        assert!(body["error"]["message"].is_string() && body["error"]["details"].is_object());
        // Everywhere else `error` is the short string.
        let (status, body) = call(
            app.clone(),
            Method::POST,
            "/api/v1/sessions/update",
            "{\"x\":",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "INVALID_JSON");
        assert!(
            body["message"].is_string() && body["details"].is_object() && body["error"].is_string()
        );

        let (status, body) = call(app.clone(), Method::GET, "/api/v1/sessions/create", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["code"], "METHOD_NOT_ALLOWED");

        let (status, body) = call(app.clone(), Method::GET, "/api/v1/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["code"], "NOT_FOUND");

        let (status, body) = call(app.clone(), Method::GET, "/api/v1/sessions/status", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "SESSION_ID_REQUIRED");

        let (status, body) = call(
            app.clone(),
            Method::GET,
            "/api/v1/sessions/status?sessionId=../../etc",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["code"], "SESSION_NOT_FOUND");

        let big = format!("{{\"query\":\"{}\"}}", "x".repeat(BODY_LIMIT + 1));
        let (status, body) = call(app, Method::POST, "/api/v1/sessions/query", &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["code"], "PAYLOAD_TOO_LARGE");
    }

    #[tokio::test]
    async fn session_records_without_a_worker() {
        let state = test_state();
        let app = router(state.clone());
        let (status, created) =
            call(app.clone(), Method::POST, "/api/v1/sessions/create", "").await;
        assert_eq!(status, StatusCode::CREATED);
        let id = created["sessionId"].as_str().unwrap().to_owned();
        let host = state.workspace_root.join(&id);
        assert!(host.is_dir());
        assert_eq!(
            created["session"]["workspace"],
            state.isolation.workspace_inside(&host)
        );

        let update = format!(
            "{{\"sessionId\":\"{id}\",\"name\":\"n\",\"tags\":[\"t\"],\"metadata\":{{\"x\":1}}}}"
        );
        let (_, updated) = call(
            app.clone(),
            Method::POST,
            "/api/v1/sessions/update",
            &update,
        )
        .await;
        assert_eq!(updated["session"]["metadata"]["name"], "n");
        assert_eq!(updated["session"]["metadata"]["tags"][0], "t");
        assert_eq!(updated["session"]["metadata"]["x"], 1);

        let (_, details) = call(
            app.clone(),
            Method::GET,
            &format!("/api/v1/sessions/details?sessionId={id}"),
            "",
        )
        .await;
        assert_eq!(details["session"]["active"], true);
        let (_, status) = call(
            app.clone(),
            Method::GET,
            &format!("/api/v1/sessions/status?sessionId={id}"),
            "",
        )
        .await;
        assert_eq!(status["status"]["state"], "idle");

        let delete = format!("{{\"sessionId\":\"{id}\"}}");
        let (status, body) = call(
            app.clone(),
            Method::POST,
            "/api/v1/sessions/delete",
            &delete,
        )
        .await;
        assert_eq!(
            (status, body["success"].clone()),
            (StatusCode::OK, true.into())
        );
        let (status, _) = call(app, Method::POST, "/api/v1/sessions/delete", &delete).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // The workspace goes in the background, after the answer.
        for _ in 0..1000 {
            if !host.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!host.exists());
    }

    #[tokio::test]
    async fn preflight_and_cors() {
        let app = router(test_state());
        let preflight = |origin: Option<&str>| {
            let mut request = Request::builder()
                .method(Method::OPTIONS)
                .uri("/api/v1/sessions")
                .header(header::HOST, "127.0.0.1:3000");
            if let Some(origin) = origin {
                request = request.header(header::ORIGIN, origin);
            }
            request.body(Body::empty()).unwrap()
        };
        let own = app.clone().oneshot(preflight(None)).await.unwrap();
        assert_eq!(own.status(), StatusCode::NO_CONTENT);
        assert!(
            !own.headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        // Another page, even on this machine, gets no permission at all.
        let foreign = app
            .oneshot(preflight(Some("http://127.0.0.1:4000")))
            .await
            .unwrap();
        assert_eq!(foreign.status(), StatusCode::FORBIDDEN);
        assert!(
            !foreign
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
    }

    #[tokio::test]
    async fn a_text_body_is_not_json() {
        let app = router(test_state());
        let request = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/sessions/create")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("{}"))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
