//! Isolation: its configuration (level, limits, commands), the start-up probes that pick the
//! level actually in force, the per-session identity and jail spec, the check of each worker's
//! self-audit, and the report that health endpoints and response headers show
//! (isolation.md §3; decision 9 of ARCHITECTURE.md).
//!
//! All isolation settings live here; `Config` only holds one `isolation` field of type
//! [`IsolationConfig`].
//!
//! Levels are detected by running the real launcher in probe mode through the real spawner
//! (D7), never by reading sysctls. `auto` picks `strict`, then `chroot`, and never `none`. A level
//! asked for explicitly that does not work stops the server (exit 78) with the failed probe and
//! the remedies.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::jail::{
    INSIDE_ID, JailAudit, JailLevel, JailLimits, JailSpec, WORKSPACE_INSIDE, human_bytes,
};

use crate::disk::Disk;
pub use crate::disk::DiskBackend;
use crate::host_ids::HostIds;
use crate::state::AppState;
use crate::workers::cgroup::{CgroupRoot, GroupLimits};
use crate::workers::{ProbeOutcome, Spawner, TestHooks as TestSpawnHooks};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The largest `pids.max` the kernel accepts.
const MAX_PIDS: u64 = 4 * 1024 * 1024;

/// How long one start-up probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The level asked for (`isolation.level`, `AGENTD_ISOLATION`, `--isolation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestedLevel {
    #[default]
    Auto,
    Strict,
    Chroot,
    None,
}

impl RequestedLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Strict => "strict",
            Self::Chroot => "chroot",
            Self::None => "none",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "strict" => Some(Self::Strict),
            "chroot" => Some(Self::Chroot),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// A byte count: an integer, or a string such as `"512MiB"`, `"1g"`, `"64k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let unit = unit.trim().to_ascii_lowercase();
        let factor = match unit.trim_end_matches('b').trim_end_matches('i') {
            "" => 1,
            "k" => KIB,
            "m" => MIB,
            "g" => GIB,
            "t" => 1024 * GIB,
            _ => return None,
        };
        number.checked_mul(factor).map(Self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(t) => Self::parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a size (use bytes, or a number with k, m, g, KiB, MiB, GiB)"
                ))
            }),
        }
    }
}

/// Per-session limits (isolation.md §2.4), all configurable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// cgroup memory cap (RSS, page cache and `/tmp` pages together).
    pub memory: ByteSize,
    /// cgroup process cap; also `RLIMIT_NPROC`.
    pub pids: u64,
    /// CPUs a session may use at once (cgroup `cpu.max`).
    pub cpus: f64,
    pub open_files: u64,
    /// Largest single file (`RLIMIT_FSIZE`).
    pub file_size: ByteSize,
    /// Size of the private `/tmp` (`strict`).
    pub tmp_size: ByteSize,
    /// `RLIMIT_AS`, the backstop where no memory cgroup exists.
    pub address_space: ByteSize,
    /// Cumulative CPU seconds per process (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// Wall-clock limit of one `run_command` call, in seconds (it caps the call's `timeout`).
    pub command_timeout: u64,
    /// The workspace's disk quota, enforced by the kernel (see [`crate::disk`]).
    pub disk: ByteSize,
    /// How the disk quota is enforced: `auto` (project quotas, else an image per session),
    /// `project`, `image`, or `none`.
    pub disk_backend: DiskBackend,
    /// Memory of all sessions together: the cap of their parent cgroup, and what admission
    /// counts the sessions' memory limits against. Default: the host's memory less a reserve
    /// for the supervisor and the OS.
    pub total_memory: Option<ByteSize>,
    /// Processes of all sessions together (parent cgroup `pids.max`, and admission). Default:
    /// three quarters of the host's process ids.
    pub total_pids: Option<u64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            memory: ByteSize(GIB),
            pids: 256,
            cpus: 1.0,
            open_files: 1024,
            file_size: ByteSize(GIB),
            tmp_size: ByteSize(256 * MIB),
            address_space: ByteSize(4 * GIB),
            cpu_seconds: 3600,
            command_timeout: 600,
            disk: ByteSize(2 * GIB),
            disk_backend: DiskBackend::Auto,
            total_memory: None,
            total_pids: None,
        }
    }
}

/// Test builds only: hooks the isolation tests use (isolation.md §4.2).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TestHooks {
    /// Run the in-jail probe server next to each session's agent.
    pub probe_server: bool,
    /// Leak an `O_PATH` fd of the host `/` into each launcher at fd 7 (T04).
    pub leak_fd: bool,
    /// Start every launcher (probes included) under a seccomp filter that refuses namespace
    /// creation, as a container's default profile does (T59).
    pub deny_namespaces: bool,
    /// Skip the user-namespace probe, so root mode falls back to `strict` without a user
    /// namespace (the path taken where user namespaces are disabled).
    pub no_user_namespace: bool,
}

