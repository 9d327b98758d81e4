//! Test builds only (feature `isolation-tests`): the in-jail probe server of isolation.md §4.2.
//!
//! When the jail spec asks for it, the worker puts a small pump between fd 3 and the agent:
//! `Probe` frames from the supervisor are answered here, inside the finished jail, and every
//! other frame passes through unchanged in both directions. Each probe issues the syscall a test
//! names and reports `{ok, errno, errname, detail}`. Probes that could take the worker down
//! (fork bomb, memory bomb, `kill(-1)`) run in a forked child and report that child's fate.
//!
//! The worker is single-threaded here (a current-thread runtime, no blocking pool in use), so
//! forked children may run ordinary Rust code.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::frame::{read_frame, write_frame};
use shared::jail::{JailLevel, PROBE_MAGIC, ProbeAnswer, ProbeEnvelope, ProbeRequest};
use shared::protocol::FromWorker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::WorkerError;

/// What the pump writes towards the supervisor: a frame, or raw bytes (channel abuse tests).
enum Outgoing {
    Frame(FromWorker),
    Raw(Vec<u8>),
}

/// Reads one raw frame (prefix included); `None` at a clean end of stream.
async fn read_raw_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > shared::frame::MAX_FRAME_LEN {
        return Err(std::io::Error::other("frame over the limit"));
    }
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&prefix);
    reader.read_exact(&mut frame[4..]).await?;
    Ok(Some(frame))
}

/// Runs the agent on one end of an internal socket pair and the pump on fd 3.
pub(crate) async fn serve_beside_agent(
    session_id: &str,
    stream: UnixStream,
) -> Result<(), WorkerError> {
    let (agent_end, pump_end) = UnixStream::pair().map_err(WorkerError::Runtime)?;
    let sid = session_id.to_owned();
    let agent = tokio::spawn(async move { crate::agent::serve(&sid, agent_end).await });
    let (mut from_supervisor, mut to_supervisor) = stream.into_split();
    let (mut from_agent, mut to_agent) = pump_end.into_split();
    let (out, mut outgoing) = mpsc::channel::<Outgoing>(1024);

    tokio::spawn(async move {
        while let Some(item) = outgoing.recv().await {
            let written = match item {
                Outgoing::Frame(msg) => write_frame(&mut to_supervisor, &msg).await.is_ok(),
                Outgoing::Raw(bytes) => to_supervisor.write_all(&bytes).await.is_ok(),
            };
            if !written {
                break;
            }
        }
    });
    let agent_out = out.clone();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = read_frame::<_, FromWorker>(&mut from_agent).await {
            if agent_out.send(Outgoing::Frame(msg)).await.is_err() {
                break;
            }
        }
    });

    while let Some(frame) = read_raw_frame(&mut from_supervisor)
        .await
        .map_err(|e| WorkerError::Channel(e.into()))?
    {
        match shared::frame::decode::<ProbeEnvelope>(&frame[4..]) {
            Ok(envelope) if envelope.magic == PROBE_MAGIC => {
                let request = envelope.request;
                let (answer, raw) = run(&request);
                if let Some(bytes) = raw {
                    let _ = out.send(Outgoing::Raw(bytes)).await;
                }
                let answer = ProbeAnswer {
                    id: request.id,
                    json: answer.to_string(),
                };
                let _ = out
                    .send(Outgoing::Frame(FromWorker::ProbeAnswer(answer)))
                    .await;
            }
            // Everything else is the agent's, byte for byte.
            _ => {
                if to_agent.write_all(&frame).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(to_agent);
    let _ = tokio::time::timeout(Duration::from_secs(2), agent).await;
    Ok(())
}

fn errname(errno: i32) -> String {
    let name = match errno {
        0 => "OK",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::ELOOP => "ELOOP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ENOTTY => "ENOTTY",
        libc::EOVERFLOW => "EOVERFLOW",
        other => return format!("E{other}"),
    };
    name.to_owned()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `{ok, errno, errname, detail}` for a raw return value (`-1` = failure, errno read now).
fn outcome(rc: i64, detail: Value) -> Value {
    let errno = if rc < 0 { last_errno() } else { 0 };
    json!({"ok": rc >= 0, "errno": errno, "errname": errname(errno), "detail": detail})
}

fn from_io<T>(result: std::io::Result<T>, detail: impl FnOnce(T) -> Value) -> Value {
    match result {
        Ok(v) => json!({"ok": true, "errno": 0, "errname": "OK", "detail": detail(v)}),
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            json!({"ok": false, "errno": errno, "errname": errname(errno), "detail": e.to_string()})
        }
    }
}

fn c(path: &str) -> CString {
    CString::new(path).unwrap_or_default()
}

fn arg_str<'a>(args: &'a Value, key: &str) -> &'a str {
    args[key].as_str().unwrap_or_default()
}

