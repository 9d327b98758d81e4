//! Filesystem probes: what a session can read, write, link and create, and the classic ways
//! out of a chroot or a pivoted root (climbing `..`, a second chroot, `/proc/self/fd`).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nix::fcntl::{AT_FDCWD, OFlag, RenameFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::ForkResult;
use serde_json::{Value, json};
use shared::probe::NodeKind;

use super::answer::Answer;

/// At most `max` bytes of a file, as (lossy) text.
pub(super) fn read(path: &str, max: u64) -> Answer {
    let read = std::fs::File::open(path).and_then(|file| {
        let mut bytes = Vec::new();
        file.take(max).read_to_end(&mut bytes).map(|_| bytes)
    });
    Answer::from_io(read, |bytes| json!(String::from_utf8_lossy(&bytes)))
}

/// `open(2)` and one read of up to 4 KiB (a write-only descriptor reads nothing).
pub(super) fn open(path: &str, write: bool, create: bool) -> Answer {
    let mut flags = OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    flags |= if write {
        OFlag::O_WRONLY
    } else {
        OFlag::O_RDONLY
    };
    if create {
        flags |= OFlag::O_CREAT;
    }
    match nix::fcntl::open(path, flags, Mode::from_bits_truncate(0o644)) {
        Err(errno) => Answer::failed(errno, Value::Null),
        Ok(fd) => {
            let mut buf = vec![0u8; 4096];
            let n = nix::unistd::read(&fd, &mut buf).unwrap_or(0);
            buf.truncate(n);
            Answer::ok(String::from_utf8_lossy(&buf).into_owned())
        }
    }
}

pub(super) fn stat(path: &str) -> Answer {
    Answer::from_io(
        std::fs::symlink_metadata(path),
        |m| json!({"dir": m.is_dir(), "file": m.is_file(), "symlink": m.is_symlink(), "size": m.len()}),
    )
}

pub(super) fn list(path: &str) -> Answer {
    Answer::from_io(std::fs::read_dir(path), |entries| {
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        json!(names)
    })
}

/// Runs `body` and goes back to the working directory it started in.
fn keeping_cwd<T>(body: impl FnOnce() -> T) -> T {
    let before = std::env::current_dir().ok();
    let result = body();
    if let Some(dir) = before {
        let _ = std::env::set_current_dir(dir);
    }
    result
}

fn climb(n: u32) {
    for _ in 0..n {
        let _ = std::env::set_current_dir("..");
    }
}

/// T02: `..` as far as it goes, then where that ended and whether `then` opens from there.
pub(super) fn chdir_up(n: u32, then: Option<&str>) -> Answer {
    keeping_cwd(|| {
        climb(n);
        let cwd = std::env::current_dir()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let opened = then.map_or(Value::Null, |path| open(path, false, false).to_json());
        Answer::ok(json!({"cwd": cwd, "open": opened}))
    })
}

/// T03: chroot into a subdirectory, climb out of it with `..` (the cwd stays outside the new
/// root), chroot again to where that ended, and try a host file.
pub(super) fn double_chroot() -> Answer {
    let detail = keeping_cwd(|| {
        let _ = std::fs::create_dir("chroot-x");
        let first = Answer::from_nix(nix::unistd::chroot("chroot-x"));
        climb(50);
        let second = Answer::from_nix(nix::unistd::chroot("."));
        let file = open("/etc/os-release", false, false);
        json!({"chroot": first.to_json(), "again": second.to_json(), "file": file.to_json()})
    });
    let _ = std::fs::remove_dir("chroot-x");
    Answer::ok(detail)
}

