//! Live sessions: the registry of those loaded ([`Sessions`]), each one's worker and current
//! run (`session`), and the event bridge that numbers, stores and fans out what its worker
//! emits (`publish`: stored before fanned out, ARCHITECTURE decision 4); `follow` reads a
//! session's events back out, live and without gaps, and `link` is how a worker's connection
//! reaches its session.
//!
//! Lock order: `publisher` before `inner`; nothing awaits a worker while holding `inner` except
//! starting one, which no other task of that session can be waiting on.

mod follow;
mod link;
mod publish;
mod session;
mod teardown;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use shared::ids::SessionId;

pub use publish::PublishError;
pub use session::{AbortOutcome, RunError, RunOutcome, Session};
pub use teardown::{Releases, Teardowns};

use crate::agio::Agio;
use crate::storage::{SharedStorage, StorageError};

/// What every live session shares with the server: where its events go (storage, AGIO), how
/// it gets a worker, and the limits its runs start under.
pub struct Context {
    pub storage: SharedStorage,
    pub workers: Arc<crate::workers::Context>,
    /// AGIO export, when `agio.provider` is configured.
    pub agio: Option<Arc<Agio>>,
    pub exclusive: ExclusiveSlot,
    /// `server.exclusive`: a run claims the exclusive slot while it runs.
    pub exclusive_mode: bool,
    /// `server.sessionLimits.storedBytes`: a full session starts no run.
    pub stored_bytes_limit: u64,
}

/// The table of sessions this process has live, and what they share.
pub struct Sessions {
    map: Mutex<HashMap<SessionId, Arc<Session>>>,
    ctx: Arc<Context>,
    /// Deleted sessions still being torn down.
    teardowns: Arc<Teardowns>,
    releases: Arc<Releases>,
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Session>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn new(ctx: Context, teardowns: Teardowns, releases: Releases) -> Self {
        Self {
            map: Mutex::default(),
            ctx: Arc::new(ctx),
            teardowns: Arc::new(teardowns),
            releases: Arc::new(releases),
        }
    }

    /// The deleted sessions still being torn down.
    pub fn teardowns(&self) -> &Teardowns {
        &self.teardowns
    }

    /// Takes `session` out of the table and marks it deleted, at once; `false` if another
    /// delete got there first. No request finds it from here on, not even in storage, and no
    /// worker starts for it; [`Sessions::tear_down`] does the rest.
    pub fn retire(&self, session: &Session) -> bool {
        let first = self.teardowns.claim(&session.id);
        self.map().remove(&session.id);
        session.close();
        first
    }

    /// The exclusive-mode slot (see [`ExclusiveSlot`]).
    pub fn exclusive(&self) -> &ExclusiveSlot {
        &self.ctx.exclusive
    }

    /// A new session, empty and live at once.
    pub fn create(&self, id: SessionId, workspace: PathBuf, tenant: String) -> Arc<Session> {
        let session = Arc::new(Session::new(id, workspace, tenant, 0, self.ctx.clone()));
        self.map().insert(session.id.clone(), session.clone());
        session
    }

    pub fn get(&self, id: &SessionId) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Sessions with a live worker.
    pub fn live_workers(&self) -> usize {
        self.map()
            .values()
            .filter(|s| s.activity.has_worker())
            .count()
    }

    /// `tenant`'s live sessions with a worker, and those running a query.
    pub fn tenant_activity(&self, tenant: &str) -> (usize, usize) {
        self.map()
            .values()
            .filter(|s| s.tenant == tenant)
            .fold((0, 0), |(workers, runs), s| {
                (
                    workers + usize::from(s.activity.has_worker()),
                    runs + usize::from(s.activity.is_running()),
                )
            })
    }

    /// `tenant`'s session whose idle worker was used least recently, other than `except`.
    pub fn least_recent_idle_of(&self, tenant: &str, except: &SessionId) -> Option<Arc<Session>> {
        self.map()
            .values()
            .filter(|s| {
                s.tenant == tenant
                    && s.id != *except
                    && s.activity.has_worker()
                    && !s.activity.is_running()
            })
            .min_by_key(|s| s.activity.last_active_ms())
            .cloned()
    }

    /// The session whose idle worker was used least recently, other than `except`.
    pub fn least_recent_idle(&self, except: &SessionId) -> Option<Arc<Session>> {
        self.map()
            .values()
            .filter(|s| s.id != *except && s.activity.has_worker() && !s.activity.is_running())
            .min_by_key(|s| s.activity.last_active_ms())
            .cloned()
    }

    /// The live session, or one rebuilt from storage (a session any request names is loaded
    /// again, as upstream does). A restored session has no worker yet: its first query starts
    /// one that reads the stored history.
    ///
    /// # Errors
    /// Storage failed.
    pub async fn get_or_restore(
        &self,
        id: &SessionId,
    ) -> Result<Option<Arc<Session>>, StorageError> {
        let storage = &self.ctx.storage;
        if let Some(live) = self.get(id) {
            return Ok(Some(live));
        }
        // Deleted: its record may still be on its way out of storage.
        if self.teardowns.is_retiring(id) {
            return Ok(None);
        }
        let Some(info) = storage.session(id).await? else {
            return Ok(None);
        };
        let last_seq = storage.last_seq(id).await?;
        let restored = Arc::new(Session::new(
            id.clone(),
            PathBuf::from(info.workspace),
            info.tenant,
            last_seq,
            self.ctx.clone(),
        ));
        // Two concurrent restores of one id must end with one live session.
        let (session, inserted) = {
            let mut map = self.map();
            match map.get(id) {
                Some(live) => (live.clone(), false),
                // Deleted while its record was read.
                None if self.teardowns.is_retiring(id) => return Ok(None),
                None => {
                    map.insert(id.clone(), restored.clone());
                    (restored, true)
                }
            }
        };
        if inserted {
            session.close_interrupted_run(storage).await?;
        }
        Ok(Some(session))
    }
}

/// The exclusive-mode slot (`server.exclusive`): the session currently running a query, if any;
/// while it is held, new sessions are refused.
#[derive(Default)]
pub struct ExclusiveSlot(Mutex<Option<SessionId>>);

impl ExclusiveSlot {
    pub fn holder(&self) -> Option<SessionId> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn claim(&self, session_id: &SessionId) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(session_id.clone());
    }

    /// Clears the slot if (and only if) `session_id` holds it.
    pub fn release(&self, session_id: &SessionId) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref() == Some(session_id) {
            *slot = None;
        }
    }
}
