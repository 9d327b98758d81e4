//! The session workspace as tools see it: one directory handle, with every path resolved beneath
//! it by the kernel.
//!
//! Why a handle and not path strings: the worker is not jailed yet, so a lexical check alone
//! would be defeated by a symlink (`notes -> /etc`) or by a rename racing between check and use.
//! Every multi-component path therefore goes through `openat2(RESOLVE_BENEATH)`, which fails
//! with `EXDEV` the moment resolution would leave the workspace, whatever symlinks, `..` or
//! absolute link targets it meets. The last component of a path that is changed (written,
//! renamed, deleted, created) is then handled by name relative to its parent's handle, so a
//! final symlink is never followed. Opens use `O_NONBLOCK`, so a FIFO planted in the workspace
//! cannot block the worker, and anything that is not a regular file is refused where a file is
//! expected.
//!
//! Requires Linux 5.6 (openat2). The future seccomp filter must allow `openat2`, `openat`,
//! `renameat2` (and `renameat`), `mkdirat`, `unlinkat`, `newfstatat`/`fstat`, `fchmod`,
//! `lseek`, `fcntl(F_DUPFD_CLOEXEC)` and `getdents64`.
//!
//! Known limits: an absolute symlink is refused even when it points back inside (the kernel
//! cannot tell), and a hard link planted from outside reads its outside inode (the tools cannot
//! create one; the mount namespace of the jail removes the case).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag, openat, openat2, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use tokio_util::sync::CancellationToken;

/// Directory levels a recursive delete descends before it gives up (each level holds an fd).
const MAX_DELETE_DEPTH: usize = 256;
/// The deepest a tool may create anything: this many path components below the workspace root.
/// Why a cap at all: the supervisor, the host's tools and every client walk these trees, and a
/// few `move_file` calls could otherwise nest one deep tree into another until it is thousands
/// of levels deep. Below [`MAX_DELETE_DEPTH`], so `delete_file` removes whatever tools made.
pub(crate) const MAX_DEPTH: usize = 128;
/// Bytes written between two looks at the cancellation token.
const WRITE_CHUNK: usize = 1024 * 1024;

/// Why a workspace operation failed. The texts are the standard messages the model reads after
/// `Error: `; the path is always the one the model gave, so it can recognise its own argument.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FsError {
    #[error("Path is outside the workspace: {0}")]
    Outside(String),
    #[error("No such file or directory: {0}")]
    NotFound(String),
    #[error("Not a directory: {0}")]
    NotADirectory(String),
    #[error("Is a directory: {0}")]
    IsADirectory(String),
    #[error("Is a directory: {0}; set recursive to true to delete it")]
    DirectoryNeedsRecursive(String),
    #[error("Not a regular file: {0}")]
    NotRegular(String),
    #[error("Refusing to write through a symbolic link: {0}")]
    Symlink(String),
    #[error("Destination already exists: {0}")]
    Exists(String),
    #[error("Permission denied: {0}")]
    PermissionDenied(String),
    #[error("Too many levels of symbolic links: {0}")]
    Loop(String),
    #[error("Refusing to delete the workspace root")]
    DeleteRoot,
    #[error("Refusing to move the workspace root")]
    MoveRoot,
    #[error("Cannot move a directory into itself: {0}")]
    IntoItself(String),
    #[error("Directory tree too deep to delete: {0}")]
    TooDeep(String),
    /// The tools name the jail's disk quota, when there is one, in its place.
    #[error("{}: {path}", no_space(None))]
    NoSpace { path: String },
    #[error(
        "Path too deep: {0} would put entries more than {max} levels below the workspace root",
        max = MAX_DEPTH
    )]
    PathTooDeep(String),
    #[error("{path}: {}", errno.desc())]
    Io { path: String, errno: Errno },
    #[error("aborted")]
    Aborted,
}

impl FsError {
    /// The standard message for `errno`, met while working on `path`.
    pub(crate) fn from_errno(errno: Errno, path: &str) -> Self {
        let path = path.to_owned();
        match errno {
            // openat2(RESOLVE_BENEATH) reports every escape this way.
            Errno::EXDEV => Self::Outside(path),
            Errno::ENOENT => Self::NotFound(path),
            Errno::ENOTDIR => Self::NotADirectory(path),
            Errno::EISDIR => Self::IsADirectory(path),
            Errno::EEXIST | Errno::ENOTEMPTY => Self::Exists(path),
            Errno::EACCES | Errno::EPERM => Self::PermissionDenied(path),
            Errno::ELOOP => Self::Loop(path),
            // A socket, or a FIFO opened for writing without a reader.
            Errno::ENXIO => Self::NotRegular(path),
            // A full workspace: its filesystem (an image per session) or its project quota.
            Errno::ENOSPC | Errno::EDQUOT => Self::NoSpace { path },
            errno => Self::Io { path, errno },
        }
    }
}

