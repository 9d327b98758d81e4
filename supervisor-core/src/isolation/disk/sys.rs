//! The kernel interfaces behind the disk quotas that neither nix nor rustix wraps: project ids
//! on directories (`FS_IOC_FS{GET,SET}XATTR`), project quotas (`quotactl_fd` with `PRJQUOTA`)
//! and loop devices (`LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`). Each call takes plain integers and
//! a `#[repr(C)]` struct laid out as in the kernel's uapi headers, on descriptors we own.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `PRJQUOTA` from `<linux/quota.h>`.
const PRJQUOTA: libc::c_int = 2;
/// `Q_XGETQSTAT` (`XQM_CMD(5)`): the quota state of a filesystem, XFS-style (ext4 answers too).
const Q_XGETQSTAT: libc::c_int = (('X' as libc::c_int) << 8) + 5;
/// `FS_QUOTA_PDQ_ENFD`: project quota limits are enforced.
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
/// `QIF_BLIMITS | QIF_ILIMITS`.
const QIF_LIMITS: u32 = 1 | 4;
/// Quota block limits are counted in units of this many bytes (`QIF_DQBLKSIZE`).
const QUOTA_BLOCK: u64 = 1024;

/// `FS_XFLAG_PROJINHERIT`: new entries in the directory take its project id.
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
/// `_IOR('X', 31, struct fsxattr)` and `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;

/// `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE` (Linux 5.8) and `LO_FLAGS_AUTOCLEAR`.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `struct fs_qfilestat` and `struct fs_quota_stat` of `<linux/dqblk_xfs.h>`.
#[repr(C)]
#[derive(Default)]
struct FsQfileStat {
    ino: u64,
    nblks: u64,
    nextents: u32,
}

#[repr(C)]
#[derive(Default)]
struct FsQuotaStat {
    version: i8,
    flags: u16,
    pad: i8,
    uquota: FsQfileStat,
    gquota: FsQfileStat,
    incoredqs: u32,
    btimelimit: i32,
    itimelimit: i32,
    rtbtimelimit: i32,
    bwarnlimit: u16,
    iwarnlimit: u16,
}

/// `struct loop_info64` and `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn quotactl_fd(dir: &File, cmd: libc::c_int, id: u32, data: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: quotactl_fd reads or writes the struct `data` points to, whose type matches
    // `cmd` at each call site; `dir` is an open descriptor.
    check(unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            dir.as_raw_fd(),
            cmd as libc::c_uint,
            id as libc::c_int,
            data,
        )
    })
    .map(drop)
}

/// Whether the filesystem holding `dir` enforces project quota limits.
///
/// # Errors
/// The filesystem has no quota support (`ENOSYS`, `ENOTSUP`), or quotas are off for projects
/// (`ESRCH`); the caller reports the reason.
pub fn project_quotas_enforced(dir: &File) -> io::Result<bool> {
    let mut stat = FsQuotaStat {
        version: 1,
        ..FsQuotaStat::default()
    };
    quotactl_fd(
        dir,
        libc::QCMD(Q_XGETQSTAT, PRJQUOTA),
        0,
        (&raw mut stat).cast(),
    )?;
    Ok(stat.flags & FS_QUOTA_PDQ_ENFD != 0)
}

/// The project id of directory `dir` and whether it passes it on to new entries.
///
/// # Errors
/// The ioctl failed (the filesystem has no project ids).
pub fn project_of(dir: &File) -> io::Result<(u32, bool)> {
    let mut attr = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills a struct fsxattr, which `attr` is.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_FSGETXATTR, &raw mut attr) }.into())?;
    Ok((attr.projid, attr.xflags & FS_XFLAG_PROJINHERIT != 0))
}

/// Gives directory `dir` project id `project`, inherited by everything created below it.
///
/// # Errors
/// The ioctl failed (no project ids on this filesystem, or not privileged).
pub fn set_project(dir: &File, project: u32) -> io::Result<()> {
    let mut attr = FsXattr::default();
    // SAFETY: as in `project_of`.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_FSGETXATTR, &raw mut attr) }.into())?;
    attr.projid = project;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: FS_IOC_FSSETXATTR reads a struct fsxattr, which `attr` is.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_FSSETXATTR, &raw const attr) }.into())
        .map(drop)
}

/// Hard (and soft) limits of `bytes` and `inodes` for project `project` on the filesystem of
/// `dir`; zeros remove the limits.
///
/// # Errors
/// `quotactl_fd` failed.
pub fn set_project_limits(dir: &File, project: u32, bytes: u64, inodes: u64) -> io::Result<()> {
    let blocks = bytes.div_ceil(QUOTA_BLOCK);
    // SAFETY: dqblk is plain integers; all-zero is a valid value.
    let mut limits: libc::dqblk = unsafe { std::mem::zeroed() };
    limits.dqb_bhardlimit = blocks;
    limits.dqb_bsoftlimit = blocks;
    limits.dqb_ihardlimit = inodes;
    limits.dqb_isoftlimit = inodes;
    limits.dqb_valid = QIF_LIMITS;
    quotactl_fd(
        dir,
        libc::QCMD(libc::Q_SETQUOTA, PRJQUOTA),
        project,
        (&raw mut limits).cast(),
    )
}

/// A loop device backed by `image`, released by the kernel once nothing uses it any more
/// (autoclear): mount it before the returned descriptor is dropped.
///
/// # Errors
/// `/dev/loop-control` is missing or refused, or configuring failed.
pub fn attach_loop(image: &File, name: &Path) -> io::Result<(OwnedFd, PathBuf)> {
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")?;
    let mut file_name = [0u8; 64];
    let bytes = name.as_os_str().as_encoded_bytes();
    let n = bytes.len().min(63);
    file_name[..n].copy_from_slice(&bytes[..n]);
    // Another process may take the free device between our two calls: then ask again.
    let mut last = io::Error::other("no free loop device");
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) }.into())?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(device) => device,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let config = LoopConfig {
            fd: image.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_AUTOCLEAR,
                file_name,
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which `config` is; its fd is open.
        let configured =
            unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &raw const config) };
        match check(configured.into()) {
            Ok(_) => return Ok((OwnedFd::from(device), path)),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structs must have the kernel's sizes, or the ioctls would read past them.
    #[test]
    fn structs_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<FsQuotaStat>(), 80);
        assert_eq!(std::mem::offset_of!(FsQuotaStat, flags), 2);
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::size_of::<libc::dqblk>(), 72);
        // _IOR/_IOW encode the struct size: 0x1c = 28.
        assert_eq!((FS_IOC_FSGETXATTR >> 16) & 0x3fff, 28);
        assert_eq!((FS_IOC_FSSETXATTR >> 16) & 0x3fff, 28);
    }
}
