//! The `[auth]` section: which ways in are enabled. Any one of them takes the server out of
//! local mode, after which every request needs a principal (see `crate::auth`).

use std::net::IpAddr;

use ipnet::IpNet;
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// API tokens, made with `supervisor ctl tokens create`.
    #[serde(default)]
    pub tokens: bool,
    /// JWTs from these issuers (`[[auth.oidc]]`).
    #[serde(default)]
    pub oidc: Vec<OidcConfig>,
    /// A header set by a trusted reverse proxy (`[auth.proxy]`).
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
}

/// One OIDC issuer whose access tokens (JWTs) are accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcConfig {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// Must be one of the token's `aud`.
    pub audience: String,
    /// Where the issuer publishes its signing keys.
    pub jwks_url: String,
    /// The claim naming the caller's tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim holding the role (`admin` or `member`; a list holding `admin` counts too).
    /// Absent from a token, the caller is a member.
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// Signature algorithms accepted, all of one family (RS*, PS*, ES* or EdDSA).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

fn default_role_claim() -> String {
    "role".into()
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

/// A header a reverse proxy sets after authenticating the caller itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// `X-User-Info` (URL-encoded JSON `{tenant?, user|id|name, role?}`, as Tarko
    /// agent-server-next's proxy sends it) or a plain user name header such as
    /// `X-Forwarded-User`.
    #[serde(default = "default_proxy_header")]
    pub header: String,
    /// The proxies' addresses (CIDRs, or single addresses); the header from any other peer is
    /// refused.
    pub trusted_proxies: Vec<String>,
    /// The tenant of a plain user-name header.
    #[serde(default)]
    pub tenant: Option<String>,
}

fn default_proxy_header() -> String {
    "X-User-Info".into()
}

impl AuthConfig {
    /// Whether any way in is enabled.
    pub fn enabled(&self) -> bool {
        self.tokens || !self.oidc.is_empty() || self.proxy.is_some()
    }

    /// # Errors
    /// A message naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Err(
                "[auth] enables nothing: set auth.tokens = true, add an [[auth.oidc]] \
                        issuer or an [auth.proxy]"
                    .into(),
            );
        }
        for (i, oidc) in self.oidc.iter().enumerate() {
            if oidc.issuer.is_empty() || oidc.audience.is_empty() {
                return Err(format!("auth.oidc[{i}] needs an issuer and an audience"));
            }
            if !(oidc.jwks_url.starts_with("http://") || oidc.jwks_url.starts_with("https://")) {
                return Err(format!(
                    "auth.oidc[{i}].jwksUrl must be an http(s) URL, got {:?}",
                    oidc.jwks_url
                ));
            }
            algorithms(&oidc.algorithms).map_err(|e| format!("auth.oidc[{i}].algorithms: {e}"))?;
        }
        if let Some(proxy) = &self.proxy {
            if proxy.header.is_empty()
                || axum::http::HeaderName::from_bytes(proxy.header.as_bytes()).is_err()
            {
                return Err(format!(
                    "auth.proxy.header {:?} is not a header name",
                    proxy.header
                ));
            }
            if proxy.trusted_proxies.is_empty() {
                return Err("auth.proxy.trustedProxies must name at least one proxy".into());
            }
            for cidr in &proxy.trusted_proxies {
                parse_cidr(cidr)
                    .map_err(|_| format!("auth.proxy.trustedProxies: {cidr:?} is not a CIDR"))?;
            }
        }
        Ok(())
    }
}

/// The allow-list, parsed: public-key algorithms only.
///
/// # Errors
/// An unknown name, a symmetric (HS*) algorithm, or an empty list.
pub(crate) fn algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    if names.is_empty() {
        return Err("name at least one algorithm, e.g. [\"RS256\"]".into());
    }
    names
        .iter()
        .map(|name| {
            let alg: Algorithm = name
                .parse()
                .map_err(|_| format!("unknown algorithm {name:?}"))?;
            match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Err(format!(
                    "{name} is a shared-secret algorithm; an OIDC issuer signs with RS*, PS*, \
                     ES* or EdDSA"
                )),
                other => Ok(other),
            }
        })
        .collect()
}

/// A CIDR or a single address.
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, ipnet::AddrParseError> {
    text.parse::<IpNet>()
        .or_else(|e| text.parse::<IpAddr>().map(IpNet::from).map_err(|_| e))
}
