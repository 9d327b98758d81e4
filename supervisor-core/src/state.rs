//! What every request handler and background task shares, and the operations on sessions that
//! span several parts of it: looking one up (restoring it), creating and deleting one, and
//! starting its runs under admission control.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value, json};
use shared::ids::{SessionId, now_ms};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::agio::Agio;
use crate::audit;
use crate::config::Config;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::isolation::Isolation;
use crate::principal::Principal;
use crate::provision::{ProvisionError, Provisioner};
use crate::quota::Quotas;
use crate::sessions::{Releases, RunOutcome, Session, Sessions, Teardowns};
use crate::share::Sharing;
use crate::storage::{SessionInfo, SharedStorage};
use crate::webui::WebUi;
use crate::workers::{AgentDefaults, Spawner, WorkerHandle};

/// How long a new session waits for a deleted session's host uid when every other one is taken.
const UID_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct AppState {
    pub config: Config,
    /// Absolute root under which each session's workspace directory lives.
    pub workspace_root: PathBuf,
    pub storage: SharedStorage,
    /// The live sessions, and what they share (workers, AGIO, the exclusive slot).
    pub sessions: Sessions,
    /// The isolation established at start-up, which every worker is jailed by.
    pub isolation: Arc<Isolation>,
    /// Sessions' host uids and disk quotas.
    pub provisioner: Provisioner,
    pub gateway: Arc<Gateway>,
    /// AGIO export, when `agio.provider` is configured.
    pub agio: Option<Arc<Agio>>,
    /// Whether a run may start now; drain mode.
    pub admission: Admission,
    /// The tenants' quotas and request rates.
    pub quotas: Quotas,
    /// The web UI served on non-API paths.
    pub webui: Arc<WebUi>,
    /// Where shared sessions are uploaded, if anywhere.
    pub sharing: Sharing,
    pub started: Instant,
    /// Cancelled when the server has stopped its runs; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// Who callers are (`crate::auth`); shared with the outer layer, which needs nothing else.
    pub auth: Arc<crate::auth::Auth>,
}

/// What the state is made of, gathered at start-up.
pub struct Parts {
    pub config: Config,
    pub workspace_root: PathBuf,
    pub storage: SharedStorage,
    pub isolation: Arc<Isolation>,
    pub spawner: Spawner,
    pub gateway: Arc<Gateway>,
    pub agio: Option<Arc<Agio>>,
    pub webui: Arc<WebUi>,
    pub sharing: Sharing,
    pub auth: crate::auth::Auth,
}

impl AppState {
    /// Wires the parts together: each layer gets what it needs of them, nothing more.
    pub fn new(parts: Parts) -> Self {
        let Parts {
            config,
            workspace_root,
            storage,
            isolation,
            spawner,
            gateway,
            agio,
            webui,
            sharing,
            auth,
        } = parts;
        let provisioner = Provisioner::new(isolation.clone(), storage.clone());
        let workers = crate::workers::Context {
            storage: storage.clone(),
            provisioner: provisioner.clone(),
            spawner,
            isolation: isolation.clone(),
            gateway: gateway.clone(),
            agent: AgentDefaults::from_config(&config),
            limits: config.server.session_limits.clone(),
        };
        let sessions = Sessions::new(
            crate::sessions::Context {
                storage: storage.clone(),
                workers: Arc::new(workers),
                agio: agio.clone(),
                exclusive: Default::default(),
                exclusive_mode: config.server.exclusive,
                stored_bytes_limit: config.server.session_limits.stored_bytes.0,
            },
            Teardowns::new(&workspace_root),
            Releases {
                storage: storage.clone(),
                provisioner: provisioner.clone(),
                delay: isolation.test_teardown_delay(),
            },
        );
        let admission = Admission::new(config.server.workers.clone(), isolation.clone());
        let quotas = Quotas::new(config.tenant_limits.clone());
        Self {
            config,
            workspace_root,
            storage,
            sessions,
            isolation,
            provisioner,
            gateway,
            agio,
            admission,
            quotas,
            webui,
            sharing,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            auth: Arc::new(auth),
        }
    }

