//! Many sessions at once: no cross-talk between concurrent streams, unique ids.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use e2e::{Frame, Server, check_seq, concat_deltas, flood_text, of_type, types};
use tokio::sync::Barrier;

const SESSIONS: usize = 8;

/// Every frame of a run must belong to `sid` / `query`; returns the run's messageId and the
/// event ids.
fn check_own_run(
    frames: &[Frame],
    sid: &str,
    query: &str,
    expected: &str,
) -> Result<(String, Vec<String>)> {
    let tys = types(frames);
    let n = frames.len();
    ensure!(n >= 5, "[{sid}] too few frames: {tys:?}");
    ensure!(
        tys[0] == "user_message" && tys[1] == "agent_run_start",
        "[{sid}] {tys:?}"
    );
    ensure!(
        tys[n - 2] == "assistant_message" && tys[n - 1] == "agent_run_end",
        "[{sid}] {tys:?}"
    );
    ensure!(
        tys[2..n - 2]
            .iter()
            .all(|t| t == "assistant_streaming_message"),
        "[{sid}] unexpected frames in the middle: {tys:?}"
    );
    check_seq(frames)?;

    ensure!(
        frames[0].data["content"] == query,
        "[{sid}] foreign user_message: {:?}",
        frames[0].data
    );
    let start = &frames[1].data;
    ensure!(
        start["sessionId"] == sid,
        "[{sid}] foreign agent_run_start: {start}"
    );
    ensure!(
        start["runOptions"]["sessionId"] == sid,
        "[{sid}] foreign runOptions: {start}"
    );
    ensure!(
        start["runOptions"]["input"] == query,
        "[{sid}] foreign input: {start}"
    );
    let end = &frames[n - 1].data;
    ensure!(
        end["sessionId"] == sid,
        "[{sid}] foreign agent_run_end: {end}"
    );
    ensure!(end["status"] == "idle", "[{sid}] run end: {end}");

    let fin = &frames[n - 2].data;
    let mid = fin["messageId"].as_str().context("messageId")?.to_string();
    for d in of_type(frames, "assistant_streaming_message") {
        ensure!(
            d.data["messageId"] == mid.as_str(),
            "[{sid}] foreign delta: {:?}",
            d.data
        );
    }
    ensure!(fin["content"] == expected, "[{sid}] final content mismatch");
    ensure!(
        concat_deltas(frames) == expected,
        "[{sid}] deltas incomplete or mixed"
    );

    let ids = frames
        .iter()
        .map(|f| {
            f.data["id"]
                .as_str()
                .map(str::to_string)
                .context("event id")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((mid, ids))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_sessions_stream_at_once_without_cross_talk() -> Result<()> {
    let server = Arc::new(Server::start_default().await?);
    let mut sids = Vec::new();
    for _ in 0..SESSIONS {
        sids.push(server.create_session().await?);
    }

    // Phase 1: give each session a unique first turn (sequentially), so memories differ.
    for (i, sid) in sids.iter().enumerate() {
        let word = format!("marker{i}x{}", &sid[..6]);
        let r = server.query(sid, &word).await?;
        ensure!(
            r["content"] == format!("echo: {word}").as_str(),
            "warm-up {i}: {r}"
        );
    }

    // Phase 2: all sessions stream at the same time.
    let barrier = Arc::new(Barrier::new(SESSIONS));
    let mut tasks = Vec::new();
    for (i, sid) in sids.iter().cloned().enumerate() {
        let server = server.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let word = format!("marker{i}x{}", &sid[..6]);
            barrier.wait().await;

            // A flood and a unique echo, both concurrently with the other sessions.
            let flood = server.stream_all(&sid, "FLOOD 300").await?;
            let (m1, mut ids) = check_own_run(&flood, &sid, "FLOOD 300", &flood_text(300))?;

            let uniq = format!("only-{i}-{sid}");
            let echo = server.stream_all(&sid, &uniq).await?;
            let (m2, ids2) = check_own_run(&echo, &sid, &uniq, &format!("echo: {uniq}"))?;
            ids.extend(ids2);

            // The session's memory contains its own turns only.
            let recall = server.stream_all(&sid, "RECALL").await?;
            let expected = format!("recall: {word} | FLOOD 300 | {uniq}");
            let (m3, ids3) = check_own_run(&recall, &sid, "RECALL", &expected)?;
            ids.extend(ids3);

            // Seq numbers keep increasing across the session's runs.
            let last_flood = flood.last().and_then(|f| f.id).context("flood id")?;
            let first_echo = echo.first().and_then(|f| f.id).context("echo id")?;
            ensure!(
                first_echo > last_flood,
                "[{sid}] seq went backwards between runs"
            );

            anyhow::Ok((sid, vec![m1, m2, m3], ids))
        }));
    }

    let mut all_message_ids = HashSet::new();
    let mut all_event_ids = HashSet::new();
    for t in tasks {
        let (sid, mids, ids) = t.await??;
        for m in mids {
            ensure!(
                all_message_ids.insert(m.clone()),
                "messageId {m} shared across runs ({sid})"
            );
        }
        for id in ids {
            ensure!(
                all_event_ids.insert(id.clone()),
                "event id {id} seen twice ({sid})"
            );
        }
    }
    ensure!(all_message_ids.len() == SESSIONS * 3, "message id count");

    // Every session has its own worker.
    let workers = server.workers().await?;
    let mut pids = HashSet::new();
    for sid in &sids {
        let w = workers
            .iter()
            .find(|w| w["sessionId"] == sid.as_str())
            .with_context(|| format!("no worker for {sid}: {workers:?}"))?;
        ensure!(
            pids.insert(w["pid"].as_u64().context("pid")?),
            "worker pid shared"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_get_unique_sessions() -> Result<()> {
    let server = Arc::new(Server::start_default().await?);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let server = server.clone();
        tasks.push(tokio::spawn(
            async move { server.create_session_full().await },
        ));
    }
    let mut ids = HashSet::new();
    let mut dirs = HashSet::new();
    for t in tasks {
        let body = t.await??;
        let sid = body["sessionId"].as_str().context("sessionId")?.to_string();
        // Shown as the jail's path; its own directory on the host.
        ensure!(
            body["session"]["workspace"] == "/workspace",
            "workspace: {body}"
        );
        let ws = server.workspace_root().join(&sid);
        ensure!(ws.is_dir(), "workspace {ws:?} missing");
        ensure!(ids.insert(sid), "duplicate session id");
        ensure!(dirs.insert(ws), "duplicate workspace dir");
    }
    let list = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        list["sessions"].as_array().map(Vec::len) == Some(20),
        "list should have 20 sessions: {list}"
    );
    // A concurrent stream still works with all those sessions around.
    let frames = server
        .stream_all(ids.iter().next().context("an id")?, "ping")
        .await?;
    ensure!(
        concat_deltas(&frames) == "echo: ping",
        "stream after creates"
    );
    Ok(())
}
