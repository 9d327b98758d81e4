//! The project-quota backend: where the workspace root's filesystem enforces project quotas
//! (ext4 mounted with `prjquota`, XFS with `pquota`), each session's workspace directory gets
//! a project id of its own (its host uid) with the inherit flag, so everything created below it
//! is charged to that project, and the project gets hard block and inode limits. The kernel
//! answers `EDQUOT` past them. Both the id (an inode attribute) and the limits (the
//! filesystem's quota file) survive restarts and reboots; setting them costs two ioctls and one
//! `quotactl`, so it is done again before every worker start, which also applies a changed
//! `isolation.limits.disk`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::image::open_dir;
use super::sys;

/// Why project quotas cannot be used for the workspaces.
#[derive(Debug, thiserror::Error)]
pub enum ProjectsUnavailable {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "the workspace filesystem tracks project quotas but does not enforce them (mount it with prjquota or pquota)"
    )]
    NotEnforced,
    #[error(
        "the workspace filesystem has no project quotas ({0}; ext4 needs the quota and project features and the prjquota mount option, XFS pquota)"
    )]
    Absent(io::Error),
    #[error("cannot set a project quota: {0}")]
    Set(io::Error),
}

pub struct Projects {
    /// The workspace root: quota calls name the filesystem through it.
    root: File,
    limit: u64,
    inodes: u64,
}

impl Projects {
    /// Checks that the filesystem of `root` enforces project quotas and that this process may
    /// set them, on a scratch directory with the probes' id `probe_id`.
    ///
    /// # Errors
    /// Why project quotas cannot be used here.
    pub fn probe(root: &Path, limit: u64, probe_id: u32) -> Result<Self, ProjectsUnavailable> {
        let root_dir = open_dir(root).map_err(|source| ProjectsUnavailable::Open {
            path: root.to_owned(),
            source,
        })?;
        match sys::project_quotas_enforced(&root_dir) {
            Ok(true) => {}
            Ok(false) => return Err(ProjectsUnavailable::NotEnforced),
            Err(e) => return Err(ProjectsUnavailable::Absent(e)),
        }
        let projects = Self {
            root: root_dir,
            limit,
            inodes: (limit / 1024).max(4096),
        };
        let scratch = root.join(".quota-probe");
        let _ = std::fs::create_dir(&scratch);
        let probed = projects.apply(&scratch, probe_id);
        let _ = std::fs::remove_dir(&scratch);
        let _ = sys::set_project_limits(&projects.root, probe_id, 0, 0);
        probed.map_err(ProjectsUnavailable::Set)?;
        Ok(projects)
    }

    /// Gives `workspace` project `project` (inherited below it) and the session's limits.
    ///
    /// # Errors
    /// An ioctl or `quotactl` failed.
    pub fn apply(&self, workspace: &Path, project: u32) -> io::Result<()> {
        let dir = open_dir(workspace)?;
        if sys::project_of(&dir)? != (project, true) {
            sys::set_project(&dir, project)?;
        }
        sys::set_project_limits(&dir, project, self.limit, self.inodes)
    }

    /// Clears the limits of a deleted session's project.
    pub fn release(&self, project: u32) {
        if let Err(e) = sys::set_project_limits(&self.root, project, 0, 0) {
            tracing::warn!(project, error = %e, "could not clear a project quota");
        }
    }

    pub fn inodes(&self) -> u64 {
        self.inodes
    }
}
