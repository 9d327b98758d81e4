//! What happens to a deleted session after its delete has been answered: its worker stopped,
//! its disk quota released (an image unmounted), its workspace removed, and its host uid given
//! back, in that order, the uid last, so no new session runs as a uid that a process or a file
//! of the old one still has.
//!
//! Why not on the request path: stopping a worker waits for its processes to leave their
//! cgroup, unmounting an image waits for ext4, and a workspace may hold any number of files; a
//! delete answered after all that took tens of milliseconds, most of it waiting. A delete now
//! answers once the session is gone from the table and from storage; the rest runs here.
//!
//! Reliably: before the delete is answered, a journal entry `<workspace root>/.deleting/<id>`
//! records the session's workspace and host uid; it goes only when the teardown has finished.
//! A server killed half-way finds the entries at its next start ([`Teardowns::resume`]), holds
//! their uids again, and finishes the job. Only journalled paths are ever removed: a directory
//! that merely looks like a session's is never touched.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::ids::SessionId;
use tokio_util::task::TaskTracker;

use super::Session;
use crate::storage::SharedStorage;

/// The journal's directory under the workspace root: `.` is not in the session id alphabet.
const JOURNAL_DIR: &str = ".deleting";
/// A journal entry is a few hundred bytes; anything larger is not ours.
const ENTRY_LIMIT: u64 = 16 * 1024;
/// How often a teardown that still waits for its worker says so.
const STILL_WAITING: Duration = Duration::from_secs(10);

/// One journal entry: what a deleted session left that a teardown must remove.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    workspace: PathBuf,
    host_uid: Option<u32>,
}

/// The teardowns in progress, and their journal.
pub struct Teardowns {
    journal: PathBuf,
    tasks: TaskTracker,
    /// Sessions being torn down: no request may bring one back from storage meanwhile.
    retiring: Mutex<HashSet<SessionId>>,
    /// Workers of deleted sessions not yet gone: admission still counts them.
    dying_workers: AtomicUsize,
    /// Woken when one of them is gone.
    worker_gone: tokio::sync::Notify,
    /// Woken when a teardown has finished (its uid is free again).
    finished: tokio::sync::Notify,
}

impl Teardowns {
    pub fn new(workspace_root: &Path) -> Self {
        Self {
            journal: workspace_root.join(JOURNAL_DIR),
            tasks: TaskTracker::new(),
            retiring: Mutex::default(),
            dying_workers: AtomicUsize::new(0),
            worker_gone: tokio::sync::Notify::new(),
            finished: tokio::sync::Notify::new(),
        }
    }

    fn retiring(&self) -> std::sync::MutexGuard<'_, HashSet<SessionId>> {
        self.retiring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `id` is being torn down.
    pub fn is_retiring(&self, id: &SessionId) -> bool {
        self.retiring().contains(id)
    }

    /// Marks `id` as being torn down; `false` if it already was (a second delete).
    pub fn claim(&self, id: &SessionId) -> bool {
        self.retiring().insert(id.clone())
    }

    /// Workers of deleted sessions whose processes may still run.
    pub fn dying_workers(&self) -> usize {
        self.dying_workers.load(Ordering::Acquire)
    }

    /// Waits up to `within` for a deleted session's worker to be gone; `false` if there is
    /// none, or none went in time.
    pub async fn wait_for_dying_worker(&self, within: Duration) -> bool {
        let gone = self.worker_gone.notified();
        let mut gone = std::pin::pin!(gone);
        // Registered before the count is read, so a worker leaving in between is not missed.
        gone.as_mut().enable();
        if self.dying_workers() == 0 {
            return false;
        }
        tokio::time::timeout(within, gone).await.is_ok()
    }

    /// Waits up to `within` for a teardown in progress to finish; `false` if none is in
    /// progress, or none finished in time. A new session that found every host uid taken
    /// waits here for a deleted session's uid.
    pub async fn wait_for_one(&self, within: Duration) -> bool {
        let finished = self.finished.notified();
        let mut finished = std::pin::pin!(finished);
        finished.as_mut().enable();
        if self.tasks.is_empty() {
            return false;
        }
        tokio::time::timeout(within, finished).await.is_ok()
    }

