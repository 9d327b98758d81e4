//! `run_command` through the real binary at `strict` (root mode, per-session uids) with
//! `isolation.commands = true`, driven by the echo model's `TOOL run_command {...}` directive:
//! output and exit codes, the output cap, the configured timeout, abort (the process group and
//! `setsid` daemons die, the worker lives on), orphans reaped by the worker as PID 1, daemons
//! gone after session delete, the memory-limit hint, T09 and T23 through the tool, and the tool
//! being unknown wherever commands are off.
//!
//! Process checks look at the host: the session's launcher, its descendants and its cgroup
//! members (`isolation_support::session_processes`), and every process of the session's uid.

mod isolation_support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, pid_alive, types, wait_until};
use isolation_support::{Mode, T, jail, processes_of_uid, session, session_processes, skip};
use serde_json::{Value, json};

/// A strict server with commands on and no probe server (the agent talks to the supervisor
/// directly, as in production); `extra` is merged into the isolation config.
async fn start(extra: Value) -> Result<Server> {
    start_in(Mode::Root, extra).await
}

/// The same in `mode` (`Root` or `Rootless`).
async fn start_in(mode: Mode, extra: Value) -> Result<Server> {
    let mut config = json!({"isolation": {"test": {"probeServer": false}}});
    merge(&mut config, &extra);
    isolation_support::start_with(mode, config).await
}

fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
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

/// Runs one `run_command` call with `args` and returns its `tool_result` event.
async fn run(server: &Server, sid: &str, args: Value) -> Result<Value> {
    server
        .query(sid, &format!("TOOL run_command {args}"))
        .await?;
    let events = last_run(server, sid).await?;
    let call = events
        .iter()
        .find(|e| e["type"] == "tool_call")
        .with_context(|| format!("no tool_call: {events:?}"))?;
    ensure!(
        call["name"] == "run_command" && call["tool"]["description"] != "Unknown tool",
        "run_command is not offered: {call}"
    );
    events
        .iter()
        .find(|e| e["type"] == "tool_result")
        .cloned()
        .with_context(|| format!("no tool_result: {events:?}"))
}

/// The text of the part named `name` in a successful result.
fn part<'a>(result: &'a Value, name: &str) -> Option<&'a str> {
    result["content"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["text"].as_str())
}

/// The session's processes on the host other than its launcher and worker.
async fn extra_processes(server: &Server, sid: &str) -> Result<Vec<u32>> {
    let (_, launcher) = jail(server, sid).await?;
    let worker = worker_host_pid(launcher)?;
    Ok(session_processes(server, sid)
        .await?
        .into_iter()
        .filter(|p| *p != launcher && *p != worker)
        .collect())
}

/// `(pid, ppid, state)` of every host process.
fn process_table() -> Vec<(u32, u32, char)> {
    let mut table = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) {
            table.push((pid, ppid, state));
        }
    }
    table
}

/// The worker: the launcher's only child (PID 1 of the session's namespace).
fn worker_host_pid(launcher: u32) -> Result<u32> {
    process_table()
        .into_iter()
        .find(|(_, ppid, state)| *ppid == launcher && *state != 'Z')
        .map(|(pid, _, _)| pid)
        .with_context(|| format!("launcher {launcher} has no worker"))
}

/// Zombies whose parent is the session's worker.
async fn zombies(server: &Server, sid: &str) -> Result<Vec<u32>> {
    let (_, launcher) = jail(server, sid).await?;
    let worker = worker_host_pid(launcher)?;
    Ok(process_table()
        .into_iter()
        .filter(|(_, ppid, state)| *ppid == worker && *state == 'Z')
        .map(|(pid, _, _)| pid)
        .collect())
}

