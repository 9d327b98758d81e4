//! The web UIs in headless Chromium (`tests/js/browser.mjs`): the official Tarko UI served from
//! `webui.staticPath`, and the built-in UI with its workers view. Each leaves screenshots in
//! `tests/artifacts/` (git-ignored) for a person to look at.

use anyhow::{Context, Result, ensure};
use e2e::clients::{Needs, arg, artifacts_dir, available, official_ui_dir, run_node};
use e2e::{LONG, Server, ServerOpts, event_types, free_port};
use serde_json::{Value, json};

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

/// `rgb(r, g, b)` as a relative luminance between 0 (black) and 1 (white).
fn luminance(colour: &Value) -> Result<f64> {
    let text = colour.as_str().context("colour")?;
    let inner = text
        .strip_prefix("rgb(")
        .or_else(|| text.strip_prefix("rgba("))
        .and_then(|t| t.strip_suffix(')'))
        .with_context(|| format!("not an rgb() colour: {text}"))?;
    let channels: Vec<f64> = inner
        .split(',')
        .take(3)
        .map(|c| c.trim().parse::<f64>())
        .collect::<Result<_, _>>()?;
    ensure!(channels.len() == 3, "{text}");
    Ok((0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]) / 255.0)
}

/// The built-in UI's states, each asserted (and left as a screenshot in `tests/artifacts/`):
/// Markdown rendered by a real renderer and sanitized, the system's dark scheme, a 390 px
/// phone, an unknown session in the URL, and the server going away: "disconnected" from the
/// end of the live stream (the page's clock is paused, so the 30 s health poll cannot be what
/// notices), and a failed send that keeps its text. The scenario kills the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_ui_states() -> Result<()> {
    if !available(Needs::Browser)? {
        return Ok(());
    }
    let server = Server::start_default().await?;
    let artifacts = artifacts_dir()?;
    let pid = server.pid().to_string();
    let report = run_node(
        "browser.mjs",
        &["builtin-states", server.base_url(), &arg(&artifacts)?, &pid],
    )
    .await?;
    ensure!(
        report["pageErrors"].as_array().is_some_and(Vec::is_empty),
        "{}",
        report["pageErrors"]
    );

    // Markdown: structure, links that open safely, code with a copy button, no script run.
    let md = &report["markdown"];
    ensure!(
        md["headings"] == json!([["H1", "Heading one"], ["H2", "Heading two"]]),
        "headings: {}",
        md["headings"]
    );
    ensure!(
        md["items"] == json!(["first item", "second item"])
            && md["steps"] == json!(["step one", "step two"]),
        "lists: {md}"
    );
    ensure!(
        md["cells"] == json!(["name", "value", "alpha", "1", "beta", "2"])
            && md["tableScrolls"] == 1,
        "table: {md}"
    );
    let links = md["links"].as_array().context("links")?;
    let docs = links
        .iter()
        .find(|l| l["text"] == "the docs")
        .context("no docs link")?;
    ensure!(
        docs["href"] == "https://example.com/docs"
            && docs["target"] == "_blank"
            && docs["rel"]
                .as_str()
                .is_some_and(|r| r.split(' ').any(|t| t == "noopener")),
        "docs link: {docs}"
    );
    ensure!(
        links.iter().all(|l| !l["href"]
            .as_str()
            .is_some_and(|h| h.trim().to_lowercase().starts_with("javascript:"))),
        "a javascript: link survived: {links:?}"
    );
    ensure!(
        md["code"] == json!([{"text": "const answer = 42;\n", "copy": true}]),
        "code: {}",
        md["code"]
    );
    ensure!(
        md["clipboard"].as_str().map(str::trim) == Some("const answer = 42;"),
        "copied: {}",
        md["clipboard"]
    );
    ensure!(
        md["images"] == json!([{"src": "x", "onerror": null}])
            && md["scripts"] == 0
            && md["pwned"] == false,
        "sanitizing: {md}"
    );

    // The system's dark scheme, and back.
    ensure!(
        luminance(&report["dark"]["body"])? < 0.15
            && luminance(&report["dark"]["bubble"])? < 0.2
            && luminance(&report["dark"]["text"])? > 0.7,
        "dark: {}",
        report["dark"]
    );
    ensure!(
        luminance(&report["light"]["body"])? > 0.85 && luminance(&report["light"]["text"])? < 0.2,
        "light: {}",
        report["light"]
    );

    // 390 px: nothing scrolls sideways, the composer fits, the session list folds away.
    for key in ["narrow", "narrowMenu", "narrowWorkers"] {
        let layout = &report[key];
        ensure!(
            layout["width"] == 390
                && layout["pageOverflow"].as_i64() == Some(0)
                && layout["messagesOverflow"].as_i64() == Some(0),
            "{key}: {layout}"
        );
    }
    let narrow = &report["narrow"];
    ensure!(
        narrow["promptRight"].as_i64().is_some_and(|r| r <= 390)
            && narrow["sendRight"].as_i64().is_some_and(|r| r <= 390)
            && narrow["sessionsShown"] == false
            && report["narrowMenu"]["sessionsShown"] == true,
        "narrow: {narrow} menu: {}",
        report["narrowMenu"]
    );

    // Nothing failed but what the unknown session had to.
    ensure!(
        report["apiErrorsBefore"].as_array().is_some_and(|e| e
            .iter()
            .all(|f| f == "404 GET /api/v1/sessions/workspace/files")),
        "{}",
        report["apiErrorsBefore"]
    );
    let missing = &report["missing"];
    ensure!(
        missing["heading"] == "Session not found"
            && missing["id"] == "NoSuchSession_0000000"
            && missing["chatHidden"] == true,
        "not found: {missing}"
    );
    ensure!(
        report["apiErrorsMissing"]
            .as_array()
            .is_some_and(|e| !e.is_empty()
                && e.iter().all(|f| f
                    .as_str()
                    .is_some_and(|f| f.starts_with("404 GET /api/v1/sessions/")))),
        "{}",
        report["apiErrorsMissing"]
    );

    // The server went away.
    ensure!(
        report["disconnected"]
            .as_str()
            .is_some_and(|t| t.starts_with("Disconnected")),
        "indicator: {}",
        report["disconnected"]
    );
    let failed = &report["failedSend"];
    ensure!(
        failed["prompt"] == "This text must survive a failed send"
            && failed["toast"]
                .as_str()
                .is_some_and(|t| t.starts_with("Failed to send"))
            && failed["sendShown"] == true,
        "failed send: {failed}"
    );
    ensure_screenshots(&[
        "builtin-markdown",
        "builtin-dark",
        "builtin-narrow",
        "builtin-narrow-menu",
        "builtin-not-found",
        "builtin-disconnected",
        "builtin-send-failed",
    ])
}
