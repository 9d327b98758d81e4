//! Tenancy, through what a client can reach without credentials: every session's tenant (the
//! local operator's `default`, or `import --tenant`), each tenant quota and the request rate
//! refused with 429 and nothing changed, `GET /api/v1/usage`, share links at `/s/<token>`
//! (guessing, revocation, expiry, another tenant's links, what the page may reach), and the
//! audit log over HTTP and `ctl`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::clients::{Needs, arg, artifacts_dir, available, run_node};
use e2e::{Resp, Server, ServerOpts, supervisor_bin, wait_until};
use serde_json::{Value, json};

/// A key configured for a model: it must never appear on a shared page.
const SECRET: &str = "sk-proj-TENANCYSECRET0123456789abcdef";

fn sqlite_opts(dir: &Path, config: Option<Value>) -> ServerOpts {
    let mut opts = ServerOpts::new()
        .without_workspace_flag()
        .arg("--workspace")
        .arg(dir.join("ws").display().to_string())
        .arg("--storage-type")
        .arg("sqlite")
        .arg("--storage-path")
        .arg(dir.join("sessions.db").display().to_string());
    if let Some(config) = config {
        opts = opts.config_file("config.json", config.to_string());
    }
    opts
}

/// `supervisor import --from <from> [--tenant <tenant>]` into the sqlite store in `dir`.
fn import(from: &Path, dir: &Path, tenant: Option<&str>) -> std::process::Output {
    let mut command = std::process::Command::new(supervisor_bin().expect("the binary"));
    command
        .env_clear()
        .arg("import")
        .arg("--from")
        .arg(from)
        .arg("--workspace")
        .arg(dir.join("ws"))
        .arg("--storage-type")
        .arg("sqlite")
        .arg("--storage-path")
        .arg(dir.join("sessions.db"));
    if let Some(tenant) = tenant {
        command.arg("--tenant").arg(tenant);
    }
    command.output().expect("import runs")
}

/// An upstream Tarko JSON store holding `ids`.
fn upstream(path: &Path, ids: &[&str]) -> Result<()> {
    let mut sessions = serde_json::Map::new();
    let mut events = serde_json::Map::new();
    for (i, id) in ids.iter().enumerate() {
        sessions.insert(
            (*id).into(),
            json!({"id": id, "createdAt": 1000 + i, "updatedAt": 1010 + i, "workspace": "/srv",
                   "metadata": {"name": format!("imported {id}")}}),
        );
        events.insert(
            (*id).into(),
            json!([{"id": format!("{id}-1"), "type": "user_message", "timestamp": 1000,
                    "content": format!("hello from {id}")}]),
        );
    }
    std::fs::write(
        path,
        serde_json::to_vec(&json!({"sessions": sessions, "events": events}))?,
    )?;
    Ok(())
}

fn sessions_of(listing: &Value) -> Vec<Value> {
    listing["sessions"].as_array().cloned().unwrap_or_default()
}

/// Entries in the session workspace root: one directory per session.
fn workspace_dirs(server: &Server) -> Result<usize> {
    Ok(std::fs::read_dir(server.workspace_root())?.count())
}

