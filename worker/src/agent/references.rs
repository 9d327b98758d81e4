//! Contextual references: `@file:<path>` and `@dir:<path>` in a string query are
//! expanded by the worker, which can read the workspace, into the text of an `environment_input`
//! event. The query itself is stored unchanged.
//!
//! Everything is read through the session's [`Workspace`], so a reference can reach nothing the
//! tools could not; a path outside becomes an `Error: …` entry instead of content.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;

use tokio_util::sync::CancellationToken;

use super::walk::{Step, WalkOptions, walk};
use super::workspace::{FsError, Kind, Workspace, io_error};

/// Largest file expanded.
const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// For the whole expansion: it is stored, and sent with every later model request.
const MAX_TOTAL_BYTES: usize = 4 * 1024 * 1024;
/// Directory levels packed below a referenced directory.
const MAX_DEPTH: usize = 8;
/// Entries one `@dir:` walk visits at most.
const MAX_ENTRIES: usize = 100_000;
/// Directories never packed (upstream's list).
const SKIP_DIRS: &[&str] = &[
    "node_modules",
    ".git",
    ".next",
    "dist",
    "build",
    "coverage",
    ".vscode",
    ".idea",
];
/// Images and archives are not text worth packing (upstream's list).
const SKIP_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "gif", "webp", "svg", "pdf", "zip", "tar", "gz", "exe", "dll",
];

/// What the environment event says about itself.
pub(crate) const DESCRIPTION: &str = "Expanded context from contextual references";

/// One `@file:`/`@dir:` token of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reference {
    File(String),
    Dir(String),
}

/// The references of `query`, in order, each once. Trailing punctuation that ends a sentence
/// (`see @file:a.txt.`) is not part of the path.
pub(crate) fn find(query: &str) -> Vec<Reference> {
    let mut found: Vec<Reference> = Vec::new();
    for token in query.split_whitespace() {
        let reference = if let Some(path) = token.strip_prefix("@file:") {
            Reference::File(clean(path))
        } else if let Some(path) = token.strip_prefix("@dir:") {
            Reference::Dir(clean(path))
        } else {
            continue;
        };
        let empty = match &reference {
            Reference::File(p) | Reference::Dir(p) => p.is_empty(),
        };
        if !empty && !found.contains(&reference) {
            found.push(reference);
        }
    }
    found
}

fn clean(path: &str) -> String {
    let path = path.trim_end_matches([',', ';', ':', '!', '?', ')', ']', '}', '"', '\'', '`']);
    match path.strip_suffix('.') {
        Some(rest) if !rest.is_empty() && !rest.ends_with(['.', '/']) => rest.to_owned(),
        _ => path.to_owned(),
    }
}

/// The expansion of `references`: `<file path="…">` blocks, `<directory path="…">` blocks of
/// them, and `Error: …` entries for what cannot be read.
///
/// # Errors
/// Only `Aborted`; every other failure becomes an entry.
pub(crate) fn expand(
    ws: &Workspace,
    references: &[Reference],
    cancel: &CancellationToken,
) -> Result<String, FsError> {
    let mut out = Packer {
        text: String::new(),
        full: false,
    };
    for reference in references {
        if cancel.is_cancelled() {
            return Err(FsError::Aborted);
        }
        match reference {
            Reference::File(given) => match file(ws, given) {
                Ok(content) => {
                    out.file(given, &content);
                }
                Err(message) => out.error(&message),
            },
            Reference::Dir(given) => {
                if let Err(e) = directory(ws, given, cancel, &mut out) {
                    if matches!(e, FsError::Aborted) {
                        return Err(e);
                    }
                    out.error(&e.to_string());
                }
            }
        }
    }
    Ok(out.text.trim_end().to_owned())
}

/// The expansion being built, within [`MAX_TOTAL_BYTES`].
struct Packer {
    text: String,
    full: bool,
}

impl Packer {
    fn push(&mut self, block: &str) -> bool {
        if self.full {
            return false;
        }
        if self.text.len() + block.len() > MAX_TOTAL_BYTES {
            self.full = true;
            self.text.push_str(&format!(
                "[further content omitted: the expansion is limited to {MAX_TOTAL_BYTES} bytes]\n"
            ));
            return false;
        }
        self.text.push_str(block);
        true
    }

    fn file(&mut self, path: &str, content: &str) -> bool {
        let newline = if content.ends_with('\n') { "" } else { "\n" };
        self.push(&format!(
            "<file path=\"{}\">\n{content}{newline}</file>\n\n",
            attribute(path)
        ))
    }

    fn error(&mut self, message: &str) {
        self.push(&format!("Error: {message}\n\n"));
    }
}

/// A path as an XML attribute value.
fn attribute(path: &str) -> String {
    path.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}

