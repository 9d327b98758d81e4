//! The image backend: each session's workspace is an ext4 filesystem of its own, in a sparse
//! file `<root>/.disk/<session>.img` loop-mounted on the workspace directory. The filesystem's
//! size is the quota, so a full workspace is `ENOSPC` from the kernel, whoever writes; inodes
//! are bounded by the format. The image grows only as the session writes, and it is mounted
//! with `discard`, so deleted files give their space back to the host.
//!
//! Formatting (about 10 ms, an exec of `mkfs.ext4`) and mounting (about 5-15 ms) would add to
//! every session's creation, so a background thread keeps two formatted images mounted under
//! `<root>/.disk/pool/`. A new session takes one: a rename of the image and a `MS_MOVE` of its
//! mount onto the workspace, some tens of microseconds. `pool/` is a private mount, because the
//! kernel refuses to move a mount out of a shared parent (systemd makes `/` shared). When the
//! pool is empty the session pays for a fresh image itself.
//!
//! Mounts live in the host's mount namespace: operators see the workspaces where they always
//! were, a restarted server finds them mounted and keeps using them, and after a reboot each
//! session's image is mounted again before its first use. A deleted session's mount is
//! detached and its image removed.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use nix::mount::{MntFlags, MsFlags};
use shared::ids::SessionId;

use super::sys;

/// Images kept formatted and mounted, ready for new sessions.
const POOL_SIZE: usize = 2;
/// Where `mkfs.ext4` may be (the supervisor's `PATH` often lacks the sbin directories).
const MKFS: [&str; 4] = [
    "/usr/sbin/mkfs.ext4",
    "/sbin/mkfs.ext4",
    "/usr/bin/mkfs.ext4",
    "/bin/mkfs.ext4",
];
/// `noinit_itable`: the inode tables of a fresh sparse file already read as zeros, so the
/// kernel's background zeroing would only allocate them on the host.
const MOUNT_OPTIONS: &str = "noinit_itable,discard";

/// The shape of an image for a quota of `limit` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the sparse file.
    pub size: u64,
    /// Inodes (files and directories) the filesystem can hold: one per KiB of quota.
    pub inodes: u64,
    pub journal_mib: u64,
}

impl Geometry {
    /// The file is larger than the quota by what the filesystem keeps for itself (inode
    /// tables, journal, bitmaps), so that about `limit` bytes are free for files.
    pub fn for_limit(limit: u64) -> Self {
        const MIB: u64 = 1024 * 1024;
        let inodes = (limit / 1024).max(4096);
        let journal_mib = (limit / MIB / 256).clamp(4, 64);
        let size = limit + inodes * 256 + journal_mib * MIB + limit / 32;
        Self {
            size: size.next_multiple_of(4096),
            inodes,
            journal_mib,
        }
    }
}

struct Pooled {
    image: PathBuf,
    mount: PathBuf,
}

/// Why images cannot be used for the workspaces.
#[derive(Debug, thiserror::Error)]
pub enum ImagesUnavailable {
    #[error("mkfs.ext4 was not found (install e2fsprogs)")]
    NoMkfs,
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot bind-mount {path}: {source}")]
    Bind { path: PathBuf, source: nix::Error },
    #[error("cannot make {path} private: {source}")]
    Private { path: PathBuf, source: nix::Error },
    /// The first pooled image could not be made: loop devices, ext4 or the mount failed.
    #[error("{0}")]
    FirstImage(io::Error),
    #[error("cannot start the image thread: {0}")]
    Thread(io::Error),
}

pub struct Images {
    dir: PathBuf,
    pool_dir: PathBuf,
    geometry: Geometry,
    mkfs: PathBuf,
    pool: Mutex<VecDeque<Pooled>>,
    next: AtomicU64,
    stopped: AtomicBool,
    refill: Mutex<Option<mpsc::Sender<()>>>,
    /// The image thread, joined at shutdown so that no image it is making outlives the pool.
    filler: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held while a workspace is checked and mounted again: two mounts of one image (through
    /// two loop devices) would corrupt it.
    remount: Mutex<()>,
}

fn mkdir_private(path: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let own = std::fs::symlink_metadata(path)?;
    let parent = std::fs::metadata(path.join(".."))?;
    Ok(own.is_dir() && own.dev() != parent.dev())
}

/// Mount points listed in /proc/self/mountinfo (with its octal escapes undone).
fn mount_points() -> Vec<PathBuf> {
    let unescape = |field: &str| {
        let mut out = Vec::with_capacity(field.len());
        let bytes = field.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'\\'
                && i + 3 < bytes.len()
                && let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8)
            {
                out.push(code);
                i += 4;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        PathBuf::from(std::ffi::OsString::from(
            String::from_utf8_lossy(&out).into_owned(),
        ))
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape))
        .collect()
}