fn expect_refusal(resp: &Resp, code: &str, limit: &str) -> Result<()> {
    ensure!(
        resp.status == 429 && resp.code() == Some(code),
        "expected 429 {code}, got {} {}",
        resp.status,
        resp.text
    );
    ensure!(
        resp.json["details"]["limit"] == limit
            && resp.json["message"]
                .as_str()
                .is_some_and(|m| m.contains(limit)),
        "the refusal does not name {limit}: {}",
        resp.text
    );
    let retry = resp
        .header("retry-after")
        .context("no Retry-After")?
        .parse::<u64>()?;
    ensure!(retry >= 1, "Retry-After {retry}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_belong_to_a_tenant_and_imports_name_theirs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("tarko.json");
    upstream(&store, &["AcmeSessionAAAAAAAAAA", "AcmeSessionBBBBBBBBBB"])?;
    let refused = import(&store, dir.path(), Some("../etc"));
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("invalid tenant name"),
        "an unusable tenant name was accepted: {refused:?}"
    );
    let imported = import(&store, dir.path(), Some("acme"));
    ensure!(imported.status.success(), "import: {imported:?}");
    let other = dir.path().join("other.json");
    upstream(&other, &["PlainSessionCCCCCCCCC"])?;
    ensure!(import(&other, dir.path(), None).status.success());

    // Sessions of acme do not count against the default tenant's two.
    let config = json!({"tenants": {"default": {"sessions": 2}}});
    let server = Server::start(sqlite_opts(dir.path(), Some(config))).await?;
    let created = server.create_session_full().await?;
    ensure!(
        created["session"]["tenant"] == "default",
        "a new session is the default tenant's: {created}"
    );
    let sid = created["sessionId"]
        .as_str()
        .context("sessionId")?
        .to_owned();
    let details = server.details(&sid).await?;
    ensure!(details["tenant"] == "default", "{details}");
    let tenants: Vec<(String, String)> = sessions_of(&server.get_ok("/api/v1/sessions").await?)
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or_default().to_owned(),
                s["tenant"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (id, tenant) in [
        ("AcmeSessionAAAAAAAAAA", "acme"),
        ("AcmeSessionBBBBBBBBBB", "acme"),
        ("PlainSessionCCCCCCCCC", "default"),
        (sid.as_str(), "default"),
    ] {
        ensure!(
            tenants.contains(&(id.to_owned(), tenant.to_owned())),
            "{id} should be {tenant}'s: {tenants:?}"
        );
    }
    let usage = server.get_ok("/api/v1/usage").await?;
    ensure!(
        usage["tenant"] == "default"
            && usage["usage"]["sessions"] == json!({"used": 2, "limit": 2}),
        "{usage}"
    );
    let full = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    expect_refusal(&full, "QUOTA_EXCEEDED", "sessions")?;

    // The tenant is stored: it survives a restart.
    drop(server);
    let server = Server::start(sqlite_opts(dir.path(), None)).await?;
    ensure!(server.details("AcmeSessionAAAAAAAAAA").await?["tenant"] == "acme");
    ensure!(server.details(&sid).await?["tenant"] == "default");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tenant_gets_429_and_nothing_is_created() -> Result<()> {
    let config = json!({"tenants": {"default": {"sessions": 1}}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let sid = server.create_session().await?;
    let before = server.get_ok("/api/v1/sessions").await?;
    let dirs = workspace_dirs(&server)?;
    for (path, body) in [
        ("/api/v1/sessions/create", json!({})),
        ("/api/v1/oneshot/query", json!({"query": "hi"})),
        ("/api/v1/oneshot/query/stream", json!({"query": "hi"})),
    ] {
        let refused = server.post_json(path, &body).await?;
        expect_refusal(&refused, "QUOTA_EXCEEDED", "sessions")
            .with_context(|| format!("POST {path}"))?;
    }
    ensure!(
        server.get_ok("/api/v1/sessions").await? == before,
        "a refused creation changed the listing"
    );
    ensure!(
        workspace_dirs(&server)? == dirs,
        "a refused creation left a workspace"
    );
    let metrics = server.get("/metrics").await?.text;
    ensure!(
        metrics.contains("agent_tenant_refusals_total{tenant=\"default\",limit=\"sessions\"} 3"),
        "{metrics}"
    );
    // A deletion makes room again.
    server.delete_session(&sid).await?;
    server.create_session().await?;
    Ok(())
}

/// Starts a long streaming run in `sid` and waits until it is running.
async fn long_run(server: &Server, sid: &str) -> Result<e2e::SseStream> {
    let mut stream = server.stream(sid, "SLOW 400").await?;
    stream.next_frame(e2e::LONG).await?;
    wait_until(Duration::from_secs(10), "the long run", async || {
        server
            .status(sid)
            .await
            .is_ok_and(|s| s["isProcessing"] == true)
    })
    .await?;
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_workers_make_room_and_then_refuse() -> Result<()> {
    let config = json!({"tenants": {"default": {"liveWorkers": 1}}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;
    server.query(&a, "first").await?;
    ensure!(server.worker_pid(&a).await?.is_some());
    // At its limit with an idle worker, the tenant's idle worker makes room.
    server.query(&b, "second").await?;
    ensure!(
        server.worker_pid(&a).await?.is_none(),
        "A's idle worker should have hibernated"
    );

    // With B's worker running, A would need a second one.
    let _running = long_run(&server, &b).await?;
    let a_events = server.events(&a).await?;
    let refused = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": a, "query": "hi"}),
        )
        .await?;
    expect_refusal(&refused, "QUOTA_EXCEEDED", "liveWorkers")?;
    ensure!(
        refused.json["error"]["code"] == "QUOTA_EXCEEDED",
        "the query family's shape: {}",
        refused.text
    );
    let refused = server
        .post_json(
            "/api/v1/sessions/query/stream",
            &json!({"sessionId": a, "query": "hi"}),
        )
        .await?;
    expect_refusal(&refused, "QUOTA_EXCEEDED", "liveWorkers")?;
    ensure!(server.events(&a).await? == a_events, "A's history changed");
    ensure!(server.worker_pid(&a).await?.is_none(), "A got a worker");
    let usage = server.get_ok("/api/v1/usage").await?;
    ensure!(
        usage["usage"]["liveWorkers"] == json!({"used": 1, "limit": 1})
            && usage["usage"]["concurrentRuns"] == json!({"used": 1, "limit": null}),
        "{usage}"
    );
    server.abort(&b).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_are_refused_without_starting_anything() -> Result<()> {
    let config = json!({"tenants": {"default": {"concurrentRuns": 1}}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let a = server.create_session().await?;
    let b = server.create_session().await?;
    let _running = long_run(&server, &a).await?;
    let b_events = server.events(&b).await?;
    let refused = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": b, "query": "hi"}),
        )
        .await?;
    expect_refusal(&refused, "QUOTA_EXCEEDED", "concurrentRuns")?;
    ensure!(server.events(&b).await? == b_events, "B's history changed");
    ensure!(server.worker_pid(&b).await?.is_none(), "B got a worker");
    server.abort(&a).await?;
    wait_until(Duration::from_secs(10), "A's run to end", async || {
        server
            .status(&a)
            .await
            .is_ok_and(|s| s["isProcessing"] == false)
    })
    .await?;
    // Once A's run has ended, B runs.
    server.query(&b, "now").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_token_budget_stops_new_runs() -> Result<()> {
    let config = json!({"tenants": {"default": {"modelTokensPerDay": 1}}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let sid = server.create_session().await?;
    server.query(&sid, "spend some tokens").await?;
    let usage = server.get_ok("/api/v1/usage").await?;
    let used = usage["usage"]["modelTokensPerDay"]["used"]
        .as_u64()
        .context("used")?;
    ensure!(used >= 1, "{usage}");
    let events = server.events(&sid).await?;
    let refused = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid, "query": "more"}),
        )
        .await?;
    expect_refusal(&refused, "QUOTA_EXCEEDED", "modelTokensPerDay")?;
    let retry: u64 = refused
        .header("retry-after")
        .context("Retry-After")?
        .parse()?;
    ensure!(
        retry <= 24 * 60 * 60,
        "the budget resets within a day: {retry}"
    );
    ensure!(
        server.events(&sid).await? == events,
        "the refused run left events"
    );
    let metrics = server.get("/metrics").await?.text;
    ensure!(
        metrics.contains(&format!(
            "agent_tenant_model_tokens_today{{tenant=\"default\"}} {used}"
        )),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_is_limited_per_tenant() -> Result<()> {
    let config = json!({"tenants": {"default": {"requestsPerSecond": 1}}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let dirs = workspace_dirs(&server)?;
    // A burst of creations: the first passes, the rest come faster than one a second.
    let mut refused = None;
    let mut created = 0;
    for _ in 0..20 {
        let resp = server
            .post_json("/api/v1/sessions/create", &json!({}))
            .await?;
        match resp.status {
            201 => created += 1,
            _ => {
                refused = Some(resp);
                break;
            }
        }
    }
    let refused = refused.context("20 creations in a row were all accepted")?;
    expect_refusal(&refused, "RATE_LIMITED", "requestsPerSecond")?;
    // Probes are not a tenant's traffic.
    for _ in 0..5 {
        server.get_ok("/api/v1/health").await?;
    }
    // Once the tenant is under its rate again, the listing shows only the creations that passed.
    let mut listing = None;
    wait_until(
        Duration::from_secs(10),
        "the tenant under its rate",
        async || match server.get("/api/v1/sessions").await {
            Ok(resp) if resp.status == 200 => {
                listing = Some(resp.json);
                true
            }
            _ => false,
        },
    )
    .await?;
    let listed = sessions_of(&listing.context("listing")?).len();
    ensure!(
        listed == created && workspace_dirs(&server)? == dirs + created,
        "{created} created, {listed} sessions listed, {} new workspaces",
        workspace_dirs(&server)? - dirs
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_sections_are_strict() -> Result<()> {
    for (config, named) in [
        (
            json!({"tenants": {"default": {"sesions": 1}}}),
            "tenants.default.sesions",
        ),
        (
            json!({"tenants": {"acme": {"liveWorkers": 0}}}),
            "tenants.acme.liveWorkers",
        ),
        (
            json!({"tenants": {"acme": {"keys": {"openai": "ACME_OPENAI_KEY"}}}}),
            "tenants.acme.keys.openai",
        ),
    ] {
        let exited = Server::expect_exit(
            ServerOpts::new().config_file("config.json", config.to_string()),
            e2e::STARTUP_TIMEOUT,
        )
        .await?;
        ensure!(
            exited.status.code() == Some(78) && exited.stderr.contains(named),
            "{config}: {exited:?}"
        );
    }
    Ok(())
}

async fn create_link(server: &Server, sid: &str, extra: Value) -> Result<(String, String)> {
    let mut body = json!({"sessionId": sid});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let made = server.post_ok("/api/v1/shares/create", &body).await?;
    let token = made["token"].as_str().context("token")?.to_owned();
    ensure!(
        token.len() == 64 && made["path"] == format!("/s/{token}").as_str(),
        "{made}"
    );
    Ok((
        made["share"]["id"].as_str().context("id")?.to_owned(),
        token,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_links_are_unguessable_revocable_and_expire() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("tarko.json");
    upstream(&store, &["AcmeSessionAAAAAAAAAA"])?;
    ensure!(import(&store, dir.path(), Some("acme")).status.success());
    let config = json!({
        "model": {"provider": "echo", "id": "echo"},
        "server": {"models": [{"provider": "openai", "id": "gpt-4o", "apiKey": SECRET}]},
    });
    let server = Server::start(sqlite_opts(dir.path(), Some(config))).await?;
    let sid = server.create_session().await?;
    server
        .query(&sid, &format!("shown words; my key is {SECRET}"))
        .await?;
    // A file in the workspace that the replay does not show.
    std::fs::write(
        dir.path().join("ws").join(&sid).join("private.txt"),
        "PRIVATE-FILE-CONTENT",
    )?;

    let (id, token) = create_link(&server, &sid, json!({})).await?;
    let page = server.get(&format!("/s/{token}")).await?;
    ensure!(page.status == 200, "{} {}", page.status, page.text);
    ensure!(
        page.text.contains("shown words"),
        "the replay is not on the page"
    );
    ensure!(!page.text.contains(SECRET), "the key is on the shared page");
    ensure!(!page.text.contains("PRIVATE-FILE-CONTENT"));
    let policy = page.header("content-security-policy").context("no CSP")?;
    ensure!(
        policy.contains("sandbox") && policy.contains("connect-src 'none'"),
        "{policy}"
    );
    for (header, value) in [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        ensure!(page.header(header).as_deref() == Some(value), "{header}");
    }
    ensure!(
        page.header("access-control-allow-credentials").is_none(),
        "credentials allowed"
    );
    // The page replays in a browser under that policy, and reaches for nothing.
    if available(Needs::Browser)? {
        let artifacts = artifacts_dir()?;
        let opened = run_node(
            "browser.mjs",
            &[
                "replay",
                &server.url(&format!("/s/{token}")),
                &arg(&artifacts)?,
                "share-link",
                "echo: shown words",
            ],
        )
        .await?;
        // The browser's own fetch of the page's icon (a server asset, outside the page's
        // policy) aside.
        let fetched: Vec<&str> = opened["requests"]
            .as_array()
            .context("requests")?
            .iter()
            .filter_map(Value::as_str)
            .filter(|url| !url.ends_with("/favicon.svg") && !url.ends_with("/favicon.ico"))
            .collect();
        ensure!(
            fetched.is_empty() && opened["pageErrors"].as_array().is_some_and(Vec::is_empty),
            "the shared page: {opened}"
        );
    }
    // Nothing beneath the link, and no workspace file through it.
    for path in [
        format!("/s/{token}/private.txt"),
        format!("/s/{token}/../{sid}/private.txt"),
    ] {
        let resp = server.get(&path).await?;
        ensure!(
            !resp.text.contains("PRIVATE-FILE-CONTENT"),
            "{path} showed a workspace file"
        );
    }

    // Guesses: a random token, a malformed one, the right one in another case, the hash.
    let listed = server.get_ok("/api/v1/shares").await?;
    let shown = listed["shares"].as_array().context("shares")?;
    ensure!(
        shown.len() == 1 && shown[0]["id"] == id.as_str() && shown[0]["sessionId"] == sid.as_str(),
        "{listed}"
    );
    ensure!(
        !listed.to_string().contains(&token),
        "the listing shows the token"
    );
    for guess in [
        "0".repeat(64),
        "not-a-token".to_owned(),
        token.to_uppercase(),
        format!("{token}0"),
        token[..63].to_owned(),
        id.clone(),
    ] {
        let resp = server.get(&format!("/s/{guess}")).await?;
        ensure!(
            resp.status == 404 && resp.code() == Some("SHARE_LINK_NOT_FOUND"),
            "/s/{guess}: {} {}",
            resp.status,
            resp.text
        );
    }
    // Only a hash is stored.
    let mut db = std::fs::read(dir.path().join("sessions.db"))?;
    if let Ok(wal) = std::fs::read(dir.path().join("sessions.db-wal")) {
        db.extend(wal);
    }
    ensure!(
        !db.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is stored in clear"
    );

    // Another tenant's link: made by the admin for acme's session, it is acme's to list and
    // revoke, not the default tenant's.
    let (acme_link, acme_token) = create_link(&server, "AcmeSessionAAAAAAAAAA", json!({})).await?;
    let listed = server.get_ok("/api/v1/shares").await?;
    ensure!(
        !listed.to_string().contains(&acme_link),
        "another tenant's link is listed: {listed}"
    );
    let refused = server
        .post_json("/api/v1/shares/revoke", &json!({"id": acme_link}))
        .await?;
    ensure!(refused.status == 404, "{}", refused.text);
    ensure!(server.get(&format!("/s/{acme_token}")).await?.status == 200);

    // Revoked: refused on the very next request, and revoking again finds nothing.
    server
        .post_ok("/api/v1/shares/revoke", &json!({"id": id}))
        .await?;
    let gone = server.get(&format!("/s/{token}")).await?;
    ensure!(
        gone.status == 404,
        "a revoked link still answers {}",
        gone.status
    );
    let again = server
        .post_json("/api/v1/shares/revoke", &json!({"id": id}))
        .await?;
    ensure!(again.status == 404 && again.code() == Some("SHARE_LINK_NOT_FOUND"));

    // Expiry: the link works, then answers 404 once its time has passed.
    let (_, short) = create_link(&server, &sid, json!({"expiresInSecs": 1})).await?;
    let listed = server.get_ok("/api/v1/shares").await?;
    ensure!(
        listed["shares"][0]["expiresAt"].as_u64().is_some(),
        "{listed}"
    );
    wait_until(Duration::from_secs(10), "the link to expire", async || {
        server
            .get(&format!("/s/{short}"))
            .await
            .is_ok_and(|r| r.status == 404)
    })
    .await?;
    for bad in [json!(0), json!(-1), json!("soon"), json!(366 * 24 * 3600)] {
        let resp = server
            .post_json(
                "/api/v1/shares/create",
                &json!({"sessionId": sid, "expiresInSecs": bad}),
            )
            .await?;
        ensure!(resp.status == 400, "expiresInSecs {bad}: {}", resp.status);
    }

    // A deleted session takes its links with it.
    let (_, doomed) = create_link(&server, &sid, json!({})).await?;
    server.delete_session(&sid).await?;
    ensure!(server.get(&format!("/s/{doomed}")).await?.status == 404);
    ensure!(
        server.get_ok("/api/v1/shares").await?["shares"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "a deleted session's links are still listed"
    );
    // Today's download sharing stays.
    let other = server.create_session().await?;
    let download = server
        .post_ok("/api/v1/sessions/share", &json!({"sessionId": other}))
        .await?;
    ensure!(download["html"].as_str().is_some());
    Ok(())
}

fn ctl_audit(server: &Server, args: &[&str]) -> Result<Value> {
    let socket: PathBuf = server.tmp_dir().join("data").join("ctl.sock");
    let output = std::process::Command::new(supervisor_bin()?)
        .env_clear()
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .arg("audit")
        .args(args)
        .output()?;
    ensure!(output.status.success(), "ctl audit: {output:?}");
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_who_did_what() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(sqlite_opts(
        dir.path(),
        Some(json!({"tenants": {"default": {"sessions": 2}}})),
    ))
    .await?;
    let sid = server.create_session().await?;
    server.query(&sid, "hello").await?;
    server
        .post_ok("/api/v1/sessions/restart", &json!({"sessionId": sid}))
        .await?;
    server
        .post_ok("/api/v1/sessions/stop", &json!({"sessionId": sid}))
        .await?;
    let (link, _) = create_link(&server, &sid, json!({})).await?;
    server
        .post_ok("/api/v1/shares/revoke", &json!({"id": link}))
        .await?;
    let doomed = server.create_session().await?;
    let refused = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    ensure!(refused.status == 429);
    server.delete_session(&doomed).await?;
    let ctl_restart = std::process::Command::new(supervisor_bin()?)
        .env_clear()
        .arg("ctl")
        .arg("--socket")
        .arg(server.tmp_dir().join("data").join("ctl.sock"))
        .arg("stop")
        .arg(&sid)
        .output()?;
    ensure!(ctl_restart.status.success(), "{ctl_restart:?}");

    let expected = [
        ("worker.stop", sid.as_str(), "ok", "ctl"),
        ("session.delete", doomed.as_str(), "ok", "local"),
        ("session.create", "", "denied", "local"),
        ("session.create", doomed.as_str(), "ok", "local"),
        ("share.revoke", link.as_str(), "ok", "local"),
        ("share.create", link.as_str(), "ok", "local"),
        ("worker.stop", sid.as_str(), "ok", "local"),
        ("worker.restart", sid.as_str(), "ok", "local"),
        ("session.create", sid.as_str(), "ok", "local"),
    ];
    let check = |entries: &[Value]| -> Result<()> {
        ensure!(entries.len() == expected.len(), "{entries:?}");
        for (entry, (action, target, outcome, user)) in entries.iter().zip(expected) {
            ensure!(
                entry["action"] == action
                    && entry["target"] == target
                    && entry["outcome"] == outcome
                    && entry["user"] == user
                    && entry["tenant"] == "default"
                    && entry["role"] == "admin"
                    && e2e::is_ms_timestamp(&entry["at"]),
                "expected {action} {target:?} {outcome} by {user}, got {entry}"
            );
        }
        Ok(())
    };
    // Paged over HTTP, newest first.
    let mut entries = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/v1/audit?limit=4&before={b}"),
            None => "/api/v1/audit?limit=4".to_owned(),
        };
        let page = server.get_ok(&path).await?;
        let got = page["entries"].as_array().context("entries")?;
        ensure!(got.len() <= 4, "{page}");
        entries.extend(got.iter().cloned());
        match page["nextBefore"].as_u64() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    check(&entries)?;
    let denied = &entries[2];
    ensure!(
        denied["detail"]
            .as_str()
            .is_some_and(|d| d.contains("sessions")),
        "{denied}"
    );
    let bad = server.get("/api/v1/audit?limit=x").await?;
    ensure!(bad.status == 400, "{}", bad.text);

    // Stored with the sessions: the same log after a restart, and through ctl.
    drop(server);
    let server = Server::start(sqlite_opts(dir.path(), None)).await?;
    let through_ctl = ctl_audit(&server, &["--limit", "100"])?;
    check(through_ctl["entries"].as_array().context("entries")?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_calls_models_with_its_own_key() -> Result<()> {
    const SERVER_KEY: &str = "sk-server-key-0123456789abcdef";
    const ACME_KEY: &str = "sk-acme-own-key-0123456789abcdef";
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("tarko.json");
    upstream(&store, &["AcmeSessionAAAAAAAAAA"])?;
    ensure!(import(&store, dir.path(), Some("acme")).status.success());
    let fake = e2e::fake_llm::FakeLlm::start().await?;
    let config = json!({"tenants": {"acme": {"keys": {"openai": "ACME_OPENAI_KEY"}}}});
    let server = Server::start(
        sqlite_opts(dir.path(), Some(config))
            .env("OPENAI_API_KEY", SERVER_KEY)
            .env("OPENAI_BASE_URL", fake.openai_base_url())
            .env("MODEL_PROVIDER", "openai")
            .env("MODEL_ID", "fake-model")
            .env("ACME_OPENAI_KEY", ACME_KEY),
    )
    .await?;
    let own = server.create_session().await?;
    server.query(&own, "from the default tenant").await?;
    let acme = "AcmeSessionAAAAAAAAAA";
    server
        .query(acme, &format!("from acme, pasting {ACME_KEY}"))
        .await?;
    let keys: Vec<String> = fake
        .model_requests()
        .iter()
        .map(|r| {
            r["headers"]["authorization"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    ensure!(
        keys == [format!("Bearer {SERVER_KEY}"), format!("Bearer {ACME_KEY}")],
        "the keys sent: {keys:?}"
    );
    // The key stays in the supervisor: not in the worker's environment.
    let pid = server.wait_worker_pid(acme).await?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    ensure!(
        !environ
            .windows(ACME_KEY.len())
            .any(|w| w == ACME_KEY.as_bytes()),
        "the tenant's key is in its worker's environment"
    );
    // Each tenant's tokens are its own.
    let metrics = server.get("/metrics").await?.text;
    for tenant in ["default", "acme"] {
        let used = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "agent_tenant_model_tokens_today{{tenant=\"{tenant}\"}} "
                ))
            })
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no token gauge for {tenant}: {metrics}"))?;
        ensure!(used > 0, "{tenant} used no tokens: {metrics}");
    }
    // And a shared page masks it.
    let (_, token) = create_link(&server, acme, json!({})).await?;
    let page = server.get(&format!("/s/{token}")).await?;
    ensure!(page.status == 200 && page.text.contains("from acme, pasting"));
    ensure!(
        !page.text.contains(ACME_KEY),
        "the tenant's key is on the shared page"
    );
    Ok(())
}
