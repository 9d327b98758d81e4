//! The worker's filesystem view (at `strict`, and the `chroot` level's): a tmpfs root that
//! holds only the workspace, a private `/tmp`, three device nodes, a fresh `/proc`, and with
//! commands enabled a read-only system root; then `pivot_root` into it and the host tree detached.
//!
//! All targets are relative to the stage (our cwd after [`mount_stage`]), so no host path is
//! looked up once the worker has switched to the session identity, except read-only system
//! paths every user may traverse.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use shared::jail::{JailSpec, WORKSPACE_INSIDE};

use super::{JailError, c_path, cvt, cvt_long};

/// What [`populate`] mounted, for the audit.
pub(crate) struct Mounted {
    /// `subset-pid` or `none`.
    pub proc: String,
    pub points: Vec<String>,
}

fn mount_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Mount { what, source }
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let source = source.map(c_path).transpose()?;
    let target = c_path(target)?;
    let fstype = fstype.map(c_path).transpose()?;
    let data = data.map(c_path).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    cvt(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
    .map(|_| ())
}

/// `mount(NULL, "/", NULL, MS_REC|MS_PRIVATE)`: first of all, because `pivot_root` refuses shared
/// mounts and nothing we mount may propagate back into the host.
pub(crate) fn make_private() -> Result<(), JailError> {
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(mount_err("making / private"))
}

/// Opens a host directory as an `O_PATH` handle without following a final symlink. Used for the
/// workspace before the uid switch: the session uid could not traverse the server's private
/// parent directories, and the handle needs no further lookup.
pub(crate) fn open_host_dir(path: &str, what: &str) -> Result<OwnedFd, JailError> {
    let c = c_path(path).map_err(mount_err(format!("opening the {what}")))?;
    // SAFETY: `c` is a valid path; the returned fd is checked and owned below.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
    .map_err(mount_err(format!("opening the {what} {path}")))?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mounts the tmpfs that becomes the new root on the stage directory and makes it our cwd.
///
/// `owner` (user-namespace mode) makes the inside user own the tmpfs root, so it can create the
/// skeleton once it is that user. The stage is a directory in the server's own state (never `/tmp`,
/// where a predictable name could be swapped for a symlink), and the mount lives only in our
/// namespace.
pub(crate) fn mount_stage(stage: &str, owner: Option<u32>) -> Result<(), JailError> {
    let mut data = "size=1m,mode=0755".to_owned();
    if let Some(id) = owner {
        data.push_str(&format!(",uid={id},gid={id}"));
    }
    mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&data),
    )
    .map_err(mount_err("tmpfs on the stage"))?;
    chdir(stage)
}

fn chdir(path: &str) -> Result<(), JailError> {
    let c = c_path(path).map_err(|source| JailError::Chdir { source })?;
    // SAFETY: `c` is a valid NUL-terminated path.
    cvt(unsafe { libc::chdir(c.as_ptr()) })
        .map(|_| ())
        .map_err(|source| JailError::Chdir { source })
}

/// `mkdir` with exactly `mode` (the session's umask is 077, which would make the skeleton
/// unreadable to anything but the worker's own uid).
fn mkdir(path: &str, mode: libc::mode_t) -> Result<(), JailError> {
    let c = c_path(path).map_err(mount_err(format!("mkdir {path}")))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    match cvt(unsafe { libc::mkdir(c.as_ptr(), mode) }) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(mount_err(format!("mkdir {path}"))(e)),
    }
    // SAFETY: as above.
    cvt(unsafe { libc::chmod(c.as_ptr(), mode) })
        .map(|_| ())
        .map_err(mount_err(format!("chmod {path}")))
}

fn touch(path: &str, mode: libc::mode_t) -> Result<(), JailError> {
    let c = c_path(path).map_err(mount_err(format!("creating {path}")))?;
    // SAFETY: `c` is a valid path; the fd is closed right away.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode,
        )
    })
    .map_err(mount_err(format!("creating {path}")))?;
    // SAFETY: `fd` was just opened by us.
    unsafe { libc::close(fd) };
    Ok(())
}

