//! `move_file {source, destination}`: renames a file or directory; the destination must not
//! exist (upstream's rule), and its parent directories are created.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, Tool, ToolError, parse, text};

pub(super) const TOOL: Tool = Tool {
    name: "move_file",
    description: "Move or rename a file or directory in the workspace. Fails if the destination \
                  exists; missing parent directories of the destination are created.",
    schema,
    run,
};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "source": {"type": "string"},
            "destination": {"type": "string"},
        },
        "required": ["source", "destination"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    source: String,
    destination: String,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    let source = cx.ws.resolve(&args.source)?;
    let destination = cx.ws.resolve(&args.destination)?;
    cx.ws.rename_new(&source, &destination)?;
    Ok(text(format!(
        "Successfully moved {} to {}",
        source.display(),
        destination.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, text_of};
    use crate::agent::workspace::tests::Fixture;
    use serde_json::json;

    #[test]
    fn moves_files_and_directories() {
        let f = Fixture::new();
        f.write("a.txt", "a");
        f.write("dir/x", "x");
        let out = run(
            &f,
            "move_file",
            json!({"source": "a.txt", "destination": "sub/b.txt"}),
        )
        .unwrap();
        assert_eq!(text_of(&out), "Successfully moved a.txt to sub/b.txt");
        assert_eq!(f.read("sub/b.txt"), "a");
        run(
            &f,
            "move_file",
            json!({"source": "dir", "destination": "moved"}),
        )
        .unwrap();
        assert_eq!(f.read("moved/x"), "x");
    }

    #[test]
    fn refusals() {
        let f = Fixture::new();
        f.write("a.txt", "a");
        f.write("b.txt", "b");
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        let cases = [
            ("a.txt", "b.txt", "Destination already exists: b.txt"),
            ("nope", "c", "No such file or directory: nope"),
            (
                "a.txt",
                "../a.txt",
                "Path is outside the workspace: ../a.txt",
            ),
            (
                "a.txt",
                "out/a.txt",
                "Path is outside the workspace: out/a.txt",
            ),
            (
                "out/secret.txt",
                "s.txt",
                "Path is outside the workspace: out/secret.txt",
            ),
            (
                "/etc/hostname",
                "h",
                "Path is outside the workspace: /etc/hostname",
            ),
            (".", "x", "Refusing to move the workspace root"),
        ];
        for (source, destination, message) in cases {
            let err = run(
                &f,
                "move_file",
                json!({"source": source, "destination": destination}),
            )
            .unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert_eq!(f.read("a.txt"), "a");
        assert!(f.outside().join("secret.txt").exists());
        assert!(!f.outside().join("a.txt").exists());
    }
}
