//! Socket.IO (api.md §12) with the real npm `socket.io-client`: joining, queries, tool calls,
//! abort, several sockets in one session, a late joiner that asks for what it missed, and a
//! stored session restored on join. The client side is `tests/js/socketio.mjs`.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use e2e::clients::{Needs, available, run_node};
use e2e::{Server, ServerOpts};
use serde_json::Value;

/// The `type`s of `agent-event` payloads, in order.
fn kinds(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn data_of<'a>(events: &'a Value, kind: &str) -> Vec<&'a Value> {
    events
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["type"] == kind)
                .map(|e| &e["data"])
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_query_tool_call_and_abort() -> Result<()> {
    if !available(Needs::SocketIo)? {
        return Ok(());
    }
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let report = run_node("socketio.mjs", &["basics", server.base_url(), &sid]).await?;

    ensure!(report["pingAckArgs"] == 0, "ping ack: {report}");
    ensure!(
        report["serverStatus"]
            == serde_json::json!({"isExclusive": false, "runningSessionId": null, "canAcceptNewRequest": true}),
        "server-status: {}",
        report["serverStatus"]
    );
    ensure!(report["unknownJoin"] == "Session not found", "{report}");
    ensure!(
        report["joinStatus"] == serde_json::json!({"isProcessing": false, "state": "idle"}),
        "join: {}",
        report["joinStatus"]
    );

    // A non-streaming query: the bridge's sequence for it, and the answer.
    let query = &report["query"];
    let kinds_q = kinds(query);
    ensure!(
        kinds_q.first().map(String::as_str) == Some("agent-status")
            && kinds_q.contains(&"query".to_owned())
            && kinds_q.contains(&"answer".to_owned()),
        "query events: {kinds_q:?}"
    );
    ensure!(
        !kinds_q.contains(&"streaming_message".to_owned()),
        "a non-streaming query streamed: {kinds_q:?}"
    );
    ensure!(
        data_of(query, "query")[0]["text"] == "hello socket",
        "{query}"
    );
    ensure!(
        data_of(query, "answer")[0]["text"] == "echo: hello socket",
        "{query}"
    );
    let seqs: Vec<u64> = query
        .as_array()
        .context("query events")?
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    ensure!(
        seqs.windows(2).all(|w| w[0] <= w[1]) && !seqs.is_empty(),
        "seqs out of order: {seqs:?}"
    );
    // Every seq of the run is one stored event (non-streaming: no deltas).
    let stored = server.events(&sid).await?;
    let stored_seqs: Vec<u64> = stored.iter().filter_map(|e| e["seq"].as_u64()).collect();
    for seq in &seqs {
        ensure!(stored_seqs.contains(seq), "seq {seq} is not stored");
    }

    // A streaming query with a tool call: status, tool call, tool result, deltas.
    let tool = &report["tool"];
    let calls = data_of(tool, "event");
    let call = calls
        .iter()
        .find(|d| d["type"] == "tool_call")
        .with_context(|| format!("no tool_call in {tool}"))?;
    ensure!(
        call["name"] == "write_file" && call["arguments"]["path"] == "socket.md",
        "{call}"
    );
    let result = calls
        .iter()
        .find(|d| d["type"] == "tool_result")
        .with_context(|| format!("no tool_result in {tool}"))?;
    ensure!(
        result["toolCallId"] == call["toolCallId"] && result["error"].is_null(),
        "{result}"
    );
    ensure!(
        kinds(tool).contains(&"streaming_message".to_owned()),
        "a streaming query sent no deltas: {:?}",
        kinds(tool)
    );
    ensure!(
        data_of(tool, "agent-status")
            .iter()
            .any(|d| d["state"] == "executing_tools" && d["message"] == "Executing write_file..."),
        "{tool}"
    );
    let written = server.workspace_root().join(&sid).join("socket.md");
    ensure!(
        std::fs::read_to_string(&written).ok().as_deref() == Some("written over socket.io"),
        "{} was not written",
        written.display()
    );

    // Abort mid-stream.
    ensure!(
        report["abortResult"] == serde_json::json!({"success": true}),
        "{report}"
    );
    let aborted = &report["aborted"];
    let end = data_of(aborted, "agent-status")
        .last()
        .copied()
        .cloned()
        .unwrap_or_default();
    ensure!(
        end == serde_json::json!({"isProcessing": false, "state": "aborted"}),
        "run end after abort: {end}"
    );
    ensure!(
        report["abortedNotice"]["data"]["sessionId"] == sid.as_str(),
        "aborted notice: {}",
        report["abortedNotice"]
    );
    ensure!(
        report["missingQuery"] == "Query is required",
        "{}",
        report["missingQuery"]
    );
    ensure!(
        report["idleAbort"] == serde_json::json!({"success": false}),
        "{report}"
    );
    ensure!(
        server.status(&sid).await?["state"] == "aborted",
        "status after abort"
    );

    // Deleting the session over HTTP tells the sockets in it.
    let report = run_node("socketio.mjs", &["closed", server.base_url(), &sid]).await?;
    ensure!(
        report["deleteStatus"] == 200
            && report["closed"]["data"] == serde_json::json!({"sessionId": sid}),
        "no closed notice after the delete: {}",
        report["closed"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sockets_in_one_session_get_the_same_events() -> Result<()> {
    if !available(Needs::SocketIo)? {
        return Ok(());
    }
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let report = run_node("socketio.mjs", &["room", server.base_url(), &sid]).await?;
    ensure!(
        report["transports"][1] == "websocket",
        "transports: {}",
        report["transports"]
    );
    let a = report["a"].as_array().context("a")?;
    ensure!(a.len() > 20, "too few events: {a:?}");
    ensure!(
        report["a"] == report["b"],
        "the two sockets differ:\n{report}"
    );
    ensure!(
        report["answerA"] == report["answerB"] && report["answerA"][0].is_string(),
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_with_after_misses_nothing() -> Result<()> {
    if !available(Needs::SocketIo)? {
        return Ok(());
    }
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let report = run_node("socketio.mjs", &["late", server.base_url(), &sid]).await?;
    ensure!(
        report["deltasBeforeLateJoin"].as_u64() >= Some(5),
        "{report}"
    );
    // b joined after five deltas had gone out, and still got the whole run from its start.
    ensure!(
        report["a"] == report["b"],
        "late joiner differs:\na={}\nb={}",
        report["a"],
        report["b"]
    );
    let first_seq = report["firstSeq"].as_u64().context("firstSeq")?;
    ensure!(
        report["b"][0][0].as_u64() == Some(first_seq),
        "b starts at {}",
        report["b"][0]
    );
    // c joined without `after`: it sees only what came after it joined (the rest of the run
    // and its end after the abort), in order and without gaps.
    let a = report["a"].as_array().context("a")?;
    let c = report["c"].as_array().context("c")?;
    ensure!(
        !c.is_empty() && c.len() < a.len(),
        "c got {} of {}",
        c.len(),
        a.len()
    );
    ensure!(a.ends_with(c), "c is not a tail of a:\na={a:?}\nc={c:?}");
    Ok(())
}

fn durable(dir: &Path) -> ServerOpts {
    ServerOpts::new()
        .without_workspace_flag()
        .arg("--workspace")
        .arg(dir.join("ws").display().to_string())
        .arg("--storage-type")
        .arg("sqlite")
        .arg("--storage-path")
        .arg(dir.join("sessions.db").display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_restores_a_stored_session() -> Result<()> {
    if !available(Needs::SocketIo)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let sid = {
        let server = Server::start(durable(dir.path())).await?;
        let sid = server.create_session().await?;
        server.query(&sid, "remember the tulips").await?;
        sid
    };
    let server = Server::start(durable(dir.path())).await?;
    let report = run_node("socketio.mjs", &["restore", server.base_url(), &sid]).await?;
    ensure!(report["joinStatus"]["state"] == "idle", "{report}");
    let history = &report["history"];
    let query = data_of(history, "query");
    ensure!(
        query.len() == 1 && query[0]["text"] == "remember the tulips",
        "history: {history}"
    );
    ensure!(
        data_of(history, "answer")[0]["text"] == "echo: remember the tulips",
        "{history}"
    );
    ensure!(
        history[0]["seq"] == 1,
        "history does not start at the first event: {history}"
    );
    // The restored session's new worker rebuilt the conversation from the log.
    ensure!(
        report["recall"][0]
            .as_str()
            .is_some_and(|t| t.contains("remember the tulips")),
        "recall: {}",
        report["recall"]
    );
    Ok(())
}

/// A WebSocket and a long-polling socket that stay quiet longer than the server's header-read
/// and idle timeouts are not cut: both are still connected and both receive the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sockets_outlive_the_connection_timeouts() -> Result<()> {
    if !available(Needs::SocketIo)? {
        return Ok(());
    }
    let config =
        serde_json::json!({"server": {"http": {"headerReadTimeoutSecs": 1, "idleTimeoutSecs": 2}}});
    let server =
        Server::start(ServerOpts::new().config_file("http.json", config.to_string())).await?;
    let sid = server.create_session().await?;
    let report = run_node("socketio.mjs", &["quiet", server.base_url(), &sid, "5000"]).await?;
    ensure!(
        report["transports"] == serde_json::json!(["websocket", "polling"]),
        "{report}"
    );
    ensure!(
        report["disconnects"] == serde_json::json!([]),
        "a socket was cut: {report}"
    );
    ensure!(
        report["connected"] == serde_json::json!([true, true]),
        "{report}"
    );
    let answer = serde_json::json!(["echo: after the pause"]);
    ensure!(
        report["answers"] == serde_json::json!([answer, answer]),
        "both sockets got the run: {report}"
    );
    Ok(())
}
