//! A session's jail as the supervisor hands it over: the spec its launcher reads on fd 3, its
//! cgroup, and the workspace path it sees inside.

use std::path::Path;

use shared::ids::SessionId;
use shared::jail::{JailLevel, JailLimits, JailSpec};

use super::Isolation;
use super::cgroup::{GroupLimits, SessionGroup};

/// Test builds: what a launcher is started with besides its spec.
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchHooks {
    /// An `O_PATH` fd of the host `/` leaked into the launcher at fd 7, which the launcher
    /// must close before anything else.
    pub leak_fd: bool,
    /// A seccomp filter refusing namespace creation, which the launcher installs first thing
    /// (`--test-deny-namespaces`), as if a container's profile had been there before it.
    pub deny_namespaces: bool,
}

impl Isolation {
    /// The jail spec of one session's launcher.
    pub fn session_spec(
        &self,
        session_id: &SessionId,
        workspace: &Path,
        ids: Option<(u32, u32)>,
    ) -> JailSpec {
        self.spec_for(session_id, self.level, workspace, ids)
    }

    /// A session's cgroup named `name`, when cgroups are available. (Launchers get theirs
    /// before they know their session, so the name is the pool's, not a session id.)
    pub fn session_cgroup(&self, name: &str) -> std::io::Result<Option<SessionGroup>> {
        let Some(root) = &self.cgroup else {
            return Ok(None);
        };
        let l = &self.config.limits;
        root.create_session(
            name,
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

    /// The spec for `session_id` (a session's, or `probe`) at `level`.
    pub(super) fn spec_for(
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

    /// Test builds: the launcher hooks of the isolation suite (none in release builds).
    #[cfg(feature = "isolation-tests")]
    pub fn launch_hooks(&self) -> LaunchHooks {
        LaunchHooks {
            leak_fd: self.config.test.leak_fd,
            deny_namespaces: self.config.test.deny_namespaces,
        }
    }

    #[cfg(not(feature = "isolation-tests"))]
    pub fn launch_hooks(&self) -> LaunchHooks {
        LaunchHooks::default()
    }
}
