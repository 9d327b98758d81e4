//! A running `supervisor` process: started from [`ServerOpts`] in its own temporary directory,
//! ready once it prints its listening line, signalled by pid, and killed on drop, with what it
//! leaves behind cleaned up (see `cleanup`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};

use crate::cleanup::{detach_supervisor_mounts, kill_workers};
use crate::logs::{LISTENING_PREFIX, Logs, Stream};
use crate::opts::{Prepared, ServerOpts, prepare};
use crate::process::signal;

/// How long the server may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running supervisor process. Dropping it sends SIGKILL.
pub struct Server {
    child: Child,
    pid: u32,
    port: u16,
    base_url: String,
    ws: PathBuf,
    logs: Logs,
    pub(crate) http: reqwest::Client,
    /// The admin token every harness client sends (`E2E_AUTH=token`).
    pub(crate) token: Option<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Worker pids seen in `/api/v1/workers`; killed on drop if still alive (safety net so a
    /// failing test never leaks workers).
    seen_workers: Mutex<HashSet<u32>>,
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

impl Server {
    /// Starts the server with default options.
    pub async fn start_default() -> Result<Server> {
        Self::start(ServerOpts::new()).await
    }

    /// Starts the server and waits (up to 30 s) for its listening line on stdout.
    pub async fn start(opts: ServerOpts) -> Result<Server> {
        let (opts, with_token) = crate::auth_mode::with_tokens(opts);
        let Prepared { tmp, ws, mut cmd } = prepare(&opts)?;
        let roots = opts.roots(tmp.path());
        let mut child = cmd.spawn().context("spawn supervisor")?;
        let pid = child.id().context("supervisor has no pid")?;
        let logs = Logs::default();
        let stdout = child.stdout.take().context("stdout not piped")?;
        let stderr = child.stderr.take().context("stderr not piped")?;
        let (tx, rx) = oneshot::channel();
        let mut out_task = tokio::spawn(logs.clone().capture(stdout, Stream::Stdout, Some(tx)));
        let mut err_task = tokio::spawn(logs.clone().capture(stderr, Stream::Stderr, None));

        let listening = tokio::select! {
            r = rx => match r {
                Ok(url) => Ok(url),
                Err(_) => {
                    // stdout closed without the line; give the process a moment to exit.
                    let st = timeout(Duration::from_secs(5), child.wait()).await;
                    let _ = timeout(Duration::from_secs(2), &mut err_task).await;
                    Err(anyhow!(
                        "supervisor closed stdout before printing its listening line \
                         (exit: {st:?})\n--- logs ---\n{}",
                        logs.combined()
                    ))
                }
            },
            st = child.wait() => {
                let _ = timeout(Duration::from_secs(2), &mut err_task).await;
                let _ = timeout(Duration::from_secs(2), &mut out_task).await;
                Err(anyhow!(
                    "supervisor exited ({st:?}) before listening\n--- logs ---\n{}",
                    logs.combined()
                ))
            }
            _ = sleep(STARTUP_TIMEOUT) => Err(anyhow!(
                "supervisor did not print `{LISTENING_PREFIX}...` within {STARTUP_TIMEOUT:?}\n\
                 --- logs ---\n{}",
                logs.combined()
            )),
        };
        let (url, port) = match listening.and_then(|url| Ok((listening_port(&url)?, url))) {
            Ok((port, url)) => (url, port),
            Err(e) => {
                stop_and_detach(&mut child, &roots).await;
                return Err(e);
            }
        };
        let token = if with_token {
            let token = crate::auth_mode::admin_token(tmp.path())?;
            crate::auth_mode::remember(&url, &token);
            Some(token)
        } else {
            None
        };
        Ok(Server {
            child,
            pid,
            port,
            base_url: url,
            ws,
            logs,
            http: crate::http::client(token.as_deref())?,
            token,
            tasks: vec![out_task, err_task],
            seen_workers: Mutex::default(),
            roots,
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
        let roots = opts.roots(tmp.path());
        let mut child = cmd.spawn().context("spawn supervisor")?;
        let logs = Logs::default();
        let stdout = child.stdout.take().context("stdout not piped")?;
        let stderr = child.stderr.take().context("stderr not piped")?;
        let (tx, mut rx) = oneshot::channel();
        let out_task = tokio::spawn(logs.clone().capture(stdout, Stream::Stdout, Some(tx)));
        let err_task = tokio::spawn(logs.clone().capture(stderr, Stream::Stderr, None));
        let exited = tokio::select! {
            st = child.wait() => st.context("wait for supervisor"),
            Ok(url) = &mut rx => Err(anyhow!(
                "supervisor was expected to exit but started listening on {url}\n\
                 --- logs ---\n{}",
                logs.combined()
            )),
            _ = sleep(within) => Err(anyhow!(
                "supervisor was expected to exit within {within:?} but kept running\n\
                 --- logs ---\n{}",
                logs.combined()
            )),
        };
        // A server that gives up may already have mounted its image pool, and leaves it mounted.
        stop_and_detach(&mut child, &roots).await;
        let status = exited?;
        let _ = timeout(Duration::from_secs(5), out_task).await;
        let _ = timeout(Duration::from_secs(5), err_task).await;
        drop(tmp);
        Ok(Exited {
            status,
            stdout: logs.stdout(),
            stderr: logs.stderr(),
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
        self.logs.combined()
    }
    pub fn stderr(&self) -> String {
        self.logs.stderr()
    }
    pub fn stdout(&self) -> String {
        self.logs.stdout()
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

    /// Remembers worker pids a listing showed, for the safety net on drop.
    pub(crate) fn saw_workers(&self, pids: impl IntoIterator<Item = u32>) {
        self.seen_workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(pids);
    }
}

/// The port of the listening line's URL, which must be on 127.0.0.1.
fn listening_port(url: &str) -> Result<u16> {
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("cannot parse port from listening url {url:?}"))?;
    ensure!(
        url.starts_with("http://127.0.0.1:"),
        "unexpected listening url {url:?} (expected http://127.0.0.1:<port>)"
    );
    Ok(port)
}

/// Kills `child` if it still runs, waits for it, then detaches what it mounted under `roots`:
/// a supervisor that stops, or fails to start, leaves its workspace images mounted.
async fn stop_and_detach(child: &mut Child, roots: &[PathBuf]) {
    let _ = child.start_kill();
    let _ = timeout(Duration::from_secs(5), child.wait()).await;
    detach_supervisor_mounts(roots);
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Once it is gone it mounts nothing more.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        detach_supervisor_mounts(&self.roots);
        for t in &self.tasks {
            t.abort();
        }
        let seen = std::mem::take(
            self.seen_workers
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        kill_workers(seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::{detach_mounts_under, mounts_under};

    /// A server refused at start (here: another server holds its control socket) has already
    /// mounted its workspace image pool by then; none of it may stay mounted once
    /// `expect_exit` returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_server_leaves_nothing_mounted() -> Result<()> {
        let first = Server::start_default().await?;
        let disk = first.get_ok("/api/v1/system/health").await?["isolation"]["disk"].clone();
        if disk["backend"] != "image" {
            println!("skipped: this server keeps no workspace images ({disk})");
            return Ok(());
        }
        let ws = tempfile::Builder::new().prefix("e2e-refused-").tempdir()?;
        let socket = first.tmp_dir().join("data").join("ctl.sock");
        let config = serde_json::json!({"server": {"controlSocket": socket}});
        let exited = Server::expect_exit(
            ServerOpts::new()
                .without_workspace_flag()
                .arg("--workspace")
                .arg(ws.path().to_str().context("temp dir path is not UTF-8")?)
                .config_file("config.json", config.to_string()),
            Duration::from_secs(20),
        )
        .await?;
        ensure!(
            !exited.status.success() && exited.stderr.contains("already listening"),
            "the second server was not refused: {}",
            exited.stderr
        );
        ensure!(
            ws.path().join(".disk").is_dir(),
            "the refused server prepared no images, so this test proved nothing"
        );
        let left = mounts_under(ws.path());
        // Whatever the outcome, this test leaves nothing mounted either.
        detach_mounts_under(ws.path());
        ensure!(left.is_empty(), "still mounted: {left:?}");
        Ok(())
    }
}
