//! What every request handler and background task shares.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::{Map, Value, json};
use shared::ids::{SessionId, now_ms};
use tokio_util::sync::CancellationToken;

use crate::agio::Agio;
use crate::config::Config;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::isolation::Isolation;
use crate::sessions::{ExclusiveSlot, Session, Sessions};
use crate::share::Sharing;
use crate::storage::{SessionInfo, SharedStorage};
use crate::webui::WebUi;
use crate::workers::Spawner;

pub struct AppState {
    pub config: Config,
    /// Absolute root under which each session's workspace directory lives.
    pub workspace_root: PathBuf,
    pub storage: SharedStorage,
    pub sessions: Sessions,
    pub spawner: Spawner,
    /// The isolation established at start-up, which every worker is jailed by.
    pub isolation: Arc<Isolation>,
    pub gateway: Arc<Gateway>,
    /// AGIO export, when `agio.provider` is configured.
    pub agio: Option<Arc<Agio>>,
    pub exclusive: ExclusiveSlot,
    /// The web UI served on non-API paths.
    pub webui: Arc<WebUi>,
    /// Where shared sessions are uploaded, if anywhere.
    pub sharing: Sharing,
    pub started: Instant,
    /// Cancelled when the server has stopped its runs; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// Set by `ctl drain` and at SIGTERM: running runs finish, no new run starts.
    pub draining: AtomicBool,
    /// Workers admitted but not live yet (see [`Admission`]).
    pub starting: Arc<AtomicUsize>,
    /// Makes admission's count-and-reserve one step.
    pub admission: std::sync::Mutex<()>,
}

