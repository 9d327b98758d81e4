//! The command line: `supervisor [serve flags]`, `supervisor import`, `supervisor ctl`, and the
//! hidden `supervisor worker` the server starts each session's worker with.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use supervisor_core::config::Overrides;
use supervisor_core::ctl::Request;
use supervisor_core::principal::Role;

#[derive(Parser)]
#[command(
    name = "supervisor",
    version,
    about = "Agent server: one isolated worker process per session"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand)]
pub enum Command {
    /// Copy sessions and events from an upstream Tarko store (its SQLite database, its
    /// tarko.json, or a directory holding one) into the store configured here.
    Import {
        /// The upstream store.
        #[arg(long)]
        from: PathBuf,
        /// The tenant the imported sessions belong to.
        #[arg(long, default_value = supervisor_core::principal::DEFAULT_TENANT)]
        tenant: String,
        // Boxed: the serve flags are big next to the other variants.
        #[command(flatten)]
        target: Box<ServeArgs>,
    },
    /// Operate a running server through its control socket.
    Ctl(CtlArgs),
    /// Run one session's worker (started by the supervisor, never by hand).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Args)]
pub struct CtlArgs {
    /// The control socket (the server's `server.controlSocket`) [default: ctl.sock in the
    /// data directory].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The server's data directory (`server.dataDir`) [env: DATA_DIR] [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: CtlAction,
}

#[derive(Subcommand)]
pub enum CtlAction {
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
    /// API tokens (`[auth] tokens = true`).
    #[command(subcommand)]
    Tokens(TokensAction),
    /// The audit log, newest first: who did what to which session, when, and how it ended.
    Audit {
        /// Only entries older than this id (the `nextBefore` of the previous page).
        #[arg(long)]
        before: Option<u64>,
        /// Entries per page [default: 100, at most 500].
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
pub enum TokensAction {
    /// Make a token; its secret is printed once, as the last line of stdout.
    Create {
        /// The tenant whose sessions the token reaches.
        #[arg(long)]
        tenant: String,
        /// Who the token acts as [default: token-<id>].
        #[arg(long)]
        user: Option<String>,
        /// member (its tenant's sessions) or admin (every tenant, the operations routes).
        #[arg(long, value_enum, default_value = "member")]
        role: RoleArg,
        /// How long it lasts: 30d, 12h, 90m, 3600s [default: until revoked].
        #[arg(long, value_parser = supervisor_core::auth::tokens::parse_duration)]
        expires: Option<u64>,
        /// A label, such as the machine it is for.
        #[arg(long)]
        name: Option<String>,
    },
    /// Every token (never their secrets).
    List,
    /// Refuse a token from the next request on.
    Revoke { id: String },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Member,
    Admin,
}

impl CtlAction {
    /// The request this action sends. Session ids are checked by the server, which answers an
    /// invalid one like an unknown one.
    pub fn request(self) -> Request {
        match self {
            Self::Sessions => Request::Sessions,
            Self::Workers => Request::Workers,
            Self::Restart { session } => Request::Restart {
                session_id: session,
            },
            Self::Stop { session } => Request::Stop {
                session_id: session,
            },
            Self::Drain => Request::Drain,
            Self::Resume => Request::Resume,
            Self::Tokens(TokensAction::Create {
                tenant,
                user,
                role,
                expires,
                name,
            }) => Request::TokensCreate(supervisor_core::auth::tokens::NewToken {
                tenant,
                user,
                role: match role {
                    RoleArg::Member => Role::Member,
                    RoleArg::Admin => Role::Admin,
                },
                expires_in_secs: expires,
                name,
            }),
            Self::Tokens(TokensAction::List) => Request::TokensList,
            Self::Tokens(TokensAction::Revoke { id }) => Request::TokensRevoke { id },
            Self::Audit { before, limit } => Request::Audit { before, limit },
        }
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub session: Option<String>,
    /// Start-up probe of an isolation level: build the jail, check it, report, exit.
    #[arg(long)]
    pub probe: bool,
    /// A pooled launcher: its session comes with its jail spec.
    #[arg(long)]
    pub pooled: bool,
    /// Test builds only: start under a container-style seccomp filter that refuses namespace
    /// creation (the `isolation.test.denyNamespaces` hook).
    #[cfg(feature = "isolation-tests")]
    #[arg(long)]
    pub test_deny_namespaces: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Config file (.toml, .yaml, .yml or .json) in the appConfig shape.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 3000].
    #[arg(long)]
    port: Option<u16>,
    /// Root directory for session workspaces [default: ./workspace].
    #[arg(long)]
    pub workspace: Option<PathBuf>,
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
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Isolation level: auto (default), strict, chroot or none [env: AGENTD_ISOLATION].
    #[arg(long)]
    isolation: Option<String>,
    /// Permit `--isolation none` (development only) [env: AGENTD_ALLOW_INSECURE=1].
    #[arg(long)]
    allow_insecure_isolation: bool,
    /// With `none`, also permit a non-loopback listen address [env: AGENTD_ALLOW_INSECURE_REMOTE=1].
    #[arg(long)]
    allow_insecure_remote: bool,
    /// Serve a non-loopback address with no `[auth]` method (something in front of this server
    /// must authenticate callers) [config: server.allowUnauthenticated].
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Test builds only: become this uid (and gid) before serving, to exercise rootless mode.
    #[cfg(feature = "isolation-tests")]
    #[arg(long)]
    pub test_run_as: Option<u32>,
    /// Serve this web UI directory (webui.staticPath; scripts/fetch-webui.sh fetches the
    /// official one) instead of the built-in UI.
    #[arg(long)]
    webui_static_path: Option<PathBuf>,
}

impl ServeArgs {
    /// The flags as the configuration's last layer.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            host: self.host.clone(),
            port: self.port,
            workspace: self.workspace.clone(),
            data_dir: self.data_dir.clone(),
            storage_type: self.storage_type.clone(),
            storage_path: self.storage_path.clone(),
            exclusive: self.exclusive,
            model_provider: self.model_provider.clone(),
            model_id: self.model_id.clone(),
            log_level: self.log_level.clone(),
            webui_static_path: self.webui_static_path.clone(),
            isolation: self.isolation.clone(),
            allow_insecure_isolation: self.allow_insecure_isolation,
            allow_insecure_remote: self.allow_insecure_remote,
            allow_unauthenticated: self.allow_unauthenticated,
        }
    }
}
