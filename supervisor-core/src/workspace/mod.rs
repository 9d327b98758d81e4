//! Host-side access to session workspaces: the one way the supervisor reads, lists and removes
//! what a session wrote (ARCHITECTURE decision 16).
//!
//! The supervisor is trusted and, in root mode, root; a workspace is written by an untrusted
//! worker and by the commands it runs, which may swap any entry for a symlink at any moment.
//! So a workspace path is never checked and then used again by name (`canonicalize`, then
//! `starts_with`, then `open`: the entry can change in between). Instead:
//!
//! - the session directory itself is opened once, without following a symlink in its place
//!   ([`SessionDir::open`]);
//! - everything below it is opened beneath that handle with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS)` (through cap-std): `..`, absolute paths and symlinks that leave the
//!   workspace fail, links that stay inside are followed;
//! - what was opened is checked on the open descriptor (`fstat`), and only then read: a regular
//!   file up to a size cap; a FIFO would hang the reader (opens are non-blocking), a device or a
//!   socket could be anything, so neither is read;
//! - walks and removals go from handle to handle by entry name, never through a path string,
//!   iteratively, and on a blocking thread (see [`remove`]).

mod remove;

pub use remove::remove;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use cap_std::fs::{Dir, File, Metadata, OpenOptions, OpenOptionsExt as _};

/// Why a workspace entry could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Missing, or a parent is not a directory.
    #[error("no such file or directory")]
    NotFound,
    /// The path, or a symlink on it, leads out of the workspace (or is not ours to read).
    #[error("the path leads outside the workspace")]
    Outside,
    /// A FIFO, a device, a socket: nothing the supervisor reads.
    #[error("not a regular file or directory")]
    NotRegular,
    #[error("larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Io(std::io::Error),
}

impl From<std::io::Error> for AccessError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => Self::NotFound,
            // cap-std reports a resolution that would leave the handle as PermissionDenied.
            std::io::ErrorKind::PermissionDenied => Self::Outside,
            _ => match e.raw_os_error() {
                Some(libc::ELOOP | libc::EXDEV) => Self::Outside,
                Some(libc::ENAMETOOLONG) => Self::NotFound,
                // Opening a socket file.
                Some(libc::ENXIO) => Self::NotRegular,
                _ => Self::Io(e),
            },
        }
    }
}

/// What a path beneath a workspace turned out to be, once opened.
pub enum Entry {
    /// A regular file, with its `fstat`.
    File(File, Metadata),
    /// A directory, as a handle to go on from.
    Dir(Dir),
}

/// One session's workspace directory, opened once; everything below it is reached through this
/// handle.
pub struct SessionDir {
    dir: Dir,
}

impl SessionDir {
    /// Opens the session directory `path`. The path is the server's own (its workspace root
    /// joined with the session id), but its last component is opened without following a
    /// symlink, so a link planted in its place is refused rather than followed.
    ///
    /// # Errors
    /// Missing, not a directory, or a symlink.
    pub fn open(path: &Path) -> Result<Self, AccessError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self {
            dir: Dir::from_std_file(file),
        })
    }

    /// The handle, for lookups of metadata and listings beneath it.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Opens `relative` (empty: the directory itself) beneath the handle; see [`open_beneath`].
    ///
    /// # Errors
    /// As [`open_beneath`].
    pub fn entry(&self, relative: &Path) -> Result<Entry, AccessError> {
        open_beneath(&self.dir, relative)
    }

    /// Reads the regular file `relative`, of at most `limit` bytes; see [`read_beneath`].
    ///
    /// # Errors
    /// As [`read_beneath`].
    pub fn read(&self, relative: &Path, limit: u64) -> Result<Vec<u8>, AccessError> {
        read_beneath(&self.dir, relative, limit)
    }
}