fn arg_u64(args: &Value, key: &str, default: u64) -> u64 {
    args[key].as_u64().unwrap_or(default)
}

fn arg_i64(args: &Value, key: &str, default: i64) -> i64 {
    args[key].as_i64().unwrap_or(default)
}

/// Runs one probe; the second value is raw bytes to write on fd 3 before the answer.
fn run(request: &ProbeRequest) -> (Value, Option<Vec<u8>>) {
    let args: Value = serde_json::from_str(&request.args).unwrap_or(Value::Null);
    let mut raw = None;
    let answer = match request.name.as_str() {
        "audit" => {
            let found = crate::jail::Findings::default();
            json!({"ok": true, "errno": 0, "errname": "OK",
                   "detail": serde_json::to_value(crate::jail::audit::gather(crate::jail::level().unwrap_or(JailLevel::None), &found)).unwrap_or(Value::Null)})
        }
        "env" => {
            let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            json!({"ok": true, "errno": 0, "errname": "OK", "detail": vars})
        }
        "pid" => json!({"ok": true, "errno": 0, "errname": "OK", "detail": std::process::id()}),
        "read" => {
            let max = arg_u64(&args, "max", 65536) as usize;
            from_io(std::fs::read(arg_str(&args, "path")), |bytes| {
                let end = bytes.len().min(max);
                json!(String::from_utf8_lossy(&bytes[..end]))
            })
        }
        "open" => open(&args),
        "stat" => from_io(
            std::fs::symlink_metadata(arg_str(&args, "path")),
            |m| json!({"dir": m.is_dir(), "file": m.is_file(), "symlink": m.is_symlink(), "size": m.len()}),
        ),
        "list" => from_io(std::fs::read_dir(arg_str(&args, "path")), |entries| {
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            json!(names)
        }),
        "chdir_up" => chdir_up(&args),
        "double_chroot" => double_chroot(),
        "fds" => {
            json!({"ok": true, "errno": 0, "errname": "OK", "detail": crate::jail::fds::open_fds()})
        }
        "openat" => {
            let fd = arg_i64(&args, "fd", -1) as i32;
            let path = c(arg_str(&args, "path"));
            // SAFETY: openat with a valid path; a returned fd is closed below.
            let rc = unsafe { libc::openat(fd, path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            close_if_open(rc);
            outcome(rc.into(), Value::Null)
        }
        "proc_fd_walk" => proc_fd_walk(),
        "write" => write_until_error(&args),
        "mkfifo" => {
            let path = c(arg_str(&args, "path"));
            // SAFETY: valid path.
            outcome(
                unsafe { libc::mkfifo(path.as_ptr(), 0o644) }.into(),
                Value::Null,
            )
        }
        "symlink" => from_io(
            std::os::unix::fs::symlink(arg_str(&args, "target"), arg_str(&args, "link")),
            |()| Value::Null,
        ),
        "link" => from_io(
            std::fs::hard_link(arg_str(&args, "from"), arg_str(&args, "to")),
            |()| Value::Null,
        ),
        "unix_socket_file" => from_io(
            std::os::unix::net::UnixListener::bind(arg_str(&args, "path")),
            |l| {
                std::mem::forget(l);
                Value::Null
            },
        ),
        "sparse" => from_io(
            std::fs::File::create(arg_str(&args, "path"))
                .and_then(|f| f.set_len(arg_u64(&args, "size", 0))),
            |()| Value::Null,
        ),
        "mkdir_deep" => mkdir_deep(&args),
        "mknod" => mknod(&args),
        "mount_tmpfs" => {
            let target = c(arg_str(&args, "target"));
            let fs = c("tmpfs");
            // SAFETY: valid strings; expected to fail.
            let rc = unsafe {
                libc::mount(
                    fs.as_ptr(),
                    target.as_ptr(),
                    fs.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            outcome(rc.into(), Value::Null)
        }
        "umount" => {
            let target = c(arg_str(&args, "target"));
            // SAFETY: valid path; expected to fail.
            outcome(
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }.into(),
                Value::Null,
            )
        }
        "pivot_root" => {
            let dot = c(".");
            // SAFETY: valid paths; expected to fail.
            outcome(
                unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) },
                Value::Null,
            )
        }
        "open_tree" => {
            let root = c("/");
            // SAFETY: valid path; a returned fd is closed.
            let rc =
                unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, root.as_ptr(), 1u32) };
            close_if_open(rc as i32);
            outcome(rc, Value::Null)
        }
        "kill" => {
            let pid = arg_i64(&args, "pid", 0) as libc::pid_t;
            let signal = arg_i64(&args, "signal", 0) as libc::c_int;
            // SAFETY: kill with integer arguments.
            outcome(unsafe { libc::kill(pid, signal) }.into(), Value::Null)
        }
        "ptrace" => {
            let pid = arg_i64(&args, "pid", 0) as libc::pid_t;
            // SAFETY: PTRACE_ATTACH with integer arguments; expected to fail.
            let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) };
            outcome(rc, Value::Null)
        }
        "process_vm_readv" => {
            let pid = arg_i64(&args, "pid", 0) as libc::pid_t;
            let mut buf = [0u8; 16];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let remote = libc::iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: the local iovec points at our buffer; the remote one is only read by the
            // kernel from the other process (if it were allowed).
            let rc = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            outcome(rc as i64, Value::Null)
        }
        "tcp_connect" => {
            let addr = format!("{}:{}", arg_str(&args, "host"), arg_u64(&args, "port", 0));
            from_io(
                addr.parse::<std::net::SocketAddr>()
                    .map_err(std::io::Error::other)
                    .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3))),
                |_| Value::Null,
            )
        }
        "udp_send" => {
            let addr = format!("{}:{}", arg_str(&args, "host"), arg_u64(&args, "port", 0));
            from_io(
                std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"x", &addr)),
                |n| json!(n),
            )
        }
        "resolve" => {
            use std::net::ToSocketAddrs;
            let name = format!("{}:80", arg_str(&args, "name"));
            from_io(name.to_socket_addrs(), |addrs| {
                json!(addrs.map(|a| a.to_string()).collect::<Vec<_>>())
            })
        }
        "socket" => {
            let domain = arg_i64(&args, "domain", 0) as libc::c_int;
            let kind = arg_i64(&args, "type", libc::SOCK_STREAM.into()) as libc::c_int;
            // SAFETY: socket with integer arguments; closed if it succeeds.
            let rc = unsafe { libc::socket(domain, kind, 0) };
            close_if_open(rc);
            outcome(rc.into(), Value::Null)
        }
        "abstract_connect" => abstract_connect(arg_str(&args, "name")),
        "io_uring" => {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads/writes the params buffer (120 bytes is its size).
            let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
            close_if_open(rc as i32);
            outcome(rc, Value::Null)
        }
        "exe_write" => from_io(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/exe"),
            |_| Value::Null,
        ),
        "setuid0" => {
            // SAFETY: raw setuid(0); expected to fail.
            outcome(
                unsafe { libc::syscall(libc::SYS_setuid, 0u32) },
                Value::Null,
            )
        }
        "unshare" => {
            let flags = arg_i64(&args, "flags", libc::CLONE_NEWUSER.into()) as libc::c_int;
            // SAFETY: unshare with integer flags; expected to fail.
            outcome(unsafe { libc::unshare(flags) }.into(), Value::Null)
        }
        "clone_flags" => clone_with_flags(arg_i64(&args, "flags", libc::CLONE_NEWUSER.into())),
        "clone3" => {
            // SAFETY: a null argument struct: an unfiltered kernel would answer EFAULT/EINVAL.
            outcome(
                unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) },
                Value::Null,
            )
        }
        "setns" => {
            // SAFETY: fd 0 is /dev/null: an unfiltered call gives EINVAL.
            outcome(
                unsafe { libc::setns(0, libc::CLONE_NEWNET) }.into(),
                Value::Null,
            )
        }
        "ioctl" => {
            let request = arg_u64(&args, "request", 0);
            let byte = b'x';
            // SAFETY: raw ioctl on fd 0 with a pointer to one byte; expected to fail.
            let rc = unsafe { libc::syscall(libc::SYS_ioctl, 0, request, &byte as *const u8) };
            outcome(rc, Value::Null)
        }
        "try_syscalls" => try_syscalls(),
        "kill_all" => in_child(Duration::from_secs(10), || {
            // SAFETY: kill(-1): every process this one may signal; the point of the test.
            let rc = unsafe { libc::kill(-1, libc::SIGKILL) };
            if rc == 0 { 0 } else { last_errno() }
        }),
        "fork_bomb" => fork_bomb(arg_u64(&args, "limit", 100_000)),
        "memory_bomb" => memory_bomb(
            arg_u64(&args, "max_mb", 10_240),
            arg_u64(&args, "step_mb", 64),
        ),
        "alloc_here" => {
            // Touches memory in the worker itself (not a child): the cgroup OOM killer takes
            // the worker, which is what a limit-triggered run end looks like.
            let mb = arg_u64(&args, "mb", 4096);
            let mut keep: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mb / 64 {
                keep.push(vec![1u8; 64 << 20]);
            }
            json!({"ok": true, "errno": 0, "errname": "OK", "detail": keep.len()})
        }
        "spin" => {
            let secs = arg_u64(&args, "secs", 1);
            in_child(Duration::from_secs(secs + 30), move || {
                let end = Instant::now() + Duration::from_secs(secs);
                let mut x = 0u64;
                while Instant::now() < end {
                    x = x.wrapping_add(1);
                }
                i32::from(x == 0)
            })
        }
        "daemon" => daemon(),
        "x32" => in_child(Duration::from_secs(10), || {
            // getpid through the x32 ABI (bit 30 set). The guard kills before the kernel, with
            // or without CONFIG_X86_X32_ABI; if the child comes back, the guard is missing.
            // SAFETY: a syscall number with no arguments; the filter ends the child here.
            let rc = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
            if rc < 0 { last_errno() } else { 0 }
        }),
        "exec" => exec(&args),
        "raw" => {
            let bytes = if let Some(prefix) = args["prefix"].as_u64() {
                let mut b = (prefix as u32).to_be_bytes().to_vec();
                b.extend_from_slice(&[0u8; 16]);
                b
            } else {
                let len = arg_u64(&args, "random", 1 << 20) as usize;
                let mut b = vec![0u8; len];
                // SAFETY: getrandom fills the buffer we own.
                unsafe { libc::getrandom(b.as_mut_ptr().cast(), len, 0) };
                // A plausible length prefix so the supervisor reads the whole thing as a frame.
                let prefix = u32::try_from(len.saturating_sub(4))
                    .unwrap_or(0)
                    .to_be_bytes();
                b[..4].copy_from_slice(&prefix);
                b
            };
            raw = Some(bytes);
            json!({"ok": true, "errno": 0, "errname": "OK", "detail": Value::Null})
        }
        "events" => {
            // A hostile worker pouring well-formed events into its session: `count` system
            // events of `bytes` each, as fast as the channel takes them (session limits).
            let count = arg_u64(&args, "count", 1000);
            let filler = "z".repeat(arg_u64(&args, "bytes", 100) as usize);
            let mut bytes = Vec::new();
            for i in 0..count {
                let event = json!({
                    "id": format!("flood-{i}"), "type": "system",
                    "timestamp": shared::ids::now_ms(), "level": "info", "message": filler,
                });
                let frame = FromWorker::Event {
                    json: event.to_string(),
                };
                match shared::frame::encode(&frame) {
                    Ok(encoded) => bytes.extend_from_slice(&encoded),
                    Err(e) => return (outcome(-1, json!(e.to_string())), None),
                }
            }
            raw = Some(bytes);
            json!({"ok": true, "errno": 0, "errname": "OK", "detail": count})
        }
        "flip" => flip(&args),
        "hostname" => {
            let mut buf = [0u8; 64];
            // SAFETY: gethostname writes at most buf.len() bytes.
            unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            json!({"ok": true, "errno": 0, "errname": "OK", "detail": String::from_utf8_lossy(&buf[..end])})
        }
        other => {
            json!({"ok": false, "errno": libc::EINVAL, "errname": "EINVAL", "detail": format!("unknown probe {other}")})
        }
    };
    (answer, raw)
}

