//! The `postgres` backend: sessions, their events and live text in a PostgreSQL database
//! (version 13 or later), the one store several nodes can share (ARCHITECTURE decision 14).
//!
//! Every write goes through one writer task ([`writer`]), which commits whatever is queued in
//! one pipelined transaction and answers each write only after the commit, so a client never
//! sees an event that is not committed. Reads use a small bounded pool of other connections.
//! How long a commit waits for the disk is PostgreSQL's `synchronous_commit`, set by whoever
//! runs the database (the URL may set it too, `options=-c synchronous_commit=off`).
//!
//! When the database goes away (a restart, a cut network), operations fail with
//! [`StorageError::Unavailable`] and work again once it is back: the writer connects again for
//! its next batch, and the pool replaces connections the server closed. Every statement is
//! bounded by a server-side timeout and by our own ([`connect`]).
//!
//! The schema is versioned and migrated at open ([`schema`]), in whatever schema the URL's
//! `search_path` names first (`public` by default).

mod connect;
mod schema;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use self::connect::{ANSWER_TIMEOUT, describe, no_answer, storage_error};
use self::writer::{Done, Queued, Write};
use super::audit::AUDIT_KEEP;
use super::{
    AuditEntry, PageCursor, SessionInfo, ShareLink, Storage, StorageDescriptor, StorageError,
    StoredEvent, TokenRecord,
};

/// Connections the reads share; with the writer's, a node holds at most one more than this.
const READERS: usize = 8;
/// Writes waiting for the writer at most; past it, writers wait for room.
const QUEUE: usize = 4096;

pub struct PostgresStorage {
    /// The URL as it may be shown (no password).
    shown: String,
    writes: mpsc::Sender<Queued>,
    readers: Pool,
}

