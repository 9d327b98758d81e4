//! Running the server: runtime, listener, routes, and an orderly stop.
//!
//! Stop order on SIGTERM or Ctrl-C: stop accepting, stop every worker (their runs end with an
//! error event, which also ends their open streams), let in-flight responses finish within
//! [`DRAIN_DEADLINE`], then return.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shared::ids::SessionId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::isolation::{Isolation, IsolationError};
use crate::state::{AppState, Parts};
use crate::workers::Spawner;

const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How long aborted runs get to close themselves before their workers are stopped.
const ABORT_WAIT: Duration = Duration::from_secs(4);
/// How long a stopping server waits for deleted sessions' teardowns.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not prepare the workspace root {path}: {source}")]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] crate::data_dir::DataDirError),
    #[error("could not find our own executable to start workers from: {0}")]
    Executable(std::io::Error),
    #[error("could not start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Control(#[from] crate::ctl::CtlError),
    #[error("could not open the storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error("could not build the HTTP client for AGIO: {0}")]
    Agio(#[source] reqwest::Error),
    #[error("{0}")]
    Isolation(#[from] IsolationError),
    #[error(transparent)]
    WebUi(#[from] crate::webui::WebUiError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error(
        "refusing to serve {host} without authentication: anyone who can reach it could read and \
         drive every session. Enable API tokens in the config file:\n\n    [auth]\n    tokens = true\n\n\
         then make one with `supervisor ctl tokens create --tenant <name>` (or configure \
         [[auth.oidc]] or [auth.proxy]). If something in front of this server already \
         authenticates every caller, pass --allow-unauthenticated instead."
    )]
    Unauthenticated { host: String },
    #[error("[auth]: {0}")]
    Auth(String),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// Configuration problems (exit status 78, EX_CONFIG), as opposed to runtime failures.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Isolation(_)
                | Self::Workspace { .. }
                | Self::DataDir(_)
                | Self::Unauthenticated { .. }
                | Self::Auth(_)
        )
    }
}

/// Runs the server until SIGTERM or Ctrl-C.
///
/// # Errors
/// Start-up failures (workspace, executable, bind) and fatal I/O errors.
pub fn run(config: Config) -> Result<(), ServeError> {
    // reqwest is built without a default TLS provider so that only ring (no aws-lc, no OpenSSL)
    // is compiled in; it must be chosen before the first HTTP client exists. An error means
    // one is installed already, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("supervisor")
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(serve(config))
}

/// Every worker costs the supervisor a few descriptors (its socket, its stderr, the child), so
/// a soft limit of 1024, common by default, would cap a server near 300 sessions. The soft
/// limit is raised to the hard one; workers get their own limits in their jail.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}

/// Local mode (no `[auth]` method) is only for a loopback address: off it, anyone who can reach
/// the port would be an admin. `--allow-unauthenticated` is the way round, loudly.
fn check_exposure(config: &Config) -> Result<(), ServeError> {
    let enabled = config
        .auth
        .as_ref()
        .is_some_and(crate::auth::AuthConfig::enabled);
    if enabled || crate::auth::guard::is_loopback_host(&config.server.host) {
        return Ok(());
    }
    if config.server.allow_unauthenticated {
        tracing::warn!(host = %config.server.host, "serving a non-loopback address WITHOUT authentication (--allow-unauthenticated): every caller is an admin");
        return Ok(());
    }
    Err(ServeError::Unauthenticated {
        host: config.server.host.clone(),
    })
}

