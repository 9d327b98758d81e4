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
        #[command(flatten)]
        target: ServeArgs,
    },
    /// Operate a running server through its control socket.
    Ctl {
        /// The control socket (the server's `server.controlSocket`).
        #[arg(long, default_value_os_t = supervisor::config::default_control_socket())]
        socket: PathBuf,
        /// Print the server's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Run one session's worker (started by the supervisor, never by hand).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        session: String,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Stored sessions, and which are loaded, have a worker, or run.
    Sessions,
    /// Live workers: session, pid, state, uptime, memory, CPU, events.
    Workers,
    /// Replace a session's worker; its history and followers are kept.
    Restart { session: String },
    /// Stop a session's worker; its next query starts a new one.
    Stop { session: String },
    /// Refuse new runs and let running ones finish.
    Drain,
    /// Accept new runs again after a drain.
    Resume,
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
    /// Log lines as text (default) or as one JSON object per line.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

// No #[tokio::main]: worker mode must stay single-threaded until it is jailed.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker { session }) => run_worker(session),
        Some(Command::Import { from, target }) => run_import(&from, target),
        Some(Command::Ctl {
            socket,
            json,
            action,
        }) => run_ctl(&socket, json, action),
        None => run_server(cli.serve),
    }
}

fn run_ctl(socket: &std::path::Path, json: bool, action: CtlAction) -> anyhow::Result<()> {
    use supervisor::ctl::Request;
    let request = match action {
        CtlAction::Sessions => Request::Sessions,
        CtlAction::Workers => Request::Workers,
        CtlAction::Restart { session } => Request::Restart {
            session_id: session,
        },
        CtlAction::Stop { session } => Request::Stop {
            session_id: session,
        },
        CtlAction::Drain => Request::Drain,
        CtlAction::Resume => Request::Resume,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = runtime.block_on(supervisor::ctl::call(socket, &request))?;
    if json {
        println!("{answer}");
    } else {
        print_answer(&answer);
    }
    if answer["success"] == false {
        std::process::exit(1);
    }
    Ok(())
}

/// A short human rendering of a control answer.
fn print_answer(answer: &serde_json::Value) {
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let table = |rows: &[serde_json::Value], columns: &[&str]| {
        println!("{}", columns.join("\t"));
        for row in rows {
            println!(
                "{}",
                columns
                    .iter()
                    .map(|c| cell(&row[*c]))
                    .collect::<Vec<_>>()
                    .join("\t")
            );
        }
    };
    if let Some(workers) = answer["workers"].as_array() {
        table(
            workers,
            &[
                "sessionId",
                "pid",
                "state",
                "uptimeSecs",
                "rssKib",
                "cpuSecs",
                "events",
            ],
        );
    } else if let Some(sessions) = answer["sessions"].as_array() {
        table(
            sessions,
            &[
                "sessionId",
                "name",
                "updatedAt",
                "loaded",
                "worker",
                "running",
            ],
        );
    } else if answer["success"] == false {
        eprintln!(
            "error: {} ({})",
            cell(&answer["message"]),
            cell(&answer["code"])
        );
    } else {
        println!("ok {answer}");
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
    let json_logs = args.log_format == "json";
    let config = load_config(args);
    let level = config.log_level.map_or("info", |l| l.as_filter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if json_logs {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    supervisor::server::run(config)?;
    Ok(())
}
