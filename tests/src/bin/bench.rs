//! Load generator behind `scripts/bench.sh`: starts the release `supervisor` on a loopback port
//! and measures it from outside, the way a client sees it. It reports; it asserts nothing.
//!
//! Usage: bench <path to supervisor> [--json <file>] [--only SECTION]
//! where SECTION is basic, levels, fleet, soak, durable, restart, postgres, or one of `costs`
//! (see there).
//!
//! The postgres figures need a PostgreSQL database to work in, named by `AGENTD_TEST_PG_URL`
//! (scripts/bench.sh starts a throwaway cluster and sets it); without one they are skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::sse::{self, Block};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

// In a folder of their own: a file directly in src/bin would be a binary of its own.
#[path = "bench/auth.rs"]
mod auth;
#[path = "bench/costs.rs"]
mod costs;

const SAMPLES: usize = 100;

/// A running server under measurement, killed on drop.
struct Running {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    /// From spawn to the listening line.
    started_in: Duration,
    /// Its directory, under which it mounts its sessions' workspace images.
    dir: PathBuf,
}

impl Drop for Running {
    /// Kills the server and detaches what it left mounted: a supervisor keeps its sessions'
    /// images mounted across restarts by design, so a killed one leaves them behind, and every
    /// mount on the host is copied into each new worker's mount namespace, which would make the
    /// next sections' worker starts slower.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        e2e::detach_mounts_under(&self.dir);
    }
}

async fn start(binary: &Path, dir: &Path, storage: &[&str]) -> Result<Running> {
    start_with_env(binary, dir, storage, &[]).await
}

