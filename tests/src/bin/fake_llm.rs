//! Runs the scripted fake LLM by hand:
//! `fake-llm [--port N] [--script scripts.json]`, then point a model's `baseURL` at
//! `http://127.0.0.1:N/v1` (OpenAI-compatible) or `http://127.0.0.1:N` (Anthropic).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use e2e::fake_llm::{Shared, no_delay, router};

#[tokio::main]
async fn main() -> Result<()> {
    let mut port = 0u16;
    let mut script = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().context("--port needs a number")?.parse()?,
            "--script" => script = Some(args.next().context("--script needs a file")?),
            "-h" | "--help" => {
                println!("usage: fake-llm [--port N] [--script scripts.json]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    let shared = Arc::new(Shared::from_env());
    if let Some(path) = script {
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let document = serde_json::from_str(&text).with_context(|| format!("parse {path}"))?;
        let loaded = shared.load_scripts(&document)?;
        eprintln!("loaded {loaded} scripts from {path}");
    }
    // Loopback only: the fake records credentials it receives.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("fake-llm listening on http://{}", listener.local_addr()?);
    axum::serve(no_delay(listener), router(shared)).await?;
    Ok(())
}
