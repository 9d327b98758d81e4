//! `grep {pattern, path?, include?, ignoreCase?, fixedStrings?, contextLines?, maxResults?}`:
//! ripgrep-like output (`path:line:text`, context as `path-line-text`, `--` between groups).
//! Rust's `regex` runs in linear time, so a model-supplied pattern cannot stall the worker.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    BINARY_SNIFF_BYTES, Context, MAX_FILE_BYTES, MAX_WALK_ENTRIES, PathGlob, Tool, ToolError,
    check_range, cut_chars, parse, text,
};
use crate::agent::walk::{Step, WalkEnd, WalkOptions, walk};
use crate::agent::workspace::{FsError, Kind, Workspace};

pub(super) const TOOL: Tool = Tool {
    name: "grep",
    description: "Search file contents in the workspace with a regular expression (Rust regex \
                  syntax). Prints path:line:text for matches. .gitignore is honoured; binary \
                  files and files over 4 MiB are skipped.",
    schema,
    run,
};

const MAX_LINE_CHARS: usize = 500;
/// Compiled-pattern size cap: a pathological pattern is refused rather than built.
const REGEX_SIZE_LIMIT: usize = 8 * 1024 * 1024;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Regular expression (Rust regex syntax)"},
            "path": {"type": "string", "default": "."},
            "include": {"type": "string", "description": "Glob filter on file paths, e.g. *.ts"},
            "ignoreCase": {"type": "boolean", "default": false},
            "fixedStrings": {"type": "boolean", "default": false},
            "contextLines": {"type": "integer", "minimum": 0, "maximum": 10, "default": 0},
            "maxResults": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200},
        },
        "required": ["pattern"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Args {
    pattern: String,
    #[serde(default = "dot")]
    path: String,
    include: Option<String>,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default)]
    fixed_strings: bool,
    #[serde(default)]
    context_lines: u64,
    #[serde(default = "default_max")]
    max_results: u64,
}

fn dot() -> String {
    ".".into()
}

fn default_max() -> u64 {
    200
}

/// The search's state across files.
struct Search {
    regex: Regex,
    context: usize,
    max: usize,
    matches: usize,
    /// A match beyond `max` was seen.
    truncated: bool,
    out: Vec<String>,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    check_range(TOOL.name, "contextLines", args.context_lines, 0, 10)?;
    check_range(TOOL.name, "maxResults", args.max_results, 1, 1000)?;
    let source = if args.fixed_strings {
        regex::escape(&args.pattern)
    } else {
        args.pattern.clone()
    };
    let regex = RegexBuilder::new(&source)
        .case_insensitive(args.ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| ToolError::Regex(e.to_string()))?;
    let include = args.include.as_deref().map(PathGlob::new).transpose()?;
    let start = cx.ws.resolve(&args.path)?;
    let mut search = Search {
        regex,
        context: args.context_lines as usize,
        max: args.max_results as usize,
        matches: 0,
        truncated: false,
        out: Vec::new(),
    };

    let end = match cx.ws.open_dir(&start) {
        Ok(_) => {
            let options = WalkOptions {
                gitignore: true,
                skip_dirs: &[".git"],
                max_depth: usize::MAX,
                max_entries: MAX_WALK_ENTRIES,
            };
            walk(cx.ws, &start, &options, cx.cancel, &mut |entry| {
                if entry.kind != Kind::File {
                    return Ok(Step::Continue);
                }
                let relative = entry
                    .path
                    .rel()
                    .strip_prefix(start.rel())
                    .unwrap_or(entry.path.rel());
                if include
                    .as_ref()
                    .is_some_and(|glob| !glob.is_match(relative))
                {
                    return Ok(Step::Continue);
                }
                // A file that vanished or cannot be read is skipped, as ripgrep does.
                let Ok((file, _)) =
                    Workspace::open_file_in(entry.dir, entry.name, entry.path.given())
                else {
                    return Ok(Step::Continue);
                };
                search.file(file, &entry.path.display())?;
                Ok(if search.truncated {
                    Step::Stop
                } else {
                    Step::Continue
                })
            })?
        }
        // A single file: searched whatever its name, as `rg pattern file` does.
        Err(FsError::NotADirectory(_)) => {
            let (file, _) = cx.ws.open_file(&start)?;
            search.file(file, &start.display())?;
            WalkEnd::Finished
        }
        Err(e) => return Err(e.into()),
    };

    if search.out.is_empty() {
        return Ok(text("No matches found"));
    }
    let mut out = search.out.join("\n");
    if search.truncated {
        out.push_str(&format!("\n[truncated at {} matches]", search.max));
    } else if end == WalkEnd::Truncated {
        out.push_str(&format!(
            "\n[Search stopped after {MAX_WALK_ENTRIES} entries; narrow the path]"
        ));
    }
    Ok(text(out))
}

