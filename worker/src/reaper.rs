//! PID 1 duties: at `strict` the worker is PID 1 of its PID
//! namespace, so every process that loses its parent inside the session (a `setsid` daemon, the
//! children of a killed shell) is re-parented to it. Unreaped, each would stay a zombie that
//! holds a pid (and a slot of `pids.max`) until the session ends.
//!
//! # Design: one waiter for every child
//!
//! A blanket `waitpid(-1)` steals the exit status of a child that someone else is waiting for,
//! and peeking with `waitid(P_ALL, WNOWAIT)` only ever shows the first zombie (a child whose
//! owner has not collected it yet would hide every orphan behind it). So the worker has exactly
//! one way to wait for a process, and it is this module:
//!
//! * A child the worker wants the status of is spawned through [`spawn`], which records its pid
//!   in a registry **while holding the registry lock across `spawn` itself**.
//! * The reaper ([`start`], PID 1 only) runs on SIGCHLD and calls `waitpid(-1, WNOHANG)` until
//!   nothing is left, under the same lock. The status of a registered pid is stored in the
//!   registry for its owner; any other pid was an orphan and is simply gone.
//! * The owner asks [`Watched::try_wait`], which returns a stored status or, under the lock,
//!   does a `waitpid(pid, WNOHANG)` of its own (so it also works where no reaper runs: the unit
//!   tests, which are not PID 1 and share their process with other tests' children).
//!
//! Because both sides reap only while holding the lock, and a pid enters the registry before
//! the lock is released after the fork, no status can be collected by the wrong side: whoever
//! reaps a registered child writes its status where the owner looks.
//!
//! Rules this relies on: the worker never uses `tokio::process` (its own SIGCHLD reaper would
//! race this one), and any other child is waited for synchronously on the runtime thread (the
//! test-only probes do that), where the reaper task, which runs on that same single thread,
//! cannot interleave with it.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Registered children: `None` while they run, `Some(wait status)` once reaped.
type Registry = BTreeMap<libc::pid_t, Option<WaitStatus>>;

static CHILDREN: Mutex<Registry> = Mutex::new(BTreeMap::new());

fn children() -> MutexGuard<'static, Registry> {
    CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether this process is the init of its PID namespace (the `strict` worker).
pub(crate) fn is_init() -> bool {
    std::process::id() == 1
}

/// Starts the reaper when this process is PID 1; elsewhere orphans go to someone else's init.
/// Must be called inside the tokio runtime: the reaper is a task on it (see the module notes on
/// why it must share the runtime thread).
pub(crate) fn start() {
    if !is_init() {
        return;
    }
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "no SIGCHLD handler: orphans will not be reaped");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            // Also once at the start: children may have ended before the handler existed.
            reap();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
}

/// Kills every other process of the session: `kill(-1, SIGKILL)` from PID 1 reaches every
/// process of its PID namespace except init itself and the caller's own thread group (so the
/// worker and its tokio threads stay), and nothing outside the namespace. This is how a stopped
/// command takes its `setsid` daemons and double-forked grandchildren along, which its process
/// group no longer contains. Does nothing where the worker is not PID 1 (`kill(-1)` there would
/// reach every process of the uid). The reaper collects the dead.
pub(crate) fn kill_all_others() {
    if is_init() {
        let _ = nix::sys::signal::kill(Pid::from_raw(-1), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Collects every child that has ended: registered ones keep their status for their owner,
/// orphans are just gone.
fn reap() {
    let orphans = collect(&mut children(), None);
    if orphans > 0 {
        tracing::debug!(orphans, "reaped orphaned processes");
    }
}

/// `waitpid(which, WNOHANG)` (any child for `None`) until nothing more has ended, under the
/// registry lock the caller holds; returns how many of the reaped pids were not registered
/// (orphans).
fn collect(registry: &mut Registry, which: Option<Pid>) -> u32 {
    let mut orphans = 0u32;
    loop {
        match waitpid(which, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => {}
            // Children remain but none has ended, or (ECHILD) there are none left at all.
            Ok(WaitStatus::StillAlive) | Err(_) => return orphans,
            Ok(status) => {
                let Some(pid) = status.pid() else {
                    return orphans;
                };
                match registry.get_mut(&pid.as_raw()) {
                    Some(slot) => *slot = Some(status),
                    None => orphans += 1,
                }
            }
        }
    }
}

/// A child spawned through [`spawn`]; its status is collected by whichever side reaps it.
/// Dropping it forgets the registration (a child still running is then reaped as an orphan).
#[derive(Debug)]
pub(crate) struct Watched {
    pid: libc::pid_t,
}

/// Spawns `command` and registers the child before anything can reap it.
///
/// # Errors
/// The spawn failed (the program is missing, a `pre_exec` step failed, no pids left).
pub(crate) fn spawn(command: &mut Command) -> std::io::Result<(Child, Watched)> {
    let mut guard = children();
    let child = command.spawn()?;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| std::io::Error::other("child pid out of range"))?;
    guard.insert(pid, None);
    Ok((child, Watched { pid }))
}

impl Watched {
    /// The child's pid (also its process group and session: commands call `setsid`).
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The child's wait status once it has ended, without blocking.
    ///
    /// # Errors
    /// `waitpid` failed for another reason than "still running" (it cannot be ours then).
    pub(crate) fn try_wait(&self) -> std::io::Result<Option<WaitStatus>> {
        let mut registry = children();
        if let Some(Some(status)) = registry.get(&self.pid) {
            return Ok(Some(*status));
        }
        match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => Ok(None),
            Ok(status) => {
                registry.insert(self.pid, Some(status));
                Ok(Some(status))
            }
            Err(errno) => Err(errno.into()),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        children().remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait(watched: &Watched) -> WaitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = watched.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "child did not end");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn the_owner_collects_its_child_and_can_ask_again() {
        let (_child, watched) = spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        let status = wait(&watched);
        assert_eq!(status, WaitStatus::Exited(Pid::from_raw(watched.pid()), 7));
        // The status stays with the registration until it is dropped.
        assert_eq!(watched.try_wait().unwrap(), Some(status));
        let pid = watched.pid();
        drop(watched);
        assert!(!children().contains_key(&pid));
    }

    #[test]
    fn a_status_reaped_by_the_reaper_reaches_the_owner() {
        // The reaper's own loop, aimed at this child only: a blanket waitpid(-1) would take
        // other tests' children, since unit tests share one process.
        let (_child, watched) = spawn(Command::new("/bin/sh").args(["-c", "kill -9 $$"])).unwrap();
        let pid = watched.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut registry = children();
            if registry.get(&pid) != Some(&None) {
                break;
            }
            assert_eq!(
                collect(&mut registry, Some(Pid::from_raw(pid))),
                0,
                "a registered child is no orphan"
            );
            drop(registry);
            assert!(Instant::now() < deadline, "child did not end");
            std::thread::sleep(Duration::from_millis(2));
        }
        let status = watched.try_wait().unwrap().unwrap();
        assert!(matches!(
            status,
            WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
        ));
    }

    #[test]
    fn an_unregistered_child_counts_as_an_orphan() {
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut orphans = 0;
        while orphans == 0 {
            orphans = collect(&mut children(), Some(Pid::from_raw(pid)));
            assert!(Instant::now() < deadline, "child did not end");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(orphans, 1);
        // Already reaped: std's own wait finds nothing left to collect.
        assert!(child.wait().is_err());
    }

    #[test]
    fn no_reaper_outside_a_pid_namespace() {
        assert!(!is_init());
    }
}