/// T04: `openat` on a descriptor number the test names (one the supervisor leaked on purpose).
pub(super) fn openat(fd: i32, path: &str) -> Answer {
    let Ok(path) = std::ffi::CString::new(path) else {
        return Answer::failed(nix::errno::Errno::EINVAL, Value::Null);
    };
    // SAFETY: a valid NUL-terminated path; the descriptor number is the test's choice, which is
    // the point (an invalid one gives EBADF). A returned descriptor is closed at once.
    let rc = unsafe { libc::openat(fd, path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let answer = Answer::from_rc(rc.into(), Value::Null);
    super::close_if_open(rc);
    answer
}

/// T05: each `/proc/self/fd/<n>` as a working directory, and a climb to a host file from there.
/// `ok` means no descriptor led anywhere.
pub(super) fn proc_fd_walk() -> Answer {
    let mut reached = Vec::new();
    for n in 0..64 {
        let escaped = keeping_cwd(|| {
            std::env::set_current_dir(format!("/proc/self/fd/{n}")).is_ok()
                && open("../../../etc/os-release", false, false).is_ok()
        });
        if escaped {
            reached.push(n);
        }
    }
    Answer::new(reached.is_empty(), 0, json!(reached))
}

/// Writes up to `bytes` to `path` until the first error, which is the answer's errno (a file
/// size limit, a full tmpfs or quota).
pub(super) fn write_until_error(path: &str, bytes: u64, remove: bool) -> Answer {
    let chunk = vec![0x5au8; 1 << 20];
    let mut file = match std::fs::File::create(path) {
        Ok(file) => file,
        Err(e) => return Answer::from_io_error(&e),
    };
    let mut written: u64 = 0;
    let mut errno = 0;
    while written < bytes {
        let want = usize::try_from((bytes - written).min(chunk.len() as u64)).unwrap_or(0);
        match file.write(&chunk[..want]) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                errno = e.raw_os_error().unwrap_or(0);
                break;
            }
        }
    }
    drop(file);
    if remove {
        let _ = std::fs::remove_file(path);
    }
    Answer::new(errno == 0, errno, json!({"written": written}))
}

pub(super) fn mkfifo(path: &str) -> Answer {
    Answer::from_nix(nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o644)))
}

pub(super) fn symlink(target: &str, link: &str) -> Answer {
    Answer::from_io(std::os::unix::fs::symlink(target, link), |()| Value::Null)
}

/// T11: a hard link to a file the session does not own.
pub(super) fn link(from: &str, to: &str) -> Answer {
    Answer::from_io(std::fs::hard_link(from, to), |()| Value::Null)
}

/// A Unix socket file in the workspace, kept bound for as long as the worker lives.
pub(super) fn unix_socket_file(path: &str) -> Answer {
    Answer::from_io(std::os::unix::net::UnixListener::bind(path), |listener| {
        std::mem::forget(listener);
        Value::Null
    })
}

/// T48: a tree deeper than the file API will walk.
pub(super) fn mkdir_deep(path: &str, n: u32) -> Answer {
    let mut path = std::path::PathBuf::from(path);
    for _ in 0..n {
        path.push("d");
        if let Err(e) = std::fs::create_dir(&path) {
            return Answer::from_io_error(&e);
        }
    }
    Answer::ok(n)
}

/// T08: a device node (or FIFO) of the test's choosing.
pub(super) fn mknod(path: &str, kind: NodeKind, major: u32, minor: u32) -> Answer {
    let kind = match kind {
        NodeKind::Char => SFlag::S_IFCHR,
        NodeKind::Block => SFlag::S_IFBLK,
        NodeKind::Fifo => SFlag::S_IFIFO,
    };
    let dev = nix::sys::stat::makedev(major.into(), minor.into());
    Answer::from_nix(nix::sys::stat::mknod(
        path,
        kind,
        Mode::from_bits_truncate(0o666),
        dev,
    ))
}

/// T24: the worker's own executable opened for writing.
pub(super) fn exe_write() -> Answer {
    Answer::from_io(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/exe"),
        |_| Value::Null,
    )
}

/// T43: swaps `<dir>/sub` (a real directory) and `<dir>/alt` (a symlink to `target`) with
/// `RENAME_EXCHANGE` in a tight loop for `secs`, in a child, so the test can race the file API.
/// Answers the child's pid.
pub(super) fn flip(dir: &str, target: &str, secs: u64) -> Answer {
    let sub = format!("{dir}/sub");
    let alt = format!("{dir}/alt");
    if std::fs::create_dir_all(&sub).is_err()
        || std::fs::write(format!("{sub}/passwd"), "workspace copy\n").is_err()
        || std::os::unix::fs::symlink(target, &alt).is_err()
    {
        return Answer::new(false, 0, "setup");
    }
    // SAFETY: the worker is single-threaded here, so the child may run ordinary code; it only
    // renames and leaves with `_exit`.
    match unsafe { nix::unistd::fork() } {
        Err(errno) => Answer::failed(errno, "fork"),
        Ok(ForkResult::Child) => {
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                let _ = nix::fcntl::renameat2(
                    AT_FDCWD,
                    sub.as_str(),
                    AT_FDCWD,
                    alt.as_str(),
                    RenameFlags::RENAME_EXCHANGE,
                );
            }
            // SAFETY: leaves the child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => Answer::ok(child.as_raw()),
    }
}
