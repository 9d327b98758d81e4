//! File descriptors: only 0, 1, 2 and the channel at 3 survive, checked once when the launcher
//! starts and again just before seccomp.
//!
//! The first clean-up runs before any path operation: an inherited directory fd (or
//! `/proc/self/fd/N` as cwd) walks out of both `chroot` and `pivot_root`, even for an unprivileged
//! uid (runc CVE-2024-21626; verified on the CI host). The supervisor's descriptors are
//! close-on-exec in Rust, but C libraries may not be, so nothing is assumed.

use super::JailError;

/// Fds the checks look at: the jail's RLIMIT_NOFILE default. Everything above 3 was closed by
/// `close_range` (whatever the limit), and descriptors opened during setup get the lowest free
/// numbers, so this range is where a leak would show.
const CHECKED_FDS: libc::c_int = 1024;

/// Whether `fd` is open.
fn is_open(fd: libc::c_int) -> bool {
    // SAFETY: F_GETFD on any integer is harmless; EBADF means closed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// The open fds below [`CHECKED_FDS`].
pub(crate) fn open_fds() -> Vec<i32> {
    (0..CHECKED_FDS).filter(|fd| is_open(*fd)).collect()
}

/// The launcher's first step: closes every fd above 3 (`close_range`, or one by one where the
/// kernel lacks it), then verifies that exactly 0–3 are open.
pub(crate) fn close_inherited() -> Result<(), JailError> {
    // SAFETY: close_range closes fds of this single-threaded process; nothing above 3 is owned by
    // any Rust object yet (this runs first in the launcher).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
    if rc != 0 {
        // Old kernel: close what /proc lists (it sees every number), else a wide scan.
        let listed: Vec<libc::c_int> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                    .collect()
            })
            .unwrap_or_else(|_| (4..65_536).collect());
        for fd in listed.into_iter().filter(|fd| *fd > 3) {
            // SAFETY: as above; closing an fd nobody owns (EBADF for the listing's own fd,
            // already closed when the iterator was dropped, is harmless).
            unsafe { libc::close(fd) };
        }
    }
    verify_only_standard()
}

/// Only 0, 1, 2, 3 are open (after the launcher's clean-up, and again as the jail's last check
/// before seccomp), and 0 is `/dev/null` (no terminal to inject keystrokes into).
pub(crate) fn verify_only_standard() -> Result<(), JailError> {
    let open = open_fds();
    if open != [0, 1, 2, 3] {
        return Err(JailError::Fds(format!(
            "expected exactly fds 0-3 to be open, found {open:?}"
        )));
    }
    // SAFETY: fstat writes into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is open (checked above) and `st` is writable.
    if unsafe { libc::fstat(0, &mut st) } != 0 {
        return Err(JailError::Fds("fstat(0) failed".into()));
    }
    let is_null = st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3);
    if !is_null {
        return Err(JailError::Fds("stdin is not /dev/null".into()));
    }
    Ok(())
}
