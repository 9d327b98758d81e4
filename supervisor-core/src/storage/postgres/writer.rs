//! The one writer: every write goes through a single task that commits whatever is queued in
//! one transaction (group commit), so the cost of a commit is shared by everything waiting for
//! it, with no added delay: a batch is simply what arrived while the previous one committed.
//!
//! A batch is two round trips on one connection. The first sends `BEGIN`, then every write's
//! statement, pipelined, in queue order; each statement settles its own expected outcome (an
//! unknown session, a seq out of order, an id taken) as a value, never as an error, so one
//! write's refusal does not undo the others. The second is `COMMIT`. A write is answered only
//! after its transaction committed, so a client never sees an event a crash could take back.
//!
//! Failures: if the server refuses a statement (the whole transaction is then void), the
//! writes are retried one per transaction, so only the faulty one fails. If the connection
//! breaks before `COMMIT`, nothing was written and every write of the batch fails as
//! unavailable; the next batch connects again. If it breaks while `COMMIT` is in flight, the
//! outcome is asked of the server by transaction id once it can be reached again, so a commit
//! that did happen is reported as done (otherwise the caller would number its next event with a
//! seq already stored).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::connect::{ANSWER_TIMEOUT, describe, ends_connection, no_answer, storage_error};
use super::{info_from_row, int, metadata_text};
use crate::storage::{SessionInfo, StorageError, check_metadata};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// How long the writer keeps asking whether a commit whose answer was lost happened.
const RESOLVE_WITHIN: Duration = Duration::from_secs(30);

/// One change to the store.
pub(super) enum Write {
    Create(SessionInfo),
    Merge {
        id: String,
        patch: Map<String, Value>,
        now: u64,
    },
    Delete(String),
    Append {
        id: String,
        seq: u64,
        json: Arc<str>,
        now: u64,
    },
    Reserve {
        id: String,
        upto: u64,
    },
    LiveText {
        id: String,
        seq: u64,
        record: Arc<str>,
    },
    ClearLiveText {
        id: String,
        upto: u64,
    },
    HostId {
        id: String,
        host_id: u32,
    },
}

/// What a committed write gives back.
#[derive(Debug)]
pub(super) enum Done {
    Info(SessionInfo),
    Deleted(bool),
    Unit,
}

pub(super) type Reply = oneshot::Sender<Result<Done, StorageError>>;

/// A write waiting for the writer, with where its answer goes.
pub(super) struct Queued {
    pub(super) write: Write,
    pub(super) reply: Reply,
}

type Answer = Result<Done, StorageError>;

/// Every statement the writer runs, prepared once per connection.
struct Statements {
    xid: Statement,
    create: Statement,
    delete: Statement,
    append: Statement,
    reserve: Statement,
    live_text: Statement,
    clear_live_text: Statement,
    host_id: Statement,
    lock_session: Statement,
    set_metadata: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        let (xid, create, delete, append, reserve) = tokio::try_join!(
            client.prepare("SELECT pg_current_xact_id()::text::bigint"),
            client.prepare(
                "INSERT INTO sessions (id, created_at, updated_at, workspace, metadata, tenant)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING 1",
            ),
            client.prepare("DELETE FROM sessions WHERE id = $1 RETURNING 1"),
            // (stored, the session exists): out of order when it exists but was not stored.
            client.prepare(
                "WITH target AS (
                     UPDATE sessions SET updated_at = $3, last_event_seq = $2
                     WHERE id = $1 AND last_event_seq < $2 RETURNING id
                 ), stored AS (
                     INSERT INTO events (session_id, seq, stored_at, data)
                     SELECT id, $2, $3, $4 FROM target
                 )
                 SELECT EXISTS (SELECT 1 FROM target), EXISTS (SELECT 1 FROM sessions WHERE id = $1)",
            ),
            client.prepare(
                "UPDATE sessions SET reserved_seq = GREATEST(reserved_seq, $2) WHERE id = $1
                 RETURNING 1",
            ),
        )?;
        let (live_text, clear_live_text, host_id, lock_session, set_metadata) = tokio::try_join!(
            // Ordered against the records still kept, as the other backends do.
            client.prepare(
                "WITH target AS (
                     SELECT id FROM sessions WHERE id = $1
                     AND COALESCE((SELECT max(seq) FROM live_text WHERE session_id = $1), -1) < $2
                 ), stored AS (
                     INSERT INTO live_text (session_id, seq, record)
                     SELECT id, $2, $3 FROM target RETURNING 1
                 )
                 SELECT EXISTS (SELECT 1 FROM stored), EXISTS (SELECT 1 FROM sessions WHERE id = $1)",
            ),
            client.prepare("DELETE FROM live_text WHERE session_id = $1 AND seq <= $2"),
            client.prepare("UPDATE sessions SET host_uid = $2 WHERE id = $1 RETURNING 1"),
            client.prepare(
                "SELECT id, created_at, updated_at, workspace, metadata, tenant FROM sessions
                 WHERE id = $1 FOR UPDATE",
            ),
            client.prepare("UPDATE sessions SET metadata = $2, updated_at = $3 WHERE id = $1"),
        )?;
        Ok(Self {
            xid,
            create,
            delete,
            append,
            reserve,
            live_text,
            clear_live_text,
            host_id,
            lock_session,
            set_metadata,
        })
    }
}

