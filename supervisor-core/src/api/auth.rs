//! Logging in from a browser: `POST /auth/login {token}` turns an API token or a JWT into the
//! login cookie, `/auth/logout` clears it, `GET /auth/me` says who the caller is, and
//! `POST /auth/ticket` gives a single-use ticket for the follow stream (`?ticket=`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::body::JsonObject;
use crate::auth::{COOKIE, Event, record};
use crate::error::ApiError;
use crate::principal::Principal;
use crate::state::AppState;

/// Whether the browser reached us over https (directly, or through a proxy that says so), so
/// the cookie must be `Secure`.
fn over_https(headers: &HeaderMap) -> bool {
    let says = |name: header::HeaderName, prefix: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with(prefix))
    };
    says(header::ORIGIN, "https://")
        || says(
            header::HeaderName::from_static("x-forwarded-proto"),
            "https",
        )
}

fn cookie_header(value: &str, max_age: Option<u64>, secure: bool) -> Result<HeaderValue, ApiError> {
    let mut cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(secs) = max_age {
        cookie.push_str(&format!("; Max-Age={secs}"));
    }
    if secure {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie)
        .map_err(|_| ApiError::Unauthenticated("The credential cannot be a cookie".into()))
}

fn principal_json(state: &AppState, principal: &Principal) -> Value {
    json!({
        "tenant": principal.tenant,
        "user": principal.user,
        "role": principal.role,
        "authRequired": state.auth.enforced(),
    })
}

pub(super) async fn login(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let token = body
        .get("token")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("token is required".into()))?;
    let principal = match state.auth.credential(token).await {
        Ok(principal) => principal,
        Err(e) => {
            record(&Event::Denied {
                path: "/api/v1/auth/login",
                reason: &e.to_string(),
                principal: None,
            });
            return Err(e.into());
        }
    };
    record(&Event::Login(&principal));
    let mut response =
        Json(json!({"success": true, "principal": principal_json(&state, &principal)}))
            .into_response();
    if state.auth.enforced() {
        response.headers_mut().insert(
            header::SET_COOKIE,
            cookie_header(token, None, over_https(&headers))?,
        );
    }
    Ok(response)
}

pub(super) async fn logout(headers: HeaderMap) -> Result<Response, ApiError> {
    let mut response = Json(json!({"success": true})).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie_header("", Some(0), over_https(&headers))?,
    );
    Ok(response)
}

pub(super) async fn me(State(state): State<Arc<AppState>>, principal: Principal) -> Json<Value> {
    Json(principal_json(&state, &principal))
}

pub(super) async fn ticket(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    let ticket = state
        .auth
        .tickets
        .issue(principal)
        .ok_or_else(|| ApiError::Overloaded {
            reason: "too many tickets are outstanding".into(),
            retry_after_secs: 5,
        })?;
    Ok(Json(json!({
        "ticket": ticket,
        "expiresInSecs": crate::auth::tickets::TICKET_TTL.as_secs(),
    })))
}
