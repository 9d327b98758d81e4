//! `GET /metrics` through the real binary: valid Prometheus text, and counters that move with
//! what the server did.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, bail, ensure};
use e2e::{LONG, Server, kill9_pid, wait_until};

/// Parses the Prometheus text format strictly enough to reject anything a scraper would:
/// every sample is `name[{labels}] value` with a float value, and belongs to a family that was
/// declared with `# TYPE`.
fn parse(text: &str) -> Result<HashMap<String, f64>> {
    let mut families = HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE without a kind")?;
            ensure!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unknown type {kind}"
            );
            families.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        ensure!(!line.starts_with('#'), "stray comment {line:?}");
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value: {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("value is not a number: {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        if series.contains('{') && !series.ends_with('}') {
            bail!("unterminated labels: {line:?}");
        }
        ensure!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| families.contains(*base))
            })
            .unwrap_or(name);
        ensure!(families.contains(family), "sample {name} has no # TYPE");
        samples.insert(series.to_owned(), value);
    }
    Ok(samples)
}

async fn scrape(server: &Server) -> Result<HashMap<String, f64>> {
    let response = server.get("/metrics").await?;
    ensure!(response.status == 200, "GET /metrics: {}", response.status);
    let content_type = response.header("content-type").unwrap_or_default();
    ensure!(
        content_type.starts_with("text/plain"),
        "content type {content_type}"
    );
    parse(&response.text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_follow_what_happened() -> Result<()> {
    let server = Server::start_default().await?;
    let before = scrape(&server).await?;
    ensure!(before["agent_workers_live"] == 0.0 && before["agent_runs_started_total"] == 0.0);

    let sid = server.create_session().await?;
    server.query(&sid, "hello").await?;
    server.stream_all(&sid, "FLOOD 50").await?;
    let after = scrape(&server).await?;
    ensure!(after["agent_sessions_created_total"] == 1.0);
    ensure!(after["agent_worker_starts_total"] == 1.0);
    ensure!(after["agent_worker_start_seconds_count"] == 1.0);
    ensure!(after["agent_runs_started_total"] == 2.0);
    ensure!(after["agent_runs_finished_total{status=\"idle\"}"] == 2.0);
    ensure!(after["agent_model_requests_total"] == 2.0);
    ensure!(
        after["agent_events_published_total"] > after["agent_events_stored_total"],
        "deltas are published, not stored"
    );
    ensure!(after["agent_workers_live"] == 1.0 && after["agent_sessions_live"] == 1.0);
    ensure!(after[&format!("agent_worker_rss_bytes{{session_id=\"{sid}\"}}")] > 0.0);

    // A worker that dies on its own counts as a crash.
    let pid = server.wait_worker_pid(&sid).await?;
    kill9_pid(pid)?;
    wait_until(LONG, "worker gone", async || {
        server.workers().await.is_ok_and(|w| w.is_empty())
    })
    .await?;
    let crashed = scrape(&server).await?;
    ensure!(crashed["agent_worker_crashes_total"] == 1.0);
    ensure!(crashed["agent_workers_live"] == 0.0);
    Ok(())
}

#[test]
fn the_parser_rejects_what_a_scraper_would() {
    assert!(parse("# TYPE a counter\na 1\n").is_ok());
    assert!(parse("a 1\n").is_err(), "untyped sample");
    assert!(
        parse("# TYPE a counter\na x\n").is_err(),
        "non-numeric value"
    );
    assert!(
        parse("# TYPE a gauge\na{x=\"1\" 2\n").is_err(),
        "unterminated labels"
    );
}
