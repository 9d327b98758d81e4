//! The escape and abuse catalogue of isolation.md §4.3, shared by `isolation_strict.rs` (root
//! mode, per-session uids), `isolation_rootless.rs` (the supervisor drops to uid 65534 first)
//! and `isolation_chroot.rs`.
//!
//! Every test goes through the real binary and the real spawn path: a session's worker is
//! started by a query, then the test asks it (over `POST /api/v1/debug/probe`, compiled only
//! with the `isolation-tests` feature) to issue the syscall under test from inside its jail.
//! Each negative assertion has its positive control next to it (the host file exists, the
//! listener answers the test itself, ...). Tests that need something this host lacks print
//! `SKIP: <reason>` and pass.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{LONG, Server, ServerOpts, pid_alive, wait_until};
use serde_json::{Value, json};

pub const T: Duration = Duration::from_secs(30);

/// How the server under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `strict` as root: per-session host uids.
    Root,
    /// `strict` rootless: the supervisor is uid 65534.
    Rootless,
    /// `chroot` as root.
    Chroot,
}

pub const ROOTLESS_UID: u32 = 65534;

impl Mode {
    pub fn level(self) -> &'static str {
        match self {
            Self::Root | Self::Rootless => "strict",
            Self::Chroot => "chroot",
        }
    }

    pub fn strict(self) -> bool {
        self != Self::Chroot
    }
}

/// Deep-merges `extra` into `base`.
fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

/// The options of a catalogue server: the probe server on, commands on at `strict`, small
/// limits so the resource tests finish quickly, and `extra` merged into the config.
pub fn opts(mode: Mode, extra: Value) -> ServerOpts {
    let mut config = json!({
        "isolation": {
            "commands": mode.strict(),
            "limits": {
                "pids": 64,
                "memory": "256MiB",
                "addressSpace": "1GiB",
                "fileSize": "100MiB",
                "tmpSize": "8MiB",
            },
            "test": {"probeServer": true},
        }
    });
    merge(&mut config, &extra);
    let mut opts = ServerOpts::new()
        .config_file("isolation.json", config.to_string())
        .arg(format!("--isolation={}", mode.level()));
    if mode == Mode::Rootless {
        opts = opts.arg(format!("--test-run-as={ROOTLESS_UID}"));
    }
    opts
}

/// Starts a catalogue server and checks it runs at the level the mode asks for. An explicit
/// level that is unavailable makes the server exit 78, so this fails (the suite must fail when
/// `strict` is unavailable).
pub async fn start_with(mode: Mode, extra: Value) -> Result<Server> {
    let server = Server::start(opts(mode, extra)).await?;
    let health = server.get_ok("/api/v1/system/health").await?;
    let iso = &health["isolation"];
    ensure!(iso["level"] == mode.level(), "level: {iso}");
    let uid_mode = if mode == Mode::Rootless {
        "shared"
    } else {
        "per-session"
    };
    ensure!(iso["uidMode"] == uid_mode, "uid mode: {iso}");
    Ok(server)
}

pub async fn start(mode: Mode) -> Result<Server> {
    start_with(mode, json!({})).await
}

/// A session with a live worker (started by one query).
pub async fn session(server: &Server) -> Result<String> {
    let sid = server.create_session().await?;
    let r = server.query(&sid, "hello").await?;
    ensure!(r["content"] == "echo: hello", "first query: {r}");
    server.wait_worker_pid(&sid).await?;
    Ok(sid)
}

/// Runs probe `name` in `sid`'s worker; returns `{ok, errno, errname, detail}`.
pub async fn probe(server: &Server, sid: &str, name: &str, args: Value) -> Result<Value> {
    let r = server
        .post_json(
            "/api/v1/debug/probe",
            &json!({"sessionId": sid, "name": name, "args": args}),
        )
        .await?;
    r.expect_status(200, &format!("probe {name}"))?;
    Ok(r.json)
}

/// The errno name a probe reported.
pub fn errname(answer: &Value) -> &str {
    answer["errname"].as_str().unwrap_or_default()
}

/// Asserts that a probe failed with one of `allowed`.
pub fn denied(answer: &Value, allowed: &[&str], what: &str) -> Result<()> {
    ensure!(
        answer["ok"] == false && allowed.contains(&errname(answer)),
        "{what}: expected one of {allowed:?}, got {answer}"
    );
    Ok(())
}

/// The accepted self-audit of `sid`'s worker and its launcher's host pid.
pub async fn jail(server: &Server, sid: &str) -> Result<(Value, u32)> {
    let j = server
        .get_ok(&format!("/api/v1/debug/jail?sessionId={sid}"))
        .await?;
    let pid = j["launcherPid"].as_u64().context("launcherPid")? as u32;
    Ok((j["audit"].clone(), pid))
}

/// The host uid `sid` runs as.
pub async fn host_uid(server: &Server, sid: &str) -> Result<u32> {
    let (audit, _) = jail(server, sid).await?;
    Ok(audit["host_uid"].as_u64().context("host_uid")? as u32)
}

/// Prints `SKIP: <reason>` and records it next to the binary under test, so that
/// `scripts/test.sh` can list every skip at the end of a run.
pub fn skip(reason: &str) -> Result<()> {
    note_skip(reason);
    Ok(())
}

fn note_skip(reason: &str) {
    use std::io::Write;
    let test = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let test = test.split('-').next().unwrap_or_default().to_owned();
    let name = std::thread::current().name().unwrap_or_default().to_owned();
    println!("SKIP: {reason}");
    let file = e2e::supervisor_bin()
        .ok()
        .and_then(|b| b.parent().map(|d| d.join("isolation-skips.txt")))
        .and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
    if let Some(mut file) = file {
        let _ = writeln!(file, "{test}::{name}: SKIP: {reason}");
    }
}

/// Host pids of a session's processes: its launcher, everything below it, and (where cgroups
/// exist) every member of its cgroup, which catches a daemon that left the process tree.
pub async fn session_processes(server: &Server, sid: &str) -> Result<Vec<u32>> {
    let (_, launcher) = jail(server, sid).await?;
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![launcher];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{launcher}/cgroup")).unwrap_or_default();
    // Only a session group of ours (rootless servers have none: the launcher sits in whatever
    // group the server was started in, shared with unrelated processes).
    if let Some(path) = cgroups
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_owned()))
        .filter(|p| p.contains("/agentd-"))
    {
        let procs = std::fs::read_to_string(format!("/sys/fs/cgroup/pids{path}/cgroup.procs"))
            .unwrap_or_default();
        found.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    found.sort_unstable();
    found.dedup();
    Ok(found.into_iter().filter(|p| pid_alive(*p)).collect())
}