/// What a directory entry is, without following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    fn of_mode(mode: libc::mode_t) -> Self {
        match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => Self::Dir,
            SFlag::S_IFREG => Self::File,
            SFlag::S_IFLNK => Self::Symlink,
            _ => Self::Other,
        }
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: OsString,
    pub(crate) kind: Kind,
}

/// A tool path after the lexical checks: relative to the workspace root, without `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WsPath {
    rel: PathBuf,
    given: String,
}

impl WsPath {
    /// The workspace root itself.
    pub(crate) fn root() -> Self {
        Self {
            rel: PathBuf::new(),
            given: ".".into(),
        }
    }

    pub(crate) fn is_root(&self) -> bool {
        self.rel.as_os_str().is_empty()
    }

    /// The path as the model wrote it, for error messages.
    pub(crate) fn given(&self) -> &str {
        &self.given
    }

    /// The normalised path relative to the root, empty for the root.
    pub(crate) fn rel(&self) -> &Path {
        &self.rel
    }

    /// How many levels below the root it names (0 for the root).
    fn depth(&self) -> usize {
        self.rel.components().count()
    }

    /// The path as tool output shows it: relative to the root, `/`-separated, `.` for the root.
    pub(crate) fn display(&self) -> String {
        if self.is_root() {
            ".".into()
        } else {
            self.rel.to_string_lossy().into_owned()
        }
    }

    /// The entry `name` inside this directory.
    pub(crate) fn child(&self, name: &OsStr) -> Self {
        let rel = self.rel.join(name);
        let given = rel.to_string_lossy().into_owned();
        Self { rel, given }
    }

    /// The parent directory and the last component; `None` for the root.
    fn split(&self) -> Option<(&Path, &OsStr)> {
        Some((self.rel.parent()?, self.rel.file_name()?))
    }

    /// What `openat2` resolves: `.` for the root.
    fn beneath(&self) -> &Path {
        if self.is_root() {
            Path::new(".")
        } else {
            &self.rel
        }
    }
}

/// The confined view of one session's workspace.
#[derive(Debug)]
pub(crate) struct Workspace {
    root: OwnedFd,
    /// Absolute spellings of the root that tool paths may start with: as configured, and
    /// canonical (if the configured path contains symlinks).
    prefixes: Vec<PathBuf>,
}

/// What a tool says when the workspace is full: which quota, when the jail has one.
pub(crate) fn no_space(quota: Option<u64>) -> String {
    match quota {
        Some(quota) => format!(
            "No space left on device: the session's disk quota of {} is reached",
            shared::jail::human_bytes(quota)
        ),
        None => "No space left on device".to_owned(),
    }
}

impl Workspace {
    /// Whether the workspace's filesystem (or project quota, which `statfs` reports for a
    /// workspace that has one) has less than 1 MiB or no inode left.
    pub(crate) fn is_full(&self) -> bool {
        nix::sys::statvfs::fstatvfs(&self.root).is_ok_and(|st| {
            st.blocks_available().saturating_mul(st.fragment_size()) <= 1024 * 1024
                || (st.files() > 0 && st.files_available() == 0)
        })
    }

