//! `supervisor import --from <path>`: brings sessions and their events over from the upstream
//! Tarko server's storage (api.md §13.4 JSON document, §13.5 SQLite database) into this
//! server's configured store, so users keep their history when they switch.
//!
//! Each imported session gets its own (empty) workspace directory, as every session here does;
//! the upstream workspace path is kept in `metadata.importedFrom`. Sessions that already exist
//! are left alone, so an import can be run again safely. Events are numbered in their upstream
//! order; streaming deltas (which upstream never stores) and unparsable rows are skipped and
//! counted.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value, json};
use shared::events::is_streaming_type;
use shared::ids::{SessionId, now_ms};

use crate::config::{Config, StorageKind};
use crate::storage::{SessionInfo, SharedStorage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "cannot import into memory storage: nothing would be kept; set server.storage.type to file, sqlite or postgres"
    )]
    MemoryTarget,
    #[error("{path}: {reason}")]
    Source { path: PathBuf, reason: SourceError },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("could not create the workspace directory {path}: {source}")]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Tenant(#[from] crate::principal::InvalidTenant),
}

/// Why an upstream store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("no tarko.db or tarko.json in this directory")]
    NoStore,
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("not a Tarko JSON store: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("no \"sessions\" object")]
    NoSessions,
}

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub sessions: usize,
    pub events: usize,
    pub existing: usize,
    pub invalid_sessions: usize,
    pub skipped_events: usize,
    /// Sessions whose metadata is over this server's record limits, left out whole.
    pub too_large: usize,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "imported {} sessions with {} events; {} already present, {} with unusable ids, {} events skipped, {} sessions over the record size limits",
            self.sessions,
            self.events,
            self.existing,
            self.invalid_sessions,
            self.skipped_events,
            self.too_large
        )
    }
}

/// One upstream session with its events, oldest first.
struct Upstream {
    info: Value,
    events: Vec<String>,
}

/// Imports everything found at `from` into the store `config` names, as sessions of `tenant`.
///
/// # Errors
/// Memory as the target, a tenant name that cannot be one, an unreadable source, or a storage
/// failure.
pub fn run(config: &Config, from: &Path, tenant: &str) -> Result<ImportReport, ImportError> {
    if config.server.storage.kind == StorageKind::Memory {
        return Err(ImportError::MemoryTarget);
    }
    crate::principal::check_tenant_name(tenant)?;
    let sessions = read_source(from)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ImportError::Runtime)?;
    runtime.block_on(async {
        let storage = crate::storage::open(&config.server.storage, &config.server.data_dir).await?;
        std::fs::create_dir_all(&config.workspace).map_err(|source| ImportError::Workspace {
            path: config.workspace.clone(),
            source,
        })?;
        let root =
            std::fs::canonicalize(&config.workspace).map_err(|source| ImportError::Workspace {
                path: config.workspace.clone(),
                source,
            })?;
        // Sessions are imported side by side so the SQLite writer can commit many appends per
        // transaction; one at a time, a large store takes a minute instead of seconds.
        let mut report = ImportReport::default();
        let mut imports = futures::stream::iter(sessions)
            .map(|session| import_one(&storage, &root, from, tenant, session))
            .buffer_unordered(IMPORT_CONCURRENCY);
        while let Some(one) = imports.next().await {
            report.add(one?);
        }
        Ok(report)
    })
}

/// Sessions imported at once.
const IMPORT_CONCURRENCY: usize = 64;

impl ImportReport {
    fn add(&mut self, other: ImportReport) {
        self.sessions += other.sessions;
        self.events += other.events;
        self.existing += other.existing;
        self.invalid_sessions += other.invalid_sessions;
        self.skipped_events += other.skipped_events;
        self.too_large += other.too_large;
    }
}

