//! The `isolation` section of the configuration: the level asked for, the per-session limits,
//! and (test builds) the hooks of the isolation suite. `Config` holds it as one field; it is
//! checked by [`validate`] once every source (file, `AGENTD_*`, flags) is layered in.

use serde::{Deserialize, Serialize};

use super::disk::DiskBackend;

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;

/// The largest `pids.max` the kernel accepts.
pub(super) const MAX_PIDS: u64 = 4 * 1024 * 1024;

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
    /// Milliseconds a deleted session's teardown waits before it starts, so a test can watch
    /// (or crash) the server half-way through one.
    pub teardown_delay_ms: u64,
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

/// An impossible value in the `isolation` section, naming the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIsolation {
    #[error("isolation.uidBase must be above 0 and isolation.uidCount at least 2")]
    UidRange,
    #[error("isolation.uidBase + isolation.uidCount overflows")]
    UidOverflow,
    #[error("isolation.limits too small: memory ≥ 16MiB, pids ≥ 8, openFiles ≥ 16, tmpSize ≥ 1MiB")]
    TooSmall,
    #[error("isolation.limits.cpus must be a positive number")]
    Cpus,
    #[error("isolation.limits: addressSpace ≥ 256MiB, fileSize and cpuSeconds above 0")]
    Rlimits,
    #[error("isolation.limits.disk must be at least 16MiB")]
    Disk,
    #[error("isolation.limits.totalMemory must hold at least one session's memory")]
    TotalMemory,
    #[error("isolation.limits.totalPids must be between one session's pids and {MAX_PIDS}")]
    TotalPids,
}

/// Checks the section once every source (file, `AGENTD_*`, flags) is layered in by
/// `config::load`.
///
/// # Errors
/// An impossible value, naming the key.
pub(crate) fn validate(config: &IsolationConfig) -> Result<(), InvalidIsolation> {
    if config.uid_base == 0 || config.uid_count < 2 {
        return Err(InvalidIsolation::UidRange);
    }
    if config.uid_base.checked_add(config.uid_count).is_none() {
        return Err(InvalidIsolation::UidOverflow);
    }
    let l = &config.limits;
    if l.memory.0 < 16 * MIB || l.pids < 8 || l.open_files < 16 || l.tmp_size.0 < MIB {
        return Err(InvalidIsolation::TooSmall);
    }
    if !(l.cpus > 0.0 && l.cpus.is_finite()) {
        return Err(InvalidIsolation::Cpus);
    }
    if l.address_space.0 < 256 * MIB || l.file_size.0 == 0 || l.cpu_seconds == 0 {
        return Err(InvalidIsolation::Rlimits);
    }
    if l.disk.0 < 16 * MIB {
        return Err(InvalidIsolation::Disk);
    }
    if l.total_memory.is_some_and(|t| t.0 < l.memory.0) {
        return Err(InvalidIsolation::TotalMemory);
    }
    if l.total_pids.is_some_and(|t| t < l.pids || t > MAX_PIDS) {
        return Err(InvalidIsolation::TotalPids);
    }
    Ok(())
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

    #[test]
    fn impossible_totals_and_disks_are_refused() {
        let mut c = IsolationConfig::default();
        c.limits.total_memory = Some(ByteSize(MIB));
        assert_eq!(validate(&c), Err(InvalidIsolation::TotalMemory));
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("totalMemory")
        );
        c.limits.total_memory = None;
        c.limits.disk = ByteSize(MIB);
        assert_eq!(validate(&c), Err(InvalidIsolation::Disk));
    }
}