    /// Opens the workspace directory `path` (absolute).
    ///
    /// # Errors
    /// The directory cannot be opened.
    pub(crate) fn open(path: &Path) -> Result<Self, FsError> {
        let display = path.to_string_lossy();
        let root = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::from_errno(e, &display))?;
        let mut prefixes = vec![normalise_absolute(path)];
        if let Ok(canonical) = std::fs::canonicalize(path)
            && !prefixes.contains(&canonical)
        {
            prefixes.push(canonical);
        }
        Ok(Self { root, prefixes })
    }

    /// The lexical half of confinement to the workspace: relative paths are taken against the root,
    /// absolute ones must lie under it, `..` may not climb above it, NUL is refused. What the path
    /// then meets on disk is checked by the kernel when it is used.
    ///
    /// # Errors
    /// `Outside` when the path leaves the workspace lexically.
    pub(crate) fn resolve(&self, given: &str) -> Result<WsPath, FsError> {
        let outside = || FsError::Outside(given.to_owned());
        if given.contains('\0') {
            return Err(outside());
        }
        let path = Path::new(given);
        let relative = if path.has_root() {
            let absolute = normalise_absolute(path);
            let inside = self
                .prefixes
                .iter()
                .find_map(|prefix| absolute.strip_prefix(prefix).ok().map(Path::to_path_buf));
            inside.ok_or_else(outside)?
        } else {
            path.to_path_buf()
        };
        let mut rel = PathBuf::new();
        for component in relative.components() {
            match component {
                Component::Normal(name) => rel.push(name),
                Component::CurDir => {}
                Component::ParentDir => {
                    if !rel.pop() {
                        return Err(outside());
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err(outside()),
            }
        }
        Ok(WsPath {
            rel,
            given: given.to_owned(),
        })
    }

    /// `openat2` beneath the root, following symlinks only while they stay inside.
    fn open_beneath(&self, path: &WsPath, flags: OFlag) -> Result<OwnedFd, Errno> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let mut attempts = 0;
        loop {
            match openat2(&self.root, path.beneath(), how) {
                // The kernel refuses to vouch for a lookup that raced with a rename; try again.
                Err(Errno::EAGAIN) if attempts < 8 => attempts += 1,
                other => return other,
            }
        }
    }

    /// Opens a regular file for reading; symlinks are followed while they stay inside.
    ///
    /// # Errors
    /// Missing, a directory, not a regular file (a FIFO, a device, a socket), or outside.
    pub(crate) fn open_file(&self, path: &WsPath) -> Result<(File, FileStat), FsError> {
        let fd = self
            .open_beneath(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
            .map_err(|e| FsError::from_errno(e, path.given()))?;
        let stat = checked_regular(&fd, path.given())?;
        Ok((File::from(fd), stat))
    }

    /// Opens a directory for listing; symlinks are followed while they stay inside.
    ///
    /// # Errors
    /// Missing, not a directory, or outside.
    pub(crate) fn open_dir(&self, path: &WsPath) -> Result<OwnedFd, FsError> {
        self.open_beneath(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NONBLOCK,
        )
        .map_err(|e| FsError::from_errno(e, path.given()))
    }

    /// What `path` itself is (a final symlink is not followed); `None` when it does not exist.
    ///
    /// # Errors
    /// A parent is missing, not a directory, or outside.
    pub(crate) fn kind(&self, path: &WsPath) -> Result<Option<Kind>, FsError> {
        let Some((parent, name)) = self.parent(path, false)? else {
            return Ok(Some(Kind::Dir));
        };
        match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Kind::of_mode(stat.st_mode))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(FsError::from_errno(e, path.given())),
        }
    }

    /// The handle of `path`'s parent directory and its last component, creating missing parent
    /// directories when `create` is set. `None` for the root.
    fn parent<'p>(
        &self,
        path: &'p WsPath,
        create: bool,
    ) -> Result<Option<(OwnedFd, &'p OsStr)>, FsError> {
        let Some((parent, name)) = path.split() else {
            return Ok(None);
        };
        let parent = WsPath {
            rel: parent.to_path_buf(),
            given: path.given().to_owned(),
        };
        let fd = if create {
            self.create_dirs(&parent)?.0
        } else {
            self.open_beneath(&parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(|e| FsError::from_errno(e, path.given()))?
        };
        Ok(Some((fd, name)))
    }

    /// `mkdir -p`: the handle of the directory `path`, and whether it existed already.
    fn create_dirs(&self, path: &WsPath) -> Result<(OwnedFd, bool), FsError> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        let fail = |e| FsError::from_errno(e, path.given());
        match self.open_beneath(path, flags) {
            Ok(fd) => return Ok((fd, true)),
            // Something is missing; beyond the cap it may not be made, and nothing is.
            Err(Errno::ENOENT) if path.depth() > MAX_DEPTH => {
                return Err(FsError::PathTooDeep(path.given().to_owned()));
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(fail(e)),
        }
        let mut current = self.open_beneath(&WsPath::root(), flags).map_err(fail)?;
        let mut prefix = WsPath::root();
        for component in path.rel.components() {
            let Component::Normal(name) = component else {
                continue;
            };
            prefix = prefix.child(name);
            current = match self.open_beneath(&prefix, flags) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    // By name in the parent's handle: a symlink planted here makes mkdirat
                    // fail with EEXIST and the open below re-checks it beneath the root.
                    match mkdirat(&current, name, Mode::from_bits_truncate(0o777)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(fail(e)),
                    }
                    self.open_beneath(&prefix, flags).map_err(fail)?
                }
                Err(e) => return Err(fail(e)),
            };
        }
        Ok((current, false))
    }

    /// `mkdir -p path`. Returns whether the directory existed already.
    ///
    /// # Errors
    /// Something that is not a directory is in the way, or the path is outside.
    pub(crate) fn create_dir_all(&self, path: &WsPath) -> Result<bool, FsError> {
        self.create_dirs(path).map(|(_, existed)| existed)
    }

    /// Replaces (or creates) the regular file `path` atomically: a temporary file in the same
    /// directory, renamed over the target. Missing parents are created; an existing file keeps
    /// its permissions; a final symlink is refused rather than followed.
    ///
    /// # Errors
    /// The target is a directory, a symlink or another non-regular file; outside; I/O.
    pub(crate) fn write_atomic(
        &self,
        path: &WsPath,
        content: &[u8],
        cancel: &CancellationToken,
    ) -> Result<(), FsError> {
        // Beyond the cap only an existing file may be rewritten; checked before any parent
        // directory is created, so a refusal leaves nothing behind.
        if path.depth() > MAX_DEPTH && !matches!(self.kind(path), Ok(Some(Kind::File))) {
            return Err(FsError::PathTooDeep(path.given().to_owned()));
        }
        let Some((parent, name)) = self.parent(path, true)? else {
            return Err(FsError::IsADirectory(path.given().to_owned()));
        };
        let mode = match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => match Kind::of_mode(stat.st_mode) {
                Kind::File => Some(Mode::from_bits_truncate(stat.st_mode & 0o7777)),
                Kind::Dir => return Err(FsError::IsADirectory(path.given().to_owned())),
                Kind::Symlink => return Err(self.symlink_refusal(path)),
                Kind::Other => return Err(FsError::NotRegular(path.given().to_owned())),
            },
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(FsError::from_errno(e, path.given())),
        };
        let temp = temp_name();
        let fd = openat(
            &parent,
            temp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )
        .map_err(|e| FsError::from_errno(e, path.given()))?;
        let outcome = fill(fd, mode, content, cancel, path.given()).and_then(|()| {
            renameat(&parent, temp.as_os_str(), &parent, name)
                .map_err(|e| FsError::from_errno(e, path.given()))
        });
        if outcome.is_err() {
            let _ = unlinkat(&parent, temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        outcome
    }

    /// Why a write through the final symlink of `path` is refused: a link that leads out of the
    /// workspace is reported as such, any other link as a link.
    fn symlink_refusal(&self, path: &WsPath) -> FsError {
        match self.open_beneath(path, OFlag::O_PATH) {
            Err(Errno::EXDEV) => FsError::Outside(path.given().to_owned()),
            _ => FsError::Symlink(path.given().to_owned()),
        }
    }

    /// Checks that `path` is a regular file that may be rewritten in place of itself (not a
    /// symlink), before an edit reads it.
    ///
    /// # Errors
    /// As for [`Workspace::write_atomic`], plus `NotFound`.
    pub(crate) fn check_rewritable(&self, path: &WsPath) -> Result<(), FsError> {
        match self.kind(path)? {
            Some(Kind::File) => Ok(()),
            Some(Kind::Dir) => Err(FsError::IsADirectory(path.given().to_owned())),
            Some(Kind::Symlink) => Err(self.symlink_refusal(path)),
            Some(Kind::Other) => Err(FsError::NotRegular(path.given().to_owned())),
            None => Err(FsError::NotFound(path.given().to_owned())),
        }
    }

    /// Renames `from` to `to`, which must not exist; `to`'s parents are created. Symlinks are
    /// moved as links.
    ///
    /// # Errors
    /// `from` is missing or the root; `to` exists; either is outside.
    pub(crate) fn rename_new(&self, from: &WsPath, to: &WsPath) -> Result<(), FsError> {
        if from.is_root() {
            return Err(FsError::MoveRoot);
        }
        if to.is_root() || to == from {
            return Err(FsError::Exists(to.given().to_owned()));
        }
        if to.rel.starts_with(&from.rel) {
            return Err(FsError::IntoItself(format!(
                "{} -> {}",
                from.given(),
                to.given()
            )));
        }
        let Some((from_dir, from_name)) = self.parent(from, false)? else {
            return Err(FsError::MoveRoot);
        };
        let stat = fstatat(&from_dir, from_name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::from_errno(e, from.given()))?;
        // What moves lands `to.depth()` levels down, and a directory brings its tree along.
        let too_deep = if to.depth() > MAX_DEPTH {
            true
        } else if Kind::of_mode(stat.st_mode) == Kind::Dir {
            let dir = Workspace::open_subdir(&from_dir, from_name, from.given())?;
            deeper_than(dir, MAX_DEPTH - to.depth(), from.given())?
        } else {
            false
        };
        if too_deep {
            return Err(FsError::PathTooDeep(format!(
                "{} -> {}",
                from.given(),
                to.given()
            )));
        }
        let Some((to_dir, to_name)) = self.parent(to, true)? else {
            return Err(FsError::Exists(to.given().to_owned()));
        };
        let renamed = nix::fcntl::renameat2(
            &from_dir,
            from_name,
            &to_dir,
            to_name,
            RenameFlags::RENAME_NOREPLACE,
        );
        let renamed = match renamed {
            // A file system without RENAME_NOREPLACE: check, then rename. Nothing else moves
            // files in this workspace while a tool runs, so the gap is harmless.
            Err(Errno::EINVAL) => match fstatat(&to_dir, to_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => Err(Errno::EEXIST),
                Err(_) => renameat(&from_dir, from_name, &to_dir, to_name),
            },
            other => other,
        };
        renamed.map_err(|e| match e {
            Errno::EEXIST | Errno::ENOTEMPTY => FsError::Exists(to.given().to_owned()),
            Errno::ENOENT => FsError::NotFound(from.given().to_owned()),
            e => FsError::from_errno(e, &format!("{} -> {}", from.given(), to.given())),
        })
    }

    /// Deletes `path`: a file or a symlink (the link itself), or a directory when `recursive`.
    ///
    /// # Errors
    /// The root; missing; a directory without `recursive`; aborted between entries.
    pub(crate) fn remove(
        &self,
        path: &WsPath,
        recursive: bool,
        cancel: &CancellationToken,
    ) -> Result<(), FsError> {
        let Some((parent, name)) = self.parent(path, false)? else {
            return Err(FsError::DeleteRoot);
        };
        let stat = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::from_errno(e, path.given()))?;
        if Kind::of_mode(stat.st_mode) != Kind::Dir {
            return unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| FsError::from_errno(e, path.given()));
        }
        if !recursive {
            return Err(FsError::DirectoryNeedsRecursive(path.given().to_owned()));
        }
        remove_tree(&parent, name, path.given(), cancel, 0)
    }

    /// The entries of an open directory, sorted by name (byte order), without `.` and `..`.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub(crate) fn read_dir(dir: &OwnedFd, path: &str) -> Result<Vec<Entry>, FsError> {
        read_dir(dir, path)
    }

    /// Opens the subdirectory `name` of `dir` by name, never through a symlink.
    ///
    /// # Errors
    /// It is gone, or was replaced by something that is not a directory.
    pub(crate) fn open_subdir(dir: &OwnedFd, name: &OsStr, path: &str) -> Result<OwnedFd, FsError> {
        openat(
            dir,
            name,
            OFlag::O_RDONLY
                | OFlag::O_DIRECTORY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::from_errno(e, path))
    }

    /// Opens the regular file `name` of `dir` by name for reading, never through a symlink.
    ///
    /// # Errors
    /// It is gone, a symlink, or not a regular file.
    pub(crate) fn open_file_in(
        dir: &OwnedFd,
        name: &OsStr,
        path: &str,
    ) -> Result<(File, FileStat), FsError> {
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::from_errno(e, path))?;
        let stat = checked_regular(&fd, path)?;
        Ok((File::from(fd), stat))
    }
}

