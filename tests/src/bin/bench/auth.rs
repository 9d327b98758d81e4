//! What authentication costs a request: two servers of the same binary, one in local mode and
//! one with `[auth] tokens = true` and a client sending an API token, asked the same things in
//! turn (so that the machine's noise falls on both alike).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::{create, query, start, summary};

/// Rounds of each measured request per server.
const ROUNDS: usize = 300;

/// `--only auth`: the non-streaming query p50 and a cheap authenticated request's p50
/// (`GET /sessions/status` of an idle session), with auth off and on.
pub(super) async fn figures(binary: &Path) -> Result<Value> {
    let off_dir = tempfile::tempdir()?;
    let off = start(binary, off_dir.path(), &[]).await?;
    let on_dir = tempfile::tempdir()?;
    let config = on_dir.path().join("auth.toml");
    std::fs::write(&config, "[auth]\ntokens = true\n")?;
    let data = on_dir.path().join("data");
    let (config, data) = (
        config.to_str().context("utf-8 path")?,
        data.to_str().context("utf-8 path")?,
    );
    let on = start(
        binary,
        on_dir.path(),
        &["--config", config, "--data-dir", data],
    )
    .await?;
    let token = admin_token(binary, data)?;

    let plain = reqwest::Client::new();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let bearer = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let refused = plain
        .post(format!("{}/api/v1/sessions/create", on.base))
        .send()
        .await?
        .status();
    ensure!(refused.as_u16() == 401, "auth is not on: {refused}");

    let off_id = create(&plain, &off.base).await?;
    let on_id = create(&bearer, &on.base).await?;
    // Both workers started and warm before anything is counted.
    for _ in 0..20 {
        query(&plain, &off.base, &off_id, "hi").await?;
        query(&bearer, &on.base, &on_id, "hi").await?;
    }
    let (mut query_off, mut query_on) = (Vec::new(), Vec::new());
    let (mut status_off, mut status_on) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        query(&plain, &off.base, &off_id, "hi").await?;
        query_off.push(t.elapsed());
        let t = Instant::now();
        query(&bearer, &on.base, &on_id, "hi").await?;
        query_on.push(t.elapsed());
        status_off.push(status(&plain, &off.base, &off_id).await?);
        status_on.push(status(&bearer, &on.base, &on_id).await?);
    }
    let p50 = |samples: &[Duration]| summary(samples)["p50"].as_f64().unwrap_or(f64::NAN);
    let (q_off, q_on) = (p50(&query_off), p50(&query_on));
    let (s_off, s_on) = (p50(&status_off), p50(&status_on));
    Ok(json!({
        "rounds": ROUNDS,
        "query_ms_auth_off": summary(&query_off),
        "query_ms_auth_on": summary(&query_on),
        "query_p50_added_percent": ((q_on / q_off - 1.0) * 1000.0).round() / 10.0,
        "status_ms_auth_off": summary(&status_off),
        "status_ms_auth_on": summary(&status_on),
        "per_request_added_us_p50": ((s_on - s_off) * 1000.0).round(),
    }))
}

async fn status(client: &reqwest::Client, base: &str, id: &str) -> Result<Duration> {
    let t = Instant::now();
    let response = client
        .get(format!("{base}/api/v1/sessions/status?sessionId={id}"))
        .send()
        .await?;
    ensure!(
        response.status().is_success(),
        "status: {}",
        response.status()
    );
    response.bytes().await?;
    Ok(t.elapsed())
}

/// An admin token made through the server's control socket, as an operator makes one.
fn admin_token(binary: &Path, data_dir: &str) -> Result<String> {
    let output = std::process::Command::new(binary)
        .env_clear()
        .args(["ctl", "--data-dir", data_dir])
        .args([
            "tokens", "create", "--tenant", "default", "--role", "admin", "--name", "bench",
        ])
        .output()
        .context("run supervisor ctl tokens create")?;
    ensure!(
        output.status.success(),
        "ctl tokens create: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_owned())
        .context("no token printed")
}
