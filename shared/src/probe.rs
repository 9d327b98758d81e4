//! Test builds only (feature `isolation-tests`): the probes the isolation tests run inside a
//! session's jailed worker, and their answers.
//!
//! A test posts `{sessionId, name, args}` to the supervisor's debug route; the supervisor turns
//! `name` and `args` into a [`Probe`] (an unknown name or a wrong argument is refused there),
//! sends it to the worker as `ToWorker::Probe`, and the probe server in front of the worker's
//! agent issues the syscall and answers with a [`ProbeAnswer`]. Release builds have none of this:
//! the messages, the route and the probe server exist only with the feature.
//!
//! Each probe is named after what it tries (`mount_tmpfs`, `ptrace`, `fork_bomb`); its fields are
//! the arguments a test gives in `args`. Numbers that are kernel constants (socket domains, clone
//! flags, ioctl requests) stay plain integers: the tests choose them, including invalid ones.

use serde::{Deserialize, Serialize};

/// One action of the in-jail probe server. As JSON, `{"<name>": {<args>}}`; see
/// [`Probe::from_name_and_args`] for the `{name, args}` shape of the debug route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// The environment as `KEY=value` lines.
    Env {},
    /// A file's contents (lossy UTF-8), at most `max` bytes.
    Read {
        path: String,
        #[serde(default = "default_read_max")]
        max: u64,
    },
    /// `open(2)` (read-only unless `write`; `O_CREAT` with `create`) and one read of 4 KiB.
    Open {
        path: String,
        #[serde(default)]
        write: bool,
        #[serde(default)]
        create: bool,
    },
    /// `lstat(2)`: kind and size.
    Stat {
        path: String,
    },
    /// A directory's entry names, sorted.
    List {
        path: String,
    },
    /// `chdir("..")` `n` times, then opens `then` (relative to where that ended) if given.
    ChdirUp {
        n: u32,
        #[serde(default)]
        then: Option<String>,
    },
    /// The classic chroot escape: `chroot` into a subdirectory, `chdir("..")` out, `chroot(".")`.
    DoubleChroot {},
    /// `openat(fd, path)` on a descriptor number the test names (a leaked one, say).
    Openat {
        fd: i32,
        path: String,
    },
    /// Enters `/proc/self/fd/<n>` for every n and tries to climb out to the host from there.
    ProcFdWalk {},
    /// Writes `bytes` zero bytes to `path` until the first error, then removes it if `remove`.
    Write {
        path: String,
        bytes: u64,
        #[serde(default)]
        remove: bool,
    },
    Mkfifo {
        path: String,
    },
    Symlink {
        target: String,
        link: String,
    },
    /// A hard link `to` → `from`.
    Link {
        from: String,
        to: String,
    },
    /// A Unix socket bound at `path` (kept open).
    UnixSocketFile {
        path: String,
    },
    /// `n` nested directories below `path`.
    MkdirDeep {
        path: String,
        n: u32,
    },
    /// `mknod(2)` of a device or FIFO node.
    Mknod {
        path: String,
        kind: NodeKind,
        #[serde(default = "default_major")]
        major: u32,
        #[serde(default = "default_minor")]
        minor: u32,
    },
    /// A tmpfs mounted over `target`.
    MountTmpfs {
        target: String,
    },
    /// `umount2(target, MNT_DETACH)`.
    Umount {
        target: String,
    },
    /// `pivot_root(".", ".")`.
    PivotRoot {},
    /// `open_tree("/")`: a detached copy of the mount tree.
    OpenTree {},
    /// `kill(pid, signal)`; signal 0 only checks whether `pid` can be signalled.
    Kill {
        pid: i32,
        signal: i32,
    },
    /// `PTRACE_ATTACH` to `pid`.
    Ptrace {
        pid: i32,
    },
    /// `process_vm_readv` of 16 bytes from `pid`.
    ProcessVmReadv {
        pid: i32,
    },
    /// A TCP connection, with a 3 s timeout.
    TcpConnect {
        host: String,
        port: u16,
    },
    /// One UDP datagram.
    UdpSend {
        host: String,
        port: u16,
    },
    /// A host name lookup.
    Resolve {
        name: String,
    },
    /// `socket(domain, type, 0)`, closed again if it was created.
    Socket {
        domain: i32,
        #[serde(rename = "type")]
        kind: i32,
    },
    /// A connection to the abstract Unix socket `name`.
    AbstractConnect {
        name: String,
    },
    /// `io_uring_setup`.
    IoUring {},
    /// Opens `/proc/self/exe` for writing.
    ExeWrite {},
    /// `setuid(0)` as a raw syscall.
    Setuid0 {},
    /// `unshare(flags)`.
    Unshare {
        flags: u64,
    },
    /// A fork through a raw `clone(flags)`.
    CloneFlags {
        flags: u64,
    },
    /// `clone3` with no arguments.
    Clone3 {},
    /// `setns` on fd 0.
    Setns {},
    /// `ioctl(0, request)`.
    Ioctl {
        request: u64,
    },
    /// Syscalls the filter must refuse, each with invalid arguments so that one let through
    /// fails in the kernel instead of doing anything: their errno names.
    TrySyscalls {},
    /// `kill(-1, SIGKILL)` from a child.
    KillAll {},
    /// A child forks until it cannot (at most `limit` children), then kills them all.
    ForkBomb {
        limit: u64,
    },
    /// A child touches memory in `step_mb` chunks up to `max_mb`.
    MemoryBomb {
        max_mb: u64,
        step_mb: u64,
    },
    /// The worker itself allocates `mb` MiB (the cgroup's OOM killer ends it).
    AllocHere {
        mb: u64,
    },
    /// A double-forked `setsid` daemon; answers its pid.
    Daemon {},
    /// `getpid` through the x32 ABI, in a child.
    X32 {},
    /// Runs a program with a timeout and reports its exit and output.
    Exec {
        argv: Vec<String>,
        #[serde(default = "default_exec_timeout_ms")]
        timeout_ms: u64,
    },
    /// Bytes that are not a valid frame, written on the channel before the answer.
    Raw(RawFrame),
    /// `count` well-formed `system` events of about `bytes` each, written on the channel as fast
    /// as it takes them.
    Events {
        count: u64,
        bytes: u64,
    },
    /// Swaps `<dir>/sub` (a directory) and `<dir>/alt` (a symlink to `target`) in a loop for
    /// `secs` seconds, in a child, so a test can race the file API against it.
    Flip {
        dir: String,
        target: String,
        secs: u64,
    },
}

