//! The cost of each request path as a client and the host see it: latency, and the CPU the
//! server spent on it (the supervisor and every process below it), read before and after from
//! the processes' CPU clocks and, for those already reaped, their parents' `/proc/<pid>/stat`.
//! CPU is the figure that matters on a loaded host; the latency of one client on an idle server
//! hides it, and on this shared machine latency is mostly other people's load.
//!
//! Sections: `delete` (a session with a live worker), `first` (the first query of a new
//! session), `load` (50 clients at once for 10 s, answers whole and streamed), `turns` (a query
//! at turn 10 and at turn 1,500 of a session), `thousand` (1,000 × create + first query, then
//! the memory of each idle live session).

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Running, create, get_json, kib_field, query, start, summary};

/// Clients of the concurrent runs, and how long each run lasts.
const CLIENTS: usize = 50;
const LOAD_SECONDS: u64 = 10;
/// Thirteen words: the echo model answers "echo:" and the thirteen words, one delta each, so a
/// streamed run is 18 events (user message, run start, 14 deltas, answer, run end).
const EIGHTEEN_EVENTS: &str =
    "one two three four five six seven eight nine ten eleven twelve thirteen";
/// Samples of the per-request sections.
const SAMPLES: usize = 100;
/// Live sessions kept in the `delete` and `first` sections: far below what admission allows
/// with the default limits, so no start has to evict an idle worker.
const LIVE: usize = 10;

/// Every section of this module, in order, as one JSON object.
pub(super) async fn all(binary: &Path) -> Result<Value> {
    Ok(json!({
        "delete_live_worker": delete(binary).await?,
        "first_query": first(binary).await?,
        "concurrent_50": load(binary).await?,
        "turns": turns(binary).await?,
        "sessions_1000": thousand(binary).await?,
    }))
}

/// The `--only` names of this module's sections.
pub(super) async fn section(binary: &Path, name: &str) -> Result<Option<Value>> {
    Ok(Some(match name {
        "costs" => all(binary).await?,
        "delete" => delete(binary).await?,
        "first" => first(binary).await?,
        "load" => load(binary).await?,
        "turns" => turns(binary).await?,
        "thousand" => thousand(binary).await?,
        _ => return Ok(None),
    }))
}

pub(super) const SECTIONS: &str = "costs, delete, first, load, turns or thousand";

/// CPU time of a server's process tree, in nanoseconds: the supervisor's own, and that of its
/// child processes at any depth, living or reaped: the sessions' launchers and workers, and the
/// helpers the supervisor runs (`mkfs.ext4` for the disk images).
#[derive(Debug, Clone, Copy, Default)]
struct TreeCpu {
    supervisor: u64,
    children: u64,
}

impl TreeCpu {
    fn since(self, before: Self) -> Self {
        Self {
            supervisor: self.supervisor.saturating_sub(before.supervisor),
            children: self.children.saturating_sub(before.children),
        }
    }

    fn add(&mut self, other: Self) {
        self.supervisor += other.supervisor;
        self.children += other.children;
    }

    /// Milliseconds per operation, split and in total.
    fn per(self, operations: usize) -> Value {
        let ms = |ns: u64| {
            let ms = ns as f64 / 1e6 / operations.max(1) as f64;
            (ms * 1000.0).round() / 1000.0
        };
        json!({
            "supervisor": ms(self.supervisor),
            "children": ms(self.children),
            "total": ms(self.supervisor + self.children),
        })
    }
}

/// `USER_HZ`, the unit of the times in `/proc/<pid>/stat`.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// One process: its parent from `/proc/<pid>/stat`, and its CPU in nanoseconds.
struct Proc {
    ppid: u32,
    /// All its threads, living or exited, from its CPU clock: `utime + stime` of
    /// `/proc/<pid>/stat` are whole clock ticks, and a worker's few milliseconds would read as 0.
    own: u64,
    /// cutime + cstime: the children it has reaped (one sum, so whole ticks lose little).
    reaped: u64,
}

/// Every process on the host, read once. A process that exits while it is read is left out;
/// its time is in its parent's `reaped` once the parent has waited for it.
struct ProcTable(HashMap<u32, Proc>);