fn close_if_open(fd: i32) {
    if fd >= 0 {
        // SAFETY: closing an fd this probe just opened.
        unsafe { libc::close(fd) };
    }
}

fn open(args: &Value) -> Value {
    let path = c(arg_str(args, "path"));
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    flags |= if args["write"].as_bool().unwrap_or(false) {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    if args["create"].as_bool().unwrap_or(false) {
        flags |= libc::O_CREAT;
    }
    // SAFETY: open with a valid path; the fd is read from and closed below.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644) };
    if fd < 0 {
        return outcome(-1, Value::Null);
    }
    let mut buf = vec![0u8; 4096];
    // SAFETY: reads at most buf.len() bytes into our buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    close_if_open(fd);
    buf.truncate(usize::try_from(n).unwrap_or(0));
    outcome(0, json!(String::from_utf8_lossy(&buf)))
}

fn chdir_up(args: &Value) -> Value {
    let before = std::env::current_dir().ok();
    let n = arg_u64(args, "n", 50);
    for _ in 0..n {
        let _ = std::env::set_current_dir("..");
    }
    let cwd = std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let then = arg_str(args, "then");
    let opened = if then.is_empty() {
        Value::Null
    } else {
        open(&json!({"path": then}))
    };
    if let Some(dir) = before {
        let _ = std::env::set_current_dir(dir);
    }
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": {"cwd": cwd, "open": opened}})
}

fn double_chroot() -> Value {
    let before = std::env::current_dir().ok();
    let _ = std::fs::create_dir("chroot-x");
    let x = c("chroot-x");
    // SAFETY: valid path.
    let first = outcome(unsafe { libc::chroot(x.as_ptr()) }.into(), Value::Null);
    for _ in 0..50 {
        let _ = std::env::set_current_dir("..");
    }
    let dot = c(".");
    // SAFETY: valid path.
    let second = outcome(unsafe { libc::chroot(dot.as_ptr()) }.into(), Value::Null);
    let file = open(&json!({"path": "/etc/os-release"}));
    if let Some(dir) = before {
        let _ = std::env::set_current_dir(dir);
    }
    let _ = std::fs::remove_dir("chroot-x");
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": {"chroot": first, "again": second, "file": file}})
}

fn proc_fd_walk() -> Value {
    let before = std::env::current_dir().ok();
    let mut reached = Vec::new();
    for n in 0..64 {
        if std::env::set_current_dir(format!("/proc/self/fd/{n}")).is_ok() {
            let result = open(&json!({"path": "../../../etc/os-release"}));
            if result["ok"] == true {
                reached.push(n);
            }
        }
        if let Some(dir) = &before {
            let _ = std::env::set_current_dir(dir);
        }
    }
    json!({"ok": reached.is_empty(), "errno": 0, "errname": "OK", "detail": reached})
}

fn write_until_error(args: &Value) -> Value {
    let path = arg_str(args, "path");
    let limit = arg_u64(args, "bytes", 1 << 30);
    let chunk = vec![0x5au8; 1 << 20];
    let file = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return from_io::<()>(Err(e), |()| Value::Null),
    };
    let mut written: u64 = 0;
    let mut errno = 0;
    while written < limit {
        let want = usize::try_from((limit - written).min(chunk.len() as u64)).unwrap_or(0);
        // SAFETY: writes at most `want` bytes from our buffer to a file we own.
        let n = unsafe { libc::write(file.as_raw_fd(), chunk.as_ptr().cast(), want) };
        if n < 0 {
            errno = last_errno();
            break;
        }
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    drop(file);
    if args["remove"].as_bool().unwrap_or(false) {
        let _ = std::fs::remove_file(path);
    }
    json!({"ok": errno == 0, "errno": errno, "errname": errname(errno), "detail": {"written": written}})
}

fn mkdir_deep(args: &Value) -> Value {
    let n = arg_u64(args, "n", 100);
    let mut path = std::path::PathBuf::from(arg_str(args, "path"));
    for _ in 0..n {
        path.push("d");
        if let Err(e) = std::fs::create_dir(&path) {
            return from_io::<()>(Err(e), |()| Value::Null);
        }
    }
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": n})
}

fn mknod(args: &Value) -> Value {
    let path = c(arg_str(args, "path"));
    let kind = match arg_str(args, "kind") {
        "block" => libc::S_IFBLK,
        "fifo" => libc::S_IFIFO,
        _ => libc::S_IFCHR,
    };
    let dev = libc::makedev(
        arg_u64(args, "major", 1) as u32,
        arg_u64(args, "minor", 3) as u32,
    );
    // SAFETY: mknod with a valid path and integer mode/dev.
    outcome(
        unsafe { libc::mknod(path.as_ptr(), kind | 0o666, dev) }.into(),
        Value::Null,
    )
}

fn abstract_connect(name: &str) -> Value {
    // SAFETY: socket with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return outcome(-1, json!("socket"));
    }
    // SAFETY: a zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = name.as_bytes();
    let len = bytes.len().min(addr.sun_path.len() - 1);
    for (i, b) in bytes[..len].iter().enumerate() {
        addr.sun_path[i + 1] = *b as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + 1 + len) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `addr_len` bytes.
    let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), addr_len) };
    let result = outcome(rc.into(), Value::Null);
    close_if_open(fd);
    result
}

