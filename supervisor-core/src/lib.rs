//! The agent server's supervisor: the trusted process.
//!
//! - [`config`]: settings from file, environment and flags, with their defaults.
//! - [`data_dir`]: the server's own files (control socket, default stores, jail stage), private.
//! - [`server`]: runtime, listener and orderly shutdown; `connections`: serving each HTTP
//!   connection, with its header-read and idle timeouts.
//! - `api`: the HTTP routes (Tarko `/api/v1`), request bodies, SSE framing, Socket.IO.
//! - `state`: what handlers share; `sessions`: live sessions, their runs and the event bridge.
//! - `bus`: per-session fan-out to followers; `storage`: the storage trait and its backends;
//!   `live_text`: streamed text kept durable before followers see it, and recovered after a crash.
//! - `workers`: spawning, handshaking with and supervising one worker process per session.
//! - `gateway`: model calls on behalf of workers (they hold no keys and no network);
//!   [`config::catalogue`]: the configured models, resolved with their keys; `agio`: AGIO
//!   export.
//! - [`error`]: every client-visible error and its status.
//! - [`import`]: bringing sessions over from an upstream Tarko store.
//! - [`ctl`]: the control socket and its client; `ops`: what it and the HTTP ops routes do.
//! - `metrics`: `GET /metrics`.
//! - [`principal`]: who a request acts for (tenant, user, role); [`auth`]: how it is
//!   established (tokens, OIDC, a trusted proxy, the login cookie, local mode), the browser
//!   guard, and the one rule of who may use a session; `quota`: each tenant's quotas and
//!   request rate; [`audit`]: the audit log.
//! - [`isolation`]: the isolation level in force: its configuration, probes, per-session host
//!   ids, disk quotas, cgroups, jail specs, audit check and report.
//! - `webui`: the web UI on non-API paths (a configured directory, or the built-in one);
//!   `share`: replay pages of sessions, downloaded or uploaded.
//! - `workspace`: every host-side access to a session's workspace (reads, listings, removal),
//!   beneath a handle of the session directory.

mod admission;
mod agio;
mod api;
pub mod audit;
pub mod auth;
mod bus;
pub mod config;
mod connections;
pub mod ctl;
pub mod data_dir;
pub mod error;
mod gateway;
pub mod import;
pub mod isolation;
mod live_text;
mod metrics;
mod ops;
pub mod principal;
mod provision;
mod quota;
pub mod server;
mod sessions;
mod share;
mod state;
pub mod storage;
mod token_ledger;
mod webui;

pub use api::{RouteSpec, route_table};
mod workers;
mod workspace;
