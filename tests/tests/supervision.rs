//! Supervision: worker crashes (SIGKILL mid-run and idle), supervisor shutdown (SIGTERM) and
//! supervisor death (SIGKILL) must not leave workers behind; a session that sends more than
//! `server.sessionLimits` allows is stopped, and only that session.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{Frame, LONG, Server, ServerOpts, check_seq, kill9_pid, pid_alive, types, wait_until};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_run() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let r = server.query(&sid, "alpha").await?;
    ensure!(r["content"] == "echo: alpha", "first turn: {r}");
    let pid1 = server.wait_worker_pid(&sid).await?;
    ensure!(pid_alive(pid1), "worker {pid1} alive before the kill");

    let mut s = server.stream(&sid, "SLOW 200").await?;
    let mut frames = s.read_deltas(2, T).await?;
    kill9_pid(pid1)?;
    frames.extend(s.collect_until_end(LONG).await?);
    check_seq(&frames)?;

    let tys = types(&frames);
    let n = frames.len();
    ensure!(n >= 4, "frames: {tys:?}");
    let sys = &frames[n - 2].data;
    ensure!(
        sys["type"] == "system",
        "penultimate frame must be system: {tys:?}"
    );
    ensure!(sys["level"] == "error", "system level: {sys}");
    let end = &frames[n - 1].data;
    ensure!(end["type"] == "agent_run_end", "last frame: {tys:?}");
    ensure!(end["status"] == "error", "agent_run_end: {end}");
    ensure!(end["sessionId"] == sid.as_str(), "agent_run_end: {end}");

    wait_until(T, "killed worker is gone", async || !pid_alive(pid1)).await?;
    wait_until(T, "status not processing, state error", async || {
        server
            .status(&sid)
            .await
            .is_ok_and(|st| st["isProcessing"] == false && st["state"] == "error")
    })
    .await?;
    ensure!(
        server.worker_pid(&sid).await? != Some(pid1),
        "dead worker still listed"
    );

    // The next query gets a fresh worker and works.
    let r = server.query(&sid, "beta").await?;
    ensure!(r["content"] == "echo: beta", "after crash: {r}");
    let pid2 = server.wait_worker_pid(&sid).await?;
    ensure!(pid2 != pid1, "a new worker process is expected");
    ensure!(pid_alive(pid2), "new worker alive");

    // Memory was rebuilt from stored events: the turn before the crash is remembered.
    let r = server.query(&sid, "RECALL").await?;
    let content = r["content"].as_str().context("recall content")?;
    ensure!(
        content.starts_with("recall: alpha | ") && content.ends_with(" | beta"),
        "memory lost across the worker crash: {content:?}"
    );
    let st = server.status(&sid).await?;
    ensure!(st["state"] == "idle", "status after recovery: {st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_killed() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    server.query(&sid, "one").await?;
    let pid1 = server.wait_worker_pid(&sid).await?;
    kill9_pid(pid1)?;

    wait_until(T, "killed idle worker is gone", async || !pid_alive(pid1)).await?;
    wait_until(
        T,
        "killed idle worker disappears from /workers",
        async || {
            server.workers().await.is_ok_and(|ws| {
                !ws.iter()
                    .any(|w| w["pid"].as_u64() == Some(u64::from(pid1)))
            })
        },
    )
    .await?;

    let st = server.status(&sid).await?;
    ensure!(st["isProcessing"] == false, "idle crash status: {st}");

    let r = server.query(&sid, "two").await?;
    ensure!(r["content"] == "echo: two", "after idle crash: {r}");
    let pid2 = server.wait_worker_pid(&sid).await?;
    ensure!(pid2 != pid1, "a new worker process is expected");

    let r = server.query(&sid, "RECALL").await?;
    ensure!(
        r["content"] == "recall: one | two",
        "memory after idle crash: {r}"
    );

    // Streaming works as well on the new worker.
    let frames = server.stream_all(&sid, "three").await?;
    ensure!(
        frames.last().map(|f| f.data["status"] == "idle") == Some(true),
        "stream after idle crash: {:?}",
        types(&frames)
    );
    Ok(())
}

