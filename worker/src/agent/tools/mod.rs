//! The built-in workspace tools: the registry the model sees, the dispatch of a
//! tool call to one, and the shape of results and errors.
//!
//! Each tool lives in its own file and is a [`Tool`]: name, description, JSON schema, and a
//! blocking `run` that turns typed arguments into MCP-style content parts. Tools run on tokio's
//! blocking pool, confined to the session's [`Workspace`], and look at the run's cancellation
//! token between files and chunks.

mod create_directory;
mod delete_file;
mod edit_file;
mod grep;
mod list_directory;
mod move_file;
mod read_file;
mod run_command;
mod search_files;
mod write_file;

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shared::events::ToolInfo;
use tokio_util::sync::CancellationToken;

use super::workspace::{FsError, Workspace};
use crate::jail::Confinement;

/// Files larger than this are not read by `edit_file` nor searched by `grep`, and `write_file`
/// refuses content above it.
const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// Entries one walk visits before it stops with a note.
const MAX_WALK_ENTRIES: usize = 100_000;
/// A NUL byte in this many leading bytes marks a file as binary.
const BINARY_SNIFF_BYTES: usize = 8 * 1024;

/// One built-in tool.
pub(crate) struct Tool {
    pub(crate) name: &'static str,
    description: &'static str,
    schema: fn() -> Value,
    run: fn(&Context<'_>, &Value) -> Result<Value, ToolError>,
}

/// What a running tool may use.
pub(crate) struct Context<'a> {
    pub(crate) ws: &'a Workspace,
    pub(crate) cancel: &'a CancellationToken,
    pub(crate) confinement: &'a Confinement,
}

/// The file tools, in the order they are offered to the model.
const TOOLS: &[Tool] = &[
    list_directory::TOOL,
    read_file::TOOL,
    write_file::TOOL,
    edit_file::TOOL,
    search_files::TOOL,
    grep::TOOL,
    create_directory::TOOL,
    move_file::TOOL,
    delete_file::TOOL,
];

/// Offered after the file tools, and only where programs can run: a `strict` jail with the
/// read-only system root (`isolation.commands`). Anywhere else the model never
/// sees `run_command`, and a call of it is an unknown tool.
const COMMAND_TOOLS: &[Tool] = &[run_command::TOOL];

/// The tools this worker offers.
fn available(confinement: &Confinement) -> impl Iterator<Item = &'static Tool> {
    let commands = if confinement.commands {
        COMMAND_TOOLS
    } else {
        &[]
    };
    TOOLS.iter().chain(commands)
}

/// Why a tool call failed. The `Display` text is what the model reads after `Error: `, so every
/// variant's wording is part of the contract.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("Tool \"{0}\" not found")]
    NotFound(String),
    #[error("Invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: &'static str, message: String },
    #[error("{path} is a binary file ({size} bytes); read_file returns text or images only")]
    Binary { path: String, size: u64 },
    #[error("{path} is a binary file ({size} bytes); edit_file edits text files only")]
    BinaryEdit { path: String, size: u64 },
    #[error("Content too large: {size} bytes (limit {limit})")]
    TooLarge { size: u64, limit: u64 },
    #[error("edit #{index}: oldText was not found in {path}")]
    EditNotFound { index: usize, path: String },
    #[error(
        "edit #{index}: oldText matches {count} places in {path}; include more surrounding lines or set replaceAll"
    )]
    EditAmbiguous {
        index: usize,
        count: usize,
        path: String,
    },
    #[error("edit #{index}: oldText must not be empty")]
    EditEmpty { index: usize },
    #[error("Invalid regular expression: {0}")]
    Regex(String),
    #[error("Invalid glob pattern {pattern:?}: {message}")]
    Glob { pattern: String, message: String },
    /// The partial output goes in front of the error line, see [`Failure`].
    #[error("Command timed out after {seconds}s")]
    TimedOut { seconds: u64, partial: String },
    #[error("Could not run the command: {0}")]
    Command(String),
    /// The run was aborted while the tool ran (its result then says so).
    #[error("aborted")]
    Aborted,
    #[error("Workspace unavailable: {0}")]
    WorkspaceUnavailable(#[source] Arc<FsError>),
    /// A full workspace whose jail has a disk quota: the message names it.
    #[error("{}: {path}", super::workspace::no_space(Some(*quota)))]
    QuotaReached { path: String, quota: u64 },
    #[error("The tool failed unexpectedly: {0}")]
    Crashed(String),
}

