//! `delete_file {path, recursive?}`: removes a file, a symlink (the link, never its target), or
//! with `recursive` a directory tree. The workspace root is refused.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, Tool, ToolError, parse, text};

pub(super) const TOOL: Tool = Tool {
    name: "delete_file",
    description: "Delete a file from the workspace. Deleting a directory requires \
                  recursive: true.",
    schema,
    run,
};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "recursive": {"type": "boolean", "default": false, "description": "Required to delete a directory and everything in it"},
        },
        "required": ["path"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
    #[serde(default)]
    recursive: bool,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    let path = cx.ws.resolve(&args.path)?;
    cx.ws.remove(&path, args.recursive, cx.cancel)?;
    Ok(text(format!("Successfully deleted {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, run_with, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn deletes_files_and_trees() {
        let f = Fixture::new();
        f.write("a.txt", "");
        f.write("d/e/f.txt", "");
        let out = run(&f, "delete_file", json!({"path": "a.txt"})).unwrap();
        assert_eq!(text_of(&out), "Successfully deleted a.txt");
        let err = run(&f, "delete_file", json!({"path": "d"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Is a directory: d; set recursive to true to delete it"
        );
        run(&f, "delete_file", json!({"path": "d", "recursive": true})).unwrap();
        assert_eq!(std::fs::read_dir(f.root()).unwrap().count(), 0);
    }

    #[test]
    fn refusals() {
        let f = Fixture::new();
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        let root = f.root();
        let cases = [
            (".", "Refusing to delete the workspace root".to_owned()),
            ("", "Refusing to delete the workspace root".to_owned()),
            (
                root.to_str().unwrap(),
                "Refusing to delete the workspace root".to_owned(),
            ),
            ("..", "Path is outside the workspace: ..".to_owned()),
            (
                "out/secret.txt",
                "Path is outside the workspace: out/secret.txt".to_owned(),
            ),
            (
                "/etc/passwd",
                "Path is outside the workspace: /etc/passwd".to_owned(),
            ),
            ("gone", "No such file or directory: gone".to_owned()),
        ];
        for (path, message) in cases {
            let err = run(&f, "delete_file", json!({"path": path, "recursive": true})).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert!(f.outside().join("secret.txt").exists());
        // The link itself may go; what it points at stays.
        run(&f, "delete_file", json!({"path": "out", "recursive": true})).unwrap();
        assert!(f.outside().join("secret.txt").exists());
    }

    #[test]
    fn abort_stops_a_recursive_delete() {
        let f = Fixture::new();
        f.write("d/a", "");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = run_with(
            &f,
            "delete_file",
            json!({"path": "d", "recursive": true}),
            &cancel,
        )
        .unwrap_err();
        assert!(err.is_aborted());
        assert!(f.root().join("d/a").exists());
    }
}
