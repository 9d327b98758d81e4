//! Namespaces: the launcher's clone into fresh namespaces, the uid/gid maps
//! the launcher writes for its child, and the child's switch to the inside identity.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use shared::jail::INSIDE_ID;

use super::{JailError, cvt, cvt_long};

/// Every namespace `strict` creates, except the user namespace (added in user-namespace mode).
const NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

/// The namespace names as the audit reports them.
pub(crate) fn names(user_namespace: bool) -> Vec<String> {
    let mut names = Vec::new();
    if user_namespace {
        names.push("user".to_owned());
    }
    names.extend(
        ["mnt", "pid", "net", "ipc", "uts", "cgroup"]
            .iter()
            .map(|n| (*n).to_owned()),
    );
    names
}

/// Which side of the clone we are on.
pub(crate) enum Cloned {
    /// The launcher; the child's pid in our PID namespace.
    Parent(libc::pid_t),
    /// The new process: PID 1 of the new PID namespace.
    Child,
}

/// One `clone` with every namespace flag, fork-like (no new stack: the child continues on a
/// copy-on-write copy of ours).
///
/// The PID and mount namespaces must be owned by the new user namespace, so they are created in
/// the same call; `CLONE_NEWUSER` requires a single-threaded caller, which the launcher is (its
/// self-check made sure).
pub(crate) fn clone_into_namespaces(user_namespace: bool) -> Result<Cloned, JailError> {
    let mut flags = NAMESPACES;
    if user_namespace {
        flags |= libc::CLONE_NEWUSER;
    }
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a raw clone without CLONE_VM and with a null stack behaves like fork(2): the child
    // gets a private copy of our address space. The launcher is single-threaded (self-checked),
    // so no lock can be held by a thread that does not exist in the child. glibc's cached thread
    // id is not relied on afterwards (glibc ≥ 2.34 asks the kernel in raise/pthread_kill on self).
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match cvt_long(rc) {
        Ok(0) => Ok(Cloned::Child),
        Ok(pid) => Ok(Cloned::Parent(pid as libc::pid_t)),
        Err(source) => Err(JailError::Clone { source }),
    }
}

/// The launcher's side of the id maps: `setgroups` = `deny`, then one-id maps for uid and gid:
/// inside [`INSIDE_ID`] to `host` (root mode: the session's host ids; rootless: our own, the only
/// ids an unprivileged writer may map).
///
/// Written from outside the new namespace: a task inside it could map only its own id.
pub(crate) fn write_maps(child: libc::pid_t, host: (u32, u32)) -> Result<(), JailError> {
    let write = |file: &'static str, contents: String| -> Result<(), JailError> {
        let path = format!("/proc/{child}/{file}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(contents.as_bytes()))
            .map_err(|source| JailError::UidMap { file, source })
    };
    write("setgroups", "deny".to_owned())?;
    write("uid_map", format!("{INSIDE_ID} {} 1\n", host.0))?;
    write("gid_map", format!("{INSIDE_ID} {} 1\n", host.1))?;
    Ok(())
}

/// The child waits until the launcher has written its maps. EOF means the launcher died first;
/// then nobody would ever signal us, so we leave (this closes the race between the clone and
/// the child arming its parent-death signal).
pub(crate) fn await_release(release: &OwnedFd) -> Result<(), JailError> {
    let mut byte = [0u8; 1];
    let mut file = std::fs::File::from(release.try_clone().map_err(|_| JailError::Released)?);
    loop {
        match file.read(&mut byte) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(JailError::Released),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(JailError::Released),
        }
    }
}

/// The `uid_map` of this process, read while the host `/proc` is still mounted. The audit uses
/// it to name the host uid the inside uid stands for.
pub(crate) fn read_uid_map() -> Vec<(u32, u32, u32)> {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|text| {
            text.lines()
                .filter_map(|line| {
                    let mut parts = line.split_whitespace().map(str::parse::<u32>);
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Some((a, b, c)),
                        _ => None,
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `setresgid` then `setresuid` to the inside id, immediately after the maps exist.
///
/// Capabilities in the new user namespace survive this: the inside uid 0 is unmapped, so the
/// kernel's "leaving root clears capabilities" rule does not apply; the privilege drop removes
/// them explicitly.
pub(crate) fn become_inside_user() -> Result<(), JailError> {
    let id = INSIDE_ID;
    set_ids(id, id)
}

/// `setresgid` then `setresuid` to `uid`/`gid`, all three ids each.
pub(crate) fn set_ids(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: plain syscalls on integers. The raw syscall (not glibc's setresgid) changes only
    // this thread, which is the only one.
    cvt_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })
        .map_err(|source| JailError::SetIds { id: gid, source })?;
    // SAFETY: as above.
    cvt_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
        .map_err(|source| JailError::SetIds { id: uid, source })?;
    Ok(())
}

/// Clears the supplementary groups (root only). Done in the launcher before the clone, so the
/// child never carries root's groups into the session (after `setgroups=deny` it could not drop
/// them itself).
pub(crate) fn clear_groups() -> Result<(), JailError> {
    // SAFETY: setgroups with a zero-length list reads no memory.
    cvt_long(unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) })
        .map(|_| ())
        .map_err(|source| JailError::SetIds { id: 0, source })
}

/// The session's own hostname, in its own UTS namespace.
pub(crate) fn set_hostname() -> Result<(), JailError> {
    const NAME: &[u8] = b"sandbox";
    // SAFETY: NAME is valid for NAME.len() bytes.
    cvt(unsafe { libc::sethostname(NAME.as_ptr().cast(), NAME.len()) })
        .map(|_| ())
        .map_err(|source| JailError::Hostname { source })
}

/// Creates the release pipe (the child waits on it until its id maps exist): close-on-exec, so no
/// `exec`'d command ever inherits it.
pub(crate) fn release_pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(|source| JailError::Clone { source })?;
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let read = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    Ok((read, write))
}

/// Lets the child go: one byte on the release pipe. The write end stays open in the launcher
/// for as long as it lives, which makes it the child's lifeline (its parent-death check).
pub(crate) fn release(write: &OwnedFd) -> std::io::Result<()> {
    let byte = [1u8];
    // SAFETY: writes one byte from a valid buffer to an fd we own.
    let rc = unsafe { libc::write(write.as_raw_fd(), byte.as_ptr().cast(), 1) };
    if rc == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
