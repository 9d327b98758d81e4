//! How much client-given data one session record may hold.
//!
//! Every backend checks the metadata a record would have (after a merge, before anything is
//! written) against these limits, so no route (create, update, one-shot, model switch,
//! runtime settings, import) can grow a record without bound: a record that listings, the
//! session cache and every `/sessions` answer hold in memory stays small. A refusal names
//! the field; the record is left as it was.

use std::io::Write;

use serde_json::{Map, Value};

/// The whole metadata object, as JSON text.
pub const METADATA_MAX_BYTES: usize = 64 * 1024;
/// `metadata.name`.
pub const NAME_MAX_CHARS: usize = 256;
/// Entries of `metadata.tags`.
pub const TAGS_MAX: usize = 32;
/// One entry of `metadata.tags`.
pub const TAG_MAX_CHARS: usize = 64;
/// `metadata.runtimeSettings` and `metadata.agentOptions`, each as JSON text.
pub const SETTINGS_MAX_BYTES: usize = 16 * 1024;

/// A record over one of the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {size} {unit}, over the limit of {limit}")]
pub struct TooLarge {
    /// Where in the record, e.g. `metadata.name` or `metadata.tags[3]`.
    pub field: String,
    pub size: usize,
    pub limit: usize,
    /// `bytes`, `characters` or `entries`.
    pub unit: &'static str,
}

fn over(field: impl Into<String>, size: usize, limit: usize, unit: &'static str) -> TooLarge {
    TooLarge {
        field: field.into(),
        size,
        limit,
        unit,
    }
}

/// Counts the bytes written to it, so a size is measured without building the text.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `value` as compact JSON text.
fn json_len(value: &impl serde::Serialize) -> usize {
    let mut counter = Counter(0);
    // Writing a JSON value to a writer that cannot fail cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// A text's length in characters; any other value counts its JSON text.
fn text_len(value: &Value) -> usize {
    match value {
        Value::String(text) => text.chars().count(),
        other => json_len(other),
    }
}

/// Checks the metadata a record is about to have.
///
/// # Errors
/// The first field over its limit: the name, the tags, the settings, then the whole object.
pub fn check_metadata(metadata: &Map<String, Value>) -> Result<(), TooLarge> {
    if let Some(name) = metadata.get("name") {
        let size = text_len(name);
        if size > NAME_MAX_CHARS {
            return Err(over("metadata.name", size, NAME_MAX_CHARS, "characters"));
        }
    }
    match metadata.get("tags") {
        Some(Value::Array(tags)) => {
            if tags.len() > TAGS_MAX {
                return Err(over("metadata.tags", tags.len(), TAGS_MAX, "entries"));
            }
            for (i, tag) in tags.iter().enumerate() {
                let size = text_len(tag);
                if size > TAG_MAX_CHARS {
                    return Err(over(
                        format!("metadata.tags[{i}]"),
                        size,
                        TAG_MAX_CHARS,
                        "characters",
                    ));
                }
            }
        }
        Some(other) => {
            let size = text_len(other);
            if size > TAG_MAX_CHARS {
                return Err(over("metadata.tags", size, TAG_MAX_CHARS, "characters"));
            }
        }
        None => {}
    }
    for key in ["runtimeSettings", "agentOptions"] {
        if let Some(value) = metadata.get(key) {
            let size = json_len(value);
            if size > SETTINGS_MAX_BYTES {
                return Err(over(
                    format!("metadata.{key}"),
                    size,
                    SETTINGS_MAX_BYTES,
                    "bytes",
                ));
            }
        }
    }
    let size = json_len(metadata);
    if size > METADATA_MAX_BYTES {
        return Err(over("metadata", size, METADATA_MAX_BYTES, "bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: Value) -> Result<(), TooLarge> {
        check_metadata(value.as_object().unwrap())
    }

    #[test]
    fn each_field_is_named() {
        assert!(check(json!({"name": "n".repeat(256), "tags": vec!["t"; 32]})).is_ok());
        // Characters, not bytes: 256 two-byte letters are a fine name.
        assert!(check(json!({"name": "é".repeat(256)})).is_ok());
        assert_eq!(
            check(json!({"name": "n".repeat(257)})).unwrap_err().field,
            "metadata.name"
        );
        assert_eq!(
            check(json!({"tags": vec!["t"; 33]})).unwrap_err(),
            over("metadata.tags", 33, 32, "entries")
        );
        assert_eq!(
            check(json!({"tags": ["a", "b".repeat(65)]}))
                .unwrap_err()
                .field,
            "metadata.tags[1]"
        );
        assert_eq!(
            check(json!({"runtimeSettings": {"x": "y".repeat(SETTINGS_MAX_BYTES)}}))
                .unwrap_err()
                .field,
            "metadata.runtimeSettings"
        );
        assert_eq!(
            check(json!({"name": {"nested": "n".repeat(300)}}))
                .unwrap_err()
                .field,
            "metadata.name",
            "a name that is not a string is measured as JSON"
        );
        let big = check(json!({"notes": "x".repeat(METADATA_MAX_BYTES)})).unwrap_err();
        assert_eq!(big.field, "metadata");
        assert_eq!(big.size, METADATA_MAX_BYTES + "{\"notes\":\"\"}".len());
    }

    #[test]
    fn json_len_is_the_compact_text_length() {
        let value = json!({"a": [1, "two", null], "b": {"c": true}});
        assert_eq!(json_len(&value), value.to_string().len());
    }
}
