//! The control socket: a local socket in a private directory (mode 0700, socket 0600), so file
//! permissions decide who may operate the server. One JSON request per line, one JSON answer
//! per line. `supervisor ctl ...` is its client ([`client`]).

pub mod client;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::ids::SessionId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::error::ApiError;
use crate::state::AppState;

/// The longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// What a client may ask.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Sessions,
    Workers,
    Restart {
        #[serde(rename = "sessionId")]
        session_id: String,
    },
    Stop {
        #[serde(rename = "sessionId")]
        session_id: String,
    },
    Drain,
    Resume,
    /// A new API token; the answer carries its secret, the only time it is ever shown.
    #[serde(rename = "tokens-create")]
    TokensCreate(crate::auth::tokens::NewToken),
    #[serde(rename = "tokens-list")]
    TokensList,
    #[serde(rename = "tokens-revoke")]
    TokensRevoke {
        id: String,
    },
    /// The audit log, newest first, a page at a time.
    Audit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
}

/// Who a control-socket request acts as: whoever can open the socket operates the server.
fn operator() -> crate::principal::Principal {
    crate::principal::Principal {
        tenant: crate::principal::DEFAULT_TENANT.to_owned(),
        user: "ctl".to_owned(),
        role: crate::principal::Role::Admin,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another server is already listening on {0}")]
    InUse(PathBuf),
    #[error("the server sent an invalid answer: {0}")]
    Answer(String),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CtlError + '_ {
    move |source| CtlError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Binds the control socket. A leftover socket file from a crashed server is replaced, but only
/// after a connection attempt shows nobody is listening on it.
///
/// # Errors
/// The directory or socket cannot be created, or a live server owns the path.
pub(crate) async fn bind(path: &Path) -> Result<Listener, CtlError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::data_dir::create_dir_all(dir).map_err(io(dir))?;
    }
    if path.exists() {
        let name = path.to_fs_name::<GenericFilePath>().map_err(io(path))?;
        if Stream::connect(name).await.is_ok() {
            return Err(CtlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io(path))?;
    }
    let name = path.to_fs_name::<GenericFilePath>().map_err(io(path))?;
    ListenerOptions::new()
        .name(name)
        .mode(crate::data_dir::FILE_MODE)
        .create_tokio()
        .map_err(io(path))
}

/// Serves control connections until the server stops.
pub(crate) async fn serve(listener: Listener, state: Arc<AppState>) {
    loop {
        let connection = tokio::select! {
            connection = listener.accept() => connection,
            () = state.shutdown.cancelled() => return,
        };
        match connection {
            Ok(stream) => {
                tokio::spawn(answer(stream, state.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
        }
    }
}

async fn answer(stream: Stream, state: Arc<AppState>) {
    let mut line = String::new();
    let read = BufReader::new((&stream).take(MAX_REQUEST))
        .read_line(&mut line)
        .await;
    let reply = match read {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                // No secret is in a request (a created token's is in its answer only).
                tracing::info!(?request, "control request");
                run(&state, request).await.unwrap_or_else(
                    |e| json!({"success": false, "code": e.code(), "message": e.to_string()}),
                )
            }
            Err(e) => {
                json!({"success": false, "code": "INVALID_REQUEST", "message": e.to_string()})
            }
        },
        Err(e) => json!({"success": false, "code": "INVALID_REQUEST", "message": e.to_string()}),
    };
    let mut out = reply.to_string();
    out.push('\n');
    let _ = (&stream).write_all(out.as_bytes()).await;
}

async fn run(state: &Arc<AppState>, request: Request) -> Result<Value, ApiError> {
    Ok(match request {
        Request::Sessions => {
            json!({"success": true, "sessions": crate::ops::sessions(state).await?})
        }
        Request::Workers => json!({"success": true, "workers": crate::ops::workers(state).await}),
        Request::Restart { session_id } => {
            crate::ops::restart(state, &operator(), &SessionId::parse(&session_id)?).await?
        }
        Request::Stop { session_id } => {
            crate::ops::stop(state, &operator(), &SessionId::parse(&session_id)?).await?
        }
        Request::Drain => crate::ops::set_draining(state, true),
        Request::Resume => crate::ops::set_draining(state, false),
        Request::TokensCreate(new) => crate::ops::create_token(state, new).await?,
        Request::TokensList => crate::ops::list_tokens(state).await?,
        Request::TokensRevoke { id } => crate::ops::revoke_token(state, &id).await?,
        Request::Audit { before, limit } => crate::ops::audit(state, before, limit).await?,
    })
}
