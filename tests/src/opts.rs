//! How a test launches the binary: where it is, the options a test sets, and the command they
//! turn into, run in a fresh temporary directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail, ensure};
use tokio::process::Command;

/// Placeholder replaced by the test's temporary directory in args, env values and config files.
pub const TMP_PLACEHOLDER: &str = "{TMP}";

/// Path of the `supervisor` binary: `$SUPERVISOR_BIN`, else next to the test executable's
/// `deps/` directory (`target/<profile>/supervisor`).
pub fn supervisor_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SUPERVISOR_BIN") {
        let p = PathBuf::from(p);
        ensure!(
            p.is_file(),
            "SUPERVISOR_BIN={} does not point to a file",
            p.display()
        );
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        if let Some(profile) = deps.parent() {
            candidates.push(profile.join("supervisor"));
        }
        candidates.push(deps.join("supervisor"));
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "supervisor binary not found (looked at {:?}); run `cargo build -p supervisor` first \
         or set SUPERVISOR_BIN",
        candidates
    )
}

/// A free loopback port (bind 127.0.0.1:0, read the port, release it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// How to launch the server. By default the harness passes
/// `--host 127.0.0.1 --port 0 --workspace <tmp>/ws`.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    /// Extra command-line arguments (after the defaults). `{TMP}` is substituted.
    pub args: Vec<String>,
    /// Environment variables (besides `PATH`). `{TMP}` is substituted in values.
    pub env: Vec<(String, String)>,
    /// A config file `(file name, contents)` written into the temp dir and passed with
    /// `--config`. `{TMP}` is substituted in the contents.
    pub config: Option<(String, String)>,
    /// Do not pass `--port 0`.
    pub no_port_flag: bool,
    /// Do not pass `--host 127.0.0.1`.
    pub no_host_flag: bool,
    /// Do not pass `--workspace <tmp>/ws`.
    pub no_workspace_flag: bool,
    /// Start in local mode even under `E2E_AUTH=token` (a test of local mode itself).
    pub local_mode: bool,
}

impl ServerOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn config_file(mut self, name: impl Into<String>, contents: impl Into<String>) -> Self {
        self.config = Some((name.into(), contents.into()));
        self
    }
    pub fn exclusive(self) -> Self {
        self.arg("--exclusive")
    }
    pub fn without_port_flag(mut self) -> Self {
        self.no_port_flag = true;
        self
    }
    pub fn without_host_flag(mut self) -> Self {
        self.no_host_flag = true;
        self
    }
    pub fn local_mode(mut self) -> Self {
        self.local_mode = true;
        self
    }
    pub fn without_workspace_flag(mut self) -> Self {
        self.no_workspace_flag = true;
        self
    }

    /// The temporary directory and every absolute path named by the options (a workspace root
    /// configured outside the temporary directory, say): where the server may keep workspaces.
    pub(crate) fn roots(&self, tmp: &Path) -> Vec<PathBuf> {
        let config = self
            .config
            .as_ref()
            .map(|(_, c)| c.as_str())
            .unwrap_or_default();
        let mut roots = vec![tmp.to_owned()];
        let text = self.args.iter().map(String::as_str).chain([config]);
        for token in text
            .flat_map(|t| t.split(|c: char| c == '"' || c == '\'' || c == '=' || c.is_whitespace()))
        {
            if token.starts_with('/') && token.len() > 1 {
                roots.push(PathBuf::from(token));
            }
        }
        roots
    }
}

/// A command ready to spawn, in its own temporary directory.
pub(crate) struct Prepared {
    pub tmp: tempfile::TempDir,
    pub ws: PathBuf,
    pub cmd: Command,
}

pub(crate) fn prepare(opts: &ServerOpts) -> Result<Prepared> {
    let bin = supervisor_bin()?;
    let tmp = tempfile::Builder::new()
        .prefix("e2e-supervisor-")
        .tempdir()
        .context("create temp dir")?;
    let tmp_str = tmp
        .path()
        .to_str()
        .context("temp dir path is not UTF-8")?
        .to_string();
    let subst = |s: &str| s.replace(TMP_PLACEHOLDER, &tmp_str);
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(&ws).context("create workspace dir")?;

    let mut cmd = Command::new(&bin);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in &opts.env {
        cmd.env(k, subst(v));
    }
    if !opts.no_host_flag {
        cmd.args(["--host", "127.0.0.1"]);
    }
    if !opts.no_port_flag {
        cmd.args(["--port", "0"]);
    }
    if !opts.no_workspace_flag {
        cmd.arg("--workspace").arg(&ws);
    }
    if let Some((name, contents)) = &opts.config {
        let path = tmp.path().join(name);
        std::fs::write(&path, subst(contents)).context("write config file")?;
        cmd.arg("--config").arg(&path);
    }
    for a in &opts.args {
        cmd.arg(subst(a));
    }
    cmd.current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(Prepared { tmp, ws, cmd })
}