/// The `isolation` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct IsolationConfig {
    pub level: RequestedLevel,
    /// Required for `none` (`--allow-insecure-isolation`, `AGENTD_ALLOW_INSECURE=1`).
    pub allow_insecure: bool,
    /// With `none`: also allow a non-loopback listen address.
    pub allow_insecure_remote: bool,
    /// Bind a read-only system root into `strict` jails so a command tool can run programs.
    pub commands: bool,
    /// First host uid/gid of the per-session range (root mode).
    pub uid_base: u32,
    /// Size of the per-session range.
    pub uid_count: u32,
    pub limits: LimitsConfig,
    #[cfg(feature = "isolation-tests")]
    pub test: TestHooks,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        Self {
            level: RequestedLevel::Auto,
            allow_insecure: false,
            allow_insecure_remote: false,
            commands: false,
            uid_base: 200_000,
            uid_count: 65_536,
            limits: LimitsConfig::default(),
            #[cfg(feature = "isolation-tests")]
            test: TestHooks::default(),
        }
    }
}

/// Checks the section once every source (file, `AGENTD_*`, flags) is layered in by
/// `config::load`.
///
/// # Errors
/// An impossible value, naming the key.
pub(crate) fn validate(config: &IsolationConfig) -> Result<(), String> {
    if config.uid_base == 0 || config.uid_count < 2 {
        return Err("isolation.uidBase must be above 0 and isolation.uidCount at least 2".into());
    }
    if config.uid_base.checked_add(config.uid_count).is_none() {
        return Err("isolation.uidBase + isolation.uidCount overflows".into());
    }
    let l = &config.limits;
    if l.memory.0 < 16 * MIB || l.pids < 8 || l.open_files < 16 || l.tmp_size.0 < MIB {
        return Err(
            "isolation.limits too small: memory ≥ 16MiB, pids ≥ 8, openFiles ≥ 16, tmpSize ≥ 1MiB"
                .into(),
        );
    }
    if !(l.cpus > 0.0 && l.cpus.is_finite()) {
        return Err("isolation.limits.cpus must be a positive number".into());
    }
    if l.address_space.0 < 256 * MIB || l.file_size.0 == 0 || l.cpu_seconds == 0 {
        return Err(
            "isolation.limits: addressSpace ≥ 256MiB, fileSize and cpuSeconds above 0".into(),
        );
    }
    if l.disk.0 < 16 * MIB {
        return Err("isolation.limits.disk must be at least 16MiB".into());
    }
    if l.total_memory.is_some_and(|t| t.0 < l.memory.0) {
        return Err("isolation.limits.totalMemory must hold at least one session's memory".into());
    }
    if l.total_pids.is_some_and(|t| t < l.pids || t > MAX_PIDS) {
        return Err(format!(
            "isolation.limits.totalPids must be between one session's pids and {MAX_PIDS}"
        ));
    }
    Ok(())
}

/// S0: the supervisor is not dumpable (its environ, memory and fds are unreadable to other
/// processes of its uid; verified in §7) and never writes a core with secrets in it.
///
/// # Errors
/// The `prctl` or `setrlimit` failed.
pub fn harden_process() -> std::io::Result<()> {
    // SAFETY: prctl and setrlimit with plain integer/struct arguments on our own process.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why the configured isolation cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("{0}")]
    Unavailable(String),
    #[error(
        "isolation level 'none' refused: it gives sessions the server's uid, filesystem and network. Pass --allow-insecure-isolation (or AGENTD_ALLOW_INSECURE=1) for development use"
    )]
    InsecureNotAllowed,
    #[error(
        "isolation level 'none' refused on the non-loopback address {0}: pass --allow-insecure-remote as well if you really mean it"
    )]
    InsecureRemote(String),
    #[error("could not prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One start-up probe's result.
#[derive(Debug, Clone)]
struct Probe {
    name: &'static str,
    ok: bool,
    /// The failed step and message, when it failed.
    failure: Option<(String, String)>,
    audit: Option<JailAudit>,
    checks: Value,
}

impl Probe {
    fn json(&self) -> Value {
        json!({
            "probe": self.name,
            "ok": self.ok,
            "failedStep": self.failure.as_ref().map(|f| f.0.clone()),
            "message": self.failure.as_ref().map(|f| f.1.clone()),
            "checks": self.checks,
        })
    }
}

/// How session identities are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidMode {
    /// Root mode: each session has its own host uid/gid.
    PerSession,
    /// Rootless: every session runs as the server's own uid (inside its own user namespace).
    Shared,
    /// `none`: the worker simply is the server's uid.
    Server,
}

impl UidMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::PerSession => "per-session",
            Self::Shared => "shared",
            Self::Server => "server",
        }
    }
}

/// The isolation in force: decided once at start, never degraded at runtime (§3.2).
#[derive(Debug)]
pub struct Isolation {
    pub level: JailLevel,
    pub requested: RequestedLevel,
    pub uid_mode: UidMode,
    user_namespace: bool,
    system_root: bool,
    config: IsolationConfig,
    /// Each session's host uid (root mode).
    host_ids: HostIds,
    /// The workspaces' disk quota.
    disk: Disk,
    /// What all sessions together may use.
    totals: Totals,
    stage: PathBuf,
    cgroup: Option<CgroupRoot>,
    probes: Vec<Probe>,
    layers: Value,
    warnings: Vec<String>,
    /// Set until probes ran: an unprobed isolation (unit tests) refuses to jail anything.
    probed: bool,
}

