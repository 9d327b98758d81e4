//! The database schema and how it changes from one release to the next.
//!
//! Several nodes may share one database and are upgraded one at a time, so old and new
//! releases run side by side on the same schema for a while. Every change is therefore
//! written *expand/contract*:
//!
//! - an **expand** migration only adds (a table, a column that may be null or has a default, an
//!   index), so a node that does not know it keeps working;
//! - a **contract** migration removes or changes something older releases use. It ships only in
//!   a release after the one that stopped using that thing, and it names the oldest release that
//!   can run beside it, as the newest schema version that release knows (`requires`); every node
//!   must run at least that release before a node carrying the contract migration starts.
//!
//! At start each node applies the migrations it knows and the database lacks, in order, in one
//! transaction holding an advisory lock, so two nodes starting at once take turns and the second
//! finds the work done. Each migration is idempotent (`IF NOT EXISTS`) and is never edited once
//! released: the `schema_migrations` table records what was applied. A node refuses to start
//! only when the database holds a migration that requires a newer release than itself (a
//! contract it predates); migrations it does not know that only expand are fine.

use tokio_postgres::Client;

use super::connect::{describe, storage_error};
use crate::storage::StorageError;

/// What a migration does to the nodes already running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// Only adds: every release keeps working.
    Expand,
    /// Removes or changes what releases older than `requires` use.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "no release has removed anything yet; the first contract migration will"
        )
    )]
    Contract { requires: i32 },
}

impl Change {
    fn kind(self) -> &'static str {
        match self {
            Self::Expand => "expand",
            Self::Contract { .. } => "contract",
        }
    }

    /// The schema version a node must know to run against a database that has this change.
    fn requires(self) -> i32 {
        match self {
            Self::Expand => 1,
            Self::Contract { requires } => requires,
        }
    }
}

pub(super) struct Migration {
    pub(super) version: i32,
    pub(super) name: &'static str,
    pub(super) change: Change,
    pub(super) sql: &'static str,
}

/// Every migration, oldest first; versions count up from 1 without gaps.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "sessions, events and live text",
        change: Change::Expand,
        // Ids sort by their bytes (`COLLATE "C"`), as every other backend orders them, whatever
        // the database's locale. Times are milliseconds since the epoch. `last_event_seq` is the
        // highest stored event's seq, kept on the row so an append checks its order without
        // reading the log; `reserved_seq` is the highest one handed out (`Storage::reserve_seq`).
        // No index on `updated_at`: an append changes it, and an indexed column would make every
        // append rewrite the row's index entries; a full listing sorts instead. The fill factor
        // leaves room on each page for those in-place updates.
        sql: r#"
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT COLLATE "C" PRIMARY KEY,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    workspace TEXT NOT NULL,
    metadata TEXT,
    last_event_seq BIGINT NOT NULL DEFAULT 0,
    reserved_seq BIGINT NOT NULL DEFAULT 0,
    host_uid BIGINT
) WITH (fillfactor = 80);
CREATE INDEX IF NOT EXISTS sessions_by_creation ON sessions (created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS live_text (
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"#,
    },
    Migration {
        version: 2,
        name: "identity: api tokens",
        change: Change::Expand,
        // One row per API token: its record as JSON (a hash, never the secret), with the
        // revocation apart so revoking is one UPDATE that every node sees on its next read.
        sql: r#"
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT COLLATE "C" PRIMARY KEY,
    created_at BIGINT NOT NULL,
    record TEXT NOT NULL,
    revoked_at BIGINT
);
"#,
    },
    Migration {
        version: 3,
        name: "tenancy: the tenant of each session",
        change: Change::Expand,
        // Existing sessions, and rows written by a node that predates tenancy, belong to the
        // default tenant.
        sql: r#"
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS tenant TEXT NOT NULL DEFAULT 'default';
CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant);
"#,
    },
    Migration {
        version: 4,
        name: "tenancy: share links",
        change: Change::Expand,
        // By the SHA-256 of their token; they go with their session.
        sql: r#"
CREATE TABLE IF NOT EXISTS share_links (
    id TEXT COLLATE "C" PRIMARY KEY,
    token_hash TEXT COLLATE "C" NOT NULL UNIQUE,
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX IF NOT EXISTS share_links_by_tenant ON share_links (tenant, created_at DESC);
CREATE INDEX IF NOT EXISTS share_links_by_session ON share_links (session_id);
"#,
    },
    Migration {
        version: 5,
        name: "tenancy: the audit log",
        change: Change::Expand,
        sql: r#"
CREATE TABLE IF NOT EXISTS audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    user_name TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
"#,
    },
];

/// The newest schema version this release knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

const LEDGER: &str = "
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('expand', 'contract')),
    requires INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// Brings the schema the connection works in (the first of its `search_path`) up to this
/// release's, or refuses a schema this release cannot run against.
///
/// # Errors
/// No schema to work in, a contract migration this release predates, or a failed statement
/// (nothing of this call is then applied).
pub(super) async fn migrate(client: &mut Client) -> Result<(), StorageError> {
    let tx = client.transaction().await.map_err(|e| storage_error(&e))?;
    let schema: Option<String> = tx
        .query_one("SELECT current_schema()", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| storage_error(&e))?;
    let Some(schema) = schema else {
        return Err(StorageError::Postgres(
            "the connection has no schema to work in: the search_path names none that exists"
                .into(),
        ));
    };
    // Held to the end of the transaction; per schema, so nodes on different schemas of one
    // database do not wait for each other.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('agentd schema migrations'), hashtext($1))",
        &[&schema],
    )
    .await
    .map_err(|e| storage_error(&e))?;
    tx.batch_execute(LEDGER)
        .await
        .map_err(|e| storage_error(&e))?;
    let applied: Vec<(i32, String, i32)> = tx
        .query("SELECT version, name, requires FROM schema_migrations", &[])
        .await
        .map_err(|e| storage_error(&e))?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| storage_error(&e))?;
    let latest = latest();
    if let Some((version, name, requires)) = applied
        .iter()
        .filter(|(_, _, requires)| *requires > latest)
        .min_by_key(|(version, ..)| *version)
    {
        return Err(StorageError::Postgres(format!(
            "schema {schema:?} has migration {version} ({name}), which needs a release that \
             knows schema version {requires}; this one knows up to {latest}: upgrade this node"
        )));
    }
    for migration in MIGRATIONS {
        if applied
            .iter()
            .any(|(version, ..)| *version == migration.version)
        {
            continue;
        }
        tx.batch_execute(migration.sql).await.map_err(|e| {
            StorageError::Postgres(format!(
                "schema migration {} ({}) failed: {}",
                migration.version,
                migration.name,
                describe(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, kind, requires) VALUES ($1, $2, $3, $4)",
            &[
                &migration.version,
                &migration.name,
                &migration.change.kind(),
                &migration.change.requires(),
            ],
        )
        .await
        .map_err(|e| storage_error(&e))?;
        tracing::info!(
            schema = %schema,
            version = migration.version,
            name = migration.name,
            kind = migration.change.kind(),
            "schema migration applied"
        );
    }
    tx.commit().await.map_err(|e| storage_error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i as i32 + 1, "{}", migration.name);
            if let Change::Contract { requires } = migration.change {
                assert!(
                    requires < migration.version,
                    "a contract needs releases that already stopped using what it removes"
                );
            }
        }
        assert_eq!(latest(), MIGRATIONS.len() as i32);
    }
}
