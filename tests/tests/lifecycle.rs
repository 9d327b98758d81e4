//! Session lifecycle: health/info endpoints, create / list / details / update / status /
//! query / events / delete / restore, per-session workspace directories, worker lifetime.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Server, canon, event_types, is_ms_timestamp, is_session_id, pid_alive, wait_until};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_version_and_agent_options() -> Result<()> {
    let server = Server::start_default().await?;

    let r = server.get("/api/v1/health").await?;
    r.expect_status(200, "health")?;
    ensure!(r.json == json!({"status": "ok"}), "health body: {}", r.text);
    ensure!(
        r.header("access-control-allow-origin").is_none(),
        "wildcard CORS on health: {:?}",
        r.headers
    );
    let ct = r.header("content-type").unwrap_or_default();
    ensure!(ct.starts_with("application/json"), "content-type {ct:?}");

    let h = server.get_ok("/api/v1/system/health").await?;
    ensure!(h["status"] == "healthy", "system health: {h}");
    let version = h["version"].as_str().context("version not a string")?;
    ensure!(
        version.split('.').count() >= 3,
        "version {version:?} is not semver-like"
    );
    ensure!(h["uptime"].is_number(), "uptime: {h}");
    ensure!(h["sessions"]["active"] == 0, "no sessions yet: {h}");
    ensure!(h["sessions"]["total"] == 0, "no sessions yet: {h}");
    ensure!(h["workers"]["live"] == 0, "no workers yet: {h}");
    ensure!(h["storage"]["type"] == "memory", "storage: {h}");
    ensure!(h["model"]["provider"] == "echo", "model: {h}");
    ensure!(h["model"]["id"] == "echo", "model: {h}");
    ensure!(h["model"]["offline"] == true, "model: {h}");
    // The default level is `auto`, which picks `strict` where it works (CI: always).
    ensure!(
        h["isolation"]["level"] == "strict" && h["isolation"]["secure"] == true,
        "isolation: {h}"
    );

    let v = server.get_ok("/api/v1/version").await?;
    ensure!(v["version"].is_string(), "version body: {v}");

    let o = server.get_ok("/api/v1/agent/options").await?;
    let opts = &o["options"];
    // The workspace as a session's agent sees it, not where the server keeps it.
    ensure!(opts["workspace"] == "/workspace", "options.workspace: {o}");
    ensure!(opts["workspaceName"] == "workspace", "workspaceName: {o}");
    ensure!(opts["model"]["provider"] == "echo", "model: {o}");
    ensure!(opts["model"]["id"] == "echo", "model: {o}");

    // Counters move after a session + a query.
    let sid = server.create_session().await?;
    server.query(&sid, "hi").await?;
    let h = server.get_ok("/api/v1/system/health").await?;
    ensure!(h["sessions"]["active"] == 1, "one live session: {h}");
    ensure!(h["sessions"]["total"] == 1, "one session: {h}");
    ensure!(h["workers"]["live"] == 1, "one worker after a query: {h}");
    Ok(())
}

