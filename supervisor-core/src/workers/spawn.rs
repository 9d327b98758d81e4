//! Starting worker processes: one long-lived spawner thread re-executes our own binary in its
//! hidden `worker` mode.
//!
//! Why a dedicated thread: the parent-death signal armed in the child fires when the *thread*
//! that forked it exits, not the process. tokio's blocking-pool threads come and go, so a worker
//! spawned from one would be killed some seconds later. This thread lives as long as the
//! supervisor, so a worker dies exactly when the supervisor does, even under SIGKILL.
//!
//! Per session, in order (the steps are named S1–S8 in the comments below):
//! - S1: its host identity (a uid/gid of its own in root mode);
//! - S2: its workspace directory, owned by that identity;
//! - S3: its cgroup, with its limits, before any of its processes exists;
//! - S4: the channel (a socket pair, fd 3 in the child);
//! - S5: the exec of the launcher, with an empty environment and only fd 3;
//! - S6: the launcher is placed in the cgroup, and only after that receives its jail spec,
//!   which is its "go": no session process ever runs outside its cgroup;
//! - S8 (at the end): whatever is left of the session is killed and its cgroup removed.
//!
//! (S7, the jail itself, is the worker's side.)
//!
//! Steps S3–S5 and the cgroup placement do not depend on the session, and they are the slow
//! part (the exec, and a cgroup v1 migration that waits for an RCU grace period), so the spawner
//! thread keeps a small pool of launchers that have done them and wait for their "go". A session
//! takes one (without waiting for the spawner thread, which may be busy refilling), gets S1/S2
//! done, and sends the spec; the spawner thread then refills the pool. A pooled launcher has
//! nothing of any session: it is a fresh exec, alone in an empty cgroup, blocked on fd 3. When
//! the pool is empty, the spawner thread starts a launcher for the session directly.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use shared::frame::read_frame;
use shared::ids::SessionId;
use shared::jail::{JailLevel, JailSpec};
use shared::process::CHANNEL_FD;
use shared::protocol::FromWorker;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::WorkerError;
use crate::isolation::cgroup::SessionGroup;
use crate::isolation::{Isolation, LaunchHooks, ProbeOutcome};

/// `close_range` flag: mark the range close-on-exec instead of closing it.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// Where the T04 test hook puts its leaked descriptor.
const LEAKED_FD: libc::c_int = 7;

/// A freshly started worker: its process, our end of its channel, and its jail's host side.
pub struct Spawned {
    pub child: Child,
    pub channel: UnixStream,
    pub jail: SessionJail,
}

/// What the supervisor holds for one worker's jail: the identity it runs as and its cgroup.
/// Dropping it removes the cgroup (after killing anything left in it).
pub struct SessionJail {
    pub ids: Option<(u32, u32)>,
    pub cgroup: Option<SessionGroup>,
}

impl SessionJail {
    /// Which resource limit, if any, the cgroup counters say the session ran into.
    pub fn limit_hit(&self) -> Option<&'static str> {
        self.cgroup.as_ref().and_then(SessionGroup::limit_hit)
    }

    /// S8: kill whatever is left of the session and remove its cgroup.
    pub async fn teardown(&mut self) {
        if let Some(group) = self.cgroup.as_mut() {
            group.teardown().await;
        }
    }
}

/// Launchers kept ready (S3–S5 done, waiting for their spec). Each idles at a few MiB.
const POOL_SIZE: usize = 2;

enum Job {
    /// Top the pool up (at start, or after a launcher was taken).
    Fill,
    Session {
        session_id: SessionId,
        workspace: PathBuf,
        reply: oneshot::Sender<std::io::Result<Spawned>>,
    },
}

/// The launcher's own flags for the test hooks it is started with.
fn hook_args(hooks: LaunchHooks) -> &'static [&'static str] {
    if hooks.deny_namespaces {
        &["--test-deny-namespaces"]
    } else {
        &[]
    }
}

/// Handle to the spawner thread, which jails every worker as the isolation in force says.
pub struct Spawner {
    jobs: std_mpsc::Sender<Job>,
    isolation: Arc<Isolation>,
    pool: Arc<Pool>,
}

impl Spawner {
    /// Starts the spawner thread, which fills its pool of launchers at once. `exe` is the
    /// binary to re-execute (our own); `isolation` is the one established at start-up (an
    /// unprobed one, as unit tests use, jails nothing).
    ///
    /// # Errors
    /// The thread could not be created.
    pub fn start(
        exe: PathBuf,
        runtime: tokio::runtime::Handle,
        isolation: Arc<Isolation>,
    ) -> std::io::Result<Self> {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let pool = Arc::new(Pool::default());
        let filled = pool.clone();
        let jailed = isolation.clone();
        std::thread::Builder::new()
            .name("worker-spawner".into())
            .spawn(move || {
                // Entering the runtime lets tokio::process register the child with its reaper, so
                // the supervisor awaits each exit asynchronously.
                let _guard = runtime.enter();
                let (pool, isolation) = (filled, jailed);
                for job in rx {
                    match job {
                        Job::Fill => pool.fill(&exe, &isolation),
                        Job::Session {
                            session_id,
                            workspace,
                            reply,
                        } => {
                            let spawned = pool
                                .start(&exe, &isolation)
                                .and_then(|ready| bind(ready, &isolation, &session_id, &workspace));
                            let _ = reply.send(spawned);
                            pool.fill(&exe, &isolation);
                        }
                    }
                }
            })?;
        let _ = jobs.send(Job::Fill);
        Ok(Self {
            jobs,
            isolation,
            pool,
        })
    }

