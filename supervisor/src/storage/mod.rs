//! Where sessions and their events live: one trait, one backend per `server.storage.type`
//! (ARCHITECTURE decision 8). Only `memory` exists so far; `file` and `sqlite` implement the same
//! trait and pass the same conformance tests.
//!
//! Events are kept as the exact JSON text the worker produced, each with the session's `seq`, so
//! nothing is re-serialised on the way from worker to storage to client.

mod memory;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use memory::MemoryStorage;

/// A session record, exactly as the API shows it (events.md §9.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub id: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub workspace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

/// One stored event with its per-session sequence number.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub json: Arc<str>,
}

/// What `/api/v1/system/health` reports about the store (api.md §14).
#[derive(Debug, Clone, Serialize)]
pub struct StorageDescriptor {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("session {0} not found")]
    NotFound(String),
    #[error("session {0} already exists")]
    AlreadyExists(String),
    #[error("event {seq} of session {session} is not after the last stored one")]
    OutOfOrder { session: String, seq: u64 },
}

/// The storage contract every backend honours.
#[async_trait::async_trait]
pub trait Storage: Send + Sync {
    fn descriptor(&self) -> StorageDescriptor;

    /// Inserts a new record.
    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError>;

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError>;

    /// Every session, most recently updated first.
    async fn sessions(&self) -> Result<Vec<SessionInfo>, StorageError>;

    async fn count_sessions(&self) -> Result<usize, StorageError>;

    /// Shallow-merges `patch` into the metadata and sets `updatedAt` to `now`, atomically.
    async fn merge_metadata(
        &self,
        id: &str,
        patch: Map<String, Value>,
        now: u64,
    ) -> Result<SessionInfo, StorageError>;

    /// Removes the session and all its events; `false` if it did not exist.
    async fn delete_session(&self, id: &str) -> Result<bool, StorageError>;

    /// Appends one event; `seq` must be above every stored one. Bumps `updatedAt`.
    async fn append_event(
        &self,
        id: &str,
        seq: u64,
        json: Arc<str>,
        now: u64,
    ) -> Result<(), StorageError>;

    /// Up to `limit` events with `seq > after`, in order.
    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError>;

    /// The highest stored `seq` of the session (0 when it has none), so numbering continues.
    async fn last_seq(&self, id: &str) -> Result<u64, StorageError>;
}

/// Storage as the rest of the supervisor holds it.
pub type SharedStorage = Arc<dyn Storage>;
