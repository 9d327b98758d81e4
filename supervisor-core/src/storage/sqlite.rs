//! The `sqlite` backend: one database file in WAL mode.
//!
//! All writes go through one writer thread, which takes every write waiting in its queue and
//! commits them in one transaction; each write has its own savepoint, so one failing write
//! (an unknown session, say) does not undo the others. A write is acknowledged only after its
//! transaction committed. Reads use a second connection, which WAL lets run beside the writer.
//!
//! `synchronous = NORMAL`: a committed transaction survives a crash of the process; the last
//! ones may be lost on power failure (WAL is still consistent then).
//!
//! The database file is created 0600 before SQLite opens it; SQLite gives its `-wal` and
//! `-shm` files the database file's mode, so they are 0600 too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::audit::AUDIT_KEEP;
use super::{
    AuditEntry, PageCursor, SessionInfo, ShareLink, Storage, StorageDescriptor, StorageError,
    StoredEvent, TokenRecord, check_metadata,
};
use crate::data_dir;

/// Version of our schema, kept in `PRAGMA user_version`: the base schema is version 1, and each
/// entry of [`MIGRATIONS`] takes the database one version up.
const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    createdAt INTEGER NOT NULL,
    updatedAt INTEGER NOT NULL,
        workspace TEXT NOT NULL,
    metadata TEXT,
    seqReserved INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_sessions_updatedAt ON sessions(updatedAt DESC, createdAt DESC);
CREATE INDEX IF NOT EXISTS idx_sessions_createdAt ON sessions(createdAt DESC, id DESC);
CREATE TABLE IF NOT EXISTS events (
    sessionId TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    eventData TEXT NOT NULL,
    PRIMARY KEY (sessionId, seq)
) WITHOUT ROWID;
";

/// Additive steps from version 1 upwards, applied in order in one transaction; never edited once
/// released (a database records how far it got).
const MIGRATIONS: &[&str] = &[
    // 2: the host uid of each session's worker (root mode), so a restart keeps it.
    "ALTER TABLE sessions ADD COLUMN hostUid INTEGER;",
    // 3: creation order, for paged listings (`GET /sessions?limit=&cursor=`).
    "CREATE INDEX IF NOT EXISTS idx_sessions_createdAt ON sessions(createdAt DESC, id DESC);",
    // 4: the live run's streamed text (`Storage::append_live_text`), so a crash keeps what
    // followers were shown.
    "CREATE TABLE IF NOT EXISTS liveText (
        sessionId TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (sessionId, seq)
    ) WITHOUT ROWID;",
    // 5 (identity: API tokens): one row per token, its record as JSON (a hash, never the
    // secret); `revokedAt` apart so a revocation is one UPDATE.
    "CREATE TABLE IF NOT EXISTS apiTokens (
        id TEXT PRIMARY KEY,
        createdAt INTEGER NOT NULL,
        record TEXT NOT NULL,
        revokedAt INTEGER
    );",
    // 6 (tenancy): the tenant owning each session; sessions stored before it belong to the
    // default tenant.
    "ALTER TABLE sessions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX IF NOT EXISTS idx_sessions_tenant ON sessions(tenant);",
    // 7 (tenancy): share links (`/s/<token>`), by the hash of their token; they go with their
    // session.
    "CREATE TABLE IF NOT EXISTS shareLinks (
        id TEXT PRIMARY KEY,
        tokenHash TEXT NOT NULL UNIQUE,
        sessionId TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        tenant TEXT NOT NULL,
        createdBy TEXT NOT NULL,
        createdAt INTEGER NOT NULL,
        expiresAt INTEGER
    );
    CREATE INDEX IF NOT EXISTS idx_shareLinks_tenant ON shareLinks(tenant, createdAt DESC);
    CREATE INDEX IF NOT EXISTS idx_shareLinks_session ON shareLinks(sessionId);",
    // 8 (tenancy): the audit log. AUTOINCREMENT: ids are never reused once old entries are
    // dropped, so they stay a paging cursor.
    "CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        user TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT
    );",
];

type Reply<T> = oneshot::Sender<Result<T, StorageError>>;
/// A write run as it is, answering a number.
type RunWrite = Box<dyn FnOnce(&Connection) -> Result<u64, StorageError> + Send>;

