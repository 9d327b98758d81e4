//! Exclusive mode (`--exclusive`): no new sessions while one session runs a query.

use std::time::Duration;

use anyhow::{Result, ensure};
use e2e::{LONG, Server, ServerOpts, concat_deltas, types, wait_until};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn check_busy(r: &e2e::Resp, what: &str, running: &str) -> Result<()> {
    r.expect_error(409, "EXCLUSIVE_MODE_BUSY", what)?;
    ensure!(
        r.json["runningSessionId"] == running,
        "{what}: runningSessionId should be {running}: {}",
        r.text
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_blocks_new_sessions_while_running() -> Result<()> {
    let server = Server::start(ServerOpts::new().exclusive()).await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;

    let mut s = server.stream(&a, "SLOW 400").await?;
    let mut frames = s.read_until_type("agent_run_start", T).await?;

    let r = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    check_busy(&r, "create while A runs", &a)?;
    let r = server
        .post_json("/api/v1/oneshot/query", &json!({"query": "hi"}))
        .await?;
    check_busy(&r, "oneshot while A runs", &a)?;
    let r = server
        .post_sse("/api/v1/oneshot/query/stream", &json!({"query": "hi"}))
        .await?
        .json_body()
        .await?;
    check_busy(&r, "oneshot stream while A runs", &a)?;

    // Other existing sessions may still run queries.
    let r = server.query(&b, "b works").await?;
    ensure!(r["content"] == "echo: b works", "query on B: {r}");

    // No session was created by the rejected requests.
    let list = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        list["sessions"].as_array().map(Vec::len) == Some(2),
        "rejected requests must not create sessions: {list}"
    );

    // A's stream was not disturbed; abort it and the slot is released.
    ensure!(server.abort(&a).await?, "abort A");
    frames.extend(s.collect_until_end(LONG).await?);
    ensure!(
        frames.last().map(|f| f.data["status"] == "aborted") == Some(true),
        "A aborted: {:?}",
        types(&frames)
    );

    let mut created = None;
    wait_until(
        T,
        "create allowed again after A was aborted",
        async || match server
            .post_json("/api/v1/sessions/create", &json!({}))
            .await
        {
            Ok(r) if r.status == 201 => {
                created = r.json["sessionId"].as_str().map(str::to_string);
                true
            }
            _ => false,
        },
    )
    .await?;
    ensure!(
        created.is_some(),
        "create after release returned a session id"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_slot_released_when_run_ends() -> Result<()> {
    let server = Server::start(ServerOpts::new().exclusive()).await?;
    let a = server.create_session().await?;

    // A short streaming run (~3 s) to its natural end.
    let mut s = server.stream(&a, "SLOW 60").await?;
    s.read_until_type("agent_run_start", T).await?;
    let r = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    check_busy(&r, "create during the short run", &a)?;
    let rest = s.collect_until_end(LONG).await?;
    ensure!(
        concat_deltas(&rest).ends_with("t59"),
        "short run completed: {:?}",
        types(&rest)
    );

    wait_until(T, "create allowed after the run ended", async || {
        matches!(server.post_json("/api/v1/sessions/create", &json!({})).await, Ok(r) if r.status == 201)
    })
    .await?;

    // Non-streaming queries and oneshot also release the slot when done.
    let r = server.query(&a, "quick").await?;
    ensure!(r["content"] == "echo: quick", "quick: {r}");
    let b = server
        .post_ok("/api/v1/oneshot/query", &json!({"query": "one"}))
        .await?;
    ensure!(b["result"]["content"] == "echo: one", "oneshot: {b}");
    let r = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    r.expect_status(201, "create after oneshot")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_exclusive_create_is_allowed_while_running() -> Result<()> {
    let server = Server::start_default().await?;
    let a = server.create_session().await?;
    let mut s = server.stream(&a, "SLOW 400").await?;
    s.read_until_type("agent_run_start", T).await?;

    let r = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    r.expect_status(201, "create while running without --exclusive")?;
    let body = server
        .post_ok("/api/v1/oneshot/query", &json!({"query": "parallel"}))
        .await?;
    ensure!(
        body["result"]["content"] == "echo: parallel",
        "oneshot: {body}"
    );

    ensure!(server.abort(&a).await?, "abort A");
    s.collect_until_end(LONG).await?;
    Ok(())
}
