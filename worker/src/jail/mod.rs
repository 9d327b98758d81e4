//! The jail: every kernel mechanism a session's worker is confined with, and the order they are
//! applied in. This file alone decides that order ([`enter_strict`], [`enter_chroot`],
//! [`enter_none`]); each step lives in the module named after its mechanism and says there why
//! it sits where it does.
//!
//! Everything here runs single-threaded, before tokio or any other thread exists: `CLONE_NEWUSER`
//! refuses multithreaded callers, and Landlock and seccomp only confine the calling thread (and
//! the threads it creates afterwards).
//!
//! The launcher side of `strict` (clone, uid maps, the monitor) is in `crate::launcher`.

pub(crate) mod audit;
pub(crate) mod checks;
pub(crate) mod fds;
mod landlock;
mod mounts;
pub(crate) mod namespaces;
pub(crate) mod privileges;
mod rlimits;
pub mod seccomp;

use std::ffi::CString;
use std::os::fd::OwnedFd;

use shared::jail::{JailAudit, JailFailure, JailLevel, JailLimits, JailSpec, WORKSPACE_INSIDE};

/// A jail step that failed. Each variant names the step, so the supervisor's error event says
/// what went wrong (`SANDBOX_SETUP_FAILED` with the step name).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("fd hygiene: {0}")]
    Fds(String),
    #[error("environment: {0}")]
    Environment(String),
    #[error("clone into new namespaces: {source}")]
    Clone { source: std::io::Error },
    #[error("user namespace: writing {file} failed: {source}")]
    UidMap {
        file: &'static str,
        source: std::io::Error,
    },
    #[error("user namespace: the launcher went away before the maps were written")]
    Released,
    #[error("switching to uid/gid {id}: {source}")]
    SetIds { id: u32, source: std::io::Error },
    #[error("mount namespace: {what}: {source}")]
    Mount {
        what: String,
        source: std::io::Error,
    },
    #[error("pivot_root: {source}")]
    PivotRoot { source: std::io::Error },
    #[error("detaching the old root: {source}")]
    DetachOldRoot { source: std::io::Error },
    #[error("new root check failed: {0}")]
    RootCheck(String),
    #[error("chroot into the workspace: {source}")]
    Chroot { source: std::io::Error },
    #[error("hostname: {source}")]
    Hostname { source: std::io::Error },
    #[error("capabilities: {0}")]
    Capabilities(String),
    #[error("no_new_privs: {source}")]
    NoNewPrivs { source: std::io::Error },
    #[error("non-dumpable: {source}")]
    Dumpable { source: std::io::Error },
    #[error("parent-death signal: {0}")]
    DeathSignal(String),
    #[error("rlimit {resource}: {source}")]
    Rlimit {
        resource: &'static str,
        source: std::io::Error,
    },
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("working directory: {source}")]
    Chdir { source: std::io::Error },
}

impl JailError {
    /// Short name of the failed step, as the probe report and the session error show it.
    pub fn step(&self) -> &'static str {
        match self {
            Self::Fds(_) => "fd hygiene",
            Self::Environment(_) => "environment",
            Self::Clone { .. } => "clone",
            Self::UidMap { .. } | Self::Released => "user namespace",
            Self::SetIds { .. } => "uid switch",
            Self::Mount { .. } => "mounts",
            Self::PivotRoot { .. } => "pivot_root",
            Self::DetachOldRoot { .. } => "detach old root",
            Self::RootCheck(_) => "root check",
            Self::Chroot { .. } => "chroot",
            Self::Hostname { .. } => "hostname",
            Self::Capabilities(_) => "capabilities",
            Self::NoNewPrivs { .. } => "no_new_privs",
            Self::Dumpable { .. } => "dumpable",
            Self::DeathSignal(_) => "parent-death signal",
            Self::Rlimit { .. } => "rlimits",
            Self::Landlock(_) => "landlock",
            Self::Seccomp(_) => "seccomp",
            Self::Chdir { .. } => "chdir",
        }
    }

    /// The errno behind the failure, 0 when it was a check rather than a syscall.
    pub fn errno(&self) -> i32 {
        let source = match self {
            Self::Clone { source }
            | Self::UidMap { source, .. }
            | Self::SetIds { source, .. }
            | Self::Mount { source, .. }
            | Self::PivotRoot { source }
            | Self::DetachOldRoot { source }
            | Self::Chroot { source }
            | Self::Hostname { source }
            | Self::NoNewPrivs { source }
            | Self::Dumpable { source }
            | Self::Rlimit { source, .. }
            | Self::Chdir { source } => source,
            _ => return 0,
        };
        source.raw_os_error().unwrap_or(0)
    }

    pub fn to_failure(&self) -> JailFailure {
        JailFailure {
            step: self.step().to_owned(),
            errno: self.errno(),
            message: self.to_string(),
        }
    }
}

