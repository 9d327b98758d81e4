//! The isolation catalogue (isolation.md §4.3) at `chroot` level as root (isolation.md §2.3.2; its documented gaps SKIP with a reason).
//! The tests themselves live in `isolation_support`.

mod isolation_support;

use isolation_support::Mode;

catalogue!(Mode::Chroot);
