//! The postgres store through the real binary: what health and the logs show of its URL, a
//! server whose database cannot be reached, and PostgreSQL restarting in the middle of a run.
//! (The crash, restart, paging and import tests of every durable store are in durability.rs.)

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use e2e::{Frame, LONG, Server, ServerOpts};
use serde_json::Value;

fn on_postgres(url: &str) -> ServerOpts {
    ServerOpts::new()
        .env("STORAGE_TYPE", "postgres")
        .env("STORAGE_URL", url)
}

/// Stored events by seq, each seq once.
async fn stored(server: &Server, sid: &str) -> Result<BTreeMap<u64, Value>> {
    let mut by_seq = BTreeMap::new();
    for event in server.events(sid).await? {
        let seq = event["seq"].as_u64().context("stored event without seq")?;
        ensure!(
            by_seq.insert(seq, event).is_none(),
            "seq {seq} stored twice"
        );
    }
    Ok(by_seq)
}

/// Health names the store's database, with the password masked; the logs (at debug level,
/// the database driver's included) never show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_the_database_but_never_its_password() -> Result<()> {
    if e2e::pg::skipped()? {
        return Ok(());
    }
    let url = e2e::pg::new_schema().await?;
    let password = e2e::pg::password(&url)
        .context("the test database URL has a password")?
        .to_owned();
    let server = Server::start(on_postgres(&url).env("RUST_LOG", "debug")).await?;
    let sid = server.create_session().await?;
    server.query(&sid, "hello").await?;
    let health = server.get_ok("/api/v1/system/health").await?;
    ensure!(health["storage"]["type"] == "postgres", "{health}");
    let shown = health["storage"]["url"].as_str().context("no url")?;
    ensure!(
        shown.starts_with("postgres://agentd:***@127.0.0.1:") && shown.ends_with("/postgres"),
        "{shown}"
    );
    ensure!(!health.to_string().contains(&password), "{health}");
    let logs = server.logs();
    ensure!(logs.contains(shown), "the logs name the database: {logs}");
    ensure!(!logs.contains(&password), "the logs show the password");
    Ok(())
}

/// A server whose database cannot be reached does not start; it says which database, not
/// with which password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_its_database_does_not_start() -> Result<()> {
    let port = e2e::free_port()?;
    let url = format!("postgres://agentd:hunter2@127.0.0.1:{port}/agentd");
    let exited = Server::expect_exit(on_postgres(&url), LONG).await?;
    ensure!(!exited.status.success());
    ensure!(
        exited
            .stderr
            .contains(&format!("postgres://agentd:***@127.0.0.1:{port}/agentd")),
        "{}",
        exited.stderr
    );
    ensure!(!exited.stderr.contains("hunter2"), "{}", exited.stderr);
    ensure!(!exited.stdout.contains("hunter2"), "{}", exited.stdout);
    Ok(())
}

/// PostgreSQL stops in the middle of a run and comes back: meanwhile the server answers that
/// its storage is unavailable; afterwards it serves again, the run ends, every event a
/// follower was shown is stored under the seq it was shown with, and the conversation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_mid_run_loses_no_acknowledged_event() -> Result<()> {
    if e2e::pg::skipped()? {
        return Ok(());
    }
    let cluster = tokio::task::block_in_place(e2e::pg::Cluster::start)?;
    let server = Server::start(on_postgres(&cluster.url())).await?;
    let sid = server.create_session().await?;
    server.query(&sid, "first turn").await?;
    let path = format!("/api/v1/sessions/events/stream?sessionId={sid}&after=0");
    let mut follower = server.get_sse(&path, &[]).await?;
    follower.expect_event_stream()?;
    let _run = server.stream(&sid, "SLOW 100").await?;
    let mut deltas = 0;
    let mut frames: Vec<Frame> = follower
        .read_until(LONG, |f| {
            deltas += usize::from(f.ty() == "assistant_streaming_message");
            deltas >= 10
        })
        .await?;

    tokio::task::block_in_place(|| cluster.stop())?;
    server.get("/api/v1/system/health").await?.expect_error(
        503,
        "STORAGE_UNAVAILABLE",
        "health while PostgreSQL is down",
    )?;
    server
        .post_json("/api/v1/sessions/create", &serde_json::json!({}))
        .await?
        .expect_error(
            503,
            "STORAGE_UNAVAILABLE",
            "a new session while PostgreSQL is down",
        )?;
    tokio::task::block_in_place(|| cluster.start_again())?;

    e2e::wait_until(
        LONG,
        "health answers again",
        async || matches!(server.get("/api/v1/system/health").await, Ok(r) if r.status == 200),
    )
    .await?;
    frames.extend(follower.read_until_type("agent_run_end", LONG).await?);
    let history = stored(&server, &sid).await?;
    for frame in &frames {
        if frame.ty().starts_with("assistant_streaming") {
            continue;
        }
        let seq = frame.id.context("frame without id")?;
        let kept = history
            .get(&seq)
            .with_context(|| format!("event {seq} ({}) was shown, then lost", frame.ty()))?;
        ensure!(
            kept["id"] == frame.data["id"],
            "seq {seq} holds another event: {kept} vs {}",
            frame.data
        );
    }
    let (_, last) = history.last_key_value().context("empty history")?;
    ensure!(last["type"] == "agent_run_end", "the run is closed: {last}");
    let recall = server.query(&sid, "RECALL").await?;
    ensure!(
        recall["content"] == "recall: first turn | SLOW 100",
        "{recall}"
    );
    ensure!(
        !server
            .logs()
            .contains(e2e::pg::password(&cluster.url()).unwrap_or("?")),
        "the logs show the password"
    );
    Ok(())
}
