//! API token records (`supervisor ctl tokens ...`): who a token acts for and until when, and
//! the hash of its secret. The secret itself is never stored.

use serde::{Deserialize, Serialize};

use crate::principal::Role;

/// One API token as stored. `hash` is the SHA-256 of the secret, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub tenant: String,
    pub user: String,
    pub role: Role,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    pub hash: String,
}

/// The longest token name kept.
pub const MAX_TOKEN_NAME: usize = 128;
