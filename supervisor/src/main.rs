//! The one binary: `supervisor` serves; `supervisor import` and `supervisor ctl` are the
//! operator's tools; `supervisor worker --pooled` (hidden) is how the server starts a session's
//! worker, by re-executing itself. Everything else lives in the `supervisor-core` and `worker`
//! libraries: this file parses the arguments, sets up logging, picks the mode and hands over.

mod cli;
#[cfg(feature = "isolation-tests")]
mod test_hooks;

use std::io::IsTerminal;
use std::process::exit;

use clap::Parser;
use cli::{Cli, Command, CtlArgs, LogFormat, ServeArgs, WorkerArgs};
use supervisor_core::config::{self, Config};
use supervisor_core::ctl::client::Rendered;
use tracing_subscriber::EnvFilter;

/// Exit status of a configuration the server cannot start with (`EX_CONFIG`).
const EXIT_CONFIG: i32 = 78;

// No #[tokio::main]: worker mode must stay single-threaded until it is jailed.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker(args)) => run_worker(args),
        Some(Command::Import {
            from,
            tenant,
            target,
        }) => {
            let report = supervisor_core::import::run(&load_config(&target), &from, &tenant)?;
            println!("{report}");
            Ok(())
        }
        Some(Command::Ctl(args)) => run_ctl(args),
        None => run_server(cli.serve),
    }
}

fn run_server(args: ServeArgs) -> anyhow::Result<()> {
    #[cfg(feature = "isolation-tests")]
    if let Some(uid) = args.test_run_as {
        test_hooks::become_user(uid, args.workspace.as_deref())?;
    }
    // Before anything else can hold a secret, this process stops being dumpable (its environ,
    // memory and fds become unreadable to same-uid processes) and never writes a core.
    supervisor_core::isolation::harden_process()?;
    let config = load_config(&args);
    let level = config.log_level.map_or("info", |l| l.as_filter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    if let Err(e) = supervisor_core::server::run(config) {
        eprintln!("supervisor: {e}");
        exit(if e.is_config() { EXIT_CONFIG } else { 1 });
    }
    Ok(())
}

/// The configuration, or exit 78 with a message naming what is wrong.
fn load_config(args: &ServeArgs) -> Config {
    config::load(args.config.as_deref(), &args.overrides()).unwrap_or_else(|e| {
        eprintln!("supervisor: {e}");
        exit(EXIT_CONFIG);
    })
}

fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    let socket = config::ctl_socket(args.socket, args.data_dir, |name| std::env::var(name).ok());
    let answer = supervisor_core::ctl::client::call(&socket, &args.action.request())?;
    if args.json {
        println!("{answer}");
    } else {
        match supervisor_core::ctl::client::render(&answer) {
            Rendered::Done(text) => print!("{text}"),
            Rendered::Refused(text) => eprint!("{text}"),
        }
    }
    if answer["success"] == false {
        exit(1);
    }
    Ok(())
}

fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(EnvFilter::new("warn"))
        .init();
    #[cfg(feature = "isolation-tests")]
    if args.test_deny_namespaces {
        test_hooks::deny_namespaces()?;
    }
    let args = worker::WorkerArgs {
        session_id: args.session,
        probe: args.probe,
    };
    if let Err(e) = worker::launch(&args) {
        eprintln!("worker: {e}");
        exit(e.exit_code());
    }
    Ok(())
}
