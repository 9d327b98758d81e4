//! Where sessions and their events live: one trait, one backend per `server.storage.type`
//! (ARCHITECTURE decision 8): `memory` (the default), `file`, `sqlite` and `postgres` (the
//! store several nodes can share). All of them pass the same conformance suite at the bottom of
//! this file.
//!
//! Events are kept as the exact JSON text the worker produced, each with the session's `seq`, so
//! nothing is re-serialised on the way from worker to storage to client.
//!
//! Records are bounded ([`limits`]) and listed a page at a time, so no listing holds every
//! record in memory at once: [`Storage::sessions_page`] pages in creation order with a cursor,
//! and a full listing by recency takes the order once ([`Storage::ids_by_recency`], ids only)
//! and then fetches the records a page at a time ([`Storage::sessions_by_ids`]).

pub mod audit;
mod file;
pub mod limits;
mod memory;
mod postgres;
pub mod share_links;
mod sqlite;
mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use audit::AuditEntry;
pub use file::FileStorage;
pub use limits::{TooLarge, check_metadata};
pub use memory::MemoryStorage;
pub use postgres::PostgresStorage;
pub use share_links::ShareLink;
pub use sqlite::SqliteStorage;
pub use tokens::{MAX_TOKEN_NAME, TokenRecord};

use crate::config::{StorageConfig, StorageKind};

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
    /// The tenant the session belongs to, set once from the principal that made it (or
    /// `import --tenant`). Records stored before tenancy existed read as the default tenant.
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

fn default_tenant() -> String {
    crate::principal::DEFAULT_TENANT.to_owned()
}

impl SessionInfo {
    /// The tenant owning the session, which decides who may use it (`crate::auth::may_access`).
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
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
    /// The database's URL with any password masked (`postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("session {0} not found")]
    NotFound(String),
    #[error("session {0} already exists")]
    AlreadyExists(String),
    #[error("event {seq} of session {session} is not after the last stored one")]
    OutOfOrder { session: String, seq: u64 },
    #[error("storage I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(String),
    #[error("postgres: {0}")]
    Postgres(String),
    /// The database server cannot be reached right now (down, restarting, out of
    /// connections); the same operation may succeed once it is back.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is unusable: {0}")]
    Corrupt(String),
    #[error("the session record would be too large: {0}")]
    TooLarge(#[from] TooLarge),
    #[error("the storage has been closed")]
    Closed,
}

impl StorageError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn sqlite(error: rusqlite::Error) -> Self {
        Self::Sqlite(error.to_string())
    }
}

/// Where a paged listing resumes: just after this session in creation order, newest first.
///
/// Creation order never changes, so paging with it returns every session that exists for the
/// whole walk exactly once, however often sessions are updated meanwhile; sessions created
/// after the walk began sort before its cursor and are not in its later pages.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageCursor {
    pub created_at: u64,
    pub id: String,
}

impl PageCursor {
    /// The cursor that resumes after `info`.
    pub fn after(info: &SessionInfo) -> Self {
        Self {
            created_at: info.created_at,
            id: info.id.clone(),
        }
    }

    /// Whether a session with this creation key comes after the cursor (is older).
    pub(crate) fn precedes(&self, created_at: u64, id: &str) -> bool {
        (created_at, id) < (self.created_at, self.id.as_str())
    }
}

/// The order of a full listing: most recently updated first; ties by creation, newest first,
/// then by id, so the order is total.
pub(crate) fn recency_key(updated_at: u64, created_at: u64, id: &str) -> impl Ord + '_ {
    (
        std::cmp::Reverse(updated_at),
        std::cmp::Reverse(created_at),
        std::cmp::Reverse(id),
    )
}

/// Opens the backend the configuration names; `data_dir` holds its default location.
///
/// # Errors
/// The backend's file or directory cannot be opened, or its database cannot be reached.
pub async fn open(config: &StorageConfig, data_dir: &Path) -> Result<SharedStorage, StorageError> {
    Ok(match config.kind {
        StorageKind::Memory => Arc::new(MemoryStorage::new()),
        StorageKind::File => Arc::new(FileStorage::open(&config.resolved_path(data_dir))?),
        StorageKind::Sqlite => Arc::new(SqliteStorage::open(&config.resolved_path(data_dir))?),
        StorageKind::Postgres => {
            // The configuration is checked at load time; this only names what is missing.
            let url = config
                .url
                .as_ref()
                .ok_or_else(|| StorageError::Postgres("server.storage.url is not set".into()))?;
            Arc::new(PostgresStorage::open(url.expose()).await?)
        }
    })
}