/// The writer's connection.
struct Conn {
    client: Client,
    statements: Statements,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(config: &Config) -> Result<Conn, StorageError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| StorageError::Unavailable(describe(&e)))?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "postgres writer connection ended");
        }
    });
    let statements = Statements::prepare(&client)
        .await
        .map_err(|e| storage_error(&e))?;
    Ok(Conn {
        client,
        statements,
        task,
    })
}

/// Runs until every sender is gone, committing batches as they come.
pub(super) async fn run(config: Config, mut queue: mpsc::Receiver<Queued>) {
    let mut conn: Option<Conn> = None;
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let current = match conn.take().filter(|c| !c.client.is_closed()) {
            Some(open) => Ok(open),
            None => connect(&config).await,
        };
        let (answers, kept) = match current {
            Ok(open) => commit(&config, open, &batch).await,
            Err(e) => (fail_all(batch.len(), &e), None),
        };
        conn = kept;
        for (queued, answer) in batch.into_iter().zip(answers) {
            let _ = queued.reply.send(answer);
        }
    }
}

/// Commits `batch`, one write per transaction if the server refuses the batch as a whole.
/// Gives an answer per write, and the connection if it is still good.
async fn commit(config: &Config, conn: Conn, batch: &[Queued]) -> (Vec<Answer>, Option<Conn>) {
    let conn = match settle(config, conn, batch).await {
        Settled::Answered(answers, conn) => return (answers, conn),
        Settled::Refused(e, conn) if batch.len() == 1 => return (vec![Err(e)], Some(conn)),
        Settled::Refused(_, conn) => conn,
    };
    // One of the writes is at fault: each alone, so only it fails.
    let mut answers = Vec::with_capacity(batch.len());
    let mut conn = Some(conn);
    for one in batch.chunks(1) {
        let open = match conn.take().filter(|c| !c.client.is_closed()) {
            Some(open) => open,
            None => match connect(config).await {
                Ok(open) => open,
                Err(e) => {
                    answers.push(Err(e));
                    continue;
                }
            },
        };
        match settle(config, open, one).await {
            Settled::Answered(mut answered, kept) => {
                answers.append(&mut answered);
                conn = kept;
            }
            Settled::Refused(e, kept) => {
                answers.push(Err(e));
                conn = Some(kept);
            }
        }
    }
    (answers, conn)
}

enum Settled {
    /// Every write has its answer; the connection, if still good.
    Answered(Vec<Answer>, Option<Conn>),
    /// The server refused a statement, so nothing of the batch was written; the connection is
    /// good.
    Refused(StorageError, Conn),
}

