//! `run_command {command, cwd?, timeout?}`: runs `/bin/sh -c <command>` inside the session's
//! jail and answers with its output and exit status.
//!
//! Offered only where programs can run at all: `strict` with `isolation.commands`, whose jail
//! has the read-only system root. The jail is the security boundary: the command runs with the
//! worker's uid, no capabilities, no network, the same Landlock domain and seccomp filter, in the
//! session's cgroup. This file only decides how a command is started, watched and stopped:
//!
//! * its own session and process group (`setsid`), stdin `/dev/null`, the session's environment
//!   plus `TERM=dumb` and nothing else, the working directory entered through a descriptor that
//!   was resolved beneath the workspace;
//! * stdout and stderr are drained as they come, so a chatty program never blocks on a full
//!   pipe, and capped at 64 KiB each (first and last 32 KiB kept);
//! * the command is over when the shell ends: background jobs may keep the pipes open, so what
//!   is already in them is read and the rest is not waited for;
//! * on timeout or abort the process group gets SIGTERM, then SIGKILL, and then, because a
//!   `setsid` daemon has left that group, every other process of the session is killed as well
//!   (`kill(-1)` from PID 1, see [`crate::reaper::kill_all_others`]).
//!
//! The child is waited for through [`crate::reaper`], the worker's single waiter, which is
//! also what reaps orphans as PID 1.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::jail::{JailLevel, JailLimits, WORKSPACE_INSIDE, human_bytes};

use super::{Context, Tool, ToolError, check_range, parse};
use crate::reaper::{self, Watched};

pub(super) const TOOL: Tool = Tool {
    name: "run_command",
    description: "Run a shell command (/bin/sh -c) in the workspace and return its stdout, \
                  stderr and exit code. No network; only the workspace and /tmp are writable. \
                  Output is capped at 64 KiB per stream.",
    schema,
    run,
};

/// `timeout` when the call gives none.
const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// The largest `timeout` a call may ask for; the configured `isolation.limits.commandTimeout`
/// caps it further.
const MAX_TIMEOUT_SECS: u64 = 600;
/// Bytes kept of each stream: the first half and the last half of this.
const STREAM_CAP: usize = 64 * 1024;
const HALF_CAP: usize = STREAM_CAP / 2;
/// How long one wait for output lasts before the loop looks at the clock, the run's token and
/// the child's status again: the delay with which an abort or a finished command is noticed.
const TICK: Duration = Duration::from_millis(20);
/// After a timeout, how long the process group has between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// The same after an abort, shorter than [`TERM_GRACE`]: an abort must be over in about a
/// second, and the run answers a tool that is still stopping after 1 s as aborted
/// without waiting for it. The whole stop fits in that second, so by the time the run says
/// "aborted" the command's processes are gone.
const ABORT_TERM_GRACE: Duration = Duration::from_millis(500);
/// After SIGKILL, how long to wait for the shell's status (a process in uninterruptible sleep
/// dies only when the kernel lets it).
const REAP_WAIT: Duration = Duration::from_secs(5);
/// The most one read burst takes from a pipe before the loop moves on, so a program that writes
/// without pause cannot keep the loop from its other checks.
const BURST_BYTES: usize = 1024 * 1024;

/// `close_range` flag: mark the range close-on-exec instead of closing it (closing would also
/// close std's own pipe that reports a failed exec).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// One command at a time per worker, its stop included. Tools run one after the
/// other anyway; this matters when an aborted call is still stopping its command (it runs on a
/// blocking thread the run no longer waits for) while the next run starts one: the
/// `kill(-1)` of the old stop must not hit the new command.
static COMMAND_SLOT: Mutex<()> = Mutex::new(());

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "Shell command line, run with /bin/sh -c"},
            "cwd": {"type": "string", "description": "Working directory relative to the workspace root (default: root)"},
            "timeout": {
                "type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_SECS,
                "default": DEFAULT_TIMEOUT_SECS, "description": "Seconds"
            },
        },
        "required": ["command"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    command: String,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
}

