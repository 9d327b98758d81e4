//! Landlock: a second, path-based wall that also stops what namespaces do not
//! (a leaked directory fd, verified on the CI host), TCP bind/connect, abstract Unix sockets and
//! signals outside the session.
//!
//! After every mount (a Landlock domain forbids mount topology changes) and before seccomp.
//! It confines the calling thread only (before ABI 8), so it runs while the worker has one.

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use shared::jail::{JailLevel, WORKSPACE_INSIDE};

use super::JailError;

/// The newest ABI whose rights were tested on the CI host (kernel 6.18 reports 7). Newer kernels
/// still get these; older ones get what they have (best effort, reported).
const TESTED: ABI = ABI::V7;

pub(crate) struct Outcome {
    pub abi: i32,
    pub status: String,
}

/// The kernel's Landlock ABI version, 0 when Landlock is absent or disabled.
pub(crate) fn kernel_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query passes no ruleset and reads no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(rc).unwrap_or(0).max(0)
}

/// One rule, for a path that must exist (the crate's `path_beneath_rules` would silently skip a
/// missing one, which would hide a broken jail layout).
fn rule(path: &str, access: BitFlags<AccessFs>) -> Result<PathBeneath<PathFd>, JailError> {
    let fd = PathFd::new(path).map_err(|e| JailError::Landlock(format!("{path}: {e}")))?;
    Ok(PathBeneath::new(fd, access))
}

/// Rights for a regular file: the directory-only rights would be refused on it.
fn file_rights(access: BitFlags<AccessFs>) -> BitFlags<AccessFs> {
    access & AccessFs::from_file(TESTED)
}

/// Handles every filesystem right of [`TESTED`], allow them only beneath the session's own
/// trees, denies TCP bind/connect (no rule), scopes abstract sockets and signals to the domain.
pub(crate) fn install(level: JailLevel, system_root: bool) -> Result<Outcome, JailError> {
    let abi = kernel_abi();
    if abi == 0 {
        return Ok(Outcome {
            abi,
            status: "unavailable".into(),
        });
    }
    let all = AccessFs::from_all(TESTED);
    let without_exec = all & !AccessFs::Execute;
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let mut rules = Vec::new();
    match level {
        JailLevel::Strict => {
            let own = if system_root { all } else { without_exec };
            rules.push(rule(WORKSPACE_INSIDE, own)?);
            rules.push(rule("/tmp", own)?);
            let rw = file_rights(AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate);
            rules.push(rule("/dev/null", rw)?);
            rules.push(rule("/dev/zero", rw)?);
            rules.push(rule(
                "/dev/urandom",
                file_rights(AccessFs::ReadFile.into()),
            )?);
            if system_root {
                rules.push(rule("/usr", read | AccessFs::Execute)?);
                rules.push(rule("/etc", read)?);
                rules.push(rule("/", AccessFs::ReadDir.into())?);
                if std::path::Path::new("/proc/self").exists() {
                    rules.push(rule("/proc", read)?);
                }
            }
        }
        JailLevel::Chroot => rules.push(rule("/", without_exec)?),
        JailLevel::None => {
            return Ok(Outcome {
                abi,
                status: "not-applied".into(),
            });
        }
    }
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .and_then(|r| r.handle_access(AccessNet::from_all(TESTED)))
        .and_then(|r| r.scope(Scope::from_all(TESTED)))
        .and_then(|r| r.create())
        .map_err(|e| JailError::Landlock(e.to_string()))?;
    let ruleset = rules
        .into_iter()
        .try_fold(ruleset, |ruleset, rule| ruleset.add_rule(rule))
        .map_err(|e| JailError::Landlock(e.to_string()))?;
    let status = ruleset
        .restrict_self()
        .map_err(|e| JailError::Landlock(e.to_string()))?;
    let status = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully-enforced",
        RulesetStatus::PartiallyEnforced => "partially-enforced",
        RulesetStatus::NotEnforced => "not-enforced",
    };
    Ok(Outcome {
        abi,
        status: status.into(),
    })
}