impl ToolError {
    /// Whether the tool stopped because the run was aborted.
    pub(crate) fn is_aborted(&self) -> bool {
        matches!(self, Self::Fs(FsError::Aborted) | Self::Aborted)
    }

    /// A full workspace names the quota it ran into, when the jail has one.
    fn naming_quota(self, quota: Option<u64>) -> Self {
        match (self, quota) {
            (Self::Fs(FsError::NoSpace { path }), Some(quota)) => {
                Self::QuotaReached { path, quota }
            }
            (error, _) => error,
        }
    }
}

/// A failed call as its `tool_result` shows it: `error` is the message, and `content` is
/// `Error: <message>`, preceded by whatever output the tool produced before it failed (the
/// partial output of a timed-out command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) message: String,
    output: Option<String>,
}

impl Failure {
    /// A failure without output.
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            output: None,
        }
    }

    /// The `content` of the failed call's `tool_result`.
    pub(crate) fn content(&self) -> String {
        match &self.output {
            Some(output) if !output.is_empty() => {
                let sep = if output.ends_with('\n') { "" } else { "\n" };
                format!("{output}{sep}Error: {}", self.message)
            }
            _ => format!("Error: {}", self.message),
        }
    }
}

impl From<ToolError> for Failure {
    fn from(error: ToolError) -> Self {
        let message = error.to_string();
        let output = match error {
            ToolError::TimedOut { partial, .. } => Some(partial),
            _ => None,
        };
        Self { message, output }
    }
}

/// The session's workspace, or why it could not be opened (the tools then say so, and the
/// agent can still talk).
pub(crate) type WorkspaceSlot = Result<Arc<Workspace>, Arc<FsError>>;

fn find(confinement: &Confinement, name: &str) -> Option<&'static Tool> {
    available(confinement).find(|tool| tool.name == name)
}

/// Whether `name` is a built-in tool.
pub(crate) fn exists(confinement: &Confinement, name: &str) -> bool {
    find(confinement, name).is_some()
}

/// Tool definitions in OpenAI `tools` format, as sent to the model.
/// [`definitions`] as the JSON array text a model request carries.
pub(crate) fn definitions_json(confinement: &Confinement) -> std::sync::Arc<str> {
    Value::Array(definitions(confinement)).to_string().into()
}

pub(crate) fn definitions(confinement: &Confinement) -> Vec<Value> {
    available(confinement)
        .map(|tool| {
            json!({
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": (tool.schema)(),
                },
            })
        })
        .collect()
}

/// What `tool_call.tool` says about `name`.
pub(crate) fn describe(confinement: &Confinement, name: &str) -> ToolInfo {
    match find(confinement, name) {
        Some(tool) => ToolInfo {
            name: tool.name.to_owned(),
            description: tool.description.to_owned(),
            schema: (tool.schema)(),
        },
        None => ToolInfo {
            name: name.to_owned(),
            description: "Unknown tool".to_owned(),
            schema: json!({"type": "object", "properties": {}}),
        },
    }
}

/// Runs the tool `name` with `arguments` (a JSON object) on the blocking pool.
///
/// # Errors
/// An unknown tool, invalid arguments, or the tool's own failure.
pub(crate) async fn execute(
    workspace: &WorkspaceSlot,
    confinement: &Arc<Confinement>,
    name: &str,
    arguments: &Value,
    cancel: &CancellationToken,
) -> Result<Value, ToolError> {
    let tool = find(confinement, name).ok_or_else(|| ToolError::NotFound(name.to_owned()))?;
    let ws = workspace.clone().map_err(ToolError::WorkspaceUnavailable)?;
    let arguments = arguments.clone();
    let cancel = cancel.clone();
    let confinement = confinement.clone();
    tokio::task::spawn_blocking(move || {
        (tool.run)(
            &Context {
                ws: &ws,
                cancel: &cancel,
                confinement: &confinement,
            },
            &arguments,
        )
        .map_err(|e| e.naming_quota(confinement.limits.disk))
    })
    .await
    .map_err(|e| ToolError::Crashed(e.to_string()))?
}

