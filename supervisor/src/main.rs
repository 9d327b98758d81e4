//! The one binary: `supervisor` serves; `supervisor worker --pooled` (hidden) is how the
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
    /// Operate a running server through its control socket.
    Ctl {
        /// The control socket (the server's `server.controlSocket`) [default: ctl.sock in the
        /// data directory].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The server's data directory (`server.dataDir`) [env: DATA_DIR] [default: ./data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
        session: Option<String>,
        /// Start-up probe of an isolation level (isolation.md §3.3).
        #[arg(long)]
        probe: bool,
        /// A pooled launcher: its session comes with its jail spec.
        #[arg(long)]
        pooled: bool,
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
    /// The server's own files: control socket, default storage, jail stage [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Storage backend: memory, file, sqlite or postgres (its URL from STORAGE_URL or the
    /// config file, never a flag: it may hold a password) [default: memory].
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
    /// Isolation level: auto (default), strict, chroot or none [env: AGENTD_ISOLATION].
    #[arg(long)]
    isolation: Option<String>,
    /// Permit `--isolation none` (development only) [env: AGENTD_ALLOW_INSECURE=1].
    #[arg(long)]
    allow_insecure_isolation: bool,
    /// With `none`, also permit a non-loopback listen address [env: AGENTD_ALLOW_INSECURE_REMOTE=1].
    #[arg(long)]
    allow_insecure_remote: bool,
    /// Test builds only: become this uid (and gid) before serving, to exercise rootless mode.
    #[cfg(feature = "isolation-tests")]
    #[arg(long)]
    test_run_as: Option<u32>,
    /// Serve this web UI directory (webui.staticPath; scripts/fetch-webui.sh fetches the
    /// official one) instead of the built-in UI.
    #[arg(long)]
    webui_static_path: Option<PathBuf>,
}

// No #[tokio::main]: worker mode must stay single-threaded until it is jailed.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker { session, probe, .. }) => run_worker(session, probe),
        Some(Command::Import { from, target }) => run_import(&from, *target),
        Some(Command::Ctl {
            socket,
            data_dir,
            json,
            action,
        }) => {
            let socket =
                supervisor::config::ctl_socket(socket, data_dir, |name| std::env::var(name).ok());
            run_ctl(&socket, json, action)
        }
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
        data_dir: args.data_dir,
        storage_type: args.storage_type,
        storage_path: args.storage_path,
        exclusive: args.exclusive,
        model_provider: args.model_provider,
        model_id: args.model_id,
        log_level: args.log_level,
        webui_static_path: args.webui_static_path,
        isolation: args.isolation,
        allow_insecure_isolation: args.allow_insecure_isolation,
        allow_insecure_remote: args.allow_insecure_remote,
    };
    match supervisor::config::load(args.config.as_deref(), &flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("supervisor: {e}");
            std::process::exit(78);
        }
    }
}

fn run_worker(session_id: Option<String>, probe: bool) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(EnvFilter::new("warn"))
        .init();
    if let Err(e) = worker::launch(&worker::WorkerArgs { session_id, probe }) {
        eprintln!("worker: {e}");
        std::process::exit(e.exit_code());
    }
    Ok(())
}

fn run_server(args: ServeArgs) -> anyhow::Result<()> {
    let json_logs = args.log_format == "json";
    #[cfg(feature = "isolation-tests")]
    if let Some(uid) = args.test_run_as {
        test_hooks::become_user(uid, args.workspace.as_deref())?;
    }
    // S0: before anything else can hold a secret, this process stops being dumpable (its
    // environ, memory and fds become unreadable to same-uid processes) and never writes a core.
    supervisor::isolation::harden_process()?;
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
    if let Err(e) = supervisor::server::run(config) {
        eprintln!("supervisor: {e}");
        let code = if e.is_config() { 78 } else { 1 };
        std::process::exit(code);
    }
    Ok(())
}

/// Test builds only.
#[cfg(feature = "isolation-tests")]
mod test_hooks {
    use std::os::unix::process::CommandExt;

    /// Rootless mode for tests (isolation.md §4.2): hand the current directory and the workspace
    /// root to `uid`, drop to it, and exec ourselves again without the flag, so the serving
    /// process starts fresh (dumpable again, as a real unprivileged server would be).
    pub(super) fn become_user(uid: u32, workspace: Option<&std::path::Path>) -> anyhow::Result<()> {
        let cwd = std::env::current_dir()?;
        std::os::unix::fs::chown(&cwd, Some(uid), Some(uid))?;
        if let Some(ws) = workspace {
            std::fs::create_dir_all(ws)?;
            std::os::unix::fs::chown(ws, Some(uid), Some(uid))?;
        }
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with("--test-run-as="))
            .collect();
        // SAFETY: main is still single-threaded here; plain syscalls on integers.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(uid, uid, uid) == 0
                && libc::setresuid(uid, uid, uid) == 0
        };
        if !dropped {
            return Err(std::io::Error::last_os_error().into());
        }
        let exe = std::env::current_exe()?;
        let err = std::process::Command::new(exe).args(args).exec();
        Err(err.into())
    }
}
