//! The audit log: who did what to what, when, and how it ended, kept with the sessions (every
//! backend, bounded: see `storage::audit`) and read by admins (`GET /api/v1/audit`,
//! `supervisor ctl audit`).
//!
//! [`record`] is the one way in. It never fails its caller: an entry that cannot be stored is
//! logged as an error, and the action it describes stands (refusing a deletion because its
//! audit line could not be written would let a broken disk block every deletion).

use shared::ids::now_ms;

use crate::principal::Principal;
use crate::storage::{AuditEntry, Storage};

/// What was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Login,
    Logout,
    TokenCreate,
    TokenRevoke,
    SessionCreate,
    SessionDelete,
    ShareCreate,
    ShareRevoke,
    WorkerRestart,
    WorkerStop,
    /// A request refused for want of a principal or of its rights.
    AccessDenied,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Login => "auth.login",
            Self::Logout => "auth.logout",
            Self::TokenCreate => "token.create",
            Self::TokenRevoke => "token.revoke",
            Self::SessionCreate => "session.create",
            Self::SessionDelete => "session.delete",
            Self::ShareCreate => "share.create",
            Self::ShareRevoke => "share.revoke",
            Self::WorkerRestart => "worker.restart",
            Self::WorkerStop => "worker.stop",
            Self::AccessDenied => "access.denied",
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
}

/// Records one entry. `principal` is `None` for a request that had none (an unauthenticated
/// attempt); `target` names what was acted on (a session id, a share link id, a route).
pub async fn record(
    storage: &dyn Storage,
    principal: Option<&Principal>,
    action: Action,
    target: &str,
    outcome: Outcome,
    detail: Option<&str>,
) {
    let (tenant, user, role) = match principal {
        Some(p) => (p.tenant.clone(), p.user.clone(), p.role.as_str().to_owned()),
        None => ("-".to_owned(), "anonymous".to_owned(), "none".to_owned()),
    };
    let entry = AuditEntry {
        id: 0,
        at: now_ms(),
        tenant,
        user,
        role,
        action: action.as_str().to_owned(),
        target: target.to_owned(),
        outcome: outcome.as_str().to_owned(),
        detail: detail.map(str::to_owned),
    }
    .bounded();
    if let Err(e) = storage.append_audit(entry).await {
        tracing::error!(action = action.as_str(), target, error = %e, "could not store an audit entry");
    }
}
