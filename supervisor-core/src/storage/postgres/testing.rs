//! The test database: `AGENTD_TEST_PG_URL` names a throwaway PostgreSQL database (scripts/test.sh
//! starts one); each test works in a schema of its own in it, so tests run side by side.

use std::path::Path;
use std::sync::Arc;

use tokio_postgres::NoTls;

use super::PostgresStorage;

pub(crate) const URL_VAR: &str = "AGENTD_TEST_PG_URL";
pub(crate) const SKIP_VAR: &str = "AGENTD_TEST_PG_SKIP";

/// Whether the postgres tests are left out of this run: only on request (`AGENTD_TEST_PG_SKIP=1`
/// and no database). Without a database and without that request they fail, so a run that
/// never reached PostgreSQL cannot pass for one that did.
pub(crate) fn skipped() -> bool {
    if std::env::var_os(URL_VAR).is_some() {
        return false;
    }
    if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
        eprintln!("skipped: {SKIP_VAR}=1 and no {URL_VAR}");
        return true;
    }
    panic!(
        "{URL_VAR} is not set: the postgres storage tests need a throwaway PostgreSQL database \
         (scripts/test.sh starts one and sets it); set {SKIP_VAR}=1 to leave them out on purpose"
    );
}

/// The test database's URL.
pub(crate) fn base_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| panic!("{URL_VAR} is not set"))
}

/// `url` working in `schema` (a URL-form `url`).
pub(crate) fn in_schema(url: &str, schema: &str) -> String {
    let joint = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joint}options=-c%20search_path%3D{schema}")
}

/// A new, empty schema in the test database.
pub(crate) async fn new_schema() -> String {
    let name = format!("agentd_test_{}", uuid::Uuid::new_v4().simple());
    let (client, connection) = tokio_postgres::connect(&base_url(), NoTls)
        .await
        .expect("connect to the test database");
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {name}"))
        .await
        .expect("create a test schema");
    drop(client);
    let _ = task.await;
    name
}

/// The URL of the schema `dir` belongs to: made on first use and named in a file in `dir`, so
/// opening the store again from the same directory finds the same data.
pub(crate) async fn schema_url(dir: &Path) -> String {
    let marker = dir.join("postgres-schema");
    let schema = match std::fs::read_to_string(&marker) {
        Ok(schema) => schema,
        Err(_) => {
            let schema = new_schema().await;
            std::fs::write(&marker, &schema).expect("write the schema marker");
            schema
        }
    };
    in_schema(&base_url(), &schema)
}

/// Opens the store of `dir`'s schema. For the conformance suite, whose openers are not async:
/// the tests run on a multi-threaded runtime, which lets this block.
pub(crate) fn open_in(dir: &Path) -> Arc<PostgresStorage> {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let url = schema_url(dir).await;
            Arc::new(PostgresStorage::open(&url).await.expect("open the store"))
        })
    })
}