/// [`start`] with environment variables (a database URL is never a flag).
async fn start_with_env(
    binary: &Path,
    dir: &Path,
    storage: &[&str],
    env: &[(&str, &str)],
) -> Result<Running> {
    let t = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args(["--host", "127.0.0.1", "--port", "0", "--workspace"])
        .arg(dir.join("ws"))
        .args(storage)
        // Its own directory: the control socket and default data paths are relative to it.
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let base = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await??
            .context("server exited")?;
        if let Some(url) = line.strip_prefix(e2e::LISTENING_PREFIX) {
            break url.trim().to_owned();
        }
    };
    Ok(Running {
        child,
        pid,
        base,
        started_in: t.elapsed(),
        dir: dir.to_owned(),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = PathBuf::from(
        args.next()
            .context("usage: bench <supervisor binary> [--json FILE] [--only SECTION]")?,
    );
    // Each server runs in its own directory, so a relative path would not find the binary.
    let binary = std::fs::canonicalize(&binary)
        .with_context(|| format!("no binary at {}", binary.display()))?;
    let mut json_out = None;
    let mut only = None;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--json" => json_out = Some(PathBuf::from(value)),
            "--only" => only = Some(value),
            _ => bail!("unknown flag {flag}"),
        }
    }
    e2e::install_crypto();
    if let Some(section) = only {
        // One section on its own, for looking into one figure without the whole run.
        let client = reqwest::Client::new();
        let figures = match section.as_str() {
            "basic" => basic_figures(&binary).await?,
            "levels" => level_figures(&binary, &client).await?,
            "fleet" => fleet_figures(&binary, &client).await?,
            "soak" => soak(&binary).await?,
            "durable" => durable_figures(&binary, &client).await?,
            "restart" => restart_with_stored_sessions(&binary, &client, 10_000).await?,
            "postgres" => postgres_figures(&binary, &client).await?,
            "auth" => auth::figures(&binary).await?,
            other => match costs::section(&binary, other).await? {
                Some(figures) => figures,
                None => bail!(
                    "--only takes basic, levels, fleet, soak, durable, restart, postgres, auth, {}",
                    costs::SECTIONS
                ),
            },
        };
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    let basic = basic_figures(&binary).await?;
    let client = reqwest::Client::new();

    let levels = level_figures(&binary, &client).await?;
    let fleet = fleet_figures(&binary, &client).await?;
    let soak = soak(&binary).await?;

    let durable = durable_figures(&binary, &client).await?;
    let restart = restart_with_stored_sessions(&binary, &client, 10_000).await?;
    let postgres = postgres_figures(&binary, &client).await?;
    let costs = costs::all(&binary).await?;
    let auth = auth::figures(&binary).await?;

    let mut report = json!({
        "sqlite_query_warm_session_ms": durable["sqlite_query_ms"],
        "sqlite_durable_cost_per_query_ms_p50": durable["durable_cost_ms_p50"],
        "sqlite_sse_events_per_second_one_session": durable["sse_events_per_second_one_session"],
                "sqlite_stored_events_per_second_8_sessions": durable["stored_events_per_second"],
        "sqlite_appends_per_second_8_writers": durable["appends_per_second"],
                "restart_10000_sessions": restart,
        "postgres": postgres,
                "isolation_levels": levels,
        "fleet": fleet,
        "soak": soak,
        "costs": costs,
        "auth": auth,
    });
    if let (Some(report), Value::Object(basic)) = (report.as_object_mut(), basic) {
        report.extend(basic);
    }
    print_table(&report);
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// For each isolation level: 200 times, create a session and ask its first question (which
/// starts its jailed worker), at most 20 sessions alive at once; plus each worker's own
/// start-to-ready time as the supervisor measured it (`startMs` in `/workers`).
async fn level_figures(binary: &Path, client: &reqwest::Client) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for (level, extra) in [
        ("strict", &[][..]),
        ("chroot", &[][..]),
        ("none", &["--allow-insecure-isolation"][..]),
    ] {
        let dir = tempfile::tempdir()?;
        let mut args = vec!["--isolation", level];
        args.extend_from_slice(extra);
        let server = start(binary, dir.path(), &args).await?;
        let (mut samples, mut starts) = (Vec::new(), Vec::new());
        let mut live: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        for _ in 0..200 {
            let t = Instant::now();
            let id = create(client, &server.base).await?;
            query(client, &server.base, &id, "hi").await?;
            samples.push(t.elapsed());
            let workers: Value =
                get_json(client, format!("{}/api/v1/workers", server.base)).await?;
            let start_ms = workers["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["sessionId"] == id.as_str())
                .and_then(|w| w["startMs"].as_f64())
                .context("the new session's worker is not listed")?;
            starts.push(Duration::from_secs_f64(start_ms / 1000.0));
            live.push_back(id);
            if live.len() > 20
                && let Some(old) = live.pop_front()
            {
                client
                    .post(format!("{}/api/v1/sessions/delete", server.base))
                    .json(&json!({"sessionId": old}))
                    .send()
                    .await?;
            }
        }
        let health: Value =
            get_json(client, format!("{}/api/v1/system/health", server.base)).await?;
        out.insert(
            level.to_owned(),
            json!({
                "level_in_force": health["isolation"]["level"],
                "create_and_first_query_ms": summary(&samples),
                "worker_start_to_ready_ms": summary(&starts),
            }),
        );
    }
    Ok(Value::Object(out))
}

/// SSE throughput with 100 sessions streaming at once, then memory with 1,000 live sessions
/// (each has answered one query, so each has a worker).
async fn fleet_figures(binary: &Path, client: &reqwest::Client) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    // 1,000 workers commit 1,000 × the per-session limits, far above the default totals (the
    // host's memory less a reserve): raised here so that all of them stay live to be measured.
    // No disk quota, so the figures stay those of the supervisor and its workers (an image
    // backend would add a mounted filesystem per session; its cost is in the level figures).
    let config = dir.path().join("fleet.json");
    std::fs::write(
        &config,
        json!({"isolation": {"limits": {
            "totalMemory": "1100GiB", "totalPids": 300_000, "diskBackend": "none",
        }}})
        .to_string(),
    )?;
    let config = config.to_string_lossy().into_owned();
    let server = start(binary, dir.path(), &["--config", &config]).await?;
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(create(client, &server.base).await?);
    }
    let t = Instant::now();
    let per_session = 2_000;
    let streams: Vec<_> = ids[..100]
        .iter()
        .map(|id| {
            let client = client.clone();
            let base = server.base.clone();
            let id = id.clone();
            tokio::spawn(async move { flood(&client, &base, &id, per_session).await })
        })
        .collect();
    let mut events = 0;
    for stream in streams {
        events += stream.await??.0;
    }
    let sse_100 = events as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let queries = futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let client = client.clone();
            let base = server.base.clone();
            async move { query(&client, &base, &id, "hi").await }
        })
        .buffer_unordered(16);
    let results: Vec<Result<()>> = queries.collect().await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let warm_all = t.elapsed();
    let workers: Value = get_json(client, format!("{}/api/v1/workers", server.base)).await?;
    let pids: Vec<u32> = workers["workers"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|w| w["pid"].as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default();
    let sum = |f: &dyn Fn(u32) -> Result<u64>| pids.iter().filter_map(|p| f(*p).ok()).sum::<u64>();
    let workers_private = sum(&|p| status_kib(p, "RssAnon:"));
    let workers_pss = sum(&pss_kib);
    let supervisor_rss = rss_kib(server.pid)?;
    Ok(json!({
        "sse_events_per_second_100_sessions": sse_100.round(),
        "live_workers": pids.len(),
        "first_query_1000_sessions_seconds": (warm_all.as_secs_f64() * 10.0).round() / 10.0,
        "supervisor_rss_kib": supervisor_rss,
        "workers_private_kib_total": workers_private,
        "workers_pss_kib_total": workers_pss,
        "total_pss_mib": ((workers_pss + pss_kib(server.pid).unwrap_or(0)) as f64 / 1024.0).round(),
    }))
}

