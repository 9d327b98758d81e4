//! Privileges: every capability set emptied, the session identity in root
//! mode without user namespaces, `no_new_privs`, non-dumpable, and the parent-death signal armed
//! again after the last credential change.

use std::os::fd::{AsRawFd, OwnedFd};

use super::{JailError, cvt, namespaces};

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The effective, permitted and inheritable sets as 64-bit masks.
pub(crate) fn read_capabilities() -> std::io::Result<(u64, u64, u64)> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData structs (version 3 layout) into `data`.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    super::cvt_long(rc)?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

/// Capabilities still in the bounding set, as a mask (`PR_CAPBSET_READ` for each one the kernel
/// knows; it answers `EINVAL` past `CAP_LAST_CAP`).
pub(crate) fn read_bounding() -> u64 {
    let mut mask = 0u64;
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ only reads.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            break;
        }
        if rc == 1 {
            mask |= 1 << cap;
        }
    }
    mask
}

/// Capabilities raised in the ambient set, as a mask.
pub(crate) fn read_ambient() -> u64 {
    let mut mask = 0u64;
    for cap in 0..64 {
        // SAFETY: PR_CAP_AMBIENT_IS_SET only reads.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if rc < 0 {
            break;
        }
        if rc == 1 {
            mask |= 1 << cap;
        }
    }
    mask
}

/// Drops every capability from the bounding set. Needs `CAP_SETPCAP`, so it runs before any uid
/// change; a caller without it (rootless launcher) has nothing in its effective set to lose.
pub(crate) fn drop_bounding() -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ only reads.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if present < 0 {
            break;
        }
        if present == 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP only removes `cap` from this thread's bounding set.
        cvt(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) }).map_err(
            |e| JailError::Capabilities(format!("dropping {cap} from the bounding set: {e}")),
        )?;
    }
    Ok(())
}

/// Bounding set, ambient set, then (root mode without user namespace) supplementary groups,
/// gid and uid in that order, then every remaining set zeroed with `capset` and read back.
///
/// The order is forced: the bounding drop needs `CAP_SETPCAP`, `setgroups` needs `CAP_SETGID`,
/// and the uid switch takes both away. In user-namespace mode the task is not root of its
/// namespace and keeps its capabilities across the switch to the inside user, so the explicit
/// `capset` is what removes them.
pub(crate) fn drop_all(root_ids: Option<(u32, u32)>) -> Result<(), JailError> {
    drop_bounding()?;
    // SAFETY: clears this thread's ambient set; no memory is passed.
    cvt(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map_err(|e| JailError::Capabilities(format!("clearing the ambient set: {e}")))?;
    if let Some((uid, gid)) = root_ids {
        namespaces::clear_groups()?;
        namespaces::set_ids(uid, gid)?;
    }
    clear_sets()?;
    verify_empty()
}

/// `capset` with every set empty.
pub(crate) fn clear_sets() -> Result<(), JailError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads two CapData structs (version 3 layout) from `data`.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    super::cvt_long(rc)
        .map(|_| ())
        .map_err(|e| JailError::Capabilities(format!("capset: {e}")))
}

/// Reads every set back; anything left is a failed jail.
pub(crate) fn verify_empty() -> Result<(), JailError> {
    let (effective, permitted, inheritable) =
        read_capabilities().map_err(|e| JailError::Capabilities(format!("capget: {e}")))?;
    let bounding = read_bounding();
    let ambient = read_ambient();
    if effective | permitted | inheritable | bounding | ambient != 0 {
        return Err(JailError::Capabilities(format!(
            "still set: eff={effective:#x} prm={permitted:#x} inh={inheritable:#x} bnd={bounding:#x} amb={ambient:#x}"
        )));
    }
    Ok(())
}

/// `no_new_privs`. Required before Landlock and seccomp for a task without `CAP_SYS_ADMIN`,
/// and it makes setuid and file-capability binaries run without their privileges.
pub(crate) fn set_no_new_privs() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map(|_| ())
        .map_err(|source| JailError::NoNewPrivs { source })
}

/// Non-dumpable: `/proc/<pid>/{mem,environ,fd}` become unreadable to other processes of the
/// same uid. After the last credential change, which resets the flag.
pub(crate) fn set_non_dumpable() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
        .map(|_| ())
        .map_err(|source| JailError::Dumpable { source })
}

/// SIGKILL when our parent dies. Every uid/gid change clears it (verified on the CI host), so it
/// is armed after the privilege drop.
pub(crate) fn arm_death_signal() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map(|_| ())
    .map_err(|e| JailError::DeathSignal(e.to_string()))
}

/// The parent-death check for a PID-namespaced child, where `getppid()` says 0: the launcher holds
/// the write end of the release pipe as long as it lives, so a hang-up means it is already gone
/// and the death signal armed just now will never come.
pub(crate) fn check_lifeline(release: &OwnedFd) -> Result<(), JailError> {
    let mut poll = libc::pollfd {
        fd: release.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd we own; zero timeout.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    if rc < 0 {
        return Err(JailError::DeathSignal(format!(
            "poll on the lifeline: {}",
            std::io::Error::last_os_error()
        )));
    }
    if poll.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        return Err(JailError::DeathSignal("the launcher is gone".into()));
    }
    Ok(())
}

/// The parent-death check without a PID namespace: the parent must still be the process that
/// started us.
pub(crate) fn check_parent(expected: libc::pid_t) -> Result<(), JailError> {
    // SAFETY: getppid has no arguments.
    let parent = unsafe { libc::getppid() };
    if parent != expected {
        return Err(JailError::DeathSignal(format!(
            "parent changed from {expected} to {parent}: the supervisor is gone"
        )));
    }
    Ok(())
}