fn check_session_info(s: &Value, sid: &str) -> Result<()> {
    ensure!(s["id"] == sid, "session.id != {sid}: {s}");
    ensure!(is_ms_timestamp(&s["createdAt"]), "createdAt: {s}");
    ensure!(is_ms_timestamp(&s["updatedAt"]), "updatedAt: {s}");
    ensure!(
        s["updatedAt"].as_f64() >= s["createdAt"].as_f64(),
        "updatedAt < createdAt: {s}"
    );
    ensure!(s["workspace"].is_string(), "workspace: {s}");
    ensure!(s["metadata"].is_object(), "metadata: {s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_details_update_delete() -> Result<()> {
    let server = Server::start_default().await?;

    // --- create -------------------------------------------------------------------------------
    let r = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    r.expect_status(201, "create")?;
    ensure!(
        r.header("access-control-allow-origin").is_none(),
        "wildcard CORS on create"
    );
    let a = r.json["sessionId"]
        .as_str()
        .context("sessionId")?
        .to_string();
    ensure!(is_session_id(&a), "bad session id {a:?}");
    ensure!(r.json["events"] == json!([]), "create events: {}", r.text);
    let sa = &r.json["session"];
    check_session_info(sa, &a)?;

    // The session's own workspace directory exists under the workspace root; clients see it
    // as the path inside the session's jail.
    ensure!(sa["workspace"] == "/workspace", "workspace: {sa}");
    let ws_a = server.workspace_root().join(&a);
    ensure!(ws_a.is_dir(), "session workspace {ws_a:?} does not exist");

    let b = server.create_session().await?;
    ensure!(a != b, "session ids must differ");
    let ws_b = server.workspace_root().join(&b);
    ensure!(ws_b.is_dir(), "second session workspace missing");

    // --- list ---------------------------------------------------------------------------------
    let list = server.get_ok("/api/v1/sessions").await?;
    let sessions = list["sessions"].as_array().context("sessions array")?;
    let ids: Vec<&str> = sessions.iter().filter_map(|s| s["id"].as_str()).collect();
    ensure!(
        ids.contains(&a.as_str()) && ids.contains(&b.as_str()),
        "list {ids:?}"
    );
    ensure!(sessions.len() == 2, "exactly two sessions: {list}");
    for s in sessions {
        check_session_info(s, s["id"].as_str().unwrap_or_default())?;
    }

    // --- details ------------------------------------------------------------------------------
    let d = server.details(&a).await?;
    check_session_info(&d, &a)?;
    ensure!(d["active"].is_boolean(), "details.active: {d}");
    ensure!(d["workspace"] == "/workspace", "details workspace: {d}");

    // --- status -------------------------------------------------------------------------------
    let st = server.status(&a).await?;
    ensure!(st["isProcessing"] == false, "fresh status: {st}");
    ensure!(st["state"] == "idle", "fresh status: {st}");

    // --- update: metadata shallow merge --------------------------------------------------------
    let before = d["updatedAt"].as_f64().unwrap_or_default();
    let up = server
        .post_ok(
            "/api/v1/sessions/update",
            &json!({"sessionId": a, "metadata": {"name": "first", "custom": {"x": 1}}}),
        )
        .await?;
    let s = &up["session"];
    check_session_info(s, &a)?;
    ensure!(s["metadata"]["name"] == "first", "update name: {up}");
    ensure!(
        s["metadata"]["custom"] == json!({"x": 1}),
        "update custom: {up}"
    );
    ensure!(
        s["updatedAt"].as_f64().unwrap_or_default() >= before,
        "updatedAt went backwards: {up}"
    );

    // Top-level name/tags are folded into metadata; other keys survive (shallow merge).
    let up = server
        .post_ok(
            "/api/v1/sessions/update",
            &json!({"sessionId": a, "name": "renamed", "tags": ["t1", "t2"]}),
        )
        .await?;
    let m = &up["session"]["metadata"];
    ensure!(m["name"] == "renamed", "top-level name: {up}");
    ensure!(m["tags"] == json!(["t1", "t2"]), "top-level tags: {up}");
    ensure!(
        m["custom"] == json!({"x": 1}),
        "custom lost by shallow merge: {up}"
    );

    // A shallow merge replaces a whole key.
    let up = server
        .post_ok(
            "/api/v1/sessions/update",
            &json!({"sessionId": a, "metadata": {"tags": ["only"]}}),
        )
        .await?;
    let m = &up["session"]["metadata"];
    ensure!(m["tags"] == json!(["only"]), "tags replaced: {up}");
    ensure!(m["name"] == "renamed", "name kept: {up}");

    let d = server.details(&a).await?;
    ensure!(
        d["metadata"]["name"] == "renamed",
        "details after update: {d}"
    );
    ensure!(
        d["metadata"]["tags"] == json!(["only"]),
        "details after update: {d}"
    );

    // List is sorted by updatedAt descending.
    let list = server.get_ok("/api/v1/sessions").await?;
    let stamps: Vec<f64> = list["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .map(|s| s["updatedAt"].as_f64().unwrap_or_default())
        .collect();
    ensure!(
        stamps.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by updatedAt desc: {list}"
    );
    let listed_a = list["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .find(|s| s["id"] == a)
        .context("a listed")?
        .clone();
    ensure!(
        listed_a["metadata"]["name"] == "renamed",
        "list metadata: {listed_a}"
    );

    // --- delete -------------------------------------------------------------------------------
    server.delete_session(&a).await?;
    wait_until(T, "deleted session workspace removed", async || {
        !ws_a.exists()
    })
    .await?;

    for path in [
        format!("/api/v1/sessions/details?sessionId={a}"),
        format!("/api/v1/sessions/status?sessionId={a}"),
        format!("/api/v1/sessions/events?sessionId={a}"),
    ] {
        server
            .get(&path)
            .await?
            .expect_error(404, "SESSION_NOT_FOUND", &path)?;
    }
    server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": a, "query": "x"}),
        )
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "query deleted")?;
    server
        .post_json("/api/v1/sessions/delete", &json!({"sessionId": a}))
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "delete twice")?;

    let list = server.get_ok("/api/v1/sessions").await?;
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    ensure!(ids == vec![b.as_str()], "after delete list is {ids:?}");
    ensure!(ws_b.is_dir(), "other session's workspace must survive");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_query_events_and_memory() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;

    let result = server.query(&sid, "hello").await?;
    ensure!(result["type"] == "assistant_message", "result: {result}");
    ensure!(result["content"] == "echo: hello", "result: {result}");
    ensure!(result["finishReason"] == "stop", "result: {result}");
    ensure!(result["messageId"].is_string(), "result: {result}");
    ensure!(result["id"].is_string(), "result: {result}");
    ensure!(is_ms_timestamp(&result["timestamp"]), "result: {result}");

    let events = server.events(&sid).await?;
    ensure!(
        event_types(&events)
            == [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end"
            ],
        "stored events: {:?}",
        event_types(&events)
    );
    ensure!(
        events[0]["content"] == "hello",
        "user_message: {}",
        events[0]
    );
    ensure!(
        events[1]["sessionId"] == sid,
        "agent_run_start: {}",
        events[1]
    );
    ensure!(
        events[1]["runOptions"]["input"] == "hello",
        "agent_run_start: {}",
        events[1]
    );
    ensure!(
        events[2]["id"] == result["id"],
        "stored assistant_message differs from result"
    );
    ensure!(
        events[2]["content"] == "echo: hello",
        "assistant_message: {}",
        events[2]
    );
    ensure!(
        events[3]["status"] == "idle",
        "agent_run_end: {}",
        events[3]
    );
    ensure!(events[3]["iterations"] == 1, "agent_run_end: {}", events[3]);

    let st = server.status(&sid).await?;
    ensure!(
        st["isProcessing"] == false && st["state"] == "idle",
        "status: {st}"
    );

    // Conversation memory.
    let r = server.query(&sid, "beta").await?;
    ensure!(r["content"] == "echo: beta", "second: {r}");
    let r = server.query(&sid, "RECALL").await?;
    ensure!(r["content"] == "recall: hello | beta", "recall: {r}");

    let events = server.events(&sid).await?;
    ensure!(
        events.len() == 12,
        "three runs × 4 stored events, got {}",
        events.len()
    );
    let mut ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ensure!(ids.len() == 12, "event ids must be unique");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_session() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    server.query(&sid, "remember me").await?;

    let r = server
        .post_ok("/api/v1/sessions/restore", &json!({"sessionId": sid}))
        .await?;
    ensure!(r["success"] == true, "restore: {r}");
    ensure!(r["sessionId"] == sid, "restore: {r}");
    check_session_info(&r["session"], &sid)?;
    ensure!(r["status"]["isProcessing"] == false, "restore status: {r}");
    ensure!(r["status"]["state"].is_string(), "restore status: {r}");

    // The session still works and remembers.
    let res = server.query(&sid, "RECALL").await?;
    ensure!(
        res["content"] == "recall: remember me",
        "recall after restore: {res}"
    );

    server
        .post_json(
            "/api/v1/sessions/restore",
            &json!({"sessionId": "nope_nope_nope_nope_1"}),
        )
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "restore unknown")?;
    server
        .post_json("/api/v1/sessions/restore", &json!({}))
        .await?
        .expect_error(400, "SESSION_ID_REQUIRED", "restore without id")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_spawned_on_first_query_and_stopped_on_delete() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let other = server.create_session().await?;

    ensure!(
        server.worker_pid(&sid).await?.is_none(),
        "no worker expected before the first query: {:?}",
        server.workers().await?
    );
    ensure!(server.workers().await?.is_empty(), "no workers at all yet");

    server.query(&sid, "wake up").await?;
    let workers = server.workers().await?;
    ensure!(workers.len() == 1, "exactly one worker: {workers:?}");
    let w = &workers[0];
    ensure!(w["sessionId"] == sid, "worker session: {w}");
    let state = w["state"].as_str().unwrap_or_default();
    ensure!(
        ["starting", "idle", "running"].contains(&state),
        "worker state {state:?}"
    );
    ensure!(is_ms_timestamp(&w["startedAt"]), "startedAt: {w}");
    let pid = server.wait_worker_pid(&sid).await?;
    ensure!(pid != server.pid(), "worker must be a separate process");
    ensure!(pid_alive(pid), "worker pid {pid} not alive");

    // The same worker serves the next query.
    server.query(&sid, "again").await?;
    ensure!(
        server.worker_pid(&sid).await? == Some(pid),
        "worker changed between queries"
    );
    ensure!(
        server.worker_pid(&other).await?.is_none(),
        "other session has no worker"
    );

    server.delete_session(&sid).await?;
    wait_until(T, "worker of deleted session exits", async || {
        !pid_alive(pid)
    })
    .await?;
    wait_until(T, "deleted session's worker unlisted", async || {
        matches!(server.worker_pid(&sid).await, Ok(None))
    })
    .await?;
    ensure!(server.workers().await?.is_empty(), "no workers left");
    Ok(())
}

