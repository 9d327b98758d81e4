//! The check of a worker's self-audit: what each level promises, compared with what the
//! worker found inside its jail. Any problem and the session (or the level, for a start-up
//! probe) is refused.

use shared::jail::{INSIDE_ID, JailAudit, JailLevel, WORKSPACE_INSIDE};

use super::{Isolation, own_ids};

impl Isolation {
    /// Checks a worker's self-audit (the jail's report of what it did to itself) against what
    /// this level promises: any problem and the session is refused.
    pub fn check_audit(&self, audit: &JailAudit, ids: Option<(u32, u32)>) -> Vec<String> {
        let expected = ids.map_or(own_ids().0, |(uid, _)| uid);
        audit_problems(audit, self.level, self.user_namespace, expected)
    }
}

/// The audit rules of each level: what the jail must have achieved for the level to hold.
pub(super) fn audit_problems(
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
