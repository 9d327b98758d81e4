//! Per-session cgroups (isolation.md §2.6): memory, process and CPU caps that hold for
//! the whole session, whatever it forks.
//!
//! cgroup v2 is preferred when the supervisor's own group offers `memory` and `pids`; otherwise
//! the v1 hierarchies (one per controller, the layout of the CI host) are used. Session groups
//! live under `<own group>/agentd-<supervisor pid>/<session id>` in each hierarchy, so limits set
//! by whoever runs the supervisor (systemd, a container) still apply above ours, concurrent
//! servers never touch each other's groups, and the groups of a server that was killed can be
//! recognised and removed by the next one. cgroups are optional: without them the rlimits are
//! the only caps, and the health report says so.
//!
//! Files are written directly (as nsjail does); the handful involved do not justify a crate.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// The controllers a session group uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The CPU period for `cpu.max` / `cpu.cfs_period_us`, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The limits a session group enforces.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub memory: u64,
    pub pids: u64,
    /// CPUs (1.0 = one full core).
    pub cpus: f64,
}

#[derive(Debug, Clone)]
enum Layout {
    /// One directory per controller (v1), each `<mount>/<own path>/agentd-<pid>`.
    V1(Vec<(&'static str, PathBuf)>),
    /// `<mount>/<own path>/agentd-<pid>` in the unified hierarchy.
    V2(PathBuf),
}

/// The supervisor's parent group(s) for its sessions.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    layout: Layout,
}

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// The supervisor's own cgroup path per hierarchy: `(controllers, path)` from /proc/self/cgroup.
fn own_groups() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

/// A mounted cgroup filesystem.
struct CgroupMount {
    fstype: String,
    /// Which group of the hierarchy the mount shows at `point`: `/` on a host, the container's
    /// own group inside a container that shares the host's cgroup namespace (Docker on v1).
    root: String,
    point: PathBuf,
    super_options: String,
}

fn cgroup_mounts() -> Vec<CgroupMount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut left = left.split(' ').skip(3);
            let root = left.next()?;
            let point = left.next()?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or_default();
            (fstype == "cgroup" || fstype == "cgroup2").then(|| CgroupMount {
                fstype: fstype.to_owned(),
                root: root.to_owned(),
                point: PathBuf::from(point),
                super_options: options.to_owned(),
            })
        })
        .collect()
}

/// Where `group` (a path from /proc/self/cgroup) is under `mount`, or `None` when the mount
/// does not show it. /proc/self/cgroup names groups from the hierarchy's root, while a mount
/// may show only a subtree: joining the two blindly points at a directory that is not there.
fn locate(mount: &CgroupMount, group: &str) -> Option<PathBuf> {
    let inside = Path::new(group)
        .strip_prefix(&mount.root)
        .ok()?
        .to_string_lossy()
        .into_owned();
    Some(mount.point.join(inside))
}