fn clone_with_flags(flags: i64) -> Value {
    let flags = (flags as libc::c_ulong) | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: a fork-like raw clone; the child exits at once without touching shared state.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if rc == 0 {
        // SAFETY: the child leaves immediately.
        unsafe { libc::_exit(0) };
    }
    let result = outcome(rc, Value::Null);
    if rc > 0 {
        let mut status = 0;
        // SAFETY: reaping the child we just made.
        unsafe { libc::waitpid(rc as libc::pid_t, &mut status, 0) };
    }
    result
}

/// The side-effect-free try-syscall list of T28: invalid arguments, so a call the filter lets
/// through fails with EFAULT/EINVAL/EBADF instead of doing anything.
fn try_syscalls() -> Value {
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
        // SAFETY: every call gets invalid arguments (null pointers, bad ids) and either fails in
        // the filter or in the kernel's argument checks; none can change state.
        let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3]) };
        let errno = if rc == -1 { last_errno() } else { 0 };
        results.insert(name.to_owned(), json!(errname(errno)));
    }
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": results})
}

/// Runs `body` in a forked child and reports its exit code or signal; kills it after `limit`.
fn in_child(limit: Duration, body: impl FnOnce() -> i32) -> Value {
    // SAFETY: the worker is single-threaded here, so the child may run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return outcome(-1, json!("fork"));
    }
    if pid == 0 {
        let code = body();
        // SAFETY: the child leaves without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": wait_child(pid, limit)})
}

