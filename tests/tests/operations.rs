//! Operating one session's worker: its memory in `/api/v1/workers`, and restarting or stopping
//! it through `/api/v1/sessions/restart` and `/stop` without losing history or followers.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, event_types, pid_alive, types, wait_until};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_report_their_memory() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    server.query(&sid, "hello").await?;
    let workers = server.workers().await?;
    let worker = workers
        .iter()
        .find(|w| w["sessionId"] == sid.as_str())
        .with_context(|| format!("no worker in {workers:?}"))?;
    ensure!(
        worker["rssKib"].as_u64().is_some_and(|kib| kib > 0),
        "{worker}"
    );
    ensure!(
        worker["state"] == "idle" && worker["startedAt"].is_u64(),
        "{worker}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gives_a_fresh_worker_that_remembers() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    server.query(&sid, "remember the tulips").await?;
    let before = server.wait_worker_pid(&sid).await?;
    let stored = server.events(&sid).await?.len();

    let restarted = server
        .post_ok("/api/v1/sessions/restart", &json!({"sessionId": sid}))
        .await?;
    let after = u32::try_from(restarted["pid"].as_u64().context("pid")?)?;
    ensure!(
        restarted["success"] == true && after != before,
        "{restarted}"
    );
    wait_until(T, "the old worker is gone", async || !pid_alive(before)).await?;
    ensure!(
        server.worker_pid(&sid).await? == Some(after),
        "the new worker is not listed"
    );
    ensure!(
        server.events(&sid).await?.len() == stored,
        "an idle restart changed the history"
    );
    let recall = server.query(&sid, "RECALL").await?;
    ensure!(
        recall["content"]
            .as_str()
            .is_some_and(|c| c.contains("remember the tulips")),
        "{recall}"
    );
    ensure!(
        server.worker_pid(&sid).await? == Some(after),
        "the query did not use the restarted worker"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_a_run_ends_it_and_keeps_followers() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    // A follower attached before anything happens.
    let mut follower = server
        .get_sse(
            &format!("/api/v1/sessions/events/stream?sessionId={sid}&after=0"),
            &[],
        )
        .await?;
    let mut stream = server.stream(&sid, "SLOW 400").await?;
    stream.read_deltas(2, T).await?;
    server
        .post_ok("/api/v1/sessions/restart", &json!({"sessionId": sid}))
        .await?;
    let frames = stream.collect_until_end(LONG).await?;
    let end = &frames.last().context("no frames")?.data;
    ensure!(
        end["type"] == "agent_run_end" && end["status"] == "error",
        "the interrupted run: {:?}",
        types(&frames)
    );
    // The next run goes to the restarted worker, and the follower sees both runs.
    server.query(&sid, "after the restart").await?;
    let seen = follower
        .read_until(LONG, |f| {
            f.data["type"] == "agent_run_end" && f.data["status"] == "idle"
        })
        .await?;
    let kinds = types(&seen);
    ensure!(
        kinds.iter().filter(|t| *t == "agent_run_end").count() == 2,
        "follower: {kinds:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_worker_until_the_next_query() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    server.query(&sid, "one").await?;
    let pid = server.wait_worker_pid(&sid).await?;
    let stopped = server
        .post_ok("/api/v1/sessions/stop", &json!({"sessionId": sid}))
        .await?;
    ensure!(stopped["stopped"] == true, "{stopped}");
    wait_until(T, "the worker is gone", async || !pid_alive(pid)).await?;
    ensure!(server.worker_pid(&sid).await?.is_none(), "still listed");
    ensure!(server.status(&sid).await?["state"] == "idle");
    let again = server
        .post_ok("/api/v1/sessions/stop", &json!({"sessionId": sid}))
        .await?;
    ensure!(again["stopped"] == false, "{again}");

    let answer = server.query(&sid, "two").await?;
    ensure!(answer["content"] == "echo: two", "{answer}");
    ensure!(server.wait_worker_pid(&sid).await? != pid, "no new worker");
    let kinds = event_types(&server.events(&sid).await?);
    ensure!(
        kinds.iter().filter(|t| *t == "user_message").count() == 2,
        "history: {kinds:?}"
    );

    for path in ["/api/v1/sessions/stop", "/api/v1/sessions/restart"] {
        server
            .post_json(path, &json!({"sessionId": "V1StGXR8_Z5jdHi6B-myT"}))
            .await?
            .expect_error(404, "SESSION_NOT_FOUND", path)?;
        server
            .post_json(path, &json!({}))
            .await?
            .expect_error(400, "SESSION_ID_REQUIRED", path)?;
    }
    Ok(())
}

/// An operator reading the logs sees which route each line came from, by its pattern (no ids or
/// query strings from the request line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_name_the_matched_route() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let created = "http{method=POST route=/api/v1/sessions/create}";
    let under = |span: &str, message: &str| {
        server
            .logs()
            .lines()
            .any(|l| l.contains(span) && l.contains(message))
    };
    wait_until(T, "the create's log line", async || {
        under(created, "session created")
    })
    .await
    .with_context(|| server.logs())?;
    server.query(&sid, "hello").await?;
    let queried = "http{method=POST route=/api/v1/sessions/query}";
    wait_until(T, "the query's log line", async || {
        under(queried, "run started")
    })
    .await
    .with_context(|| server.logs())?;
    Ok(())
}