/// `fstat` on an open descriptor: directories and anything but regular files are refused.
fn checked_regular(fd: &OwnedFd, path: &str) -> Result<FileStat, FsError> {
    let stat = fstat(fd).map_err(|e| FsError::from_errno(e, path))?;
    match Kind::of_mode(stat.st_mode) {
        Kind::File => Ok(stat),
        Kind::Dir => Err(FsError::IsADirectory(path.to_owned())),
        Kind::Symlink | Kind::Other => Err(FsError::NotRegular(path.to_owned())),
    }
}

/// Writes `content` into the fresh temporary file `fd`, giving it `mode` first if set.
fn fill(
    fd: OwnedFd,
    mode: Option<Mode>,
    content: &[u8],
    cancel: &CancellationToken,
    path: &str,
) -> Result<(), FsError> {
    if let Some(mode) = mode {
        fchmod(&fd, mode).map_err(|e| FsError::from_errno(e, path))?;
    }
    let mut file = File::from(fd);
    for chunk in content.chunks(WRITE_CHUNK) {
        if cancel.is_cancelled() {
            return Err(FsError::Aborted);
        }
        file.write_all(chunk).map_err(|e| io_error(&e, path))?;
    }
    if cancel.is_cancelled() {
        return Err(FsError::Aborted);
    }
    Ok(())
}

