//! Supervision: worker crashes (SIGKILL mid-run and idle), supervisor shutdown (SIGTERM) and
//! supervisor death (SIGKILL) must not leave workers behind.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, check_seq, kill9_pid, pid_alive, types, wait_until};

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
