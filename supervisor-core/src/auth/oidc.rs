//! JWTs from configured OIDC issuers, verified against the issuer's published keys (JWKS).
//!
//! The keys are fetched on first use and kept; a token signed with a key id the cache lacks
//! (the issuer rotated its keys) fetches them again, at most once per [`REFETCH_FLOOR`], so a
//! stream of tokens with made-up key ids cannot turn this server into a JWKS hammer. The
//! algorithm must be on the issuer's allow-list, which only holds public-key algorithms: an
//! `alg: none` token does not even parse, and an HS256 token "signed" with the public key (the
//! classic RS/HS confusion) is refused for its algorithm before any key is looked at.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use super::{AuthError, role_of};
use crate::config::auth::{OidcConfig, algorithms};
use crate::principal::Principal;

/// The least time between two fetches of one issuer's keys.
const REFETCH_FLOOR: Duration = Duration::from_secs(2);
/// How long fetched keys are used before they are fetched again.
const KEYS_TTL: Duration = Duration::from_secs(600);
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// The largest JWKS document read.
const MAX_JWKS: usize = 256 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Issuer {
    config: OidcConfig,
    algorithms: Vec<Algorithm>,
    http: reqwest::Client,
    keys: Mutex<Keys>,
}

#[derive(Default)]
struct Keys {
    by_id: HashMap<String, DecodingKey>,
    /// Keys without a `kid`, tried in turn for a token without one.
    anonymous: Vec<DecodingKey>,
    fetched: Option<Instant>,
}

impl Issuer {
    pub(super) fn new(config: &OidcConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!("agent-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            algorithms: algorithms(&config.algorithms)?,
            config: config.clone(),
            http,
            keys: Mutex::default(),
        })
    }

    /// Whether `claims_iss` names this issuer (so the token is this issuer's to judge).
    pub(super) fn issues(&self, claims_iss: Option<&str>) -> bool {
        claims_iss == Some(self.config.issuer.as_str())
    }

    /// The principal a token of this issuer names.
    ///
    /// # Errors
    /// A refused algorithm, an unknown key, a bad signature, wrong claims, or no tenant.
    pub(super) async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidJwt)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::JwtAlgorithm);
        }
        let key = self.key(header.kid.as_deref()).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| {
            tracing::debug!(error = %e, issuer = %self.config.issuer, "JWT refused");
            AuthError::InvalidJwt
        })?;
        let claims = data.claims;
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::InvalidJwt)?;
        let tenant = claims
            .get(&self.config.tenant_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::NoTenant)?;
        Ok(Principal {
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            role: role_of(claims.get(&self.config.role_claim)),
        })
    }

    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        let mut keys = self.keys.lock().await;
        let stale = keys.fetched.is_none_or(|at| at.elapsed() >= KEYS_TTL);
        if !stale && let Some(key) = keys.find(kid) {
            return Ok(key);
        }
        let may_fetch = keys.fetched.is_none_or(|at| at.elapsed() >= REFETCH_FLOOR);
        if may_fetch {
            match self.fetch().await {
                Ok(fresh) => *keys = fresh,
                Err(e) => {
                    tracing::warn!(issuer = %self.config.issuer, url = %self.config.jwks_url, error = %e, "could not fetch the issuer's keys");
                    // A failed fetch counts against the floor too.
                    keys.fetched = Some(Instant::now());
                }
            }
        }
        keys.find(kid).ok_or(AuthError::UnknownKey)
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let mut response = self
            .http
            .get(&self.config.jwks_url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS {
                return Err(format!("the key set is larger than {MAX_JWKS} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let mut keys = Keys {
            fetched: Some(Instant::now()),
            ..Keys::default()
        };
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_id.insert(kid.clone(), key);
                }
                None => keys.anonymous.push(key),
            }
        }
        Ok(keys)
    }
}

impl Keys {
    fn find(&self, kid: Option<&str>) -> Option<DecodingKey> {
        match kid {
            Some(kid) => self.by_id.get(kid).cloned(),
            None if self.anonymous.len() + self.by_id.len() == 1 => self
                .anonymous
                .first()
                .or_else(|| self.by_id.values().next())
                .cloned(),
            None => None,
        }
    }
}

/// The `iss` of a token, read without verifying anything, only to pick the issuer whose keys
/// will verify it.
pub(super) fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_secret_algorithms_are_not_allowed() {
        assert!(algorithms(&["HS256".into()]).is_err());
        assert!(algorithms(&["none".into()]).is_err());
        assert!(algorithms(&[]).is_err());
        assert_eq!(
            algorithms(&["RS256".into(), "ES256".into()]).unwrap(),
            [Algorithm::RS256, Algorithm::ES256]
        );
    }

    #[test]
    fn the_issuer_is_read_from_the_payload() {
        // {"alg":"none"}.{"iss":"https://id.example","sub":"x"}.
        let token = "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL2lkLmV4YW1wbGUiLCJzdWIiOiJ4In0.";
        assert_eq!(
            unverified_issuer(token).as_deref(),
            Some("https://id.example")
        );
        assert_eq!(unverified_issuer("a.!!.c"), None);
    }
}
