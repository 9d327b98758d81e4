//! A deleted session's teardown: the delete answers once the session is gone from the API and
//! storage, while its worker, quota, workspace and host uid are released in the background, the
//! uid last; a server stopped or killed half-way through leaves nothing behind once it has
//! started again. The teardown is held back by the `teardownDelayMs` test hook so that each
//! test can look at (or crash) the server in the middle of one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Server, ServerOpts, mounts_under, pid_alive, wait_until};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn with_config(opts: ServerOpts, isolation: Value) -> ServerOpts {
    opts.config_file(
        "teardown.json",
        json!({ "isolation": isolation }).to_string(),
    )
}

/// The session's launcher and every process below it.
fn session_processes(launcher: u32) -> Vec<u32> {
    let mut found = vec![launcher];
    let mut i = 0;
    while i < found.len() {
        let pid = found[i];
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        found.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    found
}

fn real_uid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// The host uid the session's jailed worker runs as (the launcher's deepest descendant).
fn worker_uid(launcher: u32) -> Result<u32> {
    let processes = session_processes(launcher);
    let worker = *processes.last().context("no session process")?;
    real_uid(worker).context("worker uid")
}

/// Cgroup directories named `name` anywhere in the cgroup hierarchies (a few levels deep).
fn cgroups_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_str() == Some(name) {
                found.push(path.clone());
            }
            if depth < 6 {
                stack.push((path, depth + 1));
            }
        }
    }
    found
}

/// What a session leaves on the host, by name: its workspace, its image and mount, its journal
/// entry.
fn leftovers(root: &Path, sid: &str) -> Vec<String> {
    let mut left = Vec::new();
    let workspace = root.join(sid);
    if std::fs::symlink_metadata(&workspace).is_ok() {
        left.push(format!("workspace {}", workspace.display()));
    }
    if mounts_under(root).contains(&workspace) {
        left.push("workspace mount".into());
    }
    let image = root.join(format!(".disk/{sid}.img"));
    if image.exists() {
        left.push(format!("image {}", image.display()));
    }
    let entry = root.join(format!(".deleting/{sid}"));
    if entry.exists() {
        left.push(format!("journal entry {}", entry.display()));
    }
    left
}

/// A session with a live worker; returns its launcher pid.
async fn busy_session(server: &Server) -> Result<(String, u32)> {
    let sid = server.create_session().await?;
    let answer = server.query(&sid, "hello").await?;
    ensure!(answer["content"] == "echo: hello", "{answer}");
    let launcher = server.wait_worker_pid(&sid).await?;
    Ok((sid, launcher))
}

/// The delete answers while the worker is still there; the session is gone from every API at
/// once, other sessions work meanwhile, and the teardown then removes the processes, the
/// workspace, its image and the journal entry.
#[tokio::test]
async fn delete_answers_before_the_teardown_which_then_removes_everything() -> Result<()> {
    let server = Server::start(with_config(
        ServerOpts::new(),
        json!({"test": {"teardownDelayMs": 2500}}),
    ))
    .await?;
    let (sid, launcher) = busy_session(&server).await?;
    let processes = session_processes(launcher);
    let root = server.workspace_root().to_owned();
    ensure!(root.join(&sid).is_dir(), "control: the workspace exists");

    server.delete_session(&sid).await?;
    ensure!(
        processes.iter().all(|p| pid_alive(*p)),
        "the delete waited for the worker: {processes:?}"
    );
    ensure!(
        root.join(format!(".deleting/{sid}")).is_file(),
        "no journal entry while the teardown is pending"
    );
    server
        .get(&format!("/api/v1/sessions/details?sessionId={sid}"))
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "details during the teardown")?;
    server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid, "query": "again"}),
        )
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "query during the teardown")?;
    server
        .post_json("/api/v1/sessions/delete", &json!({"sessionId": sid}))
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "a second delete")?;
    let listed = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        !listed.to_string().contains(&sid),
        "listed during its teardown: {listed}"
    );
    ensure!(
        server.worker_pid(&sid).await?.is_none(),
        "the deleted session is still listed among the workers"
    );
    let other = server.create_session().await?;
    let answer = server.query(&other, "meanwhile").await?;
    ensure!(answer["content"] == "echo: meanwhile", "{answer}");

    wait_until(T, "the deleted session's processes are gone", async || {
        processes.iter().all(|p| !pid_alive(*p))
    })
    .await?;
    wait_until(T, "nothing of the deleted session is left", async || {
        leftovers(&root, &sid).is_empty()
    })
    .await?;
    ensure!(
        root.join(&other).is_dir(),
        "the other session's workspace went too"
    );
    Ok(())
}

/// The host uid goes back last: with one uid in the range, a session created while the
/// deleted one is torn down waits for its uid, and gets it only once nothing of the old
/// session is left.
#[tokio::test]
async fn the_host_uid_is_given_back_after_everything_else() -> Result<()> {
    if !is_root() {
        println!("SKIP: per-session host uids need root");
        return Ok(());
    }
    let server = Server::start(with_config(
        ServerOpts::new(),
        json!({"uidBase": 310_000, "uidCount": 2, "test": {"teardownDelayMs": 1500}}),
    ))
    .await?;
    let (a, launcher) = busy_session(&server).await?;
    let uid = worker_uid(launcher)?;
    let processes = session_processes(launcher);
    let root = server.workspace_root().to_owned();
    server.delete_session(&a).await?;
    ensure!(
        processes.iter().all(|p| pid_alive(*p)),
        "control: the teardown has not started"
    );
    let b = server.create_session().await?;
    // The moment the uid was free, the old session was already gone.
    let left = leftovers(&root, &a);
    ensure!(left.is_empty(), "the uid was free before: {left:?}");
    ensure!(
        processes.iter().all(|p| !pid_alive(*p)),
        "the uid was free while the old session's processes ran"
    );
    let answer = server.query(&b, "hi").await?;
    ensure!(answer["content"] == "echo: hi", "{answer}");
    let new_uid = worker_uid(server.wait_worker_pid(&b).await?)?;
    ensure!(
        new_uid == uid,
        "control: the same uid was reused ({new_uid} vs {uid})"
    );
    Ok(())
}

