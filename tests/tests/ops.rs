//! Operating a running server through `supervisor ctl` (its control socket) and the matching
//! HTTP routes: restart or stop one session without touching the others, drain, listings.

use std::path::PathBuf;
use std::process::Output;

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, ServerOpts, pid_alive, supervisor_bin};
use serde_json::{Value, json};

fn socket(server: &Server) -> PathBuf {
    server.tmp_dir().join("data").join("ctl.sock")
}

fn ctl(server: &Server, args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new(supervisor_bin()?)
        .env_clear()
        .arg("ctl")
        .arg("--socket")
        .arg(socket(server))
        .args(args)
        .output()?)
}

fn ctl_json(server: &Server, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = ctl(server, &all)?;
    ensure!(
        output.status.success(),
        "ctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_one_session_keeps_history_and_spares_the_others() -> Result<()> {
    let server = Server::start_default().await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;
    server.query(&a, "first a").await?;
    server.query(&b, "first b").await?;
    let a_pid = server.wait_worker_pid(&a).await?;
    let b_pid = server.wait_worker_pid(&b).await?;
    // A follower of a stays connected across the restart.
    let latest = server
        .events(&a)
        .await?
        .last()
        .and_then(|e| e["seq"].as_u64())
        .context("no seq")?;
    let mut follower = server
        .get_sse(
            &format!("/api/v1/sessions/events/stream?sessionId={a}&after={latest}"),
            &[],
        )
        .await?;

    let answer = ctl_json(&server, &["restart", &a])?;
    let new_pid = answer["pid"].as_u64().context("no pid")? as u32;
    ensure!(new_pid != a_pid && !pid_alive(a_pid), "a got a new worker");
    ensure!(server.wait_worker_pid(&a).await? == new_pid);
    ensure!(
        server.wait_worker_pid(&b).await? == b_pid && pid_alive(b_pid),
        "b untouched"
    );

    let recall = server.query(&a, "RECALL").await?;
    ensure!(recall["content"] == "recall: first a", "{recall}");
    let seen = follower.read_until_type("agent_run_end", LONG).await?;
    ensure!(
        seen.iter()
            .any(|f| f.ty() == "assistant_message" && f.data["content"] == "recall: first a")
    );

    // The same over HTTP, and ctl's listings.
    let again = server
        .post_ok("/api/v1/sessions/restart", &json!({"sessionId": b}))
        .await?;
    ensure!(again["pid"].as_u64().is_some_and(|p| p as u32 != b_pid));
    let workers = ctl_json(&server, &["workers"])?;
    let rows = workers["workers"].as_array().context("workers")?;
    ensure!(rows.len() == 2);
    for row in rows {
        ensure!(
            row["rssKib"].as_u64().is_some_and(|r| r > 0)
                && row["cpuSecs"].is_number()
                && row["startMs"].as_f64().is_some_and(|ms| ms > 0.0),
            "{row}"
        );
        ensure!(row["state"] == "idle" && row["events"].as_u64().is_some());
    }
    let sessions = ctl_json(&server, &["sessions"])?;
    ensure!(
        sessions["sessions"]
            .as_array()
            .is_some_and(|s| s.len() == 2)
    );
    let table = ctl(&server, &["workers"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    ensure!(
        text.starts_with("sessionId\tpid\tstate") && text.contains(&a),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_a_run_ends_it_and_stop_stops() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let mut stream = server.stream(&sid, "SLOW 200").await?;
    stream.read_deltas(1, LONG).await?;
    let old = server.wait_worker_pid(&sid).await?;
    let restarted = ctl_json(&server, &["restart", &sid])?;
    let frames = stream.collect_until_end(LONG).await?;
    let end = frames.last().context("no frames")?;
    ensure!(
        end.ty() == "agent_run_end" && end.data["status"] == "error",
        "the cut run is closed"
    );
    let pid = restarted["pid"].as_u64().context("no pid")? as u32;
    ensure!(pid != old && !pid_alive(old));

    let stopped = ctl_json(&server, &["stop", &sid])?;
    ensure!(stopped["stopped"] == true, "{stopped}");
    ensure!(!pid_alive(pid));
    let again = server.query(&sid, "again").await?;
    ensure!(
        again["content"] == "echo: again",
        "a new worker answers: {again}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_runs_and_lets_running_ones_finish() -> Result<()> {
    let server = Server::start_default().await?;
    let running = server.create_session().await?;
    let idle = server.create_session().await?;
    let mut stream = server.stream(&running, "SLOW 20").await?;
    stream.read_deltas(1, LONG).await?;

    ctl_json(&server, &["drain"])?;
    let refused = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": idle, "query": "hi"}),
        )
        .await?;
    refused.expect_error(503, "SERVER_DRAINING", "query while draining")?;
    ensure!(refused.header("retry-after").is_some());
    let frames = stream.collect_until_end(LONG).await?;
    ensure!(
        frames
            .last()
            .is_some_and(|f| f.ty() == "agent_run_end" && f.data["status"] == "idle"),
        "the running run finished"
    );

    ctl_json(&server, &["resume"])?;
    ensure!(server.query(&idle, "hi").await?["content"] == "echo: hi");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_does_not_steal_a_live_control_socket() -> Result<()> {
    let first = Server::start_default().await?;
    let config = json!({"server": {"controlSocket": socket(&first)}});
    let exited = Server::expect_exit(
        ServerOpts::new().config_file("config.json", config.to_string()),
        std::time::Duration::from_secs(20),
    )
    .await?;
    ensure!(!exited.status.success());
    ensure!(
        exited.stderr.contains("already listening"),
        "{}",
        exited.stderr
    );
    ensure!(
        ctl_json(&first, &["workers"])?["success"] == true,
        "the first server still answers"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_is_private() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start_default().await?;
    let path = socket(&server);
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(path.parent().context("no dir")?)?
        .permissions()
        .mode()
        & 0o777;
    ensure!(dir_mode == 0o700, "directory mode {dir_mode:o}");
    Ok(())
}

/// `supervisor ctl --json sessions` against a data directory: the ids it lists.
fn ctl_ids_in(data_dir: &std::path::Path, env_only: bool) -> Result<Vec<String>> {
    let mut command = std::process::Command::new(supervisor_bin()?);
    command.env_clear().arg("ctl");
    if env_only {
        command.env("DATA_DIR", data_dir);
    } else {
        command.arg("--data-dir").arg(data_dir);
    }
    let output = command.args(["--json", "sessions"]).output()?;
    ensure!(
        output.status.success(),
        "ctl in {}: {}{}",
        data_dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout)?;
    Ok(answer["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .filter_map(|s| s["sessionId"].as_str().map(str::to_owned))
        .collect())
}

/// Two servers on one host: sharing a data directory they collide on its control socket; each
/// with its own (`--data-dir`, `DATA_DIR`) they run side by side, each with its socket, store
/// and jail stage there, and `supervisor ctl --data-dir` (or `DATA_DIR`) reaches each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_with_their_own_data_directories_run_side_by_side() -> Result<()> {
    let shared = tempfile::tempdir()?;
    let (dir_a, dir_b) = (shared.path().join("a"), shared.path().join("b"));
    let a = Server::start(
        ServerOpts::new()
            .arg("--data-dir")
            .arg(dir_a.display().to_string())
            .arg("--storage-type")
            .arg("sqlite"),
    )
    .await?;
    let clash = Server::expect_exit(
        ServerOpts::new().env("DATA_DIR", dir_a.display().to_string()),
        std::time::Duration::from_secs(20),
    )
    .await?;
    ensure!(
        !clash.status.success() && clash.stderr.contains("already listening"),
        "one data directory, two servers: {}",
        clash.stderr
    );
    let b = Server::start(
        ServerOpts::new()
            .env("DATA_DIR", dir_b.display().to_string())
            .arg("--storage-type")
            .arg("file"),
    )
    .await?;
    let sa = a.create_session().await?;
    let sb = b.create_session().await?;
    // Each jails its workers with the stage in its own data directory.
    ensure!(a.query(&sa, "hi a").await?["content"] == "echo: hi a");
    ensure!(b.query(&sb, "hi b").await?["content"] == "echo: hi b");

    for (dir, store) in [(&dir_a, "sessions.db"), (&dir_b, "sessions")] {
        for entry in ["ctl.sock", store, "jail-stage"] {
            ensure!(
                dir.join(entry).exists(),
                "{entry} missing in {}",
                dir.display()
            );
        }
    }
    for server in [&a, &b] {
        ensure!(
            !server.tmp_dir().join("data").exists(),
            "nothing lands in the working directory"
        );
        ensure!(!server.workspace_root().join(".jail-stage").exists());
    }
    ensure!(
        ctl_ids_in(&dir_a, false)? == [sa.clone()],
        "ctl --data-dir a"
    );
    ensure!(
        ctl_ids_in(&dir_b, false)? == [sb.clone()],
        "ctl --data-dir b"
    );
    ensure!(ctl_ids_in(&dir_b, true)? == [sb], "ctl with DATA_DIR=b");
    Ok(())
}