enum Write {
    Create(SessionInfo, Reply<SessionInfo>),
    Merge {
        id: String,
        patch: Map<String, Value>,
        now: u64,
        reply: Reply<SessionInfo>,
    },
    Delete(String, Reply<bool>),
    Append {
        id: String,
        seq: u64,
        json: Arc<str>,
        now: u64,
        reply: Reply<()>,
    },
    Reserve {
        id: String,
        upto: u64,
        reply: Reply<()>,
    },
    LiveText {
        id: String,
        seq: u64,
        record: Arc<str>,
        reply: Reply<()>,
    },
    ClearLiveText {
        id: String,
        upto: u64,
        reply: Reply<()>,
    },
    HostId {
        id: String,
        host_id: u32,
        reply: Reply<()>,
    },
    CreateToken(TokenRecord, Reply<()>),
    RevokeToken {
        id: String,
        now: u64,
        reply: Reply<bool>,
    },
    /// A rare write with no variant of its own (share links, audit entries), answering a
    /// number (a count or an id).
    Run(RunWrite, Reply<u64>),
}

pub struct SqliteStorage {
    path: PathBuf,
    writes: mpsc::Sender<Write>,
    reader: Arc<Mutex<Connection>>,
}

fn open_connection(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open(path).map_err(StorageError::sqlite)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
    )
    .map_err(StorageError::sqlite)?;
    Ok(conn)
}

impl SqliteStorage {
    /// Opens (creating if needed) the database at `path`, migrating it to our schema.
    ///
    /// # Errors
    /// The file cannot be opened, is not a database, is an upstream Tarko database (import it
    /// instead), or comes from a newer version of this server.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            data_dir::create_dir_all(parent).map_err(|e| StorageError::io(parent, e))?;
        }
        create_private(path)?;
        let writer = open_connection(path)?;
        migrate(&writer)?;
        let reader = open_connection(path)?;
        let (writes, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(writer, queue))
            .map_err(|e| StorageError::io(path, e))?;
        tracing::info!(path = %path.display(), "sqlite storage opened");
        Ok(Self {
            path: path.to_owned(),
            writes,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(make(reply))
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            query(&reader.lock().unwrap_or_else(PoisonError::into_inner))
        })
        .await
        .map_err(|e| StorageError::Corrupt(format!("read task failed: {e}")))?
    }
}

/// Creates the database file 0600 if it is missing (SQLite would create it with the umask's
/// mode, and its `-wal` and `-shm` files after it), and tightens the files of a database an
/// older version left readable to others.
fn create_private(path: &Path) -> Result<(), StorageError> {
    data_dir::file_options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(path, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let file = PathBuf::from(file);
        data_dir::tighten_file(&file).map_err(|e| StorageError::io(&file, e))?;
    }
    Ok(())
}