/// Host pids of processes running as `uid`.
pub fn processes_of_uid(uid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real == Some(uid) && pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// A process outside any sandbox running as `uid` (the canary of T29).
pub fn canary(uid: u32) -> Result<std::process::Child> {
    let mut command = std::process::Command::new("/bin/sleep");
    command.arg("3600");
    // SAFETY: runs in the forked child before exec; raw syscalls only.
    unsafe {
        command.pre_exec(move || {
            let rc = nix::libc::syscall(nix::libc::SYS_setgroups, 0usize, 0usize);
            let rg = nix::libc::syscall(nix::libc::SYS_setresgid, uid, uid, uid);
            let ru = nix::libc::syscall(nix::libc::SYS_setresuid, uid, uid, uid);
            if rc != 0 || rg != 0 || ru != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command.spawn()?)
}

/// Runs `program args` on the host as `uid` and returns (success, stdout, stderr).
pub fn run_as(uid: u32, program: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let mut command = std::process::Command::new(program);
    command.args(args);
    // SAFETY: runs in the forked child before exec; raw syscalls only.
    unsafe {
        command.pre_exec(move || {
            let rc = nix::libc::syscall(nix::libc::SYS_setgroups, 0usize, 0usize);
            let rg = nix::libc::syscall(nix::libc::SYS_setresgid, uid, uid, uid);
            let ru = nix::libc::syscall(nix::libc::SYS_setresuid, uid, uid, uid);
            if rc != 0 || rg != 0 || ru != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The supervisor still serves and session `sid` still answers.
pub async fn still_fine(server: &Server, sid: &str) -> Result<()> {
    let h = server.get("/api/v1/health").await?;
    h.expect_status(200, "health after abuse")?;
    let r = server.query(sid, "still there").await?;
    ensure!(r["content"] == "echo: still there", "other session: {r}");
    Ok(())
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------------
// The catalogue
// ------------------------------------------------------------------------------------------------

/// T01: another session's workspace is unreachable by absolute host path, by a symlink, and the
/// workspace base directory itself does not exist in the jail.
pub async fn t01_other_workspace(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let b = session(&server).await?;
    let b_dir = server.workspace_root().join(&b);
    std::fs::write(b_dir.join("secret.txt"), "B's secret")?;
    // Control: the file is there on the host.
    ensure!(std::fs::read_to_string(b_dir.join("secret.txt"))? == "B's secret");
    let b_secret = b_dir.join("secret.txt").to_string_lossy().into_owned();
    let answer = probe(&server, &a, "open", json!({"path": b_secret})).await?;
    denied(&answer, &["ENOENT"], "A opens B's file by host path")?;
    let root = server.workspace_root().to_string_lossy().into_owned();
    let answer = probe(&server, &a, "stat", json!({"path": root})).await?;
    denied(&answer, &["ENOENT"], "A stats the workspace base")?;
    // A symlink A plants towards B resolves inside A's own root.
    let here = if mode.strict() { "/workspace" } else { "/" };
    let link = format!("{here}/to-b").replace("//", "/");
    let made = probe(
        &server,
        &a,
        "symlink",
        json!({"target": b_dir, "link": link}),
    )
    .await?;
    ensure!(made["ok"] == true, "symlink: {made}");
    let answer = probe(
        &server,
        &a,
        "open",
        json!({"path": format!("{link}/secret.txt")}),
    )
    .await?;
    denied(&answer, &["ENOENT"], "A follows its own link to B")?;
    // And the supervisor's file API does not follow it either.
    let r = server
        .get(&format!(
            "/api/v1/sessions/workspace/files?sessionId={a}&path=to-b/secret.txt"
        ))
        .await?;
    ensure!(
        r.status == 404 && !r.text.contains("B's secret"),
        "file API: {}",
        r.text
    );
    Ok(())
}

/// T02: `..` stays at the root.
pub async fn t02_dotdot(mode: Mode) -> Result<()> {
    ensure!(Path::new("/etc/os-release").exists(), "control: host file");
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(
        &server,
        &a,
        "chdir_up",
        json!({"n": 50, "then": "../../../../etc/os-release"}),
    )
    .await?;
    ensure!(answer["detail"]["cwd"] == "/", "cwd after 50× ..: {answer}");
    denied(
        &answer["detail"]["open"],
        &["ENOENT"],
        "../../etc/os-release",
    )?;
    Ok(())
}

/// T03: the double-chroot escape.
pub async fn t03_double_chroot(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "double_chroot", json!({})).await?;
    denied(&answer["detail"]["chroot"], &["EPERM"], "chroot(x)")?;
    denied(
        &answer["detail"]["file"],
        &["ENOENT"],
        "/etc/os-release after",
    )?;
    Ok(())
}

/// T04: a host directory fd leaked into the launcher is gone before anything uses it.
pub async fn t04_leaked_fd(mode: Mode) -> Result<()> {
    let server = start_with(mode, json!({"isolation": {"test": {"leakFd": true}}})).await?;
    let a = session(&server).await?;
    // At the end of the jail (W11, W13) only 0-3 were open; the runtime opens more later.
    let (audit, _) = jail(&server, &a).await?;
    ensure!(
        audit["open_fds"] == json!([0, 1, 2, 3]),
        "open fds at ready: {audit}"
    );
    // Whatever fd 7 is now (an epoll or socket of the runtime), it is not the host's `/`.
    let answer = probe(
        &server,
        &a,
        "openat",
        json!({"fd": 7, "path": "etc/os-release"}),
    )
    .await?;
    denied(&answer, &["EBADF", "ENOTDIR"], "openat(7, etc/os-release)")?;
    Ok(())
}

/// T05: `/proc/self/fd/<n>` as cwd never reaches a host file.
pub async fn t05_proc_fd_cwd(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "proc_fd_walk", json!({})).await?;
    ensure!(
        answer["ok"] == true,
        "reached host files through fds: {answer}"
    );
    Ok(())
}

/// T06: nothing can be created beside the workspace (strict: read-only root, `/usr`, `/etc`).
pub async fn t06_read_only_root(mode: Mode) -> Result<()> {
    if !mode.strict() {
        return skip("T06: at chroot the root is the workspace itself (documented)");
    }
    let server = start(mode).await?;
    let a = session(&server).await?;
    for path in ["/evil", "/usr/evil", "/etc/evil"] {
        let answer = probe(
            &server,
            &a,
            "open",
            json!({"path": path, "write": true, "create": true}),
        )
        .await?;
        denied(&answer, &["EROFS", "EACCES"], path)?;
    }
    let answer = probe(
        &server,
        &a,
        "open",
        json!({"path": "/workspace/fine", "write": true, "create": true}),
    )
    .await?;
    ensure!(
        answer["ok"] == true,
        "control: the workspace is writable: {answer}"
    );
    Ok(())
}

/// T07: the host's secrets do not exist in the jail.
pub async fn t07_host_secrets(mode: Mode) -> Result<()> {
    ensure!(
        Path::new("/etc/shadow").exists(),
        "control: host /etc/shadow"
    );
    let server = start(mode).await?;
    let a = session(&server).await?;
    for path in ["/etc/shadow", "/etc/ssh", "/root", "/home"] {
        let answer = probe(&server, &a, "stat", json!({"path": path})).await?;
        denied(&answer, &["ENOENT"], path)?;
    }
    Ok(())
}

/// T08: no device nodes: `mknod` is refused, and a node planted by root is unusable (nodev).
pub async fn t08_devices(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let here = if mode.strict() { "/workspace/n" } else { "/n" };
    let answer = probe(
        &server,
        &a,
        "mknod",
        json!({"path": here, "kind": "char", "major": 1, "minor": 3}),
    )
    .await?;
    denied(&answer, &["EPERM"], "mknod char 1:3")?;
    let fifo = probe(
        &server,
        &a,
        "mknod",
        json!({"path": format!("{here}-fifo"), "kind": "fifo"}),
    )
    .await?;
    ensure!(fifo["ok"] == true, "control: FIFOs stay allowed: {fifo}");
    if !mode.strict() {
        return skip(
            "T08 second half: the chroot level has no nodev mount for the workspace (documented)",
        );
    }
    let planted = server.workspace_root().join(&a).join("null-dev");
    nix::sys::stat::mknod(
        &planted,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )?;
    let answer = probe(&server, &a, "open", json!({"path": "/workspace/null-dev"})).await?;
    denied(&answer, &["EACCES"], "open a planted device node")?;
    Ok(())
}

/// T09: a root-owned setuid binary in the workspace runs as the session, never as root.
pub async fn t09_setuid(mode: Mode) -> Result<()> {
    if !mode.strict() {
        return skip("T09: the chroot level has no system root to run programs with");
    }
    let server = start(mode).await?;
    let a = session(&server).await?;
    let target = server.workspace_root().join(&a).join("id-suid");
    std::fs::copy("/usr/bin/id", &target)?;
    std::os::unix::fs::chown(&target, Some(0), Some(0))?;
    std::fs::set_permissions(
        &target,
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )?;
    let answer = probe(&server, &a, "exec", json!({"argv": ["/workspace/id-suid"]})).await?;
    let out = answer["detail"]["stdout"].as_str().unwrap_or_default();
    ensure!(
        answer["detail"]["exit"] == 0
            && out.contains("uid=")
            && !out.contains("euid=0")
            && !out.starts_with("uid=0"),
        "setuid id: {answer}"
    );
    Ok(())
}

/// T10: mount, umount, pivot_root and the new mount API.
pub async fn t10_mounts(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "mount_tmpfs", json!({"target": "/tmp"})).await?;
    denied(&answer, &["EPERM"], "mount tmpfs")?;
    let target = if mode.strict() { "/workspace" } else { "/" };
    let answer = probe(&server, &a, "umount", json!({"target": target})).await?;
    denied(&answer, &["EPERM"], "umount2")?;
    let answer = probe(&server, &a, "pivot_root", json!({})).await?;
    denied(&answer, &["EPERM"], "pivot_root")?;
    let answer = probe(&server, &a, "open_tree", json!({})).await?;
    denied(&answer, &["ENOSYS"], "open_tree")?;
    Ok(())
}

/// T11: no hard link from a host file into the workspace.
pub async fn t11_hard_links(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let to = if mode.strict() { "/workspace/e" } else { "/e" };
    let answer = probe(
        &server,
        &a,
        "link",
        json!({"from": "/usr/bin/env", "to": to}),
    )
    .await?;
    let allowed: &[&str] = if mode.strict() {
        &["EXDEV", "EACCES"]
    } else {
        &["ENOENT"]
    };
    denied(&answer, allowed, "link /usr/bin/env")?;
    Ok(())
}

/// T12: the environment is exactly the L2 list.
pub async fn t12_environment(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "env", json!({})).await?;
    let mut env: Vec<String> = serde_json::from_value(answer["detail"].clone())?;
    env.sort();
    let home = if mode.strict() {
        "HOME=/workspace"
    } else {
        "HOME=/"
    };
    let expected = vec![
        home,
        "LANG=C.UTF-8",
        "PATH=/usr/bin:/bin",
        "TMPDIR=/tmp",
        "USER=agent",
    ];
    ensure!(env == expected, "environment: {env:?}");
    Ok(())
}

/// T13: a secret given to the supervisor (config file and environment) is nowhere in the jail.
pub async fn t13_secrets(mode: Mode) -> Result<()> {
    let sentinel = "sk-sentinel-0123456789abcdef";
    let opts = opts(
        mode,
        json!({"model": {"provider": "openai", "id": "gpt-4o", "apiKey": sentinel}}),
    )
    .env("OPENAI_API_KEY", sentinel);
    // The echo model keeps the test offline; the key must still never travel.
    let server = Server::start(opts).await?;
    let sid = server.create_session().await?;
    // A query fails (no network to the provider from the supervisor is fine either way); it
    // starts the worker, which is all this test needs.
    let _ = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": sid, "query": "hi"}),
        )
        .await?;
    server.wait_worker_pid(&sid).await?;
    let env = probe(&server, &sid, "env", json!({})).await?;
    ensure!(!env.to_string().contains(sentinel), "worker env: {env}");
    for path in [
        "/proc/self/environ",
        "/proc/self/cmdline",
        "/proc/1/environ",
    ] {
        let answer = probe(&server, &sid, "read", json!({"path": path})).await?;
        ensure!(!answer.to_string().contains(sentinel), "{path}: {answer}");
    }
    let (_, launcher) = jail(&server, &sid).await?;
    let host_env = std::fs::read(format!("/proc/{launcher}/environ")).unwrap_or_default();
    let host_cmd = std::fs::read(format!("/proc/{launcher}/cmdline")).unwrap_or_default();
    ensure!(
        !String::from_utf8_lossy(&host_env).contains(sentinel)
            && !String::from_utf8_lossy(&host_cmd).contains(sentinel),
        "launcher env/cmdline on the host"
    );
    Ok(())
}

/// T14: `/proc` shows only the session's own processes (strict), or does not exist (chroot).
pub async fn t14_proc(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "list", json!({"path": "/proc"})).await?;
    if !mode.strict() {
        return denied(&answer, &["ENOENT"], "/proc at chroot");
    }
    let names: Vec<String> = serde_json::from_value(answer["detail"].clone())?;
    ensure!(
        names
            .iter()
            .all(|n| n == "self" || n == "thread-self" || n.parse::<u32>().is_ok_and(|p| p < 100)),
        "/proc lists more than the session: {names:?}"
    );
    ensure!(
        names.contains(&"1".to_owned()),
        "control: own pid 1 visible: {names:?}"
    );
    for path in ["/proc/sys/kernel/hostname", "/proc/kcore"] {
        let answer = probe(&server, &a, "stat", json!({"path": path})).await?;
        denied(&answer, &["ENOENT"], path)?;
    }
    Ok(())
}

/// T15: the supervisor is invisible (strict) or untouchable (chroot).
pub async fn t15_supervisor(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let sup = server.pid();
    ensure!(pid_alive(sup), "control: supervisor alive");
    let answer = probe(&server, &a, "kill", json!({"pid": sup, "signal": 0})).await?;
    let expected = if mode.strict() { "ESRCH" } else { "EPERM" };
    denied(&answer, &[expected], "kill(supervisor, 0)")?;
    let answer = probe(
        &server,
        &a,
        "open",
        json!({"path": format!("/proc/{sup}/environ")}),
    )
    .await?;
    denied(&answer, &["ENOENT"], "/proc/<supervisor>/environ")?;
    let answer = probe(&server, &a, "ptrace", json!({"pid": sup})).await?;
    denied(&answer, &["EPERM"], "ptrace(supervisor)")?;
    let answer = probe(&server, &a, "process_vm_readv", json!({"pid": sup})).await?;
    denied(&answer, &["EPERM"], "process_vm_readv(supervisor)")?;
    Ok(())
}

/// T16: the rootless supervisor's environ and memory are unreadable to its own uid.
pub async fn t16_supervisor_not_dumpable(mode: Mode) -> Result<()> {
    if mode != Mode::Rootless {
        return skip("T16 is the rootless host-side check");
    }
    let server = start(mode).await?;
    let sup = server.pid().to_string();
    let (ok, _, _) = run_as(ROOTLESS_UID, "/bin/cat", &["/proc/self/environ"])?;
    ensure!(ok, "control: uid {ROOTLESS_UID} reads its own environ");
    for file in ["environ", "mem"] {
        let path = format!("/proc/{sup}/{file}");
        let (ok, _, err) = run_as(ROOTLESS_UID, "/usr/bin/head", &["-c", "16", &path])?;
        ensure!(
            !ok && err.contains("Permission denied"),
            "{path}: readable ({err})"
        );
    }
    Ok(())
}

/// T17–T20, T22: no network of any kind.
pub async fn t17_network(mode: Mode) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    // Control: the listener answers the test itself.
    std::net::TcpStream::connect(("127.0.0.1", port)).context("control connect")?;
    let server = start(mode).await?;
    let a = session(&server).await?;
    for p in [port, server.port()] {
        let answer = probe(
            &server,
            &a,
            "tcp_connect",
            json!({"host": "127.0.0.1", "port": p}),
        )
        .await?;
        denied(
            &answer,
            &["EPERM", "EAFNOSUPPORT", "ENETUNREACH"],
            "tcp to host loopback",
        )?;
    }
    let answer = probe(
        &server,
        &a,
        "udp_send",
        json!({"host": "8.8.8.8", "port": 53}),
    )
    .await?;
    denied(
        &answer,
        &["EPERM", "EAFNOSUPPORT", "ENETUNREACH"],
        "udp to 8.8.8.8",
    )?;
    let answer = probe(&server, &a, "resolve", json!({"name": "example.com"})).await?;
    ensure!(answer["ok"] == false, "name resolution worked: {answer}");
    for (domain, kind, what) in [
        (16, 3, "AF_NETLINK"),
        (17, 3, "AF_PACKET"),
        (2, 3, "AF_INET raw"),
        (40, 1, "AF_VSOCK"),
        (10, 1, "AF_INET6"),
    ] {
        let answer = probe(
            &server,
            &a,
            "socket",
            json!({"domain": domain, "type": kind}),
        )
        .await?;
        denied(&answer, &["EPERM"], what)?;
    }
    let unix = probe(&server, &a, "socket", json!({"domain": 1, "type": 1})).await?;
    ensure!(unix["ok"] == true, "control: AF_UNIX stays allowed: {unix}");
    let answer = probe(&server, &a, "io_uring", json!({})).await?;
    denied(&answer, &["EPERM"], "io_uring_setup")?;
    Ok(())
}

/// T21: an abstract Unix socket in the host namespace is out of reach.
pub async fn t21_abstract_socket(mode: Mode) -> Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("agentd-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    // Control: reachable from the test (same network namespace, no filter).
    std::os::unix::net::UnixStream::connect_addr(&addr).context("control connect")?;
    drop(listener.accept());
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "abstract_connect", json!({"name": name})).await?;
    let allowed: &[&str] = if mode.strict() {
        &["ECONNREFUSED", "EPERM"]
    } else {
        &["EPERM"]
    };
    denied(&answer, allowed, "connect to the host's abstract socket")?;
    Ok(())
}