/// The command lines of `pids`.
fn describe(pids: &[u32]) -> Vec<String> {
    pids.iter()
        .map(|p| {
            let raw = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .collect()
}

/// The host uid of a session: root mode chowns its workspace to it.
fn session_uid(server: &Server, sid: &str) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(server.workspace_root().join(sid))?.uid())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_exit_codes_and_the_jail_around_the_command() -> Result<()> {
    let server = start(json!({})).await?;
    let sid = session(&server).await?;

    let answer = server
        .query(
            &sid,
            r#"TOOL run_command {"command":"echo hi; echo err >&2"}"#,
        )
        .await?;
    ensure!(
        answer["content"]
            .as_str()
            .is_some_and(|a| a.starts_with("tool said: STDOUT:") && a.contains("hi")),
        "the model saw the output: {answer}"
    );
    let events = last_run(&server, &sid).await?;
    let result = events
        .iter()
        .find(|e| e["type"] == "tool_result")
        .context("tool_result")?;
    ensure!(
        result["content"]
            == json!([
                {"type": "text", "name": "STDOUT", "text": "hi\n"},
                {"type": "text", "name": "STDERR", "text": "err\n"},
            ])
            && result.get("error").is_none(),
        "echo: {result}"
    );

    // A failing command is not a tool error: the ERROR part says how it ended.
    let result = run(
        &server,
        &sid,
        json!({"command": "echo partial; ls /nonexistent; exit 3"}),
    )
    .await?;
    ensure!(result.get("error").is_none(), "exit 3: {result}");
    ensure!(part(&result, "STDOUT") == Some("partial\n"), "{result}");
    ensure!(
        part(&result, "STDERR").is_some_and(|e| e.contains("nonexistent")),
        "{result}"
    );
    ensure!(
        part(&result, "ERROR") == Some("Command exited with code 3"),
        "{result}"
    );
    let result = run(&server, &sid, json!({"command": "true"})).await?;
    ensure!(
        result["content"] == json!([{"type": "text", "text": "(no output)"}]),
        "{result}"
    );

    // Where it runs: /workspace (or a subdirectory), the L2 environment plus TERM, its own
    // session, a read-only system, the session's uid on the host.
    let ws = server.workspace_root().join(&sid);
    let result = run(
        &server,
        &sid,
        json!({"command": "mkdir -p sub && cd sub && echo made > made.txt && pwd"}),
    )
    .await?;
    ensure!(
        part(&result, "STDOUT") == Some("/workspace/sub\n"),
        "{result}"
    );
    let made = ws.join("sub/made.txt");
    ensure!(std::fs::read_to_string(&made)? == "made\n", "made.txt");
    {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(&made)?.uid();
        ensure!(
            uid == session_uid(&server, &sid)? && uid != 0,
            "file owner {uid}"
        );
    }
    let result = run(
        &server,
        &sid,
        json!({"command": "pwd; env | sort; ps -o sid= -p $$; echo $$", "cwd": "sub"}),
    )
    .await?;
    let out = part(&result, "STDOUT").context("stdout")?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.first() == Some(&"/workspace/sub"), "cwd: {out}");
    for var in [
        "HOME=/workspace",
        "LANG=C.UTF-8",
        "PATH=/usr/bin:/bin",
        "TERM=dumb",
        "TMPDIR=/tmp",
        "USER=agent",
    ] {
        ensure!(lines.contains(&var), "{var} missing: {out}");
    }
    let names: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !matches!(*k, "PWD" | "OLDPWD" | "SHLVL" | "_"))
        .collect();
    ensure!(names.len() == 6, "nothing else is passed on: {names:?}");
    let ids: Vec<&str> = lines[lines.len().saturating_sub(2)..]
        .iter()
        .map(|l| l.trim())
        .collect();
    ensure!(
        ids.len() == 2 && ids[0] == ids[1],
        "the shell leads its own session: {out}"
    );
    let result = run(
        &server,
        &sid,
        json!({"command": "touch /usr/evil; touch /evil; cat /etc/shadow"}),
    )
    .await?;
    let err = part(&result, "STDERR").unwrap_or_default();
    ensure!(
        err.matches("Read-only file system").count() == 2 && err.contains("/etc/shadow"),
        "system root: {result}"
    );
    ensure!(part(&result, "ERROR").is_some(), "{result}");
    let result = run(&server, &sid, json!({"command": "cd ..", "cwd": "../"})).await?;
    ensure!(
        result["error"] == "Path is outside the workspace: ../",
        "{result}"
    );
    Ok(())
}

