//! The supervisor's own process, hardened before anything in it can hold a secret.

use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};

/// Makes this process not dumpable (its environ, memory and fds become unreadable to other
/// processes of its uid) and unable to write a core file with secrets in it.
///
/// # Errors
/// The `prctl` or `setrlimit` failed.
pub fn harden_process() -> std::io::Result<()> {
    prctl::set_dumpable(false)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    Ok(())
}
