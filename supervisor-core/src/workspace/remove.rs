//! Removing a session's workspace directory and everything in it, whatever its shape.
//!
//! Why not `std::fs::remove_dir_all`: it recurses once per directory level and holds a
//! descriptor per level, so a tree some thousands of levels deep (a session builds one with
//! nothing but `create_directory` and `move_file`, or one `mkdir` loop) overflows the stack of
//! the thread running it, which takes the whole server down.
//!
//! How: the tree is flattened as it is removed. A pass over the session directory removes each
//! entry; a directory that is not empty is emptied one level down, and each non-empty
//! subdirectory found there is not descended into but renamed up into the session directory
//! (as `.rm-<n>`), where a later pass over the session directory meets it. No work ever happens
//! more than one level below the session directory, so the stack depth and the number of open
//! descriptors stay constant (at most five), memory is constant, and the work is linear in the
//! number of entries. Everything is reached by entry name from a directory handle opened with
//! `O_NOFOLLOW`: a symlink is removed as a link, never followed; a directory on another
//! filesystem (a mount met inside) is left alone and reported.
//!
//! It blocks: call it on a blocking thread (`spawn_blocking`), never on the async runtime. It
//! needs nothing but the path, so a background task or a janitor can run it later, and a
//! removal interrupted half-way leaves a smaller tree that the next call finishes.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, openat, renameat, renameat2};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmod, fchmodat, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Passes in a row over one directory that remove nothing before the removal gives up (entries
/// that cannot be removed, or that keep appearing).
const STALLED_PASSES: u32 = 3;
/// Where parked directories go: `.rm-<n>` in the session directory.
const PARKED_PREFIX: &str = ".rm-";

/// Why a workspace could not be removed (entirely).
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("{what} in {path}: {errno}")]
    Io {
        what: &'static str,
        path: PathBuf,
        errno: Errno,
    },
    #[error("{path} holds a mount of another filesystem, which was left in place")]
    OtherFilesystem { path: PathBuf },
    #[error("{path} could not be emptied: its entries cannot be removed or keep reappearing")]
    Stalled { path: PathBuf },
}

/// What a removal removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Files, symlinks and other non-directories.
    pub files: u64,
    /// Directories, the session directory included.
    pub directories: u64,
}

/// Removes the directory `path` and everything in it. A missing `path` is not an error; a
/// symlink or file in its place is removed itself (a link is never followed).
///
/// # Errors
/// A system call failed, a mount was met inside, or entries kept reappearing. What could be
/// removed is gone; the rest is left for a later call.
pub fn remove(path: &Path) -> Result<Removed, RemoveError> {
    let fail = |what: &'static str| {
        move |errno| RemoveError::Io {
            what,
            path: path.to_owned(),
            errno,
        }
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(fail("naming the directory")(Errno::EINVAL));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    // The parent is the server's own workspace root; only the last component is the session's.
    let parent = match nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Removed::default()),
        Err(e) => return Err(fail("opening the parent")(e)),
    };
    let mut removed = Removed::default();
    let root = match open_dir(&parent, name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(removed),
        // Not a directory: a file or a symlink in the session's place goes itself.
        Err(Errno::ENOTDIR | Errno::ELOOP) => {
            return match unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    removed.files += 1;
                    Ok(removed)
                }
                Err(Errno::ENOENT) => Ok(removed),
                Err(e) => Err(fail("removing")(e)),
            };
        }
        Err(e) => return Err(fail("opening")(e)),
    };
    let device = fstat(&root).map_err(fail("reading"))?.st_dev;
    let mut removal = Removal {
        root,
        device,
        path,
        parked: 0,
        removed,
    };
    removal.empty(None)?;
    match unlinkat(&parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) => removal.removed.directories += 1,
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(fail("removing")(e)),
    }
    Ok(removal.removed)
}

/// Opens the subdirectory `name` of `dir` for reading, never through a symlink.
fn open_dir(dir: &OwnedFd, name: &(impl nix::NixPath + ?Sized)) -> Result<OwnedFd, Errno> {
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
}