/// Waits for `pid` (killing it after `limit`) and describes how it ended.
fn wait_child(pid: libc::pid_t, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    let mut status = 0;
    loop {
        // SAFETY: polls our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break;
        }
        if rc < 0 {
            return json!({"exit": Value::Null, "signal": Value::Null, "error": errname(last_errno())});
        }
        if Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return json!({"exit": Value::Null, "signal": libc::SIGKILL, "timedOut": true});
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if libc::WIFSIGNALED(status) {
        json!({"exit": Value::Null, "signal": libc::WTERMSIG(status)})
    } else {
        json!({"exit": libc::WEXITSTATUS(status), "signal": Value::Null})
    }
}

/// A pipe whose read end the parent keeps; the child reports numbers through the write end.
fn report_pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn send_u64(fd: &OwnedFd, value: u64) {
    let bytes = value.to_le_bytes();
    // SAFETY: writes 8 bytes from a local buffer.
    unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
}

fn read_u64s(fd: &OwnedFd) -> Vec<u64> {
    let mut all = Vec::new();
    let mut buf = [0u8; 8];
    loop {
        // SAFETY: reads 8 bytes into a local buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n != 8 {
            return all;
        }
        all.push(u64::from_le_bytes(buf));
    }
}

/// T31: a child forks sleepers until fork fails; reports how many and the errno, then kills
/// them all.
fn fork_bomb(limit: u64) -> Value {
    let Some((read, write)) = report_pipe() else {
        return outcome(-1, json!("pipe"));
    };
    // SAFETY: single-threaded worker; the child runs only raw syscalls and small Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return outcome(-1, json!("fork"));
    }
    if pid == 0 {
        drop(read);
        let mut children = Vec::new();
        let mut errno = 0u64;
        while (children.len() as u64) < limit {
            // SAFETY: fork in a single-threaded child; the grandchild only pauses.
            let child = unsafe { libc::fork() };
            if child == 0 {
                loop {
                    // SAFETY: waits for a signal (SIGKILL from our parent).
                    unsafe { libc::pause() };
                }
            }
            if child < 0 {
                errno = last_errno() as u64;
                break;
            }
            children.push(child);
        }
        send_u64(&write, children.len() as u64);
        send_u64(&write, errno);
        for child in &children {
            // SAFETY: killing and reaping our own children.
            unsafe { libc::kill(*child, libc::SIGKILL) };
        }
        for child in &children {
            let mut status = 0;
            // SAFETY: as above.
            unsafe { libc::waitpid(*child, &mut status, 0) };
        }
        // SAFETY: leave without destructors.
        unsafe { libc::_exit(0) };
    }
    drop(write);
    let numbers = read_u64s(&read);
    let fate = wait_child(pid, Duration::from_secs(60));
    let forked = numbers.first().copied().unwrap_or(0);
    let errno = numbers.get(1).copied().unwrap_or(0) as i32;
    json!({"ok": true, "errno": errno, "errname": errname(errno), "detail": {"forked": forked, "child": fate}})
}

