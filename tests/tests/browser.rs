//! The web UIs in headless Chromium (`tests/js/browser.mjs`): the official Tarko UI served from
//! `webui.staticPath`, and the built-in UI with its workers view. Each leaves screenshots in
//! `tests/artifacts/` (git-ignored) for a person to look at.

use anyhow::{Context, Result, ensure};
use e2e::clients::{Needs, arg, artifacts_dir, available, official_ui_dir, run_node};
use e2e::{LONG, Server, ServerOpts, event_types, free_port};
use serde_json::Value;

/// The count of `kind` frames in one query stream the page read.
fn frames(streams: &Value, index: usize, kind: &str) -> u64 {
    streams[index][kind].as_u64().unwrap_or(0)
}

fn ensure_streamed(report: &Value) -> Result<()> {
    let streams = &report["streams"];
    ensure!(
        streams.as_array().map(Vec::len) == Some(2),
        "the page should have read two query streams: {streams}"
    );
    // The tool-call turn: the call streamed, run, answered with streamed text.
    for kind in ["tool_call", "tool_result", "agent_run_end"] {
        ensure!(frames(streams, 0, kind) == 1, "{kind} in {}", streams[0]);
    }
    ensure!(
        frames(streams, 0, "assistant_streaming_tool_call") > 1,
        "{}",
        streams[0]
    );
    ensure!(
        frames(streams, 1, "assistant_streaming_message") > 1,
        "the answer was not streamed: {}",
        streams[1]
    );
    ensure!(
        report["pageErrors"].as_array().is_some_and(Vec::is_empty),
        "{}",
        report["pageErrors"]
    );
    Ok(())
}

async fn ensure_history(server: &Server, sid: &str) -> Result<()> {
    let events = server.events(sid).await?;
    let types = event_types(&events);
    ensure!(
        types.iter().filter(|t| *t == "user_message").count() == 2
            && types.iter().filter(|t| *t == "agent_run_end").count() == 2
            && types.contains(&"tool_result".to_owned()),
        "stored: {types:?}"
    );
    let notes = server.workspace_root().join(sid).join("notes.md");
    ensure!(
        std::fs::read_to_string(&notes).ok().as_deref() == Some("# Notes\nhello from the agent"),
        "{} was not written",
        notes.display()
    );
    Ok(())
}

