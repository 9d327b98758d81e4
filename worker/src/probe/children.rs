//! Probes that could take the worker down run in a forked child and report that child's fate
//! (`{exit, signal}`): `kill(-1)`, fork and memory bombs, daemons, the x32 guard. `alloc_here`
//! is the exception on purpose: it takes the worker itself to the memory limit. `exec` runs a
//! program the way a command tool does.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use serde_json::{Value, json};

use super::answer::{Answer, errname};

/// Leaves a forked child without running the parent's destructors or atexit handlers.
fn leave(code: i32) -> ! {
    // SAFETY: `_exit` ends the process at once; nothing of the parent's state is touched.
    unsafe { libc::_exit(code) }
}

/// Runs `body` in a forked child and reports its exit code or signal; kills it after `limit`.
fn in_child(limit: Duration, body: impl FnOnce() -> i32) -> Answer {
    // SAFETY: the worker is single-threaded here, so the child may run ordinary code.
    match unsafe { fork() } {
        Err(errno) => Answer::failed(errno, "fork"),
        Ok(ForkResult::Child) => leave(body()),
        Ok(ForkResult::Parent { child }) => Answer::ok(wait_child(child, limit)),
    }
}

/// Waits for `pid` (killing it after `limit`) and describes how it ended.
fn wait_child(pid: Pid, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return json!({"exit": code, "signal": null}),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return json!({"exit": null, "signal": signal as i32});
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                return json!({"exit": null, "signal": null, "error": errname(errno as i32)});
            }
        }
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return json!({"exit": null, "signal": Signal::SIGKILL as i32, "timedOut": true});
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pipe whose read end the parent keeps; the child reports numbers through the write end.
fn report_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

fn send_u64(fd: &OwnedFd, value: u64) {
    let _ = nix::unistd::write(fd, &value.to_le_bytes());
}

fn read_u64s(fd: &OwnedFd) -> Vec<u64> {
    let mut all = Vec::new();
    let mut buf = [0u8; 8];
    while nix::unistd::read(fd, &mut buf) == Ok(8) {
        all.push(u64::from_le_bytes(buf));
    }
    all
}

/// T29: `kill(-1, SIGKILL)` reaches every process the caller may signal; from a child, so the
/// worker survives where that includes it.
pub(super) fn kill_all() -> Answer {
    in_child(Duration::from_secs(10), || {
        match kill(Pid::from_raw(-1), Signal::SIGKILL) {
            Ok(()) => 0,
            Err(errno) => errno as i32,
        }
    })
}

/// T31: a child forks sleepers until fork fails (or `limit` is reached), reports how many and
/// the errno, then kills them all.
pub(super) fn fork_bomb(limit: u64) -> Answer {
    let (read, write) = match report_pipe() {
        Ok(pipe) => pipe,
        Err(errno) => return Answer::failed(errno, "pipe"),
    };
    // SAFETY: the worker is single-threaded here; the child runs plain syscalls and small Rust
    // code, and leaves with `_exit`.
    let pid = match unsafe { fork() } {
        Err(errno) => return Answer::failed(errno, "fork"),
        Ok(ForkResult::Child) => {
            drop(read);
            let mut children = Vec::new();
            let mut errno = 0u64;
            while (children.len() as u64) < limit {
                // SAFETY: fork in a single-threaded child; the grandchild only waits for the
                // SIGKILL below.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => loop {
                        nix::unistd::pause();
                    },
                    Ok(ForkResult::Parent { child }) => children.push(child),
                    Err(e) => {
                        errno = e as u64;
                        break;
                    }
                }
            }
            send_u64(&write, children.len() as u64);
            send_u64(&write, errno);
            for child in &children {
                let _ = kill(*child, Signal::SIGKILL);
            }
            for child in &children {
                let _ = waitpid(*child, None);
            }
            leave(0)
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(write);
    let numbers = read_u64s(&read);
    let fate = wait_child(pid, Duration::from_secs(60));
    let forked = numbers.first().copied().unwrap_or(0);
    let errno = i32::try_from(numbers.get(1).copied().unwrap_or(0)).unwrap_or(0);
    Answer::new(true, errno, json!({"forked": forked, "child": fate}))
}

