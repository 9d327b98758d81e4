//! The stored form of an audit entry: who did what to what, when, and how it ended.
//!
//! Every field is cut to a cap before it is stored, and each backend keeps the newest
//! [`AUDIT_KEEP`] entries (older ones are dropped as new ones come), so neither a long name nor
//! a flood of denied requests can grow the store without bound.

use serde::{Deserialize, Serialize};

/// Entries each backend keeps at least; older ones go.
pub const AUDIT_KEEP: u64 = 10_000;
/// Tenant, user, role, action and outcome, each.
pub const AUDIT_NAME_MAX_CHARS: usize = 128;
/// The target (a session id, a share link id, a route).
pub const AUDIT_TARGET_MAX_CHARS: usize = 256;
/// The free-text detail.
pub const AUDIT_DETAIL_MAX_CHARS: usize = 512;

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Increasing with time within one store; the paging cursor. Set by the store.
    #[serde(default)]
    pub id: u64,
    /// Milliseconds since the epoch.
    pub at: u64,
    pub tenant: String,
    pub user: String,
    pub role: String,
    /// What was attempted, e.g. `session.create`.
    pub action: String,
    pub target: String,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditEntry {
    /// The entry with every field cut to its cap (on a character boundary).
    #[must_use]
    pub fn bounded(mut self) -> Self {
        for field in [
            &mut self.tenant,
            &mut self.user,
            &mut self.role,
            &mut self.action,
            &mut self.outcome,
        ] {
            clip(field, AUDIT_NAME_MAX_CHARS);
        }
        clip(&mut self.target, AUDIT_TARGET_MAX_CHARS);
        if let Some(detail) = &mut self.detail {
            clip(detail, AUDIT_DETAIL_MAX_CHARS);
        }
        self
    }
}

fn clip(text: &mut String, max_chars: usize) {
    if let Some((at, _)) = text.char_indices().nth(max_chars) {
        text.truncate(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_cut_to_its_cap() {
        let long = "é".repeat(10_000);
        let entry = AuditEntry {
            id: 0,
            at: 1,
            tenant: long.clone(),
            user: long.clone(),
            role: long.clone(),
            action: long.clone(),
            target: long.clone(),
            outcome: long.clone(),
            detail: Some(long),
        }
        .bounded();
        assert_eq!(entry.tenant.chars().count(), AUDIT_NAME_MAX_CHARS);
        assert_eq!(entry.outcome.chars().count(), AUDIT_NAME_MAX_CHARS);
        assert_eq!(entry.target.chars().count(), AUDIT_TARGET_MAX_CHARS);
        assert_eq!(
            entry.detail.map(|d| d.chars().count()),
            Some(AUDIT_DETAIL_MAX_CHARS)
        );
    }
}