fn migrate(conn: &Connection) -> Result<(), StorageError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(StorageError::sqlite)?;
    if version > SCHEMA_VERSION {
        return Err(StorageError::Corrupt(format!(
            "database schema version {version} is newer than this server's ({SCHEMA_VERSION})"
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let mut steps = String::from("BEGIN;");
    if version == 0 {
        let upstream: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('events') WHERE name = 'id'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(StorageError::sqlite)?;
        if upstream {
            return Err(StorageError::Corrupt(
                "this is an upstream Tarko database; bring its sessions over with `supervisor import --from <file>`".into(),
            ));
        }
        steps.push_str(SCHEMA);
    }
    let done = usize::try_from(version.max(1) - 1).unwrap_or_default();
    for step in &MIGRATIONS[done..] {
        steps.push_str(step);
    }
    // All or nothing: a crash half-way leaves the old version, which migrates again.
    steps.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"));
    conn.execute_batch(&steps).map_err(StorageError::sqlite)
}

fn write_loop(mut conn: Connection, queue: mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        let committed = (|| -> Result<(), rusqlite::Error> {
            let mut tx = conn.transaction()?;
            for write in batch {
                let mut savepoint = tx.savepoint()?;
                let outcome = apply(&savepoint, write);
                if outcome.failed() {
                    savepoint.rollback()?;
                } else {
                    savepoint.commit()?;
                }
                outcomes.push(outcome);
            }
            tx.commit()
        })()
        .map_err(|e| e.to_string());
        for outcome in outcomes {
            outcome.answer(
                committed
                    .as_ref()
                    .map_err(|e| StorageError::Sqlite(e.clone())),
            );
        }
    }
}

/// The result of one write, answered only once its transaction committed.
enum Outcome {
    Info(Reply<SessionInfo>, Result<SessionInfo, StorageError>),
    Bool(Reply<bool>, Result<bool, StorageError>),
    Unit(Reply<()>, Result<(), StorageError>),
    Number(Reply<u64>, Result<u64, StorageError>),
}

impl Outcome {
    fn failed(&self) -> bool {
        match self {
            Self::Info(_, r) => r.is_err(),
            Self::Bool(_, r) => r.is_err(),
            Self::Unit(_, r) => r.is_err(),
            Self::Number(_, r) => r.is_err(),
        }
    }

    fn answer(self, committed: Result<&(), StorageError>) {
        fn send<T>(
            reply: Reply<T>,
            result: Result<T, StorageError>,
            committed: Result<&(), StorageError>,
        ) {
            let _ = reply.send(match committed {
                Ok(()) => result,
                Err(e) => Err(e),
            });
        }
        match self {
            Self::Info(reply, r) => send(reply, r, committed),
            Self::Bool(reply, r) => send(reply, r, committed),
            Self::Unit(reply, r) => send(reply, r, committed),
            Self::Number(reply, r) => send(reply, r, committed),
        }
    }
}

fn apply(conn: &Connection, write: Write) -> Outcome {
    match write {
        Write::Create(info, reply) => Outcome::Info(reply, create(conn, info)),
        Write::Run(run, reply) => Outcome::Number(reply, run(conn)),
        Write::Merge {
            id,
            patch,
            now,
            reply,
        } => Outcome::Info(reply, merge(conn, &id, patch, now)),
        Write::Delete(id, reply) => Outcome::Bool(
            reply,
            conn.execute("DELETE FROM sessions WHERE id = ?1", [&id])
                .map(|n| n > 0)
                .map_err(StorageError::sqlite),
        ),
        Write::Append {
            id,
            seq,
            json,
            now,
            reply,
        } => Outcome::Unit(reply, append(conn, &id, seq, &json, now)),
        Write::HostId { id, host_id, reply } => Outcome::Unit(
            reply,
            conn.execute(
                "UPDATE sessions SET hostUid = ?2 WHERE id = ?1",
                params![id, i64::from(host_id)],
            )
            .map_err(StorageError::sqlite)
            .and_then(|n| {
                if n == 0 {
                    Err(StorageError::NotFound(id))
                } else {
                    Ok(())
                }
            }),
        ),
        Write::Reserve { id, upto, reply } => Outcome::Unit(
            reply,
            conn.execute(
                "UPDATE sessions SET seqReserved = MAX(seqReserved, ?2) WHERE id = ?1",
                params![id, upto as i64],
            )
            .map_err(StorageError::sqlite)
            .and_then(|n| {
                if n == 0 {
                    Err(StorageError::NotFound(id))
                } else {
                    Ok(())
                }
            }),
        ),
        Write::LiveText {
            id,
            seq,
            record,
            reply,
        } => Outcome::Unit(reply, append_live_text(conn, &id, seq, &record)),
        Write::CreateToken(token, reply) => Outcome::Unit(reply, create_token(conn, &token)),
        Write::RevokeToken { id, now, reply } => Outcome::Bool(
            reply,
            conn.execute(
                "UPDATE apiTokens SET revokedAt = COALESCE(revokedAt, ?2) WHERE id = ?1",
                params![id, now as i64],
            )
            .map(|n| n > 0)
            .map_err(StorageError::sqlite),
        ),
        Write::ClearLiveText { id, upto, reply } => Outcome::Unit(
            reply,
            conn.prepare_cached("DELETE FROM liveText WHERE sessionId = ?1 AND seq <= ?2")
                .and_then(|mut statement| statement.execute(params![id, upto as i64]))
                .map(drop)
                .map_err(StorageError::sqlite),
        ),
    }
}

fn create_token(conn: &Connection, token: &TokenRecord) -> Result<(), StorageError> {
    let record = serde_json::to_string(token).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    match conn.execute(
        "INSERT INTO apiTokens (id, createdAt, record, revokedAt) VALUES (?1, ?2, ?3, ?4)",
        params![
            token.id,
            token.created_at as i64,
            record,
            token.revoked_at.map(|t| t as i64)
        ],
    ) {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StorageError::AlreadyExists(token.id.clone()))
        }
        Err(e) => Err(StorageError::sqlite(e)),
    }
}