/// 500 sessions streaming at once for `BENCH_SOAK_SECS` (default 120), in two halves against
/// the same server: every client checks that each stream's ids are contiguous (nothing lost,
/// nothing twice) and that a session's streams continue each other. The supervisor's open fds
/// and RSS are read before, after the first half and after the second, each time with the
/// clients' connections closed. Two halves tell a leak (growth in each half) from memory the
/// allocator keeps after the first burst for the next one (growth in the first half only).
async fn soak(binary: &Path) -> Result<Value> {
    let seconds: u64 = std::env::var("BENCH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let sessions = 500;
    let dir = tempfile::tempdir()?;
    // SQLite: with the memory store, every event of every run would stay in RAM by design,
    // which says nothing about leaks.
    let db = dir.path().join("soak.db");
    let db = db.to_str().context("path")?;
    // 500 runs at once are 500 busy workers: far above the default totals (which answer 429
    // past them), so they are raised as in `fleet`, without a disk quota.
    let config = dir.path().join("soak.json");
    std::fs::write(
        &config,
        json!({"isolation": {"limits": {
            "totalMemory": "1100GiB", "totalPids": 300_000, "diskBackend": "none",
        }}})
        .to_string(),
    )?;
    let config = config.to_string_lossy().into_owned();
    let server = start(
        binary,
        dir.path(),
        &[
            "--storage-type",
            "sqlite",
            "--storage-path",
            db,
            "--config",
            &config,
        ],
    )
    .await?;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..sessions {
        let id = create(&client, &server.base).await?;
        query(&client, &server.base, &id, "warm up").await?;
        ids.push(id);
    }
    drop(client);
    let settled = || async {
        // Closed connections and finished runs need a moment to be let go of, and the
        // supervisor returns freed heap to the kernel after two quiet seconds.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid))?.count();
        anyhow::Ok((fds, rss_kib(server.pid)?))
    };
    let (fds_before, rss_before) = settled().await?;
    let half = Duration::from_secs(seconds).div_f64(2.0);
    let mut last_seen = vec![0u64; sessions];
    let (mut runs, mut events, mut faults) = (0, 0, 0);
    let mut after_halves = [(0, 0); 2];
    for after_half in &mut after_halves {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(sessions)
            .build()?;
        let until = Instant::now() + half;
        let tasks: Vec<_> = ids
            .iter()
            .zip(&last_seen)
            .map(|(id, &last)| {
                let (client, base, id) = (client.clone(), server.base.clone(), id.clone());
                tokio::spawn(async move {
                    let (mut runs, mut events, mut faults, mut last) = (0u64, 0u64, 0u64, last);
                    while Instant::now() < until {
                        let ids = stream_ids(&client, &base, &id, "FLOOD 200").await?;
                        runs += 1;
                        events += ids.len() as u64;
                        let first = ids.first().copied().unwrap_or(0);
                        if first <= last || ids.windows(2).any(|w| w[1] != w[0] + 1) {
                            faults += 1;
                        }
                        last = ids.last().copied().unwrap_or(last);
                    }
                    anyhow::Ok((runs, events, faults, last))
                })
            })
            .collect();
        for (task, last) in tasks.into_iter().zip(last_seen.iter_mut()) {
            let (r, e, f, l) = task.await??;
            runs += r;
            events += e;
            faults += f;
            *last = l;
        }
        // Our own pooled keep-alive connections would count as the server's open fds.
        drop(client);
        *after_half = settled().await?;
    }
    let [(fds_half, rss_half), (fds_after, rss_after)] = after_halves;
    Ok(json!({
        "sessions": sessions,
        "seconds": seconds,
        "runs": runs,
        "events": events,
        "streams_with_a_gap_or_duplicate": faults,
        "supervisor_fds_before": fds_before,
        "supervisor_fds_after_first_half": fds_half,
        "supervisor_fds_after": fds_after,
        "supervisor_rss_kib_before": rss_before,
        "supervisor_rss_kib_after_first_half": rss_half,
        "supervisor_rss_kib_after": rss_after,
    }))
}

/// One counter of `GET /metrics` (0 when the server does not export it).
async fn metric(client: &reqwest::Client, base: &str, name: &str) -> Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .next()
        .unwrap_or(0.0))
}

