//! What a start-up probe (the supervisor trying a level at start) checks from inside a finished
//! jail, beyond the
//! audit: that the root cannot be left, that the deny-list answers as designed, that the host's
//! secrets are out of sight. Each check issues a side-effect-free call and compares the errno.

use std::ffi::CString;

use serde_json::{Value, json};
use shared::jail::JailLevel;

fn errno_of(rc: libc::c_long) -> i32 {
    if rc == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn name(errno: i32) -> String {
    match errno {
        0 => "ok".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::EACCES => "EACCES".into(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        other => format!("errno {other}"),
    }
}

/// Runs the checks and returns `{ok, checks: {name: {want, got, ok}}}`.
pub(crate) fn run(level: JailLevel) -> Value {
    let mut checks = serde_json::Map::new();
    let mut all_ok = true;
    let mut record = |label: &str, want: &[i32], got: i32| {
        let ok = want.contains(&got);
        all_ok &= ok;
        checks.insert(
            label.to_owned(),
            json!({"want": want.iter().map(|e| name(*e)).collect::<Vec<_>>(), "got": name(got), "ok": ok}),
        );
    };

    if level != JailLevel::None {
        // `..` of the root is the root.
        let dotdot = std::env::set_current_dir("/")
            .and_then(|()| std::env::set_current_dir(".."))
            .and_then(|()| std::env::current_dir())
            .map(|p| p == std::path::Path::new("/"))
            .unwrap_or(false);
        record("dotdot", &[0], if dotdot { 0 } else { libc::EIO });
        let home = if level == JailLevel::Strict {
            shared::jail::WORKSPACE_INSIDE
        } else {
            "/"
        };
        let _ = std::env::set_current_dir(home);

        // The host's secrets do not exist here.
        let shadow = std::fs::metadata("/etc/shadow")
            .err()
            .and_then(|e| e.raw_os_error())
            .unwrap_or(0);
        record("etc-shadow", &[libc::ENOENT, libc::EACCES], shadow);

        // Changing the root again is refused (caps dropped, seccomp).
        let x = c"x";
        // SAFETY: a valid NUL-terminated path; the call is expected to fail.
        let rc = unsafe { libc::chroot(x.as_ptr()) };
        record("chroot", &[libc::EPERM], errno_of(rc.into()));
    }

    // mount is denied.
    let tmp = CString::from(c"/tmp");
    let tmpfs = CString::from(c"tmpfs");
    // SAFETY: valid strings; the call is expected to fail without side effects.
    let rc = unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            tmp.as_ptr(),
            tmpfs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    record("mount", &[libc::EPERM], errno_of(rc.into()));

    // clone3 is ENOSYS (its flags are invisible to seccomp).
    // SAFETY: a null argument struct; the filter answers before the kernel would read it.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    record("clone3", &[libc::ENOSYS], errno_of(rc));

    // No network sockets.
    // SAFETY: socket with integer arguments; closed below if it unexpectedly succeeds.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    let errno = errno_of(fd.into());
    if fd >= 0 {
        // SAFETY: closing the fd we just got.
        unsafe { libc::close(fd) };
    }
    record("inet-socket", &[libc::EPERM], errno);

    // A nested user namespace is refused.
    // SAFETY: unshare with an integer flag; expected to fail.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    record("unshare-user", &[libc::EPERM], errno_of(rc.into()));

    json!({"ok": all_ok, "checks": Value::Object(checks)})
}