/// A token row: its record, with the revocation the row holds.
fn token_from_row(row: &rusqlite::Row<'_>) -> Result<TokenRecord, StorageError> {
    let record: String = row.get(0).map_err(StorageError::sqlite)?;
    let revoked: Option<i64> = row.get(1).map_err(StorageError::sqlite)?;
    let mut token: TokenRecord =
        serde_json::from_str(&record).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    token.revoked_at = revoked.map(|t| t as u64);
    Ok(token)
}

fn create(conn: &Connection, info: SessionInfo) -> Result<SessionInfo, StorageError> {
    if let Some(metadata) = &info.metadata {
        check_metadata(metadata)?;
    }
    let metadata = info
        .metadata
        .as_ref()
        .map(|m| Value::Object(m.clone()).to_string());
    let inserted = conn
        .execute(
            "INSERT OR IGNORE INTO sessions (id, createdAt, updatedAt, workspace, metadata, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![info.id, info.created_at as i64, info.updated_at as i64, info.workspace, metadata, info.tenant],
        )
        .map_err(StorageError::sqlite)?;
    if inserted == 0 {
        return Err(StorageError::AlreadyExists(info.id));
    }
    Ok(info)
}

fn merge(
    conn: &Connection,
    id: &str,
    patch: Map<String, Value>,
    now: u64,
) -> Result<SessionInfo, StorageError> {
    let mut info = load(conn, id)?.ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
    let mut metadata = info.metadata.take().unwrap_or_default();
    metadata.extend(patch);
    check_metadata(&metadata)?;
    info.metadata = Some(metadata);
    info.updated_at = now;
    let metadata = info
        .metadata
        .as_ref()
        .map(|m| Value::Object(m.clone()).to_string());
    conn.execute(
        "UPDATE sessions SET metadata = ?2, updatedAt = ?3 WHERE id = ?1",
        params![id, metadata, now as i64],
    )
    .map_err(StorageError::sqlite)?;
    Ok(info)
}

fn append(conn: &Connection, id: &str, seq: u64, json: &str, now: u64) -> Result<(), StorageError> {
    let last: Option<i64> = conn
        .query_row(
            "SELECT MAX(seq) FROM events WHERE sessionId = ?1",
            [id],
            |r| r.get(0),
        )
        .map_err(StorageError::sqlite)?;
    if last.is_some_and(|last| last as u64 >= seq) {
        return Err(StorageError::OutOfOrder {
            session: id.to_owned(),
            seq,
        });
    }
    let updated = conn
        .execute(
            "UPDATE sessions SET updatedAt = ?2 WHERE id = ?1",
            params![id, now as i64],
        )
        .map_err(StorageError::sqlite)?;
    if updated == 0 {
        return Err(StorageError::NotFound(id.to_owned()));
    }
    conn.execute(
        "INSERT INTO events (sessionId, seq, timestamp, eventData) VALUES (?1, ?2, ?3, ?4)",
        params![id, seq as i64, now as i64, json],
    )
    .map_err(StorageError::sqlite)?;
    Ok(())
}

fn append_live_text(
    conn: &Connection,
    id: &str,
    seq: u64,
    record: &str,
) -> Result<(), StorageError> {
    let last: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM liveText WHERE sessionId = ?1")
        .and_then(|mut statement| statement.query_row([id], |r| r.get(0)))
        .map_err(StorageError::sqlite)?;
    if last.is_some_and(|last| last as u64 >= seq) {
        return Err(StorageError::OutOfOrder {
            session: id.to_owned(),
            seq,
        });
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO liveText (sessionId, seq, record) SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?1)",
        )
        .and_then(|mut statement| statement.execute(params![id, seq as i64, record]))
        .map_err(StorageError::sqlite)?;
    if inserted == 0 {
        return Err(StorageError::NotFound(id.to_owned()));
    }
    Ok(())
}