async fn import_one(
    storage: &SharedStorage,
    root: &Path,
    from: &Path,
    tenant: &str,
    upstream: Upstream,
) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    let Ok(id) = SessionId::parse(upstream.info["id"].as_str().unwrap_or_default()) else {
        report.invalid_sessions += 1;
        return Ok(report);
    };
    if storage.session(&id).await?.is_some() {
        report.existing += 1;
        return Ok(report);
    }
    let number = |key: &str| upstream.info[key].as_u64().unwrap_or_else(now_ms);
    let mut metadata = match &upstream.info["metadata"] {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let original = upstream.info["workspace"]
        .as_str()
        .or_else(|| upstream.info["workingDirectory"].as_str());
    // The store's file name, not its path: session records are shown to clients, and where
    // the operator keeps files on this host is none of theirs.
    let store = from.file_name().map(|n| n.to_string_lossy().into_owned());
    metadata.insert(
        "importedFrom".into(),
        json!({"store": store, "workspace": original}),
    );
    if let Err(too_large) = crate::storage::check_metadata(&metadata) {
        tracing::warn!(session_id = %id, %too_large, "session not imported: its record is over the limits");
        report.too_large += 1;
        return Ok(report);
    }
    let workspace = root.join(&id);
    match std::fs::create_dir(&workspace) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ImportError::Workspace {
                path: workspace,
                source,
            });
        }
    }
    // What was there already must be a real directory: a symlink in its place would become
    // the session's workspace, and the server would then work on wherever it points.
    if let Err(e) = crate::workspace::SessionDir::open(&workspace) {
        return Err(ImportError::Workspace {
            path: workspace,
            source: std::io::Error::other(format!("not a directory of its own: {e}")),
        });
    }
    let info = SessionInfo {
        id: id.to_string(),
        created_at: number("createdAt"),
        updated_at: number("updatedAt"),
        workspace: workspace.to_string_lossy().into_owned(),
        metadata: Some(metadata),
        tenant: tenant.to_owned(),
    };
    let updated_at = info.updated_at;
    storage.create_session(info).await?;
    let mut seq = 0;
    for event in upstream.events {
        let kind = serde_json::from_str::<Value>(&event)
            .ok()
            .filter(Value::is_object)
            .and_then(|v| v["type"].as_str().map(str::to_owned));
        match kind {
            Some(kind) if !is_streaming_type(&kind) => {
                seq += 1;
                storage
                    .append_event(&id, seq, event.into(), updated_at)
                    .await?;
                report.events += 1;
            }
            _ => report.skipped_events += 1,
        }
    }
    report.sessions += 1;
    Ok(report)
}

/// Reads an upstream store: a SQLite database, a JSON document, or a directory holding
/// `tarko.db` or `tarko.json` (upstream's default names).
fn read_source(from: &Path) -> Result<Vec<Upstream>, ImportError> {
    let fail = |reason: SourceError| ImportError::Source {
        path: from.to_owned(),
        reason,
    };
    if from.is_dir() {
        for name in ["tarko.db", "tarko.json"] {
            let candidate = from.join(name);
            if candidate.is_file() {
                return read_source(&candidate);
            }
        }
        return Err(fail(SourceError::NoStore));
    }
    let bytes = std::fs::read(from).map_err(|e| fail(e.into()))?;
    if bytes.starts_with(b"SQLite format 3\0") {
        read_sqlite(from).map_err(|e| fail(e.into()))
    } else {
        read_json(&bytes).map_err(fail)
    }
}

fn read_json(bytes: &[u8]) -> Result<Vec<Upstream>, SourceError> {
    let document: Value = serde_json::from_slice(bytes)?;
    let sessions = document["sessions"]
        .as_object()
        .ok_or(SourceError::NoSessions)?;
    let mut out: Vec<Upstream> = sessions
        .iter()
        .map(|(id, info)| {
            let mut info = info.clone();
            if info["id"].is_null() {
                info["id"] = json!(id);
            }
            let events = document["events"][id]
                .as_array()
                .map(|events| events.iter().map(Value::to_string).collect())
                .unwrap_or_default();
            Upstream { info, events }
        })
        .collect();
    out.sort_by_key(|s| s.info["createdAt"].as_u64().unwrap_or(0));
    Ok(out)
}

fn read_sqlite(path: &Path) -> Result<Vec<Upstream>, rusqlite::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('sessions')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let has = |c: &str| columns.iter().any(|name| name == c);
    let workspace = if has("workspace") {
        "workspace"
    } else if has("workingDirectory") {
        "workingDirectory"
    } else {
        "''"
    };
    let metadata = if has("metadata") { "metadata" } else { "NULL" };
    let query = format!(
        "SELECT id, createdAt, updatedAt, {workspace}, {metadata} FROM sessions ORDER BY createdAt"
    );
    let mut sessions: Vec<Upstream> = conn
        .prepare(&query)?
        .query_map([], |row| {
            let metadata: Option<String> = row.get(4)?;
            let metadata = metadata
                .and_then(|m| serde_json::from_str::<Value>(&m).ok())
                .unwrap_or(Value::Null);
            Ok(json!({
                "id": row.get::<_, String>(0)?,
                "createdAt": row.get::<_, i64>(1)?,
                "updatedAt": row.get::<_, i64>(2)?,
                "workspace": row.get::<_, Option<String>>(3)?,
                "metadata": metadata,
            }))
        })?
        .map(|info| {
            info.map(|info| Upstream {
                info,
                events: Vec::new(),
            })
        })
        .collect::<Result<_, _>>()?;
    let mut statement =
        conn.prepare("SELECT eventData FROM events WHERE sessionId = ?1 ORDER BY timestamp, id")?;
    for session in &mut sessions {
        let id = session.info["id"].as_str().unwrap_or_default().to_owned();
        session.events = statement
            .query_map([id], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
    }
    Ok(sessions)
}