/// One removal in progress.
struct Removal<'a> {
    /// The session directory.
    root: OwnedFd,
    /// Its filesystem: nothing on another one is touched.
    device: u64,
    /// Its path, for errors only.
    path: &'a Path,
    /// Directories parked so far (the next `.rm-<n>` to try).
    parked: u64,
    removed: Removed,
}

impl Removal<'_> {
    fn fail(&self, what: &'static str) -> impl FnOnce(Errno) -> RemoveError + '_ {
        move |errno| RemoveError::Io {
            what,
            path: self.path.to_owned(),
            errno,
        }
    }

    /// Passes over `dir` (the session directory when `None`) until it is empty.
    fn empty(&mut self, dir: Option<&OwnedFd>) -> Result<(), RemoveError> {
        let mut stalled = 0;
        loop {
            let (seen, progress) = self.pass(dir)?;
            if seen == 0 {
                return Ok(());
            }
            if progress {
                stalled = 0;
            } else {
                stalled += 1;
                if stalled >= STALLED_PASSES {
                    return Err(RemoveError::Stalled {
                        path: self.path.to_owned(),
                    });
                }
            }
        }
    }

    /// One pass over the entries of `dir` (the session directory when `None`): files and
    /// links are unlinked, empty directories removed; a non-empty directory is emptied and
    /// removed when it sits in the session directory, and parked there otherwise. Returns how
    /// many entries the pass met and whether it removed or moved anything.
    fn pass(&mut self, dir: Option<&OwnedFd>) -> Result<(u64, bool), RemoveError> {
        let at_root = dir.is_none();
        // A descriptor of its own for the listing, so its read position is independent.
        let listing = {
            let target = dir.unwrap_or(&self.root);
            openat(
                target,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(self.fail("listing"))?
        };
        let mut stream = Dir::from_fd(listing).map_err(self.fail("listing"))?;
        let (mut seen, mut progress) = (0u64, false);
        for entry in stream.iter() {
            let entry = entry.map_err(self.fail("listing"))?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            seen += 1;
            let target = dir.unwrap_or(&self.root);
            let is_dir = match entry.file_type() {
                Some(Type::Directory) => true,
                Some(_) => false,
                // Some filesystems do not fill in the type.
                None => match fstatat(target, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(stat) => stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits(),
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(self.fail("inspecting")(e)),
                },
            };
            if !is_dir {
                match unlinkat(target, name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => {
                        self.removed.files += 1;
                        progress = true;
                    }
                    // Gone already, or replaced by a directory: the next pass sees it again.
                    Err(Errno::ENOENT | Errno::EISDIR) => {}
                    Err(e) => return Err(self.fail("removing a file")(e)),
                }
                continue;
            }
            match unlinkat(target, name, UnlinkatFlags::RemoveDir) {
                Ok(()) => {
                    self.removed.directories += 1;
                    progress = true;
                }
                Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                Err(Errno::ENOTEMPTY | Errno::EEXIST) if at_root => {
                    self.empty_child(name)?;
                    progress = true;
                }
                Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
                    if let Some(dir) = dir {
                        self.park(dir, name)?;
                    }
                    progress = true;
                }
                // A mount point.
                Err(Errno::EBUSY) => {
                    return Err(RemoveError::OtherFilesystem {
                        path: self.path.to_owned(),
                    });
                }
                Err(e) => return Err(self.fail("removing a directory")(e)),
            }
        }
        Ok((seen, progress))
    }

    /// Empties the non-empty directory `name` of the session directory (its own non-empty
    /// subdirectories are parked), then removes it. If entries appear meanwhile it stays, and
    /// the next pass over the session directory meets it again.
    fn empty_child(&mut self, name: &CStr) -> Result<(), RemoveError> {
        let child = match self.open_child(name)? {
            Some(child) => child,
            None => return Ok(()),
        };
        self.empty(Some(&child))?;
        drop(child);
        match unlinkat(&self.root, name, UnlinkatFlags::RemoveDir) {
            Ok(()) => self.removed.directories += 1,
            Err(Errno::ENOENT | Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR) => {}
            Err(e) => return Err(self.fail("removing a directory")(e)),
        }
        Ok(())
    }

    /// Opens the directory `name` of the session directory to empty it: never through a
    /// symlink, never onto another filesystem, and made writable when the server owns it but
    /// a session took its permissions away (rootless mode; root needs no permission).
    fn open_child(&self, name: &CStr) -> Result<Option<OwnedFd>, RemoveError> {
        let child = match open_dir(&self.root, name) {
            Ok(fd) => fd,
            // Gone, or replaced by something else: the next pass deals with what is there.
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
            Err(Errno::EACCES) => {
                self.grant(name)?;
                match open_dir(&self.root, name) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
                    Err(e) => return Err(self.fail("opening a directory")(e)),
                }
            }
            Err(e) => return Err(self.fail("opening a directory")(e)),
        };
        let stat = fstat(&child).map_err(self.fail("inspecting a directory"))?;
        if stat.st_dev != self.device {
            return Err(RemoveError::OtherFilesystem {
                path: self.path.to_owned(),
            });
        }
        // Unlinking inside needs write and search permission on the directory itself.
        if stat.st_uid == nix::unistd::geteuid().as_raw() && stat.st_mode & 0o300 != 0o300 {
            fchmod(&child, Mode::from_bits_truncate(0o700)).map_err(self.fail("chmod"))?;
        }
        Ok(Some(child))
    }

    /// Gives the server read, write and search permission on the directory `name` of the
    /// session directory, which it owns but cannot open. The change goes through an `O_PATH`
    /// handle of that very directory (opened without following a symlink), so a swap between
    /// the look and the change cannot redirect it.
    fn grant(&self, name: &CStr) -> Result<(), RemoveError> {
        let handle = openat(
            &self.root,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.fail("opening a directory"))?;
        let by_handle = format!("/proc/self/fd/{}", handle.as_raw_fd());
        fchmodat(
            nix::fcntl::AT_FDCWD,
            by_handle.as_str(),
            Mode::from_bits_truncate(0o700),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(self.fail("chmod"))
    }

    /// Moves the non-empty directory `name` of `dir` up into the session directory under a
    /// fresh `.rm-<n>` name, for a later pass there to empty.
    fn park(&mut self, dir: &OwnedFd, name: &CStr) -> Result<(), RemoveError> {
        loop {
            let parked = format!("{PARKED_PREFIX}{}", self.parked);
            self.parked += 1;
            let moved = match renameat2(
                dir,
                name,
                &self.root,
                parked.as_str(),
                RenameFlags::RENAME_NOREPLACE,
            ) {
                // A filesystem without RENAME_NOREPLACE: look, then rename. Nothing else
                // writes to a workspace being removed (its worker is stopped first).
                Err(Errno::EINVAL) => {
                    match fstatat(&self.root, parked.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                        Ok(_) => Err(Errno::EEXIST),
                        Err(_) => renameat(dir, name, &self.root, parked.as_str()),
                    }
                }
                other => other,
            };
            match moved {
                Ok(()) | Err(Errno::ENOENT) => return Ok(()),
                // The name is taken (a session may have used it): try the next.
                Err(Errno::EEXIST | Errno::ENOTEMPTY) => {}
                // A mount point cannot be moved.
                Err(Errno::EBUSY | Errno::EXDEV) => {
                    return Err(RemoveError::OtherFilesystem {
                        path: self.path.to_owned(),
                    });
                }
                Err(e) => return Err(self.fail("moving a directory")(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// Builds `levels` nested directories named `name` under `dir`, handle to handle (the path
    /// would exceed PATH_MAX), with a file at the bottom.
    fn deep(dir: &Path, name: &str, levels: usize) {
        let mut current =
            nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..levels {
            nix::sys::stat::mkdirat(&current, name, Mode::S_IRWXU).unwrap();
            current = open_dir(&current, name).unwrap();
        }
        let file = openat(
            &current,
            "bottom",
            OFlag::O_CREAT | OFlag::O_WRONLY,
            Mode::S_IRUSR,
        )
        .unwrap();
        drop(file);
    }

    /// A scratch directory, in memory where possible: removing many directories from a disk
    /// filesystem mounted with `discard` waits on the device for each.
    fn scratch() -> tempfile::TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir()
            && let Ok(dir) = tempfile::tempdir_in(shm)
        {
            return dir;
        }
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn removes_a_tree_deeper_than_any_stack() {
        let tmp = scratch();
        let ws = tmp.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        deep(&ws, "d", 20_000);
        // Run on a small stack: the removal must not need one frame per level.
        let path = ws.clone();
        let removed = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || remove(&path))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!ws.exists());
        assert_eq!(
            removed,
            Removed {
                files: 1,
                directories: 20_001
            }
        );
    }

    #[test]
    fn long_names_and_wide_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        let long = "n".repeat(255);
        deep(&ws, &long, 50);
        let wide = ws.join("wide");
        std::fs::create_dir(&wide).unwrap();
        for i in 0..2_000 {
            std::fs::write(wide.join(format!("{i}-{}", "x".repeat(240))), "").unwrap();
            if i % 100 == 0 {
                std::fs::create_dir_all(wide.join(format!("sub{i}/a/b"))).unwrap();
            }
        }
        let removed = remove(&ws).unwrap();
        assert!(!ws.exists());
        assert_eq!(removed.files, 2_001);
    }

    #[test]
    fn symlinks_are_removed_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("keep")).unwrap();
        std::fs::write(outside.join("keep/file"), "host").unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(ws.join("a/b")).unwrap();
        symlink(&outside, ws.join("out")).unwrap();
        symlink(&outside, ws.join("a/b/out")).unwrap();
        symlink("/", ws.join("a/root")).unwrap();
        remove(&ws).unwrap();
        assert!(!ws.exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("keep/file")).unwrap(),
            "host"
        );

        // A symlink in the session directory's own place is removed as a link.
        let link = tmp.path().join("link");
        symlink(&outside, &link).unwrap();
        assert_eq!(remove(&link).unwrap().files, 1);
        assert!(outside.join("keep/file").exists());
        assert!(std::fs::symlink_metadata(&link).is_err());
    }

    #[test]
    fn parked_names_taken_by_the_session_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(ws.join(".rm-0/x/y")).unwrap();
        std::fs::create_dir_all(ws.join("a/b/c/d")).unwrap();
        std::fs::write(ws.join(".rm-1"), "a file").unwrap();
        remove(&ws).unwrap();
        assert!(!ws.exists());
    }

    #[test]
    fn missing_is_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            remove(&tmp.path().join("none")).unwrap(),
            Removed::default()
        );
    }

    #[test]
    fn directories_without_permissions_are_emptied() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(ws.join("locked/inner")).unwrap();
        std::fs::write(ws.join("locked/inner/f"), "").unwrap();
        std::fs::set_permissions(ws.join("locked/inner"), PermissionsExt::from_mode(0o000))
            .unwrap();
        std::fs::set_permissions(ws.join("locked"), PermissionsExt::from_mode(0o500)).unwrap();
        remove(&ws).unwrap();
        assert!(!ws.exists());
    }

    #[test]
    fn a_mount_inside_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let mnt = ws.join("a/mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted = nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        );
        if mounted.is_err() {
            println!("SKIP: mounting a tmpfs needs CAP_SYS_ADMIN");
            return;
        }
        std::fs::write(mnt.join("kept"), "on another filesystem").unwrap();
        let outcome = remove(&ws);
        let kept = mnt.join("kept").exists();
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(
            matches!(outcome, Err(RemoveError::OtherFilesystem { .. })),
            "{outcome:?}"
        );
        assert!(kept, "a file on the mounted filesystem was removed");
    }
}