async fn get_json(client: &reqwest::Client, url: String) -> Result<Value> {
    Ok(client.get(url).send().await?.json().await?)
}

/// The seq ids of one streamed run, in arrival order.
async fn stream_ids(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    text: &str,
) -> Result<Vec<u64>> {
    let response = client
        .post(format!("{base}/api/v1/sessions/query/stream"))
        .json(&json!({"sessionId": id, "query": text}))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("stream refused: {}", response.status());
    }
    let body = response.bytes().await?;
    let mut ids = Vec::new();
    for block in sse::parse_body(std::str::from_utf8(&body)?) {
        match block? {
            Block::Id(id) | Block::Data { id: Some(id), .. } => ids.push(id),
            Block::Data { id: None, .. } | Block::Comment => {}
        }
    }
    Ok(ids)
}

/// The same warm-session query against memory and SQLite storage, interleaved so both see the
/// same machine, and stored events per second with 8 sessions querying at once on SQLite.
async fn durable_figures(binary: &Path, client: &reqwest::Client) -> Result<Value> {
    let memory_dir = tempfile::tempdir()?;
    let sqlite_dir = tempfile::tempdir()?;
    let db = sqlite_dir.path().join("sessions.db");
    let db = db.to_str().context("path")?;
    let memory = start(binary, memory_dir.path(), &[]).await?;
    let sqlite = start(
        binary,
        sqlite_dir.path(),
        &["--storage-type", "sqlite", "--storage-path", db],
    )
    .await?;
    let memory_session = create(client, &memory.base).await?;
    let sqlite_session = create(client, &sqlite.base).await?;
    query(client, &memory.base, &memory_session, "warm up").await?;
    query(client, &sqlite.base, &sqlite_session, "warm up").await?;
    let mut memory_ms = Vec::new();
    let mut sqlite_ms = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        query(client, &memory.base, &memory_session, "hi").await?;
        memory_ms.push(t.elapsed());
        let t = Instant::now();
        query(client, &sqlite.base, &sqlite_session, "hi").await?;
        sqlite_ms.push(t.elapsed());
    }
    let p50 = |d: &[Duration]| summary(d)["p50"].as_f64().unwrap_or(0.0);
    let cost = ((p50(&sqlite_ms) - p50(&memory_ms)) * 1000.0).round() / 1000.0;

    // One session streaming as fast as it can to an SSE client on each store, interleaved; the
    // median of three. On SQLite every delta's text is stored before the client gets it.
    let mut memory_rates = Vec::new();
    let mut sqlite_rates = Vec::new();
    let writes_before = metric(client, &sqlite.base, "agent_live_text_writes_total").await?;
    let mut sqlite_events = 0;
    for _ in 0..3 {
        for (base, session, rates) in [
            (&memory.base, &memory_session, &mut memory_rates),
            (&sqlite.base, &sqlite_session, &mut sqlite_rates),
        ] {
            let (events, elapsed) = flood(client, base, session, 100_000).await?;
            rates.push((events as f64 / elapsed.as_secs_f64()).round() as u64);
            if base == &sqlite.base {
                sqlite_events += events;
            }
        }
    }
    let writes =
        metric(client, &sqlite.base, "agent_live_text_writes_total").await? - writes_before;

    // Throughput: 8 sessions, each running queries back to back; every query stores 4 events.
    let sessions = 8;
    let per_session = 50;
    let mut ids = Vec::new();
    for _ in 0..sessions {
        let id = create(client, &sqlite.base).await?;
        query(client, &sqlite.base, &id, "warm up").await?;
        ids.push(id);
    }
    let t = Instant::now();
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let client = client.clone();
            let base = sqlite.base.clone();
            tokio::spawn(async move {
                for _ in 0..per_session {
                    query(&client, &base, &id, "hi").await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let stored_per_second = (sessions * per_session * 4) as f64 / t.elapsed().as_secs_f64();
    Ok(json!({
        "sqlite_query_ms": summary(&sqlite_ms),
        "durable_cost_ms_p50": cost,
        "sse_events_per_second_one_session": median_u64(&sqlite_rates),
        "memory_sse_events_per_second_one_session": median_u64(&memory_rates),
        "deltas_per_live_text_write": (sqlite_events as f64 / writes.max(1.0)).round(),
        "stored_events_per_second": stored_per_second.round(),
        "appends_per_second": sqlite_appends_per_second().await?,
    }))
}

/// Event appends per second through the SQLite backend itself (its writer thread, WAL,
/// batched transactions), with 8 sessions appending at once, each waiting for every append as
/// the server does.
async fn sqlite_appends_per_second() -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = supervisor_core::storage::SqliteStorage::open(&dir.path().join("appends.db"))?;
    appends_per_second(std::sync::Arc::new(store)).await
}

/// Event appends per second through a backend, 8 sessions appending at once, each waiting
/// for every append as the server does.
async fn appends_per_second(
    store: std::sync::Arc<dyn supervisor_core::storage::Storage>,
) -> Result<f64> {
    use supervisor_core::storage::SessionInfo;
    let sessions = 8u64;
    let per_session = 2_000u64;
    for s in 0..sessions {
        let info = SessionInfo {
            id: format!("s{s}"),
            created_at: 0,
            updated_at: 0,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(info).await?;
    }
    let event: std::sync::Arc<str> =
        json!({"id": "e", "type": "tool_result", "content": "x".repeat(200), "timestamp": 1})
            .to_string()
            .into();
    let t = Instant::now();
    let tasks: Vec<_> = (0..sessions)
        .map(|s| {
            let store = store.clone();
            let event = event.clone();
            tokio::spawn(async move {
                for seq in 1..=per_session {
                    store
                        .append_event(&format!("s{s}"), seq, event.clone(), seq)
                        .await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(((sessions * per_session) as f64 / t.elapsed().as_secs_f64()).round())
}

/// PostgreSQL, in the database `AGENTD_TEST_PG_URL` names: the durable cost of a warm-session
/// query beside memory (interleaved, so both see the same machine), stored events per second
/// with 8 sessions querying at once, and appends per second through the backend with 8
/// writers. Twice: with the server's `synchronous_commit` (on by default: every commit waits
/// for the disk) and with `synchronous_commit=off` set in the URL (a commit is acknowledged
/// before its WAL reaches the disk, as SQLite's `synchronous = NORMAL` does).
async fn postgres_figures(binary: &Path, client: &reqwest::Client) -> Result<Value> {
    if std::env::var_os(e2e::pg::URL_VAR).is_none() {
        println!(
            "postgres figures skipped: {} names no database",
            e2e::pg::URL_VAR
        );
        return Ok(json!({"skipped": format!("{} is not set", e2e::pg::URL_VAR)}));
    }
    let mut figures = serde_json::Map::new();
    for (label, settings) in [
        ("synchronous_commit_default", &[][..]),
        (
            "synchronous_commit_off",
            &[("synchronous_commit", "off")][..],
        ),
    ] {
        figures.insert(
            label.into(),
            postgres_figures_with(binary, client, settings).await?,
        );
    }
    Ok(Value::Object(figures))
}

async fn postgres_figures_with(
    binary: &Path,
    client: &reqwest::Client,
    settings: &[(&str, &str)],
) -> Result<Value> {
    let memory_dir = tempfile::tempdir()?;
    let pg_dir = tempfile::tempdir()?;
    let url = e2e::pg::new_schema_with(settings).await?;
    let memory = start(binary, memory_dir.path(), &[]).await?;
    let pg = start_with_env(
        binary,
        pg_dir.path(),
        &["--storage-type", "postgres"],
        &[("STORAGE_URL", &url)],
    )
    .await?;
    let memory_session = create(client, &memory.base).await?;
    let pg_session = create(client, &pg.base).await?;
    query(client, &memory.base, &memory_session, "warm up").await?;
    query(client, &pg.base, &pg_session, "warm up").await?;
    let mut memory_ms = Vec::new();
    let mut pg_ms = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        query(client, &memory.base, &memory_session, "hi").await?;
        memory_ms.push(t.elapsed());
        let t = Instant::now();
        query(client, &pg.base, &pg_session, "hi").await?;
        pg_ms.push(t.elapsed());
    }
    let p50 = |d: &[Duration]| summary(d)["p50"].as_f64().unwrap_or(0.0);
    let cost = ((p50(&pg_ms) - p50(&memory_ms)) * 1000.0).round() / 1000.0;

    // Throughput: 8 sessions, each running queries back to back; every query stores 4 events.
    let sessions = 8;
    let per_session = 50;
    let mut ids = Vec::new();
    for _ in 0..sessions {
        let id = create(client, &pg.base).await?;
        query(client, &pg.base, &id, "warm up").await?;
        ids.push(id);
    }
    let t = Instant::now();
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let client = client.clone();
            let base = pg.base.clone();
            tokio::spawn(async move {
                for _ in 0..per_session {
                    query(&client, &base, &id, "hi").await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let stored_per_second = (sessions * per_session * 4) as f64 / t.elapsed().as_secs_f64();
    drop((memory, pg));

    let store =
        supervisor_core::storage::PostgresStorage::open(&e2e::pg::new_schema_with(settings).await?)
            .await?;
    Ok(json!({
        "query_ms": summary(&pg_ms),
        "memory_query_ms": summary(&memory_ms),
        "durable_cost_ms_p50": cost,
        "stored_events_per_second_8_sessions": stored_per_second.round(),
        "appends_per_second_8_writers": appends_per_second(std::sync::Arc::new(store)).await?,
    }))
}

async fn create(client: &reqwest::Client, base: &str) -> Result<String> {
    let created: Value = client
        .post(format!("{base}/api/v1/sessions/create"))
        .send()
        .await?
        .json()
        .await?;
    Ok(created["sessionId"]
        .as_str()
        .context("no sessionId")?
        .to_owned())
}

/// Builds an upstream-format store of `count` sessions (4 events each), imports it into SQLite
/// with `supervisor import`, then measures start to serving: to the listening line, and to the
/// first complete session list.
async fn restart_with_stored_sessions(
    binary: &Path,
    client: &reqwest::Client,
    count: usize,
) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let upstream = dir.path().join("tarko.db");
    {
        let mut conn = rusqlite::Connection::open(&upstream)?;
        conn.execute_batch(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, createdAt INTEGER NOT NULL, updatedAt INTEGER NOT NULL,
                                    workspace TEXT NOT NULL, metadata TEXT);
             CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, sessionId TEXT NOT NULL,
                                  timestamp INTEGER NOT NULL, eventData TEXT NOT NULL);",
        )?;
        let tx = conn.transaction()?;
        for n in 0..count {
            let id = format!("BenchSession{n:09}");
            tx.execute(
                "INSERT INTO sessions VALUES (?1, ?2, ?2, '/w', ?3)",
                rusqlite::params![
                    id,
                    n as i64,
                    json!({"name": format!("session {n}")}).to_string()
                ],
            )?;
            for kind in [
                "user_message",
                "agent_run_start",
                "assistant_message",
                "agent_run_end",
            ] {
                let event = json!({"id": format!("{id}-{kind}"), "type": kind, "timestamp": n, "content": "x"});
                tx.execute(
                    "INSERT INTO events (sessionId, timestamp, eventData) VALUES (?1, ?2, ?3)",
                    rusqlite::params![id, n as i64, event.to_string()],
                )?;
            }
        }
        tx.commit()?;
    }
    let db = dir.path().join("sessions.db");
    let db = db.to_str().context("path")?;
    let t = Instant::now();
    let output = tokio::process::Command::new(binary)
        .arg("import")
        .arg("--from")
        .arg(&upstream)
        .arg("--workspace")
        .arg(dir.path().join("ws"))
        .args(["--storage-type", "sqlite", "--storage-path", db])
        .env_clear()
        .output()
        .await?;
    if !output.status.success() {
        bail!("import failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let import_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let server = start(
        binary,
        dir.path(),
        &["--storage-type", "sqlite", "--storage-path", db],
    )
    .await?;
    let listed: Value = get_json(client, format!("{}/api/v1/sessions", server.base)).await?;
    let serving = t.elapsed();
    let listed = listed["sessions"].as_array().map_or(0, Vec::len);
    if listed != count {
        bail!("expected {count} sessions after restart, listed {listed}");
    }
    Ok(json!({
        "sessions": count,
        "to_listening_ms": (server.started_in.as_secs_f64() * 1000.0).round(),
        "to_first_full_listing_ms": (serving.as_secs_f64() * 1000.0).round(),
        "import_seconds": (import_s * 10.0).round() / 10.0,
    }))
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
    // Blocks are only classified, their JSON left alone: the figure is the server's rate.
    let mut blocks = sse::Splitter::default();
    while let Some(chunk) = body.next().await {
        blocks.push(&chunk?);
        while let Some(block) = blocks.next_block() {
            if let Block::Data { .. } = sse::parse_block(std::str::from_utf8(block)?)? {
                frames += 1;
            }
        }
    }
    Ok((frames, t.elapsed()))
}

fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    kib_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status"))?,
        field,
    )
}

fn pss_kib(pid: u32) -> Result<u64> {
    kib_field(
        &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?,
        "Pss:",
    )
}

fn kib_field(text: &str, field: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field}"))
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
    println!("{:<48} {:>12} {:>12}", "measurement", "p50", "p99");
    for key in [
        "create_session_ms",
        "first_query_new_session_ms",
        "query_warm_session_ms",
        "sqlite_query_warm_session_ms",
    ] {
        let s = &report[key];
        println!(
            "{:<48} {:>12} {:>12}",
            key,
            s["p50"].to_string(),
            s["p99"].to_string()
        );
    }
    for key in [
        "sqlite_durable_cost_per_query_ms_p50",
        "sqlite_sse_events_per_second_one_session",
        "sqlite_stored_events_per_second_8_sessions",
        "sqlite_appends_per_second_8_writers",
        "sse_events_per_second_one_session",
        "supervisor_idle_rss_kib",
        "supervisor_rss_with_live_workers_kib",
        "live_workers",
        "worker_rss_kib_median",
        "worker_private_kib_median",
        "worker_pss_kib_median",
    ] {
        println!("{:<48} {:>12}", key, report[key].to_string());
    }
    for (level, figures) in report["isolation_levels"].as_object().into_iter().flatten() {
        let s = &figures["create_and_first_query_ms"];
        println!(
            "{:<48} {:>12} {:>12}",
            format!("{level}.create_and_first_query_ms"),
            s["p50"].to_string(),
            s["p99"].to_string()
        );
        let s = &figures["worker_start_to_ready_ms"];
        println!(
            "{:<48} {:>12} {:>12}",
            format!("{level}.worker_start_to_ready_ms"),
            s["p50"].to_string(),
            s["p99"].to_string()
        );
    }
    for mode in ["synchronous_commit_default", "synchronous_commit_off"] {
        let figures = &report["postgres"][mode];
        for key in [
            "durable_cost_ms_p50",
            "stored_events_per_second_8_sessions",
            "appends_per_second_8_writers",
        ] {
            println!(
                "{:<48} {:>12}",
                format!("postgres.{mode}.{key}"),
                figures[key].to_string()
            );
        }
    }
    for (section, keys) in [
        (
            "restart_10000_sessions",
            &[
                "to_listening_ms",
                "to_first_full_listing_ms",
                "import_seconds",
            ][..],
        ),
        (
            "fleet",
            &[
                "sse_events_per_second_100_sessions",
                "live_workers",
                "first_query_1000_sessions_seconds",
                "supervisor_rss_kib",
                "workers_private_kib_total",
                "workers_pss_kib_total",
                "total_pss_mib",
            ][..],
        ),
        (
            "soak",
            &[
                "sessions",
                "seconds",
                "runs",
                "events",
                "streams_with_a_gap_or_duplicate",
                "supervisor_fds_before",
                "supervisor_fds_after_first_half",
                "supervisor_fds_after",
                "supervisor_rss_kib_before",
                "supervisor_rss_kib_after_first_half",
                "supervisor_rss_kib_after",
            ][..],
        ),
    ] {
        for key in keys {
            println!(
                "{:<48} {:>12}",
                format!("{section}.{key}"),
                report[section][key].to_string()
            );
        }
    }
    costs::print(&report["costs"]);
}

/// The basic figures: create, first and warm query latency, the server's and its workers'
/// memory, and the SSE rate of one session, against one server on the default config.
async fn basic_figures(binary: &Path) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = start(binary, dir.path(), &[]).await?;
    let (pid, base) = (server.pid, server.base.clone());
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
    let workers: Value = get_json(&client, format!("{base}/api/v1/workers")).await?;
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
    // RSS counts the executable's pages, which every worker shares through the page cache;
    // private (anonymous) memory and PSS say what each additional session really costs.
    let worker_private: Vec<u64> = worker_pids
        .iter()
        .filter_map(|p| status_kib(*p, "RssAnon:").ok())
        .collect();
    let worker_pss: Vec<u64> = worker_pids
        .iter()
        .filter_map(|p| pss_kib(*p).ok())
        .collect();
    let loaded_rss = rss_kib(pid)?;

    let (events, elapsed) = flood(&client, &base, warm, 100_000).await?;
    drop(server);
    Ok(json!({
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
        "worker_private_kib_median": median_u64(&worker_private),
        "worker_pss_kib_median": median_u64(&worker_pss),
    }))
}
