//! Identifiers and the clock every API timestamp uses.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// URL-safe alphabet of nanoid, which upstream uses for session ids.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

/// A session id, checked: 1 to 64 characters of the nanoid alphabet (new ones have 21, as
/// upstream's). Session ids become directory and file names, so the check keeps `..`, slashes
/// and empty strings out of paths; it is made once, where an id enters (a request, a control
/// command, an import, a stored row), and a `SessionId` is trusted from there on. It reads as
/// the plain string (`Deref<Target = str>`) and serialises as one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

/// A string that is not a session id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a session id")]
pub struct InvalidSessionId(pub String);

impl SessionId {
    /// A new session id: 21 characters of the nanoid alphabet (126 random bits from a v4 UUID).
    pub fn random() -> Self {
        let bits = u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes());
        Self(
            (0..21)
                .map(|i| ALPHABET[((bits >> (i * 6)) & 63) as usize] as char)
                .collect(),
        )
    }

    /// `text` as a session id.
    ///
    /// # Errors
    /// Empty, longer than 64 bytes, or a character outside the alphabet.
    pub fn parse(text: &str) -> Result<Self, InvalidSessionId> {
        Self::try_from(text.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SessionId {
    type Error = InvalidSessionId;

    fn try_from(text: String) -> Result<Self, InvalidSessionId> {
        if (1..=64).contains(&text.len()) && text.bytes().all(|b| ALPHABET.contains(&b)) {
            Ok(Self(text))
        } else {
            Err(InvalidSessionId(text))
        }
    }
}

impl std::str::FromStr for SessionId {
    type Err = InvalidSessionId;

    fn from_str(text: &str) -> Result<Self, InvalidSessionId> {
        Self::parse(text)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> Self {
        id.0
    }
}

impl std::ops::Deref for SessionId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SessionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for SessionId {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

/// Maps keyed by `SessionId` can be looked up with a `&str`.
impl std::borrow::Borrow<str> for SessionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq<str> for SessionId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SessionId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
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
        let id = SessionId::random();
        assert_eq!(id.len(), 21);
        assert_eq!(SessionId::parse(&id), Ok(id.clone()));
        assert_ne!(id, SessionId::random());
    }

    #[test]
    fn path_like_ids_are_refused() {
        for bad in ["", "..", "a/b", "a.b", &"x".repeat(65)] {
            assert!(SessionId::parse(bad).is_err(), "{bad}");
        }
        assert!(SessionId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn ids_serialise_as_plain_strings_and_are_checked_when_read() {
        let id = SessionId::parse("V1StGXR8_Z5jdHi6B-myT").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"V1StGXR8_Z5jdHi6B-myT\""
        );
        let back: SessionId = serde_json::from_str("\"V1StGXR8_Z5jdHi6B-myT\"").unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SessionId>("\"../x\"").is_err());
    }

    #[test]
    fn message_ids_look_like_upstream() {
        let id = prefixed_id("msg_", 8);
        assert!(id.starts_with("msg_"));
        assert_eq!(id.rsplit('_').next().map(str::len), Some(8));
    }
}