/// Removes `agentd-<pid>` groups under `parent` whose supervisor is gone (it was killed before it
/// could clean up). Non-empty groups stay (rmdir refuses them).
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("agentd-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(sessions) = std::fs::read_dir(&dir) {
            for session in sessions.flatten() {
                if session.path().is_dir() {
                    kill_members(&session.path());
                    let _ = std::fs::remove_dir(session.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Why cgroups are unavailable to this server (reported, not fatal: rlimits remain).
#[derive(Debug, thiserror::Error)]
pub enum CgroupUnavailable {
    #[error("no cgroup hierarchy with the {0} controller that shows this process's group")]
    NoHierarchy(&'static str),
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup v2: {step}: {source}")]
    V2 {
        step: &'static str,
        source: std::io::Error,
    },
}

impl CgroupRoot {
    /// Finds a usable hierarchy and creates this supervisor's parent group in it.
    ///
    /// # Errors
    /// Why cgroups are unavailable.
    pub fn prepare() -> Result<Self, CgroupUnavailable> {
        let pid = std::process::id();
        let groups = own_groups();
        let mounts = cgroup_mounts();

        // v2, when our group there offers the controllers.
        if let (Some((_, own)), Some(mount)) = (
            groups.iter().find(|(c, _)| c.is_empty()),
            mounts.iter().find(|m| m.fstype == "cgroup2"),
        ) && let Some(own_dir) = locate(mount, own)
        {
            let offered =
                std::fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
            if ["memory", "pids"]
                .iter()
                .all(|c| offered.split_whitespace().any(|o| o == *c))
            {
                return Self::prepare_v2(&own_dir, pid);
            }
        }

        // v1: one hierarchy per controller; memory and pids are required, cpu is optional.
        let mut dirs = Vec::new();
        for controller in CONTROLLERS {
            let own = groups
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == controller));
            let mount = mounts.iter().find(|m| {
                m.fstype == "cgroup" && m.super_options.split(',').any(|x| x == controller)
            });
            let Some(parent) = own
                .zip(mount)
                .and_then(|((_, own), mount)| locate(mount, own))
            else {
                if controller == "cpu" {
                    continue;
                }
                return Err(CgroupUnavailable::NoHierarchy(controller));
            };
            sweep_stale(&parent);
            let dir = parent.join(format!("agentd-{pid}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    if controller == "cpu" {
                        continue;
                    }
                    for (_, made) in &dirs {
                        let _ = std::fs::remove_dir(made);
                    }
                    return Err(CgroupUnavailable::Create {
                        path: dir,
                        source: e,
                    });
                }
            }
            dirs.push((controller, dir));
        }
        Ok(Self {
            layout: Layout::V1(dirs),
        })
    }

    /// v2: the "no internal processes" rule means controllers can only be enabled for children
    /// of a group without processes of its own, so the supervisor first moves itself into a
    /// leaf next to its sessions' parent .
    fn prepare_v2(own_dir: &Path, pid: u32) -> Result<Self, CgroupUnavailable> {
        let fail = |step, source| CgroupUnavailable::V2 { step, source };
        sweep_stale(own_dir);
        let enable = "+memory +pids +cpu";
        let enabled =
            std::fs::read_to_string(own_dir.join("cgroup.subtree_control")).unwrap_or_default();
        if !["memory", "pids"]
            .iter()
            .all(|c| enabled.split_whitespace().any(|o| o == *c))
        {
            let leaf = own_dir.join(format!("agentd-{pid}-supervisor"));
            std::fs::create_dir_all(&leaf).map_err(|e| fail("creating our leaf", e))?;
            write_file(&leaf.join("cgroup.procs"), &pid.to_string())
                .map_err(|e| fail("moving into our leaf", e))?;
            if write_file(&own_dir.join("cgroup.subtree_control"), enable).is_err() {
                write_file(&own_dir.join("cgroup.subtree_control"), "+memory +pids")
                    .map_err(|e| fail("enabling controllers", e))?;
            }
        }
        let dir = own_dir.join(format!("agentd-{pid}"));
        std::fs::create_dir_all(&dir).map_err(|e| fail("creating the sessions group", e))?;
        if write_file(&dir.join("cgroup.subtree_control"), enable).is_err() {
            write_file(&dir.join("cgroup.subtree_control"), "+memory +pids")
                .map_err(|e| fail("enabling controllers for sessions", e))?;
        }
        Ok(Self {
            layout: Layout::V2(dir),
        })
    }

    pub fn version(&self) -> u8 {
        match self.layout {
            Layout::V1(_) => 1,
            Layout::V2(_) => 2,
        }
    }

    pub fn controllers(&self) -> Vec<String> {
        match &self.layout {
            Layout::V1(dirs) => dirs.iter().map(|(c, _)| (*c).to_owned()).collect(),
            Layout::V2(dir) => std::fs::read_to_string(dir.join("cgroup.subtree_control"))
                .unwrap_or_default()
                .split_whitespace()
                .filter(|c| CONTROLLERS.contains(c))
                .map(str::to_owned)
                .collect(),
        }
    }

    /// Removes this server's parent group(s) at shutdown; they are empty by then.
    pub fn remove(&self) {
        let dirs: Vec<&PathBuf> = match &self.layout {
            Layout::V1(dirs) => dirs.iter().map(|(_, d)| d).collect(),
            Layout::V2(dir) => vec![dir],
        };
        for dir in dirs {
            if let Ok(sessions) = std::fs::read_dir(dir) {
                for session in sessions.flatten() {
                    if session.path().is_dir() {
                        kill_members(&session.path());
                        let _ = std::fs::remove_dir(session.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// The parent group's own files of `controller` (v1: its hierarchy; v2: the one group).
    fn parent_dir(&self, controller: &str) -> Option<&Path> {
        match &self.layout {
            Layout::V1(dirs) => dirs
                .iter()
                .find(|(c, _)| *c == controller)
                .map(|(_, d)| d.as_path()),
            Layout::V2(dir) => Some(dir),
        }
    }

    /// Caps what all session groups together may use: memory (no swap beyond it, where the
    /// kernel accounts swap) and processes, on their common parent. The supervisor's own
    /// process is never in that parent (v1: it stays in the group it was started in; v2: it
    /// moved to a leaf beside it), so the caps cannot starve it.
    ///
    /// # Errors
    /// A limit file could not be written.
    pub fn set_totals(&self, memory: u64, pids: u64) -> std::io::Result<()> {
        let missing = |what| std::io::Error::other(format!("no {what} controller"));
        let mem = self.parent_dir("memory").ok_or_else(|| missing("memory"))?;
        let tasks = self.parent_dir("pids").ok_or_else(|| missing("pids"))?;
        match self.layout {
            Layout::V1(_) => {
                write_file(&mem.join("memory.limit_in_bytes"), &memory.to_string())?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &memory.to_string())?;
                }
            }
            Layout::V2(_) => write_file(&mem.join("memory.max"), &memory.to_string())?,
        }
        write_file(&tasks.join("pids.max"), &pids.to_string())
    }

    /// The totals as the kernel holds them, read back from the parent's files.
    pub fn totals(&self) -> Value {
        let read = |controller: &str, v1: &str, v2: &str| {
            let file = if matches!(self.layout, Layout::V1(_)) {
                v1
            } else {
                v2
            };
            self.parent_dir(controller)
                .and_then(|d| std::fs::read_to_string(d.join(file)).ok())
                .map(|v| v.trim().to_owned())
        };
        json!({
            "memory": read("memory", "memory.limit_in_bytes", "memory.max"),
            "pids": read("pids", "pids.max", "pids.max"),
        })
    }

    /// `{version, controllers}` for the health report.
    pub fn describe(&self) -> Value {
        json!({"version": self.version(), "controllers": self.controllers()})
    }

    /// The session's group with its limits, before any of its processes exists.
    ///
    /// # Errors
    /// The group could not be created or a limit could not be written.
    pub fn create_session(
        &self,
        session: &str,
        limits: GroupLimits,
    ) -> std::io::Result<SessionGroup> {
        let quota = ((limits.cpus * CPU_PERIOD_US as f64) as u64).max(1000);
        match &self.layout {
            Layout::V1(dirs) => {
                let mut made = Vec::new();
                let group = |made: &mut Vec<PathBuf>| -> std::io::Result<()> {
                    for (controller, parent) in dirs {
                        let dir = parent.join(session);
                        std::fs::create_dir(&dir)?;
                        made.push(dir.clone());
                        match *controller {
                            "memory" => {
                                write_file(
                                    &dir.join("memory.limit_in_bytes"),
                                    &limits.memory.to_string(),
                                )?;
                                // No swap either: memory+swap gets the same cap where the kernel
                                // accounts swap.
                                let memsw = dir.join("memory.memsw.limit_in_bytes");
                                if memsw.exists() {
                                    write_file(&memsw, &limits.memory.to_string())?;
                                }
                            }
                            "pids" => write_file(&dir.join("pids.max"), &limits.pids.to_string())?,
                            "cpu" => {
                                write_file(
                                    &dir.join("cpu.cfs_period_us"),
                                    &CPU_PERIOD_US.to_string(),
                                )?;
                                write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                            }
                            _ => {}
                        }
                    }
                    Ok(())
                };
                if let Err(e) = group(&mut made) {
                    for dir in &made {
                        let _ = std::fs::remove_dir(dir);
                    }
                    return Err(e);
                }
                Ok(SessionGroup {
                    dirs: made,
                    v2: false,
                    torn_down: false,
                })
            }
            Layout::V2(parent) => {
                let dir = parent.join(session);
                std::fs::create_dir(&dir)?;
                let limits_written = (|| -> std::io::Result<()> {
                    write_file(&dir.join("memory.max"), &limits.memory.to_string())?;
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write_file(&swap, "0")?;
                    }
                    let group_oom = dir.join("memory.oom.group");
                    if group_oom.exists() {
                        write_file(&group_oom, "1")?;
                    }
                    write_file(&dir.join("pids.max"), &limits.pids.to_string())?;
                    let cpu = dir.join("cpu.max");
                    if cpu.exists() {
                        write_file(&cpu, &format!("{quota} {CPU_PERIOD_US}"))?;
                    }
                    Ok(())
                })();
                if let Err(e) = limits_written {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(e);
                }
                Ok(SessionGroup {
                    dirs: vec![dir],
                    v2: true,
                    torn_down: false,
                })
            }
        }
    }
}

/// One session's group(s). Dropping it tears it down (best effort); the connection task calls
/// [`SessionGroup::teardown`] first so that the removal is awaited rather than blocking.
#[derive(Debug)]
pub struct SessionGroup {
    dirs: Vec<PathBuf>,
    v2: bool,
    torn_down: bool,
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGCONT then SIGKILL to every member (a stopped task may ignore a lone SIGKILL, nsjail notes).
fn kill_members(dir: &Path) -> bool {
    let pids = read_pids(dir);
    for &pid in &pids {
        // The pids were members of a session group, which only session processes can be in; one
        // that has exited since is ESRCH, which changes nothing.
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    pids.is_empty()
}

fn counter(file: &Path, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

impl SessionGroup {
    /// Puts `pid` (the launcher, still waiting for its "go") in every hierarchy, so all it
    /// forks later is counted and capped.
    ///
    /// # Errors
    /// A `cgroup.procs` write failed.
    pub fn place(&self, pid: u32) -> std::io::Result<()> {
        for dir in &self.dirs {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Which limit the session ran into, if the counters say it ran into one.
    pub fn limit_hit(&self) -> Option<&'static str> {
        for dir in &self.dirs {
            let oom = if self.v2 {
                counter(&dir.join("memory.events"), "oom_kill ")
            } else {
                counter(&dir.join("memory.oom_control"), "oom_kill ")
            };
            if oom > 0 {
                return Some("memory");
            }
        }
        for dir in &self.dirs {
            if counter(&dir.join("pids.events"), "max ") > 0 {
                return Some("pids");
            }
        }
        None
    }

    /// At the session's end: kills whatever is left in the group (a daemon that escaped its PID namespace's end
    /// at `chroot` level, say), waits until it is empty, and removes it.
    pub async fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        // A killed worker leaves its group within a millisecond or two: look again soon, then
        // less and less often, for about two seconds in all.
        let mut pause = Duration::from_millis(1);
        let mut waited = Duration::ZERO;
        while waited < Duration::from_secs(2) {
            let mut empty = true;
            for dir in &self.dirs {
                if self.v2 {
                    let _ = write_file(&dir.join("cgroup.kill"), "1");
                }
                empty &= kill_members(dir);
            }
            if empty {
                break;
            }
            tokio::time::sleep(pause).await;
            waited += pause;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        self.remove_dirs();
    }

    fn remove_dirs(&mut self) {
        for dir in &self.dirs {
            for _ in 0..5 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.torn_down = true;
    }
}

impl Drop for SessionGroup {
    fn drop(&mut self) {
        if !self.torn_down {
            for dir in &self.dirs {
                kill_members(dir);
            }
            self.remove_dirs();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(root: &str, point: &str) -> CgroupMount {
        CgroupMount {
            fstype: "cgroup".into(),
            root: root.into(),
            point: point.into(),
            super_options: "rw,memory".into(),
        }
    }

    #[test]
    fn a_host_mount_shows_the_whole_hierarchy() {
        let host = mount("/", "/sys/fs/cgroup/memory");
        assert_eq!(
            locate(&host, "/system.slice/agent.service"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/memory/system.slice/agent.service"
            ))
        );
    }

    #[test]
    fn a_container_mount_shows_only_its_own_group() {
        // Docker on cgroup v1: /proc/self/cgroup names the host path, the mount shows that group
        // itself at the mount point.
        let container = mount("/docker/0bf1", "/sys/fs/cgroup/memory");
        assert_eq!(
            locate(&container, "/docker/0bf1"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            locate(&container, "/docker/0bf1/inner"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/inner"))
        );
        assert_eq!(locate(&container, "/system.slice"), None);
        assert_eq!(locate(&container, "/docker/0bf10"), None);
    }
}
