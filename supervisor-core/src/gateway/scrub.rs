//! Masking secrets in text that leaves the gateway (agent.md §4.1): error messages sent to a
//! worker become events, and events reach every client and the log. Providers do echo keys
//! back ("Incorrect API key provided: sk-…"), so every such text passes through [`scrub`].

/// The shortest tail after `sk-` that is masked; shorter runs are ordinary words ("sk-1").
const MIN_TOKEN_TAIL: usize = 8;

/// `text` with every occurrence of `key` (when it is long enough to be a real secret) and every
/// `sk-…`-looking token replaced by `***`.
pub(crate) fn scrub(text: &str, key: Option<&str>) -> String {
    let mut out = match key.filter(|k| k.len() >= 4) {
        Some(key) => text.replace(key, "***"),
        None => text.to_owned(),
    };
    let mut from = 0;
    while let Some(found) = out[from..].find("sk-") {
        let start = from + found;
        let preceded_by_token_char = out[..start].chars().next_back().is_some_and(is_token_char);
        let tail = out[start + 3..]
            .bytes()
            .take_while(|&b| is_token_char(b as char))
            .count();
        if !preceded_by_token_char && tail >= MIN_TOKEN_TAIL {
            out.replace_range(start..start + 3 + tail, "sk-***");
            from = start + 6;
        } else {
            from = start + 3;
        }
    }
    out
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_key_and_sk_tokens() {
        assert_eq!(
            scrub(
                "Incorrect API key provided: abc-SECRET-123.",
                Some("abc-SECRET-123")
            ),
            "Incorrect API key provided: ***."
        );
        assert_eq!(
            scrub("key sk-proj-AbCdEf123456 rejected", None),
            "key sk-*** rejected"
        );
        assert_eq!(
            scrub("sk-short and task-manager", None),
            "sk-short and task-manager"
        );
        assert_eq!(scrub("ask-0123456789", None), "ask-0123456789");
        assert_eq!(scrub("é sk-ééééééééé", Some("ab")), "é sk-ééééééééé");
        assert_eq!(scrub("sk-aaaaaaaaa sk-bbbbbbbbbb", None), "sk-*** sk-***");
    }
}