impl ProcTable {
    fn scan() -> Result<Self> {
        let mut table = HashMap::new();
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(proc) = read_stat(pid) {
                table.insert(pid, proc);
            }
        }
        Ok(Self(table))
    }

    /// The processes below `root`, at any depth.
    fn descendants(&self, root: u32) -> Vec<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, proc) in &self.0 {
            children.entry(proc.ppid).or_default().push(*pid);
        }
        let mut found = Vec::new();
        let mut queue = vec![root];
        while let Some(pid) = queue.pop() {
            for child in children.get(&pid).into_iter().flatten() {
                found.push(*child);
                queue.push(*child);
            }
        }
        found
    }

    /// CPU of the tree under `root`: its own, and that of everything below it.
    fn cpu(&self, root: u32) -> Result<TreeCpu> {
        let top = self.0.get(&root).context("the server is gone")?;
        let below: u64 = self
            .descendants(root)
            .iter()
            .filter_map(|pid| self.0.get(pid))
            .map(|p| p.own + p.reaped)
            .sum();
        Ok(TreeCpu {
            supervisor: top.own,
            children: top.reaped + below,
        })
    }
}

fn read_stat(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 4, 14-17 of proc(5), counted from `state` (field 3).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let tick_ns = 1_000_000_000 / clock_ticks();
    Some(Proc {
        ppid: field(4)? as u32,
        own: process_cpu_ns(pid).unwrap_or((field(14)? + field(15)?) * tick_ns),
        reaped: (field(16)? + field(17)?) * tick_ns,
    })
}

/// The CPU time of all threads of process `pid`, living or exited, in nanoseconds.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    let time = nix::time::clock_gettime(nix::time::clock_getcpuclockid(pid).ok()?).ok()?;
    Some(u64::try_from(time.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(time.tv_nsec()).ok()?)
}

fn server_cpu(server: &Running) -> Result<TreeCpu> {
    ProcTable::scan()?.cpu(server.pid)
}

/// The server's CPU once it has finished what it was doing (pool refills, teardown in the
/// background): the first reading after 50 ms in which it used less than 0.2 ms, at most 3 s
/// later.
async fn settled_cpu(server: &Running) -> Result<TreeCpu> {
    let t = Instant::now();
    let mut last = server_cpu(server)?;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = server_cpu(server)?;
        let used = now.since(last);
        if used.supervisor + used.children < 200_000 || t.elapsed() > Duration::from_secs(3) {
            return Ok(now);
        }
        last = now;
    }
}

/// This load generator's own CPU (it shares the machine with the server), in nanoseconds.
fn own_cpu() -> u64 {
    process_cpu_ns(std::process::id()).unwrap_or(0)
}

fn client_ms_per(ns: u64, operations: usize) -> f64 {
    let ms = ns as f64 / 1e6 / operations.max(1) as f64;
    (ms * 1000.0).round() / 1000.0
}

