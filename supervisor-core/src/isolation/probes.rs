//! The start-up probes that pick the level in force: each runs the real launcher in probe mode
//! (a dummy workspace, the real jail, the in-jail checks) and reads back what it found. A level
//! asked for explicitly that fails its probe stops the server with the failed step, the
//! remedies and some diagnostics.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use shared::jail::{JailAudit, JailFailure, JailLevel, JailSpec};

use super::audit::audit_problems;
use super::config::RequestedLevel;
use super::spec::LaunchHooks;
use super::{Isolation, is_root, own_ids, prepare_dir};

/// How long one start-up probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// How a start-up probe's launcher ended.
pub enum ProbeOutcome {
    /// The jail was built: its audit and the in-jail checks (JSON).
    Jailed {
        audit: Box<JailAudit>,
        report: String,
    },
    /// A jail step failed, and the launcher said which.
    Failed(JailFailure),
    /// The launcher died without saying anything useful.
    Died(String),
}

/// One start-up probe's result.
#[derive(Debug, Clone)]
pub(super) struct Probe {
    pub(super) name: &'static str,
    pub(super) ok: bool,
    /// The failed step and message, when it failed.
    pub(super) failure: Option<(String, String)>,
    pub(super) audit: Option<JailAudit>,
    pub(super) checks: Value,
}

impl Probe {
    pub(super) fn json(&self) -> Value {
        json!({
            "probe": self.name,
            "ok": self.ok,
            "failedStep": self.failure.as_ref().map(|f| f.0.clone()),
            "message": self.failure.as_ref().map(|f| f.1.clone()),
            "checks": self.checks,
        })
    }
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
    /// The exit-78 message: the failed probe(s), their steps, the remedies, the diagnostics.
    pub(super) fn failure_message(&self, requested: RequestedLevel) -> String {
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
    pub(super) async fn run_probe(
        &self,
        launch: &impl AsyncFn(JailSpec, LaunchHooks) -> std::io::Result<ProbeOutcome>,
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
        let hooks = self.launch_hooks();
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, launch(spec, hooks)).await;
        let _ = std::fs::remove_dir_all(&dir);
        let outcome = match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                return fail("spawn", format!("could not start the worker process: {e}"));
            }
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
}
