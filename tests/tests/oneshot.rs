//! One-shot endpoints: create a session and run one query in one request.

use anyhow::{Context, Result, ensure};
use e2e::{
    LONG, Server, check_seq, concat_deltas, event_types, is_ms_timestamp, is_session_id, types,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oneshot_query_creates_named_session() -> Result<()> {
    let server = Server::start_default().await?;

    let body = server
        .post_ok(
            "/api/v1/oneshot/query",
            &json!({"query": "hi there", "sessionName": "My task", "sessionTags": ["x", "y"]}),
        )
        .await?;
    let sid = body["sessionId"].as_str().context("sessionId")?.to_string();
    ensure!(is_session_id(&sid), "bad session id {sid:?}");
    let result = &body["result"];
    ensure!(result["type"] == "assistant_message", "result: {body}");
    ensure!(result["content"] == "echo: hi there", "result: {body}");
    ensure!(result["finishReason"] == "stop", "result: {body}");

    let d = server.details(&sid).await?;
    ensure!(d["id"] == sid, "details: {d}");
    ensure!(d["metadata"]["name"] == "My task", "metadata.name: {d}");
    ensure!(
        d["metadata"]["tags"] == json!(["x", "y"]),
        "metadata.tags: {d}"
    );
    ensure!(d["workspace"] == "/workspace", "details: {d}");
    let ws = server.workspace_root().join(&sid);
    ensure!(ws.is_dir(), "oneshot session workspace missing: {ws:?}");

    let list = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        list["sessions"]
            .as_array()
            .context("sessions")?
            .iter()
            .any(|s| s["id"] == sid),
        "oneshot session not listed: {list}"
    );

    let stored = server.events(&sid).await?;
    ensure!(
        event_types(&stored)
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end"
            ],
        "stored: {:?}",
        event_types(&stored)
    );

    // The session is an ordinary session afterwards and remembers the one-shot turn.
    let r = server.query(&sid, "RECALL").await?;
    ensure!(r["content"] == "recall: hi there", "recall: {r}");

    // Without name/tags it still works.
    let body = server
        .post_ok("/api/v1/oneshot/query", &json!({"query": "plain"}))
        .await?;
    ensure!(
        body["result"]["content"] == "echo: plain",
        "plain oneshot: {body}"
    );
    ensure!(body["sessionId"] != sid, "new session per oneshot");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oneshot_stream_starts_with_session_created() -> Result<()> {
    let server = Server::start_default().await?;

    let mut s = server
        .post_sse(
            "/api/v1/oneshot/query/stream",
            &json!({"query": "streamed", "sessionName": "S", "sessionTags": ["t"]}),
        )
        .await?;
    s.expect_event_stream()?;
    let frames = s.collect_until_end(LONG).await?;
    let tys = types(&frames);
    ensure!(!frames.is_empty(), "empty oneshot stream");

    let first = &frames[0];
    ensure!(first.ty() == "session_created", "first frame: {tys:?}");
    ensure!(
        first.id.is_none(),
        "session_created must not carry an SSE id: {first:?}"
    );
    let sid = first.data["sessionId"]
        .as_str()
        .context("session_created.sessionId")?;
    ensure!(is_session_id(sid), "bad session id {sid:?}");
    ensure!(
        is_ms_timestamp(&first.data["timestamp"]),
        "timestamp: {:?}",
        first.data
    );

    let rest = &frames[1..];
    check_seq(rest)?;
    let rtys = types(rest);
    ensure!(rtys.len() >= 5, "run frames: {rtys:?}");
    ensure!(
        rtys[0] == "user_message" && rtys[1] == "agent_run_start",
        "{rtys:?}"
    );
    ensure!(rtys[rtys.len() - 2] == "assistant_message", "{rtys:?}");
    ensure!(rtys[rtys.len() - 1] == "agent_run_end", "{rtys:?}");
    ensure!(
        rest[1].data["sessionId"] == sid,
        "agent_run_start.sessionId differs"
    );
    ensure!(
        concat_deltas(rest) == "echo: streamed",
        "deltas: {:?}",
        concat_deltas(rest)
    );
    ensure!(
        rest[rest.len() - 2].data["content"] == "echo: streamed",
        "final content"
    );
    ensure!(
        rest[rest.len() - 1].data["status"] == "idle",
        "run end status"
    );

    let d = server.details(sid).await?;
    ensure!(d["metadata"]["name"] == "S", "metadata.name: {d}");
    ensure!(d["metadata"]["tags"] == json!(["t"]), "metadata.tags: {d}");
    Ok(())
}