impl PostgresStorage {
    /// Connects to the database `url` names and brings its schema up to this release's.
    ///
    /// # Errors
    /// The URL is unusable, the database cannot be reached, or its schema needs a newer
    /// release of this server.
    pub async fn open(url: &str) -> Result<Self, StorageError> {
        let config = connect::settings(url)?;
        let shown = connect::redacted(&config);
        let (mut client, connection) = config.connect(NoTls).await.map_err(|e| {
            StorageError::Unavailable(format!("cannot connect to {shown}: {}", describe(&e)))
        })?;
        let migrating = tokio::spawn(connection);
        let migrated = schema::migrate(&mut client).await;
        drop(client);
        let _ = migrating.await;
        migrated?;

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                // A pooled connection the server closed is replaced, never handed out.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let readers = Pool::builder(manager)
            .max_size(READERS)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(ANSWER_TIMEOUT))
            .create_timeout(Some(ANSWER_TIMEOUT))
            .recycle_timeout(Some(ANSWER_TIMEOUT))
            .build()
            .map_err(|e| StorageError::Postgres(format!("the connection pool: {e}")))?;
        let (writes, queue) = mpsc::channel(QUEUE);
        tokio::spawn(writer::run(config, queue));
        tracing::info!(url = %shown, "postgres storage opened");
        Ok(Self {
            shown,
            writes,
            readers,
        })
    }

    async fn write(&self, write: Write) -> Result<Done, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Queued { write, reply })
            .await
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    async fn write_unit(&self, write: Write) -> Result<(), StorageError> {
        self.write(write).await.map(drop)
    }

    async fn write_info(&self, write: Write) -> Result<SessionInfo, StorageError> {
        match self.write(write).await? {
            Done::Info(info) => Ok(info),
            other => Err(StorageError::Corrupt(format!(
                "the writer answered {other:?} for a record"
            ))),
        }
    }

    /// Runs one statement that changes rows on a pooled connection, outside the writer's
    /// pipeline: for the rare writes no session event waits behind (API tokens).
    async fn execute(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StorageError> {
        let run = async {
            let client = self.readers.get().await.map_err(pool_error)?;
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(|e| storage_error(&e))?;
            client
                .execute(&statement, params)
                .await
                .map_err(|e| storage_error(&e))
        };
        answered(run).await
    }

    /// Runs one read on a pooled connection, its statement prepared once per connection.
    async fn read(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StorageError> {
        let read = async {
            let client = self.readers.get().await.map_err(pool_error)?;
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(|e| storage_error(&e))?;
            client
                .query(&statement, params)
                .await
                .map_err(|e| storage_error(&e))
        };
        answered(read).await
    }
}

/// `work`'s answer, or `Unavailable` once the database has not answered in time.
async fn answered<T>(
    work: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    tokio::time::timeout(ANSWER_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(no_answer()))
}

/// A token row: its record, with the revocation the row holds.
fn token_from_row(row: &Row) -> Result<TokenRecord, StorageError> {
    let record: String = row.try_get(0).map_err(|e| storage_error(&e))?;
    let revoked: Option<i64> = row.try_get(1).map_err(|e| storage_error(&e))?;
    let mut token: TokenRecord =
        serde_json::from_str(&record).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    token.revoked_at = revoked.and_then(|t| u64::try_from(t).ok());
    Ok(token)
}

fn pool_error(error: PoolError) -> StorageError {
    match error {
        PoolError::Backend(e) => StorageError::Unavailable(describe(&e)),
        PoolError::Timeout(_) => StorageError::Unavailable(format!(
            "no connection to the database within {} s",
            ANSWER_TIMEOUT.as_secs()
        )),
        PoolError::Closed => StorageError::Closed,
        other => StorageError::Postgres(other.to_string()),
    }
}

/// A value as a `BIGINT`; seqs and times never come near its limit.
fn int(value: u64) -> Result<i64, StorageError> {
    i64::try_from(value)
        .map_err(|_| StorageError::Postgres(format!("{value} does not fit in a BIGINT")))
}

/// A bound for a query (`after`, `upto`, a limit): past the largest `BIGINT` means no bound.
fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn metadata_text(metadata: &Map<String, Value>) -> String {
    // A map of JSON values always serialises.
    serde_json::to_string(metadata).unwrap_or_default()
}

/// A record from a row of `id, created_at, updated_at, workspace, metadata, tenant`.
fn info_from_row(row: &Row) -> Result<SessionInfo, StorageError> {
    let read = || -> Result<SessionInfo, tokio_postgres::Error> {
        let metadata: Option<String> = row.try_get(4)?;
        Ok(SessionInfo {
            id: row.try_get(0)?,
            created_at: row.try_get::<_, i64>(1)? as u64,
            updated_at: row.try_get::<_, i64>(2)? as u64,
            workspace: row.try_get(3)?,
            metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
            tenant: row.try_get(5)?,
        })
    };
    read().map_err(|e| StorageError::Corrupt(format!("a session row: {}", describe(&e))))
}

fn stored_event(row: &Row) -> Result<StoredEvent, StorageError> {
    let seq: i64 = row.try_get(0).map_err(|e| storage_error(&e))?;
    let json: String = row.try_get(1).map_err(|e| storage_error(&e))?;
    Ok(StoredEvent {
        seq: seq as u64,
        json: json.into(),
    })
}

#[async_trait::async_trait]
impl Storage for PostgresStorage {
    fn descriptor(&self) -> StorageDescriptor {
        StorageDescriptor {
            kind: "postgres",
            path: None,
            url: Some(self.shown.clone()),
        }
    }

    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError> {
        self.write_info(Write::Create(info)).await
    }

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError> {
        const SQL: &str = "SELECT id, created_at, updated_at, workspace, metadata, tenant FROM sessions WHERE id = $1";
        let rows = self.read(SQL, &[&id]).await?;
        rows.first().map(info_from_row).transpose()
    }

    async fn sessions_page(
        &self,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        let limit = bound(limit as u64);
        let rows = match after {
            Some(cursor) => {
                const SQL: &str = "SELECT id, created_at, updated_at, workspace, metadata, tenant
                    FROM sessions WHERE (created_at, id) < ($1, $2)
                    ORDER BY created_at DESC, id DESC LIMIT $3";
                let created = bound(cursor.created_at);
                self.read(SQL, &[&created, &cursor.id, &limit]).await?
            }
            None => {
                const SQL: &str = "SELECT id, created_at, updated_at, workspace, metadata, tenant
                    FROM sessions ORDER BY created_at DESC, id DESC LIMIT $1";
                self.read(SQL, &[&limit]).await?
            }
        };
        rows.iter().map(info_from_row).collect()
    }

    async fn ids_by_recency(&self) -> Result<Vec<String>, StorageError> {
        const SQL: &str =
            "SELECT id FROM sessions ORDER BY updated_at DESC, created_at DESC, id DESC";
        self.read(SQL, &[])
            .await?
            .iter()
            .map(|row| row.try_get(0).map_err(|e| storage_error(&e)))
            .collect()
    }

    async fn sessions_by_ids(&self, ids: &[String]) -> Result<Vec<SessionInfo>, StorageError> {
        const SQL: &str = "SELECT id, created_at, updated_at, workspace, metadata, tenant
            FROM sessions WHERE id = ANY($1)";
        let found: std::collections::HashMap<String, SessionInfo> = self
            .read(SQL, &[&ids])
            .await?
            .iter()
            .map(|row| info_from_row(row).map(|info| (info.id.clone(), info)))
            .collect::<Result<_, _>>()?;
        Ok(ids.iter().filter_map(|id| found.get(id).cloned()).collect())
    }

    async fn count_sessions(&self) -> Result<usize, StorageError> {
        let rows = self.read("SELECT count(*) FROM sessions", &[]).await?;
        let count: i64 = rows
            .first()
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| storage_error(&e))?
            .unwrap_or_default();
        Ok(usize::try_from(count).unwrap_or_default())
    }

    async fn merge_metadata(
        &self,
        id: &str,
        patch: Map<String, Value>,
        now: u64,
    ) -> Result<SessionInfo, StorageError> {
        self.write_info(Write::Merge {
            id: id.to_owned(),
            patch,
            now,
        })
        .await
    }

    async fn delete_session(&self, id: &str) -> Result<bool, StorageError> {
        match self.write(Write::Delete(id.to_owned())).await? {
            Done::Deleted(deleted) => Ok(deleted),
            other => Err(StorageError::Corrupt(format!(
                "the writer answered {other:?} for a deletion"
            ))),
        }
    }

    async fn append_event(
        &self,
        id: &str,
        seq: u64,
        json: Arc<str>,
        now: u64,
    ) -> Result<(), StorageError> {
        self.write_unit(Write::Append {
            id: id.to_owned(),
            seq,
            json,
            now,
        })
        .await
    }

    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        const SQL: &str = "SELECT seq, data FROM events WHERE session_id = $1 AND seq > $2
            ORDER BY seq LIMIT $3";
        let (after, limit) = (bound(after), bound(limit as u64));
        self.read(SQL, &[&id, &after, &limit])
            .await?
            .iter()
            .map(stored_event)
            .collect()
    }

    async fn reserve_seq(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        self.write_unit(Write::Reserve {
            id: id.to_owned(),
            upto,
        })
        .await
    }

    async fn last_seq(&self, id: &str) -> Result<u64, StorageError> {
        const SQL: &str =
            "SELECT GREATEST(last_event_seq, reserved_seq) FROM sessions WHERE id = $1";
        let rows = self.read(SQL, &[&id]).await?;
        let last: i64 = rows
            .first()
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| storage_error(&e))?
            .unwrap_or_default();
        Ok(last as u64)
    }

    async fn append_live_text(
        &self,
        id: &str,
        seq: u64,
        record: Arc<str>,
    ) -> Result<(), StorageError> {
        self.write_unit(Write::LiveText {
            id: id.to_owned(),
            seq,
            record,
        })
        .await
    }

    async fn live_text_after(
        &self,
        id: &str,
        after: u64,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        const SQL: &str =
            "SELECT seq, record FROM live_text WHERE session_id = $1 AND seq > $2 ORDER BY seq";
        let after = bound(after);
        self.read(SQL, &[&id, &after])
            .await?
            .iter()
            .map(stored_event)
            .collect()
    }

    async fn clear_live_text(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        self.write_unit(Write::ClearLiveText {
            id: id.to_owned(),
            upto,
        })
        .await
    }

    async fn set_host_id(&self, id: &str, host_id: u32) -> Result<(), StorageError> {
        self.write_unit(Write::HostId {
            id: id.to_owned(),
            host_id,
        })
        .await
    }

    async fn host_ids(&self) -> Result<Vec<(String, u32)>, StorageError> {
        const SQL: &str = "SELECT id, host_uid FROM sessions WHERE host_uid IS NOT NULL";
        self.read(SQL, &[])
            .await?
            .iter()
            .map(|row| {
                let id: String = row.try_get(0).map_err(|e| storage_error(&e))?;
                let host_id: i64 = row.try_get(1).map_err(|e| storage_error(&e))?;
                u32::try_from(host_id)
                    .map(|h| (id, h))
                    .map_err(|_| StorageError::Corrupt(format!("host uid {host_id} out of range")))
            })
            .collect()
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        const SQL: &str = "INSERT INTO api_tokens (id, created_at, record, revoked_at) \
                           VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";
        let record =
            serde_json::to_string(&token).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let created = i64::try_from(token.created_at).unwrap_or(i64::MAX);
        let revoked = token
            .revoked_at
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        match self
            .execute(SQL, &[&token.id, &created, &record, &revoked])
            .await?
        {
            0 => Err(StorageError::AlreadyExists(token.id)),
            _ => Ok(()),
        }
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StorageError> {
        const SQL: &str = "SELECT record, revoked_at FROM api_tokens WHERE id = $1";
        let rows = self.read(SQL, &[&id]).await?;
        rows.first().map(token_from_row).transpose()
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        const SQL: &str = "SELECT record, revoked_at FROM api_tokens ORDER BY created_at, id";
        self.read(SQL, &[])
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_token(&self, id: &str, now: u64) -> Result<bool, StorageError> {
        const SQL: &str =
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1";
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        Ok(self.execute(SQL, &[&id, &now]).await? > 0)
    }
    async fn count_tenant_sessions(&self, tenant: &str) -> Result<usize, StorageError> {
        let rows = self
            .read(
                "SELECT count(*) FROM sessions WHERE tenant = $1",
                &[&tenant],
            )
            .await?;
        let count: i64 = rows
            .first()
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| storage_error(&e))?
            .unwrap_or_default();
        Ok(usize::try_from(count).unwrap_or_default())
    }

    // Share links and audit entries are written on a pooled connection, in a transaction of
    // their own, rather than through the writer: they are rare, and nothing orders them
    // against a session's events.

    async fn create_share_link(&self, link: ShareLink) -> Result<(), StorageError> {
        const SQL: &str = "INSERT INTO share_links
                (id, token_hash, session_id, tenant, created_by, created_at, expires_at)
            SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3)
            ON CONFLICT DO NOTHING RETURNING 1";
        let created = int(link.created_at)?;
        let expires = link.expires_at.map(int).transpose()?;
        let rows = self
            .read(
                SQL,
                &[
                    &link.id,
                    &link.token_hash,
                    &link.session_id,
                    &link.tenant,
                    &link.created_by,
                    &created,
                    &expires,
                ],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(());
        }
        let exists = self
            .read("SELECT 1 FROM sessions WHERE id = $1", &[&link.session_id])
            .await?;
        if exists.is_empty() {
            Err(StorageError::NotFound(link.session_id))
        } else {
            Err(StorageError::AlreadyExists(link.id))
        }
    }

    async fn share_link_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ShareLink>, StorageError> {
        const SQL: &str = "SELECT id, token_hash, session_id, tenant, created_by, created_at,
            expires_at FROM share_links WHERE token_hash = $1";
        let rows = self.read(SQL, &[&token_hash]).await?;
        rows.first().map(link_from_row).transpose()
    }

    async fn share_links(&self, tenant: &str) -> Result<Vec<ShareLink>, StorageError> {
        const SQL: &str = "SELECT id, token_hash, session_id, tenant, created_by, created_at,
            expires_at FROM share_links WHERE tenant = $1 ORDER BY created_at DESC, id DESC";
        self.read(SQL, &[&tenant])
            .await?
            .iter()
            .map(link_from_row)
            .collect()
    }

    async fn revoke_share_link(&self, tenant: &str, id: &str) -> Result<bool, StorageError> {
        const SQL: &str = "DELETE FROM share_links WHERE id = $1 AND tenant = $2 RETURNING 1";
        Ok(!self.read(SQL, &[&id, &tenant]).await?.is_empty())
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64, StorageError> {
        // Older entries past the newest AUDIT_KEEP go in the same statement.
        const SQL: &str = "WITH added AS (
                INSERT INTO audit (at, tenant, user_name, role, action, target, outcome, detail)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id
            ), pruned AS (
                DELETE FROM audit WHERE id <= (SELECT id FROM added) - $9
            )
            SELECT id FROM added";
        let at = int(entry.at)?;
        let keep = int(AUDIT_KEEP)?;
        let rows = self
            .read(
                SQL,
                &[
                    &at,
                    &entry.tenant,
                    &entry.user,
                    &entry.role,
                    &entry.action,
                    &entry.target,
                    &entry.outcome,
                    &entry.detail,
                    &keep,
                ],
            )
            .await?;
        let id: i64 = rows
            .first()
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| storage_error(&e))?
            .ok_or_else(|| StorageError::Corrupt("an audit insert returned no id".into()))?;
        Ok(id as u64)
    }

    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        const SQL: &str = "SELECT id, at, tenant, user_name, role, action, target, outcome, detail
            FROM audit WHERE id < $1 ORDER BY id DESC LIMIT $2";
        let before = before.map_or(i64::MAX, bound);
        let limit = bound(limit as u64);
        self.read(SQL, &[&before, &limit])
            .await?
            .iter()
            .map(|row| {
                let read = || -> Result<AuditEntry, tokio_postgres::Error> {
                    Ok(AuditEntry {
                        id: row.try_get::<_, i64>(0)? as u64,
                        at: row.try_get::<_, i64>(1)? as u64,
                        tenant: row.try_get(2)?,
                        user: row.try_get(3)?,
                        role: row.try_get(4)?,
                        action: row.try_get(5)?,
                        target: row.try_get(6)?,
                        outcome: row.try_get(7)?,
                        detail: row.try_get(8)?,
                    })
                };
                read().map_err(|e| storage_error(&e))
            })
            .collect()
    }
}

