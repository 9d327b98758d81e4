//! The README's curl walk-through, run as a reader runs it: its `bash` blocks are read from
//! README.md when the test runs (so the two cannot drift apart), and each step is run in order
//! with bash and curl against the real binary. Only what the README tells the reader to change
//! is changed: the server's address (the test server listens on a free port, not 3000) and the
//! session id on the `S=…   # the id you got` line. Every answer's shape is then checked.
//!
//! A step is a paragraph of a block (commands separated by blank lines). Each runs in its own
//! `bash -c`, with the variables earlier steps set (`S`), as if typed into one terminal. The
//! follow streams stay open by design; like a reader, the test watches them until they have
//! replayed the session's history, then presses Ctrl-C (SIGINT to their process group).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::Server;
use e2e::sse::{self, Block};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The address the README uses; the test's server has its own port.
const README_ADDRESS: &str = "127.0.0.1:3000";
/// The step that sets the session id, as the README writes it.
const ID_LINE_PREFIX: &str = "S=";
const ID_LINE_NOTE: &str = "# the id you got";
/// Generous bound for one step, only so that a broken server cannot hang the test.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// One paragraph of a walk-through block.
#[derive(Debug)]
struct Step {
    /// The paragraph as written.
    script: String,
    /// `METHOD /path` of each curl command in it, in order.
    routes: Vec<String>,
}

fn readme_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")
}

/// The `bash` blocks of the "Walk-through with curl" section (up to the next `## ` heading),
/// split into paragraphs; a paragraph of comments only is no step.
fn walkthrough(readme: &str) -> Result<Vec<Step>> {
    let start = readme
        .find("\n## Walk-through with curl")
        .context("README.md has no \"## Walk-through with curl\" section")?;
    let section = &readme[start + 1..];
    let section = section.find("\n## ").map_or(section, |end| &section[..end]);
    let mut steps = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```bash\n") {
        let body = &rest[open + "```bash\n".len()..];
        let close = body.find("\n```").context("unclosed ```bash block")?;
        for paragraph in body[..close].split("\n\n") {
            let commands = commands(paragraph);
            if commands.is_empty() {
                continue;
            }
            steps.push(Step {
                script: paragraph.trim().to_owned(),
                routes: commands.iter().filter_map(|c| route(c)).collect(),
            });
        }
        rest = &body[close + 4..];
    }
    ensure!(!steps.is_empty(), "the walk-through has no bash blocks");
    Ok(steps)
}

