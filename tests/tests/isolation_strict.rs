//! The isolation catalogue (isolation.md §4.3) at `strict` as root: per-session host uids inside user namespaces (isolation.md §4.2 "root" mode).
//! The tests themselves live in `isolation_support`.

mod isolation_support;

use isolation_support::Mode;

catalogue!(Mode::Root);
