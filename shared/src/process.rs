//! The worker as a process, seen from outside: the descriptor its channel to the supervisor is
//! inherited on, and the exit statuses that say which start-up step stopped it. What travels on
//! that channel is [`crate::frame`]'s and [`crate::protocol`]'s business.

use std::os::fd::RawFd;

/// The worker's end of its channel: the supervisor places its `socketpair` end at this
/// descriptor just before the exec, and the worker refuses to start if it is not a socket there.
pub const CHANNEL_FD: RawFd = 3;

/// How a worker ends when it cannot start or carry on. The statuses are distinct, so the
/// supervisor's log (which shows a worker's exit status) says which step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// The process was not started the way a worker must be (environment, threads, fd 3).
    SelfCheck,
    /// The async runtime could not be built.
    Runtime,
    /// The channel failed (I/O or a bad frame).
    Channel,
    /// The `Init`/`Ready` handshake failed.
    Handshake,
    /// A jail step failed; the worker reported the step on its channel first.
    Jail,
}

impl WorkerExit {
    /// The process exit status.
    pub fn code(self) -> i32 {
        match self {
            Self::SelfCheck => 70,
            Self::Runtime => 71,
            Self::Channel => 72,
            Self::Handshake => 73,
            Self::Jail => 74,
        }
    }
}