/// How the wait for a command ended.
enum Ending {
    Exited(WaitStatus),
    Aborted,
    TimedOut,
    /// The child's status could not be collected (it is not ours any more).
    Lost(std::io::Error),
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    let requested = args.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
    check_range(TOOL.name, "timeout", requested, 1, MAX_TIMEOUT_SECS)?;
    let limits = &cx.confinement.limits;
    let seconds = effective_timeout(requested, limits);
    if args.command.contains('\0') {
        return Err(ToolError::InvalidArguments {
            tool: TOOL.name,
            message: "command must not contain NUL".into(),
        });
    }
    let dir = cx.ws.resolve(args.cwd.as_deref().unwrap_or("."))?;
    // Opened beneath the workspace root (symlinks that leave it are refused), and entered by
    // descriptor in the child: no path is looked up again between the check and the use.
    let cwd = cx.ws.open_dir(&dir)?;

    let _slot = COMMAND_SLOT.lock().unwrap_or_else(PoisonError::into_inner);
    if cx.cancel.is_cancelled() {
        return Err(ToolError::Aborted);
    }
    let mut command = shell(&args.command, cwd);
    let (mut child, watched) = reaper::spawn(&mut command)
        .map_err(|e| ToolError::Command(format!("could not start /bin/sh: {e}")))?;
    // It holds the working directory's descriptor.
    drop(command);
    let mut guard = KillOnUnwind(Some(watched.pid()));
    let mut output = Output::new(
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );
    // The status is collected through `watched`, never through std's `Child`.
    drop(child);

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let ending = loop {
        output.pump(TICK);
        match watched.try_wait() {
            Ok(Some(status)) => break Ending::Exited(status),
            Ok(None) => {}
            Err(e) => break Ending::Lost(e),
        }
        if cx.cancel.is_cancelled() {
            break Ending::Aborted;
        }
        if Instant::now() >= deadline {
            break Ending::TimedOut;
        }
    };
    let result = match ending {
        Ending::Exited(status) => {
            // Whatever the shell and its foreground jobs wrote is in the pipes by now; a
            // background job still holding them is not waited for.
            output.drain();
            // A command that failed on a full workspace is told which quota it hit.
            let failed = !matches!(status, WaitStatus::Exited(_, 0));
            let full = failed && cx.ws.is_full();
            Ok(result_parts(&output, status, limits, full))
        }
        Ending::Aborted => {
            stop(&watched, &mut output, ABORT_TERM_GRACE);
            Err(ToolError::Aborted)
        }
        Ending::TimedOut => {
            stop(&watched, &mut output, TERM_GRACE);
            Err(ToolError::TimedOut {
                seconds,
                partial: output.labelled(),
            })
        }
        Ending::Lost(e) => {
            stop(&watched, &mut output, Duration::ZERO);
            Err(ToolError::Command(format!(
                "lost track of the command: {e}"
            )))
        }
    };
    guard.0 = None;
    result
}

/// The call's timeout, capped by the configured `commandTimeout` (at least 1 s).
fn effective_timeout(requested: u64, limits: &JailLimits) -> u64 {
    requested.min(limits.command_timeout.max(1))
}

