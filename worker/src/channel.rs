//! fd 3, the worker's only way out: a `socketpair` end inherited from the supervisor.
//!
//! Before the runtime exists (launcher and jail), the channel is used with plain blocking
//! reads and writes: one [`JailSpec`] in, one `Jailed` or `JailFailed` out. Afterwards it is a
//! tokio stream. Either way the frames are `shared::frame`'s: this file only owns the descriptor.

use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use shared::frame::{FrameError, read_frame_blocking, write_frame_blocking};
use shared::jail::JailSpec;
use shared::process::CHANNEL_FD;
use shared::protocol::FromWorker;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

/// Largest jail spec the launcher accepts: a spec is a few hundred bytes; anything bigger is not
/// from our supervisor and is refused before allocating.
const MAX_SPEC_LEN: usize = 64 * 1024;

/// Why the channel on fd 3 cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("fd {fd} is not open: {source}")]
    NotOpen { fd: RawFd, source: std::io::Error },
    #[error("fd {fd} is not a socket")]
    NotSocket { fd: RawFd },
    #[error("fd {fd} is not an AF_UNIX socket")]
    NotUnixSocket { fd: RawFd },
    #[error("fd {fd} cannot be made close-on-exec: {source}")]
    CloseOnExec { fd: RawFd, source: std::io::Error },
    #[error("reading the jail spec: {0}")]
    Spec(#[source] FrameError),
    #[error("the supervisor closed the channel before sending the jail spec")]
    NoSpec,
    #[error("taking over the channel: {0}")]
    Open(#[source] std::io::Error),
}

/// The channel while it is still a bare descriptor: blocking reads and writes on fd 3, which
/// no Rust object owns until [`open`] takes it over.
struct Blocking;

impl Blocking {
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: fd 3 stays open until `open` takes it over (`check_is_socket` checked it
        // first thing; the strict launcher closes its copy only once it has nothing more to
        // send), and nothing borrowed here outlives a single read or write.
        unsafe { BorrowedFd::borrow_raw(CHANNEL_FD) }
    }
}

impl Read for Blocking {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(nix::unistd::read(self.fd(), buf)?)
    }
}

impl Write for Blocking {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(nix::unistd::write(self.fd(), buf)?)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Marks the channel close-on-exec, so that no program the worker starts (a `run_command`
/// shell and everything below it) inherits it: such a program could otherwise speak the
/// protocol as the worker (forge stored events, start model calls with the operator's key)
/// and its writes would interleave with the worker's frames. The supervisor clears the flag
/// for the one exec that must keep it, its own into this worker; nothing after that may.
pub(crate) fn keep_from_programs(fd: RawFd) -> Result<(), ChannelError> {
    let failed = |source| ChannelError::CloseOnExec { fd, source };
    // SAFETY: F_GETFD/F_SETFD only read and set the descriptor flags of `fd`; an invalid fd
    // yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } == -1 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads the launcher's orders: the first frame the supervisor writes. Blocks until it arrives,
/// which is how the supervisor holds a launcher back until it has been placed in its cgroup
/// (the spec is the launcher's "go").
pub(crate) fn read_spec() -> Result<JailSpec, ChannelError> {
    read_frame_blocking(&mut Blocking, MAX_SPEC_LEN)
        .map_err(ChannelError::Spec)?
        .ok_or(ChannelError::NoSpec)
}

/// Sends one message before the runtime exists (the audit, a failure, a probe report).
pub(crate) fn send_blocking(msg: &FromWorker) -> Result<(), FrameError> {
    write_frame_blocking(&mut Blocking, msg)
}

/// Tells the supervisor which jail step failed. Best effort: if the channel is gone too, the
/// exit status still says "jail failed".
pub(crate) fn send_jail_failure(error: &crate::jail::JailError) {
    let _ = send_blocking(&FromWorker::JailFailed(error.to_failure()));
}
/// Checks that `fd` is an open Unix-domain socket, before anything trusts it.
pub(crate) fn check_is_socket(fd: RawFd) -> Result<(), ChannelError> {
    // SAFETY: fstat only writes into the zeroed struct we pass; an invalid fd yields EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(ChannelError::NotOpen {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(ChannelError::NotSocket { fd });
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
        return Err(ChannelError::NotUnixSocket { fd });
    }
    Ok(())
}

/// Takes ownership of fd 3 as a tokio stream.
pub(crate) fn open() -> Result<UnixStream, ChannelError> {
    // SAFETY: `check_is_socket` verified that fd 3 is an open socket; it was inherited for us
    // alone and nothing else in this process refers to it, so taking ownership is sound.
    let owned = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    let std_stream = std::os::unix::net::UnixStream::from(owned);
    std_stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(std_stream))
        .map_err(ChannelError::Open)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Many parts of the worker send at once, with frames far larger than the socket buffer (so
    /// every frame takes many partial writes): each frame still arrives whole and unmixed,
    /// because only the writer task touches the socket.
    #[tokio::test]
    async fn concurrent_large_frames_are_never_interleaved() {
        const SENDERS: u8 = 8;
        const FRAMES_EACH: usize = 4;
        const LEN: usize = 1 << 20;
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_read, write) = ours.into_split();
        let outbox = spawn_writer(write);
        for sender in 0..SENDERS {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let letter = char::from(b'a' + sender);
                for _ in 0..FRAMES_EACH {
                    let json = format!("\"{}\"", letter.to_string().repeat(LEN));
                    outbox.send(FromWorker::Event { json }).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
        }
        drop(outbox);
        let mut read = tokio::io::BufReader::new(theirs);
        let mut counts = [0usize; SENDERS as usize];
        while let Some(msg) = shared::frame::read_frame::<_, FromWorker>(&mut read)
            .await
            .unwrap()
        {
            let FromWorker::Event { json } = msg else {
                panic!("unexpected message {msg:?}");
            };
            let body = json.trim_matches('"');
            assert_eq!(body.len(), LEN);
            let first = body.as_bytes()[0];
            assert!(
                body.bytes().all(|b| b == first),
                "a frame mixes two senders"
            );
            counts[usize::from(first - b'a')] += 1;
        }
        assert_eq!(counts, [FRAMES_EACH; SENDERS as usize]);
    }

    #[test]
    fn the_channel_is_kept_from_programs() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        // A fresh std socket is close-on-exec already; clear it, as the supervisor's spawn does.
        // SAFETY: changes the flags of a descriptor this test owns.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        keep_from_programs(fd).unwrap();
        // SAFETY: reads the flags of a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
