//! Processes and polling: signals by pid, whether a pid is alive, and waiting for a condition.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::{Instant, sleep};

pub(crate) fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("kill({pid}, {sig})"))
}

/// Sends SIGKILL to an arbitrary pid (e.g. a worker listed by `/api/v1/workers`).
pub fn kill9_pid(pid: u32) -> Result<()> {
    signal(pid, nix::sys::signal::Signal::SIGKILL)
}

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
