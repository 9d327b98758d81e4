//! The one binary: `supervisor` serves; `supervisor worker --session <id>` (hidden) is how the
//! supervisor starts a session's worker, by re-executing itself.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "supervisor",
    version,
    about = "Agent server: one isolated worker process per session"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Copy sessions and events from an upstream Tarko store (its SQLite database, its
    /// tarko.json, or a directory holding one) into the store configured here.
    Import {
        /// The upstream store.
        #[arg(long)]
        from: PathBuf,
        // Boxed: the serve flags are big next to the other variants.
        #[command(flatten)]
        target: Box<ServeArgs>,
    },
    /// Run one session's worker (started by the supervisor, never by hand).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        session: String,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (.toml, .yaml, .yml or .json) in the appConfig shape.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 3000].
    #[arg(long)]
    port: Option<u16>,
    /// Root directory for session workspaces [default: ./workspace].
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Storage backend: memory, file or sqlite [default: memory].
    #[arg(long)]
    storage_type: Option<String>,
    /// File or directory of the file and sqlite backends.
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// Refuse new sessions while a session is running a query.
    #[arg(long)]
    exclusive: bool,
    /// Model provider (openai, anthropic, ...); none configured means the offline echo model.
    #[arg(long)]
    model_provider: Option<String>,
    /// Model id.
    #[arg(long)]
    model_id: Option<String>,
    /// trace, debug, info, warn or error (RUST_LOG overrides it).
    #[arg(long)]
    log_level: Option<String>,
    /// Serve this web UI directory (webui.staticPath; scripts/fetch-webui.sh fetches the
    /// official one) instead of the built-in UI.
    #[arg(long)]
    webui_static_path: Option<PathBuf>,
}

// No #[tokio::main]: worker mode must stay single-threaded until it is jailed.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker { session }) => run_worker(session),
        Some(Command::Import { from, target }) => run_import(&from, *target),
        None => run_server(cli.serve),
    }
}

fn run_import(from: &std::path::Path, target: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(target);
    let report = supervisor::import::run(&config, from)?;
    println!("{report}");
    Ok(())
}

/// The configuration, or exit 78 (EX_CONFIG) with a message naming what is wrong.
fn load_config(args: ServeArgs) -> supervisor::config::Config {
    let flags = supervisor::config::Overrides {
        host: args.host,
        port: args.port,
        workspace: args.workspace,
        storage_type: args.storage_type,
        storage_path: args.storage_path,
        exclusive: args.exclusive,
        model_provider: args.model_provider,
        model_id: args.model_id,
        log_level: args.log_level,
        webui_static_path: args.webui_static_path,
    };
    match supervisor::config::load(args.config.as_deref(), &flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("supervisor: {e}");
            std::process::exit(78);
        }
    }
}

fn run_worker(session_id: String) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(EnvFilter::new("warn"))
        .init();
    if let Err(e) = worker::launch(&worker::WorkerArgs { session_id }) {
        eprintln!("worker: {e}");
        std::process::exit(e.exit_code());
    }
    Ok(())
}

fn run_server(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(args);
    let level = config.log_level.map_or("info", |l| l.as_filter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    supervisor::server::run(config)?;
    Ok(())
}
