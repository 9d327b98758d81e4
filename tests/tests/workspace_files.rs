//! The static workspace route (`GET /<path with a dot>?sessionId=`): files the agent wrote are
//! served sandboxed (`Content-Security-Policy: sandbox`, `nosniff`), active types (HTML, SVG,
//! scripts, ...) as downloads unless the request comes under `server.workspaceOrigin`; a
//! missing file or session is a JSON 404, not the UI's page; and in Chromium an agent-written
//! `report.html` cannot read the API through the server.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use e2e::clients::{Needs, arg, artifacts_dir, available, run_node};
use e2e::{Resp, Server, ServerOpts, free_port};
use serde_json::{Value, json};

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n0000IHDR-test-image";
const SVG: &str =
    r#"<svg xmlns="http://www.w3.org/2000/svg"><script>fetch('/api/v1/sessions')</script></svg>"#;
/// An agent-written page that tries to read the API as the viewer.
const REPORT: &str = r#"<!doctype html>
<html><head><title>report</title></head>
<body><h1>Quarterly report</h1>
<script>
fetch('/api/v1/sessions')
  .then((r) => r.text())
  .then((t) => { document.title = 'READ ' + t.length; return fetch('/leak?n=' + t.length); })
  .catch((e) => { document.title = 'FAILED ' + e; });
</script></body></html>"#;

/// Writes the test's files into `sid`'s workspace.
fn plant(server: &Server, sid: &str) -> Result<()> {
    let ws = server.workspace_root().join(sid);
    std::fs::write(ws.join("report.html"), REPORT)?;
    std::fs::write(ws.join("chart.svg"), SVG)?;
    std::fs::write(ws.join("chart.png"), PNG)?;
    std::fs::write(ws.join("notes.txt"), "plain")?;
    std::fs::create_dir(ws.join("docs.d"))?;
    std::fs::write(ws.join("docs.d/a.txt"), "a")?;
    std::os::unix::fs::symlink("/etc/hostname", ws.join("out.txt"))?;
    Ok(())
}

/// Checks the headers every workspace file carries, and whether it is a download.
fn check(resp: &Resp, what: &str, content_type: &str, download: bool) -> Result<()> {
    resp.expect_status(200, what)?;
    ensure!(
        resp.header("content-type").as_deref() == Some(content_type),
        "{what}: content-type {:?}",
        resp.header("content-type")
    );
    ensure!(
        resp.header("content-security-policy").as_deref() == Some("sandbox"),
        "{what}: content-security-policy {:?}",
        resp.header("content-security-policy")
    );
    ensure!(
        resp.header("x-content-type-options").as_deref() == Some("nosniff"),
        "{what}: x-content-type-options {:?}",
        resp.header("x-content-type-options")
    );
    let disposition = resp.header("content-disposition");
    if download {
        let name = what.rsplit('/').next().unwrap_or(what);
        ensure!(
            disposition
                .as_deref()
                .is_some_and(|d| d.starts_with(&format!("attachment; filename=\"{name}\""))),
            "{what}: content-disposition {disposition:?}"
        );
    } else {
        ensure!(
            disposition.is_none(),
            "{what}: content-disposition {disposition:?}"
        );
    }
    Ok(())
}