async fn serve(mut config: Config) -> Result<(), ServeError> {
    check_exposure(&config)?;
    raise_descriptor_limit();
    let workspace_root = prepare_workspace_root(&config.workspace)?;
    // Absolute from here on: the jail stage inside it is handed to workers.
    config.server.data_dir = crate::data_dir::prepare(&config.server.data_dir)?;
    let exe = std::env::current_exe().map_err(ServeError::Executable)?;
    // The level in force is decided first, by probing the real launcher, before anything is
    // served; an unavailable level stops the server. Workers are only spawned once it is known.
    let probe = async |spec, hooks| crate::workers::probe(&exe, spec, hooks).await;
    let isolation = Isolation::establish(
        &config.isolation,
        &workspace_root,
        &config.server.jail_stage(),
        &config.server.host,
        &probe,
    )
    .await?;
    isolation.log();
    let level = isolation.level.as_str();
    let isolation = Arc::new(isolation);
    // Whatever ends this function, a start-up step failing below included, this server's
    // parent cgroups and image pool go with it.
    let _cleanup = CleanupIsolation(isolation.clone());
    let spawner = Spawner::start(exe, tokio::runtime::Handle::current(), isolation.clone())
        .map_err(ServeError::Executable)?;
    let model = config.default_model();
    if config.catalogue.is_offline() {
        tracing::warn!("no model is configured; using the built-in offline echo model");
    }
    let storage = crate::storage::open(&config.server.storage, &config.server.data_dir).await?;
    // Root mode: the host uid each stored session's files belong to, so none is handed out
    // twice and each session keeps its own.
    if let Some(ids) = isolation.host_ids() {
        let mut recorded = Vec::new();
        for (id, uid) in storage.host_ids().await? {
            match SessionId::parse(&id) {
                Ok(id) => recorded.push((id, uid)),
                Err(e) => tracing::warn!(error = %e, uid, "a stored host uid names no session"),
            }
        }
        for problem in ids.load(recorded) {
            tracing::warn!(%problem, "stored host uids");
        }
    }
    let control = crate::ctl::bind(&config.server.control_socket()).await?;
    for entry in config.catalogue.listed() {
        if let Some(problem) = &entry.unusable {
            tracing::warn!(provider = %entry.provider, model = %entry.id, %problem, "model cannot be called until this is fixed");
        }
    }
    let agio = crate::agio::Agio::from_config(&config).map_err(ServeError::Agio)?;
    let gateway = Arc::new(Gateway::new(&config, agio.clone())?);
    let webui = Arc::new(crate::webui::WebUi::from_config(&config)?);
    let sharing = crate::share::Sharing::new(
        &config.share,
        storage.clone(),
        webui.clone(),
        gateway.clone(),
        shared_page_secrets(&config),
    )?;
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local: SocketAddr = listener.local_addr()?;
    let auth = crate::auth::Auth::new(&config, storage.clone()).map_err(ServeError::Auth)?;
    let state = Arc::new(AppState::new(Parts {
        config,
        workspace_root,
        storage,
        isolation,
        spawner,
        gateway,
        agio,
        webui,
        sharing,
        auth,
    }));
    // What a previous server deleted but did not finish tearing down: uids held again before
    // any session can be created, the rest in the background.
    state.sessions.resume_teardowns();
    tracing::info!(%local, workspace = %state.workspace_root.display(), provider = %model.provider, model = %model.id, isolation = level, webui = if state.webui.is_directory() { "directory" } else { "built-in" }, "serving");
    // The one line on stdout: scripts and tests read the address from it (port 0 picks one).
    println!("supervisor listening on http://{local}");

    let app = crate::api::router(state.clone());
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone(), state.shutdown.clone()));
    tokio::spawn(stop_idle_workers(state.clone()));
    tokio::spawn(release_freed_memory(state.shutdown.clone()));
    tokio::spawn(crate::ctl::serve(control, state.clone()));
    let timeouts = crate::connections::Timeouts::from_config(&state.config.server.http);
    let server = tokio::spawn(crate::connections::serve(
        listener,
        app,
        timeouts,
        stop.clone(),
    ));
    stop.cancelled().await;
    finish_runs(&state).await;
    stop_workers(&state).await;
    // Deleted sessions' teardowns finish before the cgroups and the image pool go; what does
    // not finish in time is in their journal for the next start.
    state.sessions.teardowns().finish(TEARDOWN_DEADLINE).await;
    // Streams that would follow forever (the follow endpoint) end now.
    state.shutdown.cancel();
    if let Some(agio) = &state.agio {
        agio.shutdown().await;
    }
    state.isolation.cleanup();
    match tokio::time::timeout(DRAIN_DEADLINE, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => tracing::error!(error = %join, "server task failed"),
        Err(_) => tracing::warn!("open connections did not finish in time"),
    }
    tracing::info!("stopped");
    Ok(())
}

struct CleanupIsolation(Arc<Isolation>);

