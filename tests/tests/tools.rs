//! The built-in workspace tools through the real binary, driven by the offline echo model's
//! `TOOL <name> <json>` directive: files land in the session's own workspace, escapes are
//! refused with the spec's texts and leave the outside untouched, calls and results pair up,
//! `@file:` references become an `environment_input` event.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use e2e::{Server, event_types, types};
use serde_json::{Value, json};

/// The session's workspace directory on the host (`<root>/<sessionId>`); the server reports it
/// as the path inside the session's jail.
async fn workspace(server: &Server, sid: &str) -> Result<PathBuf> {
    let details = server.details(sid).await?;
    ensure!(details["workspace"] == "/workspace", "details: {details}");
    let ws = server.workspace_root().join(sid);
    ensure!(ws.is_dir(), "no workspace {ws:?}");
    Ok(ws)
}

/// Writes a file into a session's workspace the way the session itself would own it: the
/// worker runs as the session's uid in a strict or chroot jail, and the workspace is handed to
/// that uid when the worker starts, so the test starts it first and gives the file to the same
/// owner (a file written here as root would not be the session's to change).
async fn plant(server: &Server, sid: &str, rel: &str, content: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if server.worker_pid(sid).await?.is_none() {
        server.query(sid, "start the worker").await?;
    }
    let ws = workspace(server, sid).await?;
    let owner = std::fs::metadata(&ws)?;
    let path = ws.join(rel);
    let parent = path.parent().context("no parent")?;
    std::fs::create_dir_all(parent)?;
    std::fs::write(&path, content)?;
    let mut dir = parent.to_path_buf();
    while dir.starts_with(&ws) {
        std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid()))?;
        if !dir.pop() {
            break;
        }
    }
    std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))?;
    Ok(())
}

/// The session's workspace as its worker sees it: `/workspace` in a strict jail, `/` in a
/// chroot, the host path when unjailed.
async fn worker_view_of_workspace(server: &Server, sid: &str) -> Result<PathBuf> {
    let health = server.get_ok("/api/v1/system/health").await?;
    let level = health["isolation"]["level"]
        .as_str()
        .or_else(|| health["isolation"].as_str())
        .unwrap_or("none");
    Ok(match level {
        "strict" => PathBuf::from("/workspace"),
        "chroot" => PathBuf::from("/"),
        _ => workspace(server, sid).await?,
    })
}

/// The stored events of the session's last run (from its last `user_message`).
async fn last_run(server: &Server, sid: &str) -> Result<Vec<Value>> {
    let events = server.events(sid).await?;
    let start = events
        .iter()
        .rposition(|e| e["type"] == "user_message")
        .context("no user_message")?;
    Ok(events[start..].to_vec())
}

fn one<'a>(events: &'a [Value], ty: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = events.iter().filter(|e| e["type"] == ty).collect();
    ensure!(found.len() == 1, "expected one {ty}, got {}", found.len());
    Ok(found[0])
}

