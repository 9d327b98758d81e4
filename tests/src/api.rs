//! The `/api/v1` calls the tests make over and over, each checking the status it expects and
//! returning the part of the answer a test looks at.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use crate::sse::{Frame, SseStream};
use crate::{LONG, Server};

impl Server {
    /// `POST /api/v1/sessions/create {}` expecting 201; returns the whole body.
    pub async fn create_session_full(&self) -> Result<Value> {
        let r = self
            .post_json("/api/v1/sessions/create", &json!({}))
            .await?;
        r.expect_status(201, "POST /api/v1/sessions/create")?;
        Ok(r.json)
    }

    /// Creates a session, returns its id.
    pub async fn create_session(&self) -> Result<String> {
        let body = self.create_session_full().await?;
        body["sessionId"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("create: no sessionId in {body}"))
    }

    /// Non-streaming query expecting 200; returns `result`.
    pub async fn query(&self, sid: &str, q: &str) -> Result<Value> {
        let body = self
            .post_ok(
                "/api/v1/sessions/query",
                &json!({"sessionId": sid, "query": q}),
            )
            .await?;
        body.get("result")
            .cloned()
            .with_context(|| format!("query: no result in {body}"))
    }

    /// Streaming query; asserts 200 + `text/event-stream`.
    pub async fn stream(&self, sid: &str, q: &str) -> Result<SseStream> {
        let s = self
            .post_sse(
                "/api/v1/sessions/query/stream",
                &json!({"sessionId": sid, "query": q}),
            )
            .await?;
        s.expect_event_stream()?;
        Ok(s)
    }

    /// Streaming query read to the end.
    pub async fn stream_all(&self, sid: &str, q: &str) -> Result<Vec<Frame>> {
        self.stream(sid, q).await?.collect_until_end(LONG).await
    }

    /// `GET /sessions/status` → the `status` object.
    pub async fn status(&self, sid: &str) -> Result<Value> {
        let b = self
            .get_ok(&format!("/api/v1/sessions/status?sessionId={sid}"))
            .await?;
        ensure!(b["sessionId"] == sid, "status: wrong sessionId in {b}");
        Ok(b["status"].clone())
    }

    /// `GET /sessions/events` → stored events.
    pub async fn events(&self, sid: &str) -> Result<Vec<Value>> {
        let b = self
            .get_ok(&format!("/api/v1/sessions/events?sessionId={sid}"))
            .await?;
        b["events"]
            .as_array()
            .cloned()
            .with_context(|| format!("events: not an array in {b}"))
    }

    /// `GET /sessions/details` → the `session` object.
    pub async fn details(&self, sid: &str) -> Result<Value> {
        let b = self
            .get_ok(&format!("/api/v1/sessions/details?sessionId={sid}"))
            .await?;
        Ok(b["session"].clone())
    }

    /// `POST /sessions/abort` → `success`.
    pub async fn abort(&self, sid: &str) -> Result<bool> {
        let b = self
            .post_ok("/api/v1/sessions/abort", &json!({"sessionId": sid}))
            .await?;
        b["success"]
            .as_bool()
            .with_context(|| format!("abort: no boolean success in {b}"))
    }

    /// `POST /sessions/delete` expecting `{"success":true}`.
    pub async fn delete_session(&self, sid: &str) -> Result<()> {
        let b = self
            .post_ok("/api/v1/sessions/delete", &json!({"sessionId": sid}))
            .await?;
        ensure!(b["success"] == true, "delete: {b}");
        Ok(())
    }

    /// `GET /workers` → the `workers` array.
    pub async fn workers(&self) -> Result<Vec<Value>> {
        let b = self.get_ok("/api/v1/workers").await?;
        let workers = b["workers"]
            .as_array()
            .cloned()
            .with_context(|| format!("workers: not an array in {b}"))?;
        self.saw_workers(
            workers
                .iter()
                .filter_map(|w| w["pid"].as_u64().and_then(|p| u32::try_from(p).ok())),
        );
        Ok(workers)
    }

    /// The pid of the session's live worker, if any.
    pub async fn worker_pid(&self, sid: &str) -> Result<Option<u32>> {
        for w in self.workers().await? {
            if w["sessionId"] == sid {
                let pid = w["pid"]
                    .as_u64()
                    .with_context(|| format!("worker without numeric pid: {w}"))?;
                return Ok(Some(u32::try_from(pid)?));
            }
        }
        Ok(None)
    }

    /// The session's worker pid, waiting (up to 20 s) for it to appear.
    pub async fn wait_worker_pid(&self, sid: &str) -> Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = self.worker_pid(sid).await? {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no worker listed for session {sid}: {:?}\n--- logs ---\n{}",
                    self.workers().await?,
                    self.logs()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}
