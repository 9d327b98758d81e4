//! Structured JSON errors: malformed / non-object JSON, missing fields, unknown sessions,
//! oversized bodies, wrong methods, unknown API paths, no wildcard CORS on errors and preflight.

use anyhow::{Context, Result, ensure};
use e2e::Server;
use reqwest::Method;
use serde_json::{Value, json};

const UNKNOWN: &str = "nope_nope_nope_nope_1";

/// POST endpoints that take a JSON body.
const POST_BODY_PATHS: &[&str] = &[
    "/api/v1/sessions/create",
    "/api/v1/sessions/update",
    "/api/v1/sessions/delete",
    "/api/v1/sessions/restore",
    "/api/v1/sessions/abort",
    "/api/v1/sessions/query",
    "/api/v1/sessions/query/stream",
    "/api/v1/oneshot/query",
    "/api/v1/oneshot/query/stream",
];

/// The query family (`/sessions/query`, `/oneshot/query`) may use an object-shaped `error`
/// (`{code,message,details}`), and the streaming endpoints share their handlers; for those the
/// shape of `error` is left to [`e2e::Resp::expect_error`] (string, or object with the same
/// code). Every other endpoint must use the plain shape with a string `error`.
fn plain_shape_required(what: &str) -> bool {
    // `what` is a path, optionally prefixed by the method ("GET /api/...").
    let path = what.rsplit(' ').next().unwrap_or(what);
    !(path.starts_with("/api/v1/sessions/query") || path.starts_with("/api/v1/oneshot/query"))
}