impl Default for Isolation {
    fn default() -> Self {
        Self {
            level: JailLevel::None,
            requested: RequestedLevel::None,
            uid_mode: UidMode::Server,
            user_namespace: false,
            system_root: false,
            config: IsolationConfig::default(),
            host_ids: HostIds::default(),
            disk: Disk::default(),
            totals: Totals::default(),
            stage: PathBuf::new(),
            cgroup: None,
            probes: Vec::new(),
            layers: json!({}),
            warnings: vec!["isolation was not set up".into()],
            probed: false,
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn own_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid have no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Memory and processes of all sessions together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub memory: u64,
    pub pids: u64,
}

impl Totals {
    /// The configured totals, or the defaults: the host's memory less an eighth (at least
    /// 1 GiB) for the supervisor and the OS, and three quarters of the host's process ids.
    fn from_config(limits: &LimitsConfig) -> Self {
        let read =
            |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(u64::MAX / 2, |kib| kib * KIB);
        let memory = limits.total_memory.map_or_else(
            || {
                mem_total
                    .saturating_sub((mem_total / 8).max(GIB))
                    .max(limits.memory.0)
            },
            |t| t.0,
        );
        let host_pids = [
            read("/proc/sys/kernel/pid_max"),
            read("/proc/sys/kernel/threads-max"),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(32_768);
        let pids = limits
            .total_pids
            .unwrap_or_else(|| (host_pids / 4 * 3).clamp(limits.pids, MAX_PIDS));
        Self { memory, pids }
    }
}

/// Ids in the host passwd and group databases: never handed to a session (S1).
fn host_database_ids() -> HashSet<u32> {
    let mut ids = HashSet::new();
    for file in ["/etc/passwd", "/etc/group"] {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
            if let Some(id) = line.split(':').nth(2).and_then(|v| v.parse().ok()) {
                ids.insert(id);
            }
        }
    }
    ids
}

/// Remedies printed when a level's probe fails, by failed step.
fn remedies(level: &str, step: &str) -> String {
    let as_root = if is_root() {
        ""
    } else {
        "run the server as root; "
    };
    let namespaces = format!(
        "Likely causes: unprivileged user namespaces are restricted \
        (kernel.apparmor_restrict_unprivileged_userns=1 on Ubuntu 23.10+, user.max_user_namespaces=0, \
        kernel.unprivileged_userns_clone=0), a container's seccomp profile (Docker's default \
        refuses unshare/mount), or a systemd unit with RestrictNamespaces=. Fix one of: {as_root}\
        install an AppArmor profile granting 'userns' to this binary; set the sysctl to allow \
        user namespaces; give the container CAP_SYS_ADMIN and a seccomp profile that allows \
        unshare, mount and pivot_root; or start with --isolation chroot (weaker, see the README)"
    );
    let generic = "See the README's Isolation section for what each level needs";
    match (level, step) {
        ("strict", "clone" | "user namespace" | "uid switch") => namespaces,
        ("strict", "mounts" | "pivot_root" | "detach old root") => {
            format!("Mounting inside the new namespace was refused. {namespaces}")
        }
        ("chroot", _) => "The chroot level needs root (CAP_SYS_CHROOT, CAP_SETUID, CAP_SETGID) \
            and seccomp. Run the server as root, or use --isolation strict where user namespaces \
            work"
            .into(),
        (_, "seccomp") => "seccomp filters could not be installed; the kernel needs \
            CONFIG_SECCOMP_FILTER"
            .into(),
        _ => generic.into(),
    }
}

/// Diagnostics printed with a failed probe (read, never required; §3.3).
fn diagnostics() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "absent".into())
    };
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Seccomp:"))
        .map(|l| l.trim_start_matches("Seccomp:").trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    format!(
        "user.max_user_namespaces={}, kernel.unprivileged_userns_clone={}, \
         kernel.apparmor_restrict_unprivileged_userns={}, own seccomp mode={seccomp}, \
         /proc/self/ns/user {}, euid={}",
        read("/proc/sys/user/max_user_namespaces"),
        read("/proc/sys/kernel/unprivileged_userns_clone"),
        read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        if Path::new("/proc/self/ns/user").exists() {
            "present"
        } else {
            "absent"
        },
        own_ids().0,
    )
}