/// `/bin/sh -c <line>`, started in `cwd` (a directory descriptor the command keeps until it is
/// dropped).
fn shell(line: &str, cwd: OwnedFd) -> Command {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(line)
        .env_clear()
        .envs(crate::jail::environment(
            JailLevel::Strict,
            WORKSPACE_INSIDE,
        ))
        .env("TERM", "dumb")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `pre_exec` runs the closure in the forked child before exec, where only
    // async-signal-safe calls are allowed: setsid and fchdir (through nix, which adds nothing
    // but errno handling) and close_range are plain syscalls, on a descriptor the closure owns
    // (O_CLOEXEC closes the child's copy at exec).
    unsafe {
        command.pre_exec(move || {
            // Its own session and process group, so the whole group can be signalled and no
            // terminal can ever be attached to it.
            nix::unistd::setsid()?;
            nix::unistd::fchdir(&cwd)?;
            // A command gets fds 0-2 and nothing else. Everything the worker opens is
            // close-on-exec already (the channel included); this keeps it so for anything
            // opened later without the flag. Kernels before 5.11 lack the flag (EINVAL): there
            // the per-descriptor flags are all there is.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    command
}

/// Stops a command that is still running: SIGTERM to its process group, SIGKILL after `grace`
/// (or sooner once the group is empty), then everything else of the session (a daemon that
/// left the group with `setsid`); finally collects the shell's status so no zombie is left.
fn stop(watched: &Watched, output: &mut Output, grace: Duration) {
    let group = Pid::from_raw(watched.pid());
    let _ = killpg(group, Signal::SIGTERM);
    // A stopped process acts on SIGTERM only once it runs again.
    let _ = killpg(group, Signal::SIGCONT);
    let until = Instant::now() + grace;
    while Instant::now() < until {
        output.pump(TICK);
        let _ = watched.try_wait();
        // ESRCH: no process (not even a zombie) is left in the group.
        if killpg(group, None).is_err() {
            break;
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
    reaper::kill_all_others();
    let until = Instant::now() + REAP_WAIT;
    while matches!(watched.try_wait(), Ok(None)) && Instant::now() < until {
        output.pump(TICK);
    }
    output.drain();
}

/// Kills the command's process group if the tool unwinds (a bug) before it has settled the
/// command's fate, so a panic cannot leave the command running unwatched.
struct KillOnUnwind(Option<libc::pid_t>);

impl Drop for KillOnUnwind {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The result parts of a command that ended on its own: STDOUT, STDERR, ERROR
/// for a non-zero exit or a signal, `(no output)` when there is nothing else. A non-zero exit is
/// not a tool error: the model reads the ERROR part.
fn result_parts(
    output: &Output,
    status: WaitStatus,
    limits: &JailLimits,
    disk_full: bool,
) -> Value {
    let mut parts = Vec::new();
    for (name, capture) in [
        ("STDOUT", &output.streams[0]),
        ("STDERR", &output.streams[1]),
    ] {
        if capture.capture.total > 0 {
            parts.push(json!({"type": "text", "name": name, "text": capture.capture.text()}));
        }
    }
    if let Some(mut error) = describe_status(status, limits) {
        if disk_full {
            error = format!(
                "{error} ({})",
                crate::agent::workspace::no_space(limits.disk)
            );
        }
        parts.push(json!({"type": "text", "name": "ERROR", "text": error}));
    }
    if parts.is_empty() {
        parts.push(json!({"type": "text", "text": "(no output)"}));
    }
    Value::Array(parts)
}

/// The ERROR text for a wait status, `None` for a clean exit.
fn describe_status(status: WaitStatus, limits: &JailLimits) -> Option<String> {
    match status {
        WaitStatus::Exited(_, 0) => None,
        WaitStatus::Exited(_, code) => {
            // A shell reports a child that a signal killed as 128 + the signal.
            let hint = if code > 128 {
                limit_hint(code - 128, limits)
                    .map(|hint| format!(" (128 + {}: {hint})", signal_name(code - 128)))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Some(format!("Command exited with code {code}{hint}"))
        }
        WaitStatus::Signaled(_, signal, _) => {
            let number = signal as libc::c_int;
            let hint = limit_hint(number, limits)
                .map(|hint| format!(": {hint}"))
                .unwrap_or_default();
            Some(format!(
                "Command killed by signal {number} ({}){hint}",
                signal.as_str()
            ))
        }
        other => Some(format!("Command ended with wait status {other:?}")),
    }
}

/// Which session limit may have sent `signal`: SIGKILL is what the OOM killer sends in a memory
/// cgroup (the worker cannot read the cgroup's counters, hence "possibly"), SIGXCPU what the CPU
/// time rlimit sends. Worded like the supervisor's limit messages.
fn limit_hint(signal: libc::c_int, limits: &JailLimits) -> Option<String> {
    match signal {
        libc::SIGKILL => limits.memory_cgroup.map(|bytes| {
            format!(
                "possibly the session's memory limit ({}) was reached",
                human_bytes(bytes)
            )
        }),
        libc::SIGXCPU => Some(format!(
            "the CPU time limit ({} s) was reached",
            limits.cpu_seconds
        )),
        _ => None,
    }
}

fn signal_name(signal: libc::c_int) -> String {
    Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().into())
}

/// One output stream: the pipe while it is open, and what was read from it.
struct Stream {
    pipe: Option<File>,
    capture: Capture,
}

/// stdout and stderr of a running command.
struct Output {
    streams: [Stream; 2],
    buffer: Vec<u8>,
}

impl Output {
    fn new(stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) -> Self {
        let stream = |fd: Option<OwnedFd>| Stream {
            // Non-blocking, so a read never waits for a writer that keeps the pipe open.
            pipe: fd
                .filter(|fd| fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_ok())
                .map(File::from),
            capture: Capture::default(),
        };
        Self {
            streams: [stream(stdout), stream(stderr)],
            buffer: vec![0; 64 * 1024],
        }
    }

    /// Waits up to `wait` for output on the open pipes and reads what is there.
    fn pump(&mut self, wait: Duration) {
        let ready: Vec<usize> = {
            let open: Vec<(usize, &File)> = self
                .streams
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.pipe.as_ref().map(|p| (i, p)))
                .collect();
            if open.is_empty() {
                std::thread::sleep(wait);
                return;
            }
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .map(|(_, pipe)| PollFd::new(pipe.as_fd(), PollFlags::POLLIN))
                .collect();
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO);
            match poll(&mut fds, timeout) {
                Ok(n) if n > 0 => open
                    .iter()
                    .zip(&fds)
                    .filter(|(_, fd)| fd.any().unwrap_or(true))
                    .map(|((i, _), _)| *i)
                    .collect(),
                // Nothing yet, or a signal (SIGCHLD) cut the wait short.
                _ => Vec::new(),
            }
        };
        for i in ready {
            self.read_burst(i);
        }
    }

    /// Reads stream `i` until it has nothing more right now (or a burst's worth); closes it at
    /// end of file.
    fn read_burst(&mut self, i: usize) {
        let stream = &mut self.streams[i];
        let Some(pipe) = stream.pipe.as_mut() else {
            return;
        };
        let mut taken = 0;
        while taken < BURST_BYTES {
            match pipe.read(&mut self.buffer) {
                Ok(0) => {
                    stream.pipe = None;
                    return;
                }
                Ok(n) => {
                    stream.capture.push(&self.buffer[..n]);
                    taken += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    stream.pipe = None;
                    return;
                }
            }
        }
    }

    /// Takes what is in the pipes now, then closes them: the command is over, and whoever
    /// still holds the write ends (a background job) gets EPIPE from now on.
    fn drain(&mut self) {
        for i in 0..self.streams.len() {
            self.read_burst(i);
            self.streams[i].pipe = None;
        }
    }

    /// Both streams as one text, as the model sees named parts: `STDOUT:\n…\nSTDERR:\n…`.
    fn labelled(&self) -> String {
        [("STDOUT", &self.streams[0]), ("STDERR", &self.streams[1])]
            .iter()
            .filter(|(_, s)| s.capture.total > 0)
            .map(|(name, s)| format!("{name}:\n{}", s.capture.text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A stream capped at [`STREAM_CAP`]: the first [`HALF_CAP`] bytes, the last [`HALF_CAP`], and
/// a count of everything in between (which is read and thrown away, never buffered).
#[derive(Default)]
struct Capture {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl Capture {
    fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = HALF_CAP - self.head.len();
        if room > 0 {
            let take = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        if bytes.len() >= HALF_CAP {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - HALF_CAP..]);
            return;
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(HALF_CAP);
        self.tail.drain(..overflow);
        self.tail.extend(bytes);
    }

    /// The kept text: all of it when nothing was dropped, else head and tail around
    /// `[… <n> bytes truncated …]`, each cut at a character boundary. Invalid UTF-8 (binary
    /// output) is replaced, not refused.
    fn text(&self) -> String {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let kept = (self.head.len() + tail.len()) as u64;
        if kept == self.total {
            let mut all = self.head.clone();
            all.extend_from_slice(&tail);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let head = &self.head[..self.head.len() - incomplete_suffix(&self.head)];
        let tail = &tail[continuation_prefix(&tail)..];
        let dropped = self.total - (head.len() + tail.len()) as u64;
        format!(
            "{}\n[… {dropped} bytes truncated …]\n{}",
            String::from_utf8_lossy(head),
            String::from_utf8_lossy(tail)
        )
    }
}

/// Length of a UTF-8 sequence at the end of `bytes` that was cut before it was complete.
fn incomplete_suffix(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for its lead byte
        }
        let needed = match byte {
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            b if b & 0xF8 == 0xF0 => 4,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Number of continuation bytes at the start of `bytes` (the rest of a character whose start
/// was dropped), at most 3.
fn continuation_prefix(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take(3)
        .take_while(|b| **b & 0xC0 == 0x80)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::workspace::tests::Fixture;
    use crate::jail::Confinement;
    use tokio_util::sync::CancellationToken;

    fn call(f: &Fixture, arguments: Value) -> Result<Value, ToolError> {
        call_with(f, arguments, &CancellationToken::new())
    }

    fn call_with(
        f: &Fixture,
        arguments: Value,
        cancel: &CancellationToken,
    ) -> Result<Value, ToolError> {
        (TOOL.run)(
            &Context {
                ws: &f.ws,
                cancel,
                confinement: &Confinement::unconfined(),
            },
            &arguments,
        )
    }

    fn part<'a>(result: &'a Value, name: &str) -> Option<&'a str> {
        result
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["text"].as_str())
    }

    #[test]
    fn output_and_exit_code() {
        let f = Fixture::new();
        let out = call(&f, json!({"command": "echo hi; echo oops >&2"})).unwrap();
        assert_eq!(
            out,
            json!([
                {"type": "text", "name": "STDOUT", "text": "hi\n"},
                {"type": "text", "name": "STDERR", "text": "oops\n"},
            ])
        );
        let out = call(&f, json!({"command": "echo partial; exit 3"})).unwrap();
        assert_eq!(part(&out, "STDOUT"), Some("partial\n"));
        assert_eq!(part(&out, "ERROR"), Some("Command exited with code 3"));
        let out = call(&f, json!({"command": "true"})).unwrap();
        assert_eq!(out, json!([{"type": "text", "text": "(no output)"}]));
        let out = call(&f, json!({"command": "kill -TERM $$"})).unwrap();
        assert_eq!(
            part(&out, "ERROR"),
            Some("Command killed by signal 15 (SIGTERM)")
        );
    }

    #[test]
    fn runs_in_the_workspace_with_only_the_jail_environment() {
        let f = Fixture::new();
        std::fs::create_dir(f.root().join("sub")).unwrap();
        let out = call(
            &f,
            json!({"command": "pwd; env | sort; read x || echo eof", "cwd": "sub"}),
        )
        .unwrap();
        let text = part(&out, "STDOUT").unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let real = std::fs::canonicalize(f.root().join("sub")).unwrap();
        assert_eq!(lines[0], real.to_str().unwrap());
        let vars: Vec<&str> = lines[1..lines.len() - 1]
            .iter()
            .map(|l| l.split('=').next().unwrap())
            .filter(|name| *name != "PWD" && *name != "SHLVL" && *name != "_")
            .collect();
        assert_eq!(vars, ["HOME", "LANG", "PATH", "TERM", "TMPDIR", "USER"]);
        assert!(text.contains("TERM=dumb\n") && text.contains("PATH=/usr/bin:/bin\n"));
        // stdin is /dev/null.
        assert_eq!(lines.last(), Some(&"eof"));
        // Its own session: the shell leads it.
        let out = call(&f, json!({"command": "ps -o sid= -p $$; echo $$"})).unwrap();
        let text = part(&out, "STDOUT").unwrap_or_default();
        let ids: Vec<&str> = text.split_whitespace().collect();
        if ids.len() == 2 {
            assert_eq!(ids[0], ids[1], "sid = pid: {text}");
        }
    }

    #[test]
    fn refusals() {
        let f = Fixture::new();
        f.write("file.txt", "x");
        std::os::unix::fs::symlink(f.outside(), f.root().join("out")).unwrap();
        let cases = [
            (
                json!({"command": "pwd", "cwd": "../outside"}),
                "Path is outside the workspace: ../outside",
            ),
            (
                json!({"command": "pwd", "cwd": "out"}),
                "Path is outside the workspace: out",
            ),
            (
                json!({"command": "pwd", "cwd": "missing"}),
                "No such file or directory: missing",
            ),
            (
                json!({"command": "pwd", "cwd": "file.txt"}),
                "Not a directory: file.txt",
            ),
            (
                json!({"command": "a\u{0}b"}),
                "Invalid arguments for run_command: command must not contain NUL",
            ),
            (
                json!({"command": "true", "timeout": 0}),
                "Invalid arguments for run_command: timeout must be between 1 and 600, got 0",
            ),
            (
                json!({"command": "true", "timeout": 601}),
                "Invalid arguments for run_command: timeout must be between 1 and 600, got 601",
            ),
            (
                json!({}),
                "Invalid arguments for run_command: missing field `command`",
            ),
        ];
        for (arguments, message) in cases {
            let err = call(&f, arguments.clone()).unwrap_err();
            assert_eq!(err.to_string(), message, "{arguments}");
        }
    }

    #[test]
    fn output_is_capped_head_and_tail() {
        let f = Fixture::new();
        // 200 000 bytes of digits on stdout, a marker at each end; stderr stays small.
        let out = call(
            &f,
            json!({"command": "printf START; head -c 199992 /dev/zero | tr '\\0' 7; printf END; echo small >&2"}),
        )
        .unwrap();
        let text = part(&out, "STDOUT").unwrap();
        assert!(text.starts_with("START7777"), "{}", &text[..20]);
        assert!(text.ends_with("7777END"));
        let dropped = 200_000 - STREAM_CAP;
        assert!(text.contains(&format!("\n[… {dropped} bytes truncated …]\n")));
        assert_eq!(
            text.len(),
            STREAM_CAP + format!("\n[… {dropped} bytes truncated …]\n").len()
        );
        assert_eq!(part(&out, "STDERR"), Some("small\n"));
    }

    #[test]
    fn a_background_job_holding_the_pipes_does_not_hold_the_call() {
        let f = Fixture::new();
        let started = Instant::now();
        let out = call(&f, json!({"command": "sleep 30 & echo $!; echo done"})).unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        let text = part(&out, "STDOUT").unwrap();
        assert!(text.ends_with("done\n"), "{text}");
        // Clean up the sleeper (outside a PID namespace nobody else will).
        let pid: i32 = text.lines().next().unwrap().parse().unwrap();
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    #[test]
    fn timeout_keeps_the_partial_output_and_kills_the_group() {
        let f = Fixture::new();
        let err = call(
            &f,
            json!({"command": "echo before; sleep 30 & echo $! > bg.pid; wait", "timeout": 1}),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Command timed out after 1s");
        match &err {
            ToolError::TimedOut { partial, .. } => assert_eq!(partial, "STDOUT:\nbefore\n"),
            other => panic!("{other:?}"),
        }
        // The background sleeper was in the group: it is gone too.
        let pid: i32 = f.read("bg.pid").trim().parse().unwrap();
        assert!(gone(pid), "sleep {pid} survived the timeout");
    }

    #[test]
    fn a_group_that_ignores_sigterm_gets_sigkill() {
        let f = Fixture::new();
        let started = Instant::now();
        let err = call(
            &f,
            json!({"command": "trap '' TERM; echo $$ > sh.pid; while :; do sleep 0.05; done", "timeout": 1}),
        )
        .unwrap_err();
        assert!(
            matches!(err, ToolError::TimedOut { seconds: 1, .. }),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        let pid: i32 = f.read("sh.pid").trim().parse().unwrap();
        assert!(gone(pid));
    }

    #[test]
    fn abort_stops_the_command_promptly() {
        let f = Fixture::new();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let pid_file = f.root().join("sh.pid");
        // Once the command runs (other tests' commands may hold the slot for a while first).
        let aborter = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !pid_file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            trigger.cancel();
            Instant::now()
        });
        let err = call_with(
            &f,
            json!({"command": "echo $$ > sh.pid; sleep 30"}),
            &cancel,
        )
        .unwrap_err();
        let aborted_at = aborter.join().unwrap();
        assert!(err.is_aborted(), "{err:?}");
        // Meant to fit the run's 1 s stop grace; a generous bound for a loaded host.
        assert!(aborted_at.elapsed() < Duration::from_secs(10));
        let pid: i32 = f.read("sh.pid").trim().parse().unwrap();
        assert!(gone(pid));
        // An aborted run starts nothing.
        let err = call_with(&f, json!({"command": "touch never"}), &cancel).unwrap_err();
        assert!(err.is_aborted());
        assert!(!f.root().join("never").exists());
    }

    /// Whether `pid` has ended (not even a zombie is left), within a few seconds.
    fn gone(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let alive = nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                });
            if !alive {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn statuses_read_like_the_spec() {
        let pid = Pid::from_raw(1);
        let unconfined = Confinement::unconfined().limits;
        assert_eq!(
            describe_status(WaitStatus::Exited(pid, 0), &unconfined),
            None
        );
        assert_eq!(
            describe_status(WaitStatus::Exited(pid, 2), &unconfined),
            Some("Command exited with code 2".into())
        );
        assert_eq!(
            describe_status(
                WaitStatus::Signaled(pid, Signal::SIGSEGV, false),
                &unconfined
            ),
            Some("Command killed by signal 11 (SIGSEGV)".into())
        );
        // Without a memory cgroup there is no limit to suspect.
        assert_eq!(
            describe_status(WaitStatus::Exited(pid, 137), &unconfined),
            Some("Command exited with code 137".into())
        );
        assert_eq!(signal_name(64), "signal 64");
    }

    #[test]
    fn kills_name_the_limits_the_jail_has() {
        let pid = Pid::from_raw(1);
        let mut limits = Confinement::unconfined().limits;
        limits.memory_cgroup = Some(256 << 20);
        limits.cpu_seconds = 30;
        assert_eq!(
            describe_status(WaitStatus::Exited(pid, 137), &limits),
            Some(
                "Command exited with code 137 (128 + SIGKILL: possibly the session's memory \
                 limit (256 MiB) was reached)"
                    .into()
            )
        );
        assert_eq!(
            describe_status(WaitStatus::Signaled(pid, Signal::SIGXCPU, false), &limits),
            Some(
                "Command killed by signal 24 (SIGXCPU): the CPU time limit (30 s) was reached"
                    .into()
            )
        );
    }

    #[test]
    fn captures_keep_head_and_tail_at_character_boundaries() {
        let mut c = Capture::default();
        c.push(b"small");
        assert_eq!(c.text(), "small");
        let mut c = Capture::default();
        let exact = vec![b'a'; STREAM_CAP];
        c.push(&exact);
        assert_eq!(c.text().len(), STREAM_CAP);
        assert!(!c.text().contains("truncated"));
        // Many small writes, multi-byte characters straddling both cut points.
        let mut c = Capture::default();
        let mut all = String::new();
        while all.len() < 3 * STREAM_CAP {
            all.push_str("é€x");
        }
        for chunk in all.as_bytes().chunks(7) {
            c.push(chunk);
        }
        let text = c.text();
        let (head, rest) = text.split_once("\n[… ").unwrap();
        let (count, tail) = rest.split_once(" bytes truncated …]\n").unwrap();
        assert!(all.starts_with(head) && all.ends_with(tail));
        assert!(!head.contains('\u{FFFD}') && !tail.contains('\u{FFFD}'));
        assert_eq!(
            head.len() + tail.len() + count.parse::<usize>().unwrap(),
            all.len()
        );
        assert!(head.len() > HALF_CAP - 4 && tail.len() > HALF_CAP - 4);
    }

    #[test]
    fn utf8_cut_helpers() {
        assert_eq!(incomplete_suffix(b"ab"), 0);
        assert_eq!(incomplete_suffix("a€".as_bytes()), 0);
        assert_eq!(incomplete_suffix(&"a€".as_bytes()[..3]), 2);
        assert_eq!(incomplete_suffix(&"a€".as_bytes()[..2]), 1);
        assert_eq!(incomplete_suffix(&[0xff]), 0);
        assert_eq!(continuation_prefix(&"€a".as_bytes()[1..]), 2);
        assert_eq!(continuation_prefix(b"abc"), 0);
    }

    #[test]
    fn the_configured_limit_caps_the_timeout() {
        let mut limits = Confinement::unconfined().limits;
        assert_eq!(effective_timeout(60, &limits), 60);
        assert_eq!(effective_timeout(600, &limits), 600);
        limits.command_timeout = 5;
        assert_eq!(effective_timeout(60, &limits), 5);
        assert_eq!(effective_timeout(3, &limits), 3);
        limits.command_timeout = 0;
        assert_eq!(effective_timeout(60, &limits), 1);
    }
}