/// The storage contract every backend honours.
#[async_trait::async_trait]
pub trait Storage: Send + Sync {
    fn descriptor(&self) -> StorageDescriptor;

    /// Inserts a new record.
    ///
    /// # Errors
    /// `TooLarge` when its metadata is over the [`limits`] (nothing is stored).
    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError>;

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError>;

    /// Up to `limit` records in creation order, newest first, starting after `after` (from
    /// the newest without one). See [`PageCursor`] for what paging guarantees.
    async fn sessions_page(
        &self,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError>;

    /// Every session's id, most recently updated first (ties as [`recency_key`]): the order
    /// of a full listing, taken once so its records can then be fetched a page at a time.
    async fn ids_by_recency(&self) -> Result<Vec<String>, StorageError>;

    /// The records of `ids` that still exist, in the order given.
    async fn sessions_by_ids(&self, ids: &[String]) -> Result<Vec<SessionInfo>, StorageError>;

    async fn count_sessions(&self) -> Result<usize, StorageError>;

    /// Shallow-merges `patch` into the metadata and sets `updatedAt` to `now`, atomically.
    ///
    /// # Errors
    /// `NotFound`; `TooLarge` when the merged metadata would be over the [`limits`], in which
    /// case the record is left as it was.
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

    /// Promises that no `seq` up to `upto` will be handed out again for this session:
    /// [`Storage::last_seq`] reports at least `upto` from now on, even after a restart.
    /// Streaming deltas consume sequence numbers without being stored; reserving them in
    /// blocks keeps a resumed stream from ever seeing a number reused after a crash.
    async fn reserve_seq(&self, id: &str, upto: u64) -> Result<(), StorageError>;

    /// The highest `seq` the session has stored or reserved (0 when none), so numbering
    /// continues after a restart.
    async fn last_seq(&self, id: &str) -> Result<u64, StorageError>;

    /// Keeps one record of the live run's streamed text, covering its streaming deltas up to
    /// `seq`; `seq` must be above every record kept for the session. Deltas are not events and
    /// never enter the log, but what a client was shown of them must survive a crash: the
    /// records are read back only to turn a crashed run's text into history (`live_text.rs`
    /// owns their content; storage keeps them as opaque JSON).
    async fn append_live_text(
        &self,
        id: &str,
        seq: u64,
        record: Arc<str>,
    ) -> Result<(), StorageError>;

    /// The live-text records with `seq > after`, in order (none for an unknown session).
    async fn live_text_after(&self, id: &str, after: u64)
    -> Result<Vec<StoredEvent>, StorageError>;

    /// Drops the live-text records with `seq <= upto`: their run has ended in the log, so they
    /// will never be needed.
    async fn clear_live_text(&self, id: &str, upto: u64) -> Result<(), StorageError>;
    /// Records the host uid/gid a session's worker runs as (root mode), so that a restarted
    /// server gives it the same identity (its workspace files belong to it) and never hands the
    /// id to another session. Kept with the record, gone with it.
    async fn set_host_id(&self, id: &str, host_id: u32) -> Result<(), StorageError>;

    /// Every stored session's recorded host id, read once at start.
    async fn host_ids(&self) -> Result<Vec<(String, u32)>, StorageError>;

    /// Stores a new API token record.
    ///
    /// # Errors
    /// `AlreadyExists` when its id is taken.
    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError>;

    /// The token record `id`, revoked and expired ones included.
    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StorageError>;

    /// Every token record, oldest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError>;

    /// Marks token `id` revoked at `now` (an earlier revocation stands); `false` when there is
    /// no such token.
    async fn revoke_token(&self, id: &str, now: u64) -> Result<bool, StorageError>;
    /// How many sessions `tenant` has (its `sessions` quota counts them).
    async fn count_tenant_sessions(&self, tenant: &str) -> Result<usize, StorageError>;

    /// Stores a share link of an existing session; it goes with the session.
    ///
    /// # Errors
    /// `NotFound` when the session does not exist; `AlreadyExists` for a taken id or hash.
    async fn create_share_link(&self, link: ShareLink) -> Result<(), StorageError>;

    /// The link whose token hashes to `token_hash`, expired or not.
    async fn share_link_by_hash(&self, token_hash: &str)
    -> Result<Option<ShareLink>, StorageError>;

    /// Every link of `tenant`'s sessions, newest first.
    async fn share_links(&self, tenant: &str) -> Result<Vec<ShareLink>, StorageError>;

    /// Removes link `id` if it belongs to `tenant`; `false` if there is no such link there.
    async fn revoke_share_link(&self, tenant: &str, id: &str) -> Result<bool, StorageError>;

    /// Appends an entry (its fields already [`AuditEntry::bounded`]), giving it the next id;
    /// entries older than the newest [`audit::AUDIT_KEEP`] may be dropped.
    async fn append_audit(&self, entry: AuditEntry) -> Result<u64, StorageError>;

    /// Up to `limit` entries with an id below `before` (from the newest without one), newest
    /// first.
    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError>;
}

/// Storage as the rest of the supervisor holds it.
pub type SharedStorage = Arc<dyn Storage>;

/// The contract every backend must honour, run against each of them.
#[cfg(test)]
mod conformance {
    use super::*;
    use serde_json::json;

