//! Real clients for the end-to-end tests: node scripts under `tests/js/` that use the npm
//! `socket.io-client` and drive headless Chromium through `playwright-core`.
//!
//! `scripts/test.sh` installs all of them (`npm ci` in `tests/js`, Debian's `chromium`, the
//! official web UI) and sets `E2E_REQUIRE_CLIENTS=1`, so a missing piece fails the test there.
//! Run alone (`cargo nextest run`), a test whose client is missing says why and passes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::process::Command;

/// Upper bound for one node script (only to avoid hanging forever).
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

/// The `tests/` directory of the repository.
fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/js`, where the client scripts and their `node_modules` live.
pub fn js_dir() -> PathBuf {
    tests_dir().join("js")
}

/// `tests/artifacts` (git-ignored): screenshots and pages the browser tests leave behind.
pub fn artifacts_dir() -> Result<PathBuf> {
    let dir = tests_dir().join("artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// The official web UI fetched by `scripts/fetch-webui.sh`.
pub fn official_ui_dir() -> PathBuf {
    tests_dir().parent().map_or_else(
        || PathBuf::from("webui/static"),
        |root| root.join("webui/static"),
    )
}

/// The Chromium binary: `$CHROMIUM`, else Debian's.
pub fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

fn required() -> bool {
    std::env::var("E2E_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// What a client test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// node and `socket.io-client`.
    SocketIo,
    /// node, `playwright-core` and Chromium.
    Browser,
    /// All of `Browser` and the official web UI.
    OfficialUi,
}

/// `Ok(true)` when everything `needs` asks for is installed; `Ok(false)` (after printing why)
/// when something is missing and the clients are not required; an error when they are.
pub fn available(needs: Needs) -> Result<bool> {
    let mut missing = Vec::new();
    if !std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        missing.push("node (Node.js 20+)".to_owned());
    }
    let module = |name: &str| {
        js_dir()
            .join("node_modules")
            .join(name)
            .join("package.json")
    };
    if !module("socket.io-client").is_file() {
        missing.push("tests/js/node_modules/socket.io-client (npm ci in tests/js)".to_owned());
    }
    if matches!(needs, Needs::Browser | Needs::OfficialUi) {
        if !module("playwright-core").is_file() {
            missing.push("tests/js/node_modules/playwright-core (npm ci in tests/js)".to_owned());
        }
        if !chromium().is_file() {
            missing.push(format!(
                "{} (apt-get install chromium)",
                chromium().display()
            ));
        }
    }
    if needs == Needs::OfficialUi && !official_ui_dir().join("index.html").is_file() {
        missing.push(format!(
            "{} (scripts/fetch-webui.sh)",
            official_ui_dir().display()
        ));
    }
    if missing.is_empty() {
        return Ok(true);
    }
    if required() {
        bail!("missing client dependencies: {}", missing.join(", "));
    }
    println!(
        "skipped: missing {} (scripts/test.sh installs them)",
        missing.join(", ")
    );
    Ok(false)
}

/// Runs `node tests/js/<script> <args...>` and returns the JSON report it prints as its last
/// line of stdout. A non-zero exit fails with everything the script printed.
pub async fn run_node(script: &str, args: &[&str]) -> Result<Value> {
    let path = js_dir().join(script);
    let mut command = Command::new("node");
    command
        .arg(&path)
        .args(args)
        .current_dir(js_dir())
        .env("CHROMIUM", chromium())
        .envs(crate::auth_mode::token_for_args(args).map(|t| ("E2E_TOKEN", t)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .with_context(|| format!("spawn node {}", path.display()))?;
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("node {script} {args:?} did not finish in {SCRIPT_TIMEOUT:?}"))?
        .context("wait for node")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "node {script} {args:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            output.status
        );
    }
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(last).with_context(|| {
        format!("node {script}: last stdout line is not JSON\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
    })
}

/// `path` as a string argument for a script.
pub fn arg(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
