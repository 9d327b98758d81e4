//! A session's host resources: its own host uid (root mode) and its workspace's disk quota.
//! Both exist, and the uid is recorded in storage, before anything of the session runs or is
//! written; both go when the session is deleted.

use std::path::Path;
use std::sync::Arc;

use shared::ids::SessionId;

use crate::isolation::Isolation;
use crate::isolation::host_ids::HostIdError;
use crate::storage::{SharedStorage, StorageError};

/// Why a session's host resources could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{source}")]
    HostId {
        session: SessionId,
        source: HostIdError,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An existing workspace (restored, or about to get a worker) could not get its quota back.
    #[error("the workspace's disk quota could not be set up: {source}")]
    Quota {
        session: SessionId,
        source: std::io::Error,
    },
    /// A new workspace could not get its quota.
    #[error("could not set up the workspace's disk quota: {0}")]
    NewQuota(std::io::Error),
    #[error("{0}")]
    Interrupted(#[from] tokio::task::JoinError),
}

/// Sets up and releases sessions' host uids and disk quotas.
#[derive(Clone)]
pub struct Provisioner {
    isolation: Arc<Isolation>,
    storage: SharedStorage,
}

impl Provisioner {
    pub fn new(isolation: Arc<Isolation>, storage: SharedStorage) -> Self {
        Self { isolation, storage }
    }

    /// The host uid of `session` (root mode): the recorded one, or a new one, recorded in
    /// storage before it is used.
    ///
    /// # Errors
    /// Every id of the range belongs to a stored session, or storage failed.
    pub async fn host_id(&self, session: &SessionId) -> Result<Option<u32>, ProvisionError> {
        let Some(ids) = self.isolation.host_ids() else {
            return Ok(None);
        };
        if let Some(id) = ids.get(session) {
            return Ok(Some(id));
        }
        let id = ids
            .assign(session)
            .map_err(|source| ProvisionError::HostId {
                session: session.clone(),
                source,
            })?;
        if let Err(e) = self.storage.set_host_id(session, id).await {
            ids.release(session);
            return Err(e.into());
        }
        Ok(Some(id))
    }

    /// A new session's host uid (recorded) and its empty workspace's disk quota.
    ///
    /// # Errors
    /// The uid or the quota could not be had.
    pub async fn attach(
        &self,
        session: &SessionId,
        workspace: &Path,
    ) -> Result<(), ProvisionError> {
        let project = self.host_id(session).await?;
        let isolation = self.isolation.clone();
        let (id, workspace) = (session.clone(), workspace.to_owned());
        tokio::task::spawn_blocking(move || isolation.disk().attach(&id, &workspace, project))
            .await?
            .map_err(ProvisionError::NewQuota)
    }

    /// Before a workspace is used (restored, or about to get a worker): its disk quota is in
    /// force again (an image mounted after a reboot, a project limit set as configured now).
    ///
    /// # Errors
    /// The quota could not be set up: the workspace is not used without it.
    pub async fn ensure(
        &self,
        session: &SessionId,
        workspace: &Path,
    ) -> Result<(), ProvisionError> {
        if self.isolation.disk().enforced_limit().is_none() {
            return Ok(());
        }
        let project = self.host_id(session).await?;
        let isolation = self.isolation.clone();
        let (id, dir) = (session.clone(), workspace.to_owned());
        let ensured =
            tokio::task::spawn_blocking(move || isolation.disk().ensure(&id, &dir, project))
                .await?;
        match ensured {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(session_id = %session, "the workspace has files from before the disk quota was in force: it stays without a quota");
                Ok(())
            }
            Err(source) => Err(ProvisionError::Quota {
                session: session.clone(),
                source,
            }),
        }
    }

    /// A deleted session's quota (an image is unmounted, so its directory is left empty). Its
    /// host uid is kept: the caller gives it back once the workspace is gone. Failures are
    /// logged by the disk quota; nothing here can stop a deletion.
    pub async fn release_quota(&self, session: &SessionId, workspace: &Path) {
        let project = self.isolation.host_ids().and_then(|ids| ids.get(session));
        let isolation = self.isolation.clone();
        let (id, dir) = (session.clone(), workspace.to_owned());
        let _ =
            tokio::task::spawn_blocking(move || isolation.disk().release(&id, &dir, project)).await;
    }

    /// At start: the uids of sessions deleted before the last stop whose files may remain are
    /// taken again until their teardown gives them back.
    pub fn hold_host_ids(&self, held: impl IntoIterator<Item = (SessionId, u32)>) {
        if let Some(ids) = self.isolation.host_ids() {
            for problem in ids.load(held) {
                tracing::warn!(%problem, "held host uids of deleted sessions");
            }
        }
    }

    /// Gives back the uid of a session whose creation failed before anything used it, or whose
    /// teardown has finished.
    pub fn release_host_id(&self, session: &SessionId) {
        if let Some(ids) = self.isolation.host_ids() {
            ids.release(session);
        }
    }
}
