//! Share links: `/s/<token>` shows a session's redacted replay (the same page a download gives)
//! to whoever has the link, until it is revoked or expires.
//!
//! The token is 32 bytes from the OS (64 hex characters): guessing one is hopeless, so no
//! rate of guesses matters beyond the server's own limits. Only its SHA-256 is stored, and a
//! link is found by that hash: the lookup compares hashes of what the client sent, so its
//! timing says nothing about any stored token. A malformed token is refused before any lookup.
//!
//! The page is served with a policy that lets its inline scripts run in a sandbox (an opaque
//! origin: no cookie, no storage, no credentialed call to this server's API), loads nothing from
//! anywhere (`connect-src 'none'`, images only inline), and keeps the token out of `Referer`.

use sha2::{Digest, Sha256};

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// The token's length as hex.
pub const TOKEN_CHARS: usize = TOKEN_BYTES * 2;
/// Longest expiry a link may be given.
pub const MAX_EXPIRY_SECS: u64 = 365 * 24 * 60 * 60;

/// The `Content-Security-Policy` of a share page.
pub const PAGE_POLICY: &str = "sandbox allow-scripts; default-src 'none'; \
script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:; \
connect-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The OS could not give random bytes.
#[derive(Debug, thiserror::Error)]
#[error("no random bytes for a share token: {0}")]
pub struct NoRandomness(String);

/// A fresh token and its hash.
///
/// # Errors
/// The OS random source failed.
pub fn new_token() -> Result<(String, String), NoRandomness> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| NoRandomness(e.to_string()))?;
    let token = hex(&bytes);
    let hash = hash_token(&token);
    Ok((token, hash))
}

/// What is stored of a token.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Whether `token` has a token's shape (so that nothing else is ever hashed and looked up).
pub fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_CHARS
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_well_formed_and_stored_hashed() {
        let (a, hash_a) = new_token().unwrap();
        let (b, _) = new_token().unwrap();
        assert_ne!(a, b);
        assert!(well_formed(&a) && well_formed(&b));
        assert_eq!(hash_a, hash_token(&a));
        assert_ne!(hash_a, a);
        assert_eq!(hash_a.len(), 64);
        for bad in [
            "",
            "abc",
            &a.to_uppercase(),
            &format!("{a}0"),
            &a[1..],
            &"g".repeat(64),
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }
}