fn read_dir(dir: &OwnedFd, path: &str) -> Result<Vec<Entry>, FsError> {
    let fail = |e| FsError::from_errno(e, path);
    let own = dir.try_clone().map_err(|e| io_error(&e, path))?;
    // A duplicated descriptor shares the read position: start from the top every time.
    nix::unistd::lseek(&own, 0, nix::unistd::Whence::SeekSet).map_err(fail)?;
    let mut handle = Dir::from_fd(own).map_err(fail)?;
    let mut entries = Vec::new();
    for entry in handle.iter() {
        let entry = entry.map_err(fail)?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let kind = match entry.file_type() {
            Some(Type::Directory) => Kind::Dir,
            Some(Type::File) => Kind::File,
            Some(Type::Symlink) => Kind::Symlink,
            Some(_) => Kind::Other,
            // Some file systems do not fill d_type.
            None => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(stat) => Kind::of_mode(stat.st_mode),
                Err(_) => continue,
            },
        };
        entries.push(Entry {
            name: name.to_owned(),
            kind,
        });
    }
    entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(entries)
}

/// Whether anything in the tree under the directory `dir` lies more than `levels` levels below
/// it (an entry directly inside is one level down). Iterative, never through a symlink, and it
/// stops as soon as the answer is yes, so at most `levels + 1` directories are open at once.
fn deeper_than(dir: OwnedFd, levels: usize, path: &str) -> Result<bool, FsError> {
    let subdirs = |entries: Vec<Entry>| -> Vec<OsString> {
        entries
            .into_iter()
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.name)
            .collect()
    };
    let entries = read_dir(&dir, path)?;
    if !entries.is_empty() && levels == 0 {
        return Ok(true);
    }
    // Each level: its handle and the subdirectories still to look into. The entries of the
    // top level lie `stack.len()` levels below `dir`.
    let mut stack = vec![(dir, subdirs(entries))];
    while let Some((top, pending)) = stack.last_mut() {
        let Some(name) = pending.pop() else {
            stack.pop();
            continue;
        };
        let child = match Workspace::open_subdir(top, &name, path) {
            Ok(child) => child,
            // Gone or replaced meanwhile: nothing of it moves as a directory.
            Err(FsError::NotFound(_) | FsError::NotADirectory(_) | FsError::Loop(_)) => continue,
            Err(e) => return Err(e),
        };
        let entries = read_dir(&child, path)?;
        if !entries.is_empty() && stack.len() + 1 > levels {
            return Ok(true);
        }
        stack.push((child, subdirs(entries)));
    }
    Ok(false)
}