/// The pid of `session`'s worker as `/workers` lists it (the outer process of its jail).
async fn listed_pid(client: &reqwest::Client, base: &str, session: &str) -> Result<u32> {
    let workers = get_json(client, format!("{base}/api/v1/workers")).await?;
    workers["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["sessionId"] == session)
        .and_then(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .context("the session's worker is not listed")
}

/// The listed pid and everything below it: all processes of one session.
fn session_processes(table: &ProcTable, listed: u32) -> Vec<u32> {
    let mut pids = vec![listed];
    pids.extend(table.descendants(listed));
    pids
}

async fn delete_session(client: &reqwest::Client, base: &str, id: &str) -> Result<()> {
    let response = client
        .post(format!("{base}/api/v1/sessions/delete"))
        .json(&json!({"sessionId": id}))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("delete failed: {}", response.text().await?);
    }
    Ok(())
}

/// Waits until none of `pids` runs any more; how long that took.
async fn gone(pids: &[u32]) -> Result<Duration> {
    let t = Instant::now();
    while pids.iter().any(|p| e2e::pid_alive(*p)) {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the session's processes {pids:?} still run 10 s after its delete");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(t.elapsed())
}

/// What the server decided about isolation and the disk quota, for the record.
async fn setup(client: &reqwest::Client, base: &str) -> Result<Value> {
    let health = get_json(client, format!("{base}/api/v1/system/health")).await?;
    // Every mount of the host is copied into each new worker's mount namespace and detached
    // again, so worker starts get slower with the host's mount count (other servers' images).
    let host_mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map_or(0, |m| m.lines().count());
    Ok(json!({
        "isolation": health["isolation"]["level"],
        "disk_backend": health["isolation"]["disk"]["backend"],
        "host_mounts": host_mounts,
    }))
}

/// The two disk setups of the per-request sections: the default (`auto`: project quotas, else
/// one loop-mounted image per session), and no disk quota, which leaves the worker's own cost.
const DISKS: [(&str, Option<&str>); 2] = [("default_disk", None), ("no_disk_quota", Some("none"))];

/// A server with the default configuration, or with `diskBackend` set.
async fn start_with_disk(binary: &Path, dir: &Path, backend: Option<&str>) -> Result<Running> {
    match backend {
        None => start(binary, dir, &[]).await,
        Some(backend) => start_with_limits(binary, dir, json!({"diskBackend": backend})).await,
    }
}

/// A server with these `isolation.limits`.
async fn start_with_limits(binary: &Path, dir: &Path, limits: Value) -> Result<Running> {
    let config = dir.join("limits.json");
    std::fs::write(
        &config,
        json!({"isolation": {"limits": limits}}).to_string(),
    )?;
    let config = config.to_string_lossy().into_owned();
    start(binary, dir, &["--config", &config]).await
}

/// Totals far above what the default (the host's memory less a reserve, at 1 GiB per session)
/// admits, for the sections that keep more sessions busy or live than that.
fn raised_totals() -> Value {
    json!({"totalMemory": "1100GiB", "totalPids": 300_000})
}

/// Delete a session whose worker is live (it has just answered), 100 times, one at a time. The
/// CPU window of each delete lasts until its processes are gone and the server is quiet again,
/// so work moved off the request path is still counted.
async fn delete(binary: &Path) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for (name, backend) in DISKS {
        out.insert(name.to_owned(), delete_with(binary, backend).await?);
    }
    Ok(Value::Object(out))
}

async fn delete_with(binary: &Path, backend: Option<&str>) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = start_with_disk(binary, dir.path(), backend).await?;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (mut answered, mut finished) = (Vec::new(), Vec::new());
    let mut cpu = TreeCpu::default();
    for _ in 0..SAMPLES {
        let id = create(&client, &base).await?;
        query(&client, &base, &id, "hi").await?;
        let pids = session_processes(&ProcTable::scan()?, listed_pid(&client, &base, &id).await?);
        let before = settled_cpu(&server).await?;
        let t = Instant::now();
        delete_session(&client, &base, &id).await?;
        answered.push(t.elapsed());
        gone(&pids).await?;
        finished.push(t.elapsed());
        cpu.add(settled_cpu(&server).await?.since(before));
    }
    Ok(json!({
        "setup": setup(&client, &base).await?,
        "samples": SAMPLES,
        "answered_ms": summary(&answered),
        "processes_gone_ms": summary(&finished),
        "cpu_ms_per_delete": cpu.per(SAMPLES),
    }))
}

/// The first query of a new session (its worker starts on it), then its second, 100 times; at
/// most `LIVE` sessions are kept, older ones are deleted outside the measured windows. Each
/// window lasts until the server is quiet again, so refilling its pools counts where it was
/// caused.
async fn first(binary: &Path) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for (name, backend) in DISKS {
        out.insert(name.to_owned(), first_with(binary, backend).await?);
    }
    Ok(Value::Object(out))
}

