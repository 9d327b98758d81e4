//! The per-session worker: what runs inside `supervisor worker --pooled` (or `--session=<id>`).
//!
//! Start-up order (each step says why it sits where it is):
//! 1. [`self_check`]: the environment must be empty, we must be the only thread, and fd 3 must
//!    be the socket the supervisor handed us. A spawn path that forgot `env_clear()` would leak
//!    secrets into the session, so we refuse to run rather than carry on.
//! 2. fd hygiene, before any path is looked up (an inherited directory fd walks out of any
//!    chroot): only 0–3 survive, and fd 3 is marked close-on-exec, so no program started inside
//!    the jail inherits the channel.
//! 3. The jail spec is read from fd 3. The supervisor writes it only after it has placed this
//!    process in the session's cgroup, so reading it is also the "go": no session process ever
//!    runs outside its cgroup.
//! 4. The jail ([`launcher`], [`jail`]): namespaces, mounts, privileges, rlimits, Landlock,
//!    seccomp, all while this process is single-threaded (`CLONE_NEWUSER` needs it; Landlock and
//!    seccomp only confine the calling thread and its later children).
//! 5. The self-audit goes to the supervisor, which refuses the session if it is not what the
//!    level promises.
//! 6. Only then the single-threaded tokio runtime starts and [`agent::serve`] speaks the
//!    protocol of `shared::protocol` on fd 3 until the supervisor goes away. The limits the
//!    tools need travel with it as a value ([`jail::Confinement`]), taken from the spec.

mod agent;
mod channel;
pub mod jail;
mod launcher;
#[cfg(feature = "isolation-tests")]
mod probe;
mod reaper;

use std::ffi::OsString;

use shared::process::{CHANNEL_FD, WorkerExit};
use shared::protocol::FromWorker;

pub use agent::HandshakeError;
pub use channel::ChannelError;

/// Arguments of the hidden `worker` mode. Nothing secret ever travels here: the command line
/// is visible to every process on the host.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The session, when it is known at spawn time; a pooled launcher learns it from its spec.
    pub session_id: Option<String>,
    /// Start-up probe: build the jail, check it, report, exit (how the supervisor decides at
    /// start which isolation level works on this host).
    pub probe: bool,
}

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("refusing to start: {0}")]
    SelfCheck(#[from] SelfCheckError),
    #[error("could not start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("channel to the supervisor failed: {0}")]
    Channel(#[from] shared::frame::FrameError),
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("jail step '{step}' failed: {source}", step = .source.step())]
    Jail {
        #[from]
        source: jail::JailError,
    },
}

/// Why the worker refuses to start: it was not started the way the supervisor starts it.
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    #[error("environment is not empty (found {0:?}); workers must be spawned with env_clear()")]
    Environment(OsString),
    #[error("expected one thread before the jail, found {0:?}")]
    Threads(Option<String>),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("closing inherited descriptors: {0}")]
    Fds(#[source] Box<jail::JailError>),
    #[error("the jail spec names a different session than the command line")]
    OtherSession,
    #[error("the jail spec and the command line disagree on probe mode")]
    ProbeMode,
    #[error("the test probe server is not compiled into this build")]
    NoProbeServer,
}

impl WorkerError {
    /// How the process exits for this error.
    pub fn exit(&self) -> WorkerExit {
        match self {
            Self::SelfCheck(_) => WorkerExit::SelfCheck,
            Self::Runtime(_) => WorkerExit::Runtime,
            Self::Channel(_) => WorkerExit::Channel,
            Self::Handshake(_) => WorkerExit::Handshake,
            Self::Jail { .. } => WorkerExit::Jail,
        }
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        self.exit().code()
    }
}

/// Jails this process as the spec on fd 3 says, then runs the worker until the supervisor
/// closes the channel.
///
/// # Errors
/// A failed self-check, jail step, runtime start, handshake or channel.
pub fn launch(args: &WorkerArgs) -> Result<(), WorkerError> {
    // Read first: the parent of a freshly exec'd launcher is the supervisor's spawner thread.
    let supervisor = nix::unistd::getppid().as_raw();
    self_check()?;
    jail::fds::close_inherited().map_err(|e| SelfCheckError::Fds(Box::new(e)))?;
    channel::keep_from_programs(CHANNEL_FD).map_err(SelfCheckError::Channel)?;
    let spec = channel::read_spec().map_err(SelfCheckError::Channel)?;
    if args
        .session_id
        .as_ref()
        .is_some_and(|id| *id != spec.session_id)
    {
        return Err(SelfCheckError::OtherSession.into());
    }
    if spec.probe != args.probe {
        return Err(SelfCheckError::ProbeMode.into());
    }
    if spec.probe_server && !cfg!(feature = "isolation-tests") {
        return Err(SelfCheckError::NoProbeServer.into());
    }

    let jailed = match launcher::enter(&spec, supervisor) {
        Ok(jailed) => jailed,
        Err(e) => {
            channel::send_jail_failure(&e);
            return Err(e.into());
        }
    };
    channel::send_blocking(&FromWorker::Jailed(Box::new(jailed.audit)))?;
    if spec.probe {
        let report = jail::checks::run(spec.level).to_string();
        channel::send_blocking(&FromWorker::ProbeReport { json: report })?;
        return Ok(());
    }
    let confinement = jail::Confinement::of(&spec);

    // The runtime only now that every jail step is in place: its threads would have been
    // outside the seccomp filter and Landlock domain, which confine only the calling thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    runtime.block_on(async {
        // PID 1 of its namespace at `strict`: orphans are ours to reap.
        reaper::start();
        let stream = channel::open().map_err(SelfCheckError::Channel)?;
        #[cfg(feature = "isolation-tests")]
        if spec.probe_server {
            return probe::serve_beside_agent(&spec.session_id, confinement, stream).await;
        }
        agent::serve(&spec.session_id, confinement, stream).await
    })
}

/// The worker must be started the way the supervisor starts it: an empty environment, a single
/// thread, and a socket at fd 3.
fn self_check() -> Result<(), SelfCheckError> {
    if let Some((key, _)) = std::env::vars_os().next() {
        return Err(SelfCheckError::Environment(key));
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .map(str::trim);
        if threads != Some("1") {
            return Err(SelfCheckError::Threads(threads.map(str::to_owned)));
        }
    }
    channel::check_is_socket(CHANNEL_FD).map_err(SelfCheckError::Channel)
}