/// The outcome of a completed jail: what the worker reports with `Jailed`.
pub struct Jailed {
    pub audit: JailAudit,
}

/// What the steps learn along the way and the audit reports at the end.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub namespaces: Vec<String>,
    pub root: String,
    pub proc: String,
    pub mounts: Vec<String>,
    /// `uid_map` lines `(inside, outside, count)`, read while the host `/proc` was still visible.
    pub uid_map: Vec<(u32, u32, u32)>,
    pub landlock_abi: i32,
    pub landlock: String,
}

/// What the finished jail means for the tools, handed to the agent as a value taken from the
/// jail spec: the limits their messages name, and whether programs can run at all.
#[derive(Debug, Clone)]
pub(crate) struct Confinement {
    /// `command_timeout` caps `run_command`; the memory, CPU-time and disk limits are named when
    /// a command or a write runs into them.
    pub(crate) limits: JailLimits,
    /// Whether the jail has the read-only system root programs need (`strict` with
    /// `isolation.commands`): `run_command` is offered only then.
    pub(crate) commands: bool,
}

impl Confinement {
    /// The confinement `spec` builds.
    pub(crate) fn of(spec: &JailSpec) -> Self {
        Self {
            limits: spec.limits.clone(),
            commands: spec.system_root && spec.level == JailLevel::Strict,
        }
    }

    /// No jail at all: what the unit tests run with (no limit below the tools' own maximums,
    /// no quota, no commands).
    #[cfg(test)]
    pub(crate) fn unconfined() -> Self {
        Self {
            limits: JailLimits {
                address_space: u64::MAX,
                processes: u64::MAX,
                open_files: u64::MAX,
                file_size: u64::MAX,
                cpu_seconds: u64::MAX,
                tmp_size: 0,
                command_timeout: u64::MAX,
                memory_cgroup: None,
                disk: None,
            },
            commands: false,
        }
    }
}