/// Starts `n` sessions with a worker each; returns their worker pids.
async fn sessions_with_workers(server: &Server, n: usize) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for i in 0..n {
        let sid = server.create_session().await?;
        server.query(&sid, &format!("hello {i}")).await?;
        let pid = server.wait_worker_pid(&sid).await?;
        ensure!(pid_alive(pid), "worker {pid} alive");
        pids.push(pid);
    }
    Ok(pids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_supervisor_and_workers() -> Result<()> {
    let mut server = Server::start_default().await?;
    let mut pids = sessions_with_workers(&server, 3).await?;

    // One worker is busy while the supervisor is told to stop.
    let sid = server.create_session().await?;
    let mut s = server.stream(&sid, "SLOW 200").await?;
    s.read_deltas(1, T).await?;
    pids.push(server.wait_worker_pid(&sid).await?);

    server.sigterm()?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .await
        .with_context(|| format!("supervisor did not exit after SIGTERM\n{}", server.logs()))?;
    ensure!(
        status.success(),
        "supervisor exit status after SIGTERM: {status:?}\n{}",
        server.logs()
    );
    for pid in pids {
        wait_until(T, &format!("worker {pid} gone after SIGTERM"), async || {
            !pid_alive(pid)
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_supervisor_takes_workers_down() -> Result<()> {
    let mut server = Server::start_default().await?;
    let mut pids = sessions_with_workers(&server, 3).await?;

    let sid = server.create_session().await?;
    let mut s = server.stream(&sid, "SLOW 200").await?;
    s.read_deltas(1, T).await?;
    pids.push(server.wait_worker_pid(&sid).await?);

    server.kill9()?;
    ensure!(
        server.wait_exit(Duration::from_secs(10)).await.is_some(),
        "supervisor still running after SIGKILL"
    );
    for pid in pids {
        wait_until(T, &format!("orphaned worker {pid} gone"), async || {
            !pid_alive(pid)
        })
        .await?;
    }
    Ok(())
}

/// A server with small session limits: 100 events a second, 16 KiB per event, 48 KiB stored.
async fn limited_server() -> Result<Server> {
    let config = json!({"server": {"sessionLimits": {
        "eventsPerSecond": 100,
        "eventBytes": "16KiB",
        "storedBytes": "48KiB",
    }}});
    Server::start(ServerOpts::new().config_file("limits.json", config.to_string())).await
}

/// The last two frames of a run cut short by `limit`: the error naming it, then the end.
fn ends_with_limit(frames: &[Frame], limit: &str) -> Result<()> {
    let n = frames.len();
    ensure!(n >= 2, "frames: {:?}", types(frames));
    let system = &frames[n - 2].data;
    let end = &frames[n - 1].data;
    ensure!(
        system["type"] == "system"
            && system["level"] == "error"
            && system["details"]["kind"] == "session_limit"
            && system["details"]["limit"] == limit
            && system["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("server.sessionLimits.{limit}"))),
        "the error names the limit {limit}: {system}"
    );
    ensure!(
        end["type"] == "agent_run_end" && end["status"] == "error",
        "the run ends as an error: {end}"
    );
    Ok(())
}

/// The session, and the server around it, are fine: another session runs a query, the server
/// answers its health check.
async fn others_unaffected(server: &Server) -> Result<()> {
    let other = server.create_session().await?;
    let r = server.query(&other, "still fine").await?;
    ensure!(r["content"] == "echo: still fine", "another session: {r}");
    let health = server.get("/api/v1/system/health").await?;
    health.expect_status(200, "health")?;
    Ok(())
}

/// A session that floods events faster than `eventsPerSecond` is stopped: its run ends with an
/// error naming the limit, its worker is killed, and its next query gets a fresh worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_event_rate_stops_the_session() -> Result<()> {
    let server = limited_server().await?;
    let sid = server.create_session().await?;
    server.query(&sid, "warm up").await?;
    let pid = server.wait_worker_pid(&sid).await?;

    let frames = server.stream_all(&sid, "FLOOD 20000").await?;
    check_seq(&frames)?;
    ends_with_limit(&frames, "eventsPerSecond")?;
    let deltas = frames
        .iter()
        .filter(|f| f.ty() == "assistant_streaming_message")
        .count();
    ensure!(deltas < 20_000, "the flood was cut short ({deltas} deltas)");
    wait_until(T, "the flooding worker is gone", async || !pid_alive(pid)).await?;
    ensure!(
        server.logs().contains("session limit exceeded"),
        "the supervisor logs the limit"
    );
    others_unaffected(&server).await?;
    let r = server.query(&sid, "after the flood").await?;
    ensure!(r["content"] == "echo: after the flood", "{r}");
    ensure!(
        server.wait_worker_pid(&sid).await? != pid,
        "a fresh worker serves the session"
    );
    Ok(())
}

/// An event over `eventBytes` is neither stored nor delivered; its run ends with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_size_limit_ends_the_run() -> Result<()> {
    let server = limited_server().await?;
    let sid = server.create_session().await?;
    let big = "x".repeat(20 * 1024);
    let frames = server.stream_all(&sid, &big).await?;
    ends_with_limit(&frames, "eventBytes")?;
    ensure!(
        !frames.iter().any(|f| f.ty() == "user_message"),
        "the oversized event was delivered: {:?}",
        types(&frames)
    );
    let stored = server.events(&sid).await?;
    let kinds: Vec<&str> = stored.iter().filter_map(|e| e["type"].as_str()).collect();
    ensure!(kinds == ["system", "agent_run_end"], "stored: {kinds:?}");
    others_unaffected(&server).await?;
    let r = server.query(&sid, "small").await?;
    ensure!(r["content"] == "echo: small", "{r}");
    Ok(())
}

/// Bytes of the stored events as the server returns them (close to what it stores).
fn stored_size(events: &[Value]) -> usize {
    events.iter().map(|e| e.to_string().len()).sum()
}

/// A session's stored events stop at `storedBytes`: the run that would pass it ends with the
/// error, later ones too until the session is full, and then queries are refused (507) and the
/// log does not grow any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_stop_at_the_session_limit() -> Result<()> {
    const CAP: usize = 48 * 1024;
    let server = limited_server().await?;
    let sid = server.create_session().await?;
    let text = "y".repeat(10 * 1024);
    let mut limited = 0;
    let refused = loop {
        if limited > 40 {
            bail!("the session never filled up");
        }
        let stream = server
            .post_sse(
                "/api/v1/sessions/query/stream",
                &json!({"sessionId": sid, "query": text}),
            )
            .await?;
        if stream.status != 200 {
            break stream.json_body().await?;
        }
        let mut stream = stream;
        let frames = stream.collect_until_end(LONG).await?;
        let end = &frames.last().context("no frames")?.data;
        if end["status"] == "error" {
            ends_with_limit(&frames, "storedBytes")?;
            limited += 1;
        } else {
            ensure!(limited == 0, "a run passed after the limit: {end}");
        }
    };
    ensure!(limited >= 1, "no run ended at the limit");
    refused.expect_error(507, "SESSION_STORAGE_FULL", "a query to a full session")?;
    ensure!(
        refused.json["details"]["limit"] == CAP,
        "the refusal names the limit: {}",
        refused.json
    );
    let full = server.events(&sid).await?;
    // A few hundred bytes of closing events may pass the cap, never a whole event.
    ensure!(
        stored_size(&full) <= CAP + 2048,
        "stored {} bytes past the cap of {CAP}",
        stored_size(&full)
    );
    let r = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid, "query": "one more"}),
        )
        .await?;
    r.expect_status(507, "a non-streaming query to a full session")?;
    ensure!(
        server.events(&sid).await?.len() == full.len(),
        "the log grew after the session was full"
    );
    others_unaffected(&server).await?;
    Ok(())
}

