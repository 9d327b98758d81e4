//! Who is calling, decided once per request, before any handler runs.
//!
//! - [`guard`]: the browser protections every request passes in every mode (`Host`, `Origin`,
//!   CORS for configured origins only).
//! - [`Auth::resolve`]: the request's [`Principal`]. In local mode (no `[auth]` section, which
//!   the server only allows on loopback or with `--allow-unauthenticated`) every request is the
//!   local operator. Otherwise a principal comes from a trusted proxy's header, an API token or
//!   an OIDC JWT (`Authorization: Bearer` or `X-API-Key`), the login cookie, or a single-use
//!   ticket on the follow stream; a request with none gets no principal and is refused by
//!   [`require`] unless its route is public.
//! - [`may_access`]: the one rule for a principal and a session's tenant.
//!
//! What a login, a token's creation or revocation, or a refusal means for the audit log is
//! reported through [`record`].

pub mod guard;
mod oidc;
mod proxy;
pub mod tickets;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use shared::ids::now_ms;

pub use crate::config::auth::AuthConfig;
pub use guard::Guard;

use crate::error::ApiError;
use crate::principal::{Principal, Role};
use crate::storage::{SharedStorage, StorageError};

/// The login cookie: the credential itself, HttpOnly and `SameSite=Strict`, so scripts cannot
/// read it and other sites' pages cannot send it.
pub const COOKIE: &str = "agentd_session";
/// The one route that takes a `?ticket=` (EventSource cannot send headers).
pub const TICKET_ROUTE: &str = "/api/v1/sessions/events/stream";

/// Why a request's credential was refused; each is a 401 (storage failures aside).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "Authentication required: send an API token (Authorization: Bearer or X-API-Key), a JWT, or log in"
    )]
    Missing,
    #[error("The credential is not valid")]
    InvalidCredential,
    #[error("The token has been revoked")]
    Revoked,
    #[error("The token has expired")]
    Expired,
    #[error("The JWT is not valid for any configured issuer")]
    InvalidJwt,
    #[error("The JWT's algorithm is not allowed")]
    JwtAlgorithm,
    #[error("The JWT's key is not among the issuer's keys")]
    UnknownKey,
    #[error("The JWT names no tenant")]
    NoTenant,
    #[error("The user header is only accepted from a trusted proxy")]
    UntrustedProxy,
    #[error("{0}")]
    Malformed(&'static str),
    #[error("The ticket is unknown, used or expired")]
    InvalidTicket,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Storage(e) => e.into(),
            other => ApiError::Unauthenticated(other.to_string()),
        }
    }
}

/// Whether `principal` may see and use a session of `tenant`: an admin any, a member its own
/// tenant's. Every session route, Socket.IO event and listing asks this, and nothing else.
pub fn may_access(principal: &Principal, session_tenant: &str) -> bool {
    principal.is_admin() || principal.tenant == session_tenant
}

/// A role claim or field: `admin` (or a list holding it) is an admin, anything else a member.
pub(crate) fn role_of(value: Option<&Value>) -> Role {
    let is_admin = |v: &Value| v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("admin"));
    match value {
        Some(Value::Array(items)) if items.iter().any(is_admin) => Role::Admin,
        Some(v) if is_admin(v) => Role::Admin,
        _ => Role::Member,
    }
}

/// What happened, for the audit log.
#[derive(Debug)]
pub enum Event<'a> {
    Login(&'a Principal),
    TokenCreated {
        id: &'a str,
        tenant: &'a str,
    },
    TokenRevoked {
        id: &'a str,
    },
    /// A request refused for its credential (401) or its role (403).
    Denied {
        path: &'a str,
        reason: &'a str,
        principal: Option<&'a Principal>,
    },
}

/// Reports an identity event. The audit log hangs off this one function.
pub fn record(event: &Event<'_>) {
    tracing::info!(?event, "identity");
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Anyone: `/health`, logging in and out.
    Public,
    /// Any principal; a session route then checks the session's tenant with [`may_access`].
    Member,
    /// Admins only: operations on the server and on any session.
    Admin,
}

/// The ways in, built from `[auth]` at start.
pub struct Auth {
    /// `false`: local mode, every request is [`Principal::local`].
    enforced: bool,
    tokens: bool,
    issuers: Vec<oidc::Issuer>,
    proxy: Option<proxy::Proxy>,
    pub tickets: tickets::Tickets,
    pub guard: Guard,
    storage: SharedStorage,
}

impl Auth {
    /// # Errors
    /// An OIDC issuer whose HTTP client cannot be built.
    pub fn new(config: &crate::config::Config, storage: SharedStorage) -> Result<Self, String> {
        let auth = config.auth.clone().unwrap_or_default();
        Ok(Self {
            enforced: auth.enabled(),
            tokens: auth.tokens,
            issuers: auth
                .oidc
                .iter()
                .map(oidc::Issuer::new)
                .collect::<Result<_, _>>()?,
            proxy: auth.proxy.as_ref().and_then(proxy::Proxy::new),
            tickets: tickets::Tickets::default(),
            guard: Guard::from_config(&config.server),
            storage,
        })
    }