fn check(r: &e2e::Resp, path: &str, status: u16, code: &str) -> Result<()> {
    let what = format!("{path} -> expected {status} {code}");
    if plain_shape_required(path) {
        r.expect_plain_error(status, code, &what)?;
    } else {
        r.expect_error(status, code, &what)?;
    }
    // No wildcard CORS: only configured origins are named (tests/tests/auth.rs).
    ensure!(
        r.header("access-control-allow-origin").is_none(),
        "{what}: CORS permission on an error response"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_invalid_json() -> Result<()> {
    let server = Server::start_default().await?;
    for path in POST_BODY_PATHS {
        let r = server
            .post_raw(path, br#"{"sessionId":"#.to_vec(), "application/json")
            .await?;
        check(&r, path, 400, "INVALID_JSON")?;
    }
    // Server still healthy and nothing was created.
    let list = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        list["sessions"] == json!([]),
        "no session may be created: {list}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_object_json_is_400_invalid_json() -> Result<()> {
    let server = Server::start_default().await?;
    for body in [&b"[1,2]"[..], b"42", b"\"text\"", b"null"] {
        for path in POST_BODY_PATHS {
            let r = server
                .post_raw(path, body.to_vec(), "application/json")
                .await?;
            check(&r, path, 400, "INVALID_JSON")
                .map_err(|e| e.context(format!("body {:?}", String::from_utf8_lossy(body))))?;
        }
    }
    let list = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        list["sessions"] == json!([]),
        "no session may be created: {list}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_session_id_is_400() -> Result<()> {
    let server = Server::start_default().await?;
    for path in [
        "/api/v1/sessions/details",
        "/api/v1/sessions/events",
        "/api/v1/sessions/status",
        "/api/v1/sessions/details?sessionId=",
    ] {
        let r = server.get(path).await?;
        check(&r, path, 400, "SESSION_ID_REQUIRED")?;
    }
    for (path, body) in [
        (
            "/api/v1/sessions/update",
            json!({"metadata": {"name": "x"}}),
        ),
        ("/api/v1/sessions/delete", json!({})),
        ("/api/v1/sessions/restore", json!({})),
        ("/api/v1/sessions/abort", json!({})),
        ("/api/v1/sessions/query", json!({"query": "hi"})),
        ("/api/v1/sessions/query/stream", json!({"query": "hi"})),
        (
            "/api/v1/sessions/query",
            json!({"sessionId": "", "query": "hi"}),
        ),
    ] {
        let r = server.post_json(path, &body).await?;
        check(&r, path, 400, "SESSION_ID_REQUIRED")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_session_is_404() -> Result<()> {
    let server = Server::start_default().await?;
    // A real session exists, to make sure lookups are by id.
    server.create_session().await?;
    for path in [
        format!("/api/v1/sessions/details?sessionId={UNKNOWN}"),
        format!("/api/v1/sessions/events?sessionId={UNKNOWN}"),
        format!("/api/v1/sessions/status?sessionId={UNKNOWN}"),
    ] {
        let r = server.get(&path).await?;
        check(&r, "GET", 404, "SESSION_NOT_FOUND")?;
    }
    for (path, body) in [
        (
            "/api/v1/sessions/update",
            json!({"sessionId": UNKNOWN, "metadata": {"name": "x"}}),
        ),
        ("/api/v1/sessions/delete", json!({"sessionId": UNKNOWN})),
        ("/api/v1/sessions/restore", json!({"sessionId": UNKNOWN})),
        ("/api/v1/sessions/abort", json!({"sessionId": UNKNOWN})),
        (
            "/api/v1/sessions/query",
            json!({"sessionId": UNKNOWN, "query": "hi"}),
        ),
        (
            "/api/v1/sessions/query/stream",
            json!({"sessionId": UNKNOWN, "query": "hi"}),
        ),
    ] {
        let r = server.post_json(path, &body).await?;
        check(&r, path, 404, "SESSION_NOT_FOUND")?;
    }
    // No worker was started for the unknown id.
    ensure!(server.workers().await?.is_empty(), "no workers expected");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_empty_query_is_400() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    for body in [
        json!({"sessionId": sid}),
        json!({"sessionId": sid, "query": ""}),
        json!({"sessionId": sid, "query": null}),
    ] {
        for path in ["/api/v1/sessions/query", "/api/v1/sessions/query/stream"] {
            let r = server.post_json(path, &body).await?;
            check(&r, path, 400, "QUERY_REQUIRED")?;
        }
    }
    for body in [json!({}), json!({"query": ""}), json!({"sessionName": "x"})] {
        for path in ["/api/v1/oneshot/query", "/api/v1/oneshot/query/stream"] {
            let r = server.post_json(path, &body).await?;
            check(&r, path, 400, "QUERY_REQUIRED")?;
        }
    }
    // Nothing ran.
    ensure!(
        server.events(&sid).await?.is_empty(),
        "no events may be stored"
    );
    let st = server.status(&sid).await?;
    ensure!(st["state"] == "idle", "status: {st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    // 21 MiB of valid JSON.
    let pad = "a".repeat(21 * 1024 * 1024);
    for (path, body) in [
        ("/api/v1/sessions/create", json!({"pad": pad})),
        (
            "/api/v1/sessions/query",
            json!({"sessionId": sid, "query": pad}),
        ),
    ] {
        let bytes = serde_json::to_vec(&body)?;
        ensure!(bytes.len() > 21 * 1024 * 1024, "body size");
        let r = server
            .raw_request(
                &format!("POST {path} HTTP/1.1\r\nContent-Type: application/json"),
                bytes,
            )
            .await?;
        ensure!(
            r.status == 413,
            "{path}: expected 413, got {} {:?}",
            r.status,
            r.json
        );
        ensure!(
            r.code() == Some("PAYLOAD_TOO_LARGE"),
            "{path}: body {:?}",
            r.json
        );
        ensure!(
            r.json["message"].is_string(),
            "{path}: message missing: {:?}",
            r.json
        );
    }
    // The server is fine afterwards and the oversized query never ran.
    ensure!(
        server.events(&sid).await?.is_empty(),
        "oversized query must not run"
    );
    let r = server.query(&sid, "small").await?;
    ensure!(r["content"] == "echo: small", "after 413: {r}");
    let list = server.get_ok("/api/v1/sessions").await?;
    ensure!(
        list["sessions"].as_array().map(Vec::len) == Some(1),
        "oversized create must not create a session: {list}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405() -> Result<()> {
    let server = Server::start_default().await?;
    for (method, path) in [
        (Method::GET, "/api/v1/sessions/create"),
        (Method::DELETE, "/api/v1/sessions"),
        (Method::GET, "/api/v1/sessions/query"),
        (Method::GET, "/api/v1/sessions/delete"),
        (Method::PUT, "/api/v1/sessions/update"),
        (Method::POST, "/api/v1/health"),
        (Method::POST, "/api/v1/sessions/status"),
    ] {
        let r = server.request(method.clone(), path, None).await?;
        check(&r, &format!("{method} {path}"), 405, "METHOD_NOT_ALLOWED")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_api_path_is_404() -> Result<()> {
    let server = Server::start_default().await?;
    for (method, path) in [
        (Method::GET, "/api/v1/nope"),
        (Method::GET, "/api/nope"),
        (Method::GET, "/api/v2/sessions"),
        (Method::POST, "/api/v1/does/not/exist"),
        (Method::GET, "/api/v1/sessions/bogus"),
    ] {
        let r = server.request(method.clone(), path, None).await?;
        check(&r, &format!("{method} {path}"), 404, "NOT_FOUND")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_204() -> Result<()> {
    let server = Server::start_default().await?;
    for path in [
        "/api/v1/sessions/create",
        "/api/v1/sessions/query/stream",
        "/api/v1/nope",
        "/anything/at/all",
    ] {
        let r = server.request(Method::OPTIONS, path, None).await?;
        ensure!(r.status == 204, "OPTIONS {path}: {} {}", r.status, r.text);
        // A preflight of the server's own origin needs no permission, and gets none.
        ensure!(
            r.header("access-control-allow-origin").is_none(),
            "OPTIONS {path}: wildcard CORS"
        );
    }
    Ok(())
}

/// `details.field` of a 413, in either error shape (the query family nests it in `error`).
fn refused_field(r: &e2e::Resp) -> Option<String> {
    let details = match &r.json["error"] {
        Value::Object(inner) => &inner["details"],
        _ => &r.json["details"],
    };
    details["field"].as_str().map(str::to_owned)
}

async fn session_count(server: &Server) -> Result<usize> {
    let list = server.get_ok("/api/v1/sessions").await?;
    Ok(list["sessions"].as_array().context("sessions")?.len())
}

/// Session workspaces under the root (the root also holds the jail probes' dot-directories).
fn workspace_count(server: &Server) -> Result<usize> {
    Ok(std::fs::read_dir(server.workspace_root())?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count())
}

/// Client-given data in a session record is bounded. Every route that stores some (update,
/// runtime settings, model switch, create, one-shot) answers 413 PAYLOAD_TOO_LARGE naming
/// the field, and nothing of the request is kept: the record is byte for byte as before, and
/// a refused creation leaves no session and no workspace behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_are_413_naming_the_field_and_change_nothing() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    // Allowed sizes pass: a 256-character name, 32 tags of 64, and three 16,000-byte notes,
    // which bring the record near its 64 KiB.
    let notes = "x".repeat(16_000);
    server
        .post_ok(
            "/api/v1/sessions/update",
            &json!({"sessionId": sid, "name": "n".repeat(256), "tags": vec!["t".repeat(64); 32]}),
        )
        .await?;
    for i in 0..3 {
        server
            .post_ok(
                "/api/v1/sessions/update",
                &json!({"sessionId": sid, "metadata": {format!("note{i}"): notes}}),
            )
            .await?;
    }
    let before = server.details(&sid).await?;

    let refused: Vec<(&str, Value, &str)> = vec![
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "name": "n".repeat(257)}),
            "metadata.name",
        ),
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "metadata": {"name": "é".repeat(300)}}),
            "metadata.name",
        ),
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "tags": vec!["t"; 33]}),
            "metadata.tags",
        ),
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "tags": ["fine", "t".repeat(65)]}),
            "metadata.tags[1]",
        ),
        // Each key is fine on its own; merged into the record they are over 64 KiB.
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "name": "ok", "metadata": {"note3": notes}}),
            "metadata",
        ),
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "metadata": {"blob": "x".repeat(1 << 20)}}),
            "metadata",
        ),
        (
            "/api/v1/runtime-settings",
            json!({"sessionId": sid, "runtimeSettings": {"x": "y".repeat(17_000)}}),
            "metadata.runtimeSettings",
        ),
        (
            "/api/v1/sessions/model",
            json!({"sessionId": sid, "model": {"provider": "echo", "id": "echo", "junk": notes}}),
            "metadata",
        ),
        (
            "/api/v1/sessions/update",
            json!({"sessionId": sid, "metadata": {"modelConfig": {"provider": "echo", "id": "echo", "junk": notes}}}),
            "metadata",
        ),
    ];
    for (path, body, field) in &refused {
        let r = server.post_json(path, body).await?;
        r.expect_error(413, "PAYLOAD_TOO_LARGE", path)?;
        ensure!(
            refused_field(&r).as_deref() == Some(*field),
            "{path}: expected field {field}, got {}",
            r.text
        );
        let after = server.details(&sid).await?;
        ensure!(
            after == before,
            "{path} ({field}) changed the record:\nbefore {before}\nafter {after}"
        );
    }

    let sessions = session_count(&server).await?;
    let workspaces = workspace_count(&server)?;
    let refused_creations: Vec<(&str, Value, &str)> = vec![
        (
            "/api/v1/sessions/create",
            json!({"runtimeSettings": {"x": "y".repeat(17_000)}}),
            "metadata.runtimeSettings",
        ),
        (
            "/api/v1/sessions/create",
            json!({"agentOptions": {"x": "y".repeat(17_000)}}),
            "metadata.agentOptions",
        ),
        (
            "/api/v1/oneshot/query",
            json!({"query": "hi", "sessionName": "n".repeat(300)}),
            "metadata.name",
        ),
        (
            "/api/v1/oneshot/query/stream",
            json!({"query": "hi", "sessionTags": vec!["t"; 40]}),
            "metadata.tags",
        ),
    ];
    for (path, body, field) in &refused_creations {
        let r = server.post_json(path, body).await?;
        r.expect_error(413, "PAYLOAD_TOO_LARGE", path)?;
        ensure!(
            refused_field(&r).as_deref() == Some(*field),
            "{path}: expected field {field}, got {}",
            r.text
        );
    }
    ensure!(
        session_count(&server).await? == sessions && workspace_count(&server)? == workspaces,
        "a refused creation left a session or a workspace behind"
    );
    Ok(())
}