impl Isolation {
    /// Decides the level at start-up: prepares the stage and cgroups, runs the probes of the
    /// requested level through `spawner`, and either returns what is in force or an error that
    /// names the failed probe and its remedies.
    ///
    /// # Errors
    /// The requested level is unavailable (or `none` without its override).
    pub async fn establish(
        config: &IsolationConfig,
        workspace_root: &Path,
        stage: &Path,
        listen_host: &str,
        spawner: &Spawner,
    ) -> Result<Self, IsolationError> {
        let root = is_root();
        let requested = config.level;
        let mut iso = Self {
            requested,
            config: config.clone(),
            system_root: config.commands,
            probed: true,
            warnings: Vec::new(),
            ..Self::default()
        };
        let mut reserved = host_database_ids();
        reserved.insert(own_ids().0);
        reserved.insert(0);
        iso.host_ids = HostIds::new(config.uid_base, config.uid_count, reserved);
        iso.totals = Totals::from_config(&config.limits);
        iso.stage = stage.to_owned();
        // Private like the rest of the data directory: only launchers, still holding the
        // server's ids when they mount on it, ever look it up.
        prepare_dir(&iso.stage, 0o700)?;

        if requested == RequestedLevel::None {
            if !config.allow_insecure {
                return Err(IsolationError::InsecureNotAllowed);
            }
            let loopback = matches!(listen_host, "127.0.0.1" | "::1" | "localhost")
                || listen_host.starts_with("127.");
            if !loopback && !config.allow_insecure_remote {
                return Err(IsolationError::InsecureRemote(listen_host.to_owned()));
            }
            iso.level = JailLevel::None;
            iso.uid_mode = UidMode::Server;
            iso.disk = Disk::none(config.limits.disk.0, "isolation level 'none'");
            let probe = iso
                .run_probe(spawner, workspace_root, "none", JailLevel::None, false)
                .await;
            iso.probes.push(probe);
            iso.warnings.push(
                "isolation level 'none': sessions run as the server's uid with its filesystem and network"
                    .into(),
            );
            iso.finish_report();
            return Ok(iso);
        }

        // cgroups are optional at every level; probing them needs no child process.
        match CgroupRoot::prepare() {
            Ok(cgroup) => {
                // The totals go on the parent of all session groups before any exists; the
                // supervisor itself is not in that parent, so it is never capped by them.
                if let Err(e) = cgroup.set_totals(iso.totals.memory, iso.totals.pids) {
                    iso.warnings.push(format!(
                        "the sessions' totals could not be set on their parent cgroup ({e}): only admission counts them"
                    ));
                }
                iso.cgroup = Some(cgroup);
            }
            Err(reason) => iso.warnings.push(format!(
                "cgroups unavailable ({reason}): rlimits are the only resource caps"
            )),
        }

        let want_strict = matches!(requested, RequestedLevel::Auto | RequestedLevel::Strict);
        let want_chroot = requested == RequestedLevel::Chroot;
        let mut chosen = None;
        if want_strict {
            let userns = if iso.test_skip_user_namespace() {
                Probe {
                    name: "userns",
                    ok: false,
                    failure: Some(("test".into(), "skipped by a test hook".into())),
                    audit: None,
                    checks: Value::Null,
                }
            } else {
                iso.run_probe(spawner, workspace_root, "userns", JailLevel::Strict, true)
                    .await
            };
            let userns_ok = userns.ok;
            iso.probes.push(userns);
            if userns_ok {
                chosen = Some((JailLevel::Strict, true));
            } else if root {
                let rootns = iso
                    .run_probe(spawner, workspace_root, "rootns", JailLevel::Strict, false)
                    .await;
                let ok = rootns.ok;
                iso.probes.push(rootns);
                if ok {
                    chosen = Some((JailLevel::Strict, false));
                    iso.warnings.push(
                        "user namespaces unavailable: strict runs in root mode without one".into(),
                    );
                }
            }
        }
        if chosen.is_none() && (want_chroot || requested == RequestedLevel::Auto) {
            if root {
                let probe = iso
                    .run_probe(spawner, workspace_root, "chroot", JailLevel::Chroot, false)
                    .await;
                let ok = probe.ok;
                iso.probes.push(probe);
                if ok {
                    chosen = Some((JailLevel::Chroot, false));
                }
            } else {
                iso.probes.push(Probe {
                    name: "chroot",
                    ok: false,
                    failure: Some(("chroot".into(), "the chroot level needs root".into())),
                    audit: None,
                    checks: Value::Null,
                });
            }
        }
        let Some((level, user_namespace)) = chosen else {
            return Err(IsolationError::Unavailable(iso.failure_message(requested)));
        };
        iso.level = level;
        iso.user_namespace = user_namespace;
        iso.uid_mode = if root {
            UidMode::PerSession
        } else {
            UidMode::Shared
        };
        if level == JailLevel::Chroot && requested == RequestedLevel::Auto {
            iso.warnings.push(
                "strict is unavailable; running at chroot (network isolation by seccomp only, shared PID namespace, no /proc)"
                    .into(),
            );
        }
        if level == JailLevel::Chroot && config.commands {
            iso.system_root = false;
            iso.warnings
                .push("isolation.commands is ignored at the chroot level (no system root)".into());
        }
        if iso.uid_mode == UidMode::Shared {
            iso.warnings.push(
                "rootless: all sessions share the server's uid on the host; the namespaces are the barrier between them"
                    .into(),
            );
        }
        iso.disk = Disk::establish(
            config.limits.disk_backend,
            config.limits.disk.0,
            workspace_root,
            root,
            config.uid_base,
        )
        .map_err(IsolationError::Unavailable)?;
        if iso.disk.enforced_limit().is_none() {
            iso.warnings.push(format!(
                "no disk quota: {}",
                iso.disk.report()["reason"].as_str().unwrap_or_default()
            ));
        }
        iso.finish_report();
        Ok(iso)
    }

