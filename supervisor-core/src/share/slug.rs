//! The slug of an uploaded share (api.md §10 step 8): a few lowercase ASCII words saying what
//! the session is about, plus a short hash of the session id so that two sessions about the
//! same thing get different slugs.

use sha2::{Digest, Sha256};
use shared::ids::SessionId;

/// Longest slug body before the hash, in characters.
const MAX_CHARS: usize = 60;
/// Words kept from the start.
const MAX_WORDS: usize = 4;

/// Common Chinese technical words, so a Chinese prompt still gives a readable slug.
const DICTIONARY: &[(&str, &str)] = &[
    ("代码", "code"),
    ("数据", "data"),
    ("分析", "analysis"),
    ("搜索", "search"),
    ("文件", "file"),
    ("网页", "web"),
    ("网站", "website"),
    ("测试", "test"),
    ("报告", "report"),
    ("图片", "image"),
    ("天气", "weather"),
    ("新闻", "news"),
    ("总结", "summary"),
    ("翻译", "translate"),
    ("设计", "design"),
    ("开发", "develop"),
    ("应用", "app"),
    ("模型", "model"),
    ("研究", "research"),
    ("计划", "plan"),
];

/// `words` (the model's suggestion, or the prompt itself) made a slug, with the id's hash.
/// Empty input gives `untitled-session-<hash>`.
pub fn slug(words: &str, session_id: &SessionId) -> String {
    let body = normalise(words);
    let body = if body.is_empty() {
        "untitled-session".to_owned()
    } else {
        body
    };
    format!("{body}-{}", short_hash(session_id))
}

/// The first six hex digits of SHA-256 of the session id.
fn short_hash(session_id: &SessionId) -> String {
    Sha256::digest(session_id.as_bytes())
        .iter()
        .take(3)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lowercase; ASCII alphanumeric runs joined with `-` when there are any; otherwise dictionary
/// words, or a name for the script; then at most four words and 60 characters.
fn normalise(text: &str) -> String {
    let lower = text.to_lowercase();
    let runs: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|run| !run.is_empty())
        .collect();
    let joined = if runs.is_empty() {
        transliterate(&lower)
    } else {
        runs.join("-")
    };
    let cleaned: String = joined
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    let words: Vec<&str> = cleaned
        .split('-')
        .filter(|w| !w.is_empty())
        .take(MAX_WORDS)
        .collect();
    let mut out = words.join("-");
    if out.len() > MAX_CHARS {
        out.truncate(MAX_CHARS);
    }
    out.trim_matches('-').to_owned()
}

fn transliterate(text: &str) -> String {
    let mut found: Vec<(usize, &str)> = DICTIONARY
        .iter()
        .filter_map(|(word, english)| text.find(word).map(|at| (at, *english)))
        .collect();
    if !found.is_empty() {
        found.sort_by_key(|(at, _)| *at);
        return found
            .into_iter()
            .map(|(_, english)| english)
            .collect::<Vec<_>>()
            .join("-");
    }
    let any = |range: &[(u32, u32)]| {
        text.chars().any(|c| {
            range
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&(c as u32)))
        })
    };
    if any(&[(0x3040, 0x30ff)]) {
        "japanese-query".into()
    } else if any(&[(0x4e00, 0x9fff), (0x3400, 0x4dbf)]) {
        "chinese-query".into()
    } else if any(&[(0x0400, 0x04ff)]) {
        "cyrillic-query".into()
    } else if text.chars().any(|c| !c.is_ascii() && c.is_alphabetic()) {
        "international-query".into()
    } else {
        String::new()
    }
}

/// The `slug` of a model's JSON answer (fenced or not), if it has a usable one.
pub fn from_answer(answer: &str) -> Option<String> {
    let trimmed = answer.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    let value: serde_json::Value = serde_json::from_str(unfenced.trim()).ok()?;
    let slug = value.get("slug")?.as_str()?.trim();
    (!normalise(slug).is_empty()).then(|| slug.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> SessionId {
        SessionId::parse(text).unwrap()
    }

    #[test]
    fn english() {
        let s = slug("Write a Haiku about the SEA, please!", &id("abc"));
        assert!(s.starts_with("write-a-haiku-about-"), "{s}");
        assert_eq!(s.len(), "write-a-haiku-about-".len() + 6);
        assert_eq!(short_hash(&id("abc")), "ba7816");
    }

    #[test]
    fn other_scripts() {
        assert!(slug("分析这个代码", &id("x")).starts_with("analysis-code-"));
        assert!(slug("你好世界", &id("x")).starts_with("chinese-query-"));
        assert!(slug("こんにちは", &id("x")).starts_with("japanese-query-"));
        assert!(slug("привет мир", &id("x")).starts_with("cyrillic-query-"));
        assert!(slug("", &id("x")).starts_with("untitled-session-"));
        assert!(slug("!!!", &id("x")).starts_with("untitled-session-"));
    }

    #[test]
    fn long_input_is_cut() {
        let long = "a".repeat(200);
        assert_eq!(normalise(&long).len(), MAX_CHARS);
    }

    #[test]
    fn model_answers() {
        assert_eq!(
            from_answer("{\"slug\": \"sea-haiku\"}").as_deref(),
            Some("sea-haiku")
        );
        assert_eq!(
            from_answer("```json\n{\"slug\":\"x-y\"}\n```").as_deref(),
            Some("x-y")
        );
        assert_eq!(from_answer("echo: hi"), None);
        assert_eq!(from_answer("{\"slug\": \"   \"}"), None);
    }
}
