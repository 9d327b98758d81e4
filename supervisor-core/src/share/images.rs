//! Workspace images referenced by files the agent wrote (api.md §10 step 6): found in the
//! `content` of `write_file` calls, uploaded once each, and the references rewritten to the
//! uploaded copies, so that an uploaded replay shows them.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::LazyLock;

use regex::{Captures, Regex};

use crate::workspace::{AccessError, SessionDir};

const IMAGE_EXT: &str = r"(?:jpg|jpeg|png|gif|webp|svg)";

static MARKDOWN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)(!\[[^\]]*\]\()([^)\s]+\.{IMAGE_EXT})(\))"))
        .unwrap_or_else(|e| unreachable!("constant regex: {e}"))
});
static HTML: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r#"(?i)(<img\b[^>]*?\ssrc=["'])([^"']+\.{IMAGE_EXT})(["'])"#
    ))
    .unwrap_or_else(|e| unreachable!("constant regex: {e}"))
});
static BARE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r#"(?i)^[^\s'"()<>]+\.{IMAGE_EXT}$"#))
        .unwrap_or_else(|e| unreachable!("constant regex: {e}"))
});

/// A reference worth uploading: relative, not a URL.
fn relative_reference(reference: &str) -> Option<&str> {
    let lower = reference.to_ascii_lowercase();
    if lower.starts_with("http") || lower.starts_with("data:") || reference.starts_with('/') {
        return None;
    }
    Some(reference.strip_prefix("./").unwrap_or(reference))
}

/// Every relative image path referenced in `text` (Markdown, `<img src>`, or a bare token),
/// without a leading `./`, in order of appearance, each once.
pub fn references(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut add = |reference: &str| {
        if let Some(path) = relative_reference(reference)
            && !found.iter().any(|f| f == path)
        {
            found.push(path.to_owned());
        }
    };
    for captures in MARKDOWN.captures_iter(text).chain(HTML.captures_iter(text)) {
        add(&captures[2]);
    }
    for token in text.split_whitespace() {
        if BARE.is_match(token) {
            add(token);
        }
    }
    found
}

/// `text` with each reference whose path (without `./`) is in `urls` pointing at its URL.
pub fn rewrite(text: &str, urls: &HashMap<String, String>) -> String {
    let swap = |reference: &str| -> Option<String> {
        relative_reference(reference).and_then(|path| urls.get(path).cloned())
    };
    let replace = |captures: &Captures<'_>| match swap(&captures[2]) {
        Some(url) => format!("{}{url}{}", &captures[1], &captures[3]),
        None => captures[0].to_owned(),
    };
    let text = MARKDOWN.replace_all(text, replace);
    let text = HTML.replace_all(&text, replace);
    // Bare tokens: rebuilt piece by piece so the whitespace around them is kept exactly.
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    while !rest.is_empty() {
        let token_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (token, tail) = rest.split_at(token_len);
        match (BARE.is_match(token), swap(token)) {
            (true, Some(url)) => out.push_str(&url),
            _ => out.push_str(token),
        }
        let space_len = tail
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(tail.len());
        out.push_str(&tail[..space_len]);
        rest = &tail[space_len..];
    }
    out
}

/// Largest image a share uploads.
pub const MAX_IMAGE_BYTES: u64 = 32 * 1024 * 1024;

/// Why a referenced image is not uploaded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a relative path inside the workspace")]
    InvalidReference,
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// The bytes of the image `relative` names inside the session directory `workspace`: opened
/// beneath a handle of that directory (no `..`, no absolute path, no symlink leading out, even
/// one swapped in while this runs), checked on the open descriptor to be a regular file of at
/// most [`MAX_IMAGE_BYTES`], and read from that descriptor. Blocking.
///
/// # Errors
/// An invalid reference, or the file cannot be read from inside the workspace.
pub fn read(workspace: &Path, relative: &str) -> Result<Vec<u8>, ImageError> {
    let path = Path::new(relative);
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ImageError::InvalidReference);
    }
    Ok(SessionDir::open(workspace)?.read(path, MAX_IMAGE_BYTES)?)
}

/// The MIME type the upload carries, by extension (upstream's table).
pub fn mime_of(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// A URL from the storage service forced to https (api.md §10 step 6).
pub fn force_https(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("http://") {
        format!("https://{rest}")
    } else if url.starts_with("https://") {
        url.to_owned()
    } else if let Some(rest) = url.strip_prefix("//") {
        format!("https://{rest}")
    } else {
        format!("https://{url}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Report\n![chart](./img/chart.png) and <img src=\"logo.SVG\" alt=x>\n\
        see ./photo.jpg\nremote ![r](https://x.test/a.png) data ![d](data:image/png;base64,AA)\n\
        again ![c](img/chart.png)\nnot-an-image.txt";

    #[test]
    fn finds_relative_images_once() {
        assert_eq!(references(DOC), ["img/chart.png", "logo.SVG", "photo.jpg"]);
    }

    #[test]
    fn rewrites_only_known_references() {
        let urls = HashMap::from([
            (
                "img/chart.png".to_owned(),
                "https://cdn.test/1.png".to_owned(),
            ),
            ("photo.jpg".to_owned(), "https://cdn.test/2.jpg".to_owned()),
        ]);
        let out = rewrite(DOC, &urls);
        assert!(out.contains("![chart](https://cdn.test/1.png)"));
        assert!(out.contains("![c](https://cdn.test/1.png)"));
        assert!(out.contains("see https://cdn.test/2.jpg\n"));
        assert!(out.contains("<img src=\"logo.SVG\""));
        assert!(out.contains("https://x.test/a.png"));
        assert_eq!(out.lines().count(), DOC.lines().count());
    }

    #[test]
    fn https_is_forced() {
        assert_eq!(force_https("http://a/b"), "https://a/b");
        assert_eq!(force_https("//a/b"), "https://a/b");
        assert_eq!(force_https("a/b"), "https://a/b");
        assert_eq!(force_https("https://a/b"), "https://a/b");
    }

    #[test]
    fn reads_stay_in_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(ws.join("a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("secret.png"), b"host").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", ws.join("out.png")).unwrap();
        std::os::unix::fs::symlink("../secret.png", ws.join("up.png")).unwrap();
        assert_eq!(read(&ws, "a.png").unwrap(), b"x");
        assert_eq!(read(&ws, "./a.png").unwrap(), b"x");
        assert!(matches!(
            read(&ws, "../secret.png"),
            Err(ImageError::InvalidReference)
        ));
        assert!(matches!(
            read(&ws, "out.png"),
            Err(ImageError::Access(AccessError::Outside))
        ));
        assert!(matches!(
            read(&ws, "up.png"),
            Err(ImageError::Access(AccessError::Outside))
        ));
        assert!(matches!(
            read(&ws, "none.png"),
            Err(ImageError::Access(AccessError::NotFound))
        ));
    }
}