fn detach(path: &Path) -> io::Result<()> {
    nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

impl Images {
    /// Prepares `<root>/.disk`, clears what a previous run left in its pool, and builds the
    /// first pooled image right away: that is the probe (a host without loop devices, ext4 or
    /// `mkfs.ext4`, or a server without `CAP_SYS_ADMIN`, fails here and says which).
    ///
    /// # Errors
    /// Why images cannot be used here.
    pub fn prepare(root: &Path, limit: u64) -> Result<Arc<Self>, ImagesUnavailable> {
        let mkfs = MKFS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or(ImagesUnavailable::NoMkfs)?;
        let dir = root.join(".disk");
        let pool_dir = dir.join("pool");
        for d in [&dir, &pool_dir] {
            mkdir_private(d).map_err(|source| ImagesUnavailable::Create {
                path: d.clone(),
                source,
            })?;
        }
        let mounted = mount_points();
        for stale in mounted.iter().filter(|m| m.parent() == Some(&pool_dir)) {
            let _ = detach(stale);
        }
        if let Ok(entries) = std::fs::read_dir(&pool_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("pool-") && name.ends_with(".img") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // A mount can only be moved out of a private parent.
        if !mounted.contains(&pool_dir) {
            nix::mount::mount(
                Some(&pool_dir),
                &pool_dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|source| ImagesUnavailable::Bind {
                path: pool_dir.clone(),
                source,
            })?;
        }
        nix::mount::mount(
            None::<&str>,
            &pool_dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|source| ImagesUnavailable::Private {
            path: pool_dir.clone(),
            source,
        })?;
        let images = Arc::new(Self {
            dir,
            pool_dir,
            geometry: Geometry::for_limit(limit),
            mkfs,
            pool: Mutex::default(),
            next: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            refill: Mutex::default(),
            filler: Mutex::default(),
            remount: Mutex::default(),
        });
        // A server that cannot use images leaves nothing mounted.
        let first = images.pooled().map_err(|e| {
            let _ = detach(&images.pool_dir);
            ImagesUnavailable::FirstImage(e)
        })?;
        images.lock_pool().push_back(first);
        let (tx, rx) = mpsc::channel();
        *images.refill.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        let filler = images.clone();
        let thread = std::thread::Builder::new()
            .name("disk-images".into())
            .spawn(move || {
                filler.fill();
                while rx.recv().is_ok() {
                    filler.fill();
                }
            })
            .map_err(|e| {
                images.shutdown();
                ImagesUnavailable::Thread(e)
            })?;
        *images.filler.lock().unwrap_or_else(PoisonError::into_inner) = Some(thread);
        Ok(images)
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, VecDeque<Pooled>> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Tops the pool up (image thread).
    fn fill(&self) {
        while !self.stopped.load(Ordering::Acquire) && self.lock_pool().len() < POOL_SIZE {
            match self.pooled() {
                Ok(pooled) => self.lock_pool().push_back(pooled),
                Err(e) => {
                    tracing::warn!(error = %e, "could not prepare a workspace image");
                    return;
                }
            }
        }
    }

    /// A formatted image mounted under `pool/`.
    fn pooled(&self) -> io::Result<Pooled> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let image = self.dir.join(format!("pool-{n}.img"));
        let mount = self.pool_dir.join(n.to_string());
        self.format(&image)?;
        let mounted = mkdir_private(&mount).and_then(|()| self.mount_fresh(&image, &mount));
        if let Err(e) = mounted {
            let _ = std::fs::remove_dir(&mount);
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        Ok(Pooled { image, mount })
    }

    /// A sparse file of the pool's geometry, formatted.
    fn format(&self, image: &Path) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)?;
        file.set_len(self.geometry.size)?;
        drop(file);
        let g = self.geometry;
        let out = Command::new(&self.mkfs)
            .args(["-q", "-F", "-b", "4096", "-m", "0"])
            .args(["-N", &g.inodes.to_string()])
            .args(["-J", &format!("size={}", g.journal_mib)])
            // The file is new and sparse: every block already reads as zero.
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg(image)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(()),
            other => {
                let _ = std::fs::remove_file(image);
                Err(io::Error::other(match other {
                    Ok(out) => format!(
                        "mkfs.ext4 failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    Err(e) => format!("cannot run mkfs.ext4: {e}"),
                }))
            }
        }
    }

    /// Mounts `image` on `target` through a loop device.
    fn mount(&self, image: &Path, target: &Path) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(image)?;
        let (device, path) = sys::attach_loop(&file, image)?;
        nix::mount::mount(
            Some(&path),
            target,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(MOUNT_OPTIONS),
        )
        .map_err(|e| io::Error::other(format!("mounting {}: {e}", image.display())))?;
        // The mount holds the device now; with autoclear it goes when the mount does.
        drop(device);
        Ok(())
    }

    /// Mounts a freshly formatted image and makes its root look like a new workspace: private,
    /// and without the `lost+found` that mkfs leaves (e2fsck makes one again if it needs it).
    fn mount_fresh(&self, image: &Path, target: &Path) -> io::Result<()> {
        self.mount(image, target)?;
        let _ = std::fs::remove_dir(target.join("lost+found"));
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))
    }

    fn image_of(&self, session: &SessionId) -> PathBuf {
        self.dir.join(format!("{session}.img"))
    }

    /// Gives the new, empty workspace directory of `session` its image.
    ///
    /// # Errors
    /// No image could be formatted or mounted.
    pub fn attach_new(&self, session: &SessionId, workspace: &Path) -> io::Result<()> {
        let pooled = self.lock_pool().pop_front();
        if let Some(sender) = self
            .refill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = sender.send(());
        }
        let image = self.image_of(session);
        let Some(pooled) = pooled else {
            self.format(&image)?;
            return self.mount_fresh(&image, workspace).inspect_err(|_| {
                let _ = std::fs::remove_file(&image);
            });
        };
        std::fs::rename(&pooled.image, &image)?;
        let moved = nix::mount::mount(
            Some(&pooled.mount),
            workspace,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        );
        if let Err(e) = moved {
            tracing::warn!(error = %e, "could not move a pooled workspace image; mounting it again");
            let _ = detach(&pooled.mount);
            let _ = std::fs::remove_dir(&pooled.mount);
            return self.mount(&image, workspace);
        }
        let _ = std::fs::remove_dir(&pooled.mount);
        Ok(())
    }

    /// Before a worker uses `workspace`: mounted already (the usual case, one `stat` each of it
    /// and its parent), mounted again from its image (after a reboot), or given a new image if
    /// it has none and is empty (a session stored before this backend was in force). `false`
    /// for a workspace that has files but no image: it stays as it is, without a quota.
    ///
    /// # Errors
    /// Mounting failed.
    pub fn ensure(&self, session: &SessionId, workspace: &Path) -> io::Result<bool> {
        let _one_at_a_time = self.remount.lock().unwrap_or_else(PoisonError::into_inner);
        if is_mount_point(workspace)? {
            return Ok(true);
        }
        let image = self.image_of(session);
        if image.is_file() {
            self.mount(&image, workspace)?;
            return Ok(true);
        }
        if std::fs::read_dir(workspace)?.next().is_some() {
            return Ok(false);
        }
        self.attach_new(session, workspace)?;
        Ok(true)
    }

    /// A deleted session's image: its mount is detached (whatever still holds it lets go
    /// later) and its file removed. The workspace directory is left, empty, for the caller.
    pub fn release(&self, session: &SessionId, workspace: &Path) {
        if is_mount_point(workspace).unwrap_or(false)
            && let Err(e) = detach(workspace)
        {
            tracing::warn!(session_id = %session, error = %e, "could not unmount the workspace image");
        }
        match std::fs::remove_file(self.image_of(session)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(session_id = %session, error = %e, "could not remove the workspace image");
            }
            _ => {}
        }
    }

    /// At shutdown, or when the server gives up starting: the pool goes, with the image the
    /// image thread may be making right then, and the pool directory's own mount. Session
    /// mounts stay, for the next start to use.
    pub fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        *self.refill.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let filler = self
            .filler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(filler) = filler {
            let _ = filler.join();
        }
        for pooled in self.lock_pool().drain(..) {
            let _ = detach(&pooled.mount);
            let _ = std::fs::remove_dir(&pooled.mount);
            let _ = std::fs::remove_file(&pooled.image);
        }
        if mount_points().contains(&self.pool_dir) {
            let _ = detach(&self.pool_dir);
        }
    }
}

/// Opens `path` as a directory without following a symlink in its last component.
pub(super) fn open_dir(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_holds_its_quota_and_some_room_for_itself() {
        const MIB: u64 = 1024 * 1024;
        let g = Geometry::for_limit(2048 * MIB);
        assert_eq!(g.inodes, 2 * 1024 * 1024);
        assert_eq!(g.journal_mib, 8);
        assert!(
            g.size > 2048 * MIB && g.size < 2048 * MIB * 13 / 10,
            "{g:?}"
        );
        let small = Geometry::for_limit(64 * MIB);
        assert_eq!(small.journal_mib, 4);
        assert_eq!(small.size % 4096, 0);
    }
}
