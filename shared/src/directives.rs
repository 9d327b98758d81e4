//! How the base directives (the scripted answers of the echo model and the test fake LLM) turn
//! text into streamed tokens.
//!
//! The built-in `echo` model (supervisor) and the scripted fake LLM (tests) must answer the
//! base directives identically, so that offline runs and CI agree; their tokenization lives here
//! once.

/// `text` split into words: the first bare, the others with their leading space, so the
/// tokens concatenate back to `text`.
pub fn words(text: &str) -> Vec<String> {
    text.split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// `count` numbered tokens (`t0`, ` t1`, ...), as `SLOW` and `FLOOD` stream them.
pub fn numbered(prefix: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            if i == 0 {
                format!("{prefix}{i}")
            } else {
                format!(" {prefix}{i}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_concatenate_back() {
        assert_eq!(words("echo: a  b").concat(), "echo: a  b");
        assert_eq!(words("echo: hi"), ["echo:", " hi"]);
        assert_eq!(numbered("w", 3), ["w0", " w1", " w2"]);
        assert!(numbered("t", 0).is_empty());
    }
}