    fn info(id: &str, t: u64) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            created_at: t,
            updated_at: t,
            workspace: format!("/w/{id}"),
            metadata: None,
            tenant: crate::principal::DEFAULT_TENANT.into(),
        }
    }

    fn event(n: u64) -> Arc<str> {
        format!(
            "{{\"id\":\"e{n}\",\"type\":\"user_message\",\"content\":\"m{n}\",\"timestamp\":{n}}}"
        )
        .into()
    }

    async fn seqs(store: &dyn Storage, id: &str, after: u64, limit: usize) -> Vec<u64> {
        store
            .events_after(id, after, limit)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    /// A full listing as the API builds it: the order first, then the records by page.
    async fn by_recency(store: &dyn Storage) -> Vec<SessionInfo> {
        let ids = store.ids_by_recency().await.unwrap();
        let mut all = Vec::new();
        for page in ids.chunks(2) {
            all.extend(store.sessions_by_ids(page).await.unwrap());
        }
        all
    }

    async fn lifecycle(store: &dyn Storage) {
        assert!(by_recency(store).await.is_empty());
        store.create_session(info("a", 10)).await.unwrap();
        store.create_session(info("b", 20)).await.unwrap();
        assert!(matches!(
            store.create_session(info("a", 30)).await,
            Err(StorageError::AlreadyExists(_))
        ));
        assert_eq!(store.count_sessions().await.unwrap(), 2);
        assert_eq!(store.session("a").await.unwrap().unwrap().workspace, "/w/a");
        assert!(store.session("zz").await.unwrap().is_none());
        let order: Vec<String> = by_recency(store).await.into_iter().map(|s| s.id).collect();
        assert_eq!(order, ["b", "a"]);

        let mut patch = Map::new();
        patch.insert("name".into(), json!("first"));
        patch.insert("tags".into(), json!(["x"]));
        store.merge_metadata("a", patch, 40).await.unwrap();
        let mut patch = Map::new();
        patch.insert("name".into(), json!("second"));
        let merged = store.merge_metadata("a", patch, 50).await.unwrap();
        let metadata = merged.metadata.unwrap();
        assert_eq!(
            (metadata["name"].clone(), metadata["tags"].clone()),
            (json!("second"), json!(["x"]))
        );
        assert_eq!(merged.updated_at, 50);
        assert_eq!(
            store.session("a").await.unwrap().unwrap().metadata.unwrap()["name"],
            "second"
        );
        assert!(matches!(
            store.merge_metadata("zz", Map::new(), 1).await,
            Err(StorageError::NotFound(_))
        ));
        let order: Vec<String> = by_recency(store).await.into_iter().map(|s| s.id).collect();
        assert_eq!(
            order,
            ["a", "b"],
            "a metadata update makes a session the most recent"
        );

        assert!(store.delete_session("b").await.unwrap());
        assert!(!store.delete_session("b").await.unwrap());
        assert!(store.session("b").await.unwrap().is_none());
        assert_eq!(store.count_sessions().await.unwrap(), 1);
    }

    async fn tokens(store: &dyn Storage) {
        let token = |id: &str, at: u64| TokenRecord {
            id: id.into(),
            name: Some("laptop".into()),
            tenant: "acme".into(),
            user: "ann".into(),
            role: crate::principal::Role::Member,
            created_at: at,
            expires_at: Some(at + 1000),
            revoked_at: None,
            hash: format!("{id}-hash"),
        };
        assert!(store.token("t1").await.unwrap().is_none());
        store.create_token(token("t1", 10)).await.unwrap();
        store.create_token(token("t2", 20)).await.unwrap();
        assert!(matches!(
            store.create_token(token("t1", 30)).await,
            Err(StorageError::AlreadyExists(_))
        ));
        assert_eq!(store.token("t1").await.unwrap().unwrap(), token("t1", 10));
        let ids: Vec<String> = store
            .tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["t1", "t2"]);
        assert!(store.revoke_token("t1", 50).await.unwrap());
        assert!(store.revoke_token("t1", 60).await.unwrap());
        assert!(!store.revoke_token("nope", 60).await.unwrap());
        let revoked = store.token("t1").await.unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(50), "the first revocation stands");
        assert_eq!(store.token("t2").await.unwrap().unwrap().revoked_at, None);
    }

    async fn events(store: &dyn Storage) {
        store.create_session(info("s", 1)).await.unwrap();
        assert_eq!(store.last_seq("s").await.unwrap(), 0);
        for seq in [1, 2, 5, 6, 9] {
            store
                .append_event("s", seq, event(seq), 100 + seq)
                .await
                .unwrap();
        }
        assert!(matches!(
            store.append_event("s", 9, event(9), 200).await,
            Err(StorageError::OutOfOrder { .. })
        ));
        assert!(matches!(
            store.append_event("s", 3, event(3), 200).await,
            Err(StorageError::OutOfOrder { .. })
        ));
        assert!(matches!(
            store.append_event("nope", 1, event(1), 200).await,
            Err(StorageError::NotFound(_))
        ));
        assert_eq!(store.last_seq("s").await.unwrap(), 9);
        store.reserve_seq("s", 100).await.unwrap();
        assert_eq!(
            store.last_seq("s").await.unwrap(),
            100,
            "a reservation counts as used"
        );
        store.append_event("s", 10, event(10), 110).await.unwrap();
        assert_eq!(store.last_seq("s").await.unwrap(), 100);
        assert_eq!(seqs(store, "s", 0, usize::MAX).await, [1, 2, 5, 6, 9, 10]);
        assert_eq!(seqs(store, "s", 2, 2).await, [5, 6]);
        assert_eq!(seqs(store, "s", 9, 10).await, [10]);
        assert_eq!(seqs(store, "s", 10, 10).await, Vec::<u64>::new());
        let stored = store.events_after("s", 4, 1).await.unwrap();
        assert_eq!(
            &*stored[0].json,
            &*event(5),
            "events come back byte for byte"
        );
        assert_eq!(
            store.session("s").await.unwrap().unwrap().updated_at,
            110,
            "an event bumps updatedAt"
        );
        assert!(store.events_after("nope", 0, 10).await.unwrap().is_empty());

        assert!(store.delete_session("s").await.unwrap());
        assert!(store.events_after("s", 0, 10).await.unwrap().is_empty());
        store.create_session(info("s", 2)).await.unwrap();
        assert!(
            store.events_after("s", 0, 10).await.unwrap().is_empty(),
            "a new session with an old id starts empty"
        );
        assert_eq!(
            store.last_seq("s").await.unwrap(),
            0,
            "and with no reservation"
        );
    }

    fn live(n: u64) -> Arc<str> {
        format!("[{{\"kind\":\"text\",\"messageId\":\"m\",\"text\":\"piece {n}\"}}]").into()
    }

    async fn live_seqs(store: &dyn Storage, id: &str, after: u64) -> Vec<u64> {
        store
            .live_text_after(id, after)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    async fn live_text(store: &dyn Storage) {
        store.create_session(info("l", 1)).await.unwrap();
        assert!(live_seqs(store, "l", 0).await.is_empty());
        store.append_event("l", 1, event(1), 2).await.unwrap();
        for seq in [3, 4, 8] {
            store.append_live_text("l", seq, live(seq)).await.unwrap();
        }
        assert!(matches!(
            store.append_live_text("l", 8, live(8)).await,
            Err(StorageError::OutOfOrder { .. })
        ));
        assert!(matches!(
            store.append_live_text("nope", 9, live(9)).await,
            Err(StorageError::NotFound(_))
        ));
        assert_eq!(live_seqs(store, "l", 0).await, [3, 4, 8]);
        assert_eq!(live_seqs(store, "l", 3).await, [4, 8]);
        let records = store.live_text_after("l", 7).await.unwrap();
        assert_eq!(
            &*records[0].json,
            &*live(8),
            "records come back byte for byte"
        );
        assert_eq!(
            seqs(store, "l", 0, 10).await,
            [1],
            "live text is not part of the event log"
        );
        assert_eq!(
            store.session("l").await.unwrap().unwrap().updated_at,
            2,
            "live text does not bump updatedAt"
        );
        assert!(store.live_text_after("nope", 0).await.unwrap().is_empty());

        store.clear_live_text("l", 4).await.unwrap();
        assert_eq!(live_seqs(store, "l", 0).await, [8]);
        store.append_live_text("l", 9, live(9)).await.unwrap();
        store.clear_live_text("l", 9).await.unwrap();
        assert!(live_seqs(store, "l", 0).await.is_empty());
        store.clear_live_text("l", 9).await.unwrap();
        store.clear_live_text("nope", 9).await.unwrap();
        store.append_live_text("l", 12, live(12)).await.unwrap();
        assert_eq!(live_seqs(store, "l", 0).await, [12]);

        assert!(store.delete_session("l").await.unwrap());
        assert!(live_seqs(store, "l", 0).await.is_empty());
        store.create_session(info("l", 2)).await.unwrap();
        assert!(
            live_seqs(store, "l", 0).await.is_empty(),
            "a new session with an old id starts without live text"
        );
        store.append_live_text("l", 1, live(1)).await.unwrap();
    }

    async fn host_ids(store: &dyn Storage) {
        store.create_session(info("h1", 1)).await.unwrap();
        store.create_session(info("h2", 2)).await.unwrap();
        assert!(store.host_ids().await.unwrap().is_empty());
        store.set_host_id("h1", 200_007).await.unwrap();
        store.set_host_id("h2", 200_009).await.unwrap();
        store.set_host_id("h2", 200_011).await.unwrap();
        assert!(matches!(
            store.set_host_id("nope", 1).await,
            Err(StorageError::NotFound(_))
        ));
        let mut ids = store.host_ids().await.unwrap();
        ids.sort();
        assert_eq!(ids, [("h1".into(), 200_007), ("h2".into(), 200_011)]);
        assert_eq!(
            store.session("h1").await.unwrap().unwrap(),
            info("h1", 1),
            "the record as the API shows it is unchanged"
        );
        assert!(store.delete_session("h1").await.unwrap());
        store.create_session(info("h1", 3)).await.unwrap();
        assert_eq!(
            store.host_ids().await.unwrap(),
            [("h2".into(), 200_011)],
            "a deleted session's id goes with it"
        );
    }

    async fn tenants(store: &dyn Storage) {
        let mut other = info("t1", 1);
        other.tenant = "acme".into();
        store.create_session(other.clone()).await.unwrap();
        store.create_session(info("t2", 2)).await.unwrap();
        assert_eq!(store.session("t1").await.unwrap().unwrap(), other);
        assert_eq!(store.session("t1").await.unwrap().unwrap().tenant(), "acme");
        assert_eq!(
            store.sessions_page(None, 10).await.unwrap()[1].tenant,
            "acme"
        );
        assert_eq!(
            store.sessions_by_ids(&["t1".into()]).await.unwrap()[0].tenant,
            "acme"
        );
        let mut patch = Map::new();
        patch.insert("name".into(), json!("renamed"));
        assert_eq!(
            store.merge_metadata("t1", patch, 5).await.unwrap().tenant,
            "acme",
            "a metadata merge keeps the tenant"
        );
        assert_eq!(store.count_tenant_sessions("acme").await.unwrap(), 1);
        assert_eq!(store.count_tenant_sessions("default").await.unwrap(), 1);
        assert_eq!(store.count_tenant_sessions("nobody").await.unwrap(), 0);
        store.delete_session("t1").await.unwrap();
        assert_eq!(store.count_tenant_sessions("acme").await.unwrap(), 0);
    }

    fn link(id: &str, session: &str, tenant: &str, at: u64) -> ShareLink {
        ShareLink {
            id: id.into(),
            token_hash: format!("hash-{id}"),
            session_id: session.into(),
            tenant: tenant.into(),
            created_by: "u".into(),
            created_at: at,
            expires_at: at.is_multiple_of(2).then_some(at + 1000),
        }
    }

    async fn share_links(store: &dyn Storage) {
        let mut theirs = info("b1", 1);
        theirs.tenant = "b".into();
        store.create_session(info("a1", 1)).await.unwrap();
        store.create_session(theirs).await.unwrap();
        store
            .create_share_link(link("l1", "a1", "default", 10))
            .await
            .unwrap();
        store
            .create_share_link(link("l2", "a1", "default", 11))
            .await
            .unwrap();
        store
            .create_share_link(link("l3", "b1", "b", 12))
            .await
            .unwrap();
        assert!(matches!(
            store
                .create_share_link(link("l4", "gone", "default", 13))
                .await,
            Err(StorageError::NotFound(_))
        ));
        assert_eq!(
            store.share_link_by_hash("hash-l2").await.unwrap(),
            Some(link("l2", "a1", "default", 11))
        );
        assert!(store.share_link_by_hash("hash-l4").await.unwrap().is_none());
        let listed: Vec<String> = store
            .share_links("default")
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(listed, ["l2", "l1"], "the tenant's own, newest first");
        assert!(
            !store.revoke_share_link("default", "l3").await.unwrap(),
            "another tenant's link cannot be revoked"
        );
        assert!(store.share_link_by_hash("hash-l3").await.unwrap().is_some());
        assert!(store.revoke_share_link("default", "l1").await.unwrap());
        assert!(!store.revoke_share_link("default", "l1").await.unwrap());
        assert!(store.share_link_by_hash("hash-l1").await.unwrap().is_none());
        store.delete_session("a1").await.unwrap();
        assert!(
            store.share_link_by_hash("hash-l2").await.unwrap().is_none(),
            "a deleted session's links go with it"
        );
        assert!(store.share_links("default").await.unwrap().is_empty());
        assert_eq!(store.share_links("b").await.unwrap().len(), 1);
    }

    fn entry(n: u64) -> AuditEntry {
        AuditEntry {
            id: 0,
            at: n,
            tenant: "default".into(),
            user: "local".into(),
            role: "admin".into(),
            action: "session.create".into(),
            target: format!("s{n}"),
            outcome: "ok".into(),
            detail: n.is_multiple_of(2).then(|| format!("d{n}")),
        }
    }

    async fn audit(store: &dyn Storage) {
        assert!(store.audit_page(None, 10).await.unwrap().is_empty());
        let mut ids = Vec::new();
        for n in 1..=5 {
            ids.push(store.append_audit(entry(n)).await.unwrap());
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let page = store.audit_page(None, 2).await.unwrap();
        let targets: Vec<&str> = page.iter().map(|e| e.target.as_str()).collect();
        assert_eq!(targets, ["s5", "s4"]);
        assert_eq!(page[1].detail.as_deref(), Some("d4"));
        assert_eq!(page[0].id, ids[4]);
        let rest = store.audit_page(Some(page[1].id), 10).await.unwrap();
        let targets: Vec<&str> = rest.iter().map(|e| e.target.as_str()).collect();
        assert_eq!(targets, ["s3", "s2", "s1"]);
        let mut expected = entry(1);
        expected.id = ids[0];
        assert_eq!(rest[2], expected);
    }

    async fn concurrent_writers(store: Arc<dyn Storage>) {
        let sessions = 8u64;
        let per_session = 50u64;
        for s in 0..sessions {
            store
                .create_session(info(&format!("c{s}"), s))
                .await
                .unwrap();
        }
        let tasks: Vec<_> = (0..sessions)
            .map(|s| {
                let store = store.clone();
                tokio::spawn(async move {
                    for seq in 1..=per_session {
                        store
                            .append_event(&format!("c{s}"), seq, event(seq), seq)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        for s in 0..sessions {
            let got = seqs(&*store, &format!("c{s}"), 0, usize::MAX).await;
            assert_eq!(got, (1..=per_session).collect::<Vec<_>>());
        }
    }

    fn ids(records: &[SessionInfo]) -> Vec<String> {
        records.iter().map(|s| s.id.clone()).collect()
    }

    /// Every page of a creation-order walk, `limit` at a time.
    async fn walk(store: &dyn Storage, limit: usize) -> Vec<Vec<SessionInfo>> {
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.sessions_page(cursor.as_ref(), limit).await.unwrap();
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            cursor = Some(PageCursor::after(last));
            pages.push(page);
        }
        pages
    }

    async fn paging(store: &dyn Storage) {
        assert!(store.sessions_page(None, 10).await.unwrap().is_empty());
        // Ties in createdAt are ordered by id, so a cursor inside a tie resumes exactly.
        for (id, created) in [("a", 5), ("b", 5), ("c", 5), ("d", 1), ("e", 9), ("f", 7)] {
            store.create_session(info(id, created)).await.unwrap();
        }
        let expected = ["e", "f", "c", "b", "a", "d"];
        for limit in [1, 2, 4, 6, 100] {
            let pages = walk(store, limit).await;
            let walked: Vec<String> = pages.iter().flat_map(|p| ids(p)).collect();
            assert_eq!(walked, expected, "limit {limit}");
        }
        let after_b = PageCursor {
            created_at: 5,
            id: "b".into(),
        };
        assert_eq!(
            ids(&store.sessions_page(Some(&after_b), 10).await.unwrap()),
            ["a", "d"]
        );
        // A cursor of a deleted session still resumes in place.
        store.delete_session("b").await.unwrap();
        assert_eq!(
            ids(&store.sessions_page(Some(&after_b), 10).await.unwrap()),
            ["a", "d"]
        );
        // Records come whole, with their current updatedAt.
        let mut patch = Map::new();
        patch.insert("name".into(), json!("named"));
        store.merge_metadata("d", patch, 50).await.unwrap();
        store.append_event("d", 1, event(1), 60).await.unwrap();
        let page = store.sessions_page(Some(&after_b), 10).await.unwrap();
        assert_eq!(page[1].metadata.as_ref().unwrap()["name"], "named");
        assert_eq!(page[1].updated_at, 60);

        assert_eq!(
            store.ids_by_recency().await.unwrap(),
            ["d", "e", "f", "c", "a"],
            "most recently updated first, ties by creation then id"
        );
        let wanted: Vec<String> = ["f", "gone", "d"].map(String::from).into();
        assert_eq!(
            ids(&store.sessions_by_ids(&wanted).await.unwrap()),
            ["f", "d"],
            "in the order asked, missing ones left out"
        );
        assert_eq!(
            store.sessions_by_ids(&["d".into()]).await.unwrap()[0].updated_at,
            60
        );
    }

    /// Paging in creation order while other tasks update, create and delete sessions: every
    /// session that exists for the whole walk comes exactly once, and no session twice.
    async fn paging_under_writes(store: Arc<dyn Storage>) {
        let initial = 60u64;
        for n in 0..initial {
            // Some share a createdAt, so ties are crossed by page boundaries.
            store
                .create_session(info(&format!("s{n:03}"), 1000 + n / 3))
                .await
                .unwrap();
        }
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writer = {
            let (store, stop, writes) = (store.clone(), stop.clone(), writes.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut patch = Map::new();
                    patch.insert("n".into(), json!(n));
                    let target = format!("s{:03}", (n * 7) % initial);
                    store
                        .merge_metadata(&target, patch, 5000 + n)
                        .await
                        .unwrap();
                    store
                        .create_session(info(&format!("new{n}"), 2000 + n))
                        .await
                        .unwrap();
                    if n.is_multiple_of(5) {
                        store.delete_session(&format!("new{n}")).await.unwrap();
                    }
                    n += 1;
                    writes.store(n, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut seen = std::collections::HashSet::new();
        let mut cursor = None;
        loop {
            let page = store.sessions_page(cursor.as_ref(), 7).await.unwrap();
            let Some(last) = page.last() else { break };
            cursor = Some(PageCursor::after(last));
            for record in &page {
                assert!(seen.insert(record.id.clone()), "{} listed twice", record.id);
            }
            // Let a few updates, creations and deletions land between every two pages.
            let before = writes.load(Ordering::Relaxed);
            while writes.load(Ordering::Relaxed) < before + 3 {
                tokio::task::yield_now().await;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        for n in 0..initial {
            assert!(seen.contains(&format!("s{n:03}")), "s{n:03} missing");
        }
    }

    async fn record_limits(store: &dyn Storage) {
        let mut big = info("big", 1);
        big.metadata = Some(
            json!({"name": "n".repeat(limits::NAME_MAX_CHARS + 1)})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert!(matches!(
            store.create_session(big).await,
            Err(StorageError::TooLarge(TooLarge { ref field, .. })) if field == "metadata.name"
        ));
        assert!(
            store.session("big").await.unwrap().is_none(),
            "nothing stored"
        );

        store.create_session(info("m", 1)).await.unwrap();
        let chunk = "x".repeat(limits::METADATA_MAX_BYTES / 4);
        for i in 0..3 {
            let mut patch = Map::new();
            patch.insert(format!("k{i}"), json!(chunk));
            store.merge_metadata("m", patch, 10 + i).await.unwrap();
        }
        let before = store.session("m").await.unwrap().unwrap();
        let mut patch = Map::new();
        patch.insert("k3".into(), json!(chunk));
        patch.insert("name".into(), json!("half-applied?"));
        let refused = store.merge_metadata("m", patch, 99).await.unwrap_err();
        assert!(
            matches!(&refused, StorageError::TooLarge(t) if t.field == "metadata"),
            "{refused}"
        );
        assert_eq!(
            store.session("m").await.unwrap().unwrap(),
            before,
            "a refused merge changes nothing"
        );
        // Replacing a key with a smaller value is always possible.
        let mut patch = Map::new();
        patch.insert("k0".into(), json!("small"));
        patch.insert("k3".into(), json!(chunk));
        store.merge_metadata("m", patch, 100).await.unwrap();
    }

    /// Tests that only make sense for a backend that outlives the process.
    macro_rules! durable_tests {
        (durable, $open:expr) => {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reopen_after_close() {
                if skipped() {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                {
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    store.create_session(info("r", 5)).await.unwrap();
                    let mut patch = Map::new();
                    patch.insert("name".into(), json!("kept"));
                    store.merge_metadata("r", patch, 6).await.unwrap();
                    for seq in 1..=3 {
                        store
                            .append_event("r", seq, event(seq), 10 + seq)
                            .await
                            .unwrap();
                    }
                    store.reserve_seq("r", 50).await.unwrap();
                    store.append_live_text("r", 7, live(7)).await.unwrap();
                    store.set_host_id("r", 200_123).await.unwrap();
                    let mut owned = info("o", 6);
                    owned.tenant = "acme".into();
                    store.create_session(owned).await.unwrap();
                    store
                        .create_share_link(link("k", "o", "acme", 7))
                        .await
                        .unwrap();
                    store.append_audit(entry(1)).await.unwrap();
                    store.append_audit(entry(2)).await.unwrap();
                }
                let store: Arc<dyn Storage> = ($open)(dir.path());
                assert_eq!(store.session("o").await.unwrap().unwrap().tenant, "acme");
                assert_eq!(store.count_tenant_sessions("acme").await.unwrap(), 1);
                assert_eq!(
                    store.share_link_by_hash("hash-k").await.unwrap(),
                    Some(link("k", "o", "acme", 7))
                );
                let audited = store.audit_page(None, 10).await.unwrap();
                assert_eq!(audited.len(), 2);
                let next = store.append_audit(entry(3)).await.unwrap();
                assert!(next > audited[0].id, "ids keep increasing after a reopen");
                store.delete_session("o").await.unwrap();
                assert_eq!(
                    ids(&store.sessions_page(None, 10).await.unwrap()),
                    ["r"],
                    "the listing index is rebuilt"
                );
                assert_eq!(store.ids_by_recency().await.unwrap(), ["r"]);
                let record = store.session("r").await.unwrap().unwrap();
                assert_eq!(record.metadata.unwrap()["name"], "kept");
                assert!(record.updated_at >= 13);
                assert_eq!(
                    store.last_seq("r").await.unwrap(),
                    50,
                    "the reservation survives"
                );
                assert_eq!(seqs(&*store, "r", 0, 10).await, [1, 2, 3]);
                assert_eq!(
                    store.host_ids().await.unwrap(),
                    [("r".into(), 200_123)],
                    "the host id survives"
                );
                store.append_event("r", 51, event(51), 20).await.unwrap();
                assert_eq!(seqs(&*store, "r", 3, 10).await, [51]);
                assert_eq!(live_seqs(&*store, "r", 0).await, [7], "live text survives");
                store.append_live_text("r", 52, live(52)).await.unwrap();
                assert_eq!(live_seqs(&*store, "r", 0).await, [7, 52]);
            }
        };
    }

    /// The suite against one backend. `skip_if` names a function that says (printing why)
    /// that a backend needing an outside service was deliberately left out of this run.
    macro_rules! suite {
        ($name:ident, $open:expr $(, $durable:ident)? $(; skip_if $skip:path)?) => {
            mod $name {
                use super::*;

                fn skipped() -> bool {
                    false $(|| $skip())?
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn lifecycle() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::lifecycle(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn events() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::events(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn live_text() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::live_text(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn paging() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::paging(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn paging_under_writes() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    super::paging_under_writes(($open)(dir.path())).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn record_limits() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::record_limits(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn host_ids() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::host_ids(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tokens() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::tokens(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tenants() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::tenants(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn share_links() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::share_links(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn audit() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn Storage> = ($open)(dir.path());
                    super::audit(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn concurrent_writers() {
                    if skipped() {
                        return;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    super::concurrent_writers(($open)(dir.path())).await;
                }

                $(durable_tests!($durable, $open);)?
            }
        };
    }

    suite!(memory, |_: &Path| Arc::new(MemoryStorage::new())
        as Arc<dyn Storage>);
    suite!(
        file,
        |dir: &Path| Arc::new(FileStorage::open(&dir.join("store")).unwrap()) as Arc<dyn Storage>,
        durable
    );
    suite!(
        sqlite,
        |dir: &Path| Arc::new(SqliteStorage::open(&dir.join("sessions.db")).unwrap())
            as Arc<dyn Storage>,
        durable
    );
    // Each test in a schema of its own in the database `AGENTD_TEST_PG_URL` names.
    suite!(
        postgres,
        |dir: &Path| crate::storage::postgres::testing::open_in(dir) as Arc<dyn Storage>,
        durable;
        skip_if crate::storage::postgres::testing::skipped
    );
}