    /// Starts the worker process of `session_id`, jailed to `workspace`.
    ///
    /// # Errors
    /// The spawner is gone, or a step of S1–S6 failed.
    pub async fn spawn(
        &self,
        session_id: &SessionId,
        workspace: &Path,
    ) -> Result<Spawned, WorkerError> {
        let isolation = self.isolation.clone();
        if isolation.level == JailLevel::None {
            tracing::warn!(
                %session_id,
                "starting a worker WITHOUT isolation (--isolation none)"
            );
        }
        if let Some(ready) = self.pool.take() {
            // The fork already happened on the spawner thread; binding (chown, one write) may
            // run on any thread.
            let _ = self.jobs.send(Job::Fill);
            let (id, ws) = (session_id.clone(), workspace.to_owned());
            return tokio::task::spawn_blocking(move || bind(ready, &isolation, &id, &ws))
                .await
                .map_err(|e| WorkerError::Spawn(e.to_string()))?
                .map_err(|e| WorkerError::Spawn(e.to_string()));
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Session {
                session_id: session_id.clone(),
                workspace: workspace.to_owned(),
                reply,
            })
            .map_err(|_| WorkerError::Spawn("the spawner thread has stopped".into()))?;
        rx.await
            .map_err(|_| WorkerError::Spawn("the spawner thread dropped the request".into()))?
            .map_err(|e| WorkerError::Spawn(e.to_string()))
    }
}

/// Runs one start-up probe of the isolation level: a launcher in probe mode, started the way a
/// session's is (minus the pool), handed `spec`, and read until its report. The probe is forked
/// from the calling thread, whose exit would fire its parent-death signal: at start-up that is
/// the thread driving the server, which outlives it.
///
/// # Errors
/// The launcher could not be started or handed its spec.
pub async fn probe(
    exe: &Path,
    spec: JailSpec,
    hooks: LaunchHooks,
) -> std::io::Result<ProbeOutcome> {
    // A child dropped on error is killed (kill_on_drop).
    let (mut child, channel) = start_launcher(exe, &["--probe".to_owned()], None, hooks)
        .and_then(|(child, channel)| Ok((child, release(&spec, channel)?)))?;
    let mut read = channel;
    let outcome = match read_frame::<_, FromWorker>(&mut read).await {
        Ok(Some(FromWorker::Jailed(audit))) => match read_frame::<_, FromWorker>(&mut read).await {
            Ok(Some(FromWorker::ProbeReport { json })) => ProbeOutcome::Jailed {
                audit,
                report: json,
            },
            other => ProbeOutcome::Died(format!("no probe report after the audit: {other:?}")),
        },
        Ok(Some(FromWorker::JailFailed(failure))) => ProbeOutcome::Failed(failure),
        Ok(Some(other)) => ProbeOutcome::Died(format!("unexpected first message {other:?}")),
        Ok(None) => {
            let status = child.wait().await.ok();
            ProbeOutcome::Died(format!(
                "the launcher exited without a report ({})",
                super::describe_exit(status)
            ))
        }
        Err(e) => ProbeOutcome::Died(format!("bad frame from the probe: {e}")),
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(outcome)
}

/// A launcher that has been exec'd and placed in its (still empty) cgroup, waiting for a spec.
struct Ready {
    child: Child,
    channel: std::os::unix::net::UnixStream,
    cgroup: Option<SessionGroup>,
}

/// Launchers that are ready, filled by the spawner thread (which must be the one that forks
/// them: their parent-death signal is tied to it) and taken by `Spawner::spawn`.
#[derive(Default)]
struct Pool {
    ready: std::sync::Mutex<std::collections::VecDeque<Ready>>,
    /// Names of the cgroups it creates: `w<n>`, unique for this supervisor.
    created: std::sync::atomic::AtomicU64,
}

impl Pool {
    fn ready(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Ready>> {
        self.ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// S3–S5 for a launcher not yet bound to any session (spawner thread only).
    fn start(&self, exe: &Path, isolation: &Isolation) -> std::io::Result<Ready> {
        let n = self
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let cgroup = if isolation.level != JailLevel::None {
            isolation
                .session_cgroup(&format!("w{n}"))
                .map_err(|e| std::io::Error::other(format!("creating the session's cgroup: {e}")))?
        } else {
            None
        };
        let (child, channel) = start_launcher(
            exe,
            &["--pooled".to_owned()],
            cgroup.as_ref(),
            isolation.launch_hooks(),
        )?;
        Ok(Ready {
            child,
            channel,
            cgroup,
        })
    }

    /// Tops the pool up (spawner thread only).
    fn fill(&self, exe: &Path, isolation: &Isolation) {
        if !isolation.is_established() {
            return;
        }
        while self.ready().len() < POOL_SIZE {
            match self.start(exe, isolation) {
                Ok(ready) => self.ready().push_back(ready),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a pooled launcher");
                    return;
                }
            }
        }
    }

    /// A waiting launcher that is still alive, if there is one.
    fn take(&self) -> Option<Ready> {
        let mut ready = self.ready();
        while let Some(mut launcher) = ready.pop_front() {
            if matches!(launcher.child.try_wait(), Ok(None)) {
                return Some(launcher);
            }
        }
        None
    }
}

/// S1, S2, then "go": binds a ready launcher to one session.
fn bind(
    ready: Ready,
    isolation: &Isolation,
    session_id: &SessionId,
    workspace: &Path,
) -> std::io::Result<Spawned> {
    let ids = isolation.session_ids(session_id)?;
    if isolation.level != JailLevel::None {
        prepare_workspace(workspace, ids)?;
    }
    let spec = isolation.session_spec(session_id, workspace, ids);
    let Ready {
        child,
        channel,
        cgroup,
    } = ready;
    // On error the child is dropped, which kills it (kill_on_drop), and its cgroup goes too.
    let channel = release(&spec, channel)?;
    Ok(Spawned {
        child,
        channel,
        jail: SessionJail { ids, cgroup },
    })
}

/// S2: the workspace directory exists, is a real directory (not a symlink), belongs to the
/// session's host identity, and is private. Done through one `O_NOFOLLOW` handle, so nothing the
/// worker could have planted is followed.
fn prepare_workspace(path: &Path, ids: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(path)?;
        }
        Err(e) => return Err(e),
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            std::io::Error::other(format!("opening the workspace {}: {e}", path.display()))
        })?;
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))?;
    }
    dir.set_permissions(std::fs::Permissions::from_mode(0o700))
}