/// A server stopped (SIGTERM) while a teardown waits finishes it before it exits.
#[tokio::test]
async fn a_stopping_server_finishes_its_teardowns() -> Result<()> {
    let mut server = Server::start(with_config(
        ServerOpts::new(),
        json!({"test": {"teardownDelayMs": 1500}}),
    ))
    .await?;
    let (sid, launcher) = busy_session(&server).await?;
    let processes = session_processes(launcher);
    let root = server.workspace_root().to_owned();
    server.delete_session(&sid).await?;
    ensure!(
        !leftovers(&root, &sid).is_empty(),
        "control: the teardown has not run yet"
    );
    server.sigterm()?;
    server
        .wait_exit(T)
        .await
        .context("the server did not stop")?;
    let left = leftovers(&root, &sid);
    ensure!(left.is_empty(), "left after a clean stop: {left:?}");
    ensure!(
        processes.iter().all(|p| !pid_alive(*p)),
        "processes left after a clean stop"
    );
    Ok(())
}

/// A server killed in the middle of a teardown: the next start finishes it. The workspace, its
/// image and mount, its journal entry and the old server's cgroups all go, and no process of
/// the session survives.
#[tokio::test]
async fn a_teardown_cut_short_by_a_crash_is_finished_at_the_next_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = |isolation: Value| {
        with_config(
            ServerOpts::new()
                .without_workspace_flag()
                .arg("--workspace")
                .arg(dir.path().join("ws").display().to_string())
                .arg("--storage-type")
                .arg("sqlite")
                .arg("--storage-path")
                .arg(dir.path().join("sessions.db").display().to_string()),
            isolation,
        )
    };
    let mut first = Server::start(opts(json!({"test": {"teardownDelayMs": 600_000}}))).await?;
    let (sid, launcher) = busy_session(&first).await?;
    let kept = first.create_session().await?;
    let processes = session_processes(launcher);
    let root = dir.path().join("ws");
    ensure!(
        root.join(&sid).is_dir(),
        "control: the workspace is where it was configured"
    );
    let old_cgroups = format!("agentd-{}", first.pid());
    let has_cgroups = !cgroups_named(&old_cgroups).is_empty();
    first.delete_session(&sid).await?;
    first.kill9()?;
    first.wait_exit(T).await.context("the server did not die")?;
    wait_until(
        T,
        "the session's processes die with their server",
        async || processes.iter().all(|p| !pid_alive(*p)),
    )
    .await?;
    let left = leftovers(&root, &sid);
    ensure!(
        left.iter().any(|l| l.starts_with("workspace "))
            && left.iter().any(|l| l.starts_with("journal")),
        "control: the crash left the teardown undone: {left:?}"
    );

    // `first` is kept until the end: dropping it would clean up what this test looks at.
    let second = Server::start(opts(json!({}))).await?;
    wait_until(T, "the next start finishes the teardown", async || {
        leftovers(&root, &sid).is_empty()
    })
    .await?;
    if has_cgroups {
        let stale = cgroups_named(&old_cgroups);
        ensure!(
            stale.is_empty(),
            "the dead server's cgroups remain: {stale:?}"
        );
    }
    ensure!(
        root.join(&kept).is_dir(),
        "a stored session's workspace went"
    );
    let answer = second.query(&kept, "still here").await?;
    ensure!(answer["content"] == "echo: still here", "{answer}");
    second
        .get(&format!("/api/v1/sessions/details?sessionId={sid}"))
        .await?
        .expect_error(
            404,
            "SESSION_NOT_FOUND",
            "the deleted session after the restart",
        )?;
    drop(second);
    drop(first);
    Ok(())
}

/// A server that gives up at start (its port is taken) after it has set up its workspace image
/// pool leaves nothing of it mounted.
#[tokio::test]
async fn a_server_refused_at_start_leaves_no_image_pool_mounted() -> Result<()> {
    if !is_root() {
        println!("SKIP: workspace images need root");
        return Ok(());
    }
    let holder = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = holder.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws)?;
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        json!({"isolation": {"limits": {"diskBackend": "image"}}}).to_string(),
    )?;
    let output = tokio::process::Command::new(e2e::supervisor_bin()?)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(port.to_string())
        .arg("--workspace")
        .arg(&ws)
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(T, output)
        .await
        .context("the server did not give up")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let left = mounts_under(&ws);
    e2e::detach_mounts_under(&ws);
    ensure!(!output.status.success(), "the server started: {stderr}");
    if !stderr.contains("listen") {
        println!("SKIP: the server stopped before its port was tried: {stderr}");
        return Ok(());
    }
    ensure!(
        ws.join(".disk").is_dir(),
        "control: the image pool was set up before the port was tried: {stderr}"
    );
    ensure!(left.is_empty(), "left mounted: {left:?}");
    drop(holder);
    Ok(())
}
