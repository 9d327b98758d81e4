//! What the supervisor tells a launcher about its jail, and what the jailed worker reports back.
//!
//! The order on a fresh channel is: the supervisor places the launcher in its cgroup, then writes
//! one [`JailSpec`] frame ("go"); the launcher builds the jail; the jailed worker writes either
//! [`crate::protocol::FromWorker::Jailed`] with its [`JailAudit`] or
//! [`crate::protocol::FromWorker::JailFailed`] naming the step that failed. Only then does the
//! ordinary `Init` → `Ready` handshake run. Nothing in here is secret: the spec names paths, ids and
//! limits, never a key.

use serde::{Deserialize, Serialize};

/// How strongly a session's worker is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JailLevel {
    /// Namespaces, `pivot_root` into a tmpfs, dropped privileges, Landlock, seccomp.
    Strict,
    /// `chroot` into the workspace, per-session uid, seccomp (root only, no namespaces).
    Chroot,
    /// No jail: development only, never chosen implicitly.
    None,
}

impl JailLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Chroot => "chroot",
            Self::None => "none",
        }
    }

    /// The session workspace as the jailed worker sees it (its cwd; what `Init.workspace` must
    /// say). At `none` the worker sees the host path itself.
    pub fn workspace_inside(self, host_path: &str) -> String {
        match self {
            Self::Strict => WORKSPACE_INSIDE.to_owned(),
            Self::Chroot => "/".to_owned(),
            Self::None => host_path.to_owned(),
        }
    }
}

/// The workspace's path inside a `strict` jail.
pub const WORKSPACE_INSIDE: &str = "/workspace";
/// The uid and gid a `strict` worker has inside its user namespace: an ordinary user, not root,
/// even there.
pub const INSIDE_ID: u32 = 1000;

/// The launcher's orders ("go"), the first frame on a fresh channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JailSpec {
    /// The session this worker serves. It travels here, not on the command line, because a
    /// pooled launcher is started before its session is known.
    pub session_id: String,
    pub level: JailLevel,
    /// Absolute host path of the session's workspace directory. The supervisor created it and
    /// the worker cannot rename it (its parent is not writable by sessions).
    pub workspace: String,
    /// Absolute host path of an empty directory owned by the server, on which `strict` mounts the
    /// tmpfs that becomes the new root (inside the worker's private mount namespace).
    pub stage: String,
    /// Host uid and gid of the session (root mode). `None`: the server's own ids (rootless).
    pub host_ids: Option<(u32, u32)>,
    /// `strict`: create a user namespace. `false` is root mode without user namespaces.
    pub user_namespace: bool,
    /// Bind a read-only system root (`/usr`, a few `/etc` files) so commands can run.
    pub system_root: bool,
    pub limits: JailLimits,
    /// Set for the start-up probes (how the supervisor finds the levels that work on this host):
    /// jail, check, report, exit.
    pub probe: bool,
    /// Test builds only: run the in-jail probe server of the isolation tests next to the agent
    /// (a release build refuses a spec that asks for it).
    pub probe_server: bool,
}

/// The per-process limits a worker sets on itself. cgroup limits are
/// applied by the supervisor and are not part of this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailLimits {
    pub address_space: u64,
    pub processes: u64,
    pub open_files: u64,
    pub file_size: u64,
    pub cpu_seconds: u64,
    /// Size of the private `/tmp` tmpfs (`strict`).
    pub tmp_size: u64,
    /// Wall-clock limit of one command run by a command tool, in seconds.
    pub command_timeout: u64,
    /// The memory cap of the session's cgroup, when it has one (`None`: rlimits are the only
    /// cap). A program the kernel kills is then reported as possibly stopped by this limit; the
    /// worker cannot read the cgroup's OOM counter itself.
    pub memory_cgroup: Option<u64>,
    /// The workspace's disk quota, when the kernel enforces one: a full workspace is then
    /// reported as this quota being reached.
    pub disk: Option<u64>,
}

/// A byte count as the limit messages show it: whole GiB or MiB when it is one, else bytes.
pub fn human_bytes(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;
    if n >= GIB && n.is_multiple_of(GIB) {
        format!("{} GiB", n / GIB)
    } else if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else {
        format!("{n} bytes")
    }
}

/// What the jailed worker found when it looked at itself, gathered with syscalls after the
/// last jail step. The supervisor refuses the session when a value is not what the level
/// promises (`JailAudit::problems` on the supervisor side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JailAudit {
    pub level: JailLevel,
    /// Real, effective and saved uid / gid as the worker sees them.
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    /// Supplementary groups as the worker sees them.
    pub groups: Vec<u32>,
    /// The host uid the worker's uid maps to, from `uid_map` (read before `/proc` went away),
    /// or the uid itself when there is no user namespace.
    pub host_uid: u32,
    /// Capability sets as bit masks (bit n = capability n).
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
    /// `PR_GET_SECCOMP`: 2 means a filter is installed.
    pub seccomp_mode: i32,
    pub dumpable: bool,
    pub parent_death_signal: i32,
    /// Namespaces this worker does not share with its launcher's parent: `user`, `mnt`, ...
    pub namespaces: Vec<String>,
    /// `pivot-root`, `chroot` or `host`.
    pub root: String,
    /// `subset-pid`, `none`, or `host`.
    pub proc: String,
    pub cwd: String,
    pub hostname: String,
    /// Names of the environment variables (the values are the jail's own, the same for every
    /// session).
    pub env: Vec<String>,
    pub open_fds: Vec<i32>,
    /// `(resource, soft, hard)`; `u64::MAX` means unlimited.
    pub rlimits: Vec<(String, u64, u64)>,
    /// Kernel Landlock ABI (0 when absent) and the `restrict_self` outcome.
    pub landlock_abi: i32,
    pub landlock: String,
    /// Mount points of the worker's mount namespace, read before Landlock.
    pub mounts: Vec<String>,
    /// The worker's pid as it sees it (1 in its own PID namespace).
    pub pid: u32,
}

/// A jail step that failed: the session fails to start, naming the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailFailure {
    /// The step, e.g. `user namespace`, `pivot_root`, `seccomp`.
    pub step: String,
    pub errno: i32,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn byte_counts_read_like_the_configuration() {
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(1536 << 20), "1536 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
