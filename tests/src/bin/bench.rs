//! Load generator behind `scripts/bench.sh`: starts the release `supervisor` on a loopback port
//! and measures it from outside, the way a client sees it. It reports; it asserts nothing.
//!
//! Usage: bench <path to supervisor> [--json <file>]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const SAMPLES: usize = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = PathBuf::from(
        args.next()
            .context("usage: bench <supervisor binary> [--json FILE]")?,
    );
    let json_out = match (args.next().as_deref(), args.next()) {
        (Some("--json"), Some(path)) => Some(PathBuf::from(path)),
        _ => None,
    };
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(&binary)
        .args(["--host", "127.0.0.1", "--port", "0", "--workspace"])
        .arg(dir.path().join("ws"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let base = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await??
            .context("server exited")?;
        if let Some(url) = line.strip_prefix("supervisor listening on ") {
            break url.trim().to_owned();
        }
    };
    e2e::install_crypto();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(pid)?;

    let mut create = Vec::new();
    let mut first_query = Vec::new();
    let mut warm_query = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let created: Value = client
            .post(format!("{base}/api/v1/sessions/create"))
            .send()
            .await?
            .json()
            .await?;
        create.push(t.elapsed());
        let id = created["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_owned();
        let t = Instant::now();
        query(&client, &base, &id, "hi").await?;
        first_query.push(t.elapsed());
        sessions.push(id);
    }
    let warm = &sessions[0];
    for _ in 0..SAMPLES {
        let t = Instant::now();
        query(&client, &base, warm, "hi").await?;
        warm_query.push(t.elapsed());
    }
    let workers: Value = client
        .get(format!("{base}/api/v1/workers"))
        .send()
        .await?
        .json()
        .await?;
    let worker_pids: Vec<u32> = workers["workers"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|w| w["pid"].as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default();
    let worker_rss: Vec<u64> = worker_pids
        .iter()
        .filter_map(|p| rss_kib(*p).ok())
        .collect();
    let loaded_rss = rss_kib(pid)?;

    let (events, elapsed) = flood(&client, &base, warm, 100_000).await?;

    let report = json!({
        "samples": SAMPLES,
        "create_session_ms": summary(&create),
        "first_query_new_session_ms": summary(&first_query),
        "query_warm_session_ms": summary(&warm_query),
        "sse_events_per_second_one_session": (events as f64 / elapsed.as_secs_f64()).round(),
        "sse_events_counted": events,
        "supervisor_idle_rss_kib": idle_rss,
        "supervisor_rss_with_live_workers_kib": loaded_rss,
        "live_workers": worker_rss.len(),
        "worker_rss_kib_median": median_u64(&worker_rss),
    });
    print_table(&report);
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("\nwrote {}", path.display());
    }
    let _ = child.start_kill();
    Ok(())
}

async fn query(client: &reqwest::Client, base: &str, id: &str, text: &str) -> Result<()> {
    let response = client
        .post(format!("{base}/api/v1/sessions/query"))
        .json(&json!({"sessionId": id, "query": text}))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("query failed: {}", response.text().await?);
    }
    response.bytes().await?;
    Ok(())
}

/// Streams `FLOOD n` and counts the SSE event frames until the stream ends.
async fn flood(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    n: usize,
) -> Result<(usize, Duration)> {
    let t = Instant::now();
    let response = client
        .post(format!("{base}/api/v1/sessions/query/stream"))
        .json(&json!({"sessionId": id, "query": format!("FLOOD {n}")}))
        .send()
        .await?;
    let mut body = response.bytes_stream();
    let mut frames = 0;
    let mut carry = Vec::new();
    while let Some(chunk) = body.next().await {
        carry.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(at) = carry[start..].windows(7).position(|w| w == b"\ndata: ") {
            frames += 1;
            start += at + 1;
        }
        carry.drain(..start);
    }
    Ok((frames + 1, t.elapsed()))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

fn summary(samples: &[Duration]) -> Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    json!({"p50": round(at(0.5)), "p99": round(at(0.99)), "min": round(ms[0]), "max": round(ms[ms.len() - 1])})
}

fn median_u64(values: &[u64]) -> Option<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn print_table(report: &Value) {
    println!("{:<44} {:>12} {:>12}", "measurement", "p50", "p99");
    for key in [
        "create_session_ms",
        "first_query_new_session_ms",
        "query_warm_session_ms",
    ] {
        let s = &report[key];
        println!("{:<44} {:>12} {:>12}", key, s["p50"], s["p99"]);
    }
    for key in [
        "sse_events_per_second_one_session",
        "supervisor_idle_rss_kib",
        "supervisor_rss_with_live_workers_kib",
        "live_workers",
        "worker_rss_kib_median",
    ] {
        println!("{:<44} {:>12}", key, report[key]);
    }
}
