//! Starting worker processes: one long-lived spawner thread re-executes our own binary in its
//! hidden `worker` mode (isolation.md S4–S5).
//!
//! Why a dedicated thread: the parent-death signal armed in the child fires when the *thread*
//! that forked it exits, not the process. tokio's blocking-pool threads come and go, so a worker
//! spawned from one would be killed some seconds later. This thread lives as long as the
//! supervisor, so a worker dies exactly when the supervisor does, even under SIGKILL.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::WorkerError;

/// A freshly started worker: its process and our end of its channel.
pub struct Spawned {
    pub child: Child,
    pub channel: UnixStream,
}

struct Job {
    session_id: String,
    reply: oneshot::Sender<std::io::Result<Spawned>>,
}

/// Handle to the spawner thread.
pub struct Spawner {
    jobs: std_mpsc::Sender<Job>,
}

impl Spawner {
    /// Starts the spawner thread. `exe` is the binary to re-execute (our own).
    ///
    /// # Errors
    /// The thread could not be created.
    pub fn start(exe: PathBuf, runtime: tokio::runtime::Handle) -> std::io::Result<Self> {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("worker-spawner".into())
            .spawn(move || {
                // Entering the runtime lets tokio::process register the child with its reaper, so
                // the supervisor awaits each exit asynchronously.
                let _guard = runtime.enter();
                for job in rx {
                    let _ = job.reply.send(spawn_one(&exe, &job.session_id));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Starts the worker process of `session_id`.
    ///
    /// # Errors
    /// The spawner is gone or the process could not be started.
    pub async fn spawn(&self, session_id: &str) -> Result<Spawned, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                session_id: session_id.to_owned(),
                reply,
            })
            .map_err(|_| WorkerError::Spawn("the spawner thread has stopped".into()))?;
        rx.await
            .map_err(|_| WorkerError::Spawn("the spawner thread dropped the request".into()))?
            .map_err(|e| WorkerError::Spawn(e.to_string()))
    }
}

fn spawn_one(exe: &PathBuf, session_id: &str) -> std::io::Result<Spawned> {
    // Both ends are close-on-exec; the child's end is duplicated onto fd 3 (which clears the
    // flag) in pre_exec, so no other descriptor of ours crosses the exec.
    let (ours, theirs): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let child_fd = theirs.as_raw_fd();
    let supervisor_pid = std::process::id();

    let mut command = Command::new(exe);
    command
        .arg("worker")
        // `=` form: ids may start with `-`, which would otherwise read as a flag.
        .arg(format!("--session={session_id}"))
        // No secret and no configuration reaches a worker through its environment.
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (dup2, fcntl, setsid, prctl, getppid, _exit) on plain integers it captured.
    unsafe {
        command.pre_exec(move || {
            if child_fd == worker::CHANNEL_FD {
                // dup2 onto itself would keep FD_CLOEXEC set; clear it instead.
                if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, worker::CHANNEL_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // Own session: no controlling terminal, and signals to our process group miss it.
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl; then nobody would signal us.
            if libc::getppid() as u32 != supervisor_pid {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(theirs);
    let std_stream = std::os::unix::net::UnixStream::from(ours);
    std_stream.set_nonblocking(true)?;
    Ok(Spawned {
        child,
        channel: UnixStream::from_std(std_stream)?,
    })
}