/// A successful result of one text part.
pub(crate) fn text(text: impl Into<String>) -> Value {
    json!([{"type": "text", "text": text.into()}])
}

/// `arguments` as the tool's typed argument struct.
fn parse<T: DeserializeOwned>(tool: &'static str, arguments: &Value) -> Result<T, ToolError> {
    serde_json::from_value(arguments.clone()).map_err(|e| ToolError::InvalidArguments {
        tool,
        message: e.to_string(),
    })
}

/// The schema's `minimum`/`maximum`, checked in the worker too: models do not always obey.
fn check_range(
    tool: &'static str,
    field: &str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ToolError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ToolError::InvalidArguments {
            tool,
            message: format!("{field} must be between {min} and {max}, got {value}"),
        })
    }
}

/// A glob as the search tools read it: `*` stays within one path component and `**` crosses
/// them; a pattern without `/` is matched against the entry's name, as `.gitignore` and
/// ripgrep do, so `*.rs` finds Rust files at any depth.
struct PathGlob {
    matcher: GlobMatcher,
    names_only: bool,
}

impl PathGlob {
    fn new(pattern: &str) -> Result<Self, ToolError> {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| ToolError::Glob {
                pattern: pattern.to_owned(),
                message: e.kind().to_string(),
            })?;
        Ok(Self {
            matcher: glob.compile_matcher(),
            names_only: !pattern.contains('/'),
        })
    }

    /// Whether the entry at `relative` (to the search's start) matches.
    fn is_match(&self, relative: &std::path::Path) -> bool {
        if self.names_only {
            relative
                .file_name()
                .is_some_and(|name| self.matcher.is_match(name))
        } else {
            self.matcher.is_match(relative)
        }
    }
}

