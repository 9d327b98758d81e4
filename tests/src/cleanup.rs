//! What a killed server leaves behind and the harness removes: its sessions' workspace images,
//! still mounted (a supervisor keeps them for its next start), and workers that outlived it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::process::{kill9_pid, pid_alive};

/// Mount points under `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir) && point != dir)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Detaches what a killed server left mounted under `dir` (its sessions' workspace images, kept
/// mounted for the next start of a server), so that the temporary directory can go.
pub fn detach_mounts_under(dir: &Path) {
    for point in mounts_under(dir) {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Detaches, under each root, only what a supervisor mounts: workspace images (a `.disk`
/// directory beside them) and its image pool. Each image's loop device is set to clear itself,
/// so it goes with the last mount.
pub(crate) fn detach_supervisor_mounts(roots: &[PathBuf]) {
    for root in roots {
        for point in mounts_under(root) {
            let ours = point.parent().is_some_and(|p| p.join(".disk").is_dir())
                || point.ends_with(".disk/pool")
                || point.parent().is_some_and(|p| p.ends_with(".disk/pool"));
            if ours {
                let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// SIGKILLs the workers among `pids` that are still alive (a safety net so a failing test never
/// leaks workers). Only processes that still look like one of our workers: guards against pid
/// reuse.
pub(crate) fn kill_workers(pids: HashSet<u32>) {
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_worker = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == "worker");
        if is_worker && pid_alive(pid) {
            let _ = kill9_pid(pid);
        }
    }
}
