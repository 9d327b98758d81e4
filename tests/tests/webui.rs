//! Web UI serving over plain HTTP (api.md §11): the built-in UI at `/`, a UI directory with its
//! config injected and the SPA fallback, `webui.base` (and `<base>/api/...` reaching the API),
//! what stays a JSON 404, and a wrong `staticPath` stopping the server at start. Also the
//! other endpoints the official UI reads (§11.5) that have no page of their own.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Server, ServerOpts};
use serde_json::{Value, json};

/// The value `window.<name> = …;` is set to in a served page: the shortest prefix of what
/// follows that parses as JSON and is followed by `;`.
fn injected(html: &str, name: &str) -> Result<Value> {
    let marker = format!("window.{name} = ");
    let start = html
        .find(&marker)
        .with_context(|| format!("no {name} in the page"))?
        + marker.len();
    let rest = &html[start..];
    rest.match_indices(';')
        .find_map(|(end, _)| serde_json::from_str(&rest[..end]).ok())
        .with_context(|| format!("{name} is not set to JSON"))
}

/// A UI directory like the official one: an index.html and assets under /static/.
fn ui_dir(root: &Path) -> Result<std::path::PathBuf> {
    let dir = root.join("ui");
    std::fs::create_dir_all(dir.join("static/font"))?;
    std::fs::write(
        dir.join("index.html"),
        "<!doctype html><html><head><title>UI</title></head><body><div id=\"root\"></div></body></html>",
    )?;
    std::fs::write(dir.join("static/font/a.woff2"), b"font")?;
    std::fs::write(dir.join("static/app.js"), "console.log('ui')")?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_ui_is_served_without_configuration() -> Result<()> {
    let server = Server::start_default().await?;
    for path in [
        "/",
        "/index.html",
        "/V1StGXR8_Z5jdHi6B-myT",
        "/creating?q=hi",
    ] {
        let page = server.get(path).await?;
        page.expect_status(200, path)?;
        ensure!(
            page.header("content-type").as_deref() == Some("text/html; charset=utf-8"),
            "{path}: {:?}",
            page.header("content-type")
        );
        ensure!(
            page.text.contains("id=\"sessions\""),
            "{path}: not the built-in UI"
        );
        ensure!(
            injected(&page.text, "AGENT_BASE_URL")? == "",
            "{path}: base URL"
        );
        let config = injected(&page.text, "AGENT_WEB_UI_CONFIG")?;
        ensure!(
            config["title"].is_string() && config["logo"].is_string(),
            "{config}"
        );
    }
    let icon = server.get("/favicon.svg").await?;
    icon.expect_status(200, "favicon")?;
    ensure!(icon.header("content-type").as_deref() == Some("image/svg+xml"));
    // Missing assets, API paths and other methods stay JSON 404s.
    for path in ["/missing.js", "/api/v1/nope", "/api/nope"] {
        server
            .get(path)
            .await?
            .expect_error(404, "NOT_FOUND", path)?;
    }
    server
        .post_json("/somewhere", &json!({}))
        .await?
        .expect_error(404, "NOT_FOUND", "POST /somewhere")?;
    // No wildcard CORS on what the fallback serves either.
    ensure!(
        server
            .get("/")
            .await?
            .header("access-control-allow-origin")
            .is_none()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ui_directory_gets_its_config_and_the_spa_fallback() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = ui_dir(tmp.path())?;
    let config = json!({
        "name": "Research Agent",
        "webui": {
            "type": "static",
            "staticPath": dir,
            "title": "</script><b>Lab",
            "layout": {"enableHome": false},
        },
    });
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let page = server.get("/some-session-id-1234").await?;
    page.expect_status(200, "SPA fallback")?;
    let head_end = page.text.find("</head>").context("no </head>")?;
    let script = page
        .text
        .find("window.AGENT_WEB_UI_CONFIG")
        .context("no config")?;
    ensure!(script < head_end, "the config is not injected in the head");
    ensure!(
        !page.text.contains("</script><b>Lab"),
        "the config was not made script-safe"
    );
    let injected = injected(&page.text, "AGENT_WEB_UI_CONFIG")?;
    ensure!(
        injected["title"] == "</script><b>Lab"
            && injected["layout"]["enableHome"] == false
            && injected["welcomTitle"] == "Hello, Research Agent!"
            && injected["type"] == "static",
        "{injected}"
    );
    ensure!(
        injected.get("staticPath").is_none(),
        "the server path reached the browser"
    );
    let font = server.get("/static/font/a.woff2").await?;
    font.expect_status(200, "asset")?;
    ensure!(font.text == "font" && font.header("content-type").as_deref() == Some("font/woff2"));
    let script = server.get("/static/app.js").await?;
    ensure!(script.status == 200 && script.text.contains("console.log"));
    // Encoded slashes that would climb out of the directory to a file that does exist.
    std::fs::write(tmp.path().join("secret.css"), "secret")?;
    server
        .get("/static/..%2f..%2fsecret.css")
        .await?
        .expect_error(404, "NOT_FOUND", "traversal")?;
    server
        .get("/static/missing.css")
        .await?
        .expect_error(404, "NOT_FOUND", "missing asset")?;
    // The page is read fresh on each request.
    std::fs::write(
        dir.join("index.html"),
        "<html><head></head><body>v2</body></html>",
    )?;
    ensure!(server.get("/").await?.text.contains("v2"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_prefix_serves_the_ui_and_routes_its_api_calls() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = ui_dir(tmp.path())?;
    let config = json!({"webui": {"staticPath": dir, "base": "/agent-ui/"}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    for path in ["/agent-ui", "/agent-ui/", "/agent-ui/abc"] {
        let page = server.get(path).await?;
        page.expect_status(200, path)?;
        ensure!(page.text.contains("AGENT_WEB_UI_CONFIG"), "{path}");
    }
    ensure!(server.get("/agent-ui/static/font/a.woff2").await?.text == "font");
    // Outside the base: nothing.
    server
        .get("/")
        .await?
        .expect_error(404, "NOT_FOUND", "outside the base")?;
    // <base>/api/... is the API (api.md §11.4), query string kept.
    ensure!(server.get_ok("/agent-ui/api/v1/health").await? == json!({"status": "ok"}));
    let created = server
        .post_json("/agent-ui/api/v1/sessions/create", &json!({}))
        .await?;
    created.expect_status(201, "create under the base")?;
    let sid = created.json["sessionId"].as_str().context("sessionId")?;
    let status = server
        .get_ok(&format!("/agent-ui/api/v1/sessions/status?sessionId={sid}"))
        .await?;
    ensure!(status["sessionId"] == sid, "{status}");
    // The plain API still works.
    ensure!(server.get_ok("/api/v1/health").await?["status"] == "ok");

    // A pattern base: /t/<tenant>/ui.
    let config = json!({"webui": {"staticPath": dir, "base": "/t/.+/ui"}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    ensure!(
        server
            .get("/t/acme/ui/s1")
            .await?
            .text
            .contains("AGENT_WEB_UI_CONFIG")
    );
    ensure!(server.get_ok("/t/acme/ui/api/v1/health").await?["status"] == "ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ui_directory_stops_the_server_at_start() -> Result<()> {
    let exited = Server::expect_exit(
        ServerOpts::new()
            .arg("--webui-static-path")
            .arg("{TMP}/no-such-ui"),
        Duration::from_secs(20),
    )
    .await?;
    ensure!(!exited.status.success(), "{exited:?}");
    ensure!(
        exited.stderr.contains("webui.staticPath") && exited.stderr.contains("index.html"),
        "stderr: {}",
        exited.stderr
    );
    let exited = Server::expect_exit(
        ServerOpts::new().config_file(
            "c.json",
            r#"{"webui":{"type":"remote","remoteUrl":"http://x"}}"#,
        ),
        Duration::from_secs(20),
    )
    .await?;
    ensure!(
        exited.stderr.contains("webui.type"),
        "stderr: {}",
        exited.stderr
    );
    let exited = Server::expect_exit(
        ServerOpts::new().config_file("c.json", r#"{"share":{"provider":"ftp://x"}}"#),
        Duration::from_secs(20),
    )
    .await?;
    ensure!(
        exited.stderr.contains("share.provider"),
        "stderr: {}",
        exited.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_settings_and_share_config() -> Result<()> {
    let server = Server::start_default().await?;
    ensure!(
        server.get_ok("/api/v1/runtime-settings").await?
            == json!({"schema": {"type": "object", "properties": {}}, "currentValues": {}})
    );
    ensure!(
        server.get_ok("/api/v1/share/config").await?
            == json!({"hasShareProvider": false, "shareProvider": null})
    );

    let config = json!({"server": {"runtimeSettings": {"schema": {"type": "object", "properties": {
        "mode": {"type": "string", "enum": ["fast", "deep"], "default": "fast", "title": "Mode"},
        "browse": {"type": "boolean", "default": false},
    }}}}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let sid = server.create_session().await?;
    let plain = server.get_ok("/api/v1/runtime-settings").await?;
    ensure!(
        plain["schema"]["properties"]["mode"]["enum"] == json!(["fast", "deep"])
            && plain["currentValues"] == json!({}),
        "{plain}"
    );
    let current = server
        .get_ok(&format!("/api/v1/runtime-settings?sessionId={sid}"))
        .await?;
    ensure!(
        current["currentValues"] == json!({"mode": "fast", "browse": false}),
        "{current}"
    );
    let set = server
        .post_ok(
            "/api/v1/runtime-settings",
            &json!({"sessionId": sid, "runtimeSettings": {"mode": "deep"}}),
        )
        .await?;
    ensure!(
        set["session"]["metadata"]["runtimeSettings"] == json!({"mode": "deep"})
            && set["runtimeSettings"] == json!({"mode": "deep"}),
        "{set}"
    );
    let current = server
        .get_ok(&format!("/api/v1/runtime-settings?sessionId={sid}"))
        .await?;
    ensure!(
        current["currentValues"] == json!({"mode": "deep", "browse": false}),
        "{current}"
    );
    // Unknown sessions have only defaults; bad requests are named.
    let unknown = server
        .get_ok("/api/v1/runtime-settings?sessionId=V1StGXR8_Z5jdHi6B-myT")
        .await?;
    ensure!(unknown["currentValues"]["mode"] == "fast", "{unknown}");
    server
        .post_json("/api/v1/runtime-settings", &json!({"runtimeSettings": {}}))
        .await?
        .expect_error(400, "SESSION_ID_REQUIRED", "no session")?;
    server
        .post_json(
            "/api/v1/runtime-settings",
            &json!({"sessionId": sid, "runtimeSettings": 3}),
        )
        .await?
        .expect_error(400, "RUNTIME_SETTINGS_REQUIRED", "not an object")?;
    server
        .post_json(
            "/api/v1/runtime-settings",
            &json!({"sessionId": "V1StGXR8_Z5jdHi6B-myT", "runtimeSettings": {}}),
        )
        .await?
        .expect_error(404, "SESSION_NOT_FOUND", "unknown session")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_answers_its_handshake_on_the_same_port() -> Result<()> {
    let server = Server::start_default().await?;
    let handshake = server.get("/socket.io/?EIO=4&transport=polling").await?;
    handshake.expect_status(200, "engine.io handshake")?;
    ensure!(
        handshake.text.starts_with("0{") && handshake.text.contains("\"sid\""),
        "{}",
        handshake.text
    );
    ensure!(handshake.header("access-control-allow-origin").is_none());
    // Protocol v4 clients (EIO=3) are refused: only v5 is spoken.
    let old = server.get("/socket.io/?EIO=3&transport=polling").await?;
    ensure!(
        old.status >= 400,
        "EIO=3 accepted: {} {}",
        old.status,
        old.text
    );
    Ok(())
}
