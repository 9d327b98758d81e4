//! `edit_file {path, edits, dryRun?}`: exact-text replacements applied in order, all or nothing,
//! answered with a fenced unified diff that the web UI's diff viewer renders.
//!
//! An `oldText` must match exactly once (Anthropic's uniqueness rule, safer than upstream's
//! "first occurrence") unless `replaceAll` is set. When it matches nowhere, upstream's
//! whitespace-tolerant line match is tried before giving up.

use std::io::Read;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use similar::TextDiff;

use super::{BINARY_SNIFF_BYTES, Context, MAX_FILE_BYTES, Tool, ToolError, parse, text};
use crate::agent::workspace::io_error;

pub(super) const TOOL: Tool = Tool {
    name: "edit_file",
    description: "Edit a text file in the workspace by replacing exact text. Each oldText must \
                  match exactly one place (include surrounding lines to make it unique) unless \
                  replaceAll is set. Edits apply in order, all or nothing; returns a diff.",
    schema,
    run,
};

/// The diff may take this long on huge, very different texts before it settles for a coarser
/// (still correct) answer.
const DIFF_TIMEOUT: Duration = Duration::from_secs(2);

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "edits": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "oldText": {"type": "string", "description": "Exact text to find"},
                        "newText": {"type": "string", "description": "Replacement text"},
                        "replaceAll": {"type": "boolean", "default": false},
                    },
                    "required": ["oldText", "newText"],
                    "additionalProperties": false,
                },
            },
            "dryRun": {"type": "boolean", "default": false, "description": "Only return the diff"},
        },
        "required": ["path", "edits"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Args {
    path: String,
    edits: Vec<Edit>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Edit {
    old_text: String,
    new_text: String,
    #[serde(default)]
    replace_all: bool,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    if args.edits.is_empty() {
        return Err(ToolError::InvalidArguments {
            tool: TOOL.name,
            message: "edits must not be empty".into(),
        });
    }
    let path = cx.ws.resolve(&args.path)?;
    let shown = path.display();
    // Checked before reading: the edited file is written back in place of itself, which a
    // symlink or a non-regular file cannot be.
    cx.ws.check_rewritable(&path)?;
    let (file, stat) = cx.ws.open_file(&path)?;
    let size = stat.st_size as u64;
    if size > MAX_FILE_BYTES as u64 {
        return Err(ToolError::TooLarge {
            size,
            limit: MAX_FILE_BYTES as u64,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(&e, path.given()))?;
    let binary = || ToolError::BinaryEdit {
        path: path.given().to_owned(),
        size,
    };
    if bytes[..bytes.len().min(BINARY_SNIFF_BYTES)].contains(&0) {
        return Err(binary());
    }
    let original = String::from_utf8(bytes).map_err(|_| binary())?;
    let crlf = original.contains("\r\n");
    let before = original.replace("\r\n", "\n");
    let after = apply(&before, &args.edits, &shown)?;

    let diff = TextDiff::configure()
        .timeout(DIFF_TIMEOUT)
        .diff_lines(before.as_str(), after.as_str())
        .unified_diff()
        .context_radius(3)
        .header(&shown, &shown)
        .to_string();
    let count = args.edits.len();
    let summary = if args.dry_run {
        format!("Dry run: {count} edit(s) would be applied to {shown}; the file was not changed")
    } else {
        if after != before {
            let restored = if crlf {
                after.replace('\n', "\r\n")
            } else {
                after
            };
            cx.ws.write_atomic(&path, restored.as_bytes(), cx.cancel)?;
        }
        format!("Applied {count} edit(s) to {shown}")
    };
    Ok(text(format!("{}\n\n{summary}", fenced(&diff))))
}

/// Applies every edit to `text` in order. Any failure fails the whole call.
fn apply(text: &str, edits: &[Edit], path: &str) -> Result<String, ToolError> {
    let mut current = text.to_owned();
    for (i, edit) in edits.iter().enumerate() {
        let index = i + 1;
        let old = edit.old_text.replace("\r\n", "\n");
        let new = edit.new_text.replace("\r\n", "\n");
        if old.is_empty() {
            return Err(ToolError::EditEmpty { index });
        }
        let count = current.matches(old.as_str()).count();
        current = match count {
            1 => current.replacen(old.as_str(), &new, 1),
            n if n > 1 && edit.replace_all => current.replace(old.as_str(), &new),
            n if n > 1 => {
                return Err(ToolError::EditAmbiguous {
                    index,
                    count: n,
                    path: path.to_owned(),
                });
            }
            _ => match loose_replace(&current, &old, &new, edit.replace_all) {
                Loose::Replaced(text) => text,
                Loose::Ambiguous(count) => {
                    return Err(ToolError::EditAmbiguous {
                        index,
                        count,
                        path: path.to_owned(),
                    });
                }
                Loose::NotFound => {
                    return Err(ToolError::EditNotFound {
                        index,
                        path: path.to_owned(),
                    });
                }
            },
        };
    }
    Ok(current)
}

enum Loose {
    Replaced(String),
    Ambiguous(usize),
    NotFound,
}

/// Upstream's fallback: find runs of lines equal to `old`'s lines once trimmed, and put `new`'s
/// lines there, re-indented with the first matched line's indentation plus their own
/// indentation relative to `old`'s first line. (Upstream measures each line against the old
/// line at the same position, which flattens nested blocks; this keeps them.)
fn loose_replace(text: &str, old: &str, new: &str, replace_all: bool) -> Loose {
    if old.trim().is_empty() {
        return Loose::NotFound;
    }
    let mut old_lines: Vec<&str> = old.split('\n').collect();
    let mut new_lines: Vec<&str> = new.split('\n').collect();
    // A trailing newline would otherwise have to match an empty line.
    if old_lines.len() > 1 && old_lines.last() == Some(&"") {
        old_lines.pop();
        if new_lines.len() > 1 && new_lines.last() == Some(&"") {
            new_lines.pop();
        }
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let mut starts = Vec::new();
    let mut i = 0;
    while i + old_lines.len() <= lines.len() {
        let window = &lines[i..i + old_lines.len()];
        if window
            .iter()
            .zip(&old_lines)
            .all(|(line, old)| line.trim() == old.trim())
        {
            starts.push(i);
            i += old_lines.len();
        } else {
            i += 1;
        }
    }
    match starts.len() {
        0 => return Loose::NotFound,
        1 => {}
        n if !replace_all => return Loose::Ambiguous(n),
        _ => {}
    }
    let base = leading_whitespace(old_lines[0]);
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut next = 0;
    for start in starts {
        out.extend(lines[next..start].iter().map(|l| (*l).to_owned()));
        let indent = leading_whitespace(lines[start]);
        for (j, line) in new_lines.iter().enumerate() {
            let replaced = if j == 0 {
                format!("{indent}{}", line.trim_start())
            } else if line.trim().is_empty() {
                String::new()
            } else {
                // The line's indentation relative to the model's first line, on top of the
                // file's indentation there.
                let own = leading_whitespace(line);
                let relative = own.strip_prefix(base).unwrap_or(own);
                format!("{indent}{relative}{}", line.trim_start())
            };
            out.push(replaced);
        }
        next = start + old_lines.len();
    }
    out.extend(lines[next..].iter().map(|l| (*l).to_owned()));
    Loose::Replaced(out.join("\n"))
}

fn leading_whitespace(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

/// `diff` in a ```` ```diff ```` fence, longer than any backtick run inside it.
fn fenced(diff: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in diff.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let fence = "`".repeat(longest.max(2) + 1);
    let body = if diff.is_empty() || diff.ends_with('\n') {
        diff.to_owned()
    } else {
        format!("{diff}\n")
    };
    format!("{fence}diff\n{body}{fence}")
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, text_of};
    use super::*;
    use crate::agent::workspace::tests::Fixture;

    fn edit(f: &Fixture, edits: Value) -> Result<String, ToolError> {
        run(f, "edit_file", json!({"path": "f.txt", "edits": edits})).map(|v| text_of(&v))
    }

    #[test]
    fn applies_and_returns_a_fenced_diff() {
        let f = Fixture::new();
        f.write("f.txt", "alpha\nbeta\ngamma\n");
        let out = edit(&f, json!([{"oldText": "beta", "newText": "BETA"}])).unwrap();
        assert_eq!(
            out,
            "```diff\n--- f.txt\n+++ f.txt\n@@ -1,3 +1,3 @@\n alpha\n-beta\n+BETA\n gamma\n```\n\nApplied 1 edit(s) to f.txt"
        );
        assert_eq!(f.read("f.txt"), "alpha\nBETA\ngamma\n");
    }

    #[test]
    fn edits_apply_in_order_and_all_or_nothing() {
        let f = Fixture::new();
        f.write("f.txt", "one two\n");
        let err = edit(
            &f,
            json!([
                {"oldText": "one", "newText": "1"},
                {"oldText": "three", "newText": "3"}
            ]),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "edit #2: oldText was not found in f.txt");
        assert_eq!(f.read("f.txt"), "one two\n");
        edit(
            &f,
            json!([
                {"oldText": "one", "newText": "1"},
                {"oldText": "1 two", "newText": "1 2"}
            ]),
        )
        .unwrap();
        assert_eq!(f.read("f.txt"), "1 2\n");
    }

    #[test]
    fn ambiguity_empty_and_replace_all() {
        let f = Fixture::new();
        f.write("f.txt", "x = 1\nx = 1\n");
        let err = edit(&f, json!([{"oldText": "x = 1", "newText": "y"}])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edit #1: oldText matches 2 places in f.txt; include more surrounding lines or set replaceAll"
        );
        let err = edit(&f, json!([{"oldText": "", "newText": "y"}])).unwrap_err();
        assert_eq!(err.to_string(), "edit #1: oldText must not be empty");
        edit(
            &f,
            json!([{"oldText": "x = 1", "newText": "y = 2", "replaceAll": true}]),
        )
        .unwrap();
        assert_eq!(f.read("f.txt"), "y = 2\ny = 2\n");
    }

    #[test]
    fn whitespace_tolerant_fallback_reindents() {
        let f = Fixture::new();
        f.write("f.txt", "fn main() {\n    if a {\n        b();\n    }\n}\n");
        edit(
            &f,
            json!([{"oldText": "if a {\n    b();\n}", "newText": "if a {\n    c();\n    d();\n}"}]),
        )
        .unwrap();
        assert_eq!(
            f.read("f.txt"),
            "fn main() {\n    if a {\n        c();\n        d();\n    }\n}\n"
        );
    }

    #[test]
    fn crlf_files_keep_their_line_endings() {
        let f = Fixture::new();
        f.write("f.txt", "a\r\nb\r\nc\r\n");
        let out = edit(&f, json!([{"oldText": "b\nc", "newText": "B\nC"}])).unwrap();
        assert!(out.contains("-b\n-c\n+B\n+C\n"), "{out}");
        assert_eq!(f.read("f.txt"), "a\r\nB\r\nC\r\n");
    }

    #[test]
    fn dry_run_leaves_the_file() {
        let f = Fixture::new();
        f.write("f.txt", "a\n");
        let out = run(
            &f,
            "edit_file",
            json!({"path": "f.txt", "edits": [{"oldText": "a", "newText": "b"}], "dryRun": true}),
        )
        .unwrap();
        let out = text_of(&out);
        assert!(out.contains("-a\n+b\n"), "{out}");
        assert!(
            out.ends_with("Dry run: 1 edit(s) would be applied to f.txt; the file was not changed")
        );
        assert_eq!(f.read("f.txt"), "a\n");
    }

    #[test]
    fn backticks_lengthen_the_fence() {
        assert_eq!(fenced("+```x\n"), "````diff\n+```x\n````");
        assert_eq!(fenced(""), "```diff\n```");
    }

    #[test]
    fn refusals() {
        let f = Fixture::new();
        std::fs::write(f.root().join("bin"), b"a\0b").unwrap();
        f.write("real.txt", "x");
        std::os::unix::fs::symlink("real.txt", f.root().join("link.txt")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", f.root().join("passwd")).unwrap();
        let cases = [
            (
                "bin",
                "bin is a binary file (3 bytes); edit_file edits text files only",
            ),
            (
                "link.txt",
                "Refusing to write through a symbolic link: link.txt",
            ),
            ("passwd", "Path is outside the workspace: passwd"),
            ("nope", "No such file or directory: nope"),
            ("../x", "Path is outside the workspace: ../x"),
        ];
        for (path, message) in cases {
            let err = run(
                &f,
                "edit_file",
                json!({"path": path, "edits": [{"oldText": "a", "newText": "b"}]}),
            )
            .unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        let err = run(&f, "edit_file", json!({"path": "real.txt", "edits": []})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid arguments for edit_file: edits must not be empty"
        );
    }
}
