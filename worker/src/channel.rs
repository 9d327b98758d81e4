//! fd 3, the worker's only way out: a `socketpair` end inherited from the supervisor.
//!
//! Before the runtime exists (launcher and jail), the channel is used with plain blocking
//! reads and writes: one [`JailSpec`] in, one `Jailed` or `JailFailed` out. Afterwards it is a
//! tokio stream.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use shared::jail::JailSpec;
use shared::protocol::FromWorker;

/// Largest jail spec the launcher accepts: a spec is a few hundred bytes; anything bigger is not
/// from our supervisor and is refused before allocating.
const MAX_SPEC_LEN: usize = 64 * 1024;

fn read_exact_blocking(fd: RawFd, buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: reads at most rest.len() bytes into a buffer we own.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => filled += n as usize,
        }
    }
    Ok(())
}

fn write_all_blocking(fd: RawFd, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writes at most buf.len() bytes from a buffer we own.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Reads the launcher's orders: the first frame the supervisor writes (isolation.md S6, "go").
/// Blocks until it arrives, which is how the supervisor holds a launcher back until it has been
/// placed in its cgroup.
pub(crate) fn read_spec(fd: RawFd) -> Result<JailSpec, String> {
    let mut prefix = [0u8; 4];
    read_exact_blocking(fd, &mut prefix).map_err(|e| format!("reading the jail spec: {e}"))?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_SPEC_LEN {
        return Err(format!("jail spec of {len} bytes is over the limit"));
    }
    let mut payload = vec![0u8; len];
    read_exact_blocking(fd, &mut payload).map_err(|e| format!("reading the jail spec: {e}"))?;
    shared::frame::decode(&payload).map_err(|e| format!("decoding the jail spec: {e}"))
}

/// Sends one message before the runtime exists (the audit, a failure, a probe report).
pub(crate) fn send_blocking(fd: RawFd, msg: &FromWorker) -> std::io::Result<()> {
    let bytes = shared::frame::encode(msg).map_err(std::io::Error::other)?;
    write_all_blocking(fd, &bytes)
}

/// Tells the supervisor which jail step failed. Best effort: if the channel is gone too, the
/// exit status still says "jail failed".
pub(crate) fn send_jail_failure(error: &crate::jail::JailError) {
    let _ = send_blocking(
        crate::CHANNEL_FD,
        &FromWorker::JailFailed(error.to_failure()),
    );
}
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
