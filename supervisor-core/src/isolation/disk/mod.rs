//! Each session's disk quota (`isolation.limits.disk`), enforced by the kernel, never by
//! polling: project quotas where the workspace root's filesystem has them ([`project`]),
//! otherwise a filesystem image per session mounted as its workspace ([`image`]). Which one is
//! in force is decided once at start by trying it, and the health report says so, or says why
//! there is none (rootless servers can do neither).
//!
//! A workspace gets its quota when its session is created, and again before each worker start
//! (a restored session keeps its limit, an image is mounted again after a reboot); a deleted
//! session's quota is released.

mod image;
mod project;
mod sys;

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::ids::SessionId;

/// `isolation.limits.diskBackend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBackend {
    /// Project quotas if the filesystem has them, else images, else none (reported).
    #[default]
    Auto,
    Project,
    Image,
    /// No disk quota (reported as such).
    None,
}

/// The rootless reason: without privileges a server can use neither backend.
const ROOTLESS: &str =
    "rootless: an unprivileged server can neither set project quotas nor mount images";

/// A disk quota backend asked for by name is unavailable (the server stops, as for a level).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk quota backend unavailable: {ROOTLESS}")]
    Rootless,
    #[error("disk quota backend 'project' unavailable: {0}")]
    Project(#[from] project::ProjectsUnavailable),
    #[error("disk quota backend 'image' unavailable: {0}")]
    Image(#[from] image::ImagesUnavailable),
}

enum Backend {
    None(String),
    Project(project::Projects),
    Image(Arc<image::Images>),
}

/// The disk quota in force.
pub struct Disk {
    limit: u64,
    backend: Backend,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("backend", &self.name())
            .field("limit", &self.limit)
            .finish()
    }
}

impl Default for Disk {
    fn default() -> Self {
        Self::none(0, "isolation was not set up")
    }
}

impl Disk {
    pub fn none(limit: u64, reason: impl Into<String>) -> Self {
        Self {
            limit,
            backend: Backend::None(reason.into()),
        }
    }

    /// Picks the backend for workspaces under `root`. `privileged`: the server may mount and
    /// set quotas (root with `CAP_SYS_ADMIN`); `probe_id` is an id no session gets.
    ///
    /// # Errors
    /// A backend asked for by name is unavailable (the server stops, as for a level).
    pub fn establish(
        wanted: DiskBackend,
        limit: u64,
        root: &Path,
        privileged: bool,
        probe_id: u32,
    ) -> Result<Self, DiskError> {
        if wanted == DiskBackend::None {
            return Ok(Self::none(
                limit,
                "isolation.limits.diskBackend is \"none\"",
            ));
        }
        if !privileged {
            return match wanted {
                DiskBackend::Auto => Ok(Self::none(limit, ROOTLESS)),
                _ => Err(DiskError::Rootless),
            };
        }
        let mut reasons = Vec::new();
        if matches!(wanted, DiskBackend::Auto | DiskBackend::Project) {
            match project::Projects::probe(root, limit, probe_id) {
                Ok(projects) => {
                    return Ok(Self {
                        limit,
                        backend: Backend::Project(projects),
                    });
                }
                Err(reason) if wanted == DiskBackend::Project => return Err(reason.into()),
                Err(reason) => reasons.push(format!("project quotas: {reason}")),
            }
        }
        match image::Images::prepare(root, limit) {
            Ok(images) => Ok(Self {
                limit,
                backend: Backend::Image(images),
            }),
            Err(reason) if wanted == DiskBackend::Image => Err(reason.into()),
            Err(reason) => {
                reasons.push(format!("images: {reason}"));
                Ok(Self::none(limit, reasons.join("; ")))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::None(_) => "none",
            Backend::Project(_) => "project",
            Backend::Image(_) => "image",
        }
    }

    /// The quota a session's workspace has, when one is enforced.
    pub fn enforced_limit(&self) -> Option<u64> {
        (!matches!(self.backend, Backend::None(_))).then_some(self.limit)
    }

    /// Gives a just-created, empty workspace its quota. `project` is the session's host uid.
    ///
    /// # Errors
    /// The quota could not be set up (the session is not created then).
    pub fn attach(
        &self,
        session: &SessionId,
        workspace: &Path,
        project: Option<u32>,
    ) -> std::io::Result<()> {
        match &self.backend {
            Backend::None(_) => Ok(()),
            Backend::Project(projects) => projects.apply(workspace, needs_id(project)?),
            Backend::Image(images) => images.attach_new(session, workspace),
        }
    }

    /// Before the workspace is used after a restore or a restart, and before each worker start.
    /// `false` when the workspace stays without a quota (an image backend found a workspace
    /// with files from before it was in force).
    ///
    /// # Errors
    /// The quota could not be set up again.
    pub fn ensure(
        &self,
        session: &SessionId,
        workspace: &Path,
        project: Option<u32>,
    ) -> std::io::Result<bool> {
        if !matches!(self.backend, Backend::None(_)) && !workspace.exists() {
            // A restored session whose directory went missing starts with an empty one.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(workspace)?;
        }
        match &self.backend {
            Backend::None(_) => Ok(true),
            Backend::Project(projects) => {
                projects.apply(workspace, needs_id(project)?).map(|()| true)
            }
            Backend::Image(images) => images.ensure(session, workspace),
        }
    }

    /// A deleted session's quota. Called before its workspace directory is removed (an image
    /// is unmounted, so there is nothing left below the directory to walk).
    pub fn release(&self, session: &SessionId, workspace: &Path, project: Option<u32>) {
        match &self.backend {
            Backend::None(_) => {}
            Backend::Project(projects) => {
                if let Some(project) = project {
                    projects.release(project);
                }
            }
            Backend::Image(images) => images.release(session, workspace),
        }
    }

    /// At shutdown: what only this run needed goes (the image pool).
    pub fn shutdown(&self) {
        if let Backend::Image(images) = &self.backend {
            images.shutdown();
        }
    }

    /// The `disk` object of the health report.
    pub fn report(&self) -> Value {
        match &self.backend {
            Backend::None(reason) => json!({
                "backend": "none",
                "limit": null,
                "configuredLimit": self.limit,
                "reason": reason,
            }),
            Backend::Project(projects) => json!({
                "backend": "project",
                "limit": self.limit,
                "inodes": projects.inodes(),
            }),
            Backend::Image(images) => json!({
                "backend": "image",
                "limit": self.limit,
                "inodes": images.geometry().inodes,
                "imageSize": images.geometry().size,
            }),
        }
    }
}

fn needs_id(project: Option<u32>) -> std::io::Result<u32> {
    project.ok_or_else(|| {
        std::io::Error::other("the session has no host uid to use as its project id")
    })
}
