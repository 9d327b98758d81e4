//! A probe's answer: `{ok, errno, errname, detail}`, where `errname` is always the name of
//! `errno` ("OK" for 0), so a test can match on names instead of per-architecture numbers.

use nix::errno::Errno;
use serde_json::{Value, json};
use shared::probe::ProbeOutcome;

/// What one probe found.
pub(super) struct Answer {
    ok: bool,
    errno: i32,
    detail: Value,
}

impl Answer {
    pub(super) fn new(ok: bool, errno: i32, detail: impl Into<Value>) -> Self {
        Self {
            ok,
            errno,
            detail: detail.into(),
        }
    }

    /// Success with `detail`.
    pub(super) fn ok(detail: impl Into<Value>) -> Self {
        Self::new(true, 0, detail)
    }

    /// A failure with `errno`.
    pub(super) fn failed(errno: Errno, detail: impl Into<Value>) -> Self {
        Self::new(false, errno as i32, detail)
    }

    /// A raw call's return value: negative is a failure, whose errno is read now.
    pub(super) fn from_rc(rc: i64, detail: impl Into<Value>) -> Self {
        let errno = if rc < 0 { Errno::last_raw() } else { 0 };
        Self::new(rc >= 0, errno, detail)
    }

    /// A `nix` call's result, without detail.
    pub(super) fn from_nix<T>(result: nix::Result<T>) -> Self {
        match result {
            Ok(_) => Self::ok(Value::Null),
            Err(errno) => Self::failed(errno, Value::Null),
        }
    }

    /// A `std` call's result: `detail` of the value, or the error's text.
    pub(super) fn from_io<T>(result: std::io::Result<T>, detail: impl FnOnce(T) -> Value) -> Self {
        match result {
            Ok(value) => Self::ok(detail(value)),
            Err(e) => Self::from_io_error(&e),
        }
    }

    pub(super) fn from_io_error(error: &std::io::Error) -> Self {
        Self::new(false, error.raw_os_error().unwrap_or(0), error.to_string())
    }

    pub(super) fn is_ok(&self) -> bool {
        self.ok
    }

    /// The answer as JSON, also for nesting one in another's detail.
    pub(super) fn to_json(&self) -> Value {
        json!({
            "ok": self.ok,
            "errno": self.errno,
            "errname": errname(self.errno),
            "detail": self.detail,
        })
    }

    pub(super) fn into_outcome(self) -> ProbeOutcome {
        ProbeOutcome {
            ok: self.ok,
            errno: self.errno,
            errname: errname(self.errno),
            detail: self.detail.to_string(),
        }
    }
}

/// `EPERM` for 1, `OK` for 0, `E<n>` for a number this platform has no name for.
pub(super) fn errname(errno: i32) -> String {
    match Errno::from_raw(errno) {
        _ if errno == 0 => "OK".to_owned(),
        Errno::UnknownErrno => format!("E{errno}"),
        known => format!("{known:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_have_their_names() {
        assert_eq!(errname(0), "OK");
        assert_eq!(errname(libc::EPERM), "EPERM");
        assert_eq!(errname(libc::EAGAIN), "EAGAIN");
        assert_eq!(errname(libc::EOPNOTSUPP), "EOPNOTSUPP");
        assert_eq!(errname(libc::ENOSYS), "ENOSYS");
        assert_eq!(errname(9999), "E9999");
    }

    #[test]
    fn answers_keep_their_shape() {
        let denied = Answer::failed(Errno::EPERM, Value::Null);
        assert_eq!(
            denied.to_json(),
            json!({"ok": false, "errno": libc::EPERM, "errname": "EPERM", "detail": null})
        );
        let outcome = Answer::ok(json!({"n": 1})).into_outcome();
        assert!(outcome.ok && outcome.errname == "OK");
        assert_eq!(outcome.detail, r#"{"n":1}"#);
    }
}