/// T33: a child touches memory in `step_mb` chunks up to `max_mb`, reporting its progress; the
/// answer says how far it got and how it ended.
fn memory_bomb(max_mb: u64, step_mb: u64) -> Value {
    let Some((read, write)) = report_pipe() else {
        return outcome(-1, json!("pipe"));
    };
    let step = usize::try_from(step_mb.max(1) << 20).unwrap_or(64 << 20);
    // SAFETY: single-threaded worker; the child runs mmap and memset only.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return outcome(-1, json!("fork"));
    }
    if pid == 0 {
        drop(read);
        let mut touched = 0u64;
        while touched < max_mb {
            // SAFETY: an anonymous private mapping; checked for failure below.
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
                send_u64(&write, last_errno() as u64);
                // SAFETY: leave without destructors.
                unsafe { libc::_exit(2) };
            }
            // SAFETY: `p` is a fresh writable mapping of `step` bytes.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, step) };
            touched += step_mb.max(1);
            send_u64(&write, touched);
        }
        // SAFETY: leave without destructors.
        unsafe { libc::_exit(0) };
    }
    drop(write);
    let numbers = read_u64s(&read);
    let fate = wait_child(pid, Duration::from_secs(120));
    let touched = numbers.iter().copied().max().unwrap_or(0);
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": {"touchedMb": touched, "child": fate}})
}

