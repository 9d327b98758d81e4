//! [`SseStream`]: a streaming HTTP response read frame by frame through the [`FrameReader`],
//! with deadlines, and the [`Server`] calls that open one.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::time::{Instant, timeout};

use super::{Frame, FrameReader};
use crate::http::Resp;
use crate::{LONG, Server, types};

/// A streaming response being read frame by frame.
pub struct SseStream {
    pub status: u16,
    pub headers: HeaderMap,
    resp: Option<reqwest::Response>,
    frames: FrameReader,
}

impl SseStream {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            resp: Some(resp),
            frames: FrameReader::default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Asserts HTTP 200 and `Content-Type: text/event-stream`.
    pub fn expect_event_stream(&self) -> Result<()> {
        ensure!(
            self.status == 200,
            "expected an SSE response (200), got HTTP {}",
            self.status
        );
        let ct = self.header("content-type").unwrap_or_default();
        ensure!(
            ct.starts_with("text/event-stream"),
            "expected content-type text/event-stream, got {ct:?}"
        );
        Ok(())
    }

    /// Reads the whole body as JSON (for non-SSE error responses such as 409).
    pub async fn json_body(mut self) -> Result<Resp> {
        let resp = self.resp.take().context("stream already consumed")?;
        timeout(LONG, Resp::read(resp))
            .await
            .context("timed out reading body")?
    }

    /// Next frame, `None` once the server closed the response. Errors on timeout.
    pub async fn next_frame(&mut self, within: Duration) -> Result<Option<Frame>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(f) = self.frames.next_frame() {
                return Ok(Some(f));
            }
            let Some(resp) = self.resp.as_mut() else {
                return Ok(None);
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let chunk = timeout(remaining, resp.chunk())
                .await
                .map_err(|_| anyhow!("timed out after {within:?} waiting for an SSE frame"))?
                .context("reading SSE body")?;
            match chunk {
                Some(bytes) => self.frames.push(&bytes)?,
                None => {
                    self.resp = None;
                    self.frames.finish()?;
                }
            }
        }
    }

    /// Reads frames until the server ends the response (total deadline `within`).
    pub async fn collect_until_end(&mut self, within: Duration) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(remaining).await {
                Ok(Some(f)) => out.push(f),
                Ok(None) => return Ok(out),
                Err(e) => {
                    return Err(e.context(format!(
                        "stream did not end; {} frames so far, last: {:?}",
                        out.len(),
                        out.last()
                    )));
                }
            }
        }
    }

    /// Reads frames up to and including the first one whose `type` is `ty`.
    pub async fn read_until_type(&mut self, ty: &str, within: Duration) -> Result<Vec<Frame>> {
        self.read_until(within, |f| f.ty() == ty).await
    }

    /// Reads frames up to and including the first one satisfying `pred`.
    pub async fn read_until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Frame) -> bool,
    ) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(remaining).await? {
                Some(f) => {
                    let hit = pred(&f);
                    out.push(f);
                    if hit {
                        return Ok(out);
                    }
                }
                None => bail!(
                    "stream ended before the awaited frame; got types {:?}",
                    types(&out)
                ),
            }
        }
    }

    /// Reads frames until `n` `assistant_streaming_message` frames were seen.
    pub async fn read_deltas(&mut self, n: usize, within: Duration) -> Result<Vec<Frame>> {
        let mut seen = 0;
        self.read_until(within, |f| {
            if f.ty() == "assistant_streaming_message" {
                seen += 1;
            }
            seen >= n
        })
        .await
    }
}

impl Server {
    /// Opens a GET event stream (`/api/v1/sessions/events/stream`), with extra headers such as
    /// `Last-Event-ID`.
    pub async fn get_sse(&self, path: &str, headers: &[(&str, &str)]) -> Result<SseStream> {
        let mut request = self
            .http
            .get(self.url(path))
            .header("accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let resp = request
            .send()
            .await
            .with_context(|| format!("GET {path}\n--- server logs ---\n{}", self.logs()))?;
        Ok(SseStream::new(resp))
    }

    /// POSTs a JSON body and returns the (possibly SSE) response for frame-by-frame reading.
    pub async fn post_sse(&self, path: &str, body: &Value) -> Result<SseStream> {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(serde_json::to_vec(body)?)
            .send()
            .await
            .with_context(|| format!("POST {path}\n--- server logs ---\n{}", self.logs()))?;
        Ok(SseStream::new(resp))
    }
}