fn ensure_screenshots(names: &[&str]) -> Result<()> {
    let dir = artifacts_dir()?;
    for name in names {
        let path = dir.join(format!("{name}.png"));
        let size = std::fs::metadata(&path)
            .with_context(|| format!("no screenshot {}", path.display()))?
            .len();
        ensure!(size > 10_000, "{} is suspiciously small", path.display());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_ui_streams_tool_calls_keeps_history_and_replays() -> Result<()> {
    if !available(Needs::OfficialUi)? {
        return Ok(());
    }
    let server = Server::start(
        ServerOpts::new()
            .arg("--webui-static-path")
            .arg(arg(&official_ui_dir())?),
    )
    .await?;
    let artifacts = artifacts_dir()?;
    let report = run_node(
        "browser.mjs",
        &["official", server.base_url(), &arg(&artifacts)?],
    )
    .await?;
    ensure_streamed(&report)?;
    // Everything the UI asked for was there (no workspace search: the contextual selector is
    // off unless the UI config enables it).
    ensure!(
        report["apiErrors"].as_array().is_some_and(Vec::is_empty),
        "failed API calls: {}",
        report["apiErrors"]
    );
    ensure!(
        report["beforeReload"]["toolChip"].as_u64() >= Some(1)
            && report["beforeReload"]["fileView"].as_u64() >= Some(1),
        "{report}"
    );
    ensure!(
        report["afterReload"]["user"].as_u64() >= Some(1)
            && report["afterReload"]["toolChip"].as_u64() >= Some(1),
        "history after reload: {report}"
    );
    let sid = report["sessionId"].as_str().context("sessionId")?;
    ensure_history(&server, sid).await?;
    // The UI named the session from its first prompt.
    let name = server.details(sid).await?["metadata"]["name"].clone();
    ensure!(
        name.as_str()
            .is_some_and(|n| n.starts_with("TOOL write_file")),
        "name: {name}"
    );

    // The UI's share dialog downloaded the replay page; open it from the file.
    let download = &report["download"];
    ensure!(
        download["suggested"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("agent-tars-{sid}-")) && n.ends_with(".html")),
        "download: {download}"
    );
    let page = std::path::PathBuf::from(download["file"].as_str().context("file")?);
    let html = std::fs::read_to_string(&page)?;
    ensure!(
        html.contains("window.AGENT_REPLAY_MODE = true"),
        "no replay globals"
    );
    let replay = run_node(
        "browser.mjs",
        &[
            "replay",
            &arg(&page)?,
            &arg(&artifacts)?,
            "official-replay",
            "echo: Hello from Chromium",
            "Write File",
        ],
    )
    .await?;
    ensure!(
        replay["pageErrors"].as_array().is_some_and(Vec::is_empty),
        "{replay}"
    );
    ensure_screenshots(&["official-chat", "official-reload", "official-replay"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_ui_chat_history_sessions_share_and_workers() -> Result<()> {
    if !available(Needs::Browser)? {
        return Ok(());
    }
    let server = Server::start_default().await?;
    let artifacts = artifacts_dir()?;
    let report = run_node(
        "browser.mjs",
        &["builtin", server.base_url(), &arg(&artifacts)?],
    )
    .await?;
    ensure_streamed(&report)?;
    // The only calls allowed to fail are the workspace file listings, on a server without the
    // file API; the UI then says so.
    let failures = report["apiErrors"].as_array().context("apiErrors")?;
    ensure!(
        failures
            .iter()
            .all(|f| f == "404 GET /api/v1/sessions/workspace/files"),
        "failed API calls: {failures:?}"
    );
    if !failures.is_empty() {
        ensure!(
            report["filesNote"] == "This server has no workspace file API.",
            "{}",
            report["filesNote"]
        );
    }

    let sid = report["sessionId"].as_str().context("sessionId")?;
    ensure_history(&server, sid).await?;
    let after = &report["afterReload"];
    ensure!(
        after["user"] == 2 && after["tools"] == 1 && after["toolName"] == "write_file",
        "after reload: {after}"
    );
    ensure!(
        server.details(sid).await?["metadata"]["name"] == "Renamed by Chromium",
        "rename did not reach the server"
    );
    let deleted = report["deleted"].as_str().context("deleted")?;
    ensure!(
        server
            .get(&format!("/api/v1/sessions/details?sessionId={deleted}"))
            .await?
            .status
            == 404,
        "the deleted session still exists"
    );

    let replay = &report["replay"];
    ensure!(
        replay["title"] == "Renamed by Chromium"
            && replay["tools"] == 1
            && replay["composerHidden"] == true,
        "replay: {replay}"
    );
    ensure!(
        replay["requests"].as_array().is_some_and(Vec::is_empty),
        "the replay page called out: {}",
        replay["requests"]
    );

    let worker = &report["worker"];
    ensure!(
        worker["pidBefore"] != worker["pidAfterRestart"] && worker["rowsAfterStop"] == 0,
        "workers: {worker}"
    );
    ensure!(
        worker["rss"]
            .as_str()
            .is_some_and(|r| r.ends_with("MiB") || r.ends_with("KiB")),
        "memory: {worker}"
    );
    ensure!(
        worker["cards"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c.as_str().is_some_and(|c| c.starts_with("Isolation")))),
        "{worker}"
    );
    // The restarted-then-stopped session still answers, and remembers.
    let recall = server.query(sid, "RECALL").await?;
    ensure!(
        recall["content"]
            .as_str()
            .is_some_and(|c| c.contains("Hello from Chromium")),
        "recall: {recall}"
    );
    ensure_screenshots(&[
        "builtin-chat",
        "builtin-reload",
        "builtin-replay",
        "builtin-workers",
    ])
}

/// The official UI streams an answer; the server dies (`kill -9`) in the middle and a new one
/// takes over the store and the port; reloaded, the page shows the partial answer once (the
/// stored `assistant_message` carries the deltas' `messageId`), with the error that says why it
/// stops there. The official UI has no mark of its own for `finishReason: "interrupted"`: that
/// error message is what marks the answer as cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_ui_shows_an_answer_cut_by_kill9_once_after_reload() -> Result<()> {
    if !available(Needs::OfficialUi)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?.to_string();
    let opts = || -> Result<ServerOpts> {
        Ok(ServerOpts::new()
            .without_port_flag()
            .without_workspace_flag()
            .arg("--port")
            .arg(port.as_str())
            .arg("--webui-static-path")
            .arg(arg(&official_ui_dir())?)
            .arg("--workspace")
            .arg(arg(&dir.path().join("ws"))?)
            .arg("--storage-type")
            .arg("sqlite")
            .arg("--storage-path")
            .arg(arg(&dir.path().join("sessions.db"))?))
    };
    let mut first = Server::start(opts()?).await?;
    let script_args = [
        "interrupted".to_owned(),
        first.base_url().to_owned(),
        arg(&artifacts_dir()?)?,
        first.pid().to_string(),
    ];
    let page = tokio::spawn(async move {
        let args: Vec<&str> = script_args.iter().map(String::as_str).collect();
        run_node("browser.mjs", &args).await
    });
    // The page kills the server once it shows part of the answer.
    first
        .wait_exit(e2e::clients::SCRIPT_TIMEOUT)
        .await
        .context("the page never killed the server")?;
    drop(first);
    let second = Server::start(opts()?).await?;
    let report = page.await??;
    ensure!(
        report["pageErrors"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );
    let before = report["before"]["text"].as_str().unwrap_or_default();
    let after = &report["after"];
    ensure!(
        before.split(' ').count() >= 13,
        "the page showed {before:?} before the crash"
    );
    ensure!(
        after["occurrences"] == 1,
        "the answer is shown {} times after reload: {report}",
        after["occurrences"]
    );
    let shown = after["text"].as_str().unwrap_or_default();
    ensure!(
        shown.starts_with(before),
        "shown before {before:?}, after {shown:?}"
    );
    ensure!(report["notes"].as_u64() >= Some(1), "{report}");
    let sid = report["sessionId"].as_str().context("sessionId")?;
    let events = second.events(sid).await?;
    let answer = events
        .iter()
        .find(|e| e["type"] == "assistant_message")
        .context("no stored answer")?;
    ensure!(
        answer["finishReason"] == "interrupted" && answer["content"] == shown,
        "stored {answer}, shown {shown:?}"
    );
    ensure!(
        tokio::time::timeout(LONG, second.status(sid)).await??["isProcessing"] == false,
        "the run is over"
    );
    ensure_screenshots(&["official-interrupted"])
}