/// Removes the directory `name` of `parent` and everything in it, by handle and by name, so a
/// symlink inside is removed as a link and never followed.
fn remove_tree(
    parent: &OwnedFd,
    name: &OsStr,
    path: &str,
    cancel: &CancellationToken,
    depth: usize,
) -> Result<(), FsError> {
    if depth >= MAX_DELETE_DEPTH {
        return Err(FsError::TooDeep(path.to_owned()));
    }
    let dir = Workspace::open_subdir(parent, name, path)?;
    for entry in read_dir(&dir, path)? {
        if cancel.is_cancelled() {
            return Err(FsError::Aborted);
        }
        if entry.kind == Kind::Dir {
            remove_tree(&dir, &entry.name, path, cancel, depth + 1)?;
        } else {
            unlinkat(&dir, entry.name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| FsError::from_errno(e, path))?;
        }
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(|e| FsError::from_errno(e, path))
}

/// A `std::io::Error` as an [`FsError`].
pub(crate) fn io_error(error: &std::io::Error, path: &str) -> FsError {
    match error.raw_os_error() {
        Some(code) => FsError::from_errno(Errno::from_raw(code), path),
        None => FsError::Io {
            path: path.to_owned(),
            errno: Errno::EIO,
        },
    }
}

/// A name for a temporary file that no model would pick.
fn temp_name() -> OsString {
    OsString::from(shared::ids::prefixed_id(".tmp-write-", 12))
}

/// `.` and `..` removed from an absolute path without touching the disk (`..` at `/` stays).
fn normalise_absolute(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_full_disk_or_quota_is_said_so() {
        for errno in [Errno::ENOSPC, Errno::EDQUOT] {
            assert_eq!(
                FsError::from_errno(errno, "big.bin").to_string(),
                "No space left on device: big.bin"
            );
        }
        let f = Fixture::new();
        assert!(!f.ws.is_full(), "a temporary directory on a roomy disk");
    }

    /// A workspace in a fresh temporary directory, with a sibling directory outside it.
    pub(crate) struct Fixture {
        pub(crate) tmp: tempfile::TempDir,
        pub(crate) ws: Workspace,
    }

    impl Fixture {
        pub(crate) fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir(tmp.path().join("ws")).unwrap();
            std::fs::create_dir(tmp.path().join("outside")).unwrap();
            std::fs::write(tmp.path().join("outside/secret.txt"), "secret").unwrap();
            let ws = Workspace::open(&tmp.path().join("ws")).unwrap();
            Self { tmp, ws }
        }

        pub(crate) fn root(&self) -> PathBuf {
            self.tmp.path().join("ws")
        }

        pub(crate) fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        pub(crate) fn write(&self, rel: &str, content: &str) {
            let path = self.root().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }

        pub(crate) fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.root().join(rel)).unwrap()
        }

        pub(crate) fn path(&self, given: &str) -> WsPath {
            self.ws.resolve(given).unwrap()
        }
    }

    fn never() -> CancellationToken {
        CancellationToken::new()
    }

    #[test]
    fn lexical_resolution() {
        let f = Fixture::new();
        assert_eq!(f.path("a/./b/../c.txt").display(), "a/c.txt");
        assert_eq!(f.path("").display(), ".");
        assert_eq!(f.path(".").display(), ".");
        assert!(f.path("./").is_root());
        let inside = f.root().join("x/y.txt");
        assert_eq!(f.path(inside.to_str().unwrap()).display(), "x/y.txt");
        assert!(f.path(f.root().to_str().unwrap()).is_root());
        for bad in ["../x", "a/../../x", "/etc/passwd", "x\0y"] {
            let err = f.ws.resolve(bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Path is outside the workspace: {bad}")
            );
        }
        // A sibling whose name extends the root's is not inside it.
        let sibling = format!("{}2/x", f.root().display());
        assert!(matches!(f.ws.resolve(&sibling), Err(FsError::Outside(_))));
        let climbing = format!("{}/../outside/secret.txt", f.root().display());
        assert!(matches!(f.ws.resolve(&climbing), Err(FsError::Outside(_))));
    }

    #[test]
    fn a_symlink_to_a_file_outside_is_refused_for_reading_and_writing() {
        let f = Fixture::new();
        symlink("/etc/passwd", f.root().join("passwd")).unwrap();
        symlink(f.outside().join("secret.txt"), f.root().join("secret")).unwrap();
        symlink("../outside/secret.txt", f.root().join("relative")).unwrap();
        for name in ["passwd", "secret", "relative"] {
            let err = f.ws.open_file(&f.path(name)).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Path is outside the workspace: {name}")
            );
            let err =
                f.ws.write_atomic(&f.path(name), b"pwned", &never())
                    .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Path is outside the workspace: {name}")
            );
        }
        assert_eq!(
            std::fs::read_to_string(f.outside().join("secret.txt")).unwrap(),
            "secret"
        );
        // Deleting removes the link itself, never its target.
        f.ws.remove(&f.path("secret"), false, &never()).unwrap();
        assert!(f.outside().join("secret.txt").exists());
    }

    #[test]
    fn a_symlinked_directory_outside_is_refused_at_every_depth() {
        let f = Fixture::new();
        symlink(f.outside(), f.root().join("out")).unwrap();
        let err = f.ws.open_file(&f.path("out/secret.txt")).unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        let err = f.ws.open_dir(&f.path("out")).unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        let err =
            f.ws.write_atomic(&f.path("out/new.txt"), b"x", &never())
                .unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        let err = f.ws.create_dir_all(&f.path("out/sub/deeper")).unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        let err =
            f.ws.remove(&f.path("out/secret.txt"), false, &never())
                .unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        f.write("mine.txt", "m");
        let err =
            f.ws.rename_new(&f.path("mine.txt"), &f.path("out/stolen.txt"))
                .unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        let err =
            f.ws.rename_new(&f.path("out/secret.txt"), &f.path("here.txt"))
                .unwrap_err();
        assert!(matches!(err, FsError::Outside(_)), "{err}");
        assert!(!f.outside().join("new.txt").exists());
        assert!(!f.outside().join("sub").exists());
        assert!(!f.outside().join("stolen.txt").exists());
        assert!(f.outside().join("secret.txt").exists());
        // Removing the link recursively must not touch what it points to.
        f.ws.remove(&f.path("out"), true, &never()).unwrap();
        assert!(f.outside().join("secret.txt").exists());
    }

    #[test]
    fn symlinks_that_stay_inside_are_followed_for_reading_only() {
        let f = Fixture::new();
        f.write("dir/real.txt", "real");
        symlink("dir/real.txt", f.root().join("link.txt")).unwrap();
        symlink("dir", f.root().join("dirlink")).unwrap();
        let (mut file, _) = f.ws.open_file(&f.path("link.txt")).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert_eq!(text, "real");
        assert!(f.ws.open_file(&f.path("dirlink/real.txt")).is_ok());
        let err =
            f.ws.write_atomic(&f.path("link.txt"), b"x", &never())
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Refusing to write through a symbolic link: link.txt"
        );
        assert_eq!(f.read("dir/real.txt"), "real");
    }

    #[test]
    fn a_fifo_does_not_block_and_is_refused() {
        let f = Fixture::new();
        nix::unistd::mkfifo(&f.root().join("pipe"), Mode::from_bits_truncate(0o600)).unwrap();
        let err = f.ws.open_file(&f.path("pipe")).unwrap_err();
        assert_eq!(err.to_string(), "Not a regular file: pipe");
        let err =
            f.ws.write_atomic(&f.path("pipe"), b"x", &never())
                .unwrap_err();
        assert_eq!(err.to_string(), "Not a regular file: pipe");
    }

    #[test]
    fn writes_are_atomic_keep_permissions_and_create_parents() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        f.ws.write_atomic(&f.path("a/b/c.txt"), b"one", &never())
            .unwrap();
        assert_eq!(f.read("a/b/c.txt"), "one");
        std::fs::set_permissions(
            f.root().join("a/b/c.txt"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        f.ws.write_atomic(&f.path("a/b/c.txt"), b"two", &never())
            .unwrap();
        assert_eq!(f.read("a/b/c.txt"), "two");
        let mode = std::fs::metadata(f.root().join("a/b/c.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(f.root().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["c.txt"], "no temporary file is left behind");
        let err = f.ws.write_atomic(&f.path("a"), b"x", &never()).unwrap_err();
        assert_eq!(err.to_string(), "Is a directory: a");
        let err = f.ws.write_atomic(&f.path("."), b"x", &never()).unwrap_err();
        assert_eq!(err.to_string(), "Is a directory: .");
        let err =
            f.ws.write_atomic(&f.path("a/b/c.txt/d"), b"x", &never())
                .unwrap_err();
        assert_eq!(err.to_string(), "Not a directory: a/b/c.txt/d");
    }

    #[test]
    fn an_aborted_write_leaves_the_old_file() {
        let f = Fixture::new();
        f.write("keep.txt", "old");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err =
            f.ws.write_atomic(&f.path("keep.txt"), b"new", &cancel)
                .unwrap_err();
        assert!(matches!(err, FsError::Aborted));
        assert_eq!(f.read("keep.txt"), "old");
        assert_eq!(std::fs::read_dir(f.root()).unwrap().count(), 1);
    }

    #[test]
    fn rename_refuses_to_replace() {
        let f = Fixture::new();
        f.write("a.txt", "a");
        f.write("b.txt", "b");
        let err =
            f.ws.rename_new(&f.path("a.txt"), &f.path("b.txt"))
                .unwrap_err();
        assert_eq!(err.to_string(), "Destination already exists: b.txt");
        let err =
            f.ws.rename_new(&f.path("nope.txt"), &f.path("c.txt"))
                .unwrap_err();
        assert_eq!(err.to_string(), "No such file or directory: nope.txt");
        f.ws.rename_new(&f.path("a.txt"), &f.path("new/dir/a.txt"))
            .unwrap();
        assert_eq!(f.read("new/dir/a.txt"), "a");
        let err =
            f.ws.rename_new(&f.path("new"), &f.path("new/x"))
                .unwrap_err();
        assert!(matches!(err, FsError::IntoItself(_)), "{err}");
        let err = f.ws.rename_new(&f.path("."), &f.path("x")).unwrap_err();
        assert_eq!(err.to_string(), "Refusing to move the workspace root");
    }

    #[test]
    fn remove_needs_recursive_for_directories_and_never_the_root() {
        let f = Fixture::new();
        f.write("d/e/f.txt", "x");
        symlink(f.outside(), f.root().join("d/e/out")).unwrap();
        let err = f.ws.remove(&f.path("d"), false, &never()).unwrap_err();
        assert!(err.to_string().starts_with("Is a directory: d"), "{err}");
        f.ws.remove(&f.path("d"), true, &never()).unwrap();
        assert!(!f.root().join("d").exists());
        assert!(f.outside().join("secret.txt").exists());
        let err = f.ws.remove(&f.path("."), true, &never()).unwrap_err();
        assert_eq!(err.to_string(), "Refusing to delete the workspace root");
        let root = f.root();
        let err =
            f.ws.remove(&f.path(root.to_str().unwrap()), true, &never())
                .unwrap_err();
        assert_eq!(err.to_string(), "Refusing to delete the workspace root");
        let err = f.ws.remove(&f.path("gone"), false, &never()).unwrap_err();
        assert_eq!(err.to_string(), "No such file or directory: gone");
    }

    #[test]
    fn read_dir_is_sorted_and_typed() {
        let f = Fixture::new();
        f.write("b.txt", "");
        f.write("A/x", "");
        symlink("b.txt", f.root().join("c")).unwrap();
        let dir = f.ws.open_dir(&f.path(".")).unwrap();
        let entries = Workspace::read_dir(&dir, ".").unwrap();
        let seen: Vec<_> = entries
            .iter()
            .map(|e| (e.name.to_string_lossy().into_owned(), e.kind))
            .collect();
        assert_eq!(
            seen,
            [
                ("A".into(), Kind::Dir),
                ("b.txt".into(), Kind::File),
                ("c".into(), Kind::Symlink)
            ]
        );
        // Reading twice from the same handle gives the same answer.
        assert_eq!(Workspace::read_dir(&dir, ".").unwrap().len(), 3);
    }
}