/// T32: a double-forked `setsid` daemon that would outlive the session if nothing stopped it.
fn daemon() -> Value {
    let Some((read, write)) = report_pipe() else {
        return outcome(-1, json!("pipe"));
    };
    // SAFETY: single-threaded worker.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        drop(read);
        // SAFETY: new session, second fork; the grandchild reports its pid and sleeps forever.
        unsafe {
            libc::setsid();
            let grandchild = libc::fork();
            if grandchild == 0 {
                send_u64(&write, libc::getpid() as u64);
                libc::close(write.as_raw_fd());
                loop {
                    libc::pause();
                }
            }
            libc::_exit(0);
        }
    }
    drop(write);
    let numbers = read_u64s(&read);
    let mut status = 0;
    // SAFETY: reaping the intermediate child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    json!({"ok": !numbers.is_empty(), "errno": 0, "errname": "OK", "detail": numbers.first()})
}

/// Runs a program inside the jail (the way a `run_command` tool will) with a timeout and an
/// output cap, and reports its exit and output.
fn exec(args: &Value) -> Value {
    let argv: Vec<String> = args["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let Some((program, rest)) = argv.split_first() else {
        return outcome(-1, json!("empty argv"));
    };
    let timeout = Duration::from_millis(arg_u64(args, "timeout_ms", 10_000));
    let spawned = std::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return from_io::<()>(Err(e), |()| Value::Null),
    };
    let deadline = Instant::now() + timeout;
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
    let read_capped = |r: Option<&mut dyn std::io::Read>| {
        let mut out = Vec::new();
        if let Some(r) = r {
            let _ = r.take(64 * 1024).read_to_end(&mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    use std::io::Read;
    let stdout = read_capped(child.stdout.as_mut().map(|s| s as &mut dyn Read));
    let stderr = read_capped(child.stderr.as_mut().map(|s| s as &mut dyn Read));
    use std::os::unix::process::ExitStatusExt;
    json!({"ok": true, "errno": 0, "errname": "OK", "detail": {
        "exit": status.and_then(|s| s.code()),
        "signal": status.and_then(|s| s.signal()),
        "stdout": stdout,
        "stderr": stderr,
    }})
}

/// T43: swaps `<dir>/sub` (a real directory) and `<dir>/alt` (a symlink to `target`) with
/// `RENAME_EXCHANGE` in a tight loop for `secs`, in a child, so the test can race the file API.
fn flip(args: &Value) -> Value {
    let dir = arg_str(args, "dir").to_owned();
    let target = arg_str(args, "target").to_owned();
    let secs = arg_u64(args, "secs", 5);
    let sub = format!("{dir}/sub");
    let alt = format!("{dir}/alt");
    if std::fs::create_dir_all(&sub).is_err()
        || std::fs::write(format!("{sub}/passwd"), "workspace copy\n").is_err()
        || std::os::unix::fs::symlink(&target, &alt).is_err()
    {
        return outcome(-1, json!("setup"));
    }
    // SAFETY: single-threaded worker; the child only renames.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let a = c(&sub);
        let b = c(&alt);
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            // SAFETY: valid paths; RENAME_EXCHANGE swaps the two entries atomically.
            unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
        }
        // SAFETY: leave without destructors.
        unsafe { libc::_exit(0) };
    }
    outcome(pid.into(), json!(pid))
}
