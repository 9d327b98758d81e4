//! Running the server: runtime, listener, routes, and an orderly stop.
//!
//! Stop order on SIGTERM or Ctrl-C: stop accepting, stop every worker (their runs end with an
//! error event, which also ends their open streams), let in-flight responses finish within
//! [`DRAIN_DEADLINE`], then return.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::state::AppState;
use crate::workers::Spawner;

const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not prepare the workspace root {path}: {source}")]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not find our own executable to start workers from: {0}")]
    Executable(std::io::Error),
    #[error("could not start the runtime: {0}")]
    Runtime(std::io::Error),
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
    #[error(transparent)]
    WebUi(#[from] crate::webui::WebUiError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
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

async fn serve(config: Config) -> Result<(), ServeError> {
    let workspace_root = prepare_workspace_root(&config.workspace)?;
    let exe = std::env::current_exe().map_err(ServeError::Executable)?;
    let spawner =
        Spawner::start(exe, tokio::runtime::Handle::current()).map_err(ServeError::Executable)?;
    let model = config.default_model();
    if config.catalogue.is_offline() {
        tracing::warn!("no model is configured; using the built-in offline echo model");
    }
    let storage = crate::storage::open(&config.server.storage)?;
    for entry in config.catalogue.listed() {
        if let Some(problem) = &entry.unusable {
            tracing::warn!(provider = %entry.provider, model = %entry.id, %problem, "model cannot be called until this is fixed");
        }
    }
    let agio = crate::agio::Agio::from_config(&config).map_err(ServeError::Agio)?;
    let gateway = Arc::new(Gateway::new(&config, agio.clone())?);
    let webui = crate::webui::WebUi::from_config(&config)?;
    let sharing = crate::share::Sharing::from_config(&config.share)?;
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local: SocketAddr = listener.local_addr()?;
    let state = Arc::new(AppState {
        gateway,
        agio,
        storage,
        config,
        workspace_root,
        sessions: Default::default(),
        spawner,
        exclusive: Default::default(),
        webui,
        sharing,
        started: Instant::now(),
        shutdown: CancellationToken::new(),
    });
    tracing::info!(%local, workspace = %state.workspace_root.display(), provider = %model.provider, model = %model.id, isolation = "none", webui = if state.webui.is_directory() { "directory" } else { "built-in" }, "serving");
    // The one line on stdout: scripts and tests read the address from it (port 0 picks one).
    println!("supervisor listening on http://{local}");

    let app = crate::api::router(state.clone());
    let shutdown = state.shutdown.clone();
    tokio::spawn(stop_on_signal(state.clone()));
    // Streams are many small writes; without TCP_NODELAY each can wait for the client's
    // delayed ACK (about 40 ms) behind the previous one.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    shutdown.cancelled().await;
    stop_workers(&state).await;
    if let Some(agio) = &state.agio {
        agio.shutdown().await;
    }
    match tokio::time::timeout(DRAIN_DEADLINE, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => tracing::error!(error = %join, "server task failed"),
        Err(_) => tracing::warn!("open connections did not finish in time"),
    }
    tracing::info!("stopped");
    Ok(())
}

fn prepare_workspace_root(path: &PathBuf) -> Result<PathBuf, ServeError> {
    let fail = |source| ServeError::Workspace {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(path).map_err(fail)?;
    std::fs::canonicalize(path).map_err(fail)
}

async fn stop_on_signal(state: Arc<AppState>) {
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
        () = state.shutdown.cancelled() => return,
    }
    state.shutdown.cancel();
}

async fn stop_workers(state: &AppState) {
    let sessions = state.sessions.all();
    futures::future::join_all(sessions.iter().map(|s| s.stop_worker())).await;
}
