//! Abort: mid-stream abort, abort of a non-streaming query, abort when idle.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Frame, LONG, Server, check_seq, concat_deltas, event_types, slow_text, types};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_mid_stream() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let mut s = server.stream(&sid, "SLOW 200").await?;
    let mut frames = s.read_deltas(3, T).await?;

    ensure!(
        server.abort(&sid).await?,
        "abort of a running stream must succeed"
    );
    frames.extend(s.collect_until_end(LONG).await?);
    check_seq(&frames)?;

    let tys = types(&frames);
    let n = frames.len();
    ensure!(n >= 6, "frames: {tys:?}");
    // The run really stopped: far fewer than the 200 tokens were produced.
    let deltas = concat_deltas(&frames);
    ensure!(
        !deltas.split(' ').any(|t| t == "t199"),
        "the run was not aborted (all 200 tokens streamed)"
    );
    ensure!(
        slow_text(200).starts_with(&deltas),
        "partial deltas are not a prefix of the SLOW output: {deltas:?}"
    );

    let partial = &frames[n - 3].data;
    ensure!(
        partial["type"] == "assistant_message",
        "third-to-last: {tys:?}"
    );
    ensure!(partial["finishReason"] == "abort", "partial: {partial}");
    ensure!(
        partial["content"] == deltas.as_str(),
        "partial assistant_message must hold the streamed text: {partial} vs {deltas:?}"
    );
    let aborted = &frames[n - 2].data;
    ensure!(
        aborted["type"] == "assistant_message",
        "second-to-last: {tys:?}"
    );
    ensure!(
        aborted["content"] == "Request was aborted",
        "aborted msg: {aborted}"
    );
    ensure!(aborted["finishReason"] == "abort", "aborted msg: {aborted}");
    let end = &frames[n - 1].data;
    ensure!(end["type"] == "agent_run_end", "last: {tys:?}");
    ensure!(end["status"] == "aborted", "agent_run_end: {end}");

    let st = server.status(&sid).await?;
    ensure!(st["isProcessing"] == false, "status after abort: {st}");
    ensure!(st["state"] == "aborted", "status after abort: {st}");

    // The partial answer is stored.
    let stored = server.events(&sid).await?;
    ensure!(
        stored
            .iter()
            .any(|e| e["type"] == "assistant_message" && e["finishReason"] == "abort"),
        "aborted assistant_message not stored: {:?}",
        event_types(&stored)
    );
    ensure!(
        !event_types(&stored).contains(&"assistant_streaming_message".to_string()),
        "deltas must not be stored"
    );

    // Abort again: nothing running now.
    ensure!(
        !server.abort(&sid).await?,
        "second abort must report success:false"
    );

    // A new query works normally.
    let frames = server.stream_all(&sid, "after abort").await?;
    ensure!(
        frames.last().map(|f| &f.data["status"]) == Some(&json!("idle")),
        "new run: {:?}",
        types(&frames)
    );
    ensure!(
        concat_deltas(&frames) == "echo: after abort",
        "new run deltas"
    );
    let st = server.status(&sid).await?;
    ensure!(
        st["state"] == "idle" && st["isProcessing"] == false,
        "status: {st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_non_streaming_query() -> Result<()> {
    let server = std::sync::Arc::new(Server::start_default().await?);
    let sid = server.create_session().await?;

    let srv = server.clone();
    let sid2 = sid.clone();
    let pending = tokio::spawn(async move {
        srv.post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid2, "query": "SLOW 200"}),
        )
        .await
    });

    e2e::wait_until(T, "non-streaming query is executing", async || {
        server
            .status(&sid)
            .await
            .is_ok_and(|st| st["isProcessing"] == true)
    })
    .await?;
    ensure!(
        server.abort(&sid).await?,
        "abort must succeed while executing"
    );

    let resp = tokio::time::timeout(LONG, pending)
        .await
        .context("aborted non-streaming query did not return")???;
    resp.expect_status(200, "aborted non-streaming query")?;
    let result = &resp.json["result"];
    ensure!(
        result["finishReason"] == "abort",
        "aborted result: {}",
        resp.text
    );

    let st = server.status(&sid).await?;
    ensure!(
        st["isProcessing"] == false && st["state"] == "aborted",
        "status: {st}"
    );
    let r = server.query(&sid, "next").await?;
    ensure!(r["content"] == "echo: next", "after abort: {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_when_idle_reports_false() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    // Never ran (no worker yet).
    ensure!(!server.abort(&sid).await?, "abort of a fresh session");
    // After a completed run.
    server.query(&sid, "done").await?;
    ensure!(!server.abort(&sid).await?, "abort after completion");
    // It says why it did nothing, beside upstream's `success`.
    let answer = server
        .post_ok("/api/v1/sessions/abort", &json!({"sessionId": sid}))
        .await?;
    ensure!(
        answer
            == json!({
                "success": false,
                "reason": "Nothing to abort: no query is running in this session (its state is idle).",
                "state": "idle",
            }),
        "an idle abort: {answer}"
    );
    let st = server.status(&sid).await?;
    ensure!(
        st["state"] == "idle",
        "an idle abort must not change the state: {st}"
    );

    server
        .post_json(
            "/api/v1/sessions/abort",
            &json!({"sessionId": "nope_nope_nope_nope_1"}),
        )
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "abort unknown")?;
    server
        .post_json("/api/v1/sessions/abort", &json!({}))
        .await?
        .expect_error(400, "SESSION_ID_REQUIRED", "abort without id")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_only_affects_its_session() -> Result<()> {
    let server = Server::start_default().await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;

    let mut sa = server.stream(&a, "SLOW 200").await?;
    let mut sb = server.stream(&b, "SLOW 40").await?;
    sa.read_deltas(1, T).await?;
    let mut fb = sb.read_deltas(1, T).await?;

    ensure!(server.abort(&a).await?, "abort a");
    let fa = sa.collect_until_end(LONG).await?;
    ensure!(
        fa.last().map(|f| &f.data["status"]) == Some(&json!("aborted")),
        "a aborted: {:?}",
        types(&fa)
    );

    // b runs to completion untouched.
    fb.extend(sb.collect_until_end(LONG).await?);
    ensure!(
        concat_deltas(&fb) == slow_text(40),
        "b's output: {:?}",
        concat_deltas(&fb)
    );
    let end_b: Option<&Frame> = fb.last();
    ensure!(
        end_b.map(|f| &f.data["status"]) == Some(&json!("idle")),
        "b finished normally: {:?}",
        types(&fb)
    );
    Ok(())
}
