//! Identity, from an attacker's side: a page of another origin or a rebound host name, a
//! caller without credentials, a wrong, revoked or expired token, forged JWTs, a proxy header
//! from an untrusted peer, and a member of one tenant going after another tenant's session on
//! every route the router has.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{LONG, Server, ServerOpts, supervisor_bin};
use reqwest::Method;
use serde_json::{Value, json};

const TOKENS: &str = "[auth]\ntokens = true\n";

fn ctl(server: &Server, args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new(supervisor_bin()?)
        .env_clear()
        .arg("ctl")
        .arg("--data-dir")
        .arg(server.tmp_dir().join("data"))
        .args(args)
        .output()?)
}

/// `ctl tokens create ...`: the secret, from the last line of stdout.
fn create_token(server: &Server, args: &[&str]) -> Result<String> {
    let mut all = vec!["tokens", "create"];
    all.extend_from_slice(args);
    let output = ctl(server, &all)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "ctl {all:?}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let secret = stdout
        .lines()
        .last()
        .context("no output")?
        .trim()
        .to_owned();
    ensure!(secret.starts_with("agt_"), "last line {secret:?}");
    Ok(secret)
}

fn http() -> Result<reqwest::Client> {
    e2e::install_crypto();
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(LONG)
        .build()?)
}