fn link_from_row(row: &Row) -> Result<ShareLink, StorageError> {
    let read = || -> Result<ShareLink, tokio_postgres::Error> {
        Ok(ShareLink {
            id: row.try_get(0)?,
            token_hash: row.try_get(1)?,
            session_id: row.try_get(2)?,
            tenant: row.try_get(3)?,
            created_by: row.try_get(4)?,
            created_at: row.try_get::<_, i64>(5)? as u64,
            expires_at: row.try_get::<_, Option<i64>>(6)?.map(|at| at as u64),
        })
    };
    read().map_err(|e| StorageError::Corrupt(format!("a share link row: {}", describe(&e))))
}

#[cfg(test)]
mod tests {
    use super::testing::{base_url, in_schema, new_schema, skipped};
    use super::*;

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            created_at: 1,
            updated_at: 1,
            workspace: format!("/w/{id}"),
            metadata: None,
            tenant: "default".into(),
        }
    }

    /// A plain connection to `schema`, for looking under the store.
    async fn sql(schema: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&in_schema(&base_url(), schema), NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    async fn ledger(schema: &str) -> Vec<(i32, String)> {
        sql(schema)
            .await
            .query(
                "SELECT version, kind FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// Four nodes starting at once on an empty schema: each opens, and the schema is
    /// migrated exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_at_once_migrate_once() {
        if skipped() {
            return;
        }
        let schema = new_schema().await;
        let url = in_schema(&base_url(), &schema);
        let opened = futures::future::join_all((0..4).map(|_| PostgresStorage::open(&url))).await;
        for store in &opened {
            assert!(store.is_ok(), "{:?}", store.as_ref().err());
        }
        let expected: Vec<(i32, String)> = schema::MIGRATIONS
            .iter()
            .map(|m| (m.version, "expand".to_owned()))
            .collect();
        assert_eq!(ledger(&schema).await, expected);
    }

    /// A release that only added to the schema leaves it usable by this one; a release that
    /// removed something this one needs makes it refuse to start, saying why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_schema_is_used_unless_it_contracted() {
        if skipped() {
            return;
        }
        let schema = new_schema().await;
        let url = in_schema(&base_url(), &schema);
        drop(PostgresStorage::open(&url).await.unwrap());
        let latest = schema::latest();
        let client = sql(&schema).await;
        // What a newer release's expand migration could do: a new column, a new table.
        client
            .batch_execute(&format!(
                "ALTER TABLE sessions ADD COLUMN owner TEXT;
                 CREATE TABLE tenants (id TEXT PRIMARY KEY);
                 INSERT INTO schema_migrations (version, name, kind, requires)
                 VALUES ({}, 'owners', 'expand', 1)",
                latest + 1
            ))
            .await
            .unwrap();
        let store = PostgresStorage::open(&url).await.unwrap();
        store.create_session(info("kept")).await.unwrap();
        store
            .append_event("kept", 1, r#"{"a":1}"#.into(), 2)
            .await
            .unwrap();
        assert_eq!(store.session("kept").await.unwrap().unwrap().updated_at, 2);
        drop(store);

        client
            .execute(
                "INSERT INTO schema_migrations (version, name, kind, requires)
                 VALUES ($1, 'drop the old owner column', 'contract', $2)",
                &[&(latest + 2), &(latest + 1)],
            )
            .await
            .unwrap();
        let refused = PostgresStorage::open(&url).await.err().unwrap().to_string();
        assert!(
            refused.contains(&format!("migration {}", latest + 2))
                && refused.contains("upgrade this node"),
            "{refused}"
        );
        assert_eq!(
            ledger(&schema).await.len(),
            schema::MIGRATIONS.len() + 2,
            "a refused start changes nothing"
        );
    }

    /// Every migration can run again over what it already did: a ledger lost after the fact
    /// is rebuilt and the data stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_are_idempotent() {
        if skipped() {
            return;
        }
        let schema = new_schema().await;
        let url = in_schema(&base_url(), &schema);
        let store = PostgresStorage::open(&url).await.unwrap();
        store.create_session(info("s")).await.unwrap();
        drop(store);
        sql(&schema)
            .await
            .batch_execute("DELETE FROM schema_migrations")
            .await
            .unwrap();
        let store = PostgresStorage::open(&url).await.unwrap();
        assert!(store.session("s").await.unwrap().is_some());
        assert_eq!(ledger(&schema).await.len(), schema::MIGRATIONS.len());
    }

    /// A database from before tenancy (schema version 1) is brought up to date, its sessions
    /// belonging to the default tenant.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_stored_before_tenancy_are_the_default_tenants() {
        if skipped() {
            return;
        }
        let schema = new_schema().await;
        let url = in_schema(&base_url(), &schema);
        let store = PostgresStorage::open(&url).await.unwrap();
        let mut other = info("s");
        other.tenant = "acme".into();
        store.create_session(other).await.unwrap();
        drop(store);
        sql(&schema)
            .await
            .batch_execute(
                "DROP TABLE audit; DROP TABLE share_links; ALTER TABLE sessions DROP COLUMN tenant;
                 DELETE FROM schema_migrations WHERE version > 1",
            )
            .await
            .unwrap();
        let store = PostgresStorage::open(&url).await.unwrap();
        assert_eq!(store.session("s").await.unwrap().unwrap().tenant, "default");
        assert_eq!(store.count_tenant_sessions("default").await.unwrap(), 1);
        assert_eq!(ledger(&schema).await.len(), schema::MIGRATIONS.len());
    }

    #[test]
    fn a_contract_names_the_oldest_release_it_works_with() {
        let change = schema::Change::Contract { requires: 4 };
        assert_ne!(change, schema::Change::Expand);
    }

    /// A write the server refuses (text PostgreSQL cannot hold) fails alone: the writes
    /// committed with it in the same batch are kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_write_fails_alone() {
        if skipped() {
            return;
        }
        let url = in_schema(&base_url(), &new_schema().await);
        let store = PostgresStorage::open(&url).await.unwrap();
        for s in 0..8 {
            store.create_session(info(&format!("s{s}"))).await.unwrap();
        }
        let mut bad = info("bad");
        bad.workspace = "nul\0byte".into();
        let ids: Vec<String> = (0..8).map(|s| format!("s{s}")).collect();
        let appends = futures::future::join_all(ids.iter().flat_map(|id| {
            let store = &store;
            (1..=5).map(move |seq| store.append_event(id, seq, r#"{"a":1}"#.into(), seq))
        }));
        let (refused, appended) = tokio::join!(store.create_session(bad), appends);
        assert!(
            matches!(&refused, Err(StorageError::Postgres(m)) if m.contains("22021")),
            "{refused:?}"
        );
        for result in appended {
            result.unwrap();
        }
        for s in 0..8 {
            let stored = store.events_after(&format!("s{s}"), 0, 10).await.unwrap();
            assert_eq!(
                stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
                [1, 2, 3, 4, 5]
            );
        }
        assert!(store.session("bad").await.unwrap().is_none());
    }

    /// The server ending every connection of the store (as a restart does) costs at most the
    /// operations in flight: the next ones connect again, and nothing acknowledged is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_connects_again_after_its_connections_end() {
        if skipped() {
            return;
        }
        let schema = new_schema().await;
        let name = format!("agentd_{}", uuid::Uuid::new_v4().simple());
        let url = format!(
            "{}&application_name={name}",
            in_schema(&base_url(), &schema)
        );
        let store = PostgresStorage::open(&url).await.unwrap();
        store.create_session(info("s")).await.unwrap();
        for seq in 1..=3 {
            store
                .append_event("s", seq, r#"{"a":1}"#.into(), seq)
                .await
                .unwrap();
        }
        assert_eq!(store.events_after("s", 0, 10).await.unwrap().len(), 3);
        let ended: i64 = sql(&schema)
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            ended >= 2,
            "the writer's and a reader's connection: {ended}"
        );
        let mut seq = 4;
        let mut failures = Vec::new();
        while seq <= 6 {
            match store.append_event("s", seq, r#"{"a":1}"#.into(), seq).await {
                Ok(()) => seq += 1,
                Err(e) => {
                    assert!(matches!(e, StorageError::Unavailable(_)), "{e}");
                    failures.push(e);
                    assert!(failures.len() < 50, "never came back: {failures:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        let stored: Vec<u64> = loop {
            match store.events_after("s", 0, 10).await {
                Ok(events) => break events.iter().map(|e| e.seq).collect(),
                Err(e) => {
                    assert!(matches!(e, StorageError::Unavailable(_)), "{e}");
                    failures.push(e);
                    assert!(failures.len() < 50, "never came back: {failures:?}");
                }
            }
        };
        assert_eq!(stored, [1, 2, 3, 4, 5, 6]);
    }

    /// No database at the address: the start fails as unavailable, naming the address but
    /// not the password.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_database_is_named_without_its_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://agentd:hunter2@127.0.0.1:{port}/agentd");
        let error = PostgresStorage::open(&url).await.err().unwrap();
        let message = error.to_string();
        assert!(matches!(error, StorageError::Unavailable(_)), "{message}");
        assert!(
            message.contains(&format!("postgres://agentd:***@127.0.0.1:{port}/agentd")),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
}
