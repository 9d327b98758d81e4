//! What the supervisor and its workers both need to agree on.
//!
//! - [`frame`]: the length-prefixed bincode framing used on the worker's fd 3 (the only place the
//!   codec and the size cap are named).
//! - [`protocol`]: the messages that travel in those frames, and the handshake version.
//! - [`process`]: the worker process from outside: the fd its channel is on, its exit statuses.
//! - [`jail`]: the jail orders a launcher gets, and the self-audit a jailed worker reports.
//! - [`events`]: the client-visible agent events (Tarko event stream), as JSON.
//! - [`ids`]: session ids, event ids and the millisecond clock.
//! - `probe` (test builds only): the probes the isolation tests run inside a jailed worker.
//! - [`directives`]: the tokenization both the echo model and the test fake LLM answer with.
#![forbid(unsafe_code)]

pub mod directives;
pub mod events;
pub mod frame;
pub mod ids;
pub mod jail;
#[cfg(feature = "isolation-tests")]
pub mod probe;
pub mod process;
pub mod protocol;