/// The first `max` characters of `line`, and whether it was longer.
fn cut_chars(line: &str, max: usize) -> (&str, bool) {
    match line.char_indices().nth(max) {
        Some((at, _)) => (&line[..at], true),
        None => (line, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::workspace::tests::Fixture;

    /// Runs `name` against the fixture's workspace with `arguments`.
    pub(super) fn run(f: &Fixture, name: &str, arguments: Value) -> Result<Value, ToolError> {
        run_with(f, name, arguments, &CancellationToken::new())
    }

    pub(super) fn run_with(
        f: &Fixture,
        name: &str,
        arguments: Value,
        cancel: &CancellationToken,
    ) -> Result<Value, ToolError> {
        let confinement = Confinement::unconfined();
        let tool = find(&confinement, name).expect("known tool");
        (tool.run)(
            &Context {
                ws: &f.ws,
                cancel,
                confinement: &confinement,
            },
            &arguments,
        )
    }

    /// The text of a one-part result.
    pub(super) fn text_of(result: &Value) -> String {
        let parts = result.as_array().expect("parts");
        parts
            .iter()
            .map(|p| p["text"].as_str().expect("text part"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn definitions_are_openai_tools_with_the_spec_names() {
        let defs = definitions(&Confinement::unconfined());
        let names: Vec<&str> = defs
            .iter()
            .map(|d| d["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "list_directory",
                "read_file",
                "write_file",
                "edit_file",
                "search_files",
                "grep",
                "create_directory",
                "move_file",
                "delete_file"
            ]
        );
        for def in &defs {
            assert_eq!(def["type"], "function");
            assert_eq!(def["function"]["parameters"]["type"], "object");
            assert_eq!(def["function"]["parameters"]["additionalProperties"], false);
            assert!(!def["function"]["description"].as_str().unwrap().is_empty());
        }
        let confinement = Confinement::unconfined();
        assert_eq!(
            describe(&confinement, "read_file").schema["required"],
            json!(["path"])
        );
        let unknown = describe(&confinement, "nope");
        assert_eq!(unknown.description, "Unknown tool");
        assert_eq!(unknown.schema, json!({"type": "object", "properties": {}}));
    }

    #[test]
    fn bad_arguments_name_the_tool() {
        let f = Fixture::new();
        let err = run(&f, "read_file", json!({})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid arguments for read_file: missing field `path`"
        );
        let err = run(
            &f,
            "write_file",
            json!({"path": "a", "content": "b", "x": 1}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Invalid arguments for write_file: unknown field `x`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn execute_dispatches_on_the_blocking_pool() {
        let f = Fixture::new();
        f.write("a.txt", "hello");
        let slot: WorkspaceSlot = Ok(Arc::new(Workspace::open(&f.root()).unwrap()));
        let cancel = CancellationToken::new();
        let jail = Arc::new(Confinement::unconfined());
        let out = execute(
            &slot,
            &jail,
            "read_file",
            &json!({"path": "a.txt"}),
            &cancel,
        )
        .await
        .unwrap();
        assert_eq!(out, json!([{"type": "text", "text": "hello"}]));
        let err = execute(&slot, &jail, "nope", &json!({}), &cancel)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "Tool \"nope\" not found");
        let missing: WorkspaceSlot = Err(Arc::new(FsError::NotFound("/gone".into())));
        let err = execute(&missing, &jail, "read_file", &json!({"path": "a"}), &cancel)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Workspace unavailable: No such file or directory: /gone"
        );
    }

    #[test]
    fn failures_put_partial_output_before_the_error_line() {
        let plain = Failure::from(ToolError::NotFound("x".into()));
        assert_eq!(plain.message, "Tool \"x\" not found");
        assert_eq!(plain.content(), "Error: Tool \"x\" not found");
        let timed_out = Failure::from(ToolError::TimedOut {
            seconds: 2,
            partial: "STDOUT:\nhalf".into(),
        });
        assert_eq!(timed_out.message, "Command timed out after 2s");
        assert_eq!(
            timed_out.content(),
            "STDOUT:\nhalf\nError: Command timed out after 2s"
        );
        let silent = Failure::from(ToolError::TimedOut {
            seconds: 2,
            partial: String::new(),
        });
        assert_eq!(silent.content(), "Error: Command timed out after 2s");
        assert!(ToolError::Aborted.is_aborted());
    }

    #[test]
    fn a_full_workspace_names_the_jails_quota() {
        let full = || {
            ToolError::Fs(FsError::NoSpace {
                path: "big.bin".into(),
            })
        };
        assert_eq!(
            full().naming_quota(Some(64 << 20)).to_string(),
            "No space left on device: the session's disk quota of 64 MiB is reached: big.bin"
        );
        assert_eq!(
            full().naming_quota(None).to_string(),
            "No space left on device: big.bin"
        );
        let other = ToolError::NotFound("x".into()).naming_quota(Some(1));
        assert_eq!(other.to_string(), "Tool \"x\" not found");
    }

    #[test]
    fn globs_match_names_or_paths() {
        let glob = PathGlob::new("*.rs").unwrap();
        assert!(glob.is_match("src/deep/a.rs".as_ref()));
        assert!(!glob.is_match("src/a.rsx".as_ref()));
        let glob = PathGlob::new("src/*.rs").unwrap();
        assert!(glob.is_match("src/a.rs".as_ref()));
        assert!(!glob.is_match("src/deep/a.rs".as_ref()));
        let glob = PathGlob::new("**/*.rs").unwrap();
        assert!(glob.is_match("a.rs".as_ref()));
        assert!(glob.is_match("x/y/a.rs".as_ref()));
        assert!(PathGlob::new("a[").is_err());
    }

    #[test]
    fn cut_chars_respects_characters() {
        assert_eq!(cut_chars("héllo", 2), ("hé", true));
        assert_eq!(cut_chars("hé", 2), ("hé", false));
    }
}