/// `/sessions/query` and `/oneshot/query` answer every failure in the query family's shape, as
/// the README promises: `error` is an object `{code, message, details}` (with `code`, `message`
/// and `details` also at the top), a malformed body and a missing field included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_family_errors_are_objects() -> Result<()> {
    let server = Server::start_default().await?;
    let sid = server.create_session().await?;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/api/v1/sessions/query",
            br#"{"sessionId":"#.to_vec(),
            400,
            "INVALID_JSON",
        ),
        (
            "/api/v1/sessions/query",
            b"[1]".to_vec(),
            400,
            "INVALID_JSON",
        ),
        (
            "/api/v1/sessions/query",
            json!({"query": "hi"}).to_string().into_bytes(),
            400,
            "SESSION_ID_REQUIRED",
        ),
        (
            "/api/v1/sessions/query",
            json!({"sessionId": sid}).to_string().into_bytes(),
            400,
            "QUERY_REQUIRED",
        ),
        (
            "/api/v1/sessions/query",
            json!({"sessionId": UNKNOWN, "query": "hi"})
                .to_string()
                .into_bytes(),
            404,
            "SESSION_NOT_FOUND",
        ),
        ("/api/v1/oneshot/query", b"{".to_vec(), 400, "INVALID_JSON"),
        (
            "/api/v1/oneshot/query",
            json!({"sessionName": "x"}).to_string().into_bytes(),
            400,
            "QUERY_REQUIRED",
        ),
        (
            "/api/v1/oneshot/query",
            json!({"query": "hi", "sessionTags": "not a list"})
                .to_string()
                .into_bytes(),
            400,
            "INVALID_REQUEST",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = server.post_raw(path, body, "application/json").await?;
        let what = format!("{path} -> {status} {code}");
        r.expect_error(status, code, &what)?;
        let error = &r.json["error"];
        ensure!(
            error.is_object()
                && error["code"] == code
                && error["message"].is_string()
                && error["details"].is_object(),
            "{what}: `error` is not the object {{code, message, details}}: {}",
            r.text
        );
        ensure!(
            r.json["success"] == false && r.json["details"].is_object(),
            "{what}: {}",
            r.text
        );
    }
    Ok(())
}