async fn first_with(binary: &Path, backend: Option<&str>) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = start_with_disk(binary, dir.path(), backend).await?;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let (mut creates, mut firsts, mut seconds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut create_cpu, mut first_cpu, mut second_cpu) =
        (TreeCpu::default(), TreeCpu::default(), TreeCpu::default());
    let mut live = std::collections::VecDeque::new();
    for _ in 0..SAMPLES {
        let before = settled_cpu(&server).await?;
        let t = Instant::now();
        let id = create(&client, &base).await?;
        creates.push(t.elapsed());
        let created = settled_cpu(&server).await?;
        let t = Instant::now();
        query(&client, &base, &id, "hi").await?;
        firsts.push(t.elapsed());
        let answered = settled_cpu(&server).await?;
        let t = Instant::now();
        query(&client, &base, &id, "hi").await?;
        seconds.push(t.elapsed());
        let after = settled_cpu(&server).await?;
        create_cpu.add(created.since(before));
        first_cpu.add(answered.since(created));
        second_cpu.add(after.since(answered));
        live.push_back(id);
        if live.len() > LIVE
            && let Some(old) = live.pop_front()
        {
            let pids =
                session_processes(&ProcTable::scan()?, listed_pid(&client, &base, &old).await?);
            delete_session(&client, &base, &old).await?;
            gone(&pids).await?;
        }
    }
    Ok(json!({
        "setup": setup(&client, &base).await?,
        "samples": SAMPLES,
        "create_ms": summary(&creates),
        "first_query_ms": summary(&firsts),
        "second_query_ms": summary(&seconds),
        "cpu_ms_per_create": create_cpu.per(SAMPLES),
        "cpu_ms_per_first_query": first_cpu.per(SAMPLES),
        "cpu_ms_per_second_query": second_cpu.per(SAMPLES),
    }))
}

/// A streamed query, read to its end; the number of events it carried.
async fn stream_query(client: &reqwest::Client, base: &str, id: &str, text: &str) -> Result<usize> {
    let response = client
        .post(format!("{base}/api/v1/sessions/query/stream"))
        .json(&json!({"sessionId": id, "query": text}))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("stream refused: {}", response.status());
    }
    let body = response.bytes().await?;
    Ok(body
        .split(|b| *b == b'\n')
        .filter(|line| line.starts_with(b"data: "))
        .count())
}

/// 50 clients, each with its own session, asking back to back for 10 s with memory storage:
/// first whole answers, then streamed ones (18 events each), each run on a fresh server whose
/// totals admit 50 busy workers.
async fn load(binary: &Path) -> Result<Value> {
    Ok(json!({
        "non_streaming": load_run(binary, false).await?,
        "streaming": load_run(binary, true).await?,
    }))
}

async fn load_run(binary: &Path, streamed: bool) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = start_with_limits(binary, dir.path(), raised_totals()).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()?;
    let base = server.base.clone();
    let ask = move |client: reqwest::Client, base: String, id: String| async move {
        if streamed {
            stream_query(&client, &base, &id, EIGHTEEN_EVENTS).await
        } else {
            query(&client, &base, &id, EIGHTEEN_EVENTS)
                .await
                .map(|()| 0)
        }
    };
    let mut ids = Vec::new();
    for _ in 0..CLIENTS {
        let id = create(&client, &base).await?;
        ask(client.clone(), base.clone(), id.clone()).await?;
        ids.push(id);
    }
    let before = server_cpu(&server)?;
    let client_before = own_cpu();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(LOAD_SECONDS);
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let (mut latencies, mut events) = (Vec::new(), 0);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    events += ask(client.clone(), base.clone(), id.clone()).await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok((latencies, events))
            })
        })
        .collect();
    let (mut latencies, mut events) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await??;
        latencies.extend(l);
        events += e;
    }
    let elapsed = t.elapsed();
    let cpu = server_cpu(&server)?.since(before);
    let client_ns = own_cpu().saturating_sub(client_before);
    let queries = latencies.len();
    let mut report = json!({
        "setup": setup(&client, &base).await?,
        "clients": CLIENTS,
        "seconds": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "queries": queries,
        "queries_per_second": (queries as f64 / elapsed.as_secs_f64()).round(),
        "latency_ms": summary(&latencies),
        "cpu_ms_per_query": cpu.per(queries),
        "server_cores_busy": ((cpu.supervisor + cpu.children) as f64 / 1e9
            / elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "load_generator_cpu_ms_per_query": client_ms_per(client_ns, queries),
        // Every session's history grows during the run, and with it the cost of a query.
        "turns_per_session_at_end": queries / CLIENTS + 1,
    });
    if streamed {
        report["events_per_query"] =
            json!((events as f64 / queries.max(1) as f64 * 10.0).round() / 10.0);
    }
    Ok(report)
}

