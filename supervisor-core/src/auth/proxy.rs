//! A principal from a header a trusted reverse proxy sets after authenticating the caller
//! itself. The header counts only when the TCP peer is one of the configured proxies; from
//! anyone else it is refused outright (a 401, not ignored), since its mere presence means a
//! client is trying to pass as someone.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use serde_json::Value;

use super::{AuthError, role_of};
use crate::config::auth::{ProxyConfig, parse_cidr};
use crate::principal::{DEFAULT_TENANT, Principal};

/// The longest header value read.
const MAX_HEADER: usize = 4096;

pub(super) struct Proxy {
    header: HeaderName,
    trusted: Vec<IpNet>,
    /// `X-User-Info` carries JSON; any other header a bare user name.
    json: bool,
    tenant: String,
}

impl Proxy {
    pub(super) fn new(config: &ProxyConfig) -> Option<Self> {
        Some(Self {
            header: HeaderName::from_bytes(config.header.as_bytes()).ok()?,
            trusted: config
                .trusted_proxies
                .iter()
                .filter_map(|c| parse_cidr(c).ok())
                .collect(),
            json: config.header.eq_ignore_ascii_case("x-user-info"),
            tenant: config
                .tenant
                .clone()
                .unwrap_or_else(|| DEFAULT_TENANT.to_owned()),
        })
    }

    /// The principal the header names; `None` when the request has no such header.
    ///
    /// # Errors
    /// The header came from a peer that is not a trusted proxy, or is malformed.
    pub(super) fn principal(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Option<Principal>, AuthError> {
        let Some(value) = headers.get(&self.header) else {
            return Ok(None);
        };
        let trusted = peer.is_some_and(|ip| {
            let ip = canonical(ip);
            self.trusted.iter().any(|net| net.contains(&ip))
        });
        if !trusted {
            return Err(AuthError::UntrustedProxy);
        }
        if value.len() > MAX_HEADER {
            return Err(AuthError::Malformed("the proxy's user header is too long"));
        }
        let text = value
            .to_str()
            .map_err(|_| AuthError::Malformed("the proxy's user header is not text"))?;
        if !self.json {
            let user = text.trim();
            if user.is_empty() {
                return Err(AuthError::Malformed("the proxy's user header is empty"));
            }
            return Ok(Some(Principal {
                tenant: self.tenant.clone(),
                user: user.to_owned(),
                role: crate::principal::Role::Member,
            }));
        }
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| AuthError::Malformed("X-User-Info is not URL-encoded UTF-8"))?;
        let info: Value = serde_json::from_str(&decoded)
            .map_err(|_| AuthError::Malformed("X-User-Info is not JSON"))?;
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| info.get(*n).and_then(Value::as_str))
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let user = field(&["user", "id", "email", "name", "sub"])
            .ok_or(AuthError::Malformed("X-User-Info names no user"))?;
        Ok(Some(Principal {
            tenant: field(&["tenant", "tenantId", "org"]).unwrap_or_else(|| self.tenant.clone()),
            user,
            role: role_of(info.get("role")),
        }))
    }
}

/// An IPv4 peer seen through an IPv6 socket (`::ffff:10.0.0.1`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
