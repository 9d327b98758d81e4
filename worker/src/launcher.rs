//! The launcher: the fresh, single-threaded exec of our binary
//! that turns itself into a session's jailed worker.
//!
//! At `strict` it clones the worker into new namespaces, writes the child's uid/gid maps from
//! outside, releases it, and then stays behind as a de-privileged monitor whose only job is to
//! wait for the worker and pass its exit on: it is the parent the worker's parent-death signal is
//! tied to, and it sits outside the worker's PID namespace, where the worker cannot signal it.
//! At `chroot` and `none` the launcher is the worker itself.

use std::os::fd::OwnedFd;

use shared::jail::{JailLevel, JailSpec};

use crate::jail::namespaces::{self, Cloned};
use crate::jail::{self, JailError, Jailed, privileges, seccomp};

/// Builds the jail `spec` describes. Returns in the jailed worker; at `strict` the launcher half
/// never returns (it exits with its child's status).
///
/// `supervisor` is our parent's pid as read at start, before anything could have changed it.
///
/// # Errors
/// The first jail step that failed, in the process where it failed (the monitor reports its own
/// failures on fd 3 before exiting, since it still holds the channel at that point).
pub(crate) fn enter(spec: &JailSpec, supervisor: libc::pid_t) -> Result<Jailed, JailError> {
    // The session's environment and umask, inherited by everything below.
    jail::set_environment(spec.level, &spec.workspace)?;
    match spec.level {
        JailLevel::Strict => strict(spec, supervisor),
        JailLevel::Chroot => jail::enter_chroot(spec, supervisor),
        JailLevel::None => jail::enter_none(spec),
    }
}

/// Whether we run as root (root mode: per-session host ids, groups can be cleared).
fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn strict(spec: &JailSpec, supervisor: libc::pid_t) -> Result<Jailed, JailError> {
    let root = is_root();
    // Root's supplementary groups must not reach the session; after `setgroups=deny` the child
    // could not drop them itself.
    if root {
        namespaces::clear_groups()?;
    }
    let (release_read, release_write) = namespaces::release_pipe()?;
    match namespaces::clone_into_namespaces(spec.user_namespace)? {
        Cloned::Child => {
            // Our copy of the write end would keep our own lifeline open.
            drop(release_write);
            jail::enter_strict(spec, release_read)
        }
        Cloned::Parent(child) => {
            drop(release_read);
            monitor(spec, child, release_write, supervisor, root)
        }
    }
}

/// Maps the child's ids, releases it, then shrinks to a monitor and waits.
fn monitor(
    spec: &JailSpec,
    child: libc::pid_t,
    lifeline: OwnedFd,
    supervisor: libc::pid_t,
    root: bool,
) -> ! {
    if spec.user_namespace {
        // SAFETY: geteuid/getegid have no arguments and cannot fail.
        let own = unsafe { (libc::geteuid(), libc::getegid()) };
        let host = if root {
            spec.host_ids.unwrap_or(own)
        } else {
            own
        };
        if let Err(e) = namespaces::write_maps(child, host) {
            fail_before_release(child, &e);
        }
    }
    if let Err(e) = namespaces::release(&lifeline) {
        fail_before_release(
            child,
            &JailError::UidMap {
                file: "release pipe",
                source: e,
            },
        );
    }
    // The channel belongs to the worker now; holding it would keep the supervisor from seeing
    // EOF when the worker dies.
    // SAFETY: closing fd 3, which no Rust object owns in the launcher.
    unsafe { libc::close(shared::process::CHANNEL_FD) };

    // The monitor keeps nothing it does not need. Failures here are not fatal to the
    // session, but the monitor never runs privileged: if it cannot drop, it kills the worker.
    if let Err(e) = shrink(spec, root, supervisor) {
        eprintln!("launcher: {e}; stopping the worker");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    wait_and_exit(child, &lifeline)
}

/// The monitor's shrinking: same identity as the session (root mode), no capabilities,
/// `no_new_privs`, the parent-death signal armed again (cleared by the uid change) and checked,
/// then an allow-list seccomp filter for waiting and exiting.
fn shrink(spec: &JailSpec, root: bool, supervisor: libc::pid_t) -> Result<(), JailError> {
    if root {
        privileges::drop_bounding()?;
        if let Some((uid, gid)) = spec.host_ids {
            namespaces::set_ids(uid, gid)?;
        }
    }
    privileges::clear_sets()?;
    privileges::set_no_new_privs()?;
    privileges::set_non_dumpable()?;
    privileges::arm_death_signal()?;
    privileges::check_parent(supervisor)?;
    seccomp::install_monitor()
}

/// Waits for the worker and leaves the way it left: same exit code, or the same signal.
/// `_lifeline` (the release pipe's write end) stays open until then: the worker checks it to
/// know its parent-death signal is armed against a live parent.
fn wait_and_exit(child: libc::pid_t, _lifeline: &OwnedFd) -> ! {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waits for our own child; `status` is writable.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            break;
        }
        if rc == -1 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit ends the process without running anything else.
            unsafe { libc::_exit(1) };
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restores the default action for `signal` and sends it to ourselves, so our
        // parent sees the worker's fate; _exit covers signals that do not terminate.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
    }
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// The maps or the release failed: tell the supervisor which step, stop the child (still
/// blocked on the release pipe), and leave.
fn fail_before_release(child: libc::pid_t, error: &JailError) -> ! {
    crate::channel::send_jail_failure(error);
    // SAFETY: signalling and reaping our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        libc::_exit(shared::process::WorkerExit::Jail.code());
    }
}
