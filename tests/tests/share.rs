//! Sharing (api.md §10): the downloaded replay page, and an upload with its workspace image to a
//! share provider (a small multipart sink in this test), both opened in headless Chromium.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, ensure};
use axum::Json;
use axum::Router;
use axum::extract::{Multipart, State};
use axum::routing::post;
use e2e::clients::{Needs, arg, artifacts_dir, available, run_node};
use e2e::{Server, ServerOpts};
use serde_json::{Value, json};

/// A key configured for a model: it must never appear in a shared page.
const SECRET: &str = "sk-proj-SHARESECRET0123456789abcdef";
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n0000IHDR-test-image";

/// One multipart request the sink received.
#[derive(Debug, Clone, Default)]
struct Upload {
    fields: BTreeMap<String, String>,
    file_name: Option<String>,
    content_type: Option<String>,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Received {
    pages: Vec<Upload>,
    images: Vec<Upload>,
}

#[derive(Clone)]
struct Sink {
    port: u16,
    received: Arc<Mutex<Received>>,
}

async fn read_upload(mut multipart: Multipart) -> Upload {
    let mut upload = Upload::default();
    while let Ok(Some(field)) = multipart.next_field().await {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            upload.file_name = field.file_name().map(str::to_owned);
            upload.content_type = field.content_type().map(str::to_owned);
            upload.bytes = field.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        } else {
            let text = field.text().await.unwrap_or_default();
            upload.fields.insert(name, text);
        }
    }
    upload
}

async fn receive_page(State(sink): State<Sink>, multipart: Multipart) -> Json<Value> {
    let upload = read_upload(multipart).await;
    let slug = upload.fields.get("slug").cloned().unwrap_or_default();
    sink.received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pages
        .push(upload);
    // An existing replay parameter, to be overwritten with replay=1.
    Json(json!({"url": format!("http://127.0.0.1:{}/view/{slug}?replay=0&x=1", sink.port)}))
}

async fn receive_image(State(sink): State<Sink>, multipart: Multipart) -> Json<Value> {
    let upload = read_upload(multipart).await;
    let name = upload.file_name.clone().unwrap_or_default();
    sink.received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .images
        .push(upload);
    // http on purpose: the server must turn it into https.
    Json(json!({"url": format!("http://127.0.0.1:{}/files/{name}", sink.port)}))
}