/// One transaction for `batch`, its answers once its fate is known.
async fn settle(config: &Config, conn: Conn, batch: &[Queued]) -> Settled {
    let staged = match timeout(ANSWER_TIMEOUT, stage(&conn, batch)).await {
        Ok(Ok(staged)) => staged,
        Ok(Err(e)) if !ends_connection(&e) => {
            // The transaction is void; end it so the connection can be used again.
            let rolled_back = timeout(ANSWER_TIMEOUT, conn.client.batch_execute("ROLLBACK")).await;
            let error = storage_error(&e);
            return match rolled_back {
                Ok(Ok(())) => Settled::Refused(error, conn),
                _ => Settled::Answered(fail_all(batch.len(), &error), None),
            };
        }
        Ok(Err(e)) => {
            return Settled::Answered(fail_all(batch.len(), &storage_error(&e)), None);
        }
        Err(_) => {
            return Settled::Answered(fail_all(batch.len(), &no_answer()), None);
        }
    };
    match timeout(ANSWER_TIMEOUT, conn.client.batch_execute("COMMIT")).await {
        Ok(Ok(())) => Settled::Answered(staged.answers, Some(conn)),
        Ok(Err(e)) if !ends_connection(&e) => Settled::Refused(storage_error(&e), conn),
        _ => {
            // The commit may or may not have happened: ask the server, over a new connection.
            drop(conn);
            let (committed, conn) = resolve(config, staged.xid).await;
            match committed {
                Some(true) => Settled::Answered(staged.answers, conn),
                Some(false) => Settled::Answered(
                    fail_all(
                        batch.len(),
                        &StorageError::Unavailable(
                            "the connection to the database broke before the commit; nothing \
                             was written"
                                .into(),
                        ),
                    ),
                    conn,
                ),
                None => {
                    tracing::error!(
                        xid = staged.xid,
                        writes = batch.len(),
                        "lost the answer to a commit and could not learn whether it happened"
                    );
                    Settled::Answered(
                        fail_all(
                            batch.len(),
                            &StorageError::Unavailable(
                                "the connection to the database broke during a commit whose \
                                 outcome could not be learned"
                                    .into(),
                            ),
                        ),
                        conn,
                    )
                }
            }
        }
    }
}