/// Streamed text is stored too (the running run's live text), so it counts toward
/// `storedBytes`: a stream of deltas that would never end in a stored event is stopped at the
/// limit rather than filling the disk. What the follower was shown becomes the run's
/// interrupted answer, and the log stays within the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_counts_toward_the_stored_limit() -> Result<()> {
    const CAP: usize = 16 * 1024;
    const TOKENS: usize = 20_000;
    let config = json!({"server": {"sessionLimits": {"storedBytes": "16KiB"}}});
    let server =
        Server::start(ServerOpts::new().config_file("limits.json", config.to_string())).await?;
    let sid = server.create_session().await?;

    // About 130 KB of text, far past the cap, in one burst of deltas.
    let frames = server.stream_all(&sid, &format!("FLOOD {TOKENS}")).await?;
    check_seq(&frames)?;
    ends_with_limit(&frames, "storedBytes")?;
    let shown: String = frames
        .iter()
        .filter(|f| f.ty() == "assistant_streaming_message")
        .filter_map(|f| f.data["content"].as_str())
        .collect();
    let tokens = shown.split(' ').count();
    ensure!(
        tokens < TOKENS && !shown.is_empty(),
        "the stream was stopped at the limit, not at its end ({tokens} tokens shown)"
    );

    let stored = server.events(&sid).await?;
    let answer = stored
        .iter()
        .find(|e| e["type"] == "assistant_message")
        .context("the streamed text is not in the history")?;
    ensure!(
        answer["finishReason"] == "interrupted" && answer["content"] == shown.as_str(),
        "shown {} bytes, kept {}",
        shown.len(),
        answer["content"].as_str().map_or(0, str::len)
    );
    ensure!(
        stored_size(&stored) <= CAP + 2048,
        "stored {} bytes past the cap of {CAP}",
        stored_size(&stored)
    );
    others_unaffected(&server).await?;
    Ok(())
}
