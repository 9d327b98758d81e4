//! The isolation catalogue (isolation.md §4.3) at `strict` rootless: the supervisor drops to uid 65534 before it serves (isolation.md §4.2 "rootless" mode).
//! The tests themselves live in `isolation_support`.

mod isolation_support;

use isolation_support::Mode;

catalogue!(Mode::Rootless);
