//! `list_directory {path?, depth?}`: `[DIR] name` / `[FILE] name` lines, as the Agent TARS
//! filesystem server prints them, sorted by name so runs are reproducible.

use std::os::fd::OwnedFd;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, MAX_WALK_ENTRIES, Tool, ToolError, check_range, parse, text};
use crate::agent::workspace::{FsError, Kind, Workspace, WsPath};

pub(super) const TOOL: Tool = Tool {
    name: "list_directory",
    description: "List the entries of a directory in the workspace, one per line as \
                  `[DIR] name` or `[FILE] name`. Use depth > 1 to include subdirectories.",
    schema,
    run,
};

/// Lines shown before the rest is summarised.
const MAX_LINES: usize = 1000;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Directory relative to the workspace root", "default": "."},
            "depth": {"type": "integer", "minimum": 1, "maximum": 5, "default": 1, "description": "1 = direct children only"},
        },
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default = "dot")]
    path: String,
    #[serde(default = "one")]
    depth: u64,
}

fn dot() -> String {
    ".".into()
}

fn one() -> u64 {
    1
}

struct Listing {
    lines: Vec<String>,
    hidden: usize,
    visited: usize,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    check_range(TOOL.name, "depth", args.depth, 1, 5)?;
    let start = cx.ws.resolve(&args.path)?;
    let dir = cx.ws.open_dir(&start)?;
    let mut listing = Listing {
        lines: Vec::new(),
        hidden: 0,
        visited: 0,
    };
    list(cx, &dir, &start, "", args.depth as usize, &mut listing)?;
    if listing.lines.is_empty() && listing.hidden == 0 {
        return Ok(text("(empty directory)"));
    }
    let mut out = listing.lines.join("\n");
    if listing.hidden > 0 {
        out.push_str(&format!("\n[… {} more entries not shown]", listing.hidden));
    }
    Ok(text(out))
}

/// Appends the entries of `dir` (shown with `prefix`), descending `depth - 1` more levels.
/// Symlinked directories are listed but not entered.
fn list(
    cx: &Context<'_>,
    dir: &OwnedFd,
    path: &WsPath,
    prefix: &str,
    depth: usize,
    listing: &mut Listing,
) -> Result<(), FsError> {
    for entry in Workspace::read_dir(dir, path.given())? {
        if cx.cancel.is_cancelled() {
            return Err(FsError::Aborted);
        }
        if listing.visited >= MAX_WALK_ENTRIES {
            return Ok(());
        }
        listing.visited += 1;
        let name = format!("{prefix}{}", entry.name.to_string_lossy());
        let is_dir = entry.kind == Kind::Dir;
        if listing.lines.len() < MAX_LINES {
            let tag = if is_dir { "[DIR]" } else { "[FILE]" };
            listing.lines.push(format!("{tag} {name}"));
        } else {
            listing.hidden += 1;
        }
        if is_dir && depth > 1 {
            let child = path.child(&entry.name);
            // A directory that vanished or cannot be read is listed, just not entered.
            if let Ok(sub) = Workspace::open_subdir(dir, &entry.name, child.given()) {
                list(cx, &sub, &child, &format!("{name}/"), depth - 1, listing)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, run_with, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn lists_sorted_with_kinds() {
        let f = Fixture::new();
        f.write("b.txt", "");
        f.write("a/x.txt", "");
        f.write("a/deeper/y.txt", "");
        f.write(".hidden", "");
        f.write("B", "");
        let out = run(&f, "list_directory", json!({})).unwrap();
        assert_eq!(
            text_of(&out),
            "[FILE] .hidden\n[FILE] B\n[DIR] a\n[FILE] b.txt"
        );
        let out = run(&f, "list_directory", json!({"path": ".", "depth": 3})).unwrap();
        assert_eq!(
            text_of(&out),
            "[FILE] .hidden\n[FILE] B\n[DIR] a\n[DIR] a/deeper\n[FILE] a/deeper/y.txt\n[FILE] a/x.txt\n[FILE] b.txt"
        );
        let out = run(&f, "list_directory", json!({"path": "a"})).unwrap();
        assert_eq!(text_of(&out), "[DIR] deeper\n[FILE] x.txt");
    }

    #[test]
    fn empty_missing_and_wrong_kind() {
        let f = Fixture::new();
        std::fs::create_dir(f.root().join("empty")).unwrap();
        f.write("file.txt", "");
        let out = run(&f, "list_directory", json!({"path": "empty"})).unwrap();
        assert_eq!(text_of(&out), "(empty directory)");
        let err = run(&f, "list_directory", json!({"path": "nope"})).unwrap_err();
        assert_eq!(err.to_string(), "No such file or directory: nope");
        let err = run(&f, "list_directory", json!({"path": "file.txt"})).unwrap_err();
        assert_eq!(err.to_string(), "Not a directory: file.txt");
        let err = run(&f, "list_directory", json!({"depth": 6})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid arguments for list_directory: depth must be between 1 and 5, got 6"
        );
    }

    #[test]
    fn escapes_are_refused() {
        let f = Fixture::new();
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        for path in ["..", "/etc", "out", "out/"] {
            let err = run(&f, "list_directory", json!({"path": path})).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Path is outside the workspace: {path}")
            );
        }
        // Listed as an entry, never entered.
        let out = run(&f, "list_directory", json!({"depth": 5})).unwrap();
        assert_eq!(text_of(&out), "[FILE] out");
    }

    #[test]
    fn long_listings_are_capped() {
        let f = Fixture::new();
        for i in 0..1005 {
            f.write(&format!("f{i:04}"), "");
        }
        let out = text_of(&run(&f, "list_directory", json!({})).unwrap());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1001);
        assert_eq!(lines[999], "[FILE] f0999");
        assert_eq!(lines[1000], "[… 5 more entries not shown]");
    }

    #[test]
    fn abort_stops_the_listing() {
        let f = Fixture::new();
        f.write("a", "");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = run_with(&f, "list_directory", json!({}), &cancel).unwrap_err();
        assert!(err.is_aborted());
    }
}