/// The text of the referenced file, or the message of its `Error: …` entry.
fn file(ws: &Workspace, given: &str) -> Result<String, String> {
    let path = ws.resolve(given).map_err(|e| e.to_string())?;
    let not_text = || format!("{given} is not a text file; it was not expanded");
    if skipped_extension(path.rel().as_os_str()) {
        return Err(not_text());
    }
    let (file, stat) = ws.open_file(&path).map_err(|e| e.to_string())?;
    read_text(file, stat.st_size as u64, given)?.ok_or_else(not_text)
}

/// A file's text; `None` when it is binary. Larger files than [`MAX_FILE_BYTES`] are refused.
fn read_text(file: File, size: u64, given: &str) -> Result<Option<String>, String> {
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{given} is too large to expand: {size} bytes (limit {MAX_FILE_BYTES})"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(&e, given).to_string())?;
    if bytes.contains(&0) {
        return Ok(None);
    }
    Ok(String::from_utf8(bytes).ok())
}

fn skipped_extension(name: &OsStr) -> bool {
    std::path::Path::new(name)
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|ext| SKIP_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// Packs the text files under the directory `given` into one `<directory>` block.
fn directory(
    ws: &Workspace,
    given: &str,
    cancel: &CancellationToken,
    out: &mut Packer,
) -> Result<(), FsError> {
    let start = ws.resolve(given)?;
    // Opened first, so a missing or wrong path is an error entry rather than an empty block.
    ws.open_dir(&start)?;
    let options = WalkOptions {
        gitignore: false,
        skip_dirs: SKIP_DIRS,
        max_depth: MAX_DEPTH,
        max_entries: MAX_ENTRIES,
    };
    let mut body = Packer {
        text: String::new(),
        full: false,
    };
    walk(ws, &start, &options, cancel, &mut |entry| {
        if entry.kind != Kind::File || skipped_extension(entry.name) {
            return Ok(Step::Continue);
        }
        let shown = entry.path.display();
        let Ok((file, stat)) = Workspace::open_file_in(entry.dir, entry.name, entry.path.given())
        else {
            return Ok(Step::Continue);
        };
        // Too large, binary or unreadable files are left out of a directory's pack.
        if let Ok(Some(content)) = read_text(file, stat.st_size as u64, &shown)
            && !body.file(&shown, &content)
        {
            return Ok(Step::Stop);
        }
        Ok(Step::Continue)
    })?;
    out.push(&format!(
        "<directory path=\"{}\">\n{}</directory>\n\n",
        attribute(given),
        body.text
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::workspace::tests::Fixture;

    fn never() -> CancellationToken {
        CancellationToken::new()
    }

    #[test]
    fn finds_references_once_without_sentence_punctuation() {
        let refs = find("look at @file:a.txt, @dir:src and @file:a.txt. Also @file:b.rs. @file: x");
        assert_eq!(
            refs,
            [
                Reference::File("a.txt".into()),
                Reference::Dir("src".into()),
                Reference::File("b.rs".into())
            ]
        );
        assert!(find("no references here, mail me@file.com").is_empty());
        assert_eq!(find("@dir:."), [Reference::Dir(".".into())]);
    }

    #[test]
    fn expands_files_and_directories() {
        let f = Fixture::new();
        f.write("a.txt", "alpha\n");
        f.write("src/main.rs", "fn main() {}");
        f.write("src/logo.png", "not really");
        f.write("src/node_modules/x.js", "skip");
        std::fs::write(f.root().join("src/bin.dat"), b"a\0b").unwrap();
        let refs = find("@file:a.txt @dir:src");
        let text = expand(&f.ws, &refs, &never()).unwrap();
        assert_eq!(
            text,
            "<file path=\"a.txt\">\nalpha\n</file>\n\n<directory path=\"src\">\n<file path=\"src/main.rs\">\nfn main() {}\n</file>\n\n</directory>"
        );
    }

    #[test]
    fn problems_become_error_entries() {
        let f = Fixture::new();
        std::os::unix::fs::symlink("/etc/passwd", f.root().join("passwd")).unwrap();
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        f.write("pic.png", "x");
        let refs = find(
            "@file:../outside/secret.txt @file:/etc/passwd @file:passwd @dir:out @file:nope @file:pic.png",
        );
        let text = expand(&f.ws, &refs, &never()).unwrap();
        assert_eq!(
            text,
            "Error: Path is outside the workspace: ../outside/secret.txt\n\n\
             Error: Path is outside the workspace: /etc/passwd\n\n\
             Error: Path is outside the workspace: passwd\n\n\
             Error: Path is outside the workspace: out\n\n\
             Error: No such file or directory: nope\n\n\
             Error: pic.png is not a text file; it was not expanded"
        );
        assert!(!text.contains("secret\n"));
    }

    #[test]
    fn abort_stops_the_expansion() {
        let f = Fixture::new();
        f.write("a.txt", "a");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = expand(&f.ws, &find("@file:a.txt"), &cancel).unwrap_err();
        assert!(matches!(err, FsError::Aborted));
    }
}
