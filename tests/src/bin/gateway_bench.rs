//! What a model round trip costs inside the server: the same non-streaming query is timed
//! against the built-in echo model (no HTTP), against the fake LLM through the gateway's real
//! HTTP path, and the fake LLM is timed alone with the exact request body the gateway sent.
//! It reports medians; it asserts nothing.
//!
//! Usage: `gateway_bench [samples]`, with the `supervisor` binary next to it or named by
//! `SUPERVISOR_BIN` (for example `cargo build --release -p supervisor -p e2e --bin supervisor
//! --bin gateway_bench && target/release/gateway_bench`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::fake_llm::FakeLlm;
use e2e::{Server, ServerOpts};
use serde_json::{Value, json};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let samples: usize = std::env::args()
        .nth(1)
        .map_or(Ok(100), |n| n.parse())
        .context("usage: gateway_bench [samples]")?;
    println!("supervisor: {}", e2e::supervisor_bin()?.display());
    e2e::install_crypto();
    let fake = FakeLlm::start().await?;
    let opts = |model: Option<Value>| {
        let mut config = json!({"logLevel": "warn"});
        if let Some(model) = model {
            config["model"] = model;
        }
        ServerOpts::new().config_file("config.json", config.to_string())
    };
    let echo = Server::start(opts(None)).await?;
    let remote = Server::start(opts(Some(json!({
        "provider": "openai-compatible", "id": "fake-model", "baseURL": fake.openai_base_url()
    }))))
    .await?;

    let echo_times = queries(&echo, samples).await?;
    let remote_times = queries(&remote, samples).await?;

    // The fake alone, with the body the gateway really sent for a timed query.
    let body = fake
        .model_requests()
        .last()
        .map(|r| r["body"].clone())
        .context("the fake saw no request")?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("{}/chat/completions", fake.openai_base_url());
    let mut direct = Vec::with_capacity(samples);
    for i in 0..samples + 10 {
        let t = Instant::now();
        let response = client.post(&url).json(&body).send().await?;
        response.bytes().await?;
        if i >= 10 {
            direct.push(t.elapsed());
        }
    }

    let (echo_p50, remote_p50, direct_p50) = (
        median(&mut echo_times.clone()),
        median(&mut remote_times.clone()),
        median(&mut direct),
    );
    println!("samples: {samples} (each: a fresh session, one warm-up query, then the timed one)");
    println!("query, echo model (no HTTP):               p50 {echo_p50:>9.3?}");
    println!("query, fake LLM via the gateway (HTTP):    p50 {remote_p50:>9.3?}");
    println!("fake LLM alone, same body, same client:    p50 {direct_p50:>9.3?}");
    println!(
        "server-side time per query around one model round trip (query − fake alone): {:.3?}",
        remote_p50.saturating_sub(direct_p50)
    );
    // Signed: the three medians come from separate samples, so a path cheaper than their
    // spread shows as a small negative number rather than a misleading zero.
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "gateway HTTP path vs in-process echo (query fake − query echo − fake alone): {:+.3} ms",
        ms(remote_p50) - ms(echo_p50) - ms(direct_p50)
    );
    Ok(())
}

/// Times `samples` non-streaming queries, each the second turn of a fresh session (the first
/// starts the worker, which is not what is measured here).
async fn queries(server: &Server, samples: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + 10 {
        let sid = server.create_session().await?;
        server.query(&sid, "warm up").await?;
        let t = Instant::now();
        let result = server.query(&sid, "hi").await?;
        let elapsed = t.elapsed();
        if result["content"] != "echo: hi" {
            bail!("unexpected answer {result}");
        }
        if i >= 10 {
            times.push(elapsed);
        }
        server.delete_session(&sid).await?;
    }
    Ok(times)
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}
