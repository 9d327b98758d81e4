//! Socket.IO (api.md §12) with the real npm `socket.io-client`: joining, queries, tool calls,
//! abort, several sockets in one session, a late joiner that asks for what it missed, a stored
//! session restored on join, and the seed's two examples as written. `agent-event` carries the
//! agent events themselves (with their `seq`). The client side is `tests/js/socketio.mjs`.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use e2e::clients::{Needs, available, run_node};
use e2e::{Server, ServerOpts};
use serde_json::{Value, json};

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

fn of_type<'a>(events: &'a Value, kind: &str) -> Vec<&'a Value> {
    events
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

/// Every `agent-event` of `run` is a stored event exactly as `/sessions/events` gives it (the
/// same fields, `seq` included): the agent events themselves, not a translation of them.
fn ensure_stored_as_sent(run: &Value, stored: &[Value]) -> Result<()> {
    let run = run.as_array().context("run events")?;
    for event in run {
        if shared::events::is_streaming_type(event["type"].as_str().unwrap_or_default()) {
            continue;
        }
        let seq = event["seq"]
            .as_u64()
            .with_context(|| format!("no seq: {event}"))?;
        let original = stored
            .iter()
            .find(|e| e["seq"] == seq)
            .with_context(|| format!("seq {seq} is not stored: {event}"))?;
        ensure!(
            original == event,
            "agent-event differs from the stored event:\nsent   {event}\nstored {original}"
        );
    }
    let seqs: Vec<u64> = run.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(
        seqs.len() == run.len() && seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs missing or out of order: {seqs:?}"
    );
    Ok(())
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
            == json!({"isExclusive": false, "runningSessionId": null, "canAcceptNewRequest": true}),
        "server-status: {}",
        report["serverStatus"]
    );
    ensure!(report["unknownJoin"] == "Session not found", "{report}");
    ensure!(
        report["joinStatus"] == json!({"isProcessing": false, "state": "idle"}),
        "join: {}",
        report["joinStatus"]
    );

    // A non-streaming query: its agent events, as stored, and no deltas.
    let query = &report["query"];
    ensure!(
        kinds(query)
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end"
            ],
        "query events: {:?}",
        kinds(query)
    );
    ensure!(
        of_type(query, "user_message")[0]["content"] == "hello socket",
        "{query}"
    );
    ensure!(
        of_type(query, "assistant_message")[0]["content"] == "echo: hello socket",
        "{query}"
    );
    let stored = server.events(&sid).await?;
    ensure_stored_as_sent(query, &stored)?;
    // agent-status announces the run's start and end.
    ensure!(
        report["queryStatuses"]
            == json!([
                {"isProcessing": true, "state": "executing"},
                {"isProcessing": false, "state": "idle"}
            ]),
        "statuses: {}",
        report["queryStatuses"]
    );

    // A streaming query with a tool call: the call, its result, deltas.
    let tool = &report["tool"];
    let call = of_type(tool, "tool_call")
        .first()
        .copied()
        .with_context(|| format!("no tool_call in {tool}"))?;
    ensure!(
        call["name"] == "write_file" && call["arguments"]["path"] == "socket.md",
        "{call}"
    );
    let result = of_type(tool, "tool_result")
        .first()
        .copied()
        .with_context(|| format!("no tool_result in {tool}"))?;
    ensure!(
        result["toolCallId"] == call["toolCallId"] && result["error"].is_null(),
        "{result}"
    );
    ensure!(
        !of_type(tool, "assistant_streaming_message").is_empty(),
        "a streaming query sent no deltas: {:?}",
        kinds(tool)
    );
    ensure_stored_as_sent(tool, &server.events(&sid).await?)?;
    let written = server.workspace_root().join(&sid).join("socket.md");
    ensure!(
        std::fs::read_to_string(&written).ok().as_deref() == Some("written over socket.io"),
        "{} was not written",
        written.display()
    );

    // Abort mid-stream.
    ensure!(
        report["abortResult"] == json!({"success": true}),
        "{report}"
    );
    let aborted = &report["aborted"];
    let end = of_type(aborted, "agent_run_end");
    ensure!(
        end.len() == 1 && end[0]["status"] == "aborted",
        "run end after abort: {end:?}"
    );
    ensure!(
        report["abortedStatuses"].as_array().and_then(|s| s.last())
            == Some(&json!({"isProcessing": false, "state": "aborted"})),
        "{}",
        report["abortedStatuses"]
    );
    ensure!(
        report["missingQuery"] == "Query is required",
        "{}",
        report["missingQuery"]
    );
    // An abort with nothing running says why it did nothing.
    let idle = &report["idleAbort"];
    ensure!(
        idle["success"] == false
            && idle["state"] == "aborted"
            && idle["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no query is running")),
        "{idle}"
    );
    ensure!(
        server.status(&sid).await?["state"] == "aborted",
        "status after abort"
    );

    // Deleting the session over HTTP tells the sockets in it.
    let report = run_node("socketio.mjs", &["closed", server.base_url(), &sid]).await?;
    ensure!(
        report["deleteStatus"] == 200
            && report["closed"] == json!({"type": "closed", "sessionId": sid}),
        "no closed notice after the delete: {}",
        report["closed"]
    );
    Ok(())
}

/// The seed's two Socket.IO examples, run as written (only the address and the session id
/// replaced) with the npm client: they emit `join-session` and `send-query` back to back before
/// the socket has even connected, and read `event.type === 'assistant_message'` and
/// `event.content` from `agent-event`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_examples_work_as_written() -> Result<()> {
    if !available(Needs::SocketIo)? {
        return Ok(());
    }
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let report = run_node("socketio.mjs", &["seed-events", server.base_url(), &sid]).await?;
    ensure!(
        report["labels"] == json!(["Agent event:"]),
        "{}",
        report["labels"]
    );
    let events = &report["events"];
    ensure!(
        kinds(events)
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end"
            ],
        "the example saw {:?}",
        kinds(events)
    );
    ensure!(
        of_type(events, "assistant_message")[0]["content"] == "echo: Hello agent",
        "{events}"
    );
    ensure_stored_as_sent(events, &server.events(&sid).await?)?;

    let sid = server.create_session().await?;
    let report = run_node("socketio.mjs", &["seed-client", server.base_url(), &sid]).await?;
    ensure!(
        report["logs"] == json!([["Agent response:", "echo: What can you help me with?"]]),
        "the example printed {}",
        report["logs"]
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
        report["answerA"] == report["answerB"] && report["answerA"] == json!([e2e::slow_text(20)]),
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
    let query = of_type(history, "user_message");
    ensure!(
        query.len() == 1 && query[0]["content"] == "remember the tulips",
        "history: {history}"
    );
    ensure!(
        of_type(history, "assistant_message")[0]["content"] == "echo: remember the tulips",
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