impl Search {
    /// Searches one file, skipping binaries and files over the size limit.
    fn file(&mut self, file: File, shown: &str) -> Result<(), FsError> {
        let mut bytes = Vec::new();
        if file
            .take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .is_err()
            || bytes.len() > MAX_FILE_BYTES
            || bytes[..bytes.len().min(BINARY_SNIFF_BYTES)].contains(&0)
        {
            return Ok(());
        }
        let content = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = content
            .split_terminator('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        let mut hits = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if !self.regex.is_match(line) {
                continue;
            }
            if self.matches == self.max {
                self.truncated = true;
                break;
            }
            self.matches += 1;
            hits.push(i);
        }
        if hits.is_empty() {
            return Ok(());
        }
        let matched: BTreeSet<usize> = hits.iter().copied().collect();
        let mut shown_lines = BTreeSet::new();
        for &hit in &hits {
            let first = hit.saturating_sub(self.context);
            let last = (hit + self.context).min(lines.len() - 1);
            shown_lines.extend(first..=last);
        }
        let mut previous: Option<usize> = None;
        for i in shown_lines {
            let gap = previous.map_or(!self.out.is_empty(), |p| i != p + 1);
            if gap && self.context > 0 {
                self.out.push("--".into());
            }
            previous = Some(i);
            let (line, cut) = cut_chars(lines[i], MAX_LINE_CHARS);
            let ellipsis = if cut { "…" } else { "" };
            let separator = if matched.contains(&i) { ':' } else { '-' };
            self.out.push(format!(
                "{shown}{separator}{}{separator}{line}{ellipsis}",
                i + 1
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;

    fn fixture() -> Fixture {
        let f = Fixture::new();
        f.write("a.rs", "fn main() {\n    println!(\"Hello\");\n}\n");
        f.write(
            "src/b.ts",
            "const hello = 1;\nlet x = 2;\nlet y = 3;\nhello();\n",
        );
        f.write("ignored/c.rs", "hello\n");
        f.write(".gitignore", "ignored/\n");
        f.write(".git/HEAD", "hello\n");
        std::fs::write(f.root().join("bin.dat"), b"hello\0world").unwrap();
        f
    }

    #[test]
    fn finds_matches_like_ripgrep() {
        let f = fixture();
        let out = run(&f, "grep", json!({"pattern": "hello"})).unwrap();
        assert_eq!(
            text_of(&out),
            "src/b.ts:1:const hello = 1;\nsrc/b.ts:4:hello();"
        );
        let out = run(&f, "grep", json!({"pattern": "hello", "ignoreCase": true})).unwrap();
        assert_eq!(
            text_of(&out),
            "a.rs:2:    println!(\"Hello\");\nsrc/b.ts:1:const hello = 1;\nsrc/b.ts:4:hello();"
        );
        let out = run(
            &f,
            "grep",
            json!({"pattern": "hello", "include": "*.rs", "ignoreCase": true}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "a.rs:2:    println!(\"Hello\");");
        let out = run(
            &f,
            "grep",
            json!({"pattern": "hello()", "fixedStrings": true}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "src/b.ts:4:hello();");
        let out = run(&f, "grep", json!({"pattern": "nothing here"})).unwrap();
        assert_eq!(text_of(&out), "No matches found");
        let out = run(&f, "grep", json!({"pattern": "main", "path": "a.rs"})).unwrap();
        assert_eq!(text_of(&out), "a.rs:1:fn main() {");
    }

    #[test]
    fn context_lines_and_groups() {
        let f = Fixture::new();
        let body: String = (1..=12).map(|i| format!("line {i}\n")).collect();
        f.write("n.txt", &body);
        let out = run(
            &f,
            "grep",
            json!({"pattern": "^line (2|3|10)$", "contextLines": 1}),
        )
        .unwrap();
        assert_eq!(
            text_of(&out),
            "n.txt-1-line 1\nn.txt:2:line 2\nn.txt:3:line 3\nn.txt-4-line 4\n--\nn.txt-9-line 9\nn.txt:10:line 10\nn.txt-11-line 11"
        );
    }

    #[test]
    fn limits() {
        let f = Fixture::new();
        f.write("many.txt", &"x\n".repeat(10));
        let out = run(&f, "grep", json!({"pattern": "x", "maxResults": 3})).unwrap();
        assert_eq!(
            text_of(&out),
            "many.txt:1:x\nmany.txt:2:x\nmany.txt:3:x\n[truncated at 3 matches]"
        );
        f.write("long.txt", &format!("{}\n", "y".repeat(600)));
        let out = run(&f, "grep", json!({"pattern": "y"})).unwrap();
        assert_eq!(text_of(&out), format!("long.txt:1:{}…", "y".repeat(500)));
        f.write("huge.txt", &"z".repeat(4 * 1024 * 1024 + 1));
        let out = run(&f, "grep", json!({"pattern": "z"})).unwrap();
        assert_eq!(text_of(&out), "No matches found");
    }

    #[test]
    fn refusals() {
        let f = fixture();
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", f.root().join("passwd")).unwrap();
        let err = run(&f, "grep", json!({"pattern": "("})).unwrap_err();
        assert!(
            err.to_string().starts_with("Invalid regular expression: "),
            "{err}"
        );
        for path in ["out", "passwd", "../outside", "/etc"] {
            let err = run(&f, "grep", json!({"pattern": "secret", "path": path})).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Path is outside the workspace: {path}")
            );
        }
        // Links are never followed by the walk.
        let out = run(&f, "grep", json!({"pattern": "secret|root"})).unwrap();
        assert_eq!(text_of(&out), "No matches found");
        let err = run(&f, "grep", json!({"pattern": "x", "contextLines": 11})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid arguments for grep: contextLines must be between 0 and 10, got 11"
        );
    }
}
