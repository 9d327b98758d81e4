//! API tokens: `agt_<id>_<secret>`. The id finds the record; the secret is checked against the
//! stored SHA-256 of it in constant time. Only the hash is ever stored or logged.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthError;
use crate::principal::{Principal, Role};
use crate::storage::{MAX_TOKEN_NAME, Storage, StorageError, TokenRecord};

/// What every API token starts with, so a credential is told from a JWT at a glance.
pub const PREFIX: &str = "agt_";
/// The longest tenant or user name a token may carry.
const MAX_NAME: usize = 64;

/// What `ctl tokens create` asks for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewToken {
    pub tenant: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default = "member")]
    pub role: Role,
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
}

fn member() -> Role {
    Role::Member
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tenant or user name: letters, digits, `.`, `_`, `-`, `@`, at most 64.
fn check_name(what: &str, name: &str) -> Result<(), TokenError> {
    let fine = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if fine {
        Ok(())
    } else {
        Err(TokenError::Invalid(format!(
            "{what} {name:?} must be 1 to {MAX_NAME} letters, digits, '.', '_', '-' or '@'"
        )))
    }
}

/// Creates and stores a token; returns its record and the secret text, which exists nowhere
/// else from then on.
///
/// # Errors
/// A bad tenant, user or name, or storage failed.
pub async fn create(
    storage: &dyn Storage,
    new: NewToken,
    now: u64,
) -> Result<(TokenRecord, String), TokenError> {
    check_name("tenant", &new.tenant)?;
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let user = new.user.unwrap_or_else(|| format!("token-{id}"));
    check_name("user", &user)?;
    if let Some(name) = &new.name
        && (name.len() > MAX_TOKEN_NAME || name.chars().any(char::is_control))
    {
        return Err(TokenError::Invalid(format!(
            "a token name is at most {MAX_TOKEN_NAME} printable characters"
        )));
    }
    // Two v4 UUIDs: 244 random bits from the OS generator.
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let record = TokenRecord {
        id: id.clone(),
        name: new.name,
        tenant: new.tenant,
        user,
        role: new.role,
        created_at: now,
        expires_at: new
            .expires_in_secs
            .map(|secs| now.saturating_add(secs.saturating_mul(1000))),
        revoked_at: None,
        hash: sha256_hex(&secret),
    };
    storage.create_token(record.clone()).await?;
    Ok((record, format!("{PREFIX}{id}_{secret}")))
}

/// The principal a token acts for, read from storage on every use, so a revocation or an
/// expiry holds from the very next request on every node sharing the store.
///
/// # Errors
/// Not a token of ours, a wrong secret, revoked, expired, or storage failed.
pub(super) async fn principal(
    storage: &dyn Storage,
    text: &str,
    now: u64,
) -> Result<Principal, AuthError> {
    let (id, secret) = text
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .filter(|(id, secret)| id.len() == 16 && secret.len() == 64)
        .ok_or(AuthError::InvalidCredential)?;
    let record = storage
        .token(id)
        .await?
        .ok_or(AuthError::InvalidCredential)?;
    let matches: bool = sha256_hex(secret)
        .as_bytes()
        .ct_eq(record.hash.as_bytes())
        .into();
    if !matches {
        return Err(AuthError::InvalidCredential);
    }
    if record.revoked_at.is_some() {
        return Err(AuthError::Revoked);
    }
    if record.expires_at.is_some_and(|at| at <= now) {
        return Err(AuthError::Expired);
    }
    Ok(Principal {
        tenant: record.tenant,
        user: record.user,
        role: record.role,
    })
}

/// `30d`, `12h`, `90m`, `3600s` or a bare number of seconds.
///
/// # Errors
/// Anything else, or zero.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: use a number with s, m, h, d or w, like 30d"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: use a number with s, m, h, d or w, like 30d"))?;
    if n == 0 {
        return Err("an expiry must be in the future".into());
    }
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn new(tenant: &str) -> NewToken {
        NewToken {
            tenant: tenant.into(),
            user: Some("ann".into()),
            role: Role::Member,
            expires_in_secs: Some(60),
            name: None,
        }
    }

    #[tokio::test]
    async fn a_token_is_checked_against_its_hash_only() {
        let storage = MemoryStorage::new();
        let (record, secret) = create(&storage, new("acme"), 1000).await.unwrap();
        assert!(!record.hash.contains(&secret[PREFIX.len() + 17..]));
        let p = principal(&storage, &secret, 2000).await.unwrap();
        assert_eq!((p.tenant.as_str(), p.user.as_str()), ("acme", "ann"));
        // One character off in the secret, or in the id.
        let mut wrong = secret.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        let wrong = String::from_utf8(wrong).unwrap();
        assert!(matches!(
            principal(&storage, &wrong, 2000).await,
            Err(AuthError::InvalidCredential)
        ));
        assert!(matches!(
            principal(&storage, &secret, 1000 + 60_000).await,
            Err(AuthError::Expired)
        ));
        storage.revoke_token(&record.id, 3000).await.unwrap();
        assert!(matches!(
            principal(&storage, &secret, 2000).await,
            Err(AuthError::Revoked)
        ));
        assert!(create(&storage, new("a b"), 1).await.is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("90m").unwrap(), 5400);
        assert_eq!(parse_duration("15").unwrap(), 15);
        assert!(parse_duration("0d").is_err() && parse_duration("3y").is_err());
    }
}
