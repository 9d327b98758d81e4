//! End-to-end test harness: starts the real `supervisor` binary on a loopback port with its own
//! temporary workspace, and talks to it over HTTP / SSE.
//!
//! Every test starts its own [`Server`]; dropping it kills the process (SIGKILL) and cleans up
//! what it leaves behind. A module per concern, everything re-exported here:
//! - [`opts`]: where the binary is and how a test launches it ([`ServerOpts`]);
//! - [`server`]: the running process, its signals, its drop; [`logs`]: its captured output;
//!   [`cleanup`]: the mounts and workers a killed server leaves;
//! - [`http`]: the JSON client and [`Resp`]; [`api`]: the session calls built on it;
//! - [`raw_http`]: the raw-socket HTTP client; [`sse`]: the one SSE reader;
//! - [`assertions`]: shape checks; [`process`]: pids and polling;
//! - [`fake_llm`]: the scripted model server; [`clients`]: node and Chromium clients;
//! - [`auth_mode`]: `E2E_AUTH=token`, the suites run with an API token.

use std::time::Duration;

pub mod api;
pub mod assertions;
pub mod auth_mode;
pub mod cleanup;
pub mod clients;
pub mod fake_llm;
pub mod http;
pub mod logs;
pub mod opts;
pub mod pg;
pub mod process;
pub mod raw_http;
pub mod server;
pub mod sse;

pub use assertions::{
    check_seq, concat_deltas, event_types, flood_text, is_ms_timestamp, is_session_id, is_uuid,
    of_type, slow_text, types,
};
pub use cleanup::{detach_mounts_under, mounts_under};
pub use http::{Resp, install_crypto};
pub use logs::LISTENING_PREFIX;
pub use opts::{ServerOpts, TMP_PLACEHOLDER, free_port, supervisor_bin};
pub use process::{canon, kill9_pid, pid_alive, wait_until};
pub use raw_http::RawResp;
pub use server::{Exited, STARTUP_TIMEOUT, Server};
pub use sse::{Frame, SseStream};

/// Generous upper bound for any single HTTP request / stream (only to avoid hanging forever).
pub const LONG: Duration = Duration::from_secs(30);