/// The cost of one query early and late in a conversation: queries 10 to 14 of 10 sessions,
/// and queries 1,500 to 1,549 of one session, each measured alone on an otherwise idle server.
/// Ten sessions stay far below what admission allows, so no query restarts an evicted worker.
async fn turns(binary: &Path) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = start(binary, dir.path(), &[]).await?;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let measured = 50;

    let mut early = Vec::new();
    for _ in 0..LIVE {
        let id = create(&client, &base).await?;
        for _ in 1..10 {
            query(&client, &base, &id, "hi").await?;
        }
        early.push(id);
    }
    let (mut at_10, mut cpu_10) = (Vec::new(), TreeCpu::default());
    for _ in 0..measured / LIVE {
        for id in &early {
            let before = server_cpu(&server)?;
            let t = Instant::now();
            query(&client, &base, id, "hi").await?;
            at_10.push(t.elapsed());
            cpu_10.add(server_cpu(&server)?.since(before));
        }
    }
    for id in &early {
        delete_session(&client, &base, id).await?;
    }

    let id = create(&client, &base).await?;
    for _ in 1..1500 {
        query(&client, &base, &id, "hi").await?;
    }
    let (mut at_1500, mut cpu_1500) = (Vec::new(), TreeCpu::default());
    for _ in 0..measured {
        let before = server_cpu(&server)?;
        let t = Instant::now();
        query(&client, &base, &id, "hi").await?;
        at_1500.push(t.elapsed());
        cpu_1500.add(server_cpu(&server)?.since(before));
    }
    let p50 = |d: &[Duration]| summary(d)["p50"].as_f64().unwrap_or(0.0);
    let total = |c: TreeCpu| c.per(measured)["total"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "setup": setup(&client, &base).await?,
        "samples": measured,
        "turn_10_ms": summary(&at_10),
        "turn_1500_ms": summary(&at_1500),
        "cpu_ms_per_query_turn_10": cpu_10.per(measured),
        "cpu_ms_per_query_turn_1500": cpu_1500.per(measured),
        "latency_ratio_1500_to_10": (p50(&at_1500) / p50(&at_10).max(1e-9) * 10.0).round() / 10.0,
        "cpu_ratio_1500_to_10": (total(cpu_1500) / total(cpu_10).max(1e-9) * 10.0).round() / 10.0,
    }))
}