/// A worker slot held from admission until the worker is live or its start failed, so that two
/// first queries racing for the last slot cannot both have it. Counted in
/// [`AppState::starting`] while held.
#[must_use = "the slot is released when this is dropped"]
pub struct Admission {
    starting: Option<Arc<AtomicUsize>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(starting) = &self.starting {
            starting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl AppState {
    /// Admission control for a run of `session`: refused while draining; and when the session
    /// needs a new worker, refused with 429 if the host is short of memory, or if one more
    /// worker would take the sessions past a cap: the worker slots (`server.workers.max`), or
    /// the sum of the sessions' memory or process limits past `isolation.limits.totalMemory` /
    /// `totalPids` (each worker commits its full limits, used or not, so the host cannot be
    /// overrun however the sessions behave). An idle worker (least recently used first) is
    /// stopped to make room: it hibernates, and wakes on its next query with its history intact.
    ///
    /// # Errors
    /// `Draining`, or `Overloaded` with a retry delay and the cap that was reached.
    pub async fn admit(&self, session: &Session) -> Result<Admission, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::Draining);
        }
        if session.activity.has_worker() {
            return Ok(Admission { starting: None });
        }
        let policy = &self.config.server.workers;
        if let Some(available) = available_memory_mb()
            && available < policy.min_free_memory_mb
        {
            crate::metrics::METRICS.admissions_refused.inc();
            return Err(ApiError::Overloaded {
                reason: format!(
                    "the host has {available} MiB of memory available, below the reserve of {} MiB",
                    policy.min_free_memory_mb
                ),
                retry_after_secs: 5,
            });
        }
        let isolation = self.isolation.clone();
        let totals = isolation.totals();
        let (memory, pids) = isolation.session_commitment();
        let by_memory = usize::try_from(totals.memory / memory.max(1)).unwrap_or(usize::MAX);
        let by_pids = usize::try_from(totals.pids / pids.max(1)).unwrap_or(usize::MAX);
        let cap = policy.max.min(by_memory).min(by_pids);
        loop {
            let committed = {
                let _one_at_a_time = self
                    .admission
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let committed =
                    self.sessions.live_workers() + self.starting.load(Ordering::Acquire);
                if committed < cap {
                    self.starting.fetch_add(1, Ordering::AcqRel);
                    return Ok(Admission {
                        starting: Some(self.starting.clone()),
                    });
                }
                committed
            };
            let Some(victim) = self.sessions.least_recent_idle(&session.id) else {
                crate::metrics::METRICS.admissions_refused.inc();
                let reason = if cap == by_memory && by_memory <= by_pids && by_memory < policy.max {
                    format!(
                        "the sessions' memory total is committed: {committed} workers × {} reach isolation.limits.totalMemory ({})",
                        shared::jail::human_bytes(memory),
                        shared::jail::human_bytes(totals.memory)
                    )
                } else if cap == by_pids && by_pids < policy.max {
                    format!(
                        "the sessions' process total is committed: {committed} workers × {pids} processes reach isolation.limits.totalPids ({})",
                        totals.pids
                    )
                } else {
                    format!("all {} worker slots are running queries", policy.max)
                };
                return Err(ApiError::Overloaded {
                    reason,
                    retry_after_secs: 2,
                });
            };
            tracing::info!(session_id = %victim.id, "hibernating the least recently used idle worker to make room");
            crate::metrics::METRICS.hibernations.inc();
            victim.stop_worker().await;
        }
    }

    /// The host uid of `session_id` (root mode): the recorded one, or a new one, recorded in
    /// storage before it is used.
    ///
    /// # Errors
    /// Every id of the range belongs to a stored session, or storage failed.
    pub async fn host_id(&self, session_id: &SessionId) -> Result<Option<u32>, ApiError> {
        let isolation = self.isolation.clone();
        let Some(ids) = isolation.host_ids() else {
            return Ok(None);
        };
        if let Some(id) = ids.get(session_id) {
            return Ok(Some(id));
        }
        let id = ids
            .assign(session_id)
            .map_err(|e| ApiError::WorkerUnavailable {
                session: session_id.to_string(),
                reason: e.to_string(),
            })?;
        if let Err(e) = self.storage.set_host_id(session_id, id).await {
            ids.release(session_id);
            return Err(e.into());
        }
        Ok(Some(id))
    }

    /// Before a workspace is used (restored, or about to get a worker): its disk quota is in
    /// force again (an image mounted after a reboot, a project limit set as configured now).
    ///
    /// # Errors
    /// The quota could not be set up: the workspace is not used without it.
    pub async fn ensure_workspace(&self, session: &Session) -> Result<(), ApiError> {
        let isolation = self.isolation.clone();
        if isolation.disk().enforced_limit().is_none() {
            return Ok(());
        }
        let project = self.host_id(&session.id).await?;
        let (id, workspace) = (session.id.clone(), session.workspace.clone());
        let ensured =
            tokio::task::spawn_blocking(move || isolation.disk().ensure(&id, &workspace, project))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        match ensured {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(session_id = %session.id, "the workspace has files from before the disk quota was in force: it stays without a quota");
                Ok(())
            }
            Err(e) => Err(ApiError::WorkerUnavailable {
                session: session.id.to_string(),
                reason: format!("the workspace's disk quota could not be set up: {e}"),
            }),
        }
    }

    /// The live session `id`, restored from storage if it is not loaded.
    ///
    /// # Errors
    /// `SessionNotFound` when it exists nowhere.
    pub async fn session(&self, id: &SessionId) -> Result<Arc<Session>, ApiError> {
        if let Some(live) = self.sessions.get(id) {
            return Ok(live);
        }
        let session = self
            .sessions
            .get_or_restore(&self.storage, id)
            .await?
            .ok_or_else(|| ApiError::SessionNotFound(id.to_string()))?;
        self.ensure_workspace(&session).await?;
        Ok(session)
    }

    /// Creates a session: its own workspace directory, its stored record, its live entry.
    /// Nothing is left behind if a step fails.
    ///
    /// # Errors
    /// The directory or the record could not be created.
    pub async fn create_session(
        &self,
        extra_metadata: Map<String, Value>,
    ) -> Result<(Arc<Session>, SessionInfo), ApiError> {
        let now = now_ms();
        let model = self.config.default_model();
        let mut metadata = Map::new();
        metadata.insert(
            "agentInfo".into(),
            json!({"name": self.config.agent_name(), "configuredAt": now}),
        );
        let mut model_config = json!({"provider": model.provider, "id": model.id});
        if let Some(name) = model.display_name {
            model_config["displayName"] = json!(name);
        }
        metadata.insert("modelConfig".into(), model_config);
        metadata.extend(extra_metadata);
        // Before the workspace exists: a refused record leaves nothing behind. The storage
        // checks again, as it does for every write.
        crate::storage::check_metadata(&metadata).map_err(ApiError::RecordTooLarge)?;
        let id = SessionId::random();
        let workspace = self.workspace_root.join(&id);
        create_private_dir(&workspace).map_err(|e| {
            ApiError::Internal(format!("could not create the session workspace: {e}"))
        })?;
        let info = SessionInfo {
            id: id.to_string(),
            created_at: now,
            updated_at: now,
            workspace: workspace.to_string_lossy().into_owned(),
            metadata: Some(metadata),
        };
        let info = match self.storage.create_session(info).await {
            Ok(info) => info,
            Err(e) => {
                // Just created by us, so still empty.
                let _ = std::fs::remove_dir(&workspace);
                return Err(e.into());
            }
        };
        // Its host uid and disk quota exist before anything can be written into it.
        if let Err(e) = self.provision(&id, &workspace).await {
            let _ = self.storage.delete_session(&id).await;
            if let Some(ids) = self.isolation.clone().host_ids() {
                ids.release(&id);
            }
            let _ = std::fs::remove_dir_all(&workspace);
            return Err(e);
        }
        let session = Arc::new(Session::new(id, workspace, 0));
        self.sessions.insert(session.clone());
        tracing::info!(session_id = %session.id, "session created");
        crate::metrics::METRICS.sessions_created.inc();
        Ok((session, info))
    }

    /// A new session's host uid (recorded) and its workspace's disk quota.
    async fn provision(&self, id: &SessionId, workspace: &std::path::Path) -> Result<(), ApiError> {
        let project = self.host_id(id).await?;
        let isolation = self.isolation.clone();
        let (id, workspace) = (id.clone(), workspace.to_owned());
        tokio::task::spawn_blocking(move || isolation.disk().attach(&id, &workspace, project))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| {
                ApiError::Internal(format!("could not set up the workspace's disk quota: {e}"))
            })
    }

    /// Deletes a session: stops its worker, removes its record and events, then its workspace.
    ///
    /// # Errors
    /// `SessionNotFoundInStorage` when the record was already gone.
    pub async fn delete_session(&self, session: &Arc<Session>) -> Result<(), ApiError> {
        self.sessions.remove(&session.id);
        session.close().await;
        if let Some(agio) = &self.agio {
            agio.close(&session.id);
        }
        self.exclusive.release(&session.id);
        let existed = self.storage.delete_session(&session.id).await?;
        // The quota goes first: an image is unmounted, so the directory below is empty.
        let isolation = self.isolation.clone();
        let project = isolation.host_ids().and_then(|ids| ids.get(&session.id));
        let (id, workspace) = (session.id.clone(), session.workspace.clone());
        let released = isolation.clone();
        let _ = tokio::task::spawn_blocking(move || {
            released.disk().release(&id, &workspace, project);
        })
        .await;
        if let Some(ids) = isolation.host_ids() {
            ids.release(&session.id);
        }
        remove_workspace(&session.id, session.workspace.clone()).await;
        tracing::info!(session_id = %session.id, "session deleted");
        if existed {
            Ok(())
        } else {
            Err(ApiError::SessionNotFoundInStorage(session.id.to_string()))
        }
    }

    /// A session record as its clients see it: the workspace is the path inside the session's
    /// jail (`/workspace` at strict, `/` at chroot; the host path only at `none`, where the
    /// worker sees that), never where it lives on the host.
    pub fn shown(&self, mut info: SessionInfo) -> SessionInfo {
        info.workspace = self
            .isolation
            .workspace_inside(std::path::Path::new(&info.workspace));
        info
    }

    /// The model as the API shows it: never a key or a URL.
    pub fn model_json(&self) -> Value {
        let model = self.config.default_model();
        let mut value = json!({"provider": model.provider, "id": model.id});
        if let Some(name) = model.display_name {
            value["displayName"] = json!(name);
        }
        value
    }
}

/// Removes a session's workspace on a blocking thread: the tree may be of any shape and size,
/// and nothing of it may block the runtime (see `workspace::remove`). A failure is logged; what
/// could not be removed stays on disk.
async fn remove_workspace(session_id: &SessionId, workspace: std::path::PathBuf) {
    let removal = tokio::task::spawn_blocking(move || crate::workspace::remove(&workspace)).await;
    match removal {
        Ok(Ok(removed)) => tracing::debug!(
            %session_id,
            files = removed.files,
            directories = removed.directories,
            "workspace removed"
        ),
        Ok(Err(e)) => {
            tracing::warn!(%session_id, error = %e, "could not remove the workspace");
        }
        Err(e) => {
            tracing::warn!(%session_id, error = %e, "the workspace removal did not finish");
        }
    }
}

/// `MemAvailable` of the host, if it can be read.
fn available_memory_mb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// `mkdir` with mode 0700: a session's files are nobody else's business.
fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)
}