fn write_file(path: &str, contents: &str) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    touch(path, 0o644)?;
    std::fs::write(path, contents).map_err(mount_err(format!("writing {path}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(mount_err(format!("chmod {path}")))
}

fn symlink(target: &str, link: &str) -> Result<(), JailError> {
    std::os::unix::fs::symlink(target, link).map_err(mount_err(format!("symlink {link}")))
}

/// The per-mount flags a bind remount must keep: inside a user namespace the kernel refuses to
/// clear flags a more privileged namespace set on the source mount (`MNT_LOCK_*`).
fn locked_flags(path: &str) -> std::io::Result<libc::c_ulong> {
    let c = c_path(path)?;
    // SAFETY: statvfs fills the zeroed struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is valid and `st` is writable.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    // Neither relatime nor noatime means strictatime, which a remount must name explicitly
    // (the kernel would otherwise default to relatime and refuse the change).
    if flags & (libc::MS_RELATIME | libc::MS_NOATIME) == 0 {
        flags |= libc::MS_STRICTATIME;
    }
    Ok(flags)
}

/// Bind-mounts `source` on `target`, then remounts the bind with `extra` flags added to the ones
/// it already had.
fn bind(source: &str, target: &str, extra: libc::c_ulong, what: &str) -> Result<(), JailError> {
    mount(
        Some(source),
        target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .map_err(mount_err(format!("binding {what}")))?;
    let kept = locked_flags(target).map_err(mount_err(format!("reading flags of {what}")))?;
    mount(
        None,
        target,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | kept | extra,
        None,
    )
    .map_err(mount_err(format!("remounting {what}")))
}

/// The skeleton on the stage tmpfs, built as the inside user, relative to our cwd (the stage).
///
/// Order inside: workspace, `/tmp`, `/dev`, `/proc` (needs the host `/proc` still visible in
/// this namespace, or the kernel calls the mount "too revealing"), the optional system root, and
/// last the read-only remount of the root itself.
pub(crate) fn populate(workspace: &OwnedFd, spec: &JailSpec) -> Result<Mounted, JailError> {
    let mut points = vec!["/".to_owned()];
    for dir in ["workspace", "tmp", "dev", "proc", "etc"] {
        mkdir(dir, 0o755)?;
    }

    // The workspace, through the handle opened before the uid switch. noexec unless commands
    // are on (they may run scripts and build outputs from the workspace).
    let source = format!("/proc/self/fd/{}", workspace.as_raw_fd());
    let mut ws_flags = libc::MS_NOSUID | libc::MS_NODEV;
    if !spec.system_root {
        ws_flags |= libc::MS_NOEXEC;
    }
    bind(&source, "workspace", ws_flags, "the workspace")?;
    points.push(WORKSPACE_INSIDE.to_owned());

    // A private, sized /tmp (counted in the memory cgroup).
    let data = format!("size={},mode=1777", spec.limits.tmp_size.max(4096));
    mount(
        Some("tmpfs"),
        "tmp",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&data),
    )
    .map_err(mount_err("tmpfs on /tmp"))?;
    points.push("/tmp".to_owned());

    // Three device nodes, bound from the host onto empty files; nothing else in /dev.
    for node in ["null", "zero", "urandom"] {
        let target = format!("dev/{node}");
        touch(&target, 0o666)?;
        bind(
            &format!("/dev/{node}"),
            &target,
            libc::MS_NOSUID | libc::MS_NOEXEC,
            &format!("/dev/{node}"),
        )?;
        points.push(format!("/dev/{node}"));
    }

    // A fresh procfs that shows only our own PID namespace's processes; if the kernel refuses
    // (e.g. masked /proc paths in a container), the worker simply has no /proc.
    let proc = match mount(
        Some("proc"),
        "proc",
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("hidepid=invisible,subset=pid"),
    ) {
        Ok(()) => {
            points.push("/proc".to_owned());
            "subset-pid"
        }
        Err(_) => "none",
    };

    if spec.system_root {
        system_root(&mut points)?;
    }

    // The root itself becomes read-only: nothing can be created beside the mounts.
    mount(
        None,
        ".",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(mount_err("remounting the root read-only"))?;
    Ok(Mounted {
        proc: proc.to_owned(),
        points,
    })
}

/// The read-only system root for commands: `/usr` and the usual symlinks into it, and an `/etc`
/// made of synthetic files plus a few harmless host files. Never the host `/etc` (shadow, keys,
/// service credentials).
fn system_root(points: &mut Vec<String>) -> Result<(), JailError> {
    mkdir("usr", 0o755)?;
    bind(
        "/usr",
        "usr",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        "/usr",
    )?;
    points.push("/usr".to_owned());
    for name in ["bin", "lib", "lib32", "lib64", "libx32", "sbin"] {
        let host = format!("/{name}");
        match std::fs::read_link(&host) {
            // A merged-/usr host: the same link in the jail.
            Ok(target) => {
                if let Some(target) = target.to_str() {
                    symlink(target, name)?;
                }
            }
            // A host that still has a real /bin: bind it read-only as well.
            Err(_) if std::path::Path::new(&host).is_dir() => {
                mkdir(name, 0o755)?;
                bind(
                    &host,
                    name,
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                    &host,
                )?;
                points.push(host);
            }
            Err(_) => {}
        }
    }
    write_file(
        "etc/passwd",
        "root:x:0:0:root:/:/usr/sbin/nologin\nagent:x:1000:1000:agent:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n",
    )?;
    write_file("etc/group", "root:x:0:\nagent:x:1000:\nnogroup:x:65534:\n")?;
    write_file("etc/hosts", "127.0.0.1 localhost sandbox\n::1 localhost\n")?;
    write_file("etc/resolv.conf", "")?;
    for file in ["ld.so.cache", "localtime"] {
        let host = format!("/etc/{file}");
        if std::path::Path::new(&host).is_file() {
            let target = format!("etc/{file}");
            touch(&target, 0o644)?;
            bind(
                &host,
                &target,
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                &host,
            )?;
        }
    }
    if std::path::Path::new("/etc/alternatives").is_dir() {
        mkdir("etc/alternatives", 0o755)?;
        bind(
            "/etc/alternatives",
            "etc/alternatives",
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            "/etc/alternatives",
        )?;
    }
    Ok(())
}

/// `pivot_root(".", ".")`, detach the old root, and prove that it is gone: `..` of `/` is `/`.
///
/// Both arguments equal: the old root ends up stacked on the new one and is detached at once,
/// without needing a put-old directory. Plain `chroot` would be escapable by anyone holding
/// `CAP_SYS_CHROOT`; after `pivot_root` and the detach there is nothing left to escape to.
pub(crate) fn pivot_into_stage() -> Result<(), JailError> {
    let dot = c_path(".").map_err(|source| JailError::PivotRoot { source })?;
    // SAFETY: both arguments are the same valid NUL-terminated path.
    cvt_long(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) })
        .map_err(|source| JailError::PivotRoot { source })?;
    // SAFETY: `dot` is a valid path.
    cvt(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
        .map_err(|source| JailError::DetachOldRoot { source })?;
    chdir("/")?;
    chdir("..")?;
    let cwd = std::env::current_dir().map_err(|source| JailError::Chdir { source })?;
    if cwd != std::path::Path::new("/") {
        return Err(JailError::RootCheck(format!(
            "`..` of the new root is {}",
            cwd.display()
        )));
    }
    if std::path::Path::new("/workspace/..").canonicalize().ok() != Some("/".into()) {
        return Err(JailError::RootCheck("`/workspace/..` is not `/`".into()));
    }
    chdir(WORKSPACE_INSIDE)?;
    let cwd = std::env::current_dir().map_err(|source| JailError::Chdir { source })?;
    if cwd != std::path::Path::new(WORKSPACE_INSIDE) {
        return Err(JailError::RootCheck(format!("cwd is {}", cwd.display())));
    }
    Ok(())
}

/// The mount points of our namespace as the fresh `/proc` shows them (before Landlock hides
/// `/proc`), or the list [`populate`] made when there is no `/proc`.
pub(crate) fn read_mount_table(mounted: &Mounted) -> Vec<String> {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => text
            .lines()
            .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
            .collect(),
        Err(_) => mounted.points.clone(),
    }
}

/// The `chroot` level: `fchdir` to the workspace handle, `chroot(".")`, `chdir("/")`.
pub(crate) fn chroot_into(workspace: &OwnedFd) -> Result<(), JailError> {
    // SAFETY: fchdir on an fd we own.
    cvt(unsafe { libc::fchdir(workspace.as_raw_fd()) })
        .map_err(|source| JailError::Chroot { source })?;
    let dot = c_path(".").map_err(|source| JailError::Chroot { source })?;
    // SAFETY: `dot` is a valid NUL-terminated path.
    cvt(unsafe { libc::chroot(dot.as_ptr()) }).map_err(|source| JailError::Chroot { source })?;
    chdir("/")?;
    chdir("..")?;
    let cwd = std::env::current_dir().map_err(|source| JailError::Chdir { source })?;
    if cwd != std::path::Path::new("/") {
        return Err(JailError::RootCheck(format!(
            "`..` of the chroot is {}",
            cwd.display()
        )));
    }
    Ok(())
}

/// The `chroot` level has no tmpfs: `/tmp` is a private directory inside the workspace.
pub(crate) fn ensure_tmp_dir() {
    let _ = std::fs::DirBuilder::new().create("/tmp");
}
