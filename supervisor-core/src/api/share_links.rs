//! Share links (`crate::share::links`): made, listed and revoked by the session's tenant,
//! opened by anyone holding one at `/s/<token>`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shared::ids::{SessionId, now_ms};

use super::body::{JsonObject, Params, session_id};
use crate::audit;
use crate::error::ApiError;
use crate::principal::Principal;
use crate::share::links::{self, MAX_EXPIRY_SECS};
use crate::share::{ShareError, Shared};
use crate::state::AppState;
use crate::storage::ShareLink;
use crate::storage::share_links::SHARE_LINKS_PER_SESSION;

/// What a listing shows of a link: never its token or hash.
fn shown(link: &ShareLink, now: u64) -> Value {
    json!({
        "id": link.id,
        "sessionId": link.session_id,
        "createdAt": link.created_at,
        "createdBy": link.created_by,
        "expiresAt": link.expires_at,
        "expired": !link.is_live(now),
    })
}

/// `POST /api/v1/shares/create {sessionId, expiresInSecs?}`: a new link to the session's
/// replay. The token is in the answer once (`token`, `path`); only its hash is kept.
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    params: Params,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = session_id(&params, Some(&body))?;
    let expires_in = match body.get("expiresInSecs") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .filter(|secs| (1..=MAX_EXPIRY_SECS).contains(secs))
                .ok_or_else(|| {
                    ApiError::InvalidRequest(format!(
                        "expiresInSecs must be a whole number from 1 to {MAX_EXPIRY_SECS}"
                    ))
                })?,
        ),
    };
    let created = make(&state, &principal, &id, expires_in).await;
    let (target, outcome, detail) = match &created {
        Ok(answer) => (
            answer["share"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            audit::Outcome::Ok,
            Some(format!("session {id}")),
        ),
        Err(e) => (id.to_string(), audit::Outcome::Failed, Some(e.to_string())),
    };
    audit::record(
        &*state.storage,
        Some(&principal),
        audit::Action::ShareCreate,
        &target,
        outcome,
        detail.as_deref(),
    )
    .await;
    created.map(Json)
}

async fn make(
    state: &AppState,
    principal: &Principal,
    id: &SessionId,
    expires_in: Option<u64>,
) -> Result<Value, ApiError> {
    let info = state
        .storage
        .session(id)
        .await?
        .filter(|info| principal.is_admin() || info.tenant() == principal.tenant)
        .ok_or_else(|| ApiError::SessionNotFound(id.to_string()))?;
    // The link belongs to the session's tenant, whoever made it: that tenant lists and
    // revokes it.
    let tenant = info.tenant().to_owned();
    let live = state
        .storage
        .share_links(&tenant)
        .await?
        .iter()
        .filter(|l| l.session_id == info.id)
        .count();
    if live >= SHARE_LINKS_PER_SESSION {
        return Err(ApiError::QuotaExceeded {
            tenant,
            limit: "shareLinksPerSession",
            used: live as u64,
            max: SHARE_LINKS_PER_SESSION as u64,
            retry_after_secs: 60,
        });
    }
    let (token, token_hash) = links::new_token().map_err(|e| ApiError::Internal(e.to_string()))?;
    let now = now_ms();
    let link = ShareLink {
        id: shared::ids::prefixed_id("sl_", 12),
        token_hash,
        session_id: info.id.clone(),
        tenant,
        created_by: principal.user.clone(),
        created_at: now,
        expires_at: expires_in.map(|secs| now + secs * 1000),
    };
    state.storage.create_share_link(link.clone()).await?;
    tracing::info!(session_id = %info.id, share_id = %link.id, "share link created");
    Ok(json!({
        "success": true,
        "share": shown(&link, now),
        "token": token,
        "path": format!("/s/{token}"),
    }))
}

/// `GET /api/v1/shares`: the links of the caller's tenant, newest first.
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let links: Vec<Value> = state
        .storage
        .share_links(&principal.tenant)
        .await?
        .iter()
        .map(|l| shown(l, now))
        .collect();
    Ok(Json(json!({"shares": links})))
}

/// `POST /api/v1/shares/revoke {id}`: the link answers 404 from the next request on. Another
/// tenant's link is as unknown as a missing one.
pub(super) async fn revoke(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let id = body
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 64)
        .ok_or_else(|| ApiError::InvalidRequest("id must name a share link".into()))?;
    let revoked = state
        .storage
        .revoke_share_link(&principal.tenant, id)
        .await
        .map_err(ApiError::from)
        .and_then(|found| {
            if found {
                Ok(())
            } else {
                Err(ApiError::ShareLinkNotFound)
            }
        });
    let (outcome, detail) = match &revoked {
        Ok(()) => (audit::Outcome::Ok, None),
        Err(e) => (audit::Outcome::Failed, Some(e.to_string())),
    };
    audit::record(
        &*state.storage,
        Some(&principal),
        audit::Action::ShareRevoke,
        id,
        outcome,
        detail.as_deref(),
    )
    .await;
    revoked?;
    tracing::info!(share_id = id, "share link revoked");
    Ok(Json(json!({"success": true, "id": id})))
}

/// `GET /s/<token>`: the replay page of the link's session, if the link is live. A malformed,
/// unknown, revoked or expired token, or a link whose session is gone, all answer the same 404.
pub(super) async fn open(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    if !links::well_formed(&token) {
        return Err(ApiError::ShareLinkNotFound);
    }
    let link = state
        .storage
        .share_link_by_hash(&links::hash_token(&token))
        .await?
        .filter(|link| link.is_live(now_ms()))
        .ok_or(ApiError::ShareLinkNotFound)?;
    let session_id = SessionId::parse(&link.session_id).map_err(|_| ApiError::ShareLinkNotFound)?;
    // No upload: the workspace is not read for a link, only the stored events are shown.
    let page = match state
        .sharing
        .share(&session_id, std::path::Path::new(""), false)
        .await
    {
        Ok(Shared::Html(html)) => html,
        Ok(Shared::Url(_)) | Err(ShareError::SessionNotFound) => {
            return Err(ApiError::ShareLinkNotFound);
        }
        Err(ShareError::Storage(e)) => return Err(e.into()),
        Err(e) => return Err(ApiError::ShareFailed(e.to_string())),
    };
    let mut response = page.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, links::PAGE_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    Ok(response)
}
