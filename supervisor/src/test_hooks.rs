//! Test builds only (feature `isolation-tests`): what the isolation suite asks of the process
//! itself, before it serves or before its jail is built.

use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::Context;
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

/// Rootless mode for tests: hand the current directory and the workspace root to `uid`, drop to
/// it, and exec ourselves again without the flag, so the serving process starts fresh (dumpable
/// again, as a real unprivileged server would be).
pub fn become_user(uid: u32, workspace: Option<&Path>) -> anyhow::Result<()> {
    let cwd = std::env::current_dir()?;
    std::os::unix::fs::chown(&cwd, Some(uid), Some(uid))?;
    if let Some(ws) = workspace {
        std::fs::create_dir_all(ws)?;
        std::os::unix::fs::chown(ws, Some(uid), Some(uid))?;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--test-run-as="))
        .collect();
    // main is still single-threaded here, so the ids change for the whole process.
    let (user, group) = (Uid::from_raw(uid), Gid::from_raw(uid));
    setgroups(&[]).context("setgroups")?;
    setresgid(group, group, group).context("setresgid")?;
    setresuid(user, user, user).context("setresuid")?;
    let exe = std::env::current_exe()?;
    let err = std::process::Command::new(exe).args(args).exec();
    Err(err.into())
}

/// The `denyNamespaces` hook: this launcher starts under a seccomp filter that refuses
/// namespace creation, as a container's default profile does, before any jail step runs. The
/// filter is the worker's own (`worker::jail::seccomp::namespace_denial`).
pub fn deny_namespaces() -> anyhow::Result<()> {
    let program = worker::jail::seccomp::namespace_denial()
        .map_err(|e| anyhow::anyhow!("building the namespace denial filter: {e}"))?;
    seccompiler::apply_filter(&program).context("installing the namespace denial filter")?;
    Ok(())
}