/// Opens `relative` beneath `dir` (resolution may not leave it) for reading, non-blocking and
/// without taking a controlling terminal, and tells from the open descriptor what it is.
///
/// # Errors
/// Missing; outside; something other than a regular file or a directory.
pub fn open_beneath(dir: &Dir, relative: &Path) -> Result<Entry, AccessError> {
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let mut options = OpenOptions::new();
    options
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
    let file = match dir.open_with(relative, &options) {
        Ok(file) => file,
        // A device on a `nodev` mount (a session's disk image) cannot be opened at all: say
        // what it is rather than calling it outside. Only the type of the entry itself is read
        // here (its last component not followed), never its contents.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(match dir.symlink_metadata(relative) {
                Ok(meta) if !meta.is_file() && !meta.is_dir() && !meta.is_symlink() => {
                    AccessError::NotRegular
                }
                _ => e.into(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    // The type of what was opened, not of what a path pointed at a moment earlier.
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Ok(Entry::Dir(Dir::from_std_file(file.into_std())));
    }
    if !meta.is_file() {
        return Err(AccessError::NotRegular);
    }
    Ok(Entry::File(file, meta))
}

/// Reads the regular file `relative` beneath `dir`, refusing one larger than `limit` bytes
/// (checked on the descriptor before reading, and again while reading, as it may grow).
///
/// # Errors
/// As [`open_beneath`]; a directory is `NotRegular`; `TooLarge`; a read error.
pub fn read_beneath(dir: &Dir, relative: &Path, limit: u64) -> Result<Vec<u8>, AccessError> {
    match open_beneath(dir, relative)? {
        Entry::File(file, meta) => read_file(file, &meta, limit),
        Entry::Dir(_) => Err(AccessError::NotRegular),
    }
}

/// The contents of an opened regular file of at most `limit` bytes.
///
/// # Errors
/// `TooLarge`, or a read error.
pub fn read_file(file: File, meta: &Metadata, limit: u64) -> Result<Vec<u8>, AccessError> {
    if meta.len() > limit {
        return Err(AccessError::TooLarge { limit });
    }
    // `len <= limit`, and limits are far below `usize::MAX`.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.into_std()
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(AccessError::TooLarge { limit });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A workspace `ws` next to a host file `secret.txt` it must never reach.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("ws")).unwrap();
            std::fs::write(dir.path().join("secret.txt"), "host secret").unwrap();
            std::fs::write(dir.path().join("ws/a.txt"), "inside").unwrap();
            Self { dir }
        }
        fn ws(&self) -> std::path::PathBuf {
            self.dir.path().join("ws")
        }
        fn open(&self) -> SessionDir {
            SessionDir::open(&self.ws()).unwrap()
        }
    }

    fn read(session: &SessionDir, path: &str) -> Result<Vec<u8>, AccessError> {
        session.read(Path::new(path), 1024)
    }

    #[test]
    fn reads_a_regular_file_and_links_that_stay_inside() {
        let f = Fixture::new();
        std::fs::create_dir(f.ws().join("sub")).unwrap();
        symlink("a.txt", f.ws().join("ok")).unwrap();
        symlink("../a.txt", f.ws().join("sub/up")).unwrap();
        let s = f.open();
        assert_eq!(read(&s, "a.txt").unwrap(), b"inside");
        assert_eq!(read(&s, "ok").unwrap(), b"inside");
        assert_eq!(read(&s, "sub/up").unwrap(), b"inside");
    }

    #[test]
    fn symlinks_out_are_refused() {
        let f = Fixture::new();
        symlink("../secret.txt", f.ws().join("rel")).unwrap();
        symlink(f.dir.path().join("secret.txt"), f.ws().join("abs")).unwrap();
        symlink(f.dir.path(), f.ws().join("dir")).unwrap();
        symlink("/proc/self/environ", f.ws().join("environ")).unwrap();
        let s = f.open();
        for path in ["rel", "abs", "dir/secret.txt", "environ"] {
            assert!(
                matches!(read(&s, path), Err(AccessError::Outside)),
                "{path}: {:?}",
                read(&s, path)
            );
        }
    }

    #[test]
    fn dotdot_cannot_climb_out() {
        let f = Fixture::new();
        let s = f.open();
        assert!(matches!(
            read(&s, "../secret.txt"),
            Err(AccessError::Outside)
        ));
        assert!(matches!(
            read(&s, "sub/../../secret.txt"),
            Err(AccessError::NotFound | AccessError::Outside)
        ));
        assert!(matches!(
            read(&s, "/etc/hostname"),
            Err(AccessError::Outside)
        ));
        // `..` that stays inside is fine.
        std::fs::create_dir(f.ws().join("sub")).unwrap();
        assert_eq!(read(&s, "sub/../a.txt").unwrap(), b"inside");
    }

    #[test]
    fn the_session_directory_itself_is_not_followed() {
        let f = Fixture::new();
        symlink(f.ws(), f.dir.path().join("link")).unwrap();
        assert!(SessionDir::open(&f.dir.path().join("link")).is_err());
        assert!(SessionDir::open(&f.ws()).is_ok());
    }

    #[test]
    fn fifos_devices_and_sockets_are_not_read() {
        let f = Fixture::new();
        nix::unistd::mkfifo(&f.ws().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(f.ws().join("sock")).unwrap();
        let s = f.open();
        // Non-blocking: a FIFO without a writer neither hangs nor is read.
        assert!(matches!(read(&s, "pipe"), Err(AccessError::NotRegular)));
        assert!(matches!(read(&s, "sock"), Err(AccessError::NotRegular)));
        // A character device (needs CAP_MKNOD: root, as the tests run).
        let made = nix::sys::stat::mknod(
            &f.ws().join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::S_IRUSR,
            nix::sys::stat::makedev(1, 3),
        );
        if made.is_ok() {
            assert!(matches!(read(&s, "null"), Err(AccessError::NotRegular)));
        } else {
            println!("SKIP: mknod needs CAP_MKNOD");
        }
        assert!(matches!(read(&s, "."), Err(AccessError::NotRegular)));
        assert!(matches!(read(&s, "missing"), Err(AccessError::NotFound)));
        assert!(matches!(read(&s, "a.txt/x"), Err(AccessError::NotFound)));
    }

    #[test]
    fn oversize_files_are_refused_before_reading() {
        let f = Fixture::new();
        let big = std::fs::File::create(f.ws().join("big")).unwrap();
        // Sparse: a terabyte that takes no space, and must not be read.
        big.set_len(1 << 40).unwrap();
        std::fs::write(f.ws().join("exact"), vec![b'x'; 1024]).unwrap();
        std::fs::write(f.ws().join("over"), vec![b'x'; 1025]).unwrap();
        let s = f.open();
        assert!(matches!(
            read(&s, "big"),
            Err(AccessError::TooLarge { limit: 1024 })
        ));
        assert_eq!(read(&s, "exact").unwrap().len(), 1024);
        assert!(matches!(
            read(&s, "over"),
            Err(AccessError::TooLarge { limit: 1024 })
        ));
    }

    #[test]
    fn entries_say_what_was_opened() {
        let f = Fixture::new();
        std::fs::create_dir(f.ws().join("sub")).unwrap();
        let s = f.open();
        assert!(matches!(s.entry(Path::new("")), Ok(Entry::Dir(_))));
        assert!(matches!(s.entry(Path::new("sub")), Ok(Entry::Dir(_))));
        assert!(matches!(s.entry(Path::new("a.txt")), Ok(Entry::File(_, m)) if m.len() == 6));
    }
}
