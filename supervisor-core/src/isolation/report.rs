//! What the isolation in force tells people: the health report, the agent options' summary,
//! the start-up log, and the words for a limit a session ran into.

use serde_json::{Value, json};
use shared::jail::{JailLevel, WORKSPACE_INSIDE, human_bytes};

use super::Isolation;
use super::cgroup::CgroupRoot;
use super::probes::Probe;

impl Isolation {
    pub(super) fn finish_report(&mut self) {
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
}