    /// The exit-78 message: the failed probe(s), their steps, the remedies, the diagnostics.
    fn failure_message(&self, requested: RequestedLevel) -> String {
        let mut lines = Vec::new();
        let wanted = if requested == RequestedLevel::Auto {
            "no isolation level available (auto tried strict, then chroot; it never picks none)"
                .to_owned()
        } else {
            format!("isolation level '{}' unavailable", requested.as_str())
        };
        for probe in &self.probes {
            if let Some((step, message)) = &probe.failure {
                let level = if probe.name == "chroot" {
                    "chroot"
                } else {
                    "strict"
                };
                lines.push(format!(
                    "{wanted}: probe '{}' failed at step '{step}': {message}. {}.",
                    probe.name,
                    remedies(level, step)
                ));
            }
        }
        if lines.is_empty() {
            lines.push(format!("{wanted}."));
        }
        lines.push(format!("Diagnostics: {}", diagnostics()));
        lines.join("\n")
    }

    /// Runs one start-up probe: a dummy workspace, the real spawn path, the real jail, the
    /// in-jail checks of `worker::jail::checks`.
    async fn run_probe(
        &self,
        spawner: &Spawner,
        workspace_root: &Path,
        name: &'static str,
        level: JailLevel,
        user_namespace: bool,
    ) -> Probe {
        let dir = workspace_root.join(format!(".jail-probe-{}-{name}", std::process::id()));
        let fail = |step: &str, message: String| Probe {
            name,
            ok: false,
            failure: Some((step.to_owned(), message)),
            audit: None,
            checks: Value::Null,
        };
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = prepare_dir(&dir, 0o700) {
            return fail("probe workspace", e.to_string());
        }
        let ids = (level != JailLevel::None && is_root()).then(|| {
            let probe_id = self.config.uid_base;
            (probe_id, probe_id)
        });
        if let Some((uid, gid)) = ids {
            let _ = std::os::unix::fs::chown(&dir, Some(uid), Some(gid));
        }
        let mut spec = self.spec_for("probe", level, &dir, ids);
        spec.user_namespace = user_namespace;
        spec.probe = true;
        spec.probe_server = false;
        let hooks = self.test_hooks();
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, spawner.probe(spec, hooks)).await;
        let _ = std::fs::remove_dir_all(&dir);
        let outcome = match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => return fail("spawn", e.to_string()),
            Err(_) => return fail("timeout", "the probe did not answer in time".into()),
        };
        match outcome {
            ProbeOutcome::Failed(f) => fail(&f.step, f.message),
            ProbeOutcome::Died(how) => fail("launcher", how),
            ProbeOutcome::Jailed { audit, report } => {
                let checks: Value = serde_json::from_str(&report).unwrap_or(Value::Null);
                let expected = ids.map_or(own_ids().0, |(uid, _)| uid);
                let mut problems = audit_problems(&audit, level, user_namespace, expected);
                if checks["ok"] != true {
                    problems.push(format!("in-jail checks failed: {}", checks["checks"]));
                }
                if problems.is_empty() {
                    Probe {
                        name,
                        ok: true,
                        failure: None,
                        audit: Some(*audit),
                        checks,
                    }
                } else {
                    Probe {
                        name,
                        ok: false,
                        failure: Some(("audit".into(), problems.join("; "))),
                        audit: Some(*audit),
                        checks,
                    }
                }
            }
        }
    }

    fn limits(&self) -> JailLimits {
        let l = &self.config.limits;
        JailLimits {
            address_space: l.address_space.0,
            processes: l.pids,
            open_files: l.open_files,
            file_size: l.file_size.0,
            cpu_seconds: l.cpu_seconds,
            tmp_size: l.tmp_size.0,
            command_timeout: l.command_timeout,
            memory_cgroup: self.cgroup.as_ref().map(|_| l.memory.0),
            disk: self.disk.enforced_limit(),
        }
    }

    fn spec_for(
        &self,
        session_id: &str,
        level: JailLevel,
        workspace: &Path,
        ids: Option<(u32, u32)>,
    ) -> JailSpec {
        JailSpec {
            session_id: session_id.to_owned(),
            level,
            workspace: workspace.to_string_lossy().into_owned(),
            stage: self.stage.to_string_lossy().into_owned(),
            host_ids: ids,
            user_namespace: self.user_namespace,
            system_root: self.system_root && level == JailLevel::Strict,
            limits: self.limits(),
            probe: false,
            probe_server: self.test_probe_server(),
        }
    }

    #[cfg(feature = "isolation-tests")]
    fn test_probe_server(&self) -> bool {
        self.config.test.probe_server
    }

    #[cfg(not(feature = "isolation-tests"))]
    fn test_probe_server(&self) -> bool {
        false
    }

    /// Test builds: the launcher hooks of the isolation tests (none in release builds).
    #[cfg(feature = "isolation-tests")]
    pub fn test_hooks(&self) -> TestSpawnHooks {
        TestSpawnHooks {
            leak_fd: self.config.test.leak_fd,
            deny_namespaces: self.config.test.deny_namespaces,
        }
    }

    #[cfg(not(feature = "isolation-tests"))]
    pub fn test_hooks(&self) -> TestSpawnHooks {
        TestSpawnHooks::default()
    }

    #[cfg(feature = "isolation-tests")]
    fn test_skip_user_namespace(&self) -> bool {
        self.config.test.no_user_namespace
    }

    #[cfg(not(feature = "isolation-tests"))]
    fn test_skip_user_namespace(&self) -> bool {
        false
    }

    /// S1: the host uid/gid of a session in root mode; `None` when sessions use the server's.
    /// The id was assigned and recorded in storage before (see [`crate::host_ids`]).
    ///
    /// # Errors
    /// Root mode, and the session has no id: it must never fall back to any other identity.
    pub fn session_ids(&self, session_id: &str) -> std::io::Result<Option<(u32, u32)>> {
        if self.uid_mode != UidMode::PerSession {
            return Ok(None);
        }
        self.host_ids
            .get(session_id)
            .map(|id| Some((id, id)))
            .ok_or_else(|| std::io::Error::other(format!("session {session_id} has no host uid")))
    }

    /// The allocator of per-session host uids, in root mode.
    pub fn host_ids(&self) -> Option<&HostIds> {
        (self.uid_mode == UidMode::PerSession).then_some(&self.host_ids)
    }

    /// The workspaces' disk quota.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Memory and processes of all sessions together.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// One session's `(memory, pids)` limits, as admission commits them.
    pub fn session_commitment(&self) -> (u64, u64) {
        (self.config.limits.memory.0, self.config.limits.pids)
    }

    /// The jail spec of one session's launcher.
    pub fn session_spec(
        &self,
        session_id: &str,
        workspace: &Path,
        ids: Option<(u32, u32)>,
    ) -> JailSpec {
        self.spec_for(session_id, self.level, workspace, ids)
    }

    /// Whether this isolation may jail anything (false until the probes ran).
    pub fn is_established(&self) -> bool {
        self.probed
    }

    /// S3: the session's cgroup, when cgroups are available.
    pub fn session_cgroup(
        &self,
        session_id: &str,
    ) -> std::io::Result<Option<crate::workers::cgroup::SessionGroup>> {
        let Some(root) = &self.cgroup else {
            return Ok(None);
        };
        let l = &self.config.limits;
        root.create_session(
            session_id,
            GroupLimits {
                memory: l.memory.0,
                pids: l.pids,
                cpus: l.cpus,
            },
        )
        .map(Some)
    }

    /// The workspace path the worker sees (what `Init.workspace` must carry).
    pub fn workspace_inside(&self, host: &Path) -> String {
        self.level.workspace_inside(&host.to_string_lossy())
    }

    /// Human words for a limit the cgroup counters say was hit.
    pub fn describe_limit(&self, which: &str) -> String {
        let l = &self.config.limits;
        match which {
            "memory" => format!(
                "resource limit: the session's memory limit ({}) was reached and the kernel's OOM killer stopped it",
                human_bytes(l.memory.0)
            ),
            "pids" => format!(
                "resource limit: the session reached its process limit ({} processes)",
                l.pids
            ),
            other => format!("resource limit: {other}"),
        }
    }

    /// Words for a worker killed by a signal that a limit sends.
    pub fn describe_signal(&self, signal: i32) -> Option<String> {
        (signal == libc::SIGXCPU).then(|| {
            format!(
                "resource limit: the CPU time limit ({} s) was reached",
                self.config.limits.cpu_seconds
            )
        })
    }

    /// Checks a worker's self-audit against what this level promises (W13): any problem and
    /// the session is refused.
    pub fn check_audit(&self, audit: &JailAudit, ids: Option<(u32, u32)>) -> Vec<String> {
        let expected = ids.map_or(own_ids().0, |(uid, _)| uid);
        audit_problems(audit, self.level, self.user_namespace, expected)
    }

    fn finish_report(&mut self) {
        let audit = self
            .probes
            .iter()
            .rev()
            .find_map(|p| p.ok.then_some(p.audit.as_ref()).flatten());
        let strict = self.level == JailLevel::Strict;
        let has = |ns: &str| audit.is_some_and(|a| a.namespaces.iter().any(|n| n == ns));
        let landlock = audit.map_or(
            json!(null),
            |a| json!({"abi": a.landlock_abi, "status": a.landlock}),
        );
        self.layers = json!({
            "userNamespace": has("user"),
            "mountNamespace": has("mnt"),
            "pidNamespace": has("pid"),
            "networkNamespace": has("net"),
            "ipcNamespace": has("ipc"),
            "utsNamespace": has("uts"),
            "cgroupNamespace": has("cgroup"),
            "pivotRoot": strict,
            "chroot": self.level == JailLevel::Chroot,
            "proc": audit.map_or("none".to_owned(), |a| a.proc.clone()),
            "noNewPrivs": audit.is_some_and(|a| a.no_new_privs),
            "capabilitiesDropped": audit.is_some_and(|a| {
                a.cap_effective | a.cap_permitted | a.cap_inheritable | a.cap_bounding | a.cap_ambient == 0
            }),
            "seccomp": if audit.is_some_and(|a| a.seccomp_mode == 2) { json!("deny-list") } else { json!(false) },
            "landlock": landlock,
            "cgroup": self.cgroup.as_ref().map_or(json!(null), CgroupRoot::describe),
            "rlimits": true,
            "systemRoot": self.system_root,
        });
        if let Some(a) = audit {
            if a.landlock_abi == 0 && self.level != JailLevel::None {
                self.warnings
                    .push("Landlock unavailable: the jail has no path-based second wall".into());
            }
            if a.proc == "none" && strict {
                self.warnings
                    .push("procfs could not be mounted: workers run without /proc".into());
            }
        }
    }

    /// The `isolation` object of `/api/v1/system/health` (§3.4).
    pub fn report(&self) -> Value {
        let l = &self.config.limits;
        json!({
            "level": self.level.as_str(),
            "requested": self.requested.as_str(),
            "secure": self.level != JailLevel::None && self.probed,
            "uidMode": self.uid_mode.as_str(),
            "layers": self.layers,
            "limits": {
                "memory": l.memory.0,
                "pids": l.pids,
                "cpus": l.cpus,
                "openFiles": l.open_files,
                "fileSize": l.file_size.0,
                "tmpSize": l.tmp_size.0,
                "addressSpace": l.address_space.0,
                "cpuSeconds": l.cpu_seconds,
                "commandTimeout": l.command_timeout,
                "disk": l.disk.0,
                "totalMemory": self.totals.memory,
                "totalPids": self.totals.pids,
            },
            "disk": self.disk.report(),
            "totals": {
                "memory": self.totals.memory,
                "pids": self.totals.pids,
                // The kernel caps the sum on the sessions' parent cgroup where there is one;
                // admission counts the sessions' limits against the totals everywhere.
                "cgroup": self.cgroup.as_ref().map(CgroupRoot::totals),
            },
            "commands": self.system_root,
            "workspaceInside": match self.level {
                JailLevel::Strict => json!(WORKSPACE_INSIDE),
                JailLevel::Chroot => json!("/"),
                JailLevel::None => json!(null),
            },
            "probes": self.probes.iter().map(Probe::json).collect::<Vec<_>>(),
            "warnings": self.warnings,
        })
    }

    /// The short form agent options carry.
    pub fn summary(&self) -> Value {
        json!({
            "level": self.level.as_str(),
            "secure": self.level != JailLevel::None && self.probed,
            "commands": self.system_root,
        })
    }

    /// Logs the level in force: one INFO line, a WARN per missing optional layer, an ERROR
    /// block for `none` (§3.4).
    pub fn log(&self) {
        tracing::info!(
            isolation = self.level.as_str(),
            requested = self.requested.as_str(),
            uid_mode = self.uid_mode.as_str(),
            layers = %self.layers,
            "isolation in force"
        );
        if self.level == JailLevel::None {
            tracing::error!(
                "\n  ISOLATION IS OFF (--isolation none)\n  Every session's agent runs as this server's uid, sees the whole host\n  filesystem and network. Use this for development only."
            );
        }
        for warning in &self.warnings {
            tracing::warn!(%warning, "isolation");
        }
    }

    /// Removes this server's parent cgroups at shutdown (session groups are gone by then).
    pub fn cleanup(&self) {
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove();
        }
        self.disk.shutdown();
    }
}