/// The kind of node a [`Probe::Mknod`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// The garbage a [`Probe::Raw`] writes on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawFrame {
    /// A length prefix announcing this many bytes, followed by 16 zero bytes.
    Prefix(u32),
    /// A frame of this many random bytes (its prefix announces exactly them).
    Random(u32),
}

fn default_read_max() -> u64 {
    64 * 1024
}

fn default_major() -> u32 {
    1
}

fn default_minor() -> u32 {
    3
}

fn default_exec_timeout_ms() -> u64 {
    10_000
}

impl Probe {
    /// The probe the debug route's `{name, args}` names.
    ///
    /// # Errors
    /// An unknown name, a missing or unknown argument, or one of the wrong type.
    pub fn from_name_and_args(
        name: &str,
        args: serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        let mut tagged = serde_json::Map::new();
        tagged.insert(name.to_owned(), args);
        serde_json::from_value(serde_json::Value::Object(tagged))
    }
}

/// A probe as it travels on the channel, with the id its answer carries back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub id: u64,
    pub probe: Probe,
}

/// What a probe found: whether the call succeeded, the errno it failed with (0 if none) and its
/// name, and probe-specific detail as JSON text (bincode cannot carry `serde_json::Value`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    pub ok: bool,
    pub errno: i32,
    pub errname: String,
    pub detail: String,
}

/// The answer to the [`ProbeRequest`] with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    pub id: u64,
    pub outcome: ProbeOutcome,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::frame::{read_frame_blocking, write_frame_blocking};

    #[test]
    fn the_debug_route_shape_names_a_typed_probe() {
        assert_eq!(
            Probe::from_name_and_args("env", json!({})).unwrap(),
            Probe::Env {}
        );
        assert_eq!(
            Probe::from_name_and_args("socket", json!({"domain": 17, "type": 3})).unwrap(),
            Probe::Socket {
                domain: 17,
                kind: 3
            }
        );
        assert_eq!(
            Probe::from_name_and_args("raw", json!({"prefix": 0xffff_ffffu32})).unwrap(),
            Probe::Raw(RawFrame::Prefix(u32::MAX))
        );
        assert_eq!(
            Probe::from_name_and_args("read", json!({"path": "/etc/hosts"})).unwrap(),
            Probe::Read {
                path: "/etc/hosts".into(),
                max: 65536
            }
        );
        assert_eq!(
            Probe::from_name_and_args("mknod", json!({"path": "f", "kind": "fifo"})).unwrap(),
            Probe::Mknod {
                path: "f".into(),
                kind: NodeKind::Fifo,
                major: 1,
                minor: 3
            }
        );
    }

    #[test]
    fn unknown_probes_and_arguments_are_refused() {
        assert!(Probe::from_name_and_args("no_such_probe", json!({})).is_err());
        assert!(Probe::from_name_and_args("read", json!({"path": "x", "mux": 1})).is_err());
        assert!(Probe::from_name_and_args("read", json!({})).is_err());
        assert!(Probe::from_name_and_args("kill", json!({"pid": "one", "signal": 0})).is_err());
    }

    #[test]
    fn probes_cross_the_channel() {
        for probe in [
            Probe::Env {},
            Probe::Read {
                path: "/x".into(),
                max: 1,
            },
            Probe::Raw(RawFrame::Random(1 << 20)),
            Probe::Exec {
                argv: vec!["/bin/true".into()],
                timeout_ms: 5,
            },
        ] {
            let request = ProbeRequest { id: 7, probe };
            let mut bytes = Vec::new();
            write_frame_blocking(&mut bytes, &request).unwrap();
            let back: Option<ProbeRequest> =
                read_frame_blocking(&mut bytes.as_slice(), usize::MAX).unwrap();
            assert_eq!(back, Some(request));
        }
    }
}
