//! What keeps a web page the operator happens to visit away from the API, whatever the auth
//! mode: its `Host` must be one this server answers to (DNS rebinding makes an attacker's name
//! resolve to 127.0.0.1), its `Origin` the server's own or a configured one, and CORS answers
//! go to configured origins only, never `*`. A cross-site POST with a form or text body is
//! refused by the JSON body extractor (415).

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::config::{ServerConfig, WorkspaceOrigin};
use crate::error::ApiError;

/// The host and origin rules, decided once at start.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Bound to a loopback address: `Host` must be a loopback name or a configured one.
    loopback: bool,
    /// `server.allowedHosts`, lower case.
    hosts: Vec<String>,
    /// `server.allowedOrigins`, parsed.
    origins: Vec<(WorkspaceOrigin, HeaderValue)>,
    /// `server.workspaceOrigin`: a name this server answers to (for workspace files), never an
    /// origin whose pages may call the API (agent-written pages are served there).
    workspace: Option<WorkspaceOrigin>,
}

impl Guard {
    pub fn from_config(server: &ServerConfig) -> Self {
        let origins = server
            .allowed_origins
            .iter()
            .filter_map(|o| {
                let parsed = WorkspaceOrigin::parse(o).ok()?;
                let value = HeaderValue::from_str(o.trim_end_matches('/')).ok()?;
                Some((parsed, value))
            })
            .collect();
        Self {
            loopback: is_loopback_host(&server.host),
            hosts: server
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            origins,
            workspace: server.workspace_origin(),
        }
    }

    /// Checks `Host` and `Origin`. `Ok(Some(origin))` for a configured cross origin, which its
    /// response must name in `Access-Control-Allow-Origin`.
    ///
    /// # Errors
    /// `HostNotAllowed` or `OriginNotAllowed`.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<Option<HeaderValue>, ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| uri.authority().map(|a| a.as_str().to_owned()));
        if let Some(host) = &host
            && !self.host_allowed(host)
        {
            return Err(ApiError::HostNotAllowed(host.clone()));
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(None);
        };
        let text = origin.to_str().unwrap_or_default();
        if let Some((_, value)) = self.origins.iter().find(|(o, _)| o.matches_origin(text)) {
            return Ok(Some(value.clone()));
        }
        if let Some(host) = &host
            && same_origin(text, host)
        {
            return Ok(None);
        }
        Err(ApiError::OriginNotAllowed(text.to_owned()))
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if self.hosts.contains(&name)
            || self
                .workspace
                .as_ref()
                .is_some_and(|w| w.matches_host(host))
        {
            return true;
        }
        // Off loopback with no names configured, any name reaches the server: authentication,
        // not the name, protects it (DNS rebinding gets no credentials).
        (!self.loopback && self.hosts.is_empty()) || is_loopback_host(&name)
    }
}

/// The answer to a CORS preflight: permission for a configured origin, and for the server's own
/// origin (which needs none) an empty 204.
pub fn preflight(cors: Option<HeaderValue>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    if cors.is_some() {
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET,POST,PUT,DELETE,OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type,Authorization,X-API-Key"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    with_cors(response, cors)
}

/// Names a configured origin in the response, which may then read it (with credentials). The
/// answer differs by `Origin`, which caches must know.
pub fn with_cors(mut response: Response, cors: Option<HeaderValue>) -> Response {
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = cors {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// Whether an address or name to bind or to be addressed by is a loopback one.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.to_ascii_lowercase().ends_with(".localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The name part of a `Host` header: `name`, `name:port`, `[v6]:port`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Whether `origin` (`scheme://host[:port]`) is this request's own origin: the same
/// `host[:port]` as its `Host`, whichever scheme a TLS proxy in front used.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some(authority) = origin
        .strip_prefix("http://")
        .map(|a| (a, 80))
        .or_else(|| origin.strip_prefix("https://").map(|a| (a, 443)))
    else {
        return false;
    };
    let (authority, default_port) = authority;
    let with_port = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        if a.ends_with(']') || !a.contains(':') || (a.starts_with('[') && !a.contains("]:")) {
            format!("{a}:{default_port}")
        } else {
            a
        }
    };
    with_port(authority) == with_port(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(host: &str, hosts: &[&str], origins: &[&str]) -> Guard {
        let server = ServerConfig {
            host: host.into(),
            allowed_hosts: hosts.iter().map(|h| (*h).into()).collect(),
            allowed_origins: origins.iter().map(|o| (*o).into()).collect(),
            ..ServerConfig::default()
        };
        Guard::from_config(&server)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn a_rebound_name_is_refused_on_loopback() {
        let g = guard("127.0.0.1", &[], &[]);
        let uri = Uri::from_static("/api/v1/sessions");
        for ok in [
            "127.0.0.1:3000",
            "localhost:3000",
            "[::1]:3000",
            "app.localhost",
        ] {
            assert!(g.check(&uri, &headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:3000",
            "evil.example",
            "127.0.0.1.evil.example:3000",
        ] {
            assert!(matches!(
                g.check(&uri, &headers(&[("host", bad)])),
                Err(ApiError::HostNotAllowed(_))
            ));
        }
        let named = guard("127.0.0.1", &["dev.internal"], &[]);
        assert!(
            named
                .check(&uri, &headers(&[("host", "DEV.internal:80")]))
                .is_ok()
        );
        // Off loopback the name is only checked when some are configured.
        assert!(
            guard("0.0.0.0", &[], &[])
                .check(&uri, &headers(&[("host", "x.y")]))
                .is_ok()
        );
        assert!(
            guard("0.0.0.0", &["a.b"], &[])
                .check(&uri, &headers(&[("host", "x.y")]))
                .is_err()
        );
    }

    #[test]
    fn only_the_own_or_a_configured_origin_passes() {
        let g = guard("127.0.0.1", &[], &["https://app.example.com"]);
        let uri = Uri::from_static("/api/v1/sessions");
        let own = headers(&[
            ("host", "127.0.0.1:3000"),
            ("origin", "http://127.0.0.1:3000"),
        ]);
        assert_eq!(g.check(&uri, &own).unwrap(), None);
        for bad in [
            "http://127.0.0.1:4000",
            "http://localhost:3000",
            "null",
            "https://evil.example",
        ] {
            let h = headers(&[("host", "127.0.0.1:3000"), ("origin", bad)]);
            assert!(
                matches!(g.check(&uri, &h), Err(ApiError::OriginNotAllowed(_))),
                "{bad}"
            );
        }
        let configured = headers(&[
            ("host", "127.0.0.1:3000"),
            ("origin", "https://app.example.com"),
        ]);
        assert_eq!(
            g.check(&uri, &configured).unwrap().unwrap(),
            "https://app.example.com"
        );
        let default_port = headers(&[("host", "localhost"), ("origin", "http://localhost")]);
        assert_eq!(g.check(&uri, &default_port).unwrap(), None);
    }
}