/// T23: with commands on, programs have no network either.
pub async fn t23_command_network(mode: Mode) -> Result<()> {
    if !mode.strict() {
        return skip("T23: the chroot level has no commands");
    }
    if !Path::new("/bin/bash").exists() {
        return skip("T23: no bash on this host");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let server = start(mode).await?;
    let a = session(&server).await?;
    let script = format!("echo leak > /dev/tcp/127.0.0.1/{port}");
    let answer = probe(
        &server,
        &a,
        "exec",
        json!({"argv": ["/bin/bash", "-c", script]}),
    )
    .await?;
    ensure!(
        answer["detail"]["exit"] != 0,
        "bash reached the listener: {answer}"
    );
    ensure!(listener.accept().is_err(), "the listener got a connection");
    // Control: the same command tool does run programs.
    let ok = probe(
        &server,
        &a,
        "exec",
        json!({"argv": ["/bin/bash", "-c", "echo fine"]}),
    )
    .await?;
    ensure!(ok["detail"]["stdout"] == "fine\n", "control exec: {ok}");
    Ok(())
}

/// T24: our own binary cannot be written through `/proc/self/exe`.
pub async fn t24_exe(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let bin = e2e::supervisor_bin()?;
    let before = std::fs::metadata(&bin)?;
    let answer = probe(&server, &a, "exe_write", json!({})).await?;
    denied(
        &answer,
        &["EACCES", "ETXTBSY", "EPERM", "ENOENT", "EROFS"],
        "open /proc/self/exe for writing",
    )?;
    let after = std::fs::metadata(&bin)?;
    ensure!(
        before.len() == after.len() && before.modified()? == after.modified()?,
        "binary changed"
    );
    Ok(())
}

/// T25: the self-audit, and (where `/proc` is readable) the kernel's own view.
pub async fn t25_audit(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let (audit, _) = jail(&server, &a).await?;
    for key in [
        "cap_effective",
        "cap_permitted",
        "cap_inheritable",
        "cap_bounding",
        "cap_ambient",
    ] {
        ensure!(audit[key] == 0, "{key}: {audit}");
    }
    ensure!(audit["no_new_privs"] == true, "{audit}");
    ensure!(audit["seccomp_mode"] == 2, "{audit}");
    ensure!(audit["dumpable"] == false, "{audit}");
    ensure!(audit["parent_death_signal"] == 9, "{audit}");
    ensure!(audit["uids"][0] != 0 && audit["host_uid"] != 0, "{audit}");
    ensure!(audit["open_fds"] == json!([0, 1, 2, 3]), "{audit}");
    if mode == Mode::Rootless {
        ensure!(audit["host_uid"] == ROOTLESS_UID, "{audit}");
    }
    if mode.strict() {
        ensure!(audit["uids"] == json!([1000, 1000, 1000]), "{audit}");
        ensure!(audit["landlock"] == "fully-enforced", "{audit}");
        let status = probe(&server, &a, "read", json!({"path": "/proc/self/status"})).await?;
        let text = status["detail"].as_str().unwrap_or_default();
        for line in [
            "CapInh:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "CapAmb:\t0000000000000000",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
        ] {
            ensure!(
                text.contains(line),
                "/proc/self/status lacks {line:?}: {text}"
            );
        }
    }
    Ok(())
}

/// T26: no way back to privilege or into new namespaces.
pub async fn t26_no_new_namespaces(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    denied(
        &probe(&server, &a, "setuid0", json!({})).await?,
        &["EPERM", "EINVAL"],
        "setuid(0)",
    )?;
    denied(
        &probe(&server, &a, "unshare", json!({"flags": 0x1000_0000})).await?,
        &["EPERM"],
        "unshare(NEWUSER)",
    )?;
    denied(
        &probe(&server, &a, "clone_flags", json!({"flags": 0x1000_0000})).await?,
        &["EPERM"],
        "clone(NEWUSER)",
    )?;
    denied(
        &probe(&server, &a, "clone_flags", json!({"flags": 0x2000_0000})).await?,
        &["EPERM"],
        "clone(NEWPID)",
    )?;
    denied(
        &probe(&server, &a, "clone3", json!({})).await?,
        &["ENOSYS"],
        "clone3",
    )?;
    denied(
        &probe(&server, &a, "setns", json!({})).await?,
        &["EPERM"],
        "setns",
    )?;
    let plain = probe(&server, &a, "clone_flags", json!({"flags": 0})).await?;
    ensure!(plain["ok"] == true, "control: a plain fork works: {plain}");
    Ok(())
}

/// T27: terminal injection ioctls, also with high bits set.
pub async fn t27_tiocsti(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    for (request, what) in [
        (0x5412u64, "TIOCSTI"),
        ((1u64 << 32) | 0x5412, "TIOCSTI with bit 32"),
        (0x541C, "TIOCLINUX"),
    ] {
        denied(
            &probe(&server, &a, "ioctl", json!({"request": request})).await?,
            &["EPERM"],
            what,
        )?;
    }
    Ok(())
}

/// T28: the side-effect-free try-syscall list.
pub async fn t28_try_syscalls(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "try_syscalls", json!({})).await?;
    let results = answer["detail"].as_object().context("results")?;
    ensure!(results.len() == 9, "{answer}");
    for (name, errno) in results {
        ensure!(
            errno == "EPERM",
            "{name} got {errno} (the filter let it through)"
        );
    }
    Ok(())
}