fn row_to_info(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionInfo> {
    let metadata: Option<String> = row.get(4)?;
    Ok(SessionInfo {
        id: row.get(0)?,
        created_at: row.get::<_, i64>(1)? as u64,
        updated_at: row.get::<_, i64>(2)? as u64,
        workspace: row.get(3)?,
        metadata: metadata.and_then(|m| serde_json::from_str::<Map<String, Value>>(&m).ok()),
        tenant: row.get(5)?,
    })
}

fn load(conn: &Connection, id: &str) -> Result<Option<SessionInfo>, StorageError> {
    conn.prepare_cached(
        "SELECT id, createdAt, updatedAt, workspace, metadata, tenant FROM sessions WHERE id = ?1",
    )
    .and_then(|mut statement| statement.query_row([id], row_to_info).optional())
    .map_err(StorageError::sqlite)
}

#[async_trait::async_trait]
impl Storage for SqliteStorage {
    fn descriptor(&self) -> StorageDescriptor {
        StorageDescriptor {
            kind: "sqlite",
            path: Some(self.path.clone()),
            url: None,
        }
    }

    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError> {
        self.write(|reply| Write::Create(info, reply)).await
    }

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError> {
        let id = id.to_owned();
        self.read(move |conn| load(conn, &id)).await
    }

    async fn sessions_page(
        &self,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let rows = match &after {
                Some(cursor) => conn
                    .prepare_cached(
                        "SELECT id, createdAt, updatedAt, workspace, metadata, tenant FROM sessions
                         WHERE (createdAt, id) < (?1, ?2)
                         ORDER BY createdAt DESC, id DESC LIMIT ?3",
                    )
                    .and_then(|mut statement| {
                        statement
                            .query_map(
                                params![cursor.created_at as i64, cursor.id, limit],
                                row_to_info,
                            )?
                            .collect::<Result<Vec<_>, _>>()
                    }),
                None => conn
                    .prepare_cached(
                        "SELECT id, createdAt, updatedAt, workspace, metadata, tenant FROM sessions
                         ORDER BY createdAt DESC, id DESC LIMIT ?1",
                    )
                    .and_then(|mut statement| {
                        statement
                            .query_map([limit], row_to_info)?
                            .collect::<Result<Vec<_>, _>>()
                    }),
            };
            rows.map_err(StorageError::sqlite)
        })
        .await
    }

    async fn ids_by_recency(&self) -> Result<Vec<String>, StorageError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id FROM sessions ORDER BY updatedAt DESC, createdAt DESC, id DESC",
                )
                .map_err(StorageError::sqlite)?;
            let rows = statement
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(StorageError::sqlite)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn sessions_by_ids(&self, ids: &[String]) -> Result<Vec<SessionInfo>, StorageError> {
        let ids = ids.to_vec();
        self.read(move |conn| {
            let mut records = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(info) = load(conn, id)? {
                    records.push(info);
                }
            }
            Ok(records)
        })
        .await
    }

    async fn count_sessions(&self) -> Result<usize, StorageError> {
        self.read(|conn| {
            conn.query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get::<_, i64>(0))
                .map(|n| n as usize)
                .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn merge_metadata(
        &self,
        id: &str,
        patch: Map<String, Value>,
        now: u64,
    ) -> Result<SessionInfo, StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::Merge {
            id,
            patch,
            now,
            reply,
        })
        .await
    }

    async fn delete_session(&self, id: &str) -> Result<bool, StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::Delete(id, reply)).await
    }

    async fn append_event(
        &self,
        id: &str,
        seq: u64,
        json: Arc<str>,
        now: u64,
    ) -> Result<(), StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::Append {
            id,
            seq,
            json,
            now,
            reply,
        })
        .await
    }

    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let id = id.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached("SELECT seq, eventData FROM events WHERE sessionId = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
                .map_err(StorageError::sqlite)?;
            let rows = statement
                .query_map(params![id, after as i64, limit], |row| {
                    Ok(StoredEvent { seq: row.get::<_, i64>(0)? as u64, json: row.get::<_, String>(1)?.into() })
                })
                .map_err(StorageError::sqlite)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(StorageError::sqlite)
        })
        .await
    }

    async fn reserve_seq(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::Reserve { id, upto, reply }).await
    }

    async fn last_seq(&self, id: &str) -> Result<u64, StorageError> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events WHERE sessionId = ?1), 0),
                            COALESCE((SELECT seqReserved FROM sessions WHERE id = ?1), 0))",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .map(|seq| seq as u64)
            .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn append_live_text(
        &self,
        id: &str,
        seq: u64,
        record: Arc<str>,
    ) -> Result<(), StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::LiveText {
            id,
            seq,
            record,
            reply,
        })
        .await
    }

    async fn live_text_after(
        &self,
        id: &str,
        after: u64,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT seq, record FROM liveText WHERE sessionId = ?1 AND seq > ?2 ORDER BY seq",
                )
                .map_err(StorageError::sqlite)?;
            let rows = statement
                .query_map(params![id, after as i64], |row| {
                    Ok(StoredEvent {
                        seq: row.get::<_, i64>(0)? as u64,
                        json: row.get::<_, String>(1)?.into(),
                    })
                })
                .map_err(StorageError::sqlite)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn clear_live_text(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::ClearLiveText { id, upto, reply })
            .await
    }

    async fn set_host_id(&self, id: &str, host_id: u32) -> Result<(), StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::HostId { id, host_id, reply })
            .await
    }

    async fn host_ids(&self) -> Result<Vec<(String, u32)>, StorageError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT id, hostUid FROM sessions WHERE hostUid IS NOT NULL")
                .map_err(StorageError::sqlite)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .map_err(StorageError::sqlite)?;
            rows.map(|row| {
                let (id, host_id) = row.map_err(StorageError::sqlite)?;
                u32::try_from(host_id)
                    .map(|h| (id, h))
                    .map_err(|_| StorageError::Corrupt(format!("host uid {host_id} out of range")))
            })
            .collect()
        })
        .await
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        self.write(|reply| Write::CreateToken(token, reply)).await
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StorageError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached("SELECT record, revokedAt FROM apiTokens WHERE id = ?1")
                .map_err(StorageError::sqlite)?;
            let mut rows = statement.query([&id]).map_err(StorageError::sqlite)?;
            match rows.next().map_err(StorageError::sqlite)? {
                Some(row) => token_from_row(row).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn count_tenant_sessions(&self, tenant: &str) -> Result<usize, StorageError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM sessions WHERE tenant = ?1",
                [tenant],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT record, revokedAt FROM apiTokens ORDER BY createdAt, id")
                .map_err(StorageError::sqlite)?;
            let mut rows = statement.query([]).map_err(StorageError::sqlite)?;
            let mut tokens = Vec::new();
            while let Some(row) = rows.next().map_err(StorageError::sqlite)? {
                tokens.push(token_from_row(row)?);
            }
            Ok(tokens)
        })
        .await
    }

    async fn revoke_token(&self, id: &str, now: u64) -> Result<bool, StorageError> {
        let id = id.to_owned();
        self.write(|reply| Write::RevokeToken { id, now, reply })
            .await
    }
    async fn create_share_link(&self, link: ShareLink) -> Result<(), StorageError> {
        let run = move |conn: &Connection| {
            let exists: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sessions WHERE id = ?1)",
                    [&link.session_id],
                    |r| r.get(0),
                )
                .map_err(StorageError::sqlite)?;
            if !exists {
                return Err(StorageError::NotFound(link.session_id));
            }
            let inserted = conn
                .execute(
                    "INSERT OR IGNORE INTO shareLinks (id, tokenHash, sessionId, tenant, createdBy, createdAt, expiresAt)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        link.id,
                        link.token_hash,
                        link.session_id,
                        link.tenant,
                        link.created_by,
                        link.created_at as i64,
                        link.expires_at.map(|at| at as i64)
                    ],
                )
                .map_err(StorageError::sqlite)?;
            if inserted == 0 {
                return Err(StorageError::AlreadyExists(link.id));
            }
            Ok(0)
        };
        self.write(|reply| Write::Run(Box::new(run), reply))
            .await
            .map(drop)
    }

    async fn share_link_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ShareLink>, StorageError> {
        let hash = token_hash.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("{SHARE_LINK_COLUMNS} WHERE tokenHash = ?1"))
                .and_then(|mut statement| statement.query_row([hash], row_to_link).optional())
                .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn share_links(&self, tenant: &str) -> Result<Vec<ShareLink>, StorageError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "{SHARE_LINK_COLUMNS} WHERE tenant = ?1 ORDER BY createdAt DESC, id DESC"
            ))
            .and_then(|mut statement| {
                statement
                    .query_map([tenant], row_to_link)?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(StorageError::sqlite)
        })
        .await
    }

    async fn revoke_share_link(&self, tenant: &str, id: &str) -> Result<bool, StorageError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        let run = move |conn: &Connection| {
            conn.execute(
                "DELETE FROM shareLinks WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
            )
            .map(|n| n as u64)
            .map_err(StorageError::sqlite)
        };
        Ok(self.write(|reply| Write::Run(Box::new(run), reply)).await? > 0)
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64, StorageError> {
        let run = move |conn: &Connection| {
            conn.execute(
                "INSERT INTO audit (at, tenant, user, role, action, target, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    entry.at as i64,
                    entry.tenant,
                    entry.user,
                    entry.role,
                    entry.action,
                    entry.target,
                    entry.outcome,
                    entry.detail
                ],
            )
            .map_err(StorageError::sqlite)?;
            let id = conn.last_insert_rowid();
            conn.execute("DELETE FROM audit WHERE id <= ?1", [id - AUDIT_KEEP as i64])
                .map_err(StorageError::sqlite)?;
            Ok(id as u64)
        };
        self.write(|reply| Write::Run(Box::new(run), reply)).await
    }

    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, at, tenant, user, role, action, target, outcome, detail FROM audit
                 WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_map(params![before, limit], |row| {
                        Ok(AuditEntry {
                            id: row.get::<_, i64>(0)? as u64,
                            at: row.get::<_, i64>(1)? as u64,
                            tenant: row.get(2)?,
                            user: row.get(3)?,
                            role: row.get(4)?,
                            action: row.get(5)?,
                            target: row.get(6)?,
                            outcome: row.get(7)?,
                            detail: row.get(8)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(StorageError::sqlite)
        })
        .await
    }
}