/// Returns `rc` as an `io::Result`, reading errno for `-1`.
pub(crate) fn cvt(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Returns a raw `syscall(2)` result as an `io::Result`.
pub(crate) fn cvt_long(rc: libc::c_long) -> std::io::Result<libc::c_long> {
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A path as a C string; our paths never contain NUL (they come from the supervisor or are
/// literals), but a bad one is an error, not a panic.
pub(crate) fn c_path(path: &str) -> std::io::Result<CString> {
    CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// The environment of a session at `level` (`workspace` is the host path, used as `HOME` at
/// `none`): the only variables a worker, and every program it runs, ever sees.
pub(crate) fn environment(level: JailLevel, workspace: &str) -> [(&'static str, String); 5] {
    let home = match level {
        JailLevel::Strict => WORKSPACE_INSIDE.to_owned(),
        JailLevel::Chroot => "/".to_owned(),
        JailLevel::None => workspace.to_owned(),
    };
    [
        ("PATH", "/usr/bin:/bin".to_owned()),
        ("HOME", home),
        ("TMPDIR", "/tmp".to_owned()),
        ("LANG", "C.UTF-8".to_owned()),
        ("USER", "agent".to_owned()),
    ]
}

/// The environment holds exactly the variables of [`environment`], and `umask` is private.
///
/// Runs in the launcher before the clone, so every process of the session inherits it. The
/// environment is already empty (the self-check made sure); this makes the list explicit.
pub(crate) fn set_environment(level: JailLevel, workspace: &str) -> Result<(), JailError> {
    let vars = environment(level, workspace);
    for (key, _) in std::env::vars_os() {
        // SAFETY: the launcher is single-threaded at this point (self-checked), so nothing can
        // read the environment concurrently.
        unsafe { std::env::remove_var(key) };
    }
    for (key, value) in &vars {
        // SAFETY: as above, single-threaded.
        unsafe { std::env::set_var(key, value) };
    }
    if std::env::vars_os().count() != vars.len() {
        return Err(JailError::Environment(
            "environment is not exactly the session's list".into(),
        ));
    }
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    Ok(())
}

/// The worker side of `strict`, in the new namespaces. `release` is the
/// read end of the launcher's pipe: a byte on it means the uid maps are written, EOF means the
/// launcher died. Without a user namespace (root mode where user namespaces are unavailable) the
/// child is real root until the privilege drop, which switches it to the session's host ids.
pub(crate) fn enter_strict(spec: &JailSpec, release: OwnedFd) -> Result<Jailed, JailError> {
    let mut found = Findings {
        root: "pivot-root".into(),
        ..Findings::default()
    };
    found.namespaces = namespaces::names(spec.user_namespace);

    // Wait for the launcher: until the maps exist, any file we create would get an unmapped
    // owner (EOVERFLOW), and an unmapped uid cannot be switched to.
    namespaces::await_release(&release)?;

    // Mounts, first half, still with our original kernel ids: everything that needs a lookup
    // of a host path happens here, because once we are the inside user the kernel checks those
    // lookups against the session uid, which cannot traverse the server's private directories.
    mounts::make_private()?;
    let workspace = mounts::open_host_dir(&spec.workspace, "workspace")?;
    let owner = spec.user_namespace.then_some(shared::jail::INSIDE_ID);
    mounts::mount_stage(&spec.stage, owner)?;
    found.uid_map = namespaces::read_uid_map();

    // Become the inside user right away (user-namespace mode), so the files and mounts
    // below are owned by a mapped id.
    if spec.user_namespace {
        namespaces::become_inside_user()?;
    }

    // Mounts, rest: assemble the root on the tmpfs, then pivot into it and drop the host.
    let mounted = mounts::populate(&workspace, spec)?;
    drop(workspace);
    found.proc = mounted.proc.clone();
    mounts::pivot_into_stage()?;
    found.mounts = mounts::read_mount_table(&mounted);

    // Our own hostname, while CAP_SYS_ADMIN in the UTS namespace still exists.
    namespaces::set_hostname()?;

    // Give up every privilege, then re-arm what the credential change cleared.
    let root_ids = if spec.user_namespace {
        None
    } else {
        spec.host_ids
    };
    privileges::drop_all(root_ids)?;
    privileges::set_no_new_privs()?;
    privileges::set_non_dumpable()?;
    privileges::arm_death_signal()?;
    privileges::check_lifeline(&release)?;
    drop(release);

    // Resource limits, once the worker can no longer raise them back.
    rlimits::install(&spec.limits)?;

    // Landlock, after the last mount (a domain forbids mount changes) and before seccomp.
    let outcome = landlock::install(JailLevel::Strict, spec.system_root)?;
    found.landlock_abi = outcome.abi;
    found.landlock = outcome.status;

    // Only the standard fds and the channel are left.
    fds::verify_only_standard()?;

    // seccomp last: it would block the steps above.
    seccomp::install(JailLevel::Strict)?;

    // Look at ourselves: the supervisor checks the audit before it uses the session.
    Ok(Jailed {
        audit: audit::gather(JailLevel::Strict, &found),
    })
}

/// The `chroot` level: the launcher itself becomes the worker, confined to
/// the workspace by `chroot`, a per-session uid, Landlock and a stricter seccomp filter.
pub(crate) fn enter_chroot(spec: &JailSpec, supervisor: libc::pid_t) -> Result<Jailed, JailError> {
    let mut found = Findings {
        root: "chroot".into(),
        proc: "none".into(),
        ..Findings::default()
    };
    found.uid_map = namespaces::read_uid_map();
    let Some(ids) = spec.host_ids else {
        return Err(JailError::SetIds {
            id: 0,
            source: std::io::Error::other("the chroot level needs a per-session uid (root mode)"),
        });
    };
    // chroot with an fd-relative cwd: the path is looked up once, without following a last
    // symlink, and nothing else is reachable afterwards.
    let workspace = mounts::open_host_dir(&spec.workspace, "workspace")?;
    mounts::chroot_into(&workspace)?;
    drop(workspace);
    found.mounts = vec!["/".into()];

    // The privilege drop (root): bounding set first (needs CAP_SETPCAP), then groups, gid, uid.
    privileges::drop_all(Some(ids))?;
    // The private tmp directory of this level lives in the workspace; created as the session.
    mounts::ensure_tmp_dir();
    privileges::set_no_new_privs()?;
    privileges::set_non_dumpable()?;
    privileges::arm_death_signal()?;
    privileges::check_parent(supervisor)?;
    rlimits::install(&spec.limits)?;
    let outcome = landlock::install(JailLevel::Chroot, false)?;
    found.landlock_abi = outcome.abi;
    found.landlock = outcome.status;
    fds::verify_only_standard()?;
    seccomp::install(JailLevel::Chroot)?;
    Ok(Jailed {
        audit: audit::gather(JailLevel::Chroot, &found),
    })
}

/// The `none` level: no confinement beyond what costs nothing: an empty
/// environment, fd hygiene, rlimits, no_new_privs and the seccomp deny-list.
pub(crate) fn enter_none(spec: &JailSpec) -> Result<Jailed, JailError> {
    let mut found = Findings {
        root: "host".into(),
        proc: "host".into(),
        ..Findings::default()
    };
    found.uid_map = namespaces::read_uid_map();
    let path = c_path(&spec.workspace).map_err(|source| JailError::Chdir { source })?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::chdir(path.as_ptr()) }).map_err(|source| JailError::Chdir { source })?;
    privileges::set_no_new_privs()?;
    rlimits::install(&spec.limits)?;
    fds::verify_only_standard()?;
    seccomp::install(JailLevel::None)?;
    Ok(Jailed {
        audit: audit::gather(JailLevel::None, &found),
    })
}