fn prepare_dir(path: &Path, mode: u32) -> Result<(), IsolationError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |source| IsolationError::Prepare {
        path: path.to_owned(),
        source,
    };
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    if !meta.is_dir() {
        return Err(fail(std::io::Error::other("not a directory")));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)
}

/// The audit rules of each level (W13, T25).
fn audit_problems(
    audit: &JailAudit,
    level: JailLevel,
    user_namespace: bool,
    expected_host_uid: u32,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    expect(audit.level == level, format!("level {:?}", audit.level));
    expect(audit.no_new_privs, "no_new_privs is not set".into());
    expect(
        audit.seccomp_mode == 2,
        format!("seccomp mode {}", audit.seccomp_mode),
    );
    expect(
        audit.open_fds == [0, 1, 2, 3],
        format!("open fds {:?}", audit.open_fds),
    );
    let mut env = audit.env.clone();
    env.sort();
    expect(
        env == ["HOME", "LANG", "PATH", "TMPDIR", "USER"],
        format!("environment {env:?}"),
    );
    if level == JailLevel::None {
        return problems;
    }
    let caps = audit.cap_effective
        | audit.cap_permitted
        | audit.cap_inheritable
        | audit.cap_bounding
        | audit.cap_ambient;
    expect(caps == 0, format!("capabilities left: {caps:#x}"));
    expect(!audit.dumpable, "dumpable".into());
    expect(
        audit.parent_death_signal == libc::SIGKILL,
        format!("parent-death signal {}", audit.parent_death_signal),
    );
    expect(
        audit.host_uid == expected_host_uid && audit.host_uid != 0,
        format!("host uid {} (expected {expected_host_uid})", audit.host_uid),
    );
    let inside = if level == JailLevel::Strict && user_namespace {
        INSIDE_ID
    } else {
        expected_host_uid
    };
    expect(
        audit.uids.iter().all(|u| *u == inside) && audit.gids.iter().all(|g| *g != 0),
        format!("uids {:?} gids {:?}", audit.uids, audit.gids),
    );
    expect(
        !audit.groups.contains(&0),
        format!("supplementary groups {:?}", audit.groups),
    );
    if audit.landlock_abi > 0 {
        expect(
            audit.landlock == "fully-enforced" || audit.landlock == "partially-enforced",
            format!("landlock {}", audit.landlock),
        );
    }
    match level {
        JailLevel::Strict => {
            expect(audit.root == "pivot-root", format!("root {}", audit.root));
            expect(audit.cwd == WORKSPACE_INSIDE, format!("cwd {}", audit.cwd));
            for ns in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
                expect(
                    audit.namespaces.iter().any(|n| n == ns),
                    format!("no {ns} namespace"),
                );
            }
            expect(
                !user_namespace || audit.namespaces.iter().any(|n| n == "user"),
                "no user namespace".into(),
            );
            expect(audit.pid == 1, format!("pid {} (expected 1)", audit.pid));
            expect(
                audit.hostname == "sandbox",
                format!("hostname {}", audit.hostname),
            );
        }
        JailLevel::Chroot => {
            expect(audit.root == "chroot", format!("root {}", audit.root));
            expect(audit.cwd == "/", format!("cwd {}", audit.cwd));
        }
        JailLevel::None => {}
    }
    problems
}