    /// The session `id` as [`Self::session`] gives it, if `principal` may use it. One the
    /// principal may not use answers exactly like one that does not exist, and nothing is done
    /// to it first (it is not even restored).
    ///
    /// # Errors
    /// `SessionNotFound` for a session that does not exist or is another tenant's.
    pub async fn session_for(
        &self,
        principal: &Principal,
        id: &SessionId,
    ) -> Result<Arc<Session>, ApiError> {
        self.check_access(principal, id).await?;
        self.session(id).await
    }

    /// `SessionNotFound` unless session `id` exists and `principal` may use it.
    ///
    /// # Errors
    /// As said; storage failures.
    pub async fn check_access(
        &self,
        principal: &Principal,
        id: &SessionId,
    ) -> Result<(), ApiError> {
        match self.storage.session(id).await? {
            Some(info) if crate::auth::may_access(principal, info.tenant()) => Ok(()),
            _ => Err(ApiError::SessionNotFound(id.to_string())),
        }
    }

    /// The live session `id`, restored from storage if it is not loaded (any request that
    /// names a stored session loads it again, as upstream does).
    ///
    /// # Errors
    /// `SessionNotFound` when it exists nowhere; its workspace's quota could not be had.
    pub async fn session(&self, id: &SessionId) -> Result<Arc<Session>, ApiError> {
        if let Some(live) = self.sessions.get(id) {
            return Ok(live);
        }
        let session = self
            .sessions
            .get_or_restore(id)
            .await?
            .ok_or_else(|| ApiError::SessionNotFound(id.to_string()))?;
        self.provisioner
            .ensure(&session.id, &session.workspace)
            .await?;
        Ok(session)
    }

    /// Starts a run of `session` once its tenant's quotas (`quota`) and admission (see
    /// `admission`) let it: both hold their place until the run is under way.
    ///
    /// # Errors
    /// Refused by a quota or by admission, or the session could not start it.
    pub async fn start_run(
        &self,
        session: &Arc<Session>,
        input: &Value,
        stream: bool,
    ) -> Result<oneshot::Receiver<RunOutcome>, ApiError> {
        let _permit = self.quotas.admit_run(&self.sessions, session).await?;
        let _slot = self.admission.admit(&self.sessions, session).await?;
        Ok(session.start_run(input, stream).await?)
    }

    /// Replaces the session's worker with a fresh process, which reads the session's history
    /// from the log; followers and history are untouched. A run in progress ends as an error,
    /// recorded in the log like any lost worker's run: a stuck run is often why an operator
    /// restarts.
    ///
    /// # Errors
    /// `SessionNotFound` for a deleted session; admission refusals; `WorkerUnavailable` if the
    /// new worker cannot start.
    pub async fn restart_worker(&self, session: &Arc<Session>) -> Result<WorkerHandle, ApiError> {
        if session.is_closed() {
            return Err(ApiError::SessionNotFound(session.id.to_string()));
        }
        session.stop_worker().await;
        let _slot = self.admission.admit(&self.sessions, session).await?;
        Ok(session.ensure_worker().await?)
    }

    /// Creates a session of `principal`'s tenant: its own workspace directory, its stored
    /// record, its host uid and disk quota, its live entry. Nothing is left behind if a step
    /// fails. Audited.
    ///
    /// # Errors
    /// The tenant's `sessions` quota is reached; the directory, the record, the uid or the
    /// quota could not be had.
    pub async fn create_session(
        &self,
        principal: &Principal,
        extra_metadata: Map<String, Value>,
    ) -> Result<(Arc<Session>, SessionInfo), ApiError> {
        let created = self
            .create_session_unaudited(principal, extra_metadata)
            .await;
        let (target, outcome, detail) = match &created {
            Ok((session, _)) => (session.id.to_string(), audit::Outcome::Ok, None),
            Err(e @ ApiError::QuotaExceeded { .. }) => {
                (String::new(), audit::Outcome::Denied, Some(e.to_string()))
            }
            Err(e) => (String::new(), audit::Outcome::Failed, Some(e.to_string())),
        };
        audit::record(
            &*self.storage,
            Some(principal),
            audit::Action::SessionCreate,
            &target,
            outcome,
            detail.as_deref(),
        )
        .await;
        created
    }