/// Nothing a session's client reads names a host path: neither the workspace root (nor any
/// session's directory under it) nor the database. Operators still see the host paths on the
/// ops routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_path_reaches_a_session_client() -> Result<()> {
    let server = Server::start(
        e2e::ServerOpts::new()
            .arg("--storage-type")
            .arg("sqlite")
            .arg("--storage-path")
            .arg("{TMP}/data/sessions.db"),
    )
    .await?;
    let root = server.workspace_root().display().to_string();
    let canonical = canon(server.workspace_root()).display().to_string();
    let database = server.tmp_dir().join("data/sessions.db");
    ensure!(database.is_file(), "the database is at {database:?}");
    let tmp = server.tmp_dir().display().to_string();
    let host_paths = [root.as_str(), canonical.as_str(), tmp.as_str()];

    let created = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    created.expect_status(201, "create")?;
    let sid = created.json["sessionId"]
        .as_str()
        .context("sessionId")?
        .to_owned();
    server
        .query(
            &sid,
            r##"TOOL write_file {"path":"notes.md","content":"# Notes"}"##,
        )
        .await?;
    let mut answers: Vec<(String, String)> = vec![("create".into(), created.text)];
    let mut read = async |what: &str, path: &str, body: Option<Value>| -> Result<()> {
        let resp = match body {
            Some(body) => server.post_json(path, &body).await?,
            None => server.get(path).await?,
        };
        resp.expect_status(200, what)?;
        answers.push((what.to_owned(), resp.text));
        Ok(())
    };
    read("list", "/api/v1/sessions", None).await?;
    read(
        "details",
        &format!("/api/v1/sessions/details?sessionId={sid}"),
        None,
    )
    .await?;
    read(
        "update",
        "/api/v1/sessions/update",
        Some(json!({"sessionId": sid, "name": "paths"})),
    )
    .await?;
    read(
        "restore",
        "/api/v1/sessions/restore",
        Some(json!({"sessionId": sid})),
    )
    .await?;
    read(
        "runtime settings",
        "/api/v1/runtime-settings",
        Some(json!({"sessionId": sid, "runtimeSettings": {"mode": "x"}})),
    )
    .await?;
    read(
        "model",
        "/api/v1/sessions/model",
        Some(json!({"sessionId": sid, "model": {"provider": "echo", "id": "echo"}})),
    )
    .await?;
    read("health", "/api/v1/system/health", None).await?;
    read("agent options", "/api/v1/agent/options", None).await?;
    read(
        "latest events",
        &format!("/api/v1/sessions/events/latest?sessionId={sid}"),
        None,
    )
    .await?;
    read(
        "events",
        &format!("/api/v1/sessions/events?sessionId={sid}"),
        None,
    )
    .await?;
    read(
        "share page",
        "/api/v1/sessions/share",
        Some(json!({"sessionId": sid})),
    )
    .await?;
    read(
        "workspace listing",
        &format!("/api/v1/sessions/workspace/files?sessionId={sid}"),
        None,
    )
    .await?;
    for (what, text) in &answers {
        for host in host_paths {
            ensure!(!text.contains(host), "{what} names {host}: {text}");
        }
        ensure!(
            !text.contains("sessions.db"),
            "{what} names the database: {text}"
        );
    }
    ensure!(answers.len() == 13, "every answer was read");

    // The ops view keeps them: that is where an operator looks (the model switch retired the
    // worker; a query starts one).
    server.query(&sid, "again").await?;
    let workers = server.get_ok("/api/v1/workers").await?;
    ensure!(
        workers["workers"][0]["workspace"]
            .as_str()
            .is_some_and(|w| w.ends_with(&sid) && w.contains(&root)),
        "{workers}"
    );
    Ok(())
}
