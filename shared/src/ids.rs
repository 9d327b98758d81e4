//! Identifiers and the clock every API timestamp uses.

use std::time::{SystemTime, UNIX_EPOCH};

/// URL-safe alphabet of nanoid, which upstream uses for session ids.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

/// A new session id: 21 characters of the nanoid alphabet (126 random bits from a v4 UUID).
pub fn new_session_id() -> String {
    let bits = u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes());
    (0..21)
        .map(|i| ALPHABET[((bits >> (i * 6)) & 63) as usize] as char)
        .collect()
}

/// Whether `id` could be a session id. Session ids become directory names, so this is the gate
/// that keeps `..`, slashes and empty strings out of paths.
pub fn is_valid_session_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| ALPHABET.contains(&b))
}

/// A new event id (UUID v4, as upstream).
pub fn new_event_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `<prefix><ms>_<n base-36 chars>`, the shape of upstream message and tool-call ids.
pub fn prefixed_id(prefix: &str, random_chars: usize) -> String {
    const B36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut bits = u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes());
    let mut out = format!("{prefix}{}_", now_ms());
    for _ in 0..random_chars {
        out.push(B36[(bits % 36) as usize] as char);
        bits /= 36;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_have_the_upstream_shape() {
        let id = new_session_id();
        assert_eq!(id.len(), 21);
        assert!(is_valid_session_id(&id));
        assert_ne!(id, new_session_id());
    }

    #[test]
    fn path_like_ids_are_refused() {
        for bad in ["", "..", "a/b", "a.b", &"x".repeat(65)] {
            assert!(!is_valid_session_id(bad), "{bad}");
        }
    }

    #[test]
    fn message_ids_look_like_upstream() {
        let id = prefixed_id("msg_", 8);
        assert!(id.starts_with("msg_"));
        assert_eq!(id.rsplit('_').next().map(str::len), Some(8));
    }
}