    async fn create_session_unaudited(
        &self,
        principal: &Principal,
        extra_metadata: Map<String, Value>,
    ) -> Result<(Arc<Session>, SessionInfo), ApiError> {
        let tenant = principal.tenant.clone();
        let _slot = self.quotas.session_slot(&self.storage, &tenant).await?;
        let now = now_ms();
        let mut metadata = Map::new();
        metadata.insert(
            "agentInfo".into(),
            json!({"name": self.config.agent_name(), "configuredAt": now}),
        );
        metadata.insert("modelConfig".into(), self.model_json());
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
            tenant: tenant.clone(),
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
        let mut attached = self.provisioner.attach(&id, &workspace).await;
        // Every uid taken: a deleted session's comes back once its teardown has finished.
        while matches!(attached, Err(ProvisionError::HostId { .. }))
            && self.sessions.teardowns().wait_for_one(UID_WAIT).await
        {
            attached = self.provisioner.attach(&id, &workspace).await;
        }
        if let Err(e) = attached {
            let _ = self.storage.delete_session(&id).await;
            self.provisioner.release_host_id(&id);
            let _ = std::fs::remove_dir_all(&workspace);
            return Err(e.into());
        }
        let session = self.sessions.create(id, workspace, tenant);
        tracing::info!(session_id = %session.id, "session created");
        crate::metrics::METRICS.sessions_created.inc();
        Ok((session, info))
    }

    /// Deletes a session for `principal`, audited: it answers once the session is gone from the
    /// table and from storage (with its events and share links). Its worker, quota, workspace
    /// and host uid are released in the background (see `sessions::teardown`), journalled first
    /// so that a crash half-way does not lose them.
    ///
    /// # Errors
    /// `SessionNotFoundInStorage` when the record was already gone; storage failed (the
    /// session's worker is stopped, its record and workspace stay).
    pub async fn delete_session(
        &self,
        principal: &Principal,
        session: &Arc<Session>,
    ) -> Result<(), ApiError> {
        let deleted = self.delete_session_unaudited(session).await;
        let (outcome, detail) = match &deleted {
            Ok(()) => (audit::Outcome::Ok, None),
            Err(e) => (audit::Outcome::Failed, Some(e.to_string())),
        };
        audit::record(
            &*self.storage,
            Some(principal),
            audit::Action::SessionDelete,
            &session.id,
            outcome,
            detail.as_deref(),
        )
        .await;
        deleted
    }

    async fn delete_session_unaudited(&self, session: &Arc<Session>) -> Result<(), ApiError> {
        let first = self.sessions.retire(session);
        if let Some(agio) = &self.agio {
            agio.close(&session.id);
        }
        self.sessions.exclusive().release(&session.id);
        if !first {
            // Another delete is tearing it down.
            return Err(ApiError::SessionNotFoundInStorage(session.id.to_string()));
        }
        let host_uid = self
            .isolation
            .host_ids()
            .and_then(|ids| ids.get(&session.id));
        if let Err(e) = self
            .sessions
            .teardowns()
            .note(&session.id, &session.workspace, host_uid)
        {
            tracing::warn!(session_id = %session.id, error = %e, "could not journal the teardown; a crash before it ends leaves the workspace");
        }
        let existed = match self.storage.delete_session(&session.id).await {
            Ok(existed) => existed,
            Err(e) => {
                // The record stays, so do its workspace and uid; the next request restores it.
                self.sessions.tear_down(session.clone(), false);
                return Err(e.into());
            }
        };
        self.sessions.tear_down(session.clone(), true);
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
        info.workspace = self.isolation.workspace_inside(Path::new(&info.workspace));
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

/// `mkdir` with mode 0700: a session's files are nobody else's business.
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)
}
