//! The per-session worker: what runs inside `supervisor worker --pooled` (or `--session=<id>`).
//!
//! Start-up order (each step says why it sits where it is; isolation.md §2.3 has the detail):
//! 1. [`self_check`] (L0): the environment must be empty, we must be the only thread, and fd 3
//!    must be the socket the supervisor handed us. A spawn path that forgot `env_clear()` would
//!    leak secrets into the session, so we refuse to run rather than carry on.
//! 2. fd hygiene (L1), before any path is looked up: only 0–3 survive, and fd 3 is marked
//!    close-on-exec, so no program started inside the jail inherits the channel.
//! 3. The jail spec is read from fd 3. The supervisor writes it only after it has placed this
//!    process in the session's cgroup, so reading it is also the "go" of S6.
//! 4. The jail ([`launcher`], [`jail`]): namespaces, mounts, privileges, rlimits, Landlock,
//!    seccomp, all while this process is single-threaded (`CLONE_NEWUSER` needs it; Landlock and
//!    seccomp only confine the calling thread and its later children).
//! 5. The self-audit goes to the supervisor (W13), which refuses the session if it is not what
//!    the level promises.
//! 6. Only then the single-threaded tokio runtime starts and [`agent::serve`] speaks the
//!    protocol of `shared::protocol` on fd 3 until the supervisor goes away (W14).

mod agent;
mod channel;
pub mod jail;
mod launcher;
#[cfg(feature = "isolation-tests")]
mod probe;
mod reaper;

use std::os::fd::RawFd;

use shared::protocol::FromWorker;

/// The inherited channel to the supervisor (isolation.md D4).
pub const CHANNEL_FD: RawFd = 3;

/// Exit status of a worker whose jail could not be built (it reports the step on fd 3 first).
pub const EXIT_JAIL: i32 = 74;

/// Arguments of the hidden `worker` mode. Nothing secret ever travels here: the command line
/// is visible to every process on the host.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The session, when it is known at spawn time; a pooled launcher learns it from its spec.
    pub session_id: Option<String>,
    /// Start-up probe (isolation.md §3.3): build the jail, check it, report, exit.
    pub probe: bool,
}

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("refusing to start: {0}")]
    SelfCheck(String),
    #[error("could not start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("channel to the supervisor failed: {0}")]
    Channel(#[from] shared::frame::FrameError),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("jail step '{step}' failed: {source}", step = .source.step())]
    Jail {
        #[from]
        source: jail::JailError,
    },
}

impl WorkerError {
    /// Distinct exit codes, so the supervisor's log says which step failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::SelfCheck(_) => 70,
            Self::Runtime(_) => 71,
            Self::Channel(_) => 72,
            Self::Handshake(_) => 73,
            Self::Jail { .. } => EXIT_JAIL,
        }
    }
}

/// Jails this process as the spec on fd 3 says, then runs the worker until the supervisor
/// closes the channel.
///
/// # Errors
/// A failed self-check, jail step, runtime start, handshake or channel.
pub fn launch(args: &WorkerArgs) -> Result<(), WorkerError> {
    // Read first: the parent of a freshly exec'd launcher is the supervisor's spawner thread.
    // SAFETY: getppid has no arguments and cannot fail.
    let supervisor = unsafe { libc::getppid() };
    self_check()?;
    jail::fds::close_inherited().map_err(|e| WorkerError::SelfCheck(e.to_string()))?;
    channel::keep_from_programs(CHANNEL_FD)
        .map_err(|e| WorkerError::SelfCheck(format!("fd {CHANNEL_FD} close-on-exec: {e}")))?;
    let spec = channel::read_spec(CHANNEL_FD).map_err(WorkerError::SelfCheck)?;
    if args
        .session_id
        .as_ref()
        .is_some_and(|id| *id != spec.session_id)
    {
        return Err(WorkerError::SelfCheck(
            "the jail spec names a different session than the command line".into(),
        ));
    }
    if spec.probe != args.probe {
        return Err(WorkerError::SelfCheck(
            "the jail spec and the command line disagree on probe mode".into(),
        ));
    }
    if spec.probe_server && !cfg!(feature = "isolation-tests") {
        return Err(WorkerError::SelfCheck(
            "the test probe server is not compiled into this build".into(),
        ));
    }

    let jailed = match launcher::enter(&spec, supervisor) {
        Ok(jailed) => jailed,
        Err(e) => {
            channel::send_jail_failure(&e);
            return Err(e.into());
        }
    };
    channel::send_blocking(CHANNEL_FD, &FromWorker::Jailed(Box::new(jailed.audit)))
        .map_err(|e| WorkerError::Channel(e.into()))?;
    if spec.probe {
        let report = jail::checks::run(spec.level).to_string();
        channel::send_blocking(CHANNEL_FD, &FromWorker::ProbeReport { json: report })
            .map_err(|e| WorkerError::Channel(e.into()))?;
        return Ok(());
    }

    // W14: the runtime, only now that every jail step is in place.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    runtime.block_on(async {
        // PID 1 of its namespace at `strict`: orphans are ours to reap.
        reaper::start();
        let stream =
            channel::open(CHANNEL_FD).map_err(|e| WorkerError::SelfCheck(e.to_string()))?;
        #[cfg(feature = "isolation-tests")]
        if spec.probe_server {
            return probe::serve_beside_agent(&spec.session_id, stream).await;
        }
        agent::serve(&spec.session_id, stream).await
    })
}

/// isolation.md L0: an empty environment, a single thread, and a socket at fd 3.
fn self_check() -> Result<(), WorkerError> {
    if let Some((key, _)) = std::env::vars_os().next() {
        return Err(WorkerError::SelfCheck(format!(
            "environment is not empty (found {key:?}); workers must be spawned with env_clear()"
        )));
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .map(str::trim);
        if threads != Some("1") {
            return Err(WorkerError::SelfCheck(format!(
                "expected one thread before the jail, found {threads:?}"
            )));
        }
    }
    channel::check_is_socket(CHANNEL_FD).map_err(WorkerError::SelfCheck)
}