/// The text of a successful tool result (`[{type:"text", text}]` parts joined).
fn result_text(result: &Value) -> Result<String> {
    ensure!(result.get("error").is_none(), "tool failed: {result}");
    let parts = result["content"].as_array().context("content parts")?;
    Ok(parts
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Checks that the run made one call of `tool`, failed with `message`, and that the model saw it.
async fn expect_refusal(
    server: &Server,
    sid: &str,
    tool: &str,
    args: Value,
    message: &str,
) -> Result<()> {
    let answer = server.query(sid, &format!("TOOL {tool} {args}")).await?;
    let events = last_run(server, sid).await?;
    let result = one(&events, "tool_result")?;
    ensure!(result["name"] == tool, "tool_result: {result}");
    ensure!(result["error"] == message, "tool_result.error: {result}");
    ensure!(
        result["content"] == format!("Error: {message}"),
        "tool_result.content: {result}"
    );
    ensure!(
        answer["content"] == format!("tool said: Error: {message}"),
        "answer: {answer}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_back_in_a_later_turn() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let ws = workspace(&server, &sid).await?;

    let answer = server
        .query(
            &sid,
            r#"TOOL write_file {"path":"notes.txt","content":"hi"}"#,
        )
        .await?;
    ensure!(
        answer["content"] == "tool said: Successfully wrote 2 bytes to notes.txt",
        "answer: {answer}"
    );
    ensure!(
        std::fs::read_to_string(ws.join("notes.txt"))? == "hi",
        "notes.txt in the session workspace"
    );

    let answer = server
        .query(&sid, r#"TOOL read_file {"path":"notes.txt"}"#)
        .await?;
    ensure!(answer["content"] == "tool said: hi", "answer: {answer}");
    let events = last_run(&server, &sid).await?;
    ensure!(
        event_types(&events)
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "tool_call",
                "tool_result",
                "assistant_message",
                "agent_run_end"
            ],
        "events: {:?}",
        event_types(&events)
    );
    let call = one(&events, "tool_call")?;
    let result = one(&events, "tool_result")?;
    ensure!(
        result["content"] == json!([{"type": "text", "text": "hi"}]),
        "tool_result: {result}"
    );
    ensure!(call["arguments"] == json!({"path": "notes.txt"}), "{call}");
    ensure!(call["tool"]["name"] == "read_file", "{call}");
    ensure!(
        call["tool"]["schema"]["required"] == json!(["path"]),
        "{call}"
    );
    ensure!(
        call["tool"]["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty() && d != "Unknown tool"),
        "{call}"
    );

    // The first run's write is memory too: the second run's request held both rounds.
    let all = server.events(&sid).await?;
    ensure!(
        all.iter().filter(|e| e["type"] == "tool_result").count() == 2,
        "two tool results stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_and_result_pair_up_by_id_in_the_stream() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let ws = workspace(&server, &sid).await?;
    std::fs::create_dir(ws.join("src"))?;
    std::fs::write(ws.join("a.txt"), "a")?;

    let frames = server
        .stream_all(&sid, r#"TOOL list_directory {"path":"."}"#)
        .await?;
    let kinds: Vec<String> = types(&frames)
        .into_iter()
        .filter(|t| !t.starts_with("assistant_streaming"))
        .collect();
    ensure!(
        kinds
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "tool_call",
                "tool_result",
                "assistant_message",
                "agent_run_end"
            ],
        "frames: {kinds:?}"
    );
    let find = |ty: &str| {
        frames
            .iter()
            .find(|f| f.ty() == ty)
            .map(|f| f.data.clone())
            .with_context(|| format!("no {ty}"))
    };
    let message = find("assistant_message")?;
    let id = message["toolCalls"][0]["id"]
        .as_str()
        .context("toolCalls[0].id")?;
    ensure!(
        message["toolCalls"][0]["function"]["name"] == "list_directory",
        "{message}"
    );
    ensure!(message["finishReason"] == "tool_calls", "{message}");
    let call = find("tool_call")?;
    let result = find("tool_result")?;
    ensure!(
        call["toolCallId"] == id && result["toolCallId"] == id,
        "ids differ"
    );
    ensure!(call["startTime"].is_u64(), "{call}");
    ensure!(result["elapsedMs"].is_u64(), "{result}");
    ensure!(
        result_text(&result)? == "[FILE] a.txt\n[DIR] src",
        "tool_result: {result}"
    );
    for delta in frames
        .iter()
        .filter(|f| f.ty() == "assistant_streaming_tool_call")
    {
        ensure!(delta.data["toolCallId"] == id, "delta: {:?}", delta.data);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_are_refused_and_the_outside_is_untouched() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let ws = workspace(&server, &sid).await?;
    let outside = server.tmp_dir().join("outside");
    std::fs::create_dir_all(&outside)?;
    let victim = outside.join("victim.txt");
    std::fs::write(&victim, "original")?;
    let passwd_before = std::fs::read("/etc/passwd")?;
    std::os::unix::fs::symlink("/etc/passwd", ws.join("passwd"))?;
    std::os::unix::fs::symlink(&victim, ws.join("victim"))?;
    std::os::unix::fs::symlink(&outside, ws.join("outdir"))?;

    let outside_msg = |p: &str| format!("Path is outside the workspace: {p}");
    expect_refusal(
        &server,
        &sid,
        "read_file",
        json!({"path": "passwd"}),
        &outside_msg("passwd"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "read_file",
        json!({"path": "/etc/passwd"}),
        &outside_msg("/etc/passwd"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "read_file",
        json!({"path": "outdir/victim.txt"}),
        &outside_msg("outdir/victim.txt"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "write_file",
        json!({"path": "victim", "content": "pwned"}),
        &outside_msg("victim"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "write_file",
        json!({"path": "../escape.txt", "content": "pwned"}),
        &outside_msg("../escape.txt"),
    )
    .await?;
    let absolute = outside.join("new.txt");
    let absolute = absolute.to_str().context("utf-8 path")?;
    expect_refusal(
        &server,
        &sid,
        "write_file",
        json!({"path": absolute, "content": "pwned"}),
        &outside_msg(absolute),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "edit_file",
        json!({"path": "outdir/victim.txt", "edits": [{"oldText": "original", "newText": "pwned"}]}),
        &outside_msg("outdir/victim.txt"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "move_file",
        json!({"source": "outdir/victim.txt", "destination": "stolen.txt"}),
        &outside_msg("outdir/victim.txt"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "delete_file",
        json!({"path": "outdir/victim.txt"}),
        &outside_msg("outdir/victim.txt"),
    )
    .await?;
    expect_refusal(
        &server,
        &sid,
        "delete_file",
        json!({"path": ".", "recursive": true}),
        "Refusing to delete the workspace root",
    )
    .await?;

    ensure!(
        std::fs::read_to_string(&victim)? == "original",
        "victim changed"
    );
    ensure!(
        std::fs::read("/etc/passwd")? == passwd_before,
        "/etc/passwd changed"
    );
    ensure!(
        !server.workspace_root().join("escape.txt").exists(),
        "../ escaped"
    );
    ensure!(!outside.join("new.txt").exists(), "absolute path escaped");
    ensure!(!ws.join("stolen.txt").exists(), "moved from outside");
    // An absolute path inside the session's own workspace (as the worker sees it) is fine.
    let inside = ws.join("inside.txt");
    let seen = worker_view_of_workspace(&server, &sid)
        .await?
        .join("inside.txt");
    let answer = server
        .query(
            &sid,
            &format!("TOOL write_file {}", json!({"path": seen, "content": "in"})),
        )
        .await?;
    ensure!(
        answer["content"] == "tool said: Successfully wrote 2 bytes to inside.txt",
        "answer: {answer}"
    );
    ensure!(std::fs::read_to_string(&inside)? == "in", "inside.txt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cannot_reach_each_other() -> Result<()> {
    let server = Server::start_default().await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;
    let ws_a = workspace(&server, &a).await?;
    std::fs::write(ws_a.join("mine.txt"), "a's")?;
    expect_refusal(
        &server,
        &b,
        "read_file",
        json!({"path": format!("../{a}/mine.txt")}),
        &format!("Path is outside the workspace: ../{a}/mine.txt"),
    )
    .await?;
    let absolute = ws_a.join("mine.txt");
    let absolute = absolute.to_str().context("utf-8 path")?;
    expect_refusal(
        &server,
        &b,
        "read_file",
        json!({"path": absolute}),
        &format!("Path is outside the workspace: {absolute}"),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_search_and_grep() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let ws = workspace(&server, &sid).await?;
    plant(&server, &sid, "src/main.rs", "fn main() {\n    old();\n}\n").await?;
    plant(&server, &sid, "src/lib.rs", "pub fn lib() {}\n").await?;
    plant(&server, &sid, "README.md", "# main\n").await?;

    let args =
        json!({"path": "src/main.rs", "edits": [{"oldText": "old();", "newText": "new();"}]});
    server
        .query(&sid, &format!("TOOL edit_file {args}"))
        .await?;
    let events = last_run(&server, &sid).await?;
    let text = result_text(one(&events, "tool_result")?)?;
    ensure!(
        text == "```diff\n--- src/main.rs\n+++ src/main.rs\n@@ -1,3 +1,3 @@\n fn main() {\n-    old();\n+    new();\n }\n```\n\nApplied 1 edit(s) to src/main.rs",
        "edit_file result: {text}"
    );
    ensure!(
        std::fs::read_to_string(ws.join("src/main.rs"))? == "fn main() {\n    new();\n}\n",
        "edited file"
    );

    server
        .query(&sid, r#"TOOL search_files {"pattern":"*.rs"}"#)
        .await?;
    let events = last_run(&server, &sid).await?;
    let text = result_text(one(&events, "tool_result")?)?;
    ensure!(text == "src/lib.rs\nsrc/main.rs", "search_files: {text}");

    server
        .query(&sid, r#"TOOL search_files {"pattern":"MAIN"}"#)
        .await?;
    let events = last_run(&server, &sid).await?;
    let text = result_text(one(&events, "tool_result")?)?;
    ensure!(text == "src/main.rs", "search_files substring: {text}");

    server
        .query(
            &sid,
            r#"TOOL grep {"pattern":"fn \\w+\\(","include":"*.rs"}"#,
        )
        .await?;
    let events = last_run(&server, &sid).await?;
    let text = result_text(one(&events, "tool_result")?)?;
    ensure!(
        text == "src/lib.rs:1:pub fn lib() {}\nsrc/main.rs:1:fn main() {",
        "grep: {text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_references_become_environment_input() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let ws = workspace(&server, &sid).await?;
    std::fs::write(ws.join("notes.md"), "remember the milk\n")?;

    let query = "summarise @file:notes.md and @file:../secret please";
    let frames = server.stream_all(&sid, query).await?;
    let kinds = types(&frames);
    ensure!(
        kinds[..3] == ["user_message", "environment_input", "agent_run_start"],
        "frames: {kinds:?}"
    );
    ensure!(frames[0].data["content"] == query, "user_message unchanged");
    let env = &frames[1].data;
    ensure!(
        env["description"] == "Expanded context from contextual references",
        "{env}"
    );
    ensure!(env["metadata"] == json!({"type": "codebase"}), "{env}");
    ensure!(
        env["content"]
            == "<file path=\"notes.md\">\nremember the milk\n</file>\n\nError: Path is outside the workspace: ../secret",
        "{env}"
    );
    let start = &frames[2].data;
    ensure!(
        start["runOptions"]["environmentInput"]["content"] == env["content"],
        "runOptions.environmentInput: {start}"
    );
    ensure!(start["runOptions"]["input"] == query, "{start}");

    // Without references nothing is added.
    let frames = server.stream_all(&sid, "plain question").await?;
    ensure!(
        !types(&frames).iter().any(|t| t == "environment_input"),
        "no environment_input without references"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tools_and_malformed_arguments_are_answered() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let answer = server.query(&sid, "TOOL no_such_tool {}").await?;
    ensure!(
        answer["content"] == "tool said: Error: Tool \"no_such_tool\" not found",
        "{answer}"
    );
    let events = last_run(&server, &sid).await?;
    let call = one(&events, "tool_call")?;
    ensure!(call["tool"]["description"] == "Unknown tool", "{call}");
    ensure!(
        call["tool"]["schema"] == json!({"type": "object", "properties": {}}),
        "{call}"
    );
    let result = one(&events, "tool_result")?;
    ensure!(result["elapsedMs"] == 0, "{result}");
    ensure!(
        result["error"] == "Tool \"no_such_tool\" not found",
        "{result}"
    );

    server.query(&sid, "TOOL read_file {not json").await?;
    let events = last_run(&server, &sid).await?;
    let call = one(&events, "tool_call")?;
    ensure!(call["arguments"] == json!({}), "{call}");
    let result = one(&events, "tool_result")?;
    let error = result["error"].as_str().context("error")?;
    ensure!(
        error.starts_with("Invalid JSON in arguments for tool \"read_file\": "),
        "{result}"
    );

    server.query(&sid, r#"TOOL read_file {"file":"x"}"#).await?;
    let events = last_run(&server, &sid).await?;
    let result = one(&events, "tool_result")?;
    let error = result["error"].as_str().context("error")?;
    ensure!(
        error.starts_with("Invalid arguments for read_file: unknown field `file`"),
        "{result}"
    );
    Ok(())
}
