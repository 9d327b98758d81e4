//! What the jail must refuse outright: mounts, new namespaces, privilege, terminal injection,
//! io_uring, the syscalls the filter denies, and touching other processes.

use std::io::IoSliceMut;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::uio::RemoteIoVec;
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::answer::{Answer, errname};

/// T10: a tmpfs over `target`.
pub(super) fn mount_tmpfs(target: &str) -> Answer {
    Answer::from_nix(nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    ))
}

/// T10: taking a mount away (to uncover what is beneath it).
pub(super) fn umount(target: &str) -> Answer {
    Answer::from_nix(nix::mount::umount2(target, MntFlags::MNT_DETACH))
}

/// T10: a second `pivot_root`.
pub(super) fn pivot_root() -> Answer {
    Answer::from_nix(nix::unistd::pivot_root(".", "."))
}

/// T10: the new mount API, which can clone a mount tree past the old API's checks.
pub(super) fn open_tree() -> Answer {
    // SAFETY: a valid NUL-terminated path and integer flags; a returned descriptor is closed.
    let rc = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c"/".as_ptr(), 1u32) };
    let answer = Answer::from_rc(rc, Value::Null);
    super::close_if_open(libc::c_int::try_from(rc).unwrap_or(-1));
    answer
}

/// T26: `setuid(0)` as a raw syscall (glibc's wrapper would also signal every thread).
pub(super) fn setuid0() -> Answer {
    // SAFETY: a syscall with one integer argument.
    Answer::from_rc(
        unsafe { libc::syscall(libc::SYS_setuid, 0u32) },
        Value::Null,
    )
}

/// T26: new namespaces through `unshare`.
pub(super) fn unshare(flags: u64) -> Answer {
    let flags = CloneFlags::from_bits_retain(flags as libc::c_int);
    Answer::from_nix(nix::sched::unshare(flags))
}

/// T26: new namespaces through a raw `clone(flags)`, which the filter inspects by its flags
/// argument. The child leaves at once; `flags` 0 is a plain fork (the control).
pub(super) fn clone_with_flags(flags: u64) -> Answer {
    let flags = flags | libc::SIGCHLD as u64;
    // SAFETY: a fork-like raw clone (no new stack, no shared memory); the child only calls
    // `_exit`, and the parent reaps it below.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if rc == 0 {
        // SAFETY: the child leaves at once, without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let answer = Answer::from_rc(rc, Value::Null);
    if let Ok(pid) = libc::pid_t::try_from(rc)
        && pid > 0
    {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
    }
    answer
}

/// T26: `clone3`, whose flags sit in a struct the filter cannot read, so it must be refused
/// whole.
pub(super) fn clone3() -> Answer {
    // SAFETY: a null argument struct: an unfiltered kernel answers EFAULT/EINVAL.
    Answer::from_rc(
        unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) },
        Value::Null,
    )
}

/// T26: joining another namespace (fd 0 is `/dev/null`: an unfiltered call gives EINVAL).
pub(super) fn setns() -> Answer {
    Answer::from_nix(nix::sched::setns(
        std::io::stdin().as_fd(),
        CloneFlags::CLONE_NEWNET,
    ))
}

/// T27: an ioctl on fd 0 (`TIOCSTI` and friends inject input into a terminal).
pub(super) fn ioctl(request: u64) -> Answer {
    let byte = b'x';
    // SAFETY: a raw ioctl on fd 0 with a pointer to one byte that outlives the call; the request
    // number is the test's, high bits included, which is why this is not a typed ioctl.
    let rc = unsafe { libc::syscall(libc::SYS_ioctl, 0, request, &raw const byte) };
    Answer::from_rc(rc, Value::Null)
}

/// io_uring, which performs I/O the syscall filter never sees.
pub(super) fn io_uring() -> Answer {
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes the params buffer, 120 bytes being its size.
    let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    let answer = Answer::from_rc(rc, Value::Null);
    super::close_if_open(libc::c_int::try_from(rc).unwrap_or(-1));
    answer
}

/// T28: syscalls the filter must refuse, each with invalid arguments (null pointers, bad ids),
/// so one the filter lets through fails in the kernel's own checks instead of doing anything.
/// The detail maps each to the errno name it got.
pub(super) fn try_syscalls() -> Answer {
    let calls: [(&str, libc::c_long, [usize; 4]); 9] = [
        ("keyctl", libc::SYS_keyctl, [usize::MAX, 0, 0, 0]),
        ("add_key", libc::SYS_add_key, [0, 0, 0, 0]),
        ("bpf", libc::SYS_bpf, [usize::MAX, 0, 0, 0]),
        (
            "perf_event_open",
            libc::SYS_perf_event_open,
            [0, 0, 0, usize::MAX],
        ),
        ("userfaultfd", libc::SYS_userfaultfd, [usize::MAX, 0, 0, 0]),
        (
            "open_by_handle_at",
            libc::SYS_open_by_handle_at,
            [usize::MAX, 0, 0, 0],
        ),
        ("init_module", libc::SYS_init_module, [0, 0, 0, 0]),
        ("kexec_load", libc::SYS_kexec_load, [0, usize::MAX, 0, 0]),
        ("personality", libc::SYS_personality, [0x0040_0000, 0, 0, 0]),
    ];
    let mut results = serde_json::Map::new();
    for (name, nr, a) in calls {
        // SAFETY: every call gets invalid arguments and either fails in the filter or in the
        // kernel's argument checks; none can change state.
        let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3]) };
        let errno = if rc == -1 { Errno::last_raw() } else { 0 };
        results.insert(name.to_owned(), json!(errname(errno)));
    }
    Answer::ok(results)
}

/// T15/T30: `kill(pid, signal)`; 0 only asks whether `pid` could be signalled.
pub(super) fn kill(pid: i32, signal: i32) -> Answer {
    let signal = match signal {
        0 => None,
        n => match Signal::try_from(n) {
            Ok(signal) => Some(signal),
            Err(errno) => return Answer::failed(errno, Value::Null),
        },
    };
    Answer::from_nix(nix::sys::signal::kill(Pid::from_raw(pid), signal))
}

/// T15: attaching to another process as a debugger.
pub(super) fn ptrace(pid: i32) -> Answer {
    // SAFETY: PTRACE_ATTACH with integer arguments; no memory is passed.
    let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) };
    Answer::from_rc(rc, Value::Null)
}

/// T15: reading another process's memory (from an address it need not even have mapped: the
/// permission check comes first).
pub(super) fn process_vm_readv(pid: i32) -> Answer {
    let mut buf = [0u8; 16];
    let remote = RemoteIoVec {
        base: 0x1000,
        len: buf.len(),
    };
    Answer::from_nix(nix::sys::uio::process_vm_readv(
        Pid::from_raw(pid),
        &mut [IoSliceMut::new(&mut buf)],
        &[remote],
    ))
}
