//! Test builds only (feature `isolation-tests`): the in-jail probe server the isolation tests
//! drive through the supervisor's debug route.
//!
//! When the jail spec asks for it, the worker puts a small pump between fd 3 and the agent
//! ([`pump`]): `ToWorker::Probe` frames are answered here, inside the finished jail, and every
//! other frame passes through unchanged in both directions. Each probe (a typed
//! [`shared::probe::Probe`]) issues the call a test names and reports
//! `{ok, errno, errname, detail}` ([`answer`]). By concern:
//!
//! - [`files`]: reads, writes, links, device nodes, chroot and cwd escapes, the rename race.
//! - [`kernel`]: what the jail must refuse outright: mounts, namespaces, privileged syscalls,
//!   ioctls, other processes.
//! - [`net`]: sockets and name resolution.
//! - [`children`]: probes that could take the worker down run in a forked child (fork and
//!   memory bombs, `kill(-1)`, daemons, programs) and report that child's fate.
//! - [`channel`]: garbage and floods written on fd 3 itself.
//!
//! The worker is single-threaded here (a current-thread runtime, no blocking pool in use), so
//! forked children may run ordinary Rust code. Probes call raw `libc` where the exact syscall,
//! often with invalid arguments, is the point of the test (a wrapper might choose another
//! syscall or refuse the arguments itself); everything else goes through `nix` or `std`.
//!
//! `T` numbers in comments are the escape catalogue's, after which the tests in
//! `tests/tests/isolation_support` are named (`t31_fork_bomb`).

mod answer;
mod channel;
mod children;
mod files;
mod kernel;
mod net;
mod pump;

pub(crate) use pump::serve_beside_agent;
use shared::probe::Probe;

use answer::Answer;

/// What a probe hands back: its answer, and bytes to write on fd 3 before it (channel abuse).
struct Reply {
    raw: Option<Vec<u8>>,
    answer: Answer,
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Self {
        Self { raw: None, answer }
    }
}

/// Runs one probe.
fn run(probe: &Probe) -> Reply {
    match probe {
        Probe::Env {} => {
            let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            Answer::ok(vars)
        }
        Probe::Read { path, max } => files::read(path, *max),
        Probe::Open {
            path,
            write,
            create,
        } => files::open(path, *write, *create),
        Probe::Stat { path } => files::stat(path),
        Probe::List { path } => files::list(path),
        Probe::ChdirUp { n, then } => files::chdir_up(*n, then.as_deref()),
        Probe::DoubleChroot {} => files::double_chroot(),
        Probe::Openat { fd, path } => files::openat(*fd, path),
        Probe::ProcFdWalk {} => files::proc_fd_walk(),
        Probe::Write {
            path,
            bytes,
            remove,
        } => files::write_until_error(path, *bytes, *remove),
        Probe::Mkfifo { path } => files::mkfifo(path),
        Probe::Symlink { target, link } => files::symlink(target, link),
        Probe::Link { from, to } => files::link(from, to),
        Probe::UnixSocketFile { path } => files::unix_socket_file(path),
        Probe::MkdirDeep { path, n } => files::mkdir_deep(path, *n),
        Probe::Mknod {
            path,
            kind,
            major,
            minor,
        } => files::mknod(path, *kind, *major, *minor),
        Probe::ExeWrite {} => files::exe_write(),
        Probe::Flip { dir, target, secs } => files::flip(dir, target, *secs),
        Probe::MountTmpfs { target } => kernel::mount_tmpfs(target),
        Probe::Umount { target } => kernel::umount(target),
        Probe::PivotRoot {} => kernel::pivot_root(),
        Probe::OpenTree {} => kernel::open_tree(),
        Probe::Setuid0 {} => kernel::setuid0(),
        Probe::Unshare { flags } => kernel::unshare(*flags),
        Probe::CloneFlags { flags } => kernel::clone_with_flags(*flags),
        Probe::Clone3 {} => kernel::clone3(),
        Probe::Setns {} => kernel::setns(),
        Probe::Ioctl { request } => kernel::ioctl(*request),
        Probe::IoUring {} => kernel::io_uring(),
        Probe::TrySyscalls {} => kernel::try_syscalls(),
        Probe::Kill { pid, signal } => kernel::kill(*pid, *signal),
        Probe::Ptrace { pid } => kernel::ptrace(*pid),
        Probe::ProcessVmReadv { pid } => kernel::process_vm_readv(*pid),
        Probe::TcpConnect { host, port } => net::tcp_connect(host, *port),
        Probe::UdpSend { host, port } => net::udp_send(host, *port),
        Probe::Resolve { name } => net::resolve(name),
        Probe::Socket { domain, kind } => net::socket(*domain, *kind),
        Probe::AbstractConnect { name } => net::abstract_connect(name),
        Probe::KillAll {} => children::kill_all(),
        Probe::ForkBomb { limit } => children::fork_bomb(*limit),
        Probe::MemoryBomb { max_mb, step_mb } => children::memory_bomb(*max_mb, *step_mb),
        Probe::AllocHere { mb } => children::alloc_here(*mb),
        Probe::Daemon {} => children::daemon(),
        Probe::X32 {} => children::x32(),
        Probe::Exec { argv, timeout_ms } => children::exec(argv, *timeout_ms),
        Probe::Raw(frame) => return channel::raw(*frame),
        Probe::Events { count, bytes } => return channel::events(*count, *bytes),
    }
    .into()
}

/// Closes a descriptor a raw probe call returned, if the call succeeded.
fn close_if_open(fd: libc::c_int) {
    if fd >= 0 {
        // SAFETY: `fd` was just returned to this probe by the kernel and nothing else owns it.
        unsafe { libc::close(fd) };
    }
}