/// The worker's channel (fd 3) is not inherited by commands: a command that could write to it
/// would speak the protocol as the worker (forge stored events, start model calls with the
/// operator's key) and its writes would interleave with the worker's frames. A command has fds
/// 0-2 only, a well-formed frame it tries to write goes nowhere, and nothing of it reaches the
/// session's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_cannot_reach_the_worker_channel() -> Result<()> {
    let server = start(json!({})).await?;
    let sid = session(&server).await?;
    let forged = json!({
        "id": "forged-by-a-command", "type": "system", "timestamp": 1,
        "level": "info", "message": "FORGED BY A COMMAND",
    });
    let frame = shared::frame::encode(&shared::protocol::FromWorker::Event {
        json: forged.to_string(),
    })?;
    std::fs::write(server.workspace_root().join(&sid).join("frame.bin"), &frame)?;

    let result = run(
        &server,
        &sid,
        json!({"command": "ls /proc/$$/fd; cat frame.bin >&3 && echo WROTE; echo done"}),
    )
    .await?;
    let out = part(&result, "STDOUT").context("stdout")?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines == ["0", "1", "2", "done"],
        "the command's shell holds fds 0-2 only and cannot write fd 3: {result}"
    );
    ensure!(
        part(&result, "STDERR").is_some_and(|e| e.contains("Bad file descriptor")),
        "writing fd 3 fails with EBADF: {result}"
    );
    let events = server.events(&sid).await?;
    ensure!(
        !events
            .iter()
            .any(|e| e["id"] == "forged-by-a-command" || e["message"] == "FORGED BY A COMMAND"),
        "a forged event reached the log: {events:?}"
    );
    // The session goes on as before.
    let answer = server.query(&sid, "still here").await?;
    ensure!(answer["content"] == "echo: still here", "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_capped_head_and_tail() -> Result<()> {
    let server = start(json!({})).await?;
    let sid = session(&server).await?;
    let result = run(
        &server,
        &sid,
        json!({"command": "printf HEAD; head -c 99991 /dev/zero | tr '\\0' x; echo TAIL"}),
    )
    .await?;
    let out = part(&result, "STDOUT").context("stdout")?;
    // 100 000 bytes: the first and last 32 KiB are kept.
    ensure!(
        out.starts_with("HEADxxx") && out.ends_with("xxxTAIL\n"),
        "ends"
    );
    let marker = format!("\n[… {} bytes truncated …]\n", 100_000 - 64 * 1024);
    ensure!(out.contains(&marker), "no marker {marker:?}");
    ensure!(
        out.len() == 64 * 1024 + marker.len(),
        "length {}",
        out.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_timeout_stops_the_command() -> Result<()> {
    let server = start(json!({"isolation": {"limits": {"commandTimeout": 1}}})).await?;
    let sid = session(&server).await?;
    // The call asks for the default 60 s; the configuration caps it at 1 s. A job in the
    // command's group and a daemon outside it are stopped with it.
    let result = run(
        &server,
        &sid,
        json!({"command": "echo started; sleep 30 & setsid sleep 300 & sleep 30"}),
    )
    .await?;
    ensure!(result["error"] == "Command timed out after 1s", "{result}");
    ensure!(
        result["content"] == "STDOUT:\nstarted\nError: Command timed out after 1s",
        "the partial output comes before the error line: {result}"
    );
    let elapsed = result["elapsedMs"].as_u64().context("elapsedMs")?;
    ensure!(elapsed < 20_000, "elapsed {elapsed} ms");
    wait_until(T, "the command's processes are gone", async || {
        extra_processes(&server, &sid)
            .await
            .is_ok_and(|p| p.is_empty())
    })
    .await?;
    // The session carries on.
    let result = run(&server, &sid, json!({"command": "echo after"})).await?;
    ensure!(part(&result, "STDOUT") == Some("after\n"), "{result}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_kills_the_group_and_its_daemons() -> Result<()> {
    abort_kills_everything(Mode::Root).await
}

/// Rootless: every session shares the server's uid on the host, so `kill(-1)` is confined by
/// the PID namespace alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_kills_the_group_and_its_daemons_rootless() -> Result<()> {
    abort_kills_everything(Mode::Rootless).await
}

async fn abort_kills_everything(mode: Mode) -> Result<()> {
    let server = start_in(mode, json!({})).await?;
    let sid = session(&server).await?;
    let other = session(&server).await?;
    let (_, launcher) = jail(&server, &sid).await?;
    let worker = worker_host_pid(launcher)?;
    let uid = session_uid(&server, &sid)?;
    let other_before = session_processes(&server, &other).await?;

    let mut stream = server
        .stream(
            &sid,
            r#"TOOL run_command {"command":"setsid sh -c 'sleep 300' & sleep 30"}"#,
        )
        .await?;
    let mut frames = stream.read_until_type("tool_call", T).await?;
    // The shell, its sleep and the daemon (with its own sleep, or exec'd into it).
    wait_until(T, "the command and its daemon run", async || {
        extra_processes(&server, &sid)
            .await
            .is_ok_and(|p| p.len() >= 3)
    })
    .await?;
    let running = extra_processes(&server, &sid).await?;
    let aborted_at = Instant::now();
    ensure!(server.abort(&sid).await?, "abort");
    frames.extend(stream.collect_until_end(LONG).await?);
    ensure!(
        aborted_at.elapsed() < Duration::from_secs(15),
        "the run took {:?} to end after the abort",
        aborted_at.elapsed()
    );
    let result = frames
        .iter()
        .find(|f| f.ty() == "tool_result")
        .with_context(|| format!("no tool_result: {:?}", types(&frames)))?;
    ensure!(
        result.data["content"] == "Tool execution aborted" && result.data["error"] == "aborted",
        "{:?}",
        result.data
    );
    let end = frames.last().context("no frames")?;
    ensure!(
        end.ty() == "agent_run_end" && end.data["status"] == "aborted",
        "{:?}",
        types(&frames)
    );

    // Every process of the command is gone, daemon included, and reaped.
    wait_until(
        T,
        "the command, its group and the daemon are gone",
        async || {
            running.iter().all(|p| !pid_alive(*p))
                && extra_processes(&server, &sid)
                    .await
                    .is_ok_and(|p| p.is_empty())
        },
    )
    .await?;
    wait_until(T, "no zombies are left under the worker", async || {
        zombies(&server, &sid).await.is_ok_and(|z| z.is_empty())
    })
    .await?;
    if mode == Mode::Root {
        let left: Vec<u32> = processes_of_uid(uid)
            .into_iter()
            .filter(|p| *p != launcher && *p != worker)
            .collect();
        ensure!(
            left.is_empty(),
            "processes of uid {uid} besides the worker: {left:?}"
        );
    }
    // kill(-1) stayed inside the session's PID namespace.
    ensure!(pid_alive(server.pid()), "the supervisor was killed");
    ensure!(
        other_before.iter().all(|p| pid_alive(*p)),
        "another session's processes were killed"
    );
    // kill(-1) spared the worker: the same one runs the next command.
    let result = run(&server, &sid, json!({"command": "echo again"})).await?;
    ensure!(part(&result, "STDOUT") == Some("again\n"), "{result}");
    ensure!(
        worker_host_pid(launcher)? == worker,
        "the worker was replaced"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_and_daemons_die_with_the_session() -> Result<()> {
    let server = start(json!({})).await?;
    let sid = session(&server).await?;
    let uid = session_uid(&server, &sid)?;
    // A daemon that holds the output pipes does not hold the call: the shell's exit ends it.
    let result = run(
        &server,
        &sid,
        json!({"command": "setsid sh -c 'sleep 300' & sh -c 'sleep 1 &' ; echo started"}),
    )
    .await?;
    ensure!(part(&result, "STDOUT") == Some("started\n"), "{result}");
    let elapsed = result["elapsedMs"].as_u64().context("elapsedMs")?;
    ensure!(
        elapsed < 20_000,
        "the call waited for its daemon: {elapsed} ms"
    );
    // The short-lived orphan ends and is reaped by the worker (PID 1); the daemon lives on.
    let daemon = describe(&extra_processes(&server, &sid).await?);
    // Zombies are looked for last: a `sleep 1` that ends between the two looks is then seen.
    wait_until(T, "the orphaned sleep 1 is reaped", async || {
        extra_processes(&server, &sid)
            .await
            .is_ok_and(|p| describe(&p).iter().all(|c| !c.contains("sleep 1")))
            && zombies(&server, &sid).await.is_ok_and(|z| z.is_empty())
    })
    .await?;
    let left = describe(&extra_processes(&server, &sid).await?);
    ensure!(
        !left.is_empty() && left.iter().all(|c| c.contains("sleep 300")),
        "only the daemon is left: {left:?} (at first: {daemon:?})"
    );

    let before = session_processes(&server, &sid).await?;
    server.delete_session(&sid).await?;
    wait_until(
        T,
        "every process of the deleted session is gone",
        async || before.iter().all(|p| !pid_alive(*p)),
    )
    .await?;
    wait_until(T, "no process left with the session's uid", async || {
        processes_of_uid(uid).is_empty()
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_command_names_the_memory_limit() -> Result<()> {
    let server = start(json!({})).await?;
    let sid = session(&server).await?;
    let health = server.get_ok("/api/v1/system/health").await?;
    let cgroup = &health["isolation"]["layers"]["cgroup"];
    if !cgroup.is_object() {
        return skip("no session cgroups on this host: no memory limit to name");
    }
    let result = run(&server, &sid, json!({"command": "kill -9 $$"})).await?;
    ensure!(
        part(&result, "ERROR")
            == Some(
                "Command killed by signal 9 (SIGKILL): possibly the session's memory limit (256 MiB) was reached"
            ),
        "{result}"
    );
    if cgroup["version"] != 1 {
        // memory.oom.group: the kernel takes the whole session, worker included, and the run
        // ends with the supervisor's limit error (T33 covers that).
        return skip("cgroup v2: an OOM kill ends the whole session, not just the command");
    }
    // The real thing (v1: the OOM killer picks the biggest process of the group): one process
    // grows past the 256 MiB cgroup limit.
    let result = run(
        &server,
        &sid,
        json!({"command": "head -c 600m /dev/zero | tail > /dev/null"}),
    )
    .await?;
    let error = part(&result, "ERROR").unwrap_or_default();
    ensure!(
        error.contains("possibly the session's memory limit (256 MiB) was reached"),
        "{result}"
    );
    // The worker survived its command's OOM kill.
    let result = run(&server, &sid, json!({"command": "echo fine"})).await?;
    ensure!(part(&result, "STDOUT") == Some("fine\n"), "{result}");
    Ok(())
}

/// T09 through the tool: a root-owned setuid copy of `id` runs as the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_setuid_binary_runs_as_the_session() -> Result<()> {
    let server = start(json!({})).await?;
    let sid = session(&server).await?;
    let target = server.workspace_root().join(&sid).join("id-suid");
    std::fs::copy("/usr/bin/id", &target)?;
    std::os::unix::fs::chown(&target, Some(0), Some(0))?;
    std::fs::set_permissions(
        &target,
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )?;
    let result = run(&server, &sid, json!({"command": "./id-suid"})).await?;
    let out = part(&result, "STDOUT").unwrap_or_default();
    ensure!(
        part(&result, "ERROR").is_none() && out.starts_with("uid=1000") && !out.contains("euid=0"),
        "setuid id: {result}"
    );
    Ok(())
}

/// T23 through the tool: curl, wget and bash's /dev/tcp reach nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_commands_have_no_network() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let server = start(json!({})).await?;
    let sid = session(&server).await?;
    let mut tried = Vec::new();
    let clients = [
        (
            "/usr/bin/curl",
            format!("curl -sS -m 5 http://127.0.0.1:{port}/"),
        ),
        (
            "/usr/bin/wget",
            format!("wget -q -T 5 -t 1 -O - http://127.0.0.1:{port}/"),
        ),
        (
            "/bin/bash",
            format!("bash -c 'echo leak > /dev/tcp/127.0.0.1/{port}'"),
        ),
    ];
    for (program, command) in clients {
        if !Path::new(program).exists() {
            skip(&format!("T23: {program} is not installed on this host"))?;
            continue;
        }
        let result = run(&server, &sid, json!({"command": command})).await?;
        ensure!(
            part(&result, "ERROR").is_some_and(|e| e.starts_with("Command exited with code")),
            "{program} reached the network: {result}"
        );
        tried.push(program);
    }
    ensure!(!tried.is_empty(), "no network client to try");
    ensure!(listener.accept().is_err(), "the listener got a connection");
    // Control: the same tool runs programs fine.
    let result = run(&server, &sid, json!({"command": "echo fine"})).await?;
    ensure!(part(&result, "STDOUT") == Some("fine\n"), "{result}");
    Ok(())
}

/// The tool is unknown where commands are off, and at `chroot` even when they are asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_offered_without_commands() -> Result<()> {
    let off = start(json!({"isolation": {"commands": false}})).await?;
    let chroot = isolation_support::start_with(
        Mode::Chroot,
        json!({"isolation": {"commands": true, "test": {"probeServer": false}}}),
    )
    .await?;
    for server in [&off, &chroot] {
        let sid = server.create_session().await?;
        let answer = server
            .query(&sid, r#"TOOL run_command {"command":"echo hi"}"#)
            .await?;
        ensure!(
            answer["content"] == "tool said: Error: Tool \"run_command\" not found",
            "{answer}"
        );
        let events = last_run(server, &sid).await?;
        let call = events
            .iter()
            .find(|e| e["type"] == "tool_call")
            .context("tool_call")?;
        ensure!(call["tool"]["description"] == "Unknown tool", "{call}");
        let result = events
            .iter()
            .find(|e| e["type"] == "tool_result")
            .context("tool_result")?;
        ensure!(
            result["error"] == "Tool \"run_command\" not found",
            "{result}"
        );
    }
    Ok(())
}