/// The logical command lines of a paragraph: continuations joined, comments left out.
fn commands(paragraph: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in paragraph.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// `METHOD /path` of a curl command.
fn route(command: &str) -> Option<String> {
    if !command.starts_with("curl ") {
        return None;
    }
    let at = command.find(&format!("http://{README_ADDRESS}"))?;
    let path: String = command[at + "http://".len() + README_ADDRESS.len()..]
        .chars()
        .take_while(|c| !matches!(c, '"' | '\'' | '?') && !c.is_whitespace())
        .collect();
    let method = if command.contains("-X POST") {
        "POST"
    } else {
        "GET"
    };
    Some(format!("{method} {path}"))
}

/// The step as it is run: the server's address instead of the README's, and the session id
/// on the line that says to put it there.
fn prepared(script: &str, address: &str, session: Option<&str>) -> Result<String> {
    let mut lines = Vec::new();
    for line in script.replace(README_ADDRESS, address).lines() {
        if line.starts_with(ID_LINE_PREFIX) && line.contains(ID_LINE_NOTE) {
            let id = session.context("the walk-through sets S before creating a session")?;
            lines.push(format!("{ID_LINE_PREFIX}{id}   {ID_LINE_NOTE}"));
        } else {
            lines.push(line.to_owned());
        }
    }
    Ok(lines.join("\n"))
}

/// `NAME=value` lines of a script: a terminal keeps them for the commands after it.
fn assignments(script: &str) -> Vec<String> {
    script
        .lines()
        .filter(|l| {
            l.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
        .map(str::to_owned)
        .collect()
}

/// A `bash -c` of `script` in its own process group, with a bare environment: no proxy
/// variables, and a HOME without a `.curlrc`.
fn shell(script: &str, home: &Path) -> Result<tokio::process::Child> {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .current_dir(home)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command.spawn().context("spawn bash (is bash installed?)")
}

/// Runs a step to its end; its stdout. A non-zero exit (curl could not connect, ...) fails.
async fn run(script: &str, home: &Path) -> Result<String> {
    let child = shell(script, home)?;
    let output = tokio::time::timeout(STEP_LIMIT, child.wait_with_output())
        .await
        .with_context(|| format!("the step did not end within {STEP_LIMIT:?}:\n{script}"))??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "the step failed ({}):\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// Runs a step that does not end by itself (a follow stream) until `enough` holds for what it
/// printed, then interrupts it as Ctrl-C would; what it printed.
async fn run_until(script: &str, home: &Path, enough: impl Fn(&str) -> bool) -> Result<String> {
    let mut child = shell(script, home)?;
    let pid = child.id().context("bash has no pid")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut printed = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            let n = stdout.read(&mut chunk).await?;
            if n == 0 {
                bail!(
                    "the stream ended by itself:\n{}",
                    String::from_utf8_lossy(&printed)
                );
            }
            printed.extend_from_slice(&chunk[..n]);
            if enough(&String::from_utf8_lossy(&printed)) {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(STEP_LIMIT, read)
        .await
        .with_context(|| format!("the step did not print what was expected:\n{script}"))??;
    let group = i32::try_from(pid).context("pid")?;
    killpg(Pid::from_raw(group), Signal::SIGINT).context("interrupt the step")?;
    tokio::time::timeout(STEP_LIMIT, child.wait())
        .await
        .context("the step did not stop on SIGINT")??;
    Ok(String::from_utf8_lossy(&printed).into_owned())
}

// ------------------------------------------------------------------------------------------------
// What each step prints
// ------------------------------------------------------------------------------------------------

/// Concatenated JSON documents (`curl -s` prints no newline after each).
fn json_documents(text: &str) -> Result<Vec<Value>> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .with_context(|| format!("not JSON: {text}"))
}

fn one_json(text: &str) -> Result<Value> {
    let mut documents = json_documents(text)?;
    ensure!(documents.len() == 1, "expected one JSON document: {text}");
    Ok(documents.remove(0))
}

/// A query stream: each event a `data:` block followed by an `id:` block with its seq.
fn query_stream(text: &str) -> Result<Vec<(u64, Value)>> {
    let mut events = Vec::new();
    let mut pending: Option<Value> = None;
    for block in sse::parse_body(text) {
        match block? {
            Block::Data { id: None, data } => {
                ensure!(pending.is_none(), "two data blocks without an id: {data}");
                pending =
                    Some(serde_json::from_str(data).with_context(|| format!("data: {data}"))?);
            }
            Block::Id(id) => {
                let event = pending
                    .take()
                    .with_context(|| format!("an id block without data: {id}"))?;
                events.push((id, event));
            }
            Block::Comment => {}
            other => bail!("not an SSE block of a query stream: {other:?}"),
        }
    }
    ensure!(pending.is_none(), "the last event has no id");
    Ok(events)
}

/// A follow stream: `id:` and `data:` in one block per event.
fn follow_stream(text: &str) -> Result<Vec<(u64, Value)>> {
    let mut events = Vec::new();
    for block in sse::parse_body(text) {
        match block? {
            Block::Data {
                id: Some(seq),
                data,
            } => events.push((seq, serde_json::from_str(data)?)),
            Block::Comment => {}
            other => bail!("not an `id:` + `data:` block: {other:?}"),
        }
    }
    Ok(events)
}

fn types(events: &[(u64, Value)]) -> Vec<&str> {
    events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap_or_default())
        .collect()
}

fn deltas(events: &[(u64, Value)]) -> String {
    events
        .iter()
        .filter(|(_, e)| e["type"] == "assistant_streaming_message")
        .filter_map(|(_, e)| e["content"].as_str())
        .collect()
}

fn ensure_increasing(events: &[(u64, Value)]) -> Result<()> {
    ensure!(
        events.windows(2).all(|w| w[0].0 < w[1].0),
        "seqs are not increasing: {:?}",
        events.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    Ok(())
}

/// An answer as the README shows it: the final `assistant_message` event, with no empty
/// `rawContent` beside its content.
fn ensure_answer(result: &Value, content: &str) -> Result<()> {
    ensure!(
        result["type"] == "assistant_message"
            && result["content"] == content
            && result["finishReason"] == "stop"
            && result["id"].is_string()
            && result["messageId"].is_string(),
        "answer: {result}"
    );
    ensure!(
        result.get("rawContent").is_none(),
        "an empty rawContent beside the answer: {result}"
    );
    Ok(())
}

/// What the walk-through has done so far.
struct Walk<'a> {
    server: &'a Server,
    session: Option<String>,
}

impl Walk<'_> {
    fn session(&self) -> Result<&str> {
        self.session.as_deref().context("no session yet")
    }

    async fn last_stored_seq(&self) -> Result<u64> {
        let events = self.server.events(self.session()?).await?;
        events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .context("no stored events")
    }
}

async fn check(walk: &mut Walk<'_>, routes: &[&str], out: &str) -> Result<()> {
    match routes {
        ["POST /api/v1/sessions/create"] => {
            let created = one_json(out)?;
            let id = created["sessionId"].as_str().context("sessionId")?;
            ensure!(
                e2e::is_session_id(id)
                    && created["session"]["id"] == id
                    && created["events"] == json!([]),
                "create: {created}"
            );
            walk.session = Some(id.to_owned());
        }
        [] => ensure!(out.is_empty(), "an assignment printed {out:?}"),
        ["POST /api/v1/sessions/query"] => {
            ensure_answer(&one_json(out)?["result"], "echo: Hello!")?;
        }
        ["POST /api/v1/sessions/query/stream"] => {
            let events = query_stream(out)?;
            ensure_increasing(&events)?;
            let kinds = types(&events);
            ensure!(
                kinds.first() == Some(&"user_message")
                    && kinds.last() == Some(&"agent_run_end")
                    && kinds.contains(&"assistant_streaming_message"),
                "stream: {kinds:?}"
            );
            ensure!(events[0].1["content"] == "Tell me more", "{}", events[0].1);
            let (_, answer) = events
                .iter()
                .rfind(|(_, e)| e["type"] == "assistant_message")
                .context("no assistant_message")?;
            ensure_answer(answer, "echo: Tell me more")?;
            ensure!(deltas(&events) == "echo: Tell me more", "{kinds:?}");
            ensure!(events.last().map(|(_, e)| &e["status"]) == Some(&json!("idle")));
        }
        [
            "POST /api/v1/sessions/query/stream",
            "POST /api/v1/sessions/abort",
        ] => {
            // Both commands write to the terminal; the abort's answer lands somewhere in the
            // stream's output, as one write.
            let answer = r#"{"success":true}"#;
            ensure!(
                out.matches(answer).count() == 1,
                "the abort did not answer {answer}: {out}"
            );
            let events = query_stream(&out.replacen(answer, "", 1))?;
            ensure_increasing(&events)?;
            let streamed = deltas(&events);
            let words = streamed.split_whitespace().count();
            ensure!(
                words > 0 && words < 600,
                "{words} of the 600 words were streamed"
            );
            let messages: Vec<&Value> = events
                .iter()
                .filter(|(_, e)| e["type"] == "assistant_message")
                .map(|(_, e)| e)
                .collect();
            ensure!(
                messages.len() == 2
                    && messages[0]["content"] == streamed.as_str()
                    && messages[1]["content"] == "Request was aborted"
                    && messages.iter().all(|m| m["finishReason"] == "abort"),
                "the aborted run's answers: {messages:?}"
            );
            let (_, end) = events.last().context("no events")?;
            ensure!(
                end["type"] == "agent_run_end" && end["status"] == "aborted",
                "{end}"
            );
        }
        ["POST /api/v1/sessions/abort"] => {
            let answer = one_json(out)?;
            ensure!(
                answer["success"] == false
                    && answer["state"] == "aborted"
                    && answer["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("no query is running")),
                "an abort with nothing running: {answer}"
            );
        }
        [
            "GET /api/v1/sessions/events",
            "GET /api/v1/sessions/status",
            "POST /api/v1/sessions/update",
        ] => {
            let documents = json_documents(out)?;
            ensure!(documents.len() == 3, "{out}");
            let events = documents[0]["events"].as_array().context("events")?;
            let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            ensure!(
                kinds.iter().filter(|k| **k == "user_message").count() == 3
                    && kinds.iter().filter(|k| **k == "agent_run_end").count() == 3
                    && !kinds.contains(&"assistant_streaming_message")
                    && events.iter().all(|e| e["seq"].is_u64()),
                "history: {kinds:?}"
            );
            ensure!(
                documents[1]
                    == json!({"sessionId": walk.session()?, "status": {"isProcessing": false, "state": "aborted"}}),
                "status: {}",
                documents[1]
            );
            let metadata = &documents[2]["session"]["metadata"];
            ensure!(
                metadata["name"] == "Greeting" && metadata["tags"] == json!(["demo"]),
                "update: {}",
                documents[2]
            );
        }
        ["GET /api/v1/sessions/events"] => {
            let page = one_json(out)?;
            let events = page["events"].as_array().context("events")?;
            ensure!(
                events.first().map(|e| &e["seq"]) == Some(&json!(1))
                    && events.last().and_then(|e| e["seq"].as_u64())
                        == Some(walk.last_stored_seq().await?),
                "page: {page}"
            );
        }
        ["POST /api/v1/oneshot/query"] => {
            let answer = one_json(out)?;
            ensure!(
                answer["sessionId"].as_str().is_some_and(e2e::is_session_id),
                "{answer}"
            );
            ensure!(answer["sessionId"] != walk.session()?, "{answer}");
            ensure_answer(&answer["result"], "echo: Quick question")?;
        }
        ["GET /api/v1/system/health", "GET /api/v1/workers"] => {
            let documents = json_documents(out)?;
            ensure!(documents.len() == 2, "{out}");
            ensure!(
                documents[0]["status"] == "healthy" && documents[0]["isolation"].is_object(),
                "health: {}",
                documents[0]
            );
            let workers = documents[1]["workers"].as_array().context("workers")?;
            let session = walk.session()?;
            ensure!(
                workers.iter().any(|w| w["sessionId"] == session),
                "the session's worker is not listed: {}",
                documents[1]
            );
        }
        ["POST /api/v1/sessions/delete"] => {
            ensure!(one_json(out)? == json!({"success": true}), "delete: {out}");
            let gone = walk
                .server
                .get(&format!(
                    "/api/v1/sessions/details?sessionId={}",
                    walk.session()?
                ))
                .await?;
            gone.expect_error(404, "SESSION_NOT_FOUND", "the deleted session")?;
        }
        other => bail!(
            "the walk-through has a step this test does not know ({other:?}); add its check \
             to tests/tests/readme.rs"
        ),
    }
    Ok(())
}

/// A follow stream as printed, up to the session's latest stored event: everything after
/// seq 7, in order, every stored event among it exactly as stored.
async fn check_follow(walk: &Walk<'_>, out: &str) -> Result<()> {
    let events = follow_stream(out)?;
    ensure_increasing(&events)?;
    ensure!(
        events.first().is_some_and(|(seq, _)| *seq > 7),
        "the replay does not start after seq 7: {:?}",
        types(&events)
    );
    let stored = walk.server.events(walk.session()?).await?;
    for original in stored.iter().filter(|e| e["seq"].as_u64() > Some(7)) {
        let (_, event) = events
            .iter()
            .find(|(seq, _)| original["seq"] == *seq)
            .with_context(|| format!("the follow stream skipped {original}"))?;
        let mut original = original.clone();
        if let Some(fields) = original.as_object_mut() {
            fields.remove("seq");
        }
        ensure!(&original == event, "differs from storage: {event}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walk_through_works_as_written() -> Result<()> {
    let readme = std::fs::read_to_string(readme_path()).context("read README.md")?;
    let steps = walkthrough(&readme)?;
    for step in &steps {
        ensure!(
            !step.script.contains("localhost"),
            "the walk-through names a server other than {README_ADDRESS}:\n{}",
            step.script
        );
    }
    ensure!(
        steps
            .iter()
            .flat_map(|s| s.script.lines())
            .filter(|l| l.starts_with(ID_LINE_PREFIX) && l.contains(ID_LINE_NOTE))
            .count()
            == 1,
        "the walk-through should set S once, on a line saying {ID_LINE_NOTE:?}"
    );

    let server = Server::start_default().await?;
    let address = server
        .base_url()
        .strip_prefix("http://")
        .context("base url")?
        .to_owned();
    let home = tempfile::tempdir()?;
    let mut walk = Walk {
        server: &server,
        session: None,
    };
    let mut terminal: Vec<String> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let script = prepared(&step.script, &address, walk.session.as_deref())?;
        let full = terminal
            .iter()
            .cloned()
            .chain([script.clone()])
            .collect::<Vec<_>>()
            .join("\n");
        let routes: Vec<&str> = step.routes.iter().map(String::as_str).collect();
        let result = if routes == ["GET /api/v1/sessions/events/stream"] {
            let latest = walk.last_stored_seq().await?;
            let out = run_until(&full, home.path(), |printed| {
                follow_stream(printed)
                    .is_ok_and(|events| events.last().is_some_and(|(seq, _)| *seq >= latest))
            })
            .await?;
            check_follow(&walk, &out).await
        } else {
            let out = run(&full, home.path()).await?;
            check(&mut walk, &routes, &out).await
        };
        result.with_context(|| format!("walk-through step {} ({routes:?}):\n{script}", n + 1))?;
        terminal.extend(assignments(&script));
    }
    ensure!(
        steps.len() == 13,
        "the walk-through has {} steps; this test was written for 13 (check them all)",
        steps.len()
    );
    Ok(())
}

#[test]
fn steps_are_read_as_a_reader_reads_them() -> Result<()> {
    let readme = "# x\n\n## Walk-through with curl\n\n```bash\n# one\ncurl -s -X POST \
                  http://127.0.0.1:3000/api/v1/a \\\n  -d '{}'\n\nS=abc   # the id you got\n\n\
                  # comments only\n```\n\ntext\n\n```bash\ncurl -s \
                  \"http://127.0.0.1:3000/api/v1/b?x=1\"\ncurl -sN \
                  http://127.0.0.1:3000/api/v1/c &\nwait\n```\n\n## Next\n\n```bash\ncurl \
                  http://127.0.0.1:3000/api/v1/ignored\n```\n";
    let steps = walkthrough(readme)?;
    let routes: Vec<Vec<String>> = steps.iter().map(|s| s.routes.clone()).collect();
    ensure!(
        routes
            == [
                vec!["POST /api/v1/a".to_owned()],
                vec![],
                vec!["GET /api/v1/b".to_owned(), "GET /api/v1/c".to_owned()],
            ],
        "{routes:?}"
    );
    let script = prepared(&steps[1].script, "127.0.0.1:4321", Some("ID"))?;
    ensure!(script == "S=ID   # the id you got", "{script}");
    ensure!(assignments(&script) == std::slice::from_ref(&script));
    let script = prepared(&steps[0].script, "127.0.0.1:4321", None)?;
    ensure!(
        script.contains("http://127.0.0.1:4321/api/v1/a"),
        "{script}"
    );
    Ok(())
}
