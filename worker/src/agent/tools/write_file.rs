//! `write_file {path, content}`: creates or replaces a file atomically, creating missing parent
//! directories (upstream fails on them; creating them is friendlier).

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, MAX_FILE_BYTES, Tool, ToolError, parse, text};

pub(super) const TOOL: Tool = Tool {
    name: "write_file",
    description: "Create a file in the workspace or overwrite it with new content (at most \
                  4 MiB). Missing parent directories are created.",
    schema,
    run,
};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "content": {"type": "string"},
        },
        "required": ["path", "content"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
    content: String,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    let size = args.content.len();
    if size > MAX_FILE_BYTES {
        return Err(ToolError::TooLarge {
            size: size as u64,
            limit: MAX_FILE_BYTES as u64,
        });
    }
    let path = cx.ws.resolve(&args.path)?;
    cx.ws
        .write_atomic(&path, args.content.as_bytes(), cx.cancel)?;
    Ok(text(format!(
        "Successfully wrote {size} bytes to {}",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, run_with, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn writes_and_overwrites() {
        let f = Fixture::new();
        let out = run(
            &f,
            "write_file",
            json!({"path": "notes.txt", "content": "hi"}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "Successfully wrote 2 bytes to notes.txt");
        assert_eq!(f.read("notes.txt"), "hi");
        let out = run(
            &f,
            "write_file",
            json!({"path": "./deep/er/../x.md", "content": "héllo"}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "Successfully wrote 6 bytes to deep/x.md");
        run(
            &f,
            "write_file",
            json!({"path": "notes.txt", "content": ""}),
        )
        .unwrap();
        assert_eq!(f.read("notes.txt"), "");
    }

    #[test]
    fn refusals() {
        let f = Fixture::new();
        std::fs::create_dir(f.root().join("dir")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", f.root().join("passwd")).unwrap();
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        let outside_file = f.outside().join("new.txt");
        let cases = [
            ("dir", "Is a directory: dir".to_owned()),
            ("passwd", "Path is outside the workspace: passwd".to_owned()),
            (
                "out/new.txt",
                "Path is outside the workspace: out/new.txt".to_owned(),
            ),
            (
                "../outside/new.txt",
                "Path is outside the workspace: ../outside/new.txt".to_owned(),
            ),
            (
                outside_file.to_str().unwrap(),
                format!("Path is outside the workspace: {}", outside_file.display()),
            ),
        ];
        for (path, message) in cases {
            let err = run(&f, "write_file", json!({"path": path, "content": "x"})).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert!(!outside_file.exists());
        let big = "x".repeat(4 * 1024 * 1024 + 1);
        let err = run(&f, "write_file", json!({"path": "big", "content": big})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Content too large: 4194305 bytes (limit 4194304)"
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = run_with(
            &f,
            "write_file",
            json!({"path": "a", "content": "x"}),
            &cancel,
        )
        .unwrap_err();
        assert!(err.is_aborted());
        assert!(!f.root().join("a").exists());
    }

    #[test]
    fn depth_is_capped_for_new_files_only() {
        use crate::agent::workspace::MAX_DEPTH;
        let f = Fixture::new();
        let dirs = vec!["d"; MAX_DEPTH - 1].join("/");
        run(
            &f,
            "write_file",
            json!({"path": format!("{dirs}/ok.txt"), "content": "x"}),
        )
        .unwrap();
        let err = run(
            &f,
            "write_file",
            json!({"path": format!("{dirs}/d/no.txt"), "content": "x"}),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Path too deep:"), "{err}");
        assert!(!f.root().join(format!("{dirs}/d")).exists());
        // A file that is deeper already (made by a command, say) can still be rewritten.
        let deep = format!("{dirs}/d/e/old.txt");
        f.write(&deep, "old");
        run(&f, "write_file", json!({"path": deep, "content": "new"})).unwrap();
        assert_eq!(f.read(&deep), "new");
    }
}