impl Drop for CleanupIsolation {
    fn drop(&mut self) {
        self.0.cleanup();
    }
}

/// The base directory of all workspaces: owned by the server and not writable by any
/// session; `0711` as root (sessions with their own uids may traverse to their own directory),
/// `0700` rootless (every session is the server's uid anyway).
fn prepare_workspace_root(path: &PathBuf) -> Result<PathBuf, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| ServeError::Workspace {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(path).map_err(fail)?;
    let path = std::fs::canonicalize(path).map_err(fail)?;
    let mode = if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ServeError::Workspace {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}

/// The stop order after SIGTERM: new runs are refused at once (and no new connection is
/// accepted), running runs get `server.shutdownGraceSecs` to finish, then the rest are aborted,
/// which ends each of them properly in the log before the workers go.
async fn finish_runs(state: &AppState) {
    state.admission.set_draining(true);
    let grace = Duration::from_secs(state.config.server.shutdown_grace_secs);
    let running = || {
        state
            .sessions
            .all()
            .into_iter()
            .filter(|s| s.activity.is_running())
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + grace;
    while !running().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = running();
    if late.is_empty() {
        return;
    }
    tracing::warn!(
        runs = late.len(),
        "aborting runs still going after the shutdown grace period"
    );
    for session in &late {
        session
            .abort(shared::protocol::AbortReason::ServerShutdown)
            .await;
    }
    let deadline = tokio::time::Instant::now() + ABORT_WAIT;
    while !running().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops workers that sat idle past `server.workers.idleTimeoutSecs`; their sessions keep
/// everything and get a new worker on their next query.
async fn stop_idle_workers(state: Arc<AppState>) {
    let idle = Duration::from_secs(state.config.server.workers.idle_timeout_secs);
    if idle.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(
        (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30)),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let cutoff = shared::ids::now_ms().saturating_sub(idle.as_millis() as u64);
        for session in state.sessions.all() {
            let activity = &session.activity;
            if activity.has_worker() && !activity.is_running() && activity.last_active_ms() < cutoff
            {
                tracing::info!(session_id = %session.id, "stopping an idle worker");
                crate::metrics::METRICS.idle_stops.inc();
                session.stop_worker().await;
            }
        }
    }
}

/// Hands memory the process has freed back to the kernel once the server goes quiet.
///
/// A burst (hundreds of sessions streaming at once) leaves glibc's arenas holding tens of MiB
/// of freed chunks, which it keeps for the next burst; without this the supervisor's RSS
/// stays at its peak long after the load is gone, which reads as a leak to an operator.
/// Trimming walks the free lists, so it runs only after a whole quiet tick that followed
/// activity, off the async threads.
async fn release_freed_memory(shutdown: CancellationToken) {
    const TICK: Duration = Duration::from_secs(2);
    let events = || crate::metrics::METRICS.events_published.get();
    let mut tick = tokio::time::interval(TICK);
    let mut seen = events();
    let mut trimmed_at = seen;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = events();
        if now == seen && now != trimmed_at {
            trimmed_at = now;
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
        seen = now;
    }
}

#[cfg(target_env = "gnu")]
fn trim_heap() {
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory; it takes
    // the arena locks itself and is safe to call from any thread.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(
        released = released == 1,
        "returned freed heap memory to the kernel"
    );
}

#[cfg(not(target_env = "gnu"))]
fn trim_heap() {}

async fn stop_on_signal(stop: CancellationToken, already_stopping: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                return;
            }
        };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        () = already_stopping.cancelled() => return,
    }
    stop.cancel();
}

async fn stop_workers(state: &AppState) {
    let sessions = state.sessions.all();
    let cause = || Some(crate::workers::StopCause::ServerShutdown);
    futures::future::join_all(sessions.iter().map(|s| s.stop_worker_for(cause()))).await;
}

/// Every key a shared page must not show: the models' and the tenants' own.
fn shared_page_secrets(config: &Config) -> Vec<String> {
    let mut secrets = config.catalogue.secrets();
    for key in config.tenant_limits.secrets() {
        let key = key.expose();
        if key.len() >= 8 && !secrets.iter().any(|s| s == key) {
            secrets.push(key.to_owned());
        }
    }
    secrets
}
