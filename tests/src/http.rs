//! The JSON HTTP client: one reqwest client per [`Server`], requests by path, and [`Resp`], a
//! fully read response (its shape checks are in `assertions`).

use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::{LONG, Server};

/// Picks rustls' ring provider for this process. reqwest is built without a default one (the
/// workspace keeps aws-lc and OpenSSL out), so every client-building process calls this first;
/// calling it again is harmless.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The client a [`Server`] talks through: no proxy, a bounded connect, and the server's token
/// on every request when there is one (see `auth_mode`).
pub(crate) fn client(token: Option<&str>) -> Result<reqwest::Client> {
    install_crypto();
    let mut headers = HeaderMap::new();
    if let Some(token) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().context("token header")?,
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("build reqwest client")
}

/// A fully read HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    /// Parsed JSON body (`Null` if empty or not JSON).
    pub json: Value,
}

impl Resp {
    pub(crate) async fn read(resp: reqwest::Response) -> Result<Resp> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.context("read response body")?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            text,
            json,
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Top-level `code` of an error body.
    pub fn code(&self) -> Option<&str> {
        self.json.get("code").and_then(Value::as_str)
    }
}

impl Server {
    /// Any request; `body` is `(bytes, content type)`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Resp> {
        let mut rb = self
            .http
            .request(method.clone(), self.url(path))
            .timeout(LONG);
        if let Some((bytes, ct)) = body {
            rb = rb.header("content-type", ct).body(bytes);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("{method} {path}\n--- server logs ---\n{}", self.logs()))?;
        Resp::read(resp).await
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Resp> {
        self.post_raw(path, serde_json::to_vec(body)?, "application/json")
            .await
    }

    pub async fn post_raw(&self, path: &str, bytes: Vec<u8>, content_type: &str) -> Result<Resp> {
        self.request(Method::POST, path, Some((bytes, content_type)))
            .await
    }

    /// GET expecting 200; returns the JSON body.
    pub async fn get_ok(&self, path: &str) -> Result<Value> {
        let r = self.get(path).await?;
        r.expect_status(200, &format!("GET {path}"))?;
        Ok(r.json)
    }

    /// POST JSON expecting 200; returns the JSON body.
    pub async fn post_ok(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self.post_json(path, body).await?;
        r.expect_status(200, &format!("POST {path} {body}"))?;
        Ok(r.json)
    }
}