const SHARE_LINK_COLUMNS: &str =
    "SELECT id, tokenHash, sessionId, tenant, createdBy, createdAt, expiresAt FROM shareLinks";

fn row_to_link(row: &rusqlite::Row<'_>) -> rusqlite::Result<ShareLink> {
    Ok(ShareLink {
        id: row.get(0)?,
        token_hash: row.get(1)?,
        session_id: row.get(2)?,
        tenant: row.get(3)?,
        created_by: row.get(4)?,
        created_at: row.get::<_, i64>(5)? as u64,
        expires_at: row.get::<_, Option<i64>>(6)?.map(|at| at as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database written by the first schema (no host uid column, no live-text table) opens,
    /// keeps its sessions, and records host ids and live text from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_one_database_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO sessions (id, createdAt, updatedAt, workspace) VALUES ('old', 1, 2, '/w/old')",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = SqliteStorage::open(&path).unwrap();
        assert_eq!(
            store.session("old").await.unwrap().unwrap().workspace,
            "/w/old"
        );
        assert!(store.host_ids().await.unwrap().is_empty());
        store.set_host_id("old", 200_001).await.unwrap();
        assert_eq!(store.host_ids().await.unwrap(), [("old".into(), 200_001)]);
        drop(store);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(SCHEMA_VERSION, 8);
        assert_eq!(
            store_tenant(&path, "old"),
            "default",
            "a session stored before tenancy belongs to the default tenant"
        );
        let indexed: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'idx_sessions_createdAt'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1, "the creation-order index is added by migration");
        drop(conn);
        let store = SqliteStorage::open(&path).unwrap();
        store
            .append_live_text("old", 3, r#"[{"kind":"text","text":"a"}]"#.into())
            .await
            .unwrap();
        assert_eq!(
            store.live_text_after("old", 0).await.unwrap().len(),
            1,
            "the live-text table is added by migration"
        );
        assert!(
            store.tokens().await.unwrap().is_empty(),
            "the API token table is added by migration"
        );
    }

    fn store_tenant(path: &Path, id: &str) -> String {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT tenant FROM sessions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
    }

    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The database, its WAL and its shared-memory file are 0600 even under umask 000, and a
    /// database an older version left 0644 is tightened when it is opened.
    #[tokio::test]
    async fn files_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/sessions.db");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let store = SqliteStorage::open(&path).unwrap();
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(info).await.unwrap();
        store
            .append_event("s", 1, r#"{"a":1}"#.into(), 2)
            .await
            .unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        drop(store);

        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let _store = SqliteStorage::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600, "an old 0644 database is tightened");
    }
}