/// x32 guard (§2.5.2): a syscall number with the x32 bit set kills the caller, whether or not
/// the kernel has the x32 ABI.
pub async fn t28_x32_guard(mode: Mode) -> Result<()> {
    if !cfg!(target_arch = "x86_64") {
        return skip("x32 exists only on x86_64");
    }
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(&server, &a, "x32", json!({})).await?;
    ensure!(
        answer["detail"]["signal"] == 31,
        "x32 call not killed by SIGSYS: {answer}"
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let config =
        std::fs::read_to_string(format!("/boot/config-{}", release.trim())).unwrap_or_default();
    if !config.contains("CONFIG_X86_X32_ABI=y") {
        note_skip(
            "native x32 syscalls: the kernel is not known to have CONFIG_X86_X32_ABI \
             (the guard itself was checked)",
        );
    }
    still_fine(&server, &a).await
}

/// T43: the worker swaps a directory and a symlink to `/etc` as fast as it can while the file
/// API is asked for the file beneath; no answer ever describes the host file.
pub async fn t43_file_api_race(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let ws = if mode.strict() { "/workspace" } else { "/" };
    let host_size = std::fs::metadata("/etc/passwd")?.len();
    let inside = "workspace copy\n".len() as u64;
    ensure!(host_size != inside, "control: sizes differ");
    let answer = probe(
        &server,
        &a,
        "flip",
        json!({"dir": ws, "target": "/etc", "secs": 8}),
    )
    .await?;
    ensure!(answer["ok"] == true, "flip: {answer}");
    let (mut inside_seen, mut refused) = (0, 0);
    for _ in 0..2000 {
        let r = server
            .get(&format!(
                "/api/v1/sessions/workspace/files?sessionId={a}&path=sub/passwd"
            ))
            .await?;
        match r.status {
            200 => {
                ensure!(r.json["size"] == inside, "host file described: {}", r.text);
                inside_seen += 1;
            }
            404 => refused += 1,
            other => bail!("unexpected {other}: {}", r.text),
        }
    }
    ensure!(inside_seen + refused == 2000, "answers");
    println!("race: {inside_seen} inside answers, {refused} refusals, 0 host answers");
    Ok(())
}

/// T48: a deep tree is listed, searched and deleted without trouble.
pub async fn t48_deep_tree(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let ws = if mode.strict() { "/workspace" } else { "/" };
    let made = probe(&server, &a, "mkdir_deep", json!({"path": ws, "n": 1000})).await?;
    ensure!(made["ok"] == true, "deep tree: {made}");
    let r = server
        .get(&format!(
            "/api/v1/sessions/workspace/search?sessionId={a}&q=d"
        ))
        .await?;
    ensure!(
        r.status == 200 && r.json["items"].as_array().is_some_and(|i| i.len() <= 20),
        "{}",
        r.text
    );
    let r = server
        .get(&format!(
            "/api/v1/sessions/workspace/files?sessionId={a}&path=d/d/d"
        ))
        .await?;
    ensure!(
        r.status == 200 && r.json["type"] == "directory",
        "{}",
        r.text
    );
    server.delete_session(&a).await?;
    // Removed in the background, after the delete has answered.
    wait_until(T, "deep workspace removed", async || {
        !server.workspace_root().join(&a).exists()
    })
    .await?;
    Ok(())
}

/// T29: `kill(-1, SIGKILL)` from inside harms nothing outside the session.
pub async fn t29_kill_all(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let b = session(&server).await?;
    let uid = host_uid(&server, &a).await?;
    let mut canary = canary(uid)?;
    let canary_pid = canary.id();
    ensure!(pid_alive(canary_pid), "control: canary alive");
    let (_, b_launcher) = jail(&server, &b).await?;
    let r = server
        .post_json(
            "/api/v1/debug/probe",
            &json!({"sessionId": a, "name": "kill_all", "args": {}}),
        )
        .await?;
    if mode.strict() {
        // PID 1 of the namespace is immune to kill(-1) from inside it: the worker answers.
        ensure!(
            r.status == 200 && r.json["ok"] == true,
            "kill_all: {}",
            r.text
        );
    }
    // At chroot the worker shares its uid and Landlock domain with the child, so kill(-1) may
    // take the session's own worker down (its own session only; that is the documented gap).
    ensure!(pid_alive(canary_pid), "the canary (uid {uid}) was killed");
    ensure!(pid_alive(server.pid()), "the supervisor was killed");
    ensure!(pid_alive(b_launcher), "session B was killed");
    still_fine(&server, &b).await?;
    let _ = canary.kill();
    let _ = canary.wait();
    Ok(())
}

/// T30: a worker cannot signal another session's processes.
pub async fn t30_kill_other(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let b = session(&server).await?;
    let (_, b_launcher) = jail(&server, &b).await?;
    let answer = probe(&server, &a, "kill", json!({"pid": b_launcher, "signal": 9})).await?;
    let expected = if mode.strict() { "ESRCH" } else { "EPERM" };
    denied(&answer, &[expected], "kill(B, SIGKILL)")?;
    still_fine(&server, &b).await
}

/// T31: a fork bomb stops at the process cap; everything else stays up.
pub async fn t31_fork_bomb(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let b = session(&server).await?;
    let answer = probe(&server, &a, "fork_bomb", json!({"limit": 100_000})).await?;
    let forked = answer["detail"]["forked"].as_u64().context("forked")?;
    ensure!(forked > 0 && forked < 64, "forked {forked}: {answer}");
    ensure!(errname(&answer) == "EAGAIN", "fork failure: {answer}");
    still_fine(&server, &b).await?;
    still_fine(&server, &a).await
}

/// T32: a double-forked daemon dies with its session.
pub async fn t32_daemon(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let uid = host_uid(&server, &a).await?;
    let answer = probe(&server, &a, "daemon", json!({})).await?;
    ensure!(answer["ok"] == true, "daemon: {answer}");
    let before = session_processes(&server, &a).await?;
    // strict: launcher, worker (PID 1 inside) and the daemon; chroot: the worker is the launcher.
    let expected = if mode.strict() { 3 } else { 2 };
    ensure!(
        before.len() >= expected,
        "control: the session's processes and the daemon on the host: {before:?}"
    );
    server.delete_session(&a).await?;
    wait_until(
        T,
        "every process of the deleted session is gone",
        async || before.iter().all(|p| !pid_alive(*p)),
    )
    .await?;
    if mode != Mode::Rootless {
        wait_until(T, "no process left with the session's uid", async || {
            processes_of_uid(uid).is_empty()
        })
        .await?;
    }
    Ok(())
}

/// T33: a memory bomb is stopped (OOM in the session's cgroup, or ENOMEM from RLIMIT_AS);
/// the supervisor and other sessions are unaffected.
pub async fn t33_memory_bomb(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let b = session(&server).await?;
    let answer = probe(
        &server,
        &a,
        "memory_bomb",
        json!({"max_mb": 10_240, "step_mb": 64}),
    )
    .await?;
    let touched = answer["detail"]["touchedMb"].as_u64().unwrap_or(u64::MAX);
    let child = &answer["detail"]["child"];
    ensure!(
        touched <= 1024 && (child["signal"] == 9 || child["exit"] == 2),
        "memory bomb not stopped: {answer}"
    );
    still_fine(&server, &b).await
}

/// T33 (run level): when the worker itself hits the memory limit, its run ends with an error
/// event that names the limit.
pub async fn t33_limit_ends_run(mode: Mode) -> Result<()> {
    if mode == Mode::Rootless {
        return skip("T33 run end: no memory cgroup without root (rlimits only)");
    }
    let server = start(mode).await?;
    let a = session(&server).await?;
    let mut stream = server.stream(&a, "SLOW 400").await?;
    stream.read_deltas(1, T).await?;
    let r = server
        .post_json(
            "/api/v1/debug/probe",
            &json!({"sessionId": a, "name": "alloc_here", "args": {"mb": 1024}}),
        )
        .await?;
    ensure!(
        r.status != 200,
        "the worker survived 1 GiB under a 256 MiB limit: {}",
        r.text
    );
    let frames = stream.collect_until_end(LONG).await?;
    let system = frames
        .iter()
        .rev()
        .find(|f| f.ty() == "system")
        .with_context(|| format!("no system event: {:?}", e2e::types(&frames)))?;
    let message = system.data["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("resource limit") && message.contains("memory"),
        "error event does not name the limit: {message}"
    );
    let metrics = server.get("/metrics").await?.text;
    ensure!(
        metrics
            .lines()
            .any(|l| l == "agent_worker_oom_kills_total 1"),
        "the OOM kill is counted in /metrics"
    );
    let end = frames.last().context("no frames")?;
    ensure!(
        end.ty() == "agent_run_end" && end.data["status"] == "error",
        "{:?}",
        end.data
    );
    // The session recovers with a fresh worker.
    let r = server.query(&a, "after").await?;
    ensure!(r["content"] == "echo: after", "{r}");
    Ok(())
}

/// T34: `RLIMIT_FSIZE` stops one file at exactly its size; the worker lives on.
pub async fn t34_file_size(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let path = if mode.strict() {
        "/workspace/big"
    } else {
        "/big"
    };
    let answer = probe(
        &server,
        &a,
        "write",
        json!({"path": path, "bytes": 200u64 << 20, "remove": true}),
    )
    .await?;
    ensure!(errname(&answer) == "EFBIG", "{answer}");
    ensure!(answer["detail"]["written"] == 100u64 << 20, "{answer}");
    still_fine(&server, &a).await
}

/// A filesystem the test makes for a server's workspaces and its SQLite store: a sparse file,
/// formatted and loop-mounted, so that filling it cannot touch the host's disk. Unmounted (with
/// whatever the server left mounted inside) when dropped.
pub struct LoopFs {
    pub dir: tempfile::TempDir,
    pub mnt: std::path::PathBuf,
}

impl LoopFs {
    /// `mkfs_args` go to mkfs.ext4 (quota features), `options` to mount.
    pub fn new(
        size_mib: u64,
        mkfs_args: &[&str],
        options: &str,
    ) -> Result<std::result::Result<Self, String>> {
        let dir = tempfile::Builder::new().prefix("e2e-loopfs-").tempdir()?;
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)?.set_len(size_mib << 20)?;
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(mkfs_args)
            .arg(&image)
            .output()?;
        ensure!(
            mkfs.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        let mount = std::process::Command::new("mount")
            .args(["-o", &format!("loop,{options}")])
            .arg(&image)
            .arg(&mnt)
            .output()?;
        if !mount.status.success() {
            return Ok(Err(String::from_utf8_lossy(&mount.stderr)
                .trim()
                .to_owned()));
        }
        Ok(Ok(Self { dir, mnt }))
    }

    /// Bytes free on the test's filesystem.
    pub fn available(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.mnt)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        e2e::detach_mounts_under(&self.mnt);
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A catalogue server whose workspaces and SQLite store are on `fs`, with a 64 MiB disk quota.
fn quota_opts(mode: Mode, fs: &LoopFs) -> ServerOpts {
    opts(
        mode,
        json!({
            "workspace": fs.mnt.join("ws"),
            "server": {"storage": {"type": "sqlite", "path": fs.mnt.join("data/sessions.db")}},
            "isolation": {"limits": {"disk": "64MiB"}},
        }),
    )
    .without_workspace_flag()
}

const QUOTA_NOTE: &str = "No space left on device: the session's disk quota of 64 MiB is reached";

/// Writes 50 MiB files into `sid`'s workspace until one fails; returns the bytes written and
/// the failure's errno name.
async fn fill(server: &Server, sid: &str, mode: Mode) -> Result<(u64, String)> {
    let dir = if mode.strict() { "/workspace" } else { "" };
    let mut total = 0;
    for n in 0..8 {
        let answer = probe(
            server,
            sid,
            "write",
            json!({"path": format!("{dir}/fill-{n}"), "bytes": 50u64 << 20}),
        )
        .await?;
        total += answer["detail"]["written"].as_u64().unwrap_or(0);
        if answer["ok"] == false {
            return Ok((total, errname(&answer).to_owned()));
        }
    }
    Ok((total, String::new()))
}

/// The `tool_result` event of one `TOOL <name> <args>` query.
async fn tool_result(server: &Server, sid: &str, name: &str, args: Value) -> Result<Value> {
    server.query(sid, &format!("TOOL {name} {args}")).await?;
    let events = server.events(sid).await?;
    events
        .iter()
        .rev()
        .find(|e| e["type"] == "tool_result")
        .cloned()
        .with_context(|| format!("no tool_result: {events:?}"))
}

/// T35: a session fills its workspace; the kernel stops it at the disk quota with `ENOSPC`,
/// which the file tools and `run_command` report as the quota; another session and the SQLite
/// store on the same filesystem keep working; a deleted session's image is released.
pub async fn t35_workspace_quota(mode: Mode) -> Result<()> {
    if mode == Mode::Rootless {
        let server = start(mode).await?;
        let disk = &server.get_ok("/api/v1/system/health").await?["isolation"]["disk"];
        ensure!(
            disk["backend"] == "none"
                && disk["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("rootless")),
            "a rootless server reports no disk quota and why: {disk}"
        );
        return skip(
            "T35 rootless: an unprivileged server can neither set project quotas nor mount images (health says so)",
        );
    }
    let fs = match LoopFs::new(1024, &[], "")? {
        Ok(fs) => fs,
        Err(e) => return fail(&format!("cannot loop-mount a test filesystem: {e}")),
    };
    let server = Server::start(quota_opts(mode, &fs)).await?;
    let disk = server.get_ok("/api/v1/system/health").await?["isolation"]["disk"].clone();
    ensure!(
        disk["backend"] == "image" && disk["limit"] == 64u64 << 20,
        "health: {disk}"
    );
    let a = session(&server).await?;
    let b = session(&server).await?;

    let (written, errno) = fill(&server, &a, mode).await?;
    ensure!(
        errno == "ENOSPC" || errno == "EDQUOT",
        "filling stopped with {errno:?} after {written} bytes"
    );
    ensure!(
        ((60 << 20)..=(68 << 20)).contains(&written),
        "the quota is 64 MiB, {written} bytes were written"
    );
    // The file tool says which quota it ran into.
    let content = "x".repeat(256 * 1024);
    let result = tool_result(
        &server,
        &a,
        "write_file",
        json!({"path": "more.txt", "content": content}),
    )
    .await?;
    ensure!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains(QUOTA_NOTE)),
        "write_file on a full workspace: {result}"
    );
    if mode.strict() {
        let result = tool_result(
            &server,
            &a,
            "run_command",
            json!({"command": "dd if=/dev/zero of=more.bin bs=1M count=8"}),
        )
        .await?;
        let text = result["content"].to_string();
        ensure!(
            text.contains("No space left on device") && text.contains(QUOTA_NOTE),
            "run_command on a full workspace: {result}"
        );
    }
    // Another session, the store and the host's (here: the test's) filesystem are fine.
    let (b_written, b_errno) = {
        let dir = if mode.strict() { "/workspace" } else { "" };
        let answer = probe(
            &server,
            &b,
            "write",
            json!({"path": format!("{dir}/b"), "bytes": 20u64 << 20}),
        )
        .await?;
        (
            answer["detail"]["written"].as_u64().unwrap_or(0),
            errname(&answer).to_owned(),
        )
    };
    ensure!(
        b_written == 20 << 20,
        "session B could not write: {b_errno}"
    );
    still_fine(&server, &b).await?;
    let events = server.events(&b).await?;
    ensure!(
        events.iter().any(|e| e["content"] == "still there"),
        "B's last query is in the SQLite store"
    );
    ensure!(
        fs.available()? > 700 << 20,
        "the filesystem outside the images kept its space"
    );

    // Deleting A releases its image.
    let ws_a = fs.mnt.join("ws").join(&a);
    ensure!(
        e2e::mounts_under(&fs.mnt.join("ws")).contains(&ws_a),
        "control: A's image is mounted"
    );
    server.delete_session(&a).await?;
    // Released in the background, after the delete has answered.
    wait_until(T, "A's image unmounted and removed", async || {
        !e2e::mounts_under(&fs.mnt.join("ws")).contains(&ws_a)
            && !fs.mnt.join(format!("ws/.disk/{a}.img")).exists()
    })
    .await?;
    Ok(())
}

/// T35 across restarts: a session keeps its quota and its files when the server restarts, also
/// after a reboot took its mount away (simulated by detaching it).
pub async fn t35_quota_survives_restart(mode: Mode) -> Result<()> {
    if mode == Mode::Rootless {
        return skip("T35 rootless: no disk quota backend without root (see t35_workspace_quota)");
    }
    let fs = match LoopFs::new(1024, &[], "")? {
        Ok(fs) => fs,
        Err(e) => return fail(&format!("cannot loop-mount a test filesystem: {e}")),
    };
    let dir = if mode.strict() { "/workspace" } else { "" };
    let a = {
        let server = Server::start(quota_opts(mode, &fs)).await?;
        let a = session(&server).await?;
        let answer = probe(
            &server,
            &a,
            "write",
            json!({"path": format!("{dir}/kept"), "bytes": 1u64 << 20}),
        )
        .await?;
        ensure!(answer["ok"] == true, "{answer}");
        server.kill9()?;
        a
    };
    // As after a reboot: the image is no longer mounted.
    let ws = fs.mnt.join("ws");
    e2e::detach_mounts_under(&ws);
    ensure!(
        e2e::mounts_under(&ws).is_empty(),
        "control: nothing mounted"
    );
    let server = Server::start(quota_opts(mode, &fs)).await?;
    let listed = server
        .get_ok(&format!(
            "/api/v1/sessions/workspace/files?sessionId={a}&path=kept"
        ))
        .await;
    ensure!(
        listed.is_ok(),
        "the file written before the restart is back: {listed:?}"
    );
    let r = server.query(&a, "after the restart").await?;
    ensure!(r["content"] == "echo: after the restart", "{r}");
    let (written, errno) = fill(&server, &a, mode).await?;
    ensure!(
        (errno == "ENOSPC" || errno == "EDQUOT") && written <= 64 << 20,
        "after the restart: {written} bytes, {errno:?}"
    );
    Ok(())
}

/// T35 with project quotas: the workspace root on ext4 with the quota and project features,
/// mounted with `prjquota`. Kernels built without quota support refuse such a mount; then there
/// is nothing to test.
pub async fn t35_project_quota(mode: Mode) -> Result<()> {
    if mode == Mode::Rootless {
        return skip("T35 project quotas: setting them needs root");
    }
    let fs = match LoopFs::new(512, &["-O", "quota,project", "-I", "256"], "prjquota")? {
        Ok(fs) => fs,
        Err(e) => {
            return skip(&format!(
                "T35 project quotas: this kernel cannot mount ext4 with prjquota ({e}; it needs CONFIG_QUOTA and CONFIG_QFMT_V2)"
            ));
        }
    };
    let server = Server::start(quota_opts(mode, &fs)).await?;
    let disk = server.get_ok("/api/v1/system/health").await?["isolation"]["disk"].clone();
    ensure!(disk["backend"] == "project", "health: {disk}");
    let a = session(&server).await?;
    let b = session(&server).await?;
    let (written, errno) = fill(&server, &a, mode).await?;
    ensure!(
        (errno == "EDQUOT" || errno == "ENOSPC") && written <= 64 << 20,
        "{written} bytes, {errno:?}"
    );
    still_fine(&server, &b).await
}

/// Totals: the sessions' parent cgroup carries the configured totals (read back from its
/// files), the supervisor is not under it, and admission refuses the worker that would commit
/// more memory than the total, changing nothing.
pub async fn t33_totals(mode: Mode) -> Result<()> {
    let server = start_with(
        mode,
        json!({"isolation": {"limits": {"totalMemory": "512MiB", "totalPids": 1000}}}),
    )
    .await?;
    let totals = server.get_ok("/api/v1/system/health").await?["isolation"]["totals"].clone();
    ensure!(
        totals["memory"] == 512u64 << 20 && totals["pids"] == 1000,
        "health: {totals}"
    );
    let a = session(&server).await?;
    let b = session(&server).await?;
    if mode != Mode::Rootless {
        let (_, launcher) = jail(&server, &a).await?;
        let groups = std::fs::read_to_string(format!("/proc/{launcher}/cgroup"))?;
        let parent_of = |controller: &str| -> Result<std::path::PathBuf> {
            let path = groups
                .lines()
                .find_map(|l| {
                    l.split_once(&format!(":{controller}:"))
                        .map(|(_, p)| p.to_owned())
                })
                .with_context(|| format!("no {controller} group: {groups}"))?;
            let session_group = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'));
            Ok(session_group.parent().context("no parent")?.to_owned())
        };
        let memory = std::fs::read_to_string(parent_of("memory")?.join("memory.limit_in_bytes"))?;
        let pids = std::fs::read_to_string(parent_of("pids")?.join("pids.max"))?;
        ensure!(
            memory.trim() == (512u64 << 20).to_string(),
            "parent memory.limit_in_bytes {memory}"
        );
        ensure!(pids.trim() == "1000", "parent pids.max {pids}");
        let capped = format!("agentd-{}", server.pid());
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", server.pid()))?;
        ensure!(
            own.lines()
                .all(|l| !l.split('/').any(|part| part == capped)),
            "the supervisor is inside its sessions' capped group: {own}"
        );
    }
    // Two sessions of 256 MiB commit the 512 MiB: with both running, a third is refused.
    let mut stream_a = server.stream(&a, "SLOW 400").await?;
    stream_a.read_deltas(1, T).await?;
    let mut stream_b = server.stream(&b, "SLOW 400").await?;
    stream_b.read_deltas(1, T).await?;
    let c = server.create_session().await?;
    let refused = server
        .post_json(
            "/api/v1/sessions/query",
            &json!({"sessionId": c, "query": "hi"}),
        )
        .await?;
    refused.expect_error(429, "SERVER_OVERLOADED", "a third worker past totalMemory")?;
    ensure!(
        refused.text.contains("totalMemory"),
        "the refusal names the limit: {}",
        refused.text
    );
    ensure!(
        server.worker_pid(&c).await?.is_none(),
        "the refused session got a worker"
    );
    ensure!(
        server.events(&c).await?.is_empty(),
        "the refused query left events"
    );
    ensure!(server.abort(&a).await?);
    stream_a.collect_until_end(LONG).await?;
    let r = server.query(&c, "now").await?;
    ensure!(r["content"] == "echo: now", "{r}");
    ensure!(server.abort(&b).await?);
    stream_b.collect_until_end(LONG).await?;
    Ok(())
}

/// FNV-1a of a session id, as the old uid slot hash computed it.
fn old_uid_slot(id: &str, slots: u64) -> u64 {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h % slots
}

/// The real uid of a host process.
fn uid_of(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .context("no Uid line")
}

/// S1: with two uids for sessions, two sessions that the old hash put on the same uid get
/// different ones, recorded: after a restart on SQLite each has its own again, and a third
/// session is refused rather than given a taken uid.
pub async fn s1_unique_uids(mode: Mode) -> Result<()> {
    if mode == Mode::Rootless {
        return skip("S1: rootless sessions all run as the server's uid (documented)");
    }
    let dir = tempfile::tempdir()?;
    let options = || {
        opts(
            mode,
            json!({
                "workspace": dir.path().join("ws"),
                "server": {"storage": {"type": "sqlite", "path": dir.path().join("sessions.db")}},
                "isolation": {"uidBase": 300_000, "uidCount": 3},
            }),
        )
        .without_workspace_flag()
    };
    let mut server = Server::start(options()).await?;
    let a = server.create_session().await?;
    let mut b = None;
    for _ in 0..40 {
        let x = server.create_session().await?;
        if old_uid_slot(&x, 2) == old_uid_slot(&a, 2) {
            b = Some(x);
            break;
        }
        server.delete_session(&x).await?;
    }
    let b = b.context("no session id shared A's old uid slot in 40 tries")?;
    let uids = async |server: &Server| -> Result<(u32, u32)> {
        server.query(&a, "hello").await?;
        server.query(&b, "hello").await?;
        let ua = uid_of(server.wait_worker_pid(&a).await?)?;
        let ub = uid_of(server.wait_worker_pid(&b).await?)?;
        Ok((ua, ub))
    };
    let (ua, ub) = uids(&server).await?;
    ensure!(ua != ub, "A and B share host uid {ua}");
    for uid in [ua, ub] {
        ensure!(
            uid == 300_001 || uid == 300_002,
            "uid {uid} outside the range"
        );
    }
    let refused = server
        .post_json("/api/v1/sessions/create", &json!({}))
        .await?;
    ensure!(
        refused.status == 503 && refused.text.contains("uidCount"),
        "a third session while both uids are taken: {} {}",
        refused.status,
        refused.text
    );
    server.kill9()?;
    server.wait_exit(T).await;
    drop(server);
    let server = Server::start(options()).await?;
    ensure!(
        uids(&server).await? == (ua, ub),
        "the uids changed across the restart"
    );
    Ok(())
}

/// T36: `/tmp` is a sized tmpfs.
pub async fn t36_tmp_full(mode: Mode) -> Result<()> {
    if !mode.strict() {
        return skip("T36: the chroot level has no /tmp tmpfs");
    }
    let server = start(mode).await?;
    let a = session(&server).await?;
    let answer = probe(
        &server,
        &a,
        "write",
        json!({"path": "/tmp/fill", "bytes": 64u64 << 20}),
    )
    .await?;
    ensure!(errname(&answer) == "ENOSPC", "{answer}");
    let written = answer["detail"]["written"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        written <= 8 << 20,
        "wrote {written} bytes into an 8 MiB /tmp"
    );
    Ok(())
}

/// T39–T42, T44, T45, T47, T49: the file API never leaves the workspace and never hangs.
pub async fn t39_file_api(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let a = session(&server).await?;
    let ws = if mode.strict() { "/workspace" } else { "" };
    let host_passwd = std::fs::read_to_string("/etc/passwd")?;
    ensure!(host_passwd.contains("root:"), "control: host passwd");
    for (target, link) in [
        ("/etc/shadow", "evil"),
        ("/etc", "etcdir"),
        ("../../../../etc/passwd", "rel"),
        ("/etc/passwd", "evil.txt"),
        ("/", "y"),
    ] {
        let made = probe(
            &server,
            &a,
            "symlink",
            json!({"target": target, "link": format!("{ws}/{link}")}),
        )
        .await?;
        ensure!(made["ok"] == true, "symlink {link}: {made}");
    }
    std::fs::write(
        server.workspace_root().join(&a).join("inside.txt"),
        "inside",
    )?;
    let api = |path: &str| format!("/api/v1/sessions/workspace/files?sessionId={a}&path={path}");
    // Control: a real file is served.
    let r = server.get(&api("inside.txt")).await?;
    ensure!(
        r.status == 200 && r.json["size"] == 6,
        "control: {}",
        r.text
    );
    let r = server.get(&format!("/inside.txt?sessionId={a}")).await?;
    ensure!(
        r.status == 200 && r.text == "inside",
        "control static: {}",
        r.text
    );
    for path in ["evil", "etcdir/passwd", "rel", "y/etc/passwd"] {
        let r = server.get(&api(path)).await?;
        ensure!(
            r.status == 404 && !r.text.contains("root:"),
            "{path}: {} {}",
            r.status,
            r.text
        );
    }
    let r = server.get(&format!("/evil.txt?sessionId={a}")).await?;
    ensure!(
        r.status == 404 && !r.text.contains("root:"),
        "static evil.txt: {} {}",
        r.status,
        r.text
    );
    // T42: bad request paths.
    for path in [
        "../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "a%00b",
        "a%5C..%5Cb",
    ] {
        let r = server.get(&api(path)).await?;
        ensure!(r.status == 400, "{path}: {} {}", r.status, r.text);
    }
    // A leading `/` is the workspace root (upstream clients send `/`-rooted paths).
    let r = server.get(&api("/etc/passwd")).await?;
    ensure!(
        r.status == 404 && !r.text.contains("root:"),
        "/etc/passwd: {}",
        r.text
    );
    // T44/T45: a FIFO, a socket and a device node are refused without hanging.
    let made = probe(
        &server,
        &a,
        "mkfifo",
        json!({"path": format!("{ws}/pipe.fifo")}),
    )
    .await?;
    ensure!(made["ok"] == true, "mkfifo: {made}");
    if mode.strict() {
        let made = probe(
            &server,
            &a,
            "unix_socket_file",
            json!({"path": format!("{ws}/sock.s")}),
        )
        .await?;
        ensure!(made["ok"] == true, "socket file: {made}");
    } else {
        // `bind` is refused at chroot (seccomp); the file is planted from the host instead.
        let listener = std::os::unix::net::UnixListener::bind(
            server.workspace_root().join(&a).join("sock.s"),
        )?;
        std::mem::forget(listener);
    }
    nix::sys::stat::mknod(
        &server.workspace_root().join(&a).join("dev.null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )?;
    for name in ["pipe.fifo", "sock.s", "dev.null"] {
        let r = server.get(&format!("/{name}?sessionId={a}")).await?;
        ensure!(
            (400..500).contains(&r.status),
            "static {name}: {}",
            r.status
        );
        let r = server.get(&api(name)).await?;
        ensure!(
            r.status == 400 && r.code() == Some("INVALID_PATH_TYPE"),
            "files {name}: {}",
            r.text
        );
    }
    // T47: a sparse 1 TiB file is refused by size, not read.
    let big = std::fs::File::create(server.workspace_root().join(&a).join("big.bin"))?;
    big.set_len(1 << 40)?;
    let r = server.get(&format!("/big.bin?sessionId={a}")).await?;
    ensure!(
        r.status == 413,
        "sparse 1 TiB: {} {}",
        r.status,
        r.text.len()
    );
    // validate reports escapes per entry.
    let r = server
        .post_json(
            &format!("/api/v1/sessions/workspace/validate?sessionId={a}"),
            &json!({"paths": ["inside.txt", "../x", "evil", "nope"]}),
        )
        .await?;
    let results = &r.json["results"];
    ensure!(
        results[0]["exists"] == true && results[1]["error"] == "Path outside workspace",
        "{r:?}"
    );
    ensure!(
        results[2]["exists"] == false && results[3]["exists"] == false,
        "{}",
        r.text
    );
    // T49: deleting the session removes only the workspace.
    server.delete_session(&a).await?;
    // Removed in the background, after the delete has answered.
    wait_until(T, "workspace removed", async || {
        !server.workspace_root().join(&a).exists()
    })
    .await?;
    ensure!(
        Path::new("/etc/passwd").exists() && std::fs::read_to_string("/etc/passwd")? == host_passwd,
        "/etc changed"
    );
    Ok(())
}

/// T51/T52: garbage on fd 3 kills only the session that sent it.
pub async fn t51_bad_frames(mode: Mode) -> Result<()> {
    let server = start(mode).await?;
    let b = session(&server).await?;
    let rss_before = vm_rss_kib(server.pid());
    for args in [
        json!({"prefix": 0xffff_ffffu64}),
        json!({"random": 1 << 20}),
    ] {
        let a = session(&server).await?;
        let (_, launcher) = jail(&server, &a).await?;
        let r = server
            .post_json(
                "/api/v1/debug/probe",
                &json!({"sessionId": a, "name": "raw", "args": args}),
            )
            .await?;
        // The probe's own answer may or may not make it out before the kill.
        let _ = r;
        wait_until(T, "the offending worker is killed", async || {
            !pid_alive(launcher)
        })
        .await?;
        ensure!(server.logs().contains("bad frame"), "no bad-frame log line");
        still_fine(&server, &b).await?;
    }
    let rss_after = vm_rss_kib(server.pid());
    ensure!(
        rss_after.saturating_sub(rss_before) < 10 * 1024,
        "supervisor RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    Ok(())
}

/// T54: a hostile worker pouring well-formed events into its session through the real channel
/// is stopped at the session limits: first at the stored-bytes cap (the log stops growing
/// there), then, in another session, at the event rate. Each time only the flooding session's
/// run ends, with an error naming the limit; the supervisor and other sessions carry on.
pub async fn t54_event_flood(mode: Mode) -> Result<()> {
    const CAP: usize = 256 * 1024;
    let server = start_with(
        mode,
        json!({"server": {"sessionLimits": {"eventsPerSecond": 1000, "storedBytes": CAP}}}),
    )
    .await?;
    let bystander = session(&server).await?;
    for (args, limit) in [
        (json!({"count": 400, "bytes": 1024}), "storedBytes"),
        (json!({"count": 100_000, "bytes": 10}), "eventsPerSecond"),
    ] {
        let sid = session(&server).await?;
        let (_, launcher) = jail(&server, &sid).await?;
        let mut stream = server.stream(&sid, "SLOW 400").await?;
        stream.read_deltas(1, T).await?;
        // The probe's own answer may or may not make it out before the kill.
        let _ = server
            .post_json(
                "/api/v1/debug/probe",
                &json!({"sessionId": sid, "name": "events", "args": args}),
            )
            .await?;
        let frames = stream
            .collect_until_end(LONG)
            .await
            .map_err(|e| with_logs(&server, e))?;
        let n = frames.len();
        ensure!(n >= 2, "frames: {:?}", e2e::types(&frames));
        let (system, end) = (&frames[n - 2].data, &frames[n - 1].data);
        ensure!(
            system["type"] == "system"
                && system["level"] == "error"
                && system["details"]["limit"] == limit,
            "the run ends naming {limit}: {system}"
        );
        ensure!(
            end["type"] == "agent_run_end" && end["status"] == "error",
            "{end}"
        );
        wait_until(T, "the flooding worker is stopped", async || {
            !pid_alive(launcher)
        })
        .await?;
        let stored = server.events(&sid).await?;
        // What the server stores of each event: its JSON without the `seq` the API adds to it
        // (some 10 bytes an event, over 2 KiB for a session of 1 KiB events at the cap).
        let bytes: usize = stored
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if let Some(fields) = e.as_object_mut() {
                    fields.remove("seq");
                }
                e.to_string().len()
            })
            .sum();
        ensure!(
            bytes <= CAP + 2048,
            "{bytes} bytes stored past the cap of {CAP}"
        );
        if limit == "storedBytes" {
            ensure!(
                bytes > CAP / 2,
                "the flood was stored up to the cap ({bytes} bytes)"
            );
        }
        still_fine(&server, &bystander).await?;
    }
    Ok(())
}

/// T55: SIGKILL of the supervisor takes every launcher and worker with it.
pub async fn t55_supervisor_killed(mode: Mode) -> Result<()> {
    let mut server = start(mode).await?;
    let a = session(&server).await?;
    let b = session(&server).await?;
    let mut pids = session_processes(&server, &a).await?;
    pids.extend(session_processes(&server, &b).await?);
    ensure!(
        pids.len() >= 2,
        "control: session processes visible: {pids:?}"
    );
    server.kill9()?;
    ensure!(
        server.wait_exit(T).await.is_some(),
        "supervisor still running"
    );
    for pid in pids {
        wait_until(T, &format!("session process {pid} gone"), async || {
            !pid_alive(pid)
        })
        .await?;
    }
    Ok(())
}

/// Generates one `#[tokio::test]` per catalogue entry for `$mode`.
#[macro_export]
macro_rules! catalogue {
    // The one list of the catalogue, run in every mode: a test cannot be left out of a mode.
    ($mode:expr) => {
        catalogue!($mode;
    t01_other_workspace,
    t02_dotdot,
    t03_double_chroot,
    t04_leaked_fd,
    t05_proc_fd_cwd,
    t06_read_only_root,
    t07_host_secrets,
    t08_devices,
    t09_setuid,
    t10_mounts,
    t11_hard_links,
    t12_environment,
    t13_secrets,
    t14_proc,
    t15_supervisor,
    t16_supervisor_not_dumpable,
    t17_network,
    t21_abstract_socket,
    t23_command_network,
    t24_exe,
    t25_audit,
    t26_no_new_namespaces,
    t27_tiocsti,
    t28_try_syscalls,
    t28_x32_guard,
    t29_kill_all,
    t30_kill_other,
    t31_fork_bomb,
    t32_daemon,
    t33_memory_bomb,
    t33_limit_ends_run,
    t34_file_size,
    t33_totals,
    t35_workspace_quota,
    t35_quota_survives_restart,
    t35_project_quota,
    t36_tmp_full,
    s1_unique_uids,
    t39_file_api,
    t43_file_api_race,
    t48_deep_tree,
    t51_bad_frames,
    t54_event_flood,
    t55_supervisor_killed,
        );
    };
    ($mode:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                isolation_support::$name($mode).await
            }
        )*
    };
}

/// Fails with the server's logs attached.
pub fn with_logs(server: &Server, e: anyhow::Error) -> anyhow::Error {
    e.context(format!("--- server logs ---\n{}", server.logs()))
}

pub fn fail(message: &str) -> Result<()> {
    bail!("{message}")
}