/// Asks the server whether transaction `xid` committed, connecting again as often as needed
/// within [`RESOLVE_WITHIN`]. `None` when that could not be learned.
async fn resolve(config: &Config, xid: i64) -> (Option<bool>, Option<Conn>) {
    let deadline = Instant::now() + RESOLVE_WITHIN;
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline {
        let open = match conn.take().filter(|c| !c.client.is_closed()) {
            Some(open) => open,
            None => match connect(config).await {
                Ok(open) => open,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let status = timeout(
            ANSWER_TIMEOUT,
            open.client
                .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid.to_string()]),
        )
        .await;
        match status {
            Ok(Ok(row)) => match row.try_get::<_, Option<String>>(0) {
                Ok(Some(status)) if status == "committed" => return (Some(true), Some(open)),
                Ok(Some(status)) if status == "aborted" => return (Some(false), Some(open)),
                // Still in progress: the old session has not finished ending it.
                Ok(Some(_)) => {
                    conn = Some(open);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Too old for the server to remember, or unreadable.
                Ok(None) | Err(_) => return (None, Some(open)),
            },
            Ok(Err(e)) if !ends_connection(&e) => return (None, Some(open)),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    (None, conn)
}

fn fail_all(count: usize, error: &StorageError) -> Vec<Answer> {
    (0..count).map(|_| Err(same_error(error))).collect()
}

/// The same failure again, for each write it befell.
fn same_error(error: &StorageError) -> StorageError {
    match error {
        StorageError::Unavailable(m) => StorageError::Unavailable(m.clone()),
        other => StorageError::Postgres(other.to_string()),
    }
}

/// A batch's statements have all run; only its commit is left.
struct Staged {
    answers: Vec<Answer>,
    xid: i64,
}

/// How each write of a batch is answered once the statements ran.
enum Plan {
    /// Decided without the database (a record over its limits).
    Decided(Answer),
    /// By the rows of its statement, sent as pipeline request `n`.
    Sent(usize),
    /// A metadata merge whose update was sent: the merged record, once it ran.
    Merged(SessionInfo),
}

type Request<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

enum Slot<'a> {
    Waiting(Request<'a>),
    Done(Result<Vec<Row>, tokio_postgres::Error>),
}

/// Requests sent on one connection without waiting for each answer. tokio-postgres queues a
/// request on the connection the first time its future is polled; polling each once as it is
/// pushed keeps them in push order, which is the order the server runs them in.
#[derive(Default)]
struct Pipeline<'a> {
    slots: Vec<Slot<'a>>,
}

impl<'a> Pipeline<'a> {
    fn push(
        &mut self,
        request: impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a,
    ) -> usize {
        let mut request: Request<'a> = Box::pin(request);
        let mut cx = Context::from_waker(Waker::noop());
        self.slots.push(match request.as_mut().poll(&mut cx) {
            Poll::Ready(done) => Slot::Done(done),
            Poll::Pending => Slot::Waiting(request),
        });
        self.slots.len() - 1
    }

    /// Waits for every answer, all at once (the connection hands answers over in order, so
    /// each waiting request must be polled for the ones after it to arrive); the first error
    /// is the request that failed, the ones after it only failed with it.
    async fn finish(&mut self) -> Result<(), tokio_postgres::Error> {
        futures::future::join_all(self.slots.iter_mut().map(|slot| async move {
            if let Slot::Waiting(request) = slot {
                let done = request.as_mut().await;
                *slot = Slot::Done(done);
            }
        }))
        .await;
        for slot in &mut self.slots {
            if let Slot::Done(Err(_)) = slot
                && let Slot::Done(Err(e)) = std::mem::replace(slot, Slot::Done(Ok(Vec::new())))
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The rows of request `n` (after [`Pipeline::finish`]).
    fn rows(&mut self, n: usize) -> Vec<Row> {
        match self.slots.get_mut(n) {
            Some(Slot::Done(Ok(rows))) => std::mem::take(rows),
            _ => Vec::new(),
        }
    }
}

/// Runs the batch's statements in one transaction, up to but not including its commit.
async fn stage(conn: &Conn, batch: &[Queued]) -> Result<Staged, tokio_postgres::Error> {
    let client = &conn.client;
    let st = &conn.statements;
    let mut pipe = Pipeline::default();
    pipe.push(async move { client.batch_execute("BEGIN").await.map(|()| Vec::new()) });
    let xid = pipe.push(client.query(&st.xid, &[]));
    let mut plans = Vec::with_capacity(batch.len());
    for queued in batch {
        let plan = match &queued.write {
            Write::Create(info) => match create_params(info) {
                Ok((created, updated, metadata)) => Plan::Sent(pipe.push(async move {
                    client
                        .query(
                            &st.create,
                            &[
                                &info.id,
                                &created,
                                &updated,
                                &info.workspace,
                                &metadata,
                                &info.tenant,
                            ],
                        )
                        .await
                })),
                Err(e) => Plan::Decided(Err(e)),
            },
            Write::Merge { id, patch, now } => {
                // A read in the middle: everything before it must have run first.
                pipe.finish().await?;
                let locked = client.query(&st.lock_session, &[id]).await?;
                match merged(locked.first(), id, patch, *now) {
                    Ok((info, metadata, now)) => {
                        pipe.push(async move {
                            client.query(&st.set_metadata, &[id, &metadata, &now]).await
                        });
                        Plan::Merged(info)
                    }
                    Err(e) => Plan::Decided(Err(e)),
                }
            }
            Write::Delete(id) => {
                Plan::Sent(pipe.push(async move { client.query(&st.delete, &[id]).await }))
            }
            Write::Append { id, seq, json, now } => match (int(*seq), int(*now)) {
                (Ok(seq), Ok(now)) => Plan::Sent(pipe.push(async move {
                    let data: &str = json;
                    client.query(&st.append, &[id, &seq, &now, &data]).await
                })),
                (Err(e), _) | (_, Err(e)) => Plan::Decided(Err(e)),
            },
            Write::Reserve { id, upto } => match int(*upto) {
                Ok(upto) => Plan::Sent(
                    pipe.push(async move { client.query(&st.reserve, &[id, &upto]).await }),
                ),
                Err(e) => Plan::Decided(Err(e)),
            },
            Write::LiveText { id, seq, record } => match int(*seq) {
                Ok(seq) => Plan::Sent(pipe.push(async move {
                    let record: &str = record;
                    client.query(&st.live_text, &[id, &seq, &record]).await
                })),
                Err(e) => Plan::Decided(Err(e)),
            },
            Write::ClearLiveText { id, upto } => {
                let upto = i64::try_from(*upto).unwrap_or(i64::MAX);
                Plan::Sent(
                    pipe.push(async move { client.query(&st.clear_live_text, &[id, &upto]).await }),
                )
            }
            Write::HostId { id, host_id } => {
                let host_id = i64::from(*host_id);
                Plan::Sent(
                    pipe.push(async move { client.query(&st.host_id, &[id, &host_id]).await }),
                )
            }
        };
        plans.push(plan);
    }
    pipe.finish().await?;
    let xid = pipe
        .rows(xid)
        .first()
        .map(|row| row.try_get::<_, i64>(0))
        .transpose()?
        .unwrap_or_default();
    let answers = batch
        .iter()
        .zip(plans)
        .map(|(queued, plan)| match plan {
            Plan::Decided(answer) => answer,
            Plan::Merged(info) => Ok(Done::Info(info)),
            Plan::Sent(n) => outcome(&queued.write, &pipe.rows(n)),
        })
        .collect();
    Ok(Staged { answers, xid })
}

/// A new record's values as stored, once its metadata is within the limits.
fn create_params(info: &SessionInfo) -> Result<(i64, i64, Option<String>), StorageError> {
    if let Some(metadata) = &info.metadata {
        check_metadata(metadata)?;
    }
    Ok((
        int(info.created_at)?,
        int(info.updated_at)?,
        info.metadata.as_ref().map(metadata_text),
    ))
}

/// The record after the merge, its metadata as stored and its new `updatedAt`.
fn merged(
    locked: Option<&Row>,
    id: &str,
    patch: &Map<String, Value>,
    now: u64,
) -> Result<(SessionInfo, Option<String>, i64), StorageError> {
    let row = locked.ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
    let mut info = info_from_row(row)?;
    let mut metadata = info.metadata.take().unwrap_or_default();
    metadata.extend(patch.iter().map(|(k, v)| (k.clone(), v.clone())));
    check_metadata(&metadata)?;
    let text = metadata_text(&metadata);
    info.metadata = Some(metadata);
    info.updated_at = now;
    Ok((info, Some(text), int(now)?))
}

/// A write's answer from the rows its statement returned.
fn outcome(write: &Write, rows: &[Row]) -> Answer {
    let one = !rows.is_empty();
    let not_found = |id: &str| StorageError::NotFound(id.to_owned());
    match write {
        Write::Create(info) if one => Ok(Done::Info(info.clone())),
        Write::Create(info) => Err(StorageError::AlreadyExists(info.id.clone())),
        Write::Delete(_) => Ok(Done::Deleted(one)),
        Write::Reserve { .. } | Write::HostId { .. } if one => Ok(Done::Unit),
        Write::Reserve { id, .. } | Write::HostId { id, .. } => Err(not_found(id)),
        Write::ClearLiveText { .. } => Ok(Done::Unit),
        Write::Append { id, seq, .. } | Write::LiveText { id, seq, .. } => {
            let (stored, exists) = rows
                .first()
                .map(|row| Ok::<_, tokio_postgres::Error>((row.try_get(0)?, row.try_get(1)?)))
                .transpose()
                .map_err(|e| storage_error(&e))?
                .unwrap_or((false, false));
            match (stored, exists) {
                (true, _) => Ok(Done::Unit),
                (false, true) => Err(StorageError::OutOfOrder {
                    session: id.clone(),
                    seq: *seq,
                }),
                (false, false) => Err(not_found(id)),
            }
        }
        // Answered from its plan, never from rows.
        Write::Merge { id, .. } => Err(StorageError::Corrupt(format!(
            "the merge of {id} was answered out of turn"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::PostgresStorage;
    use super::super::connect::settings;
    use super::super::testing::{base_url, in_schema, new_schema, skipped};
    use super::*;

    /// After losing the answer to a commit, the writer learns from the server whether it
    /// happened: yes for a transaction that committed, no for one that rolled back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fate_of_a_commit_is_learned_from_the_server() {
        if skipped() {
            return;
        }
        let url = in_schema(&base_url(), &new_schema().await);
        drop(PostgresStorage::open(&url).await.unwrap());
        let config = settings(&url).unwrap();
        let conn = connect(&config).await.unwrap();
        for (end, committed) in [("COMMIT", true), ("ROLLBACK", false)] {
            conn.client.batch_execute("BEGIN").await.unwrap();
            let xid: i64 = conn
                .client
                .query_one(&conn.statements.xid, &[])
                .await
                .unwrap()
                .get(0);
            conn.client.batch_execute(end).await.unwrap();
            let (learned, conn) = resolve(&config, xid).await;
            assert_eq!(learned, Some(committed), "{end}");
            assert!(conn.is_some(), "the connection it asked on is kept");
        }
    }
}