/// 1,000 × (create + first query) from one client, one after the other, then, once they are
/// idle, the memory of all their processes (PSS, so shared pages count once in total). The
/// totals are raised so that all 1,000 stay live, and there is no disk quota, as in `fleet`.
async fn thousand(binary: &Path) -> Result<Value> {
    let sessions = 1000;
    let dir = tempfile::tempdir()?;
    let mut limits = raised_totals();
    limits["diskBackend"] = json!("none");
    let server = start_with_limits(binary, dir.path(), limits).await?;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let mut ids = Vec::new();
    let mut each = Vec::new();
    let before = server_cpu(&server)?;
    let t = Instant::now();
    for _ in 0..sessions {
        let t = Instant::now();
        let id = create(&client, &base).await?;
        query(&client, &base, &id, "hi").await?;
        each.push(t.elapsed());
        ids.push(id);
    }
    let elapsed = t.elapsed();
    let cpu = server_cpu(&server)?.since(before);

    // Idle: the runs are over and nothing is asked; give freed memory a moment to settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let workers = get_json(&client, format!("{base}/api/v1/workers")).await?;
    let listed: Vec<u32> = workers["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    let table = ProcTable::scan()?;
    let (mut pss, mut anon, mut processes) = (0u64, 0u64, 0usize);
    let (mut outer, mut inner) = (Vec::new(), Vec::new());
    for pid in &listed {
        let pids = session_processes(&table, *pid);
        processes += pids.len();
        for (n, p) in pids.iter().enumerate() {
            let rollup =
                std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
            let kib = kib_field(&rollup, "Pss:").unwrap_or(0);
            pss += kib;
            anon += kib_field(&rollup, "Pss_Anon:").unwrap_or(0);
            if n == 0 {
                outer.push(kib)
            } else {
                inner.push(kib)
            }
        }
    }
    let live = listed.len().max(1);
    let all_below = table.descendants(server.pid).len();
    let supervisor_pss = super::pss_kib(server.pid).unwrap_or(0);
    Ok(json!({
        "setup": setup(&client, &base).await?,
        "sessions": sessions,
        "create_and_first_query_seconds": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "create_and_first_query_ms": summary(&each),
        "cpu_ms_per_create_and_first_query": cpu.per(sessions),
        "live_sessions": listed.len(),
        "processes_per_session": (processes as f64 / live as f64 * 100.0).round() / 100.0,
        // Pooled launchers waiting for a session, not yet anyone's.
        "processes_not_of_a_session": all_below.saturating_sub(processes),
        "pss_kib_per_session": (pss as f64 / live as f64).round(),
        "pss_anon_kib_per_session": (anon as f64 / live as f64).round(),
        "pss_kib_outer_process_median": super::median_u64(&outer),
        "pss_kib_inner_process_median": super::median_u64(&inner),
        "supervisor_pss_kib": supervisor_pss,
    }))
}

/// The main figures of [`all`] as table rows: latency p50/p99, or a rate, and server CPU.
pub(super) fn print(costs: &Value) {
    let row = |name: &str, p50: &Value, p99: &Value, cpu: &Value| {
        println!(
            "{:<48} {:>12} {:>12} {:>12}",
            name,
            p50.to_string(),
            p99.to_string(),
            cpu["total"].to_string()
        );
    };
    println!(
        "\n{:<48} {:>12} {:>12} {:>12}",
        "cost of each path", "p50 ms", "p99 ms", "cpu ms"
    );
    let d = &costs["delete_live_worker"];
    row(
        "delete_live_worker",
        &d["answered_ms"]["p50"],
        &d["answered_ms"]["p99"],
        &d["cpu_ms_per_delete"],
    );
    let f = &costs["first_query"];
    row(
        "first_query",
        &f["first_query_ms"]["p50"],
        &f["first_query_ms"]["p99"],
        &f["cpu_ms_per_first_query"],
    );
    row(
        "second_query",
        &f["second_query_ms"]["p50"],
        &f["second_query_ms"]["p99"],
        &f["cpu_ms_per_second_query"],
    );
    for kind in ["non_streaming", "streaming"] {
        let l = &costs["concurrent_50"][kind];
        row(
            &format!("concurrent_50.{kind} ({} req/s)", l["queries_per_second"]),
            &l["latency_ms"]["p50"],
            &l["latency_ms"]["p99"],
            &l["cpu_ms_per_query"],
        );
    }
    let t = &costs["turns"];
    row(
        "turn_10",
        &t["turn_10_ms"]["p50"],
        &t["turn_10_ms"]["p99"],
        &t["cpu_ms_per_query_turn_10"],
    );
    row(
        "turn_1500",
        &t["turn_1500_ms"]["p50"],
        &t["turn_1500_ms"]["p99"],
        &t["cpu_ms_per_query_turn_1500"],
    );
    let s = &costs["sessions_1000"];
    row(
        &format!(
            "1000 x create+first query ({} s)",
            s["create_and_first_query_seconds"]
        ),
        &s["create_and_first_query_ms"]["p50"],
        &s["create_and_first_query_ms"]["p99"],
        &s["cpu_ms_per_create_and_first_query"],
    );
    for key in [
        "pss_kib_per_session",
        "processes_per_session",
        "pss_kib_outer_process_median",
        "pss_kib_inner_process_median",
    ] {
        println!(
            "{:<48} {:>12}",
            format!("sessions_1000.{key}"),
            s[key].to_string()
        );
    }
}
