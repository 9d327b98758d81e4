//! fd 3, the worker's only way out: a `socketpair` end inherited from the supervisor.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use shared::protocol::FromWorker;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

/// Checks that `fd` is an open Unix-domain socket, before anything trusts it.
pub(crate) fn check_is_socket(fd: RawFd) -> Result<(), String> {
    // SAFETY: fstat only writes into the zeroed struct we pass; an invalid fd yields EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!(
            "fd {fd} is not open: {}",
            std::io::Error::last_os_error()
        ));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!("fd {fd} is not a socket"));
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&raw mut domain).cast(),
            &mut len,
        )
    };
    if rc != 0 || domain != libc::AF_UNIX {
        return Err(format!("fd {fd} is not an AF_UNIX socket"));
    }
    Ok(())
}

/// Takes ownership of `fd` as a tokio stream.
pub(crate) fn open(fd: RawFd) -> std::io::Result<UnixStream> {
    // SAFETY: `check_is_socket` verified that fd is an open socket; it was inherited for us
    // alone and nothing else in this process refers to it, so taking ownership is sound.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let std_stream = std::os::unix::net::UnixStream::from(owned);
    std_stream.set_nonblocking(true)?;
    UnixStream::from_std(std_stream)
}

/// The sending side of the channel: a bounded queue drained by one writer task, so any part of
/// the worker can send without holding the socket, and a slow supervisor slows the agent down
/// instead of growing memory.
pub(crate) type Outbox = mpsc::Sender<FromWorker>;

/// Starts the writer task. It ends when every [`Outbox`] is dropped or the socket fails.
pub(crate) fn spawn_writer(mut write: OwnedWriteHalf) -> Outbox {
    let (tx, mut rx) = mpsc::channel::<FromWorker>(1024);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if shared::frame::write_batch(&mut write, msg, &mut rx)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tx
}