    /// Whether credentials are asked for (an `[auth]` method is enabled).
    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// The principal of a request; `None` when it carries no credential at all.
    ///
    /// # Errors
    /// A credential that is present but refused: a wrong, revoked or expired token, an invalid
    /// JWT, a proxy header from an untrusted peer, a used ticket.
    pub async fn resolve(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Option<Principal>, AuthError> {
        if !self.enforced {
            return Ok(Some(Principal::local()));
        }
        if let Some(proxy) = &self.proxy
            && let Some(principal) = proxy.principal(headers, peer)?
        {
            return Ok(Some(principal));
        }
        if let Some(credential) = presented(headers) {
            return self.credential(credential).await.map(Some);
        }
        // A stale cookie is no credential: the login page and public routes must still work.
        if let Some(cookie) = cookie(headers)
            && let Ok(principal) = self.credential(cookie).await
        {
            return Ok(Some(principal));
        }
        if method == Method::GET
            && path == TICKET_ROUTE
            && let Some(ticket) = query.and_then(ticket_of)
        {
            return self
                .tickets
                .redeem(&ticket)
                .map(Some)
                .ok_or(AuthError::InvalidTicket);
        }
        Ok(None)
    }

    /// The principal of an API token or a JWT.
    ///
    /// # Errors
    /// Neither, or refused.
    pub async fn credential(&self, text: &str) -> Result<Principal, AuthError> {
        if !self.enforced {
            return Ok(Principal::local());
        }
        if self.tokens && text.starts_with(tokens::PREFIX) {
            return tokens::principal(&*self.storage, text, now_ms()).await;
        }
        if !self.issuers.is_empty() && text.split('.').count() == 3 {
            let iss = oidc::unverified_issuer(text);
            let issuer = self
                .issuers
                .iter()
                .find(|i| i.issues(iss.as_deref()))
                .ok_or(AuthError::InvalidJwt)?;
            return issuer.verify(text).await;
        }
        Err(AuthError::InvalidCredential)
    }
}

/// The credential of `Authorization: Bearer` or `X-API-Key`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(header::AUTHORIZATION)
        && let Ok(text) = value.to_str()
        && let Some((scheme, credential)) = text.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(credential.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The login cookie's value, if the request carries it.
pub(crate) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|value| !value.is_empty())
}

fn ticket_of(query: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "ticket")
        .map(|(_, value)| value.to_owned())
}

/// The outer layer: the browser guard, then the principal (none in the extensions when the
/// request carried no credential), then CORS on the way out for a configured origin.
pub async fn layer(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let cors = match auth.guard.check(request.uri(), request.headers()) {
        Ok(cors) => cors,
        Err(e) => {
            record(&Event::Denied {
                path: request.uri().path(),
                reason: e.code(),
                principal: None,
            });
            return e.into_response();
        }
    };
    if request.method() == Method::OPTIONS {
        return guard::preflight(cors);
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let resolved = auth
        .resolve(
            request.method(),
            request.uri().path(),
            request.uri().query(),
            request.headers(),
            peer,
        )
        .await;
    match resolved {
        Ok(Some(principal)) => {
            request.extensions_mut().insert(principal);
        }
        Ok(None) => {}
        Err(e) => {
            record(&Event::Denied {
                path: request.uri().path(),
                reason: &e.to_string(),
                principal: None,
            });
            return guard::with_cors(ApiError::from(e).into_response(), cors);
        }
    }
    guard::with_cors(next.run(request).await, cors)
}

/// A handler's principal, put in the request by [`layer`]. A request that reached a handler
/// without one is refused (401): a missing principal never turns into a default one.
impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated(AuthError::Missing.to_string()))
    }
}

/// The route layer: a principal for every route that is not public, and the admin role for the
/// admin routes.
pub async fn require(access: Access, request: Request, next: Next) -> Response {
    if access == Access::Public {
        return next.run(request).await;
    }
    let refused = match request.extensions().get::<Principal>() {
        None => Some(ApiError::Unauthenticated(AuthError::Missing.to_string())),
        Some(p) if access == Access::Admin && !p.is_admin() => Some(ApiError::AdminOnly),
        Some(_) => None,
    };
    match refused {
        Some(e) => {
            record(&Event::Denied {
                path: request.uri().path(),
                reason: e.code(),
                principal: request.extensions().get::<Principal>(),
            });
            e.into_response()
        }
        None => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(tenant: &str) -> Principal {
        Principal {
            tenant: tenant.into(),
            user: "u".into(),
            role: Role::Member,
        }
    }

    #[test]
    fn members_reach_their_own_tenant_only() {
        assert!(may_access(&member("a"), "a"));
        assert!(!may_access(&member("a"), "b"));
        assert!(may_access(&Principal::local(), "b"));
    }

    #[test]
    fn roles_from_claims() {
        assert_eq!(role_of(Some(&serde_json::json!("admin"))), Role::Admin);
        assert_eq!(
            role_of(Some(&serde_json::json!(["x", "Admin"]))),
            Role::Admin
        );
        assert_eq!(role_of(Some(&serde_json::json!("owner"))), Role::Member);
        assert_eq!(role_of(None), Role::Member);
    }

    #[test]
    fn credentials_are_read_from_headers_and_the_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer  agt_x ".parse().unwrap());
        assert_eq!(presented(&headers), Some("agt_x"));
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "agt_y".parse().unwrap());
        assert_eq!(presented(&headers), Some("agt_y"));
        headers.insert("cookie", "a=b; agentd_session=agt_z; c=d".parse().unwrap());
        assert_eq!(cookie(&headers), Some("agt_z"));
        assert_eq!(ticket_of("sessionId=s&ticket=abc"), Some("abc".into()));
    }
}