/// S4–S6 up to the "go": channel, exec, cgroup placement. The launcher then blocks on fd 3.
fn start_launcher(
    exe: &Path,
    args: &[String],
    cgroup: Option<&SessionGroup>,
    hooks: LaunchHooks,
) -> std::io::Result<(Child, std::os::unix::net::UnixStream)> {
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
    // Test builds: a host directory fd the launcher must get rid of (T04).
    let leaked: Option<OwnedFd> = if hooks.leak_fd {
        Some(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open("/")?
                .into(),
        )
    } else {
        None
    };
    let leaked_raw = leaked.as_ref().map_or(-1, AsRawFd::as_raw_fd);

    let mut command = Command::new(exe);
    command
        .arg("worker")
        // `=` form: ids may start with `-`, which would otherwise read as a flag.
        .args(args)
        .args(hook_args(hooks))
        // No secret and no configuration reaches a worker through its environment.
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (dup2, fcntl, setsid, prctl, getppid, close_range, _exit) on plain integers it
    // captured.
    unsafe {
        command.pre_exec(move || {
            if child_fd == CHANNEL_FD {
                // dup2 onto itself would keep FD_CLOEXEC set; clear it instead.
                if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CHANNEL_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // Everything above fd 3 is close-on-exec, whatever a library opened without the
            // flag (the launcher closes the rest again first thing, L1).
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            if leaked_raw >= 0 && libc::dup2(leaked_raw, LEAKED_FD) == -1 {
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
    let t0 = std::time::Instant::now();
    let mut child = command.spawn()?;
    let exec_us = t0.elapsed().as_micros() as u64;
    drop(theirs);
    drop(leaked);
    let ours = std::os::unix::net::UnixStream::from(ours);
    let placed = child
        .id()
        .ok_or_else(|| std::io::Error::other("the launcher exited at once"))
        .and_then(|pid| match cgroup {
            Some(group) => group.place(pid).map_err(|e| {
                std::io::Error::other(format!("placing the launcher in its cgroup: {e}"))
            }),
            None => Ok(()),
        });
    if let Err(e) = placed {
        let _ = child.start_kill();
        return Err(e);
    }
    tracing::debug!(
        exec_us,
        placed_us = t0.elapsed().as_micros() as u64,
        "launcher started"
    );
    Ok((child, ours))
}

/// S6, the "go": the launcher blocks on this frame before it does anything session-specific.
/// A spec is a few hundred bytes, far below the socket buffer, so this never blocks the
/// spawner thread.
fn release(
    spec: &JailSpec,
    mut channel: std::os::unix::net::UnixStream,
) -> std::io::Result<UnixStream> {
    shared::frame::write_frame_blocking(&mut channel, spec).map_err(std::io::Error::other)?;
    channel.set_nonblocking(true)?;
    UnixStream::from_std(channel)
}
