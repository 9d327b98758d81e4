//! Isolation: the level in force and everything that follows from it. Decided once at start-up
//! (ARCHITECTURE decision 9) and never degraded at runtime; every session's jail is built from
//! it.
//!
//! - [`config`]: the `isolation` section (level, limits, commands, test hooks) and its checks;
//! - [`hardening`]: the supervisor's own process, made undumpable before it holds a secret;
//! - `probes`: the start-up probes that pick the level: the real launcher, run in probe mode,
//!   never a read of sysctls. `auto` picks `strict`, then `chroot`, never `none`; a level asked
//!   for explicitly that does not work stops the server (exit 78) with the failed step and the
//!   remedies;
//! - `host_ids`: each session's own host uid in root mode; [`disk`]: the workspaces' disk
//!   quota; [`cgroup`]: the sessions' cgroups and their totals ([`Totals`]);
//! - `spec`: one session's jail spec and cgroup; `audit`: the check of each worker's
//!   self-audit; `report`: what health endpoints, agent options and the log say about it.

mod audit;
pub mod cgroup;
pub mod config;
pub mod disk;
mod hardening;
pub mod host_ids;
mod probes;
mod report;
mod spec;
mod totals;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use shared::jail::{JailLevel, JailSpec};

use cgroup::CgroupRoot;
pub(crate) use config::validate;
pub use config::{ByteSize, InvalidIsolation, IsolationConfig, LimitsConfig, RequestedLevel};
use disk::Disk;
pub use hardening::harden_process;
use host_ids::{HostIds, UidMode, host_database_ids};
use probes::Probe;
pub use probes::ProbeOutcome;
pub use spec::LaunchHooks;
pub use totals::Totals;

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
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("could not prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// Whether the supervisor runs as root (root mode: a host uid per session).
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The supervisor's own effective uid and gid.
fn own_ids() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

impl Isolation {
    /// Decides the level at start-up: prepares the stage and cgroups, runs the probes of the
    /// requested level through `launch` (which starts the real launcher in probe mode with the
    /// spec it is given, and reports how it ended), and either returns what is in force or an
    /// error that names the failed probe and its remedies.
    ///
    /// # Errors
    /// The requested level is unavailable (or `none` without its override).
    pub async fn establish(
        config: &IsolationConfig,
        workspace_root: &Path,
        stage: &Path,
        listen_host: &str,
        launch: &impl AsyncFn(JailSpec, LaunchHooks) -> std::io::Result<ProbeOutcome>,
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
                .run_probe(launch, workspace_root, "none", JailLevel::None, false)
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
                iso.run_probe(launch, workspace_root, "userns", JailLevel::Strict, true)
                    .await
            };
            let userns_ok = userns.ok;
            iso.probes.push(userns);
            if userns_ok {
                chosen = Some((JailLevel::Strict, true));
            } else if root {
                let rootns = iso
                    .run_probe(launch, workspace_root, "rootns", JailLevel::Strict, false)
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
                    .run_probe(launch, workspace_root, "chroot", JailLevel::Chroot, false)
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
        )?;
        if iso.disk.enforced_limit().is_none() {
            iso.warnings.push(format!(
                "no disk quota: {}",
                iso.disk.report()["reason"].as_str().unwrap_or_default()
            ));
        }
        iso.finish_report();
        Ok(iso)
    }

    /// Whether this isolation may jail anything (false until the probes ran).
    pub fn is_established(&self) -> bool {
        self.probed
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

    #[cfg(feature = "isolation-tests")]
    fn test_skip_user_namespace(&self) -> bool {
        self.config.test.no_user_namespace
    }

    #[cfg(not(feature = "isolation-tests"))]
    fn test_skip_user_namespace(&self) -> bool {
        false
    }

    /// How long a deleted session's teardown waits before it starts (a test hook; zero
    /// otherwise).
    #[cfg(feature = "isolation-tests")]
    pub fn test_teardown_delay(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.test.teardown_delay_ms)
    }

    #[cfg(not(feature = "isolation-tests"))]
    pub fn test_teardown_delay(&self) -> std::time::Duration {
        std::time::Duration::ZERO
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
