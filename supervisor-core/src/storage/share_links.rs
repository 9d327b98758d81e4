//! The stored form of a share link (`/s/<token>`): which session it shows, to whom it belongs,
//! until when. The token itself is never stored, only its SHA-256: a copy of the store does not
//! let anyone open a link, and a lookup by hash compares nothing secret byte by byte.

use serde::{Deserialize, Serialize};

/// Live links one session may have at once, so that the table stays bounded however often a
/// client shares (revoked links are removed, expired ones count until revoked or their session
/// is deleted).
pub const SHARE_LINKS_PER_SESSION: usize = 32;

/// One share link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareLink {
    /// The public handle the owner lists and revokes it by; not the token.
    pub id: String,
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    pub session_id: String,
    /// The tenant of the session, so that listing and revoking are scoped to it.
    pub tenant: String,
    /// The user that made it.
    pub created_by: String,
    pub created_at: u64,
    /// Milliseconds since the epoch after which the link answers 404; none: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl ShareLink {
    /// Whether the link may still be opened at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}
