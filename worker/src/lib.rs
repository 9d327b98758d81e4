//! The per-session worker: what runs inside `supervisor worker --session <id>`.
//!
//! Start-up order (each step says why it sits where it is):
//! 1. [`self_check`]: the environment must be empty and fd 3 must be the socket the supervisor
//!    handed us. A spawn path that forgot `env_clear()` would leak secrets into the session, so we
//!    refuse to run rather than carry on (isolation.md L0).
//! 2. The jail (isolation.md §2.3) is entered here, before any thread exists. At level `none`
//!    (the only level so far) there is nothing to enter, but the process shape is already final:
//!    fresh exec, empty environment, one inherited channel.
//! 3. Only then the single-threaded tokio runtime starts and [`agent::serve`] speaks the protocol
//!    of `shared::protocol` on fd 3 until the supervisor goes away.

mod agent;
mod channel;

use std::os::fd::RawFd;

/// The inherited channel to the supervisor (isolation.md D4).
pub const CHANNEL_FD: RawFd = 3;

/// Arguments of the hidden `worker` mode. Nothing secret ever travels here: the command line
/// is visible to every process on the host.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub session_id: String,
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
}

impl WorkerError {
    /// Distinct exit codes, so the supervisor's log says which step failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::SelfCheck(_) => 70,
            Self::Runtime(_) => 71,
            Self::Channel(_) => 72,
            Self::Handshake(_) => 73,
        }
    }
}

/// Runs the worker until the supervisor closes the channel.
///
/// # Errors
/// A failed self-check, runtime start, handshake or channel.
pub fn launch(args: &WorkerArgs) -> Result<(), WorkerError> {
    self_check()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    runtime.block_on(async {
        let stream =
            channel::open(CHANNEL_FD).map_err(|e| WorkerError::SelfCheck(e.to_string()))?;
        agent::serve(&args.session_id, stream).await
    })
}

/// isolation.md L0: an empty environment and a socket at fd 3.
fn self_check() -> Result<(), WorkerError> {
    if let Some((key, _)) = std::env::vars_os().next() {
        return Err(WorkerError::SelfCheck(format!(
            "environment is not empty (found {key:?}); workers must be spawned with env_clear()"
        )));
    }
    channel::check_is_socket(CHANNEL_FD).map_err(WorkerError::SelfCheck)
}
