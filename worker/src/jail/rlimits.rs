//! Resource limits: soft = hard, never above what we already have (root's
//! bounding set on the CI host lacks `CAP_SYS_RESOURCE`, so a raise would fail anyway).
//!
//! These are per-process backstops. The real per-session caps are the cgroup's (`pids.max`,
//! `memory.max`, `cpu.max`), which the supervisor sets up before the launcher is released.

use shared::jail::JailLimits;

use super::JailError;

/// The resources the audit reports, with their names.
pub(crate) const REPORTED: [(libc::__rlimit_resource_t, &str); 10] = [
    (libc::RLIMIT_AS, "as"),
    (libc::RLIMIT_NPROC, "nproc"),
    (libc::RLIMIT_NOFILE, "nofile"),
    (libc::RLIMIT_FSIZE, "fsize"),
    (libc::RLIMIT_CPU, "cpu"),
    (libc::RLIMIT_CORE, "core"),
    (libc::RLIMIT_MEMLOCK, "memlock"),
    (libc::RLIMIT_MSGQUEUE, "msgqueue"),
    (libc::RLIMIT_RTPRIO, "rtprio"),
    (libc::RLIMIT_NICE, "nice"),
];

fn get(resource: libc::__rlimit_resource_t) -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    unsafe { libc::getrlimit(resource, &mut limit) };
    limit
}

/// `(soft, hard)` of `resource`.
pub(crate) fn read(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let limit = get(resource);
    (limit.rlim_cur, limit.rlim_max)
}

fn set(
    resource: libc::__rlimit_resource_t,
    name: &'static str,
    soft: u64,
    hard: u64,
) -> Result<(), JailError> {
    let current = get(resource);
    let hard = hard.min(current.rlim_max);
    let limit = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    super::cvt(unsafe { libc::setrlimit(resource, &limit) })
        .map(|_| ())
        .map_err(|source| JailError::Rlimit {
            resource: name,
            source,
        })
}

/// Every limit of the spec's [`JailLimits`], `SIGXFSZ` ignored (an oversize write fails with
/// `EFBIG` instead of killing the worker), and a lower scheduling priority.
///
/// After the privilege drop (so the worker cannot raise them back: raising a hard limit needs
/// `CAP_SYS_RESOURCE`), before Landlock and seccomp.
pub(crate) fn install(limits: &JailLimits) -> Result<(), JailError> {
    set(
        libc::RLIMIT_AS,
        "as",
        limits.address_space,
        limits.address_space,
    )?;
    set(
        libc::RLIMIT_NPROC,
        "nproc",
        limits.processes,
        limits.processes,
    )?;
    set(
        libc::RLIMIT_NOFILE,
        "nofile",
        limits.open_files,
        limits.open_files,
    )?;
    set(
        libc::RLIMIT_FSIZE,
        "fsize",
        limits.file_size,
        limits.file_size,
    )?;
    // Cumulative per process: generous, with a minute between the warning and the kill.
    set(
        libc::RLIMIT_CPU,
        "cpu",
        limits.cpu_seconds,
        limits.cpu_seconds.saturating_add(60),
    )?;
    set(libc::RLIMIT_CORE, "core", 0, 0)?;
    set(libc::RLIMIT_MEMLOCK, "memlock", 64 * 1024, 64 * 1024)?;
    set(libc::RLIMIT_MSGQUEUE, "msgqueue", 0, 0)?;
    set(libc::RLIMIT_RTPRIO, "rtprio", 0, 0)?;
    set(libc::RLIMIT_NICE, "nice", 0, 0)?;
    // SAFETY: installs SIG_IGN for SIGXFSZ; no handler code runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // SAFETY: setpriority on our own process with integer arguments.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    Ok(())
}
