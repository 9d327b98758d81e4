//! Lifecycle under load, through the real binary: idle workers stop and wake, a cap on live
//! workers hibernates the least recently used one, admission control answers 429 when nothing
//! can make room, and SIGTERM lets runs finish (or aborts them after the grace period, telling
//! their clients the server is shutting down) without losing a stored event or leaving a
//! process.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, ServerOpts, pid_alive, wait_until};
use serde_json::{Value, json};

fn with_config(config: Value) -> ServerOpts {
    ServerOpts::new().config_file("config.json", config.to_string())
}

async fn worker_sessions(server: &Server) -> Result<HashSet<String>> {
    Ok(server
        .workers()
        .await?
        .iter()
        .filter_map(|w| w["sessionId"].as_str().map(str::to_owned))
        .collect())
}

async fn metric(server: &Server, name: &str) -> Result<f64> {
    let text = server.get("/metrics").await?.text;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no metric {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_stop_and_wake_with_their_memory() -> Result<()> {
    let server = Server::start(with_config(
        json!({"server": {"workers": {"idleTimeoutSecs": 1}}}),
    ))
    .await?;
    let sid = server.create_session().await?;
    server.query(&sid, "alpha").await?;
    let first = server.wait_worker_pid(&sid).await?;
    wait_until(LONG, "the idle worker stopped", async || {
        worker_sessions(&server).await.is_ok_and(|w| w.is_empty())
    })
    .await?;
    ensure!(!pid_alive(first), "the stopped worker's process is gone");
    ensure!(metric(&server, "agent_worker_idle_stops_total").await? >= 1.0);
    ensure!(
        metric(&server, "agent_worker_crashes_total").await? == 0.0,
        "an idle stop is not a crash"
    );

    let recall = server.query(&sid, "RECALL").await?;
    ensure!(recall["content"] == "recall: alpha", "{recall}");
    ensure!(
        server.wait_worker_pid(&sid).await? != first,
        "a new worker answered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_idle_worker_makes_room() -> Result<()> {
    let server = Server::start(with_config(json!({"server": {"workers": {"max": 2}}}))).await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;
    let c = server.create_session().await?;
    server.query(&a, "from a").await?;
    server.query(&b, "from b").await?;
    ensure!(worker_sessions(&server).await? == HashSet::from([a.clone(), b.clone()]));

    server.query(&c, "from c").await?;
    let live = worker_sessions(&server).await?;
    ensure!(
        live == HashSet::from([b.clone(), c.clone()]),
        "a (least recently used) hibernated: {live:?}"
    );
    ensure!(metric(&server, "agent_worker_hibernations_total").await? == 1.0);

    // a wakes with its history; b is now the least recently used and makes room.
    let recall = server.query(&a, "RECALL").await?;
    ensure!(recall["content"] == "recall: from a", "{recall}");
    ensure!(worker_sessions(&server).await? == HashSet::from([a, c]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_running_is_answered_with_429() -> Result<()> {
    let server = Server::start(with_config(json!({"server": {"workers": {"max": 1}}}))).await?;
    let busy = server.create_session().await?;
    let other = server.create_session().await?;
    let mut stream = server.stream(&busy, "SLOW 200").await?;
    stream.read_deltas(1, LONG).await?;

    let refused = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": other, "query": "hi"}),
        )
        .await?;
    refused.expect_error(429, "SERVER_OVERLOADED", "query while the only slot runs")?;
    let retry = refused.header("retry-after").context("no Retry-After")?;
    ensure!(
        retry.parse::<u64>().is_ok_and(|s| s > 0),
        "Retry-After {retry:?}"
    );
    let refused = server
        .post_json(
            "/api/v1/sessions/query/stream",
            &json!({"sessionId": other, "query": "hi"}),
        )
        .await?;
    refused.expect_error(429, "SERVER_OVERLOADED", "stream while the only slot runs")?;
    ensure!(
        server.status(&other).await?["isProcessing"] == false,
        "the refused query left nothing behind"
    );

    ensure!(server.abort(&busy).await?);
    stream.collect_until_end(LONG).await?;
    let answer = server.query(&other, "hi").await?;
    ensure!(
        answer["content"] == "echo: hi",
        "the slot was freed: {answer}"
    );
    Ok(())
}

fn sqlite(dir: &Path, grace: u64) -> ServerOpts {
    with_config(json!({
        "workspace": dir.join("ws"),
        "server": {
            "storage": {"type": "sqlite", "path": dir.join("sessions.db")},
            "shutdownGraceSecs": grace,
        },
    }))
    .without_workspace_flag()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_runs_finish_and_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(sqlite(dir.path(), 60)).await?;
    let sid = server.create_session().await?;
    let mut stream = server.stream(&sid, "SLOW 30").await?;
    stream.read_deltas(1, LONG).await?;
    let worker = server.wait_worker_pid(&sid).await?;

    server.sigterm()?;
    let frames = stream.collect_until_end(LONG).await?;
    let end = frames.last().context("no frames")?;
    ensure!(
        end.ty() == "agent_run_end" && end.data["status"] == "idle",
        "the run finished: {:?}",
        end.data
    );
    let status = server
        .wait_exit(LONG)
        .await
        .context("the server did not exit")?;
    ensure!(status.success(), "exit status {status}");
    ensure!(!pid_alive(worker), "the worker is gone");
    drop(server);

    let server = Server::start(sqlite(dir.path(), 60)).await?;
    let events = server.events(&sid).await?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    ensure!(
        kinds
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end"
            ],
        "{kinds:?}"
    );
    ensure!(
        events[2]["content"]
            .as_str()
            .is_some_and(|c| c.ends_with("t29")),
        "the whole answer was stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_aborts_runs_past_the_grace_period() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(sqlite(dir.path(), 1)).await?;
    let sid = server.create_session().await?;
    let mut stream = server.stream(&sid, "SLOW 1000").await?;
    stream.read_deltas(1, LONG).await?;
    let worker = server.wait_worker_pid(&sid).await?;

    server.sigterm()?;
    let frames = stream.collect_until_end(LONG).await?;
    let end = frames.last().context("no frames")?;
    ensure!(
        end.ty() == "agent_run_end" && end.data["status"] == "aborted",
        "{:?}",
        end.data
    );
    ensure!(server.wait_exit(LONG).await.is_some_and(|s| s.success()));
    ensure!(!pid_alive(worker));
    drop(server);

    let server = Server::start(sqlite(dir.path(), 1)).await?;
    let events = server.events(&sid).await?;
    let last = events.last().context("no events")?;
    ensure!(
        last["type"] == "agent_run_end" && last["status"] == "aborted",
        "closed by the abort, not as interrupted: {last}"
    );
    Ok(())
}

/// A run cut short by a shutdown says so: the streaming client's last events name the server
/// shutting down (not just "Request was aborted"), and so does the answer a non-streaming
/// client gets; the stored log says the same after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_tells_clients_the_server_is_shutting_down() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(sqlite(dir.path(), 1)).await?;
    let streaming = server.create_session().await?;
    let waiting = server.create_session().await?;
    let mut stream = server.stream(&streaming, "SLOW 1000").await?;
    stream.read_deltas(1, LONG).await?;
    let client = reqwest::Client::new();
    let url = server.url("/api/v1/sessions/query");
    let body = json!({"sessionId": waiting, "query": "SLOW 1000"});
    let answer = tokio::spawn(async move {
        let response = client.post(url).json(&body).send().await?;
        let status = response.status().as_u16();
        anyhow::Ok((status, response.json::<Value>().await?))
    });
    wait_until(LONG, "both runs are running", async || {
        server
            .status(&waiting)
            .await
            .is_ok_and(|s| s["isProcessing"] == true)
    })
    .await?;

    server.sigterm()?;
    let frames = stream.collect_until_end(LONG).await?;
    let n = frames.len();
    ensure!(n >= 3, "frames: {:?}", e2e::types(&frames));
    let (system, closing, end) = (
        &frames[n - 3].data,
        &frames[n - 2].data,
        &frames[n - 1].data,
    );
    ensure!(
        system["type"] == "system"
            && system["details"]["kind"] == "server_shutdown"
            && system["message"]
                .as_str()
                .is_some_and(|m| m.contains("server is shutting down")),
        "the system event says why: {system}"
    );
    ensure!(
        closing["type"] == "assistant_message"
            && closing["content"] == "Request was aborted: the server is shutting down",
        "the closing message says why: {closing}"
    );
    ensure!(
        end["type"] == "agent_run_end" && end["status"] == "aborted",
        "{end}"
    );
    let (status, answer) = answer.await??;
    ensure!(
        status == 200
            && answer["result"]["content"] == "Request was aborted: the server is shutting down",
        "the non-streaming answer says why: {status} {answer}"
    );
    ensure!(server.wait_exit(LONG).await.is_some_and(|s| s.success()));
    drop(server);

    let server = Server::start(sqlite(dir.path(), 1)).await?;
    for sid in [&streaming, &waiting] {
        let events = server.events(sid).await?;
        ensure!(
            events
                .iter()
                .any(|e| e["type"] == "system" && e["details"]["kind"] == "server_shutdown"),
            "the stored log says why: {events:?}"
        );
    }
    Ok(())
}
