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

    #[test]
    fn a_moved_tree_may_not_end_up_too_deep() {
        use crate::agent::workspace::MAX_DEPTH;
        let f = Fixture::new();
        // A tree whose deepest entry is 100 levels below `t` (99 directories, then a file).
        let tree = format!("t/{}/leaf.txt", vec!["x"; 99].join("/"));
        f.write(&tree, "leaf");
        let room = MAX_DEPTH - 100;
        let fits = vec!["a"; room].join("/");
        let too_deep = format!("{fits}/b");
        let err = run(
            &f,
            "move_file",
            json!({"source": "t", "destination": too_deep}),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Path too deep: t -> "), "{err}");
        assert!(f.root().join(&tree).exists());
        run(&f, "move_file", json!({"source": "t", "destination": fits})).unwrap();
        assert_eq!(
            f.read(&format!("{fits}/{}/leaf.txt", vec!["x"; 99].join("/"))),
            "leaf"
        );
        // A file or an empty directory only needs its own place.
        f.write("f.txt", "f");
        let deepest = format!("{}/f.txt", vec!["c"; MAX_DEPTH - 1].join("/"));
        run(
            &f,
            "move_file",
            json!({"source": "f.txt", "destination": deepest}),
        )
        .unwrap();
        std::fs::create_dir(f.root().join("empty")).unwrap();
        let beyond = vec!["e"; MAX_DEPTH + 1].join("/");
        let err = run(
            &f,
            "move_file",
            json!({"source": "empty", "destination": beyond}),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Path too deep:"), "{err}");
    }

    /// The attack the cap stops: doubling a deep tree into itself, move after move.
    #[test]
    fn nesting_a_tree_into_its_copy_stops_at_the_cap() {
        use crate::agent::workspace::MAX_DEPTH;
        let f = Fixture::new();
        let half = vec!["p"; MAX_DEPTH / 2].join("/");
        run(
            &f,
            "create_directory",
            json!({"path": format!("one/{half}")}),
        )
        .unwrap();
        run(
            &f,
            "create_directory",
            json!({"path": format!("two/{half}")}),
        )
        .unwrap();
        let err = run(
            &f,
            "move_file",
            json!({"source": "one", "destination": format!("two/{half}/one")}),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Path too deep:"), "{err}");
    }
}
