//! `search_files {pattern, path?, excludePatterns?}`: finds entries by glob, or (upstream's
//! behaviour, for a pattern without glob characters) by case-insensitive substring of the name.
//! The walk honours `.gitignore` and skips `.git`.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, MAX_WALK_ENTRIES, PathGlob, Tool, ToolError, parse, text};
use crate::agent::walk::{Step, WalkEnd, WalkOptions, walk};

pub(super) const TOOL: Tool = Tool {
    name: "search_files",
    description: "Find files and directories in the workspace by name. A pattern with glob \
                  characters (e.g. **/*.rs) is matched against paths; otherwise it is a \
                  case-insensitive substring of names. .gitignore is honoured.",
    schema,
    run,
};

/// Paths listed before the rest is summarised.
const MAX_RESULTS: usize = 1000;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Glob (e.g. **/*.rs) or, without glob characters, a case-insensitive substring of file names"},
            "path": {"type": "string", "default": "."},
            "excludePatterns": {"type": "array", "items": {"type": "string"}, "default": []},
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
    #[serde(default)]
    exclude_patterns: Vec<String>,
}

fn dot() -> String {
    ".".into()
}

enum Matcher {
    Glob(PathGlob),
    Substring(String),
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    if args.pattern.is_empty() {
        return Err(ToolError::InvalidArguments {
            tool: TOOL.name,
            message: "pattern must not be empty".into(),
        });
    }
    let matcher = if args.pattern.contains(['*', '?', '[', '{']) {
        Matcher::Glob(PathGlob::new(&args.pattern)?)
    } else {
        Matcher::Substring(args.pattern.to_lowercase())
    };
    let excludes = exclusions(&args.exclude_patterns)?;
    let start = cx.ws.resolve(&args.path)?;
    let options = WalkOptions {
        gitignore: true,
        skip_dirs: &[".git"],
        max_depth: usize::MAX,
        max_entries: MAX_WALK_ENTRIES,
    };
    let mut found = Vec::new();
    let end = walk(cx.ws, &start, &options, cx.cancel, &mut |entry| {
        let relative = entry
            .path
            .rel()
            .strip_prefix(start.rel())
            .unwrap_or(entry.path.rel());
        if excludes.iter().any(|glob| glob.is_match(relative)) {
            return Ok(Step::Skip);
        }
        let hit = match &matcher {
            Matcher::Glob(glob) => glob.is_match(relative),
            Matcher::Substring(needle) => entry
                .name
                .to_string_lossy()
                .to_lowercase()
                .contains(needle.as_str()),
        };
        if hit {
            found.push(entry.path.display());
        }
        Ok(Step::Continue)
    })?;
    found.sort();
    let mut lines: Vec<String> = found.iter().take(MAX_RESULTS).cloned().collect();
    if found.len() > MAX_RESULTS {
        lines.push(format!(
            "[… {} more matches not shown; narrow the pattern or the path]",
            found.len() - MAX_RESULTS
        ));
    }
    if end == WalkEnd::Truncated {
        lines.push(format!(
            "[Search stopped after {MAX_WALK_ENTRIES} entries; narrow the path]"
        ));
    }
    if found.is_empty() && end != WalkEnd::Truncated {
        return Ok(text("No matches found"));
    }
    Ok(text(lines.join("\n")))
}

/// `excludePatterns` as globs. An entry without `*` names a file or directory anywhere, as
/// upstream's `**/<p>/**` does; the entry itself is excluded too, so its subtree is not walked.
fn exclusions(patterns: &[String]) -> Result<Vec<PathGlob>, ToolError> {
    let mut globs = Vec::new();
    for pattern in patterns.iter().filter(|p| !p.is_empty()) {
        if pattern.contains('*') {
            globs.push(PathGlob::new(pattern)?);
        } else {
            let name = pattern.trim_matches('/');
            globs.push(PathGlob::new(&format!("**/{name}"))?);
        }
    }
    Ok(globs)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;

    fn fixture() -> Fixture {
        let f = Fixture::new();
        f.write("src/main.rs", "");
        f.write("src/lib.rs", "");
        f.write("src/util/Mainly.txt", "");
        f.write("docs/MAIN.md", "");
        f.write("node_modules/pkg/main.js", "");
        f.write(".git/main", "");
        f.write("target/main.rs", "");
        f.write(".gitignore", "target/\n");
        f
    }

    #[test]
    fn substring_matches_names_case_insensitively() {
        let f = fixture();
        let out = run(&f, "search_files", json!({"pattern": "main"})).unwrap();
        assert_eq!(
            text_of(&out),
            "docs/MAIN.md\nnode_modules/pkg/main.js\nsrc/main.rs\nsrc/util/Mainly.txt"
        );
        let out = run(
            &f,
            "search_files",
            json!({"pattern": "main", "excludePatterns": ["node_modules", "*.md"]}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "src/main.rs\nsrc/util/Mainly.txt");
        let out = run(&f, "search_files", json!({"pattern": "util"})).unwrap();
        assert_eq!(text_of(&out), "src/util");
    }

    #[test]
    fn globs_match_paths_below_the_start() {
        let f = fixture();
        let out = run(&f, "search_files", json!({"pattern": "**/*.rs"})).unwrap();
        assert_eq!(text_of(&out), "src/lib.rs\nsrc/main.rs");
        let out = run(
            &f,
            "search_files",
            json!({"pattern": "*.rs", "path": "src"}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "src/lib.rs\nsrc/main.rs");
        let out = run(
            &f,
            "search_files",
            json!({"pattern": "util/*", "path": "src"}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "src/util/Mainly.txt");
        let out = run(&f, "search_files", json!({"pattern": "*.zig"})).unwrap();
        assert_eq!(text_of(&out), "No matches found");
    }

    #[test]
    fn refusals() {
        let f = fixture();
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        let err = run(&f, "search_files", json!({"pattern": "x", "path": "../"})).unwrap_err();
        assert_eq!(err.to_string(), "Path is outside the workspace: ../");
        let err = run(&f, "search_files", json!({"pattern": "x", "path": "out"})).unwrap_err();
        assert_eq!(err.to_string(), "Path is outside the workspace: out");
        let out = run(&f, "search_files", json!({"pattern": "secret"})).unwrap();
        assert_eq!(
            text_of(&out),
            "No matches found",
            "symlinked directories are not entered"
        );
        let err = run(&f, "search_files", json!({"pattern": ""})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid arguments for search_files: pattern must not be empty"
        );
        let err = run(&f, "search_files", json!({"pattern": "[a"})).unwrap_err();
        assert!(
            err.to_string().starts_with("Invalid glob pattern \"[a\""),
            "{err}"
        );
    }

    #[test]
    fn results_are_capped() {
        let f = Fixture::new();
        for i in 0..1003 {
            f.write(&format!("d/f{i:04}.txt"), "");
        }
        let out = text_of(&run(&f, "search_files", json!({"pattern": "*.txt"})).unwrap());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1001);
        assert_eq!(
            lines[1000],
            "[… 3 more matches not shown; narrow the pattern or the path]"
        );
    }
}
