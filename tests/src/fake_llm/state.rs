//! What the fake remembers: every request with its headers (unredacted), its scripts, its
//! failure counters, the AGIO batches it received, and how many streams started and ended.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result};
use axum::http::HeaderMap;
use serde_json::{Map, Value, json};

/// One recorded request.
#[derive(Debug, Clone)]
struct Recorded {
    seq: u64,
    path: String,
    headers: Map<String, Value>,
    body: Value,
    started_at: u64,
    outcome: String,
    client_disconnected: bool,
}

impl Recorded {
    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "path": self.path,
            "headers": self.headers,
            "body": self.body,
            "startedAt": self.started_at,
            "outcome": self.outcome,
            "clientDisconnected": self.client_disconnected,
        })
    }
}

#[derive(Default)]
pub(super) struct Inner {
    requests: Vec<Recorded>,
    pub(super) scripts: HashMap<String, Value>,
    fail_counts: HashMap<u64, u32>,
    pub(super) agio: Vec<Value>,
}

/// The server's state, shared by its handlers and the [`FakeLlm`] handle.
#[derive(Default)]
pub struct Shared {
    inner: Mutex<Inner>,
    next_seq: AtomicU64,
    pub(super) started: AtomicU64,
    pub(super) finished: AtomicU64,
    pub(super) aborted: AtomicU64,
    request_log: Option<PathBuf>,
}

impl Shared {
    /// State that appends each request to `REQUEST_LOG` (one JSON line) when that is set.
    pub fn from_env() -> Self {
        Self {
            request_log: std::env::var_os("REQUEST_LOG").map(PathBuf::from),
            ..Self::default()
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces or adds the named scripts of a `{"scripts": {...}}` document.
    pub fn load_scripts(&self, document: &Value) -> Result<usize> {
        let scripts = document
            .get("scripts")
            .and_then(Value::as_object)
            .context("a script document is {\"scripts\": {<name>: {\"steps\": [...]}}}")?;
        let mut inner = self.lock();
        for (name, script) in scripts {
            inner.scripts.insert(name.clone(), script.clone());
        }
        Ok(scripts.len())
    }

    pub(super) fn reset(&self) {
        *self.lock() = Inner::default();
        for counter in [&self.started, &self.finished, &self.aborted] {
            counter.store(0, Ordering::SeqCst);
        }
    }

    pub(super) fn requests_json(&self) -> Value {
        Value::Array(self.lock().requests.iter().map(Recorded::to_json).collect())
    }

    pub(super) fn streams_json(&self) -> Value {
        let started = self.started.load(Ordering::SeqCst);
        let finished = self.finished.load(Ordering::SeqCst);
        let aborted = self.aborted.load(Ordering::SeqCst);
        json!({
            "started": started,
            "open": started.saturating_sub(finished + aborted),
            "finished": finished,
            "aborted": aborted,
        })
    }

    pub(super) fn record(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut names = Map::new();
        for (name, value) in headers {
            names.insert(
                name.as_str().to_owned(),
                json!(String::from_utf8_lossy(value.as_bytes())),
            );
        }
        let body =
            serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)));
        let recorded = Recorded {
            seq,
            path: path.to_owned(),
            headers: names,
            body,
            started_at: now_ms(),
            outcome: "pending".into(),
            client_disconnected: false,
        };
        if let Some(path) = &self.request_log
            && let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(file, "{}", recorded.to_json());
        }
        self.lock().requests.push(recorded);
        seq
    }

    pub(super) fn set_outcome(&self, seq: u64, outcome: &str, disconnected: bool) {
        let mut inner = self.lock();
        if let Some(r) = inner.requests.iter_mut().find(|r| r.seq == seq) {
            r.outcome = outcome.to_owned();
            r.client_disconnected |= disconnected;
        }
    }

    /// Counts one more failure for `key`; `true` while fewer than `times` failures were served.
    pub(super) fn should_fail(&self, key: u64, times: u32) -> bool {
        let mut inner = self.lock();
        let count = inner.fail_counts.entry(key).or_insert(0);
        if *count < times {
            *count += 1;
            true
        } else {
            false
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
