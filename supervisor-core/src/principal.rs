//! Who a request acts for. Every request carries one [`Principal`]; handlers never look at
//! credentials, only at this.
//!
//! How a principal is established (tokens, OIDC, a trusted proxy, a cookie, or local mode) is
//! the `auth` layer's business: it puts the principal in the request's extensions before any
//! handler runs (in local mode, a loopback server with no `[auth]` section, the local
//! operator). A request that reached a handler without one is refused (401): a missing
//! principal must never turn into a default one.

use axum::extract::OptionalFromRequestParts;
use axum::http::request::Parts;

/// The tenant of sessions made without one (local mode, imports without `--tenant`).
pub const DEFAULT_TENANT: &str = "default";

/// Longest tenant name.
pub const TENANT_NAME_MAX_CHARS: usize = 64;

/// A tenant name that cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid tenant name {0:?}: use 1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
)]
pub struct InvalidTenant(pub String);

/// Checks a tenant name given by an operator (`import --tenant`, `[tenants.<name>]`): names
/// end up in metric labels, audit entries and storage keys, so they are kept plain.
///
/// # Errors
/// The name is empty, too long, or has other characters.
pub fn check_tenant_name(name: &str) -> Result<(), InvalidTenant> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if plain && starts_well && name.len() <= TENANT_NAME_MAX_CHARS {
        Ok(())
    } else {
        Err(InvalidTenant(name.to_owned()))
    }
}

/// What a principal may do beyond its own tenant's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every tenant's sessions and the operations routes.
    Admin,
    /// Its own tenant's sessions.
    Member,
}

/// The tenant, user and role a request acts for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    pub tenant: String,
    pub user: String,
    pub role: Role,
}

impl Principal {
    /// The operator of a server in local mode: an admin of the default tenant.
    #[must_use]
    pub fn local() -> Self {
        Self {
            tenant: DEFAULT_TENANT.to_owned(),
            user: "local".to_owned(),
            role: Role::Admin,
        }
    }

    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }
}

/// For the few handlers that serve public content too (the fallback): `None` when no
/// principal was established.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Principal>().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names() {
        for good in ["default", "acme", "team-a.eu_1", &"a".repeat(64)] {
            assert_eq!(check_tenant_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", ".", "a b", "a/b", "é", "a\n", &"a".repeat(65)] {
            assert!(check_tenant_name(bad).is_err(), "{bad:?}");
        }
    }
}
