//! `create_directory {path}`: `mkdir -p`; succeeds when the directory exists already.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, Tool, ToolError, parse, text};

pub(super) const TOOL: Tool = Tool {
    name: "create_directory",
    description: "Create a directory in the workspace, with any missing parents. Succeeds if it \
                  already exists.",
    schema,
    run,
};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {"path": {"type": "string"}},
        "required": ["path"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    let path = cx.ws.resolve(&args.path)?;
    cx.ws.create_dir_all(&path)?;
    Ok(text(format!(
        "Successfully created directory {}",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;

    #[test]
    fn creates_parents_and_tolerates_existing() {
        let f = Fixture::new();
        let out = run(&f, "create_directory", json!({"path": "a/b/c"})).unwrap();
        assert_eq!(text_of(&out), "Successfully created directory a/b/c");
        assert!(f.root().join("a/b/c").is_dir());
        run(&f, "create_directory", json!({"path": "a/b"})).unwrap();
        run(&f, "create_directory", json!({"path": "."})).unwrap();
    }

    #[test]
    fn refusals() {
        let f = Fixture::new();
        f.write("file", "");
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        let cases = [
            ("file", "Not a directory: file"),
            ("file/x", "Not a directory: file/x"),
            ("out/x", "Path is outside the workspace: out/x"),
            ("../x", "Path is outside the workspace: ../x"),
            ("/tmp/x", "Path is outside the workspace: /tmp/x"),
        ];
        for (path, message) in cases {
            let err = run(&f, "create_directory", json!({"path": path})).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert!(!f.outside().join("x").exists());
    }

    #[test]
    fn depth_is_capped() {
        use crate::agent::workspace::MAX_DEPTH;
        let f = Fixture::new();
        let deepest = vec!["d"; MAX_DEPTH].join("/");
        run(&f, "create_directory", json!({"path": deepest})).unwrap();
        assert!(f.root().join(&deepest).is_dir());
        let deeper = format!("{deepest}/e");
        let err = run(&f, "create_directory", json!({"path": deeper})).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Path too deep: {deeper} would put entries more than {MAX_DEPTH} levels below \
                 the workspace root"
            )
        );
        assert!(!f.root().join(&deeper).exists());
        // Nothing is created on the way to a refusal either.
        let fresh = vec!["n"; MAX_DEPTH + 5].join("/");
        run(&f, "create_directory", json!({"path": fresh})).unwrap_err();
        assert!(!f.root().join("n").exists());
    }
}