/// A client that reaches the server under the host name `host` (resolved to loopback).
fn client_for(host: &str, port: u16) -> Result<reqwest::Client> {
    e2e::install_crypto();
    Ok(reqwest::Client::builder()
        .no_proxy()
        .resolve(host, ([127, 0, 0, 1], port).into())
        .build()?)
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Resp> {
    let response = client.get(url).send().await.context(url.to_owned())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Resp {
        status,
        headers,
        text,
        json,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_files_are_sandboxed_and_active_ones_downloaded() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    plant(&server, &sid)?;
    let get = async |path: &str| server.get(&format!("{path}?sessionId={sid}")).await;

    let html = get("/report.html").await?;
    check(&html, "/report.html", "text/html; charset=utf-8", true)?;
    ensure!(html.text == REPORT, "the page's bytes");
    check(
        &get("/chart.svg").await?,
        "/chart.svg",
        "image/svg+xml",
        true,
    )?;
    let png = get("/chart.png").await?;
    check(&png, "/chart.png", "image/png", false)?;
    check(
        &get("/notes.txt").await?,
        "/notes.txt",
        "text/plain; charset=utf-8",
        false,
    )?;
    // Our own listing of a directory: shown, still sandboxed.
    check(
        &get("/docs.d/").await?,
        "/docs.d/",
        "text/html; charset=utf-8",
        false,
    )?;

    // A missing file, an unknown session, an entry that leads out: JSON 404s, not the UI.
    get("/missing.txt").await?.expect_plain_error(
        404,
        "PATH_NOT_FOUND",
        "a missing workspace file",
    )?;
    get("/out.txt")
        .await?
        .expect_plain_error(404, "PATH_NOT_FOUND", "a symlink leading out")?;
    server
        .get("/report.html?sessionId=NoSuchSession0000000")
        .await?
        .expect_plain_error(404, "SESSION_NOT_FOUND", "an unknown session")?;
    server
        .get("/report.html?sessionId=..%2F..")
        .await?
        .expect_plain_error(404, "SESSION_NOT_FOUND", "a malformed session id")?;
    let by_header = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(server.url("/missing.txt"))
        .header("x-session-id", &sid)
        .send()
        .await?;
    ensure!(
        by_header.status() == 404
            && by_header
                .text()
                .await?
                .contains("\"code\":\"PATH_NOT_FOUND\""),
        "a missing file named by x-session-id"
    );
    // Without a session, a dotted path is still the web UI's (its own assets and routes).
    let ui = server.get("/some.page").await?;
    ui.expect_status(200, "the UI without a session")?;
    ensure!(
        ui.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{:?}",
        ui.header("content-type")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_origin_gets_pages_inline_and_still_sandboxed() -> Result<()> {
    let port = free_port()?;
    // api.test is the API's name here: a name this server answers to must be configured.
    let config = json!({"server": {
        "workspaceOrigin": format!("http://files.test:{port}"),
        "allowedHosts": ["api.test"],
    }});
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .arg("--port")
            .arg(port.to_string())
            .config_file("config.json", config.to_string()),
    )
    .await?;
    let sid = server.create_session().await?;
    plant(&server, &sid)?;
    let files = client_for("files.test", port)?;
    let api = client_for("api.test", port)?;
    for (path, content_type) in [
        ("/report.html", "text/html; charset=utf-8"),
        ("/chart.svg", "image/svg+xml"),
    ] {
        let inline = fetch(
            &files,
            &format!("http://files.test:{port}{path}?sessionId={sid}"),
        )
        .await?;
        check(&inline, path, content_type, false)?;
        // Under any other host name, the same file is a download.
        let elsewhere = fetch(
            &api,
            &format!("http://api.test:{port}{path}?sessionId={sid}"),
        )
        .await?;
        check(&elsewhere, path, content_type, true)?;
        let loopback = server.get(&format!("{path}?sessionId={sid}")).await?;
        check(&loopback, path, content_type, true)?;
    }
    check(
        &fetch(
            &files,
            &format!("http://files.test:{port}/chart.png?sessionId={sid}"),
        )
        .await?,
        "/chart.png",
        "image/png",
        false,
    )?;
    Ok(())
}

/// What the page could do when Chromium opened `url`.
async fn open(url: &str, name: &str) -> Result<Value> {
    let artifacts = artifacts_dir()?;
    run_node("browser.mjs", &["workspace", url, &arg(&artifacts)?, name]).await
}

fn ensure_api_unread(report: &Value) -> Result<()> {
    let requests = report["requests"].as_array().context("requests")?;
    ensure!(
        !requests.iter().any(|r| r
            .as_str()
            .is_some_and(|p| p.starts_with("/api/") || p == "/leak")),
        "the page reached the API: {report}"
    );
    ensure!(
        !report["title"]
            .as_str()
            .is_some_and(|t| t.starts_with("READ")),
        "the page read the API: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_page_cannot_read_the_api_in_a_browser() -> Result<()> {
    if !available(Needs::Browser)? {
        return Ok(());
    }
    let port = free_port()?;
    let config = json!({"server": {"workspaceOrigin": format!("http://localhost:{port}")}});
    let server = Server::start(
        ServerOpts::new()
            .without_port_flag()
            .arg("--port")
            .arg(port.to_string())
            .config_file("config.json", config.to_string()),
    )
    .await?;
    let sid = server.create_session().await?;
    plant(&server, &sid)?;
    // A session exists, so an API read would have something to show.
    ensure!(
        Path::new(&server.workspace_root().join(&sid).join("report.html")).is_file(),
        "report.html was planted"
    );

    // On the API's origin: a download, never a page.
    let on_api = open(
        &format!("http://127.0.0.1:{port}/report.html?sessionId={sid}"),
        "workspace-report-api-origin",
    )
    .await?;
    ensure_api_unread(&on_api)?;
    ensure!(
        on_api["shown"] == false
            && on_api["downloads"]
                .as_array()
                .is_some_and(|d| d.iter().any(|n| n == "report.html")),
        "the page was not downloaded: {on_api}"
    );

    // On the workspace origin: shown, but sandboxed, so its script never runs.
    let on_files = open(
        &format!("http://localhost:{port}/report.html?sessionId={sid}"),
        "workspace-report-files-origin",
    )
    .await?;
    ensure_api_unread(&on_files)?;
    ensure!(
        on_files["shown"] == true
            && on_files["title"] == "report"
            && on_files["text"]
                .as_str()
                .is_some_and(|t| t.contains("Quarterly report")),
        "the page was not shown inline: {on_files}"
    );
    Ok(())
}