async fn start_sink() -> Result<Sink> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink = Sink {
        port: listener.local_addr()?.port(),
        received: Arc::default(),
    };
    let app = Router::new()
        .route("/share", post(receive_page))
        .route("/storage", post(receive_image))
        .with_state(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_download_and_upload_with_images() -> Result<()> {
    if !available(Needs::Browser)? {
        return Ok(());
    }
    let sink = start_sink().await?;
    let config = json!({
        "model": {"provider": "echo", "id": "echo"},
        "server": {"models": [{"provider": "openai", "id": "gpt-4o", "apiKey": SECRET}]},
        "share": {"provider": format!("http://127.0.0.1:{}/share", sink.port)},
    });
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let shared_config = server.get_ok("/api/v1/share/config").await?;
    ensure!(
        shared_config["hasShareProvider"] == true
            && shared_config["shareProvider"]
                .as_str()
                .is_some_and(|p| p.ends_with("/share")),
        "{shared_config}"
    );

    let sid = server.create_session().await?;
    std::fs::write(server.workspace_root().join(&sid).join("chart.png"), PNG)?;
    server
        .post_ok(
            "/api/v1/sessions/update",
            &json!({"sessionId": sid, "name": "Quarterly report", "tags": ["q3"]}),
        )
        .await?;
    server
        .query(
            &sid,
            r##"TOOL write_file {"path":"report.md","content":"# Report\n![chart](./chart.png)\n"}"##,
        )
        .await?;
    let pasted = format!("my key is {SECRET} </script><script>alert(1)</script>");
    server.query(&sid, &pasted).await?;

    // Download: the page, with the events, script-safe, without the key.
    let download = server
        .post_ok("/api/v1/sessions/share", &json!({"sessionId": sid}))
        .await?;
    ensure!(download["success"] == true && download["sessionId"] == sid.as_str());
    let html = download["html"].as_str().context("html")?;
    ensure!(!html.contains(SECRET), "the key is in the downloaded page");
    ensure!(
        !html.contains("</script><script>alert(1)"),
        "an event closed the script element"
    );
    ensure!(
        html.contains("\\u003C\\/script\\u003E"),
        "no escaped </script>"
    );
    ensure!(
        html.contains("window.AGENT_SESSION_DATA") && html.contains("Quarterly report"),
        "no session data"
    );
    ensure!(
        !html.contains(&server.workspace_root().display().to_string()),
        "the server's workspace path is in the page"
    );
    let artifacts = artifacts_dir()?;
    let downloaded = artifacts.join("share-download.html");
    std::fs::write(&downloaded, html)?;
    let opened = run_node(
        "browser.mjs",
        &[
            "replay",
            &arg(&downloaded)?,
            &arg(&artifacts)?,
            "share-download",
            "tool said: Successfully wrote",
            "echo: my key is [redacted]",
        ],
    )
    .await?;
    ensure!(
        opened["requests"].as_array().is_some_and(Vec::is_empty),
        "the page called out: {opened}"
    );

    // Upload: the image first, then the page, to the provider.
    let uploaded = server
        .post_ok(
            "/api/v1/sessions/share",
            &json!({"sessionId": sid, "upload": true}),
        )
        .await?;
    let url = uploaded["url"].as_str().context("url")?;
    ensure!(
        url.starts_with(&format!("http://127.0.0.1:{}/view/", sink.port))
            && url.contains("replay=1")
            && !url.contains("replay=0")
            && url.contains("x=1"),
        "url: {url}"
    );
    let (page, image) = {
        let received = sink.received.lock().unwrap_or_else(PoisonError::into_inner);
        ensure!(
            received.pages.len() == 1 && received.images.len() == 1,
            "received {} pages, {} images",
            received.pages.len(),
            received.images.len()
        );
        (received.pages[0].clone(), received.images[0].clone())
    };
    ensure!(
        image.fields.get("type").map(String::as_str) == Some("image")
            && image.fields.get("originalPath").map(String::as_str) == Some("chart.png")
            && image.file_name.as_deref() == Some("chart.png")
            && image.content_type.as_deref() == Some("image/png")
            && image.bytes == PNG,
        "image upload: {image:?}"
    );
    let fields = &page.fields;
    ensure!(
        fields.get("type").map(String::as_str) == Some("html")
            && fields.get("sessionId") == Some(&sid)
            && fields.get("name").map(String::as_str) == Some("Quarterly report")
            && fields.get("tags").map(String::as_str) == Some(r#"["q3"]"#)
            && fields
                .get("query")
                .is_some_and(|q| q.starts_with("TOOL write_file")),
        "page fields: {fields:?}"
    );
    let slug = fields.get("slug").context("no slug")?;
    let (words, hash) = slug.rsplit_once('-').context("slug without hash")?;
    ensure!(
        words == "tool-write-file-path"
            && hash.len() == 6
            && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "slug: {slug}"
    );
    ensure!(
        page.content_type.as_deref() == Some("text/html")
            && page.file_name.as_deref().is_some_and(|n| n
                .starts_with(&format!("agent-replay-{sid}-"))
                && n.ends_with(".html")),
        "page file: {:?} {:?}",
        page.file_name,
        page.content_type
    );
    let uploaded_html = String::from_utf8(page.bytes)?;
    ensure!(
        !uploaded_html.contains(SECRET),
        "the key is in the uploaded page"
    );
    let image_url = format!("https:\\/\\/127.0.0.1:{}\\/files\\/chart.png", sink.port);
    ensure!(
        uploaded_html.contains(&format!("![chart]({image_url})")),
        "the image reference was not rewritten to {image_url}"
    );
    let page_file = artifacts.join("share-upload.html");
    std::fs::write(&page_file, &uploaded_html)?;
    run_node(
        "browser.mjs",
        &[
            "replay",
            &arg(&page_file)?,
            &arg(&artifacts)?,
            "share-upload",
            "Quarterly report",
            "tool said: Successfully wrote",
        ],
    )
    .await?;

    // Without a provider, upload: true still gives the page (api.md §3.10).
    let plain = Server::start_default().await?;
    let other = plain.create_session().await?;
    plain.query(&other, "hello").await?;
    let fallback = plain
        .post_ok(
            "/api/v1/sessions/share",
            &json!({"sessionId": other, "upload": true}),
        )
        .await?;
    ensure!(
        fallback["html"].is_string() && fallback.get("url").is_none(),
        "{fallback}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_provider_is_reported() -> Result<()> {
    // A provider that answers 500: the UI shows the body's `error`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    // It reads the upload before refusing it: a server that answers early and closes races the
    // client still sending, which then sees a reset rather than the status.
    let app = Router::new().route(
        "/share",
        post(|_body: axum::body::Bytes| async {
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no")
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = json!({"share": {"provider": format!("http://127.0.0.1:{port}/share")}});
    let server =
        Server::start(ServerOpts::new().config_file("config.json", config.to_string())).await?;
    let sid = server.create_session().await?;
    server.query(&sid, "hello").await?;
    let response = server
        .post_json(
            "/api/v1/sessions/share",
            &json!({"sessionId": sid, "upload": true}),
        )
        .await?;
    response.expect_status(500, "share to a refusing provider")?;
    ensure!(
        response.json["error"] == "HTTP error! status: 500"
            && response.json["code"] == "SHARE_FAILED",
        "{}",
        response.json
    );
    Ok(())
}

/// A session process that swaps a referenced image between a real file and a symlink to a
/// root-only host file, in a tight loop, while the share is uploaded again and again: the
/// server must never upload the host file. Strict isolation as root, commands on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_image_never_uploads_a_host_file() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let sink = start_sink().await?;
    let config = json!({
        "isolation": {"commands": true},
        "share": {"provider": format!("http://127.0.0.1:{}/share", sink.port)},
    });
    let server = Server::start(
        ServerOpts::new()
            .config_file("config.json", config.to_string())
            .arg("--isolation=strict"),
    )
    .await?;
    let health = server.get_ok("/api/v1/system/health").await?;
    ensure!(
        health["isolation"]["level"] == "strict" && health["isolation"]["commands"] == true,
        "{}",
        health["isolation"]
    );

    // The host secret: root-only, outside every workspace.
    let token = format!("HOST-SECRET-{}", uuid_like());
    let secret = server.tmp_dir().join("host-secret.txt");
    std::fs::write(&secret, &token)?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;

    let sid = server.create_session().await?;
    server.query(&sid, "hello").await?;
    let ws = server.workspace_root().join(&sid);
    std::fs::write(ws.join("seed.png"), PNG)?;
    std::fs::set_permissions(ws.join("seed.png"), std::fs::Permissions::from_mode(0o644))?;
    server
        .query(
            &sid,
            r##"TOOL write_file {"path":"report.md","content":"# Report\n![chart](./chart.png)\n"}"##,
        )
        .await?;
    // The swapper runs on after the call (its own session, outside the command's group).
    let swap = format!(
        "cp seed.png real.png; setsid sh -c 'while :; do ln -f real.png f.tmp && mv -f f.tmp \
         chart.png; ln -sfn {secret} l.tmp && mv -f l.tmp chart.png; done' >/dev/null 2>&1 & \
         echo started",
        secret = secret.display()
    );
    let answer = server
        .query(
            &sid,
            &format!("TOOL run_command {}", json!({ "command": swap })),
        )
        .await?;
    ensure!(
        answer["content"]
            .as_str()
            .is_some_and(|c| c.contains("started")),
        "the swapper did not start: {answer}"
    );
    // It runs: the image is seen as a symlink, and as a file, from the host.
    let chart = ws.join("chart.png");
    let (mut saw_link, mut saw_file) = (false, false);
    e2e::wait_until(e2e::LONG, "the swapper alternates", async || {
        match std::fs::symlink_metadata(&chart) {
            Ok(m) if m.file_type().is_symlink() => saw_link = true,
            Ok(m) if m.is_file() => saw_file = true,
            _ => {}
        }
        saw_link && saw_file
    })
    .await?;

    // Each upload is looked at once, as it arrives.
    let carries = |upload: &Upload| {
        upload
            .bytes
            .windows(token.len())
            .any(|w| w == token.as_bytes())
    };
    let (mut leaked, mut checked_images, mut checked_pages) = (0, 0, 0);
    for _ in 0..300 {
        let shared = server
            .post_ok(
                "/api/v1/sessions/share",
                &json!({"sessionId": sid, "upload": true}),
            )
            .await?;
        ensure!(shared["url"].is_string(), "{shared}");
        let received = sink.received.lock().unwrap_or_else(PoisonError::into_inner);
        leaked += received.images[checked_images..]
            .iter()
            .chain(&received.pages[checked_pages..])
            .filter(|u| carries(u))
            .count();
        (checked_images, checked_pages) = (received.images.len(), received.pages.len());
        if leaked > 0 {
            break;
        }
    }
    let received = sink.received.lock().unwrap_or_else(PoisonError::into_inner);
    ensure!(
        leaked == 0,
        "{leaked} upload(s) carried the root-only host file"
    );
    // The feature still works under the race: the real image went up.
    ensure!(
        received.images.iter().any(|i| i.bytes == PNG),
        "no upload carried the real image ({} image uploads)",
        received.images.len()
    );
    Ok(())
}

/// A random hex string (the test does not need a UUID crate for it).
fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", hasher.finish())
}