/// T33: a child touches memory in `step_mb` chunks up to `max_mb`, reporting its progress; the
/// answer says how far it got and how it ended (exit 2: an allocation failed).
pub(super) fn memory_bomb(max_mb: u64, step_mb: u64) -> Answer {
    let (read, write) = match report_pipe() {
        Ok(pipe) => pipe,
        Err(errno) => return Answer::failed(errno, "pipe"),
    };
    let step_mb = step_mb.max(1);
    let step = usize::try_from(step_mb << 20).unwrap_or(64 << 20);
    // SAFETY: the worker is single-threaded here; the child maps and writes memory only.
    let pid = match unsafe { fork() } {
        Err(errno) => return Answer::failed(errno, "fork"),
        Ok(ForkResult::Child) => {
            drop(read);
            let mut touched = 0u64;
            while touched < max_mb {
                // mmap rather than a Vec: a failed allocation must be an errno to report, not
                // an abort.
                // SAFETY: an anonymous private mapping at an address of the kernel's choice;
                // checked for failure below.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        step,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    send_u64(&write, touched);
                    leave(2);
                }
                // SAFETY: `p` is a fresh writable mapping of `step` bytes.
                unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, step) };
                touched += step_mb;
                send_u64(&write, touched);
            }
            leave(0)
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(write);
    let numbers = read_u64s(&read);
    let fate = wait_child(pid, Duration::from_secs(120));
    let touched = numbers.iter().copied().max().unwrap_or(0);
    Answer::ok(json!({"touchedMb": touched, "child": fate}))
}

/// T33 (run level): touches memory in the worker itself, not a child: the cgroup's OOM killer
/// takes the worker, which is what a run ended by the memory limit looks like.
pub(super) fn alloc_here(mb: u64) -> Answer {
    let mut keep: Vec<Vec<u8>> = Vec::new();
    for _ in 0..mb / 64 {
        keep.push(vec![1u8; 64 << 20]);
    }
    Answer::ok(keep.len())
}

/// T32: a double-forked `setsid` daemon that would outlive the session if nothing stopped it.
/// Answers its pid.
pub(super) fn daemon() -> Answer {
    let (read, write) = match report_pipe() {
        Ok(pipe) => pipe,
        Err(errno) => return Answer::failed(errno, "pipe"),
    };
    // SAFETY: the worker is single-threaded here; the child and grandchild run plain syscalls.
    let pid = match unsafe { fork() } {
        Err(errno) => return Answer::failed(errno, "fork"),
        Ok(ForkResult::Child) => {
            drop(read);
            let _ = nix::unistd::setsid();
            // SAFETY: as above, in the (single-threaded) child.
            if let Ok(ForkResult::Child) = unsafe { fork() } {
                send_u64(&write, nix::unistd::getpid().as_raw() as u64);
                drop(write);
                loop {
                    nix::unistd::pause();
                }
            }
            leave(0)
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(write);
    let numbers = read_u64s(&read);
    let _ = waitpid(pid, None);
    Answer::new(!numbers.is_empty(), 0, json!(numbers.first()))
}

/// T28: `getpid` through the x32 ABI (bit 30 set), in a child. The filter's guard kills before
/// the kernel looks, with or without `CONFIG_X86_X32_ABI`; a child that comes back means the
/// guard is missing.
pub(super) fn x32() -> Answer {
    in_child(Duration::from_secs(10), || {
        // SAFETY: a syscall number without arguments; the filter ends the child here.
        let rc = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
        if rc < 0 { Errno::last_raw() } else { 0 }
    })
}

/// Runs a program inside the jail (the way a command tool does) with a timeout and a 64 KiB
/// cap per stream, and reports its exit and output.
pub(super) fn exec(argv: &[String], timeout_ms: u64) -> Answer {
    let Some((program, rest)) = argv.split_first() else {
        return Answer::new(false, Errno::EINVAL as i32, "empty argv");
    };
    let spawned = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Answer::from_io_error(&e),
    };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    let capped = |stream: Option<&mut dyn Read>| {
        let mut out = Vec::new();
        if let Some(stream) = stream {
            let _ = stream.take(64 * 1024).read_to_end(&mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let stdout = capped(child.stdout.as_mut().map(|s| s as &mut dyn Read));
    let stderr = capped(child.stderr.as_mut().map(|s| s as &mut dyn Read));
    Answer::ok(json!({
        "exit": status.and_then(|s| s.code()),
        "signal": status.and_then(|s| s.signal()),
        "stdout": stdout,
        "stderr": stderr,
    }))
}