    /// Records that `id`'s workspace and uid are to be released, before its delete answers.
    ///
    /// # Errors
    /// The entry could not be written (the teardown still runs, but a crash would leave its
    /// workspace to the operator).
    pub fn note(
        &self,
        id: &SessionId,
        workspace: &Path,
        host_uid: Option<u32>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let entry = Entry {
            workspace: workspace.to_owned(),
            host_uid,
        };
        let json = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        let path = self.journal.join(id.as_str());
        match std::fs::write(&path, &json) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(&self.journal)?;
                std::fs::write(&path, &json)
            }
            other => other,
        }
    }

    fn forget(&self, id: &SessionId) {
        match std::fs::remove_file(self.journal.join(id.as_str())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(session_id = %id, error = %e, "could not clear the teardown journal entry");
            }
            _ => {}
        }
    }

    /// The journal's entries: sessions a previous server deleted but did not finish tearing
    /// down. Unreadable or foreign entries are skipped (and left) with a warning.
    fn pending(&self) -> Vec<(SessionId, Entry)> {
        let Ok(dir) = std::fs::read_dir(&self.journal) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for item in dir.flatten() {
            let name = item.file_name();
            let Some(id) = name.to_str().and_then(|n| SessionId::parse(n).ok()) else {
                continue;
            };
            let entry = item
                .metadata()
                .ok()
                .filter(|m| m.is_file() && m.len() <= ENTRY_LIMIT)
                .and_then(|_| std::fs::read(item.path()).ok())
                .and_then(|bytes| serde_json::from_slice::<Entry>(&bytes).ok());
            match entry {
                Some(entry) => found.push((id, entry)),
                None => {
                    tracing::warn!(session_id = %id, "unreadable teardown journal entry left in place")
                }
            }
        }
        found
    }

    /// Waits (up to `within`) for the teardowns in progress; what is left is in the journal
    /// for the next start.
    pub async fn finish(&self, within: Duration) {
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                "teardowns still running at shutdown; the next start finishes them"
            );
        }
    }
}

/// What a teardown releases, after the session's worker (if any) is gone.
pub struct Releases {
    pub storage: SharedStorage,
    pub provisioner: crate::provision::Provisioner,
    /// Test builds: how long a teardown waits before it starts (the tests catch one half-way).
    pub delay: Duration,
}

impl super::Sessions {
    /// Tears `session` down in the background: stops its worker and waits until its processes
    /// are gone; then, if `remove` (its record is deleted), releases its disk quota, removes its
    /// workspace and gives its host uid back, last. The caller has claimed it and, if
    /// `remove`, journalled it.
    pub fn tear_down(&self, session: Arc<Session>, remove: bool) {
        let teardowns = self.teardowns.clone();
        let releases = self.releases.clone();
        let has_worker = session.activity.has_worker();
        if has_worker {
            teardowns.dying_workers.fetch_add(1, Ordering::AcqRel);
        }
        teardowns.clone().tasks.spawn(async move {
            if !releases.delay.is_zero() {
                tokio::time::sleep(releases.delay).await;
            }
            session.stop_worker_until_gone(STILL_WAITING).await;
            if has_worker {
                teardowns.dying_workers.fetch_sub(1, Ordering::AcqRel);
                teardowns.worker_gone.notify_waiters();
            }
            if remove {
                release(&releases, &session.id, &session.workspace).await;
            }
            teardowns.forget(&session.id);
            teardowns.retiring().remove(&session.id);
            teardowns.finished.notify_waiters();
        });
    }

    /// At start, before anything is served: the sessions a previous server deleted but did not
    /// finish tearing down get their uids held again, and their teardown runs (in the
    /// background). Their processes died with that server (their launchers' parent-death
    /// signal) and their cgroups were swept when ours were set up.
    pub fn resume_teardowns(&self) {
        let teardowns = self.teardowns.clone();
        let releases = self.releases.clone();
        let pending = teardowns.pending();
        if pending.is_empty() {
            return;
        }
        tracing::info!(
            sessions = pending.len(),
            "finishing the teardown of sessions deleted before the last stop"
        );
        releases.provisioner.hold_host_ids(
            pending
                .iter()
                .filter_map(|(id, entry)| entry.host_uid.map(|uid| (id.clone(), uid))),
        );
        for (id, _) in &pending {
            teardowns.claim(id);
        }
        teardowns.clone().tasks.spawn(async move {
            for (id, entry) in pending {
                release(&releases, &id, &entry.workspace).await;
                teardowns.forget(&id);
                teardowns.retiring().remove(&id);
                teardowns.finished.notify_waiters();
            }
        });
    }
}

/// The quota, the workspace, then the uid. A session stored again under the same id meanwhile
/// (an import) keeps its workspace; its uid stays too.
async fn release(releases: &Releases, id: &SessionId, workspace: &Path) {
    match releases.storage.session(id).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            tracing::info!(session_id = %id, "a deleted session's id is stored again: its workspace stays");
            return;
        }
        Err(e) => {
            tracing::warn!(session_id = %id, error = %e, "could not check the deleted session's record; its workspace stays for the next start");
            return;
        }
    }
    releases.provisioner.release_quota(id, workspace).await;
    remove_workspace(id, workspace.to_owned()).await;
    releases.provisioner.release_host_id(id);
    tracing::info!(session_id = %id, "session torn down");
}

/// Removes a session's workspace on a blocking thread: the tree may be of any shape and size,
/// and nothing of it may block the runtime (see `workspace::remove`). A failure is logged; what
/// could not be removed stays on disk.
async fn remove_workspace(session_id: &SessionId, workspace: PathBuf) {
    let removal = tokio::task::spawn_blocking(move || {
        if !workspace.exists() {
            return Ok(Default::default());
        }
        crate::workspace::remove(&workspace)
    })
    .await;
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
