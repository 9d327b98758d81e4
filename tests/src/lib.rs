//! End-to-end test harness: starts the real `supervisor` binary on a loopback port with its own
//! temporary workspace, and talks to it over HTTP / SSE.
//!
//! Every test starts its own [`Server`]; dropping it kills the process (SIGKILL).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

pub mod clients;
pub mod fake_llm;
pub mod pg;

/// How long the server may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Generous upper bound for any single HTTP request / stream (only to avoid hanging forever).
pub const LONG: Duration = Duration::from_secs(30);
/// The exact prefix of the readiness line printed on stdout.
pub const LISTENING_PREFIX: &str = "supervisor listening on ";

/// Placeholder replaced by the test's temporary directory in args, env values and config files.
pub const TMP_PLACEHOLDER: &str = "{TMP}";

// ------------------------------------------------------------------------------------------------
// Binary location
// ------------------------------------------------------------------------------------------------

/// Path of the `supervisor` binary: `$SUPERVISOR_BIN`, else next to the test executable's
/// `deps/` directory (`target/<profile>/supervisor`).
pub fn supervisor_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SUPERVISOR_BIN") {
        let p = PathBuf::from(p);
        ensure!(
            p.is_file(),
            "SUPERVISOR_BIN={} does not point to a file",
            p.display()
        );
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        if let Some(profile) = deps.parent() {
            candidates.push(profile.join("supervisor"));
        }
        candidates.push(deps.join("supervisor"));
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "supervisor binary not found (looked at {:?}); run `cargo build -p supervisor` first \
         or set SUPERVISOR_BIN",
        candidates
    )
}

/// A free loopback port (bind 127.0.0.1:0, read the port, release it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

// ------------------------------------------------------------------------------------------------
// Options
// ------------------------------------------------------------------------------------------------

/// How to launch the server. By default the harness passes
/// `--host 127.0.0.1 --port 0 --workspace <tmp>/ws`.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    /// Extra command-line arguments (after the defaults). `{TMP}` is substituted.
    pub args: Vec<String>,
    /// Environment variables (besides `PATH`). `{TMP}` is substituted in values.
    pub env: Vec<(String, String)>,
    /// A config file `(file name, contents)` written into the temp dir and passed with
    /// `--config`. `{TMP}` is substituted in the contents.
    pub config: Option<(String, String)>,
    /// Do not pass `--port 0`.
    pub no_port_flag: bool,
    /// Do not pass `--host 127.0.0.1`.
    pub no_host_flag: bool,
    /// Do not pass `--workspace <tmp>/ws`.
    pub no_workspace_flag: bool,
}

impl ServerOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn config_file(mut self, name: impl Into<String>, contents: impl Into<String>) -> Self {
        self.config = Some((name.into(), contents.into()));
        self
    }
    pub fn exclusive(self) -> Self {
        self.arg("--exclusive")
    }
    pub fn without_port_flag(mut self) -> Self {
        self.no_port_flag = true;
        self
    }
    pub fn without_host_flag(mut self) -> Self {
        self.no_host_flag = true;
        self
    }
    pub fn without_workspace_flag(mut self) -> Self {
        self.no_workspace_flag = true;
        self
    }
}

struct Prepared {
    tmp: tempfile::TempDir,
    ws: PathBuf,
    cmd: Command,
}

fn prepare(opts: &ServerOpts) -> Result<Prepared> {
    let bin = supervisor_bin()?;
    let tmp = tempfile::Builder::new()
        .prefix("e2e-supervisor-")
        .tempdir()
        .context("create temp dir")?;
    let tmp_str = tmp
        .path()
        .to_str()
        .context("temp dir path is not UTF-8")?
        .to_string();
    let subst = |s: &str| s.replace(TMP_PLACEHOLDER, &tmp_str);
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(&ws).context("create workspace dir")?;

    let mut cmd = Command::new(&bin);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in &opts.env {
        cmd.env(k, subst(v));
    }
    if !opts.no_host_flag {
        cmd.args(["--host", "127.0.0.1"]);
    }
    if !opts.no_port_flag {
        cmd.args(["--port", "0"]);
    }
    if !opts.no_workspace_flag {
        cmd.arg("--workspace").arg(&ws);
    }
    if let Some((name, contents)) = &opts.config {
        let path = tmp.path().join(name);
        std::fs::write(&path, subst(contents)).context("write config file")?;
        cmd.arg("--config").arg(&path);
    }
    for a in &opts.args {
        cmd.arg(subst(a));
    }
    cmd.current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(Prepared { tmp, ws, cmd })
}