/// Adds `X-Isolation-Level` to every response (§3.4).
pub async fn level_header(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let level = state.spawner.isolation().level.as_str();
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert("x-isolation-level", HeaderValue::from_static(level));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("512MiB"), Some(ByteSize(512 * MIB)));
        assert_eq!(ByteSize::parse("1g"), Some(ByteSize(GIB)));
        assert_eq!(ByteSize::parse("64 k"), Some(ByteSize(64 * KIB)));
        assert_eq!(ByteSize::parse("100"), Some(ByteSize(100)));
        assert_eq!(ByteSize::parse("12 parsecs"), None);
    }

    #[test]
    fn a_session_without_a_recorded_uid_is_refused_in_root_mode() {
        let mut iso = Isolation {
            uid_mode: UidMode::PerSession,
            host_ids: HostIds::new(200_000, 65_536, HashSet::from([0])),
            ..Isolation::default()
        };
        assert!(iso.session_ids("V1StGXR8_Z5jdHi6B-myT").is_err());
        let id = iso
            .host_ids()
            .unwrap()
            .assign("V1StGXR8_Z5jdHi6B-myT")
            .unwrap();
        assert_eq!(
            iso.session_ids("V1StGXR8_Z5jdHi6B-myT").unwrap(),
            Some((id, id))
        );
        assert!(id > 200_000 && id < 265_536);
        iso.uid_mode = UidMode::Shared;
        assert_eq!(iso.session_ids("x").unwrap(), None);
        assert!(iso.host_ids().is_none());
    }

    #[test]
    fn totals_default_below_the_host_and_above_one_session() {
        let limits = LimitsConfig::default();
        let t = Totals::from_config(&limits);
        assert!(
            t.memory >= limits.memory.0 && t.pids >= limits.pids,
            "{t:?}"
        );
        let configured = LimitsConfig {
            total_memory: Some(ByteSize(3 * GIB)),
            total_pids: Some(1000),
            ..LimitsConfig::default()
        };
        assert_eq!(
            Totals::from_config(&configured),
            Totals {
                memory: 3 * GIB,
                pids: 1000
            }
        );
        let mut c = IsolationConfig::default();
        c.limits.total_memory = Some(ByteSize(MIB));
        assert!(validate(&c).unwrap_err().contains("totalMemory"));
        c.limits.total_memory = None;
        c.limits.disk = ByteSize(MIB);
        assert!(validate(&c).unwrap_err().contains("disk"));
    }

    #[test]
    fn limits_config_reads_sizes() {
        let c: IsolationConfig =
            serde_json::from_str(r#"{"level":"strict","limits":{"memory":"2GiB","pids":64}}"#)
                .unwrap();
        assert_eq!(c.level, RequestedLevel::Strict);
        assert_eq!(c.limits.memory, ByteSize(2 * GIB));
        assert_eq!(c.limits.pids, 64);
        assert_eq!(c.limits.open_files, 1024);
        assert_eq!(c.limits.disk, ByteSize(2 * GIB));
        let c: IsolationConfig = serde_json::from_str(
            r#"{"limits":{"disk":"64MiB","diskBackend":"image","totalMemory":"8GiB","totalPids":4096}}"#,
        )
        .unwrap();
        assert_eq!(c.limits.disk, ByteSize(64 * MIB));
        assert_eq!(c.limits.disk_backend, DiskBackend::Image);
        assert_eq!(c.limits.total_memory, Some(ByteSize(8 * GIB)));
        assert_eq!(c.limits.total_pids, Some(4096));
    }
}
