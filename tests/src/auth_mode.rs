//! Running the existing suites with authentication on: with `E2E_AUTH=token` in the
//! environment, every server a test starts gets `[auth] tokens = true` (added to its TOML config,
//! or as its config when it has none), an admin token is made for it through `supervisor ctl`
//! right after it starts, and every client of the harness sends it: the JSON client and SSE
//! (`Authorization`), raw requests, and the Socket.IO scripts (`auth: {token}` through
//! `E2E_TOKEN`). A test with a YAML or JSON config, or its own `[auth]`, is left as it is.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, ensure};

use crate::opts::{ServerOpts, supervisor_bin};

/// The variable that turns the mode on, and its one value.
pub const VAR: &str = "E2E_AUTH";

/// Whether this run uses tokens.
pub fn enabled() -> bool {
    std::env::var(VAR).is_ok_and(|v| v == "token")
}

/// `opts` with `[auth] tokens = true`, if the mode is on and the test's config allows it;
/// whether it was added.
pub(crate) fn with_tokens(mut opts: ServerOpts) -> (ServerOpts, bool) {
    if !enabled() || opts.local_mode {
        return (opts, false);
    }
    const SECTION: &str = "\n[auth]\ntokens = true\n";
    match &mut opts.config {
        None => {
            opts.config = Some(("e2e-auth.toml".into(), SECTION.into()));
            (opts, true)
        }
        Some((name, contents)) if name.ends_with(".toml") && !contents.contains("[auth") => {
            contents.push_str(SECTION);
            (opts, true)
        }
        Some(_) => (opts, false),
    }
}

/// Makes an admin token on the server whose data directory is `tmp/data`.
pub(crate) fn admin_token(tmp: &Path) -> Result<String> {
    let output = std::process::Command::new(supervisor_bin()?)
        .env_clear()
        .arg("ctl")
        .arg("--data-dir")
        .arg(tmp.join("data"))
        .args([
            "tokens", "create", "--tenant", "default", "--role", "admin", "--name", "e2e",
        ])
        .output()
        .context("run supervisor ctl tokens create")?;
    ensure!(
        output.status.success(),
        "E2E_AUTH=token: could not make a token: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .last()
        .map(|l| l.trim().to_owned())
        .context("no token printed")
}

/// Tokens by server base URL, for the node scripts (which get the URL as an argument).
static TOKENS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// Makes the node scripts run against `base_url` send `token` (`E2E_TOKEN`).
pub fn remember(base_url: &str, token: &str) {
    TOKENS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(base_url.to_owned(), token.to_owned());
}

/// The token of the server one of `args` names, if any.
pub(crate) fn token_for_args(args: &[&str]) -> Option<String> {
    let tokens = TOKENS.lock().unwrap_or_else(PoisonError::into_inner);
    let tokens = tokens.as_ref()?;
    args.iter().find_map(|a| tokens.get(*a).cloned())
}