// ------------------------------------------------------------------------------------------------
// Log capture
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LogBuf {
    stdout: String,
    stderr: String,
    combined: String,
}

type SharedLogs = Arc<Mutex<LogBuf>>;

fn lock(logs: &SharedLogs) -> std::sync::MutexGuard<'_, LogBuf> {
    match logs.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Reads `reader` line by line into the shared buffer until EOF. For stdout, the first
/// readiness line is reported through `ready`.
async fn drain<R: AsyncRead + Unpin>(
    reader: R,
    is_stdout: bool,
    logs: SharedLogs,
    mut ready: Option<oneshot::Sender<String>>,
) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        {
            let mut g = lock(&logs);
            let tag = if is_stdout { "[stdout] " } else { "[stderr] " };
            if is_stdout {
                g.stdout.push_str(&text);
            } else {
                g.stderr.push_str(&text);
            }
            g.combined.push_str(tag);
            g.combined.push_str(&text);
            if !text.ends_with('\n') {
                g.combined.push('\n');
            }
        }
        if is_stdout {
            let t = text.trim();
            if let Some(url) = t.strip_prefix(LISTENING_PREFIX)
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(url.trim().trim_end_matches('/').to_string());
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Server
// ------------------------------------------------------------------------------------------------

/// A running supervisor process. Dropping it sends SIGKILL.
pub struct Server {
    child: Child,
    pid: u32,
    port: u16,
    base_url: String,
    ws: PathBuf,
    logs: SharedLogs,
    http: reqwest::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Worker pids seen in `/api/v1/workers`; killed on drop if still alive (safety net so a
    /// failing test never leaks workers).
    seen_workers: Mutex<std::collections::HashSet<u32>>,
    /// Directories the server may keep workspaces in: its temporary directory and the absolute
    /// paths its options name. Workspace images mounted there are detached on drop.
    roots: Vec<PathBuf>,
    // Last: removed after the process was killed.
    tmp: tempfile::TempDir,
}

/// Result of a process that was expected to exit by itself (see [`Server::expect_exit`]).
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Picks rustls' ring provider for this process. reqwest is built without a default one (the
/// workspace keeps aws-lc and OpenSSL out), so every client-building process calls this first;
/// calling it again is harmless.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn http_client() -> Result<reqwest::Client> {
    install_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("build reqwest client")
}

impl Server {
    /// Starts the server with default options.
    pub async fn start_default() -> Result<Server> {
        Self::start(ServerOpts::new()).await
    }

    /// Starts the server and waits (up to 30 s) for its listening line on stdout.
    pub async fn start(opts: ServerOpts) -> Result<Server> {
        let Prepared { tmp, ws, mut cmd } = prepare(&opts)?;
        let mut child = cmd.spawn().context("spawn supervisor")?;
        let pid = child.id().context("supervisor has no pid")?;
        let logs: SharedLogs = Arc::default();
        let stdout = child.stdout.take().context("stdout not piped")?;
        let stderr = child.stderr.take().context("stderr not piped")?;
        let (tx, rx) = oneshot::channel();
        let out_task = tokio::spawn(drain(stdout, true, logs.clone(), Some(tx)));
        let err_task = tokio::spawn(drain(stderr, false, logs.clone(), None));

        let url = tokio::select! {
            r = rx => match r {
                Ok(url) => url,
                Err(_) => {
                    // stdout closed without the line; give the process a moment to exit.
                    let st = timeout(Duration::from_secs(5), child.wait()).await;
                    let _ = timeout(Duration::from_secs(2), err_task).await;
                    let l = lock(&logs);
                    bail!(
                        "supervisor closed stdout before printing its listening line \
                         (exit: {st:?})\n--- logs ---\n{}",
                        l.combined
                    );
                }
            },
            st = child.wait() => {
                let _ = timeout(Duration::from_secs(2), err_task).await;
                let _ = timeout(Duration::from_secs(2), out_task).await;
                let l = lock(&logs);
                bail!(
                    "supervisor exited ({st:?}) before listening\n--- logs ---\n{}",
                    l.combined
                );
            }
            _ = sleep(STARTUP_TIMEOUT) => {
                let l = lock(&logs);
                bail!(
                    "supervisor did not print `{LISTENING_PREFIX}...` within {STARTUP_TIMEOUT:?}\n\
                     --- logs ---\n{}",
                    l.combined
                );
            }
        };
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("cannot parse port from listening url {url:?}"))?;
        ensure!(
            url.starts_with("http://127.0.0.1:"),
            "unexpected listening url {url:?} (expected http://127.0.0.1:<port>)"
        );
        Ok(Server {
            child,
            pid,
            port,
            base_url: url,
            ws,
            logs,
            http: http_client()?,
            tasks: vec![out_task, err_task],
            seen_workers: Mutex::default(),
            roots: option_paths(&opts, tmp.path()),
            tmp,
        })
    }

    /// Runs the binary with `opts` and expects it to exit by itself within `within`
    /// (e.g. invalid configuration). Fails if it starts listening or keeps running.
    pub async fn expect_exit(opts: ServerOpts, within: Duration) -> Result<Exited> {
        let Prepared {
            tmp,
            ws: _,
            mut cmd,
        } = prepare(&opts)?;
        let mut child = cmd.spawn().context("spawn supervisor")?;
        let logs: SharedLogs = Arc::default();
        let stdout = child.stdout.take().context("stdout not piped")?;
        let stderr = child.stderr.take().context("stderr not piped")?;
        let (tx, mut rx) = oneshot::channel();
        let out_task = tokio::spawn(drain(stdout, true, logs.clone(), Some(tx)));
        let err_task = tokio::spawn(drain(stderr, false, logs.clone(), None));
        let status = tokio::select! {
            st = child.wait() => st.context("wait for supervisor")?,
            Ok(url) = &mut rx => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let l = lock(&logs);
                bail!(
                    "supervisor was expected to exit but started listening on {url}\n\
                     --- logs ---\n{}",
                    l.combined
                );
            }
            _ = sleep(within) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let l = lock(&logs);
                bail!(
                    "supervisor was expected to exit within {within:?} but kept running\n\
                     --- logs ---\n{}",
                    l.combined
                );
            }
        };
        let _ = timeout(Duration::from_secs(5), out_task).await;
        let _ = timeout(Duration::from_secs(5), err_task).await;
        drop(tmp);
        let l = lock(&logs);
        Ok(Exited {
            status,
            stdout: l.stdout.clone(),
            stderr: l.stderr.clone(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// The workspace root passed with `--workspace` (`<tmp>/ws`).
    pub fn workspace_root(&self) -> &Path {
        &self.ws
    }
    /// The test's temporary directory (parent of the workspace root).
    pub fn tmp_dir(&self) -> &Path {
        self.tmp.path()
    }
    /// stdout + stderr captured so far, each line tagged with its stream.
    pub fn logs(&self) -> String {
        lock(&self.logs).combined.clone()
    }
    pub fn stderr(&self) -> String {
        lock(&self.logs).stderr.clone()
    }
    pub fn stdout(&self) -> String {
        lock(&self.logs).stdout.clone()
    }
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// SIGKILL the supervisor itself.
    pub fn kill9(&self) -> Result<()> {
        signal(self.pid, nix::sys::signal::Signal::SIGKILL)
    }
    /// SIGTERM the supervisor itself.
    pub fn sigterm(&self) -> Result<()> {
        signal(self.pid, nix::sys::signal::Signal::SIGTERM)
    }
    /// Waits for the supervisor to exit; `None` on timeout.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        match timeout(within, self.child.wait()).await {
            Ok(Ok(st)) => Some(st),
            _ => None,
        }
    }

    // --------------------------------------------------------------------------------------------
    // Raw HTTP helpers
    // --------------------------------------------------------------------------------------------

    /// Any request; `body` is `(bytes, content type)`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Resp> {
        let mut rb = self
            .http
            .request(method.clone(), self.url(path))
            .timeout(LONG);
        if let Some((bytes, ct)) = body {
            rb = rb.header("content-type", ct).body(bytes);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("{method} {path}\n--- server logs ---\n{}", self.logs()))?;
        Resp::read(resp).await
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Resp> {
        self.post_raw(path, serde_json::to_vec(body)?, "application/json")
            .await
    }

    pub async fn post_raw(&self, path: &str, bytes: Vec<u8>, content_type: &str) -> Result<Resp> {
        self.request(Method::POST, path, Some((bytes, content_type)))
            .await
    }

    /// GET expecting 200; returns the JSON body.
    pub async fn get_ok(&self, path: &str) -> Result<Value> {
        let r = self.get(path).await?;
        r.expect_status(200, &format!("GET {path}"))?;
        Ok(r.json)
    }

    /// POST JSON expecting 200; returns the JSON body.
    pub async fn post_ok(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self.post_json(path, body).await?;
        r.expect_status(200, &format!("POST {path} {body}"))?;
        Ok(r.json)
    }

    /// Sends a hand-written HTTP/1.1 request over a plain TCP socket, writing the body in the
    /// background while reading the response (so an early response such as 413 can be read
    /// even if the server stops reading the body). `head` is the request line + headers
    /// WITHOUT the final blank line; `Host`, `Content-Length` and `Connection: close` are added.
    pub async fn raw_request(&self, head: &str, body: Vec<u8>) -> Result<RawResp> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .context("connect")?;
        let (mut rd, mut wr) = stream.into_split();
        let mut req = String::from(head.trim_end());
        req.push_str(&format!(
            "\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        ));
        let writer = tokio::spawn(async move {
            if wr.write_all(req.as_bytes()).await.is_err() {
                return;
            }
            for chunk in body.chunks(64 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = wr.flush().await;
            // Keep the write half open (no shutdown): some servers treat a half-close as abort.
            sleep(LONG).await;
            drop(wr);
        });
        let res = timeout(LONG, read_http_response(&mut rd)).await;
        writer.abort();
        res.context("timed out reading raw HTTP response")?
    }

    // --------------------------------------------------------------------------------------------
    // SSE
    // --------------------------------------------------------------------------------------------

    /// POST a JSON body and return the (possibly SSE) response for frame-by-frame reading.
    /// Opens a GET event stream (`/api/v1/sessions/events/stream`), with extra headers such as
    /// `Last-Event-ID`.
    pub async fn get_sse(&self, path: &str, headers: &[(&str, &str)]) -> Result<SseStream> {
        let mut request = self
            .http
            .get(self.url(path))
            .header("accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let resp = request
            .send()
            .await
            .with_context(|| format!("GET {path}\n--- server logs ---\n{}", self.logs()))?;
        Ok(SseStream {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            resp: Some(resp),
            buf: Vec::new(),
            pending: VecDeque::new(),
            held: None,
        })
    }

    pub async fn post_sse(&self, path: &str, body: &Value) -> Result<SseStream> {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(serde_json::to_vec(body)?)
            .send()
            .await
            .with_context(|| format!("POST {path}\n--- server logs ---\n{}", self.logs()))?;
        Ok(SseStream {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            resp: Some(resp),
            buf: Vec::new(),
            pending: VecDeque::new(),
            held: None,
        })
    }

    // --------------------------------------------------------------------------------------------
    // Domain helpers
    // --------------------------------------------------------------------------------------------

    /// `POST /api/v1/sessions/create {}` expecting 201; returns the whole body.
    pub async fn create_session_full(&self) -> Result<Value> {
        let r = self
            .post_json("/api/v1/sessions/create", &json!({}))
            .await?;
        r.expect_status(201, "POST /api/v1/sessions/create")?;
        Ok(r.json)
    }

    /// Creates a session, returns its id.
    pub async fn create_session(&self) -> Result<String> {
        let body = self.create_session_full().await?;
        body["sessionId"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("create: no sessionId in {body}"))
    }

    /// Non-streaming query expecting 200; returns `result`.
    pub async fn query(&self, sid: &str, q: &str) -> Result<Value> {
        let body = self
            .post_ok(
                "/api/v1/sessions/query",
                &json!({"sessionId": sid, "query": q}),
            )
            .await?;
        body.get("result")
            .cloned()
            .with_context(|| format!("query: no result in {body}"))
    }

    /// Streaming query; asserts 200 + `text/event-stream`.
    pub async fn stream(&self, sid: &str, q: &str) -> Result<SseStream> {
        let s = self
            .post_sse(
                "/api/v1/sessions/query/stream",
                &json!({"sessionId": sid, "query": q}),
            )
            .await?;
        s.expect_event_stream()?;
        Ok(s)
    }

    /// Streaming query read to the end.
    pub async fn stream_all(&self, sid: &str, q: &str) -> Result<Vec<Frame>> {
        self.stream(sid, q).await?.collect_until_end(LONG).await
    }

    /// `GET /sessions/status` → the `status` object.
    pub async fn status(&self, sid: &str) -> Result<Value> {
        let b = self
            .get_ok(&format!("/api/v1/sessions/status?sessionId={sid}"))
            .await?;
        ensure!(b["sessionId"] == sid, "status: wrong sessionId in {b}");
        Ok(b["status"].clone())
    }

    /// `GET /sessions/events` → stored events.
    pub async fn events(&self, sid: &str) -> Result<Vec<Value>> {
        let b = self
            .get_ok(&format!("/api/v1/sessions/events?sessionId={sid}"))
            .await?;
        b["events"]
            .as_array()
            .cloned()
            .with_context(|| format!("events: not an array in {b}"))
    }

    /// `GET /sessions/details` → the `session` object.
    pub async fn details(&self, sid: &str) -> Result<Value> {
        let b = self
            .get_ok(&format!("/api/v1/sessions/details?sessionId={sid}"))
            .await?;
        Ok(b["session"].clone())
    }

    /// `POST /sessions/abort` → `success`.
    pub async fn abort(&self, sid: &str) -> Result<bool> {
        let b = self
            .post_ok("/api/v1/sessions/abort", &json!({"sessionId": sid}))
            .await?;
        b["success"]
            .as_bool()
            .with_context(|| format!("abort: no boolean success in {b}"))
    }

    /// `POST /sessions/delete` expecting `{"success":true}`.
    pub async fn delete_session(&self, sid: &str) -> Result<()> {
        let b = self
            .post_ok("/api/v1/sessions/delete", &json!({"sessionId": sid}))
            .await?;
        ensure!(b["success"] == true, "delete: {b}");
        Ok(())
    }

    /// `GET /workers` → the `workers` array.
    pub async fn workers(&self) -> Result<Vec<Value>> {
        let b = self.get_ok("/api/v1/workers").await?;
        let workers = b["workers"]
            .as_array()
            .cloned()
            .with_context(|| format!("workers: not an array in {b}"))?;
        let mut seen = match self.seen_workers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for w in &workers {
            if let Some(pid) = w["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
                seen.insert(pid);
            }
        }
        Ok(workers)
    }

    /// The pid of the session's live worker, if any.
    pub async fn worker_pid(&self, sid: &str) -> Result<Option<u32>> {
        for w in self.workers().await? {
            if w["sessionId"] == sid {
                let pid = w["pid"]
                    .as_u64()
                    .with_context(|| format!("worker without numeric pid: {w}"))?;
                return Ok(Some(u32::try_from(pid)?));
            }
        }
        Ok(None)
    }

    /// The session's worker pid, waiting (up to 20 s) for it to appear.
    pub async fn wait_worker_pid(&self, sid: &str) -> Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = self.worker_pid(sid).await? {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no worker listed for session {sid}: {:?}\n--- logs ---\n{}",
                    self.workers().await?,
                    self.logs()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The temporary directory and every absolute path named by the options (a workspace root
/// configured outside the temporary directory, say).
fn option_paths(opts: &ServerOpts, tmp: &Path) -> Vec<PathBuf> {
    let config = opts
        .config
        .as_ref()
        .map(|(_, c)| c.as_str())
        .unwrap_or_default();
    let mut roots = vec![tmp.to_owned()];
    let text = opts.args.iter().map(String::as_str).chain([config]);
    for token in
        text.flat_map(|t| t.split(|c: char| c == '"' || c == '\'' || c == '=' || c.is_whitespace()))
    {
        if token.starts_with('/') && token.len() > 1 {
            roots.push(PathBuf::from(token));
        }
    }
    roots
}

/// Mount points under `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir) && point != dir)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Detaches what a killed server left mounted under `dir` (its sessions' workspace images, kept
/// mounted for the next start of a server), so that the temporary directory can go.
pub fn detach_mounts_under(dir: &Path) {
    for point in mounts_under(dir) {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Once it is gone it mounts nothing more.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for root in &self.roots {
            // Only what a supervisor mounts: workspace images (a `.disk` directory beside them)
            // and its image pool.
            for point in mounts_under(root) {
                let ours = point.parent().is_some_and(|p| p.join(".disk").is_dir())
                    || point.ends_with(".disk/pool")
                    || point.parent().is_some_and(|p| p.ends_with(".disk/pool"));
                if ours {
                    let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        let seen = match self.seen_workers.get_mut() {
            Ok(g) => std::mem::take(g),
            Err(p) => std::mem::take(p.into_inner()),
        };
        for pid in seen {
            // Only processes that still look like one of our workers (guards against pid reuse).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let is_worker = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .any(|a| a == "worker");
            if is_worker && pid_alive(pid) {
                let _ = kill9_pid(pid);
            }
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("kill({pid}, {sig})"))
}

/// Sends SIGKILL to an arbitrary pid (e.g. a worker listed by `/api/v1/workers`).
pub fn kill9_pid(pid: u32) -> Result<()> {
    signal(pid, nix::sys::signal::Signal::SIGKILL)
}

// ------------------------------------------------------------------------------------------------
// JSON responses
// ------------------------------------------------------------------------------------------------

/// A fully read HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    /// Parsed JSON body (`Null` if empty or not JSON).
    pub json: Value,
}

impl Resp {
    async fn read(resp: reqwest::Response) -> Result<Resp> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.context("read response body")?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            text,
            json,
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Top-level `code` of an error body.
    pub fn code(&self) -> Option<&str> {
        self.json.get("code").and_then(Value::as_str)
    }

    pub fn expect_status(&self, status: u16, what: &str) -> Result<()> {
        ensure!(
            self.status == status,
            "{what}: expected HTTP {status}, got {} with body {}",
            self.status,
            self.text
        );
        Ok(())
    }

    /// Asserts a structured JSON error: HTTP `status`, top-level string `code` == `code`,
    /// string `message`, and an `error` field that is either a string (then `details` must be
    /// an object) or an object carrying the same `code` (query family).
    pub fn expect_error(&self, status: u16, code: &str, what: &str) -> Result<()> {
        self.expect_status(status, what)?;
        ensure!(
            self.json.is_object(),
            "{what}: error body is not a JSON object: {:?}",
            self.text
        );
        let ct = self.header("content-type").unwrap_or_default();
        ensure!(
            ct.starts_with("application/json"),
            "{what}: error content-type is {ct:?}, body {}",
            self.text
        );
        ensure!(
            self.code() == Some(code),
            "{what}: expected code {code:?}, body {}",
            self.text
        );
        ensure!(
            self.json["message"].is_string(),
            "{what}: `message` is not a string in {}",
            self.text
        );
        match &self.json["error"] {
            Value::String(_) => ensure!(
                self.json["details"].is_object(),
                "{what}: `details` is not an object in {}",
                self.text
            ),
            Value::Object(inner) => {
                ensure!(
                    inner.get("code").and_then(Value::as_str) == Some(code),
                    "{what}: error.code differs from code in {}",
                    self.text
                );
                ensure!(
                    inner.get("message").is_some_and(Value::is_string),
                    "{what}: error.message missing in {}",
                    self.text
                );
            }
            _ => bail!(
                "{what}: `error` is neither string nor object in {}",
                self.text
            ),
        }
        Ok(())
    }

    /// Like [`Resp::expect_error`] and additionally requires the plain shape
    /// (`error` is a string).
    pub fn expect_plain_error(&self, status: u16, code: &str, what: &str) -> Result<()> {
        self.expect_error(status, code, what)?;
        ensure!(
            self.json["error"].is_string(),
            "{what}: `error` should be a string in {}",
            self.text
        );
        Ok(())
    }
}

/// A response read from a raw socket (see [`Server::raw_request`]).
#[derive(Debug, Clone)]
pub struct RawResp {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub json: Value,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn code(&self) -> Option<&str> {
        self.json.get("code").and_then(Value::as_str)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_more<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Result<bool> {
    let mut tmp = [0u8; 16 * 1024];
    match rd.read(&mut tmp).await {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            Ok(true)
        }
        // A reset after the response was (partly) received: report what we have.
        Err(e) if !buf.is_empty() => {
            let _ = e;
            Ok(false)
        }
        Err(e) => Err(anyhow!(e).context("read raw response")),
    }
}

async fn read_http_response<R: AsyncRead + Unpin>(rd: &mut R) -> Result<RawResp> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p;
        }
        ensure!(
            read_more(rd, &mut buf).await?,
            "connection closed before response headers: {:?}",
            String::from_utf8_lossy(&buf)
        );
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = buf.split_off(head_end + 4);
    if let Some(len) = get("content-length") {
        let len: usize = len.parse().context("bad content-length")?;
        while body.len() < len {
            if !read_more(rd, &mut body).await? {
                break;
            }
        }
        body.truncate(len);
    } else if get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        while find(&body, b"0\r\n\r\n").is_none() {
            if !read_more(rd, &mut body).await? {
                break;
            }
        }
        body = dechunk(&body)?;
    } else {
        while read_more(rd, &mut body).await? {}
    }
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok(RawResp {
        status,
        headers,
        body,
        json,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let p = find(data, b"\r\n").context("bad chunk header")?;
        let size_str = String::from_utf8_lossy(&data[..p]);
        let size_hex = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).context("bad chunk size")?;
        data = &data[p + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(data.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ------------------------------------------------------------------------------------------------
// SSE
// ------------------------------------------------------------------------------------------------

/// One SSE frame: optional `id:` and the JSON `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<u64>,
    pub data: Value,
}

impl Frame {
    /// The event's `type` ("" if missing).
    pub fn ty(&self) -> &str {
        self.data["type"].as_str().unwrap_or_default()
    }
}

/// A streaming response being read frame by frame.
pub struct SseStream {
    pub status: u16,
    pub headers: HeaderMap,
    resp: Option<reqwest::Response>,
    buf: Vec<u8>,
    pending: VecDeque<Frame>,
    /// A data frame whose `id:` block may still follow.
    held: Option<Frame>,
}

impl SseStream {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Asserts HTTP 200 and `Content-Type: text/event-stream`.
    pub fn expect_event_stream(&self) -> Result<()> {
        ensure!(
            self.status == 200,
            "expected an SSE response (200), got HTTP {}",
            self.status
        );
        let ct = self.header("content-type").unwrap_or_default();
        ensure!(
            ct.starts_with("text/event-stream"),
            "expected content-type text/event-stream, got {ct:?}"
        );
        Ok(())
    }

    /// Reads the whole body as JSON (for non-SSE error responses such as 409).
    pub async fn json_body(mut self) -> Result<Resp> {
        let resp = self.resp.take().context("stream already consumed")?;
        let status = self.status;
        let headers = self.headers.clone();
        let text = timeout(LONG, resp.text())
            .await
            .context("timed out reading body")??;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            text,
            json,
        })
    }

    /// Next frame, `None` once the server closed the response. Errors on timeout.
    pub async fn next_frame(&mut self, within: Duration) -> Result<Option<Frame>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            let Some(resp) = self.resp.as_mut() else {
                return Ok(None);
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let chunk = timeout(remaining, resp.chunk())
                .await
                .map_err(|_| anyhow!("timed out after {within:?} waiting for an SSE frame"))?
                .context("reading SSE body")?;
            match chunk {
                Some(bytes) => {
                    self.buf
                        .extend(bytes.iter().copied().filter(|b| *b != b'\r'));
                    self.parse_buffered()?;
                }
                None => {
                    self.resp = None;
                    if let Some(held) = self.held.take() {
                        self.pending.push_back(held);
                    }
                    let rest = String::from_utf8_lossy(&self.buf).into_owned();
                    ensure!(
                        rest.trim().is_empty(),
                        "SSE stream ended with an incomplete frame: {rest:?}"
                    );
                }
            }
        }
    }

    /// Parses complete blocks. The server writes each agent event as a `data:` block followed
    /// by an `id:` block (the official UI parses only blocks that start with `data: `), so a
    /// data frame is held back until its id block (or the next data block, or the end of the
    /// stream) has been read.
    fn parse_buffered(&mut self) -> Result<()> {
        while let Some(p) = find(&self.buf, b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..p + 2).collect();
            let text = std::str::from_utf8(&block[..p]).context("SSE frame is not UTF-8")?;
            match parse_block(text)? {
                Block::Comment => {}
                Block::Id(id) => {
                    let held = self
                        .held
                        .take()
                        .with_context(|| format!("SSE id block {id} follows no data block"))?;
                    ensure!(held.id.is_none(), "SSE data block got two ids");
                    self.pending.push_back(Frame {
                        id: Some(id),
                        ..held
                    });
                }
                Block::Data(frame) => {
                    if let Some(previous) = self.held.take() {
                        self.pending.push_back(previous);
                    }
                    // A frame that carries its id is complete; one without may get it next.
                    if frame.id.is_some() {
                        self.pending.push_back(frame);
                    } else {
                        self.held = Some(frame);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads frames until the server ends the response (total deadline `within`).
    pub async fn collect_until_end(&mut self, within: Duration) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(remaining).await {
                Ok(Some(f)) => out.push(f),
                Ok(None) => return Ok(out),
                Err(e) => {
                    return Err(e.context(format!(
                        "stream did not end; {} frames so far, last: {:?}",
                        out.len(),
                        out.last()
                    )));
                }
            }
        }
    }

    /// Reads frames up to and including the first one whose `type` is `ty`.
    pub async fn read_until_type(&mut self, ty: &str, within: Duration) -> Result<Vec<Frame>> {
        self.read_until(within, |f| f.ty() == ty).await
    }

    /// Reads frames up to and including the first one satisfying `pred`.
    pub async fn read_until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Frame) -> bool,
    ) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(remaining).await? {
                Some(f) => {
                    let hit = pred(&f);
                    out.push(f);
                    if hit {
                        return Ok(out);
                    }
                }
                None => bail!(
                    "stream ended before the awaited frame; got types {:?}",
                    types(&out)
                ),
            }
        }
    }

    /// Reads frames until `n` `assistant_streaming_message` frames were seen.
    pub async fn read_deltas(&mut self, n: usize, within: Duration) -> Result<Vec<Frame>> {
        let mut seen = 0;
        self.read_until(within, |f| {
            if f.ty() == "assistant_streaming_message" {
                seen += 1;
            }
            seen >= n
        })
        .await
    }
}

/// One SSE block as the server writes them.
enum Block {
    Comment,
    Id(u64),
    Data(Frame),
}

/// Parses one block. Query streams write a data block as exactly one `data: <json>` line,
/// because that is all the official web UI understands (it `JSON.parse`s everything after
/// `data: `), followed by an `id:` block; the follow stream (`/sessions/events/stream`) uses the
/// standard `id: <seq>` + `data: <json>` block.
fn parse_block(text: &str) -> Result<Block> {
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.starts_with(':')).collect();
    if lines.iter().all(|l| l.is_empty()) {
        return Ok(Block::Comment);
    }
    if let [line] = lines.as_slice() {
        if let Some(id) = line.strip_prefix("id: ") {
            let id = id
                .trim()
                .parse::<u64>()
                .with_context(|| format!("SSE id is not a u64: {id:?}"))?;
            return Ok(Block::Id(id));
        }
        if let Some(data) = line.strip_prefix("data: ") {
            let data: Value = serde_json::from_str(data)
                .with_context(|| format!("SSE data is not JSON: {data:?}"))?;
            return Ok(Block::Data(Frame { id: None, data }));
        }
    }
    if let [id_line, data_line] = lines.as_slice()
        && let (Some(id), Some(data)) = (
            id_line.strip_prefix("id: "),
            data_line.strip_prefix("data: "),
        )
    {
        let id = id
            .trim()
            .parse::<u64>()
            .with_context(|| format!("SSE id is not a u64: {id:?}"))?;
        let data: Value = serde_json::from_str(data)
            .with_context(|| format!("SSE data is not JSON: {data:?}"))?;
        return Ok(Block::Data(Frame { id: Some(id), data }));
    }
    bail!(
        "SSE block is neither `data: <json>`, `id: <seq>`, nor `id: <seq>` + `data: <json>`: {text:?}"
    )
}

// ------------------------------------------------------------------------------------------------
// Frame / event helpers
// ------------------------------------------------------------------------------------------------

/// `type` of each frame.
pub fn types(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(|f| f.ty().to_string()).collect()
}

/// `type` of each event.
pub fn event_types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Concatenated `content` of all `assistant_streaming_message` frames.
pub fn concat_deltas(frames: &[Frame]) -> String {
    frames
        .iter()
        .filter(|f| f.ty() == "assistant_streaming_message")
        .map(|f| f.data["content"].as_str().unwrap_or_default())
        .collect()
}

/// Frames whose `type` is `ty`.
pub fn of_type<'a>(frames: &'a [Frame], ty: &str) -> Vec<&'a Frame> {
    frames.iter().filter(|f| f.ty() == ty).collect()
}

/// Asserts that every frame that has an id has a strictly greater id than the previous one,
/// and that all agent event frames carry an id. Returns the ids.
pub fn check_seq(frames: &[Frame]) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for f in frames {
        if f.ty() == "session_created" {
            continue;
        }
        let id =
            f.id.with_context(|| format!("agent event frame without `id:`: {:?}", f.data))?;
        if let Some(prev) = ids.last() {
            ensure!(
                id > *prev,
                "SSE ids not strictly increasing: {prev} then {id}"
            );
        }
        ids.push(id);
    }
    Ok(ids)
}

/// The text `SLOW n` would produce in full: `t0 t1 ... t{n-1}`.
pub fn slow_text(n: usize) -> String {
    (0..n)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The text `FLOOD n` produces: `w0 w1 ... w{n-1}`.
pub fn flood_text(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `s` looks like a session id: 21 chars from `[A-Za-z0-9_-]`.
pub fn is_session_id(s: &str) -> bool {
    s.len() == 21
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `s` looks like a UUID (8-4-4-4-12 hex).
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8usize, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `v` is an integer millisecond timestamp after 2020-01-01.
pub fn is_ms_timestamp(v: &Value) -> bool {
    v.as_u64().is_some_and(|t| t > 1_577_836_800_000)
        || v.as_f64()
            .is_some_and(|t| t.fract() == 0.0 && t > 1_577_836_800_000.0)
}

// ------------------------------------------------------------------------------------------------
// Processes and polling
// ------------------------------------------------------------------------------------------------

/// Whether `pid` is a live process. A missing `/proc/<pid>` or a zombie (`Z`) / dead (`X`)
/// state counts as dead.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ..." — comm may contain spaces/parens, so use the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    !matches!(
        rest.trim_start().chars().next(),
        Some('Z' | 'X' | 'x') | None
    )
}

/// Polls `cond` every 50 ms until it returns true; errors after `within` naming `what`.
pub async fn wait_until<F>(within: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for: {what}");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Canonical form of a path for comparisons (falls back to the path itself).
pub fn canon(p: impl AsRef<Path>) -> PathBuf {
    let p = p.as_ref();
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