/// One request with the given headers and an optional JSON body.
async fn call(
    server: &Server,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Result<e2e::Resp> {
    let mut request = http()?.request(method, server.url(path));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(e2e::Resp {
        status,
        headers,
        text,
        json,
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts a structured error with `status` and `code`.
fn refused(r: &e2e::Resp, status: u16, code: &str, what: &str) -> Result<()> {
    ensure!(
        r.status == status && r.code() == Some(code),
        "{what}: expected {status} {code}, got {} {}",
        r.status,
        r.text
    );
    for key in ["error", "message", "details"] {
        ensure!(r.json.get(key).is_some(), "{what}: no {key} in {}", r.text);
    }
    Ok(())
}

async fn count_sessions(server: &Server, headers: &[(&str, &str)]) -> Result<usize> {
    let r = call(server, Method::GET, "/api/v1/sessions", headers, None).await?;
    r.expect_status(200, "list sessions")?;
    Ok(r.json["sessions"].as_array().context("sessions")?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_keeps_other_pages_and_rebound_names_out() -> Result<()> {
    let server = Server::start(ServerOpts::new().local_mode().config_file(
        "c.toml",
        "[server]\nallowedOrigins = [\"https://app.example.com\"]\nallowedHosts = [\"dev.internal\"]\n",
    ))
    .await?;
    let own = format!("http://127.0.0.1:{}", server.port());
    let other = format!("http://127.0.0.1:{}", server.port() + 1);
    // A page served from another loopback port: refused, whatever it asks.
    for (method, path, body) in [
        (Method::GET, "/api/v1/sessions", None),
        (Method::POST, "/api/v1/sessions/create", Some(json!({}))),
    ] {
        let r = call(
            &server,
            method.clone(),
            path,
            &[("origin", &other)],
            body.as_ref(),
        )
        .await?;
        refused(
            &r,
            403,
            "ORIGIN_NOT_ALLOWED",
            &format!("{method} {path} from {other}"),
        )?;
        ensure!(r.header("access-control-allow-origin").is_none(), "{r:?}");
    }
    let preflight = call(
        &server,
        Method::OPTIONS,
        "/api/v1/sessions/create",
        &[("origin", &other)],
        None,
    )
    .await?;
    ensure!(
        preflight.status == 403,
        "preflight from another origin: {}",
        preflight.status
    );
    // DNS rebinding: the attacker's name resolving to 127.0.0.1.
    let rebound = call(
        &server,
        Method::GET,
        "/api/v1/sessions",
        &[("host", "attacker.example:80")],
        None,
    )
    .await?;
    refused(&rebound, 403, "HOST_NOT_ALLOWED", "a rebound host name")?;
    // A form or text body, which a page may POST without a preflight.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = server
            .post_raw("/api/v1/sessions/create", b"{}".to_vec(), ct)
            .await?;
        refused(&r, 415, "UNSUPPORTED_MEDIA_TYPE", ct)?;
    }
    ensure!(
        count_sessions(&server, &[]).await? == 0,
        "a refused request created a session"
    );

    // What is allowed: the own origin, a configured origin (with CORS naming it, never `*`),
    // a configured host name.
    let r = call(
        &server,
        Method::POST,
        "/api/v1/sessions/create",
        &[("origin", &own)],
        Some(&json!({})),
    )
    .await?;
    r.expect_status(201, "create from the own origin")?;
    let r = call(
        &server,
        Method::GET,
        "/api/v1/sessions",
        &[("origin", "https://app.example.com")],
        None,
    )
    .await?;
    r.expect_status(200, "configured origin")?;
    ensure!(
        r.header("access-control-allow-origin").as_deref() == Some("https://app.example.com"),
        "{:?}",
        r.headers
    );
    let r = call(
        &server,
        Method::GET,
        "/api/v1/sessions",
        &[("host", "dev.internal:3000")],
        None,
    )
    .await?;
    r.expect_status(200, "configured host")?;
    let r = server.get("/api/v1/health").await?;
    ensure!(
        r.header("access-control-allow-origin").is_none(),
        "{:?}",
        r.headers
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_addresses_without_auth_exit_78() -> Result<()> {
    let exited = Server::expect_exit(
        ServerOpts::new().without_host_flag().arg("--host=0.0.0.0"),
        LONG,
    )
    .await?;
    ensure!(exited.status.code() == Some(78), "{exited:?}");
    ensure!(
        exited.stderr.contains("[auth]") && exited.stderr.contains("tokens = true"),
        "the message gives the fix: {}",
        exited.stderr
    );
    // The way round: it starts, warns, and says so in health.
    let tmp = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(supervisor_bin()?)
        .env_clear()
        .args(["--host=0.0.0.0", "--port=0", "--allow-unauthenticated"])
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(LONG, lines.next_line())
        .await??
        .context("no line")?;
    let port = line.rsplit(':').next().context("port")?.trim().to_owned();
    let health: Value = http()?
        .get(format!("http://127.0.0.1:{port}/api/v1/health"))
        .send()
        .await?
        .json()
        .await?;
    child.start_kill()?;
    let output = child.wait_with_output().await?;
    ensure!(health["unauthenticated"] == true, "{health}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("WITHOUT authentication"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_created_used_revoked_and_expire() -> Result<()> {
    let server = Server::start(ServerOpts::new().config_file("c.toml", TOKENS)).await?;
    let r = server.get("/api/v1/sessions").await?;
    refused(&r, 401, "UNAUTHORIZED", "no credential")?;
    // /health says nothing but that it is up.
    let health = server.get_ok("/api/v1/health").await?;
    ensure!(health == json!({"status": "ok"}), "{health}");
    let system = server.get_ok("/api/v1/system/health").await?;
    ensure!(
        system.get("sessions").is_none() && system.get("isolation").is_none(),
        "{system}"
    );

    let token = create_token(
        &server,
        &["--tenant", "default", "--user", "ann", "--name", "laptop"],
    )?;
    let auth = bearer(&token);
    ensure!(count_sessions(&server, &[("authorization", &auth)]).await? == 0);
    ensure!(count_sessions(&server, &[("x-api-key", &token)]).await? == 0);
    let me = call(
        &server,
        Method::GET,
        "/api/v1/auth/me",
        &[("authorization", &auth)],
        None,
    )
    .await?;
    ensure!(
        me.json["user"] == "ann" && me.json["role"] == "member",
        "{}",
        me.text
    );

    // One character off, a made-up token, a JWT-looking string.
    let mut wrong = token.clone().into_bytes();
    let last = wrong.len() - 1;
    wrong[last] = if wrong[last] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong)?;
    for bad in [wrong.as_str(), "agt_0000000000000000_x", "a.b.c", ""] {
        let r = call(
            &server,
            Method::GET,
            "/api/v1/sessions",
            &[("authorization", &bearer(bad))],
            None,
        )
        .await?;
        refused(&r, 401, "UNAUTHORIZED", &format!("token {bad:?}"))?;
    }

    // The list shows neither the secret nor its hash.
    let list = ctl(&server, &["--json", "tokens", "list"])?;
    let listed: Value = serde_json::from_slice(&list.stdout)?;
    let id = listed["tokens"][0]["id"].as_str().context("id")?.to_owned();
    ensure!(listed["tokens"][0].get("hash").is_none(), "{listed}");
    ensure!(!listed.to_string().contains(&token[20..]), "{listed}");

    let revoked = ctl(&server, &["tokens", "revoke", &id])?;
    ensure!(revoked.status.success(), "{revoked:?}");
    let r = call(
        &server,
        Method::GET,
        "/api/v1/sessions",
        &[("authorization", &auth)],
        None,
    )
    .await?;
    refused(
        &r,
        401,
        "UNAUTHORIZED",
        "the very next request after revoking",
    )?;
    ensure!(
        !ctl(&server, &["tokens", "revoke", "nope"])?
            .status
            .success()
    );

    let short = create_token(&server, &["--tenant", "default", "--expires", "1s"])?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(
            &server,
            Method::GET,
            "/api/v1/sessions",
            &[("authorization", &bearer(&short))],
            None,
        )
        .await?;
        if r.status == 401 {
            ensure!(
                r.json["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("expired")),
                "{}",
                r.text
            );
            break;
        }
        r.expect_status(200, "before expiry")?;
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_cookie_and_the_stream_ticket() -> Result<()> {
    let server = Server::start(ServerOpts::new().config_file("c.toml", TOKENS)).await?;
    let token = create_token(&server, &["--tenant", "default", "--user", "ann"])?;
    let login = call(
        &server,
        Method::POST,
        "/api/v1/auth/login",
        &[],
        Some(&json!({"token": token})),
    )
    .await?;
    login.expect_status(200, "login")?;
    let cookie = login.header("set-cookie").context("no cookie")?;
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        ensure!(cookie.contains(part), "{cookie}");
    }
    ensure!(!cookie.contains("Secure"), "plain http: no Secure");
    let pair = cookie.split(';').next().context("cookie")?.to_owned();
    let sid = {
        let r = call(
            &server,
            Method::POST,
            "/api/v1/sessions/create",
            &[("cookie", &pair)],
            Some(&json!({})),
        )
        .await?;
        r.expect_status(201, "create with the cookie")?;
        r.json["sessionId"].as_str().context("id")?.to_owned()
    };
    let bad = call(
        &server,
        Method::POST,
        "/api/v1/auth/login",
        &[],
        Some(&json!({"token": "agt_nope_x"})),
    )
    .await?;
    refused(&bad, 401, "UNAUTHORIZED", "login with a wrong token")?;
    let secure = call(
        &server,
        Method::POST,
        "/api/v1/auth/login",
        &[("x-forwarded-proto", "https")],
        Some(&json!({"token": token})),
    )
    .await?;
    ensure!(
        secure
            .header("set-cookie")
            .is_some_and(|c| c.contains("Secure")),
        "{:?}",
        secure.headers
    );
    let out = call(
        &server,
        Method::POST,
        "/api/v1/auth/logout",
        &[("cookie", &pair)],
        None,
    )
    .await?;
    ensure!(
        out.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "{:?}",
        out.headers
    );

    // A ticket opens the follow stream once.
    let ticket = call(
        &server,
        Method::POST,
        "/api/v1/auth/ticket",
        &[("cookie", &pair)],
        None,
    )
    .await?;
    ticket.expect_status(200, "ticket")?;
    let ticket = ticket.json["ticket"].as_str().context("ticket")?.to_owned();
    let path = format!("/api/v1/sessions/events/stream?sessionId={sid}&ticket={ticket}");
    let response = http()?.get(server.url(&path)).send().await?;
    ensure!(response.status() == 200, "first use: {}", response.status());
    drop(response);
    let again = call(&server, Method::GET, &path, &[], None).await?;
    refused(&again, 401, "UNAUTHORIZED", "a used ticket")?;
    // A ticket is no credential anywhere else.
    let ticket = call(
        &server,
        Method::POST,
        "/api/v1/auth/ticket",
        &[("cookie", &pair)],
        None,
    )
    .await?;
    let elsewhere = format!(
        "/api/v1/sessions?ticket={}",
        ticket.json["ticket"].as_str().unwrap_or_default()
    );
    refused(
        &call(&server, Method::GET, &elsewhere, &[], None).await?,
        401,
        "UNAUTHORIZED",
        "ticket elsewhere",
    )?;
    Ok(())
}

/// What tenant A has that tenant B must neither see nor change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    events: Value,
    details: Value,
    files: BTreeMap<String, Vec<u8>>,
    worker_pid: Option<u64>,
}

fn files_under(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files_under(&path)?);
        } else {
            out.insert(path.display().to_string(), std::fs::read(&path)?);
        }
    }
    Ok(out)
}

async fn snapshot(server: &Server, admin: &str, sid: &str) -> Result<Snapshot> {
    let h = [("authorization", admin)];
    let events = call(
        server,
        Method::GET,
        &format!("/api/v1/sessions/events?sessionId={sid}"),
        &h,
        None,
    )
    .await?;
    let details = call(
        server,
        Method::GET,
        &format!("/api/v1/sessions/details?sessionId={sid}"),
        &h,
        None,
    )
    .await?;
    let workers = call(server, Method::GET, "/api/v1/workers", &h, None).await?;
    let worker_pid = workers.json["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .find(|w| w["sessionId"] == sid)
        .and_then(|w| w["pid"].as_u64());
    Ok(Snapshot {
        events: events.json["events"].clone(),
        details: details.json["session"].clone(),
        files: files_under(&server.workspace_root().join(sid))?,
        worker_pid,
    })
}

/// Every route the router has, each method, as tenant B with tenant A's session named in the
/// query and the body: B learns nothing of A's session and changes nothing of it; without a
/// credential every non-public route is a 401; a member on an admin route is a 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_access_matrix() -> Result<()> {
    let server = Server::start(ServerOpts::new().config_file("c.toml", TOKENS)).await?;
    let admin = bearer(&create_token(
        &server,
        &["--tenant", "ops", "--role", "admin"],
    )?);
    let a = bearer(&create_token(
        &server,
        &["--tenant", "default", "--user", "alice"],
    )?);
    let b = bearer(&create_token(
        &server,
        &["--tenant", "other", "--user", "bob"],
    )?);
    const MARK: &str = "secret-of-tenant-a";

    let created = call(
        &server,
        Method::POST,
        "/api/v1/sessions/create",
        &[("authorization", &a)],
        Some(&json!({})),
    )
    .await?;
    created.expect_status(201, "A creates")?;
    let sid = created.json["sessionId"].as_str().context("id")?.to_owned();
    let q = call(
        &server,
        Method::POST,
        "/api/v1/sessions/query",
        &[("authorization", &a)],
        Some(&json!({"sessionId": sid, "query": MARK})),
    )
    .await?;
    q.expect_status(200, "A queries")?;
    call(
        &server,
        Method::POST,
        "/api/v1/sessions/update",
        &[("authorization", &a)],
        Some(&json!({"sessionId": sid, "name": MARK})),
    )
    .await?
    .expect_status(200, "A names it")?;
    std::fs::write(server.workspace_root().join(&sid).join("notes.txt"), MARK)?;
    let before = snapshot(&server, &admin, &sid).await?;
    ensure!(
        before.worker_pid.is_some() && before.events.as_array().is_some_and(|e| !e.is_empty()),
        "{before:?}"
    );

    let routes = supervisor_core::route_table();
    ensure!(
        routes.len() > 30,
        "the route table is the router's: {}",
        routes.len()
    );
    let body = json!({
        "sessionId": sid, "query": "pwned", "name": "pwned", "tags": ["pwned"],
        "metadata": {"name": "pwned"}, "runtimeSettings": {"x": 1},
        "model": {"provider": "echo", "id": "echo"}, "messages": [{"role": "user", "content": "hi"}],
        "upload": false, "path": "notes.txt", "token": "x",
    });
    // Admins reach every session: their calls name a session of their own, not A's.
    let own = call(
        &server,
        Method::POST,
        "/api/v1/sessions/create",
        &[("authorization", &admin)],
        Some(&json!({})),
    )
    .await?;
    let own = own.json["sessionId"].as_str().context("id")?.to_owned();
    let admin_body = json!({"sessionId": own});
    let mut session_routes = 0;
    for route in &routes {
        for method in route.methods {
            let method: Method = method.parse()?;
            let path = format!("{}?sessionId={sid}&path=notes.txt&q=notes", route.path);
            let json_body = (method == Method::POST).then_some(&body);
            let what = format!("{method} {}", route.path);

            let anonymous = call(&server, method.clone(), &path, &[], json_body).await?;
            match route.access {
                supervisor_core::auth::Access::Public => {}
                _ => refused(
                    &anonymous,
                    401,
                    "UNAUTHORIZED",
                    &format!("{what} without a credential"),
                )?,
            }
            let r = call(
                &server,
                method.clone(),
                &path,
                &[("authorization", &b)],
                json_body,
            )
            .await?;
            if route.access == supervisor_core::auth::Access::Admin {
                refused(&r, 403, "FORBIDDEN", &format!("{what} as a member"))?;
                let own_path = format!("{}?sessionId={own}", route.path);
                let own_body = (method == Method::POST).then_some(&admin_body);
                let r = call(
                    &server,
                    method.clone(),
                    &own_path,
                    &[("authorization", &admin)],
                    own_body,
                )
                .await?;
                ensure!(
                    r.status != 401 && r.status != 403,
                    "{what} as an admin: {}",
                    r.text
                );
                continue;
            }
            if r.code() == Some("SESSION_NOT_FOUND") {
                ensure!(r.status == 404, "{what}: {}", r.text);
                session_routes += 1;
                continue;
            }
            ensure!(
                !r.text.contains(MARK),
                "{what} as tenant B shows A's data: {}",
                r.text
            );
            ensure!(
                !r.text.contains(&sid),
                "{what} as tenant B names A's session: {}",
                r.text
            );
        }
    }
    ensure!(
        session_routes >= 15,
        "only {session_routes} routes answered 404 for A's session"
    );

    // The workspace static server too.
    let file = call(
        &server,
        Method::GET,
        &format!("/notes.txt?sessionId={sid}"),
        &[("authorization", &b)],
        None,
    )
    .await?;
    ensure!(!file.text.contains(MARK), "static route: {}", file.text);
    refused(&file, 404, "SESSION_NOT_FOUND", "static route as tenant B")?;
    let file = call(
        &server,
        Method::GET,
        &format!("/notes.txt?sessionId={sid}"),
        &[("authorization", &a)],
        None,
    )
    .await?;
    ensure!(file.text == MARK, "A reads its own file: {}", file.text);

    let after = snapshot(&server, &admin, &sid).await?;
    ensure!(
        before.events == after.events,
        "tenant B changed A's events:\n{:?}\n{:?}",
        before.events,
        after.events
    );
    ensure!(
        before.details == after.details,
        "tenant B changed A's record:\n{}\n{}",
        before.details,
        after.details
    );
    ensure!(
        before.files == after.files,
        "tenant B changed A's workspace"
    );
    ensure!(
        before.worker_pid == after.worker_pid,
        "tenant B changed A's worker: {:?} {:?}",
        before.worker_pid,
        after.worker_pid
    );
    // A still sees its session; B's listing never had it.
    let listed = call(
        &server,
        Method::GET,
        "/api/v1/sessions",
        &[("authorization", &a)],
        None,
    )
    .await?;
    ensure!(
        listed.text.contains(&sid),
        "A lists its session: {}",
        listed.text
    );
    let listed = call(
        &server,
        Method::GET,
        "/api/v1/sessions",
        &[("authorization", &b)],
        None,
    )
    .await?;
    ensure!(!listed.text.contains(&sid), "{}", listed.text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_counts_only_from_a_trusted_proxy() -> Result<()> {
    let trusted = Server::start(ServerOpts::new().config_file(
        "c.toml",
        "[auth.proxy]\nheader = \"X-User-Info\"\ntrustedProxies = [\"127.0.0.0/8\"]\n",
    ))
    .await?;
    let info = "%7B%22user%22%3A%22carol%22%2C%22tenant%22%3A%22acme%22%7D"; // {"user":"carol","tenant":"acme"}
    let me = call(
        &trusted,
        Method::GET,
        "/api/v1/auth/me",
        &[("x-user-info", info)],
        None,
    )
    .await?;
    me.expect_status(200, "from a trusted proxy")?;
    ensure!(
        me.json["user"] == "carol" && me.json["tenant"] == "acme" && me.json["role"] == "member",
        "{}",
        me.text
    );
    refused(
        &call(&trusted, Method::GET, "/api/v1/auth/me", &[], None).await?,
        401,
        "UNAUTHORIZED",
        "no header",
    )?;

    let untrusted = Server::start(ServerOpts::new().config_file(
        "c.toml",
        "[auth.proxy]\nheader = \"X-Forwarded-User\"\ntrustedProxies = [\"10.0.0.0/8\"]\n",
    ))
    .await?;
    let r = call(
        &untrusted,
        Method::GET,
        "/api/v1/auth/me",
        &[("x-forwarded-user", "mallory")],
        None,
    )
    .await?;
    refused(&r, 401, "UNAUTHORIZED", "the header from an untrusted peer")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_needs_a_principal_and_keeps_to_its_tenant() -> Result<()> {
    if !e2e::clients::available(e2e::clients::Needs::SocketIo)? {
        return Ok(());
    }
    let server = Server::start(ServerOpts::new().config_file("c.toml", TOKENS)).await?;
    let a = create_token(&server, &["--tenant", "default"])?;
    let b = create_token(&server, &["--tenant", "other"])?;
    let created = call(
        &server,
        Method::POST,
        "/api/v1/sessions/create",
        &[("authorization", &bearer(&a))],
        Some(&json!({})),
    )
    .await?;
    let sid = created.json["sessionId"].as_str().context("id")?.to_owned();
    let report =
        e2e::clients::run_node("socketio.mjs", &["auth", server.base_url(), &sid, &a, &b]).await?;
    ensure!(
        report["anonymous"]
            .as_str()
            .is_some_and(|e| e.contains("connect_error")),
        "{report}"
    );
    ensure!(
        report["wrongToken"]
            .as_str()
            .is_some_and(|e| e.contains("connect_error")),
        "{report}"
    );
    ensure!(report["otherTenant"] == "Session not found", "{report}");
    ensure!(
        report["otherTenantQuery"] == "Session not found",
        "{report}"
    );
    ensure!(report["owner"]["state"].is_string(), "{report}");
    // B's query did not run in A's session.
    let events = call(
        &server,
        Method::GET,
        &format!("/api/v1/sessions/events?sessionId={sid}"),
        &[("authorization", &bearer(&a))],
        None,
    )
    .await?;
    ensure!(!events.text.contains("from-b"), "{}", events.text);
    Ok(())
}

/// A local OIDC issuer: its signing keys (P-256, made here) published as a JWKS over loopback,
/// replaceable to rotate them.
struct Issuer {
    jwks_url: String,
    published: std::sync::Arc<std::sync::Mutex<Value>>,
    _serving: tokio::task::JoinHandle<()>,
}

struct Key {
    kid: String,
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

fn new_key(kid: &str) -> Result<Key> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Key {
        kid: kid.into(),
        pkcs8: pkcs8.as_ref().to_vec(),
        public: pair.public_key().as_ref().to_vec(),
    })
}

fn jwk(key: &Key) -> Value {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // An uncompressed point: 0x04, then x and y.
    json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": key.kid,
        "x": b64(&key.public[1..33]), "y": b64(&key.public[33..65]),
    })
}

fn sign(key: &Key, claims: &Value) -> Result<String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    Ok(jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ec_der(&key.pkcs8),
    )?)
}

impl Issuer {
    async fn start(keys: &[&Key]) -> Result<Self> {
        let published = std::sync::Arc::new(std::sync::Mutex::new(
            json!({"keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()}),
        ));
        let shared = published.clone();
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let shared = shared.clone();
                async move { axum::Json(shared.lock().map(|v| v.clone()).unwrap_or_default()) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serving = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            jwks_url: format!("http://{addr}/jwks"),
            published,
            _serving: serving,
        })
    }

    fn publish(&self, keys: &[&Key]) {
        if let Ok(mut published) = self.published.lock() {
            *published = json!({"keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()});
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_from_a_configured_issuer_and_nothing_else() -> Result<()> {
    let k1 = new_key("k1")?;
    let issuer = Issuer::start(&[&k1]).await?;
    let config = format!(
        "[[auth.oidc]]\nissuer = \"https://id.test\"\naudience = \"agentd\"\njwksUrl = \"{}\"\n\
         tenantClaim = \"org\"\nroleClaim = \"roles\"\nalgorithms = [\"ES256\"]\n",
        issuer.jwks_url
    );
    let server = Server::start(ServerOpts::new().config_file("c.toml", config)).await?;
    let now = now_secs();
    let claims = |patch: Value| {
        let mut c = json!({"iss": "https://id.test", "aud": "agentd", "sub": "dana", "org": "acme",
                           "iat": now, "nbf": now - 5, "exp": now + 300});
        if let (Some(c), Some(p)) = (c.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        c
    };
    let me = |token: String| {
        let server = &server;
        async move {
            call(
                server,
                Method::GET,
                "/api/v1/auth/me",
                &[("authorization", &bearer(&token))],
                None,
            )
            .await
        }
    };

    let valid = me(sign(&k1, &claims(json!({})))?).await?;
    valid.expect_status(200, "a valid JWT")?;
    ensure!(
        valid.json["user"] == "dana"
            && valid.json["tenant"] == "acme"
            && valid.json["role"] == "member",
        "{}",
        valid.text
    );
    let admin = sign(&k1, &claims(json!({"roles": ["admin"]})))?;
    call(
        &server,
        Method::GET,
        "/api/v1/workers",
        &[("authorization", &bearer(&admin))],
        None,
    )
    .await?
    .expect_status(200, "an admin by its role claim")?;

    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    let hs256 = |secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims(json!({})),
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
    };
    let cases = [
        ("expired", sign(&k1, &claims(json!({"exp": now - 600})))?),
        (
            "not yet valid",
            sign(&k1, &claims(json!({"nbf": now + 600})))?,
        ),
        (
            "wrong aud",
            sign(&k1, &claims(json!({"aud": "someone-else"})))?,
        ),
        (
            "wrong iss",
            sign(&k1, &claims(json!({"iss": "https://evil.test"})))?,
        ),
        ("no tenant", sign(&k1, &claims(json!({"org": null})))?),
        ("alg none", none),
        ("HS256 with the public key", hs256(&k1.public)?),
        (
            "HS256 with the JWK",
            hs256(jwk(&k1).to_string().as_bytes())?,
        ),
        (
            "a key the issuer never published",
            sign(&new_key("k1")?, &claims(json!({})))?,
        ),
    ];
    for (what, token) in cases {
        refused(&me(token).await?, 401, "UNAUTHORIZED", what)?;
    }

    // The issuer rotates to k2: a token signed with it is accepted once the keys are fetched
    // again (on demand, at most every couple of seconds), and k1 is no longer.
    let k2 = new_key("k2")?;
    issuer.publish(&[&k2]);
    let rotated = sign(&k2, &claims(json!({})))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = me(rotated.clone()).await?;
        if r.status == 200 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the rotated key was never fetched: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let retired = me(sign(&k1, &claims(json!({})))?).await?;
    refused(
        &retired,
        401,
        "UNAUTHORIZED",
        "a key the issuer no longer publishes",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_port_can_neither_read_nor_drive_the_server() -> Result<()> {
    if !e2e::clients::available(e2e::clients::Needs::Browser)? {
        return Ok(());
    }
    let server = Server::start(ServerOpts::new().local_mode()).await?;
    let artifacts = e2e::clients::artifacts_dir()?;
    let report = e2e::clients::run_node(
        "browser.mjs",
        &[
            "cross-origin",
            server.base_url(),
            &e2e::clients::arg(&artifacts)?,
        ],
    )
    .await?;
    // Reading is blocked (no CORS permission, and the server refuses the origin anyway).
    let list = &report["list"];
    ensure!(
        list.get("error").is_some() || list["status"] == 403,
        "{report}"
    );
    ensure!(!list.to_string().contains("\"sessions\""), "{report}");
    ensure!(
        report["createJson"].get("error").is_some(),
        "a preflighted POST: {report}"
    );
    // The simple POSTs were sent (opaque answers) and refused by the server: nothing exists.
    ensure!(
        count_sessions(&server, &[]).await? == 0,
        "a page of another origin created a session: {report}"
    );
    ensure!(
        server.logs().contains("ORIGIN_NOT_ALLOWED"),
        "the refusals are recorded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_uis_work_after_a_cookie_login() -> Result<()> {
    if !e2e::clients::available(e2e::clients::Needs::OfficialUi)? {
        return Ok(());
    }
    let artifacts = e2e::clients::artifacts_dir()?;
    let official = Server::start(
        ServerOpts::new()
            .config_file("c.toml", TOKENS)
            .arg("--webui-static-path")
            .arg(e2e::clients::arg(&e2e::clients::official_ui_dir())?),
    )
    .await?;
    let token = create_token(&official, &["--tenant", "default", "--user", "ann"])?;
    e2e::auth_mode::remember(official.base_url(), &token);
    let report = e2e::clients::run_node(
        "browser.mjs",
        &[
            "official",
            official.base_url(),
            &e2e::clients::arg(&artifacts)?,
        ],
    )
    .await?;
    ensure!(
        report["apiErrors"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );
    ensure!(
        report["afterReload"]["user"].as_u64() >= Some(1),
        "history after reload: {report}"
    );

    // The built-in UI's scenario looks at the workers view too, which is an admin's.
    let builtin = Server::start(ServerOpts::new().config_file("c.toml", TOKENS)).await?;
    let token = create_token(&builtin, &["--tenant", "default", "--role", "admin"])?;
    e2e::auth_mode::remember(builtin.base_url(), &token);
    let report = e2e::clients::run_node(
        "browser.mjs",
        &[
            "builtin",
            builtin.base_url(),
            &e2e::clients::arg(&artifacts)?,
        ],
    )
    .await?;
    ensure!(
        report["pageErrors"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );
    ensure!(
        report["afterReload"]["assistant"].as_u64() >= Some(1),
        "{report}"
    );
    Ok(())
}
