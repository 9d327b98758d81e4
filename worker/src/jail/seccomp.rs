//! seccomp: the last jail step, a deny-list with default allow.
//!
//! Three filters, installed back to back (the kernel runs every stacked filter and the strictest
//! verdict wins; the groups do not overlap): a hand-written x32 guard, an `ENOSYS` group for
//! calls whose flags seccomp cannot see, and the `EPERM` deny-list. `EPERM` rather than a kill,
//! so tools fail cleanly and tests can observe the errno. Anything not named stays allowed: the
//! worker's own syscalls vary with glibc and tokio versions, and an allow-list would break on
//! upgrades (codex, Polkadot's PVF workers and Flatpak take the same route).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};
use shared::jail::JailLevel;

use super::JailError;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// Every `CLONE_NEW*` flag (`CLONE_NEWTIME` included): `clone` with any of them is refused.
const CLONE_NEW_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    0x80, // CLONE_NEWTIME
];

fn err(e: impl std::fmt::Display) -> JailError {
    JailError::Seccomp(e.to_string())
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, len, op, value).map_err(err)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conditions).map_err(err)
}

/// The x32 guard: syscall numbers with bit 30 set are the x32 ABI, which shares the x86_64 arch
/// value and would walk around a deny-list keyed on x86_64 numbers. seccompiler does not check
/// this, so four instructions do: load nr, compare, kill or allow.
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    vec![
        // A = seccomp_data.nr (offset 0)
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // if A >= X32_SYSCALL_BIT goto kill else goto allow
        sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_KILL_PROCESS,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ]
}

/// Calls answered with `ENOSYS`: `clone3` keeps its flags in memory where seccomp cannot look
/// (glibc falls back to `clone`, whose flags we can check), and the new mount API.
fn enosys_group() -> BTreeMap<i64, Vec<SeccompRule>> {
    [
        libc::SYS_clone3,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect()
}

/// Calls refused outright (empty rule list = always).
fn always_denied() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_acct,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_syslog,
        libc::SYS_quotactl,
        libc::SYS_mbind,
        libc::SYS_migrate_pages,
        libc::SYS_move_pages,
        libc::SYS_set_mempolicy,
        libc::SYS_get_mempolicy,
        libc::SYS_fanotify_init,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_uselib, libc::SYS_modify_ldt]);
    calls
}

/// The `EPERM` deny-list, plus the `chroot`-level extras (no network namespace there,
/// and seccomp cannot look inside a `sockaddr`, so `connect` itself must go; shared IPC namespace).
fn eperm_group(level: JailLevel) -> Result<BTreeMap<i64, Vec<SeccompRule>>, JailError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = always_denied()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();

    // clone with any namespace flag: one masked-equality rule per bit.
    let clone_rules = CLONE_NEW_FLAGS
        .iter()
        .map(|&bit| rule(vec![cond(0, Qword, SeccompCmpOp::MaskedEq(bit), bit)?]))
        .collect::<Result<Vec<_>, _>>()?;
    map.insert(libc::SYS_clone, clone_rules);

    // Device nodes: the file-type bits of the mode are S_IFCHR or S_IFBLK (FIFOs stay allowed,
    // GNU make's jobserver uses one).
    let device_rules = |arg: u8| -> Result<Vec<SeccompRule>, JailError> {
        [libc::S_IFCHR, libc::S_IFBLK]
            .into_iter()
            .map(|kind| {
                rule(vec![cond(
                    arg,
                    Dword,
                    SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
                    u64::from(kind),
                )?])
            })
            .collect()
    };
    #[cfg(target_arch = "x86_64")]
    map.insert(libc::SYS_mknod, device_rules(1)?);
    map.insert(libc::SYS_mknodat, device_rules(2)?);

    // Terminal injection: compared on the low 32 bits only, so high bits cannot hide the value
    // (CVE-2019-10063).
    map.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![cond(
                1,
                Dword,
                SeccompCmpOp::Eq,
                u64::from(libc::TIOCSTI as u32),
            )?])?,
            rule(vec![cond(
                1,
                Dword,
                SeccompCmpOp::Eq,
                u64::from(libc::TIOCLINUX as u32),
            )?])?,
        ],
    );

    // Sockets: AF_UNIX only (the channel is inherited; nothing else is needed).
    let not_unix = || {
        rule(vec![cond(
            0,
            Dword,
            SeccompCmpOp::Ne,
            libc::AF_UNIX as u64,
        )?])
    };
    map.insert(libc::SYS_socket, vec![not_unix()?]);
    map.insert(libc::SYS_socketpair, vec![not_unix()?]);

    // personality: only the query (0xffffffff) and the default persona (0).
    map.insert(
        libc::SYS_personality,
        vec![rule(vec![
            cond(0, Dword, SeccompCmpOp::Ne, 0)?,
            cond(0, Dword, SeccompCmpOp::Ne, 0xffff_ffff)?,
        ])?],
    );

    if level == JailLevel::Chroot {
        for nr in [
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_shmget,
            libc::SYS_msgget,
            libc::SYS_semget,
        ] {
            map.insert(nr, Vec::new());
        }
    }
    Ok(map)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_match: SeccompAction,
) -> Result<BpfProgram, JailError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, on_match, ARCH).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The compiled filters of `level`, in installation order.
pub(crate) fn programs(level: JailLevel) -> Result<Vec<BpfProgram>, JailError> {
    let enosys = compile(enosys_group(), SeccompAction::Errno(libc::ENOSYS as u32))?;
    let eperm = compile(
        eperm_group(level)?,
        SeccompAction::Errno(libc::EPERM as u32),
    )?;
    #[cfg(target_arch = "x86_64")]
    return Ok(vec![x32_guard(), enosys, eperm]);
    #[cfg(not(target_arch = "x86_64"))]
    Ok(vec![enosys, eperm])
}

/// Installs the filters of `level` on the calling (only) thread.
pub(crate) fn install(level: JailLevel) -> Result<(), JailError> {
    for program in programs(level)? {
        seccompiler::apply_filter(&program).map_err(err)?;
    }
    Ok(())
}

/// The launcher's own filter once it only waits for its child (at `strict`): an allow-list of what
/// waiting and exiting take; everything else fails with `EPERM`.
pub(crate) fn install_monitor() -> Result<(), JailError> {
    let mut allowed = vec![
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_sigaltstack,
        libc::SYS_munmap,
        libc::SYS_futex,
    ];
    allowed.sort_unstable();
    allowed.dedup();
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.into_iter().map(|nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        ARCH,
    )
    .map_err(err)?;
    let program = BpfProgram::try_from(filter).map_err(err)?;
    #[cfg(target_arch = "x86_64")]
    seccompiler::apply_filter(&x32_guard()).map_err(err)?;
    seccompiler::apply_filter(&program).map_err(err)
}

/// Test builds only (test T59 of `tests/tests/isolation_levels.rs`): a filter like a container
/// runtime's default profile, refusing
/// `unshare` and `clone` with namespace flags, so tests can show what happens on a host where
/// `strict` is unavailable. The supervisor installs it in a launcher before `exec`.
#[cfg(feature = "isolation-tests")]
pub fn namespace_denial() -> Result<BpfProgram, JailError> {
    use SeccompCmpArgLen::Qword;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_unshare, Vec::new());
    rules.insert(libc::SYS_setns, Vec::new());
    let clone_rules = CLONE_NEW_FLAGS
        .iter()
        .map(|&bit| rule(vec![cond(0, Qword, SeccompCmpOp::MaskedEq(bit), bit)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    rules.insert(libc::SYS_clone3, Vec::new());
    compile(rules, SeccompAction::Errno(libc::EPERM as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_compiles() {
        for level in [JailLevel::Strict, JailLevel::Chroot, JailLevel::None] {
            let programs = programs(level).unwrap();
            assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
        }
    }

    #[test]
    fn chroot_adds_the_network_calls() {
        let strict = eperm_group(JailLevel::Strict).unwrap();
        let chroot = eperm_group(JailLevel::Chroot).unwrap();
        assert!(!strict.contains_key(&libc::SYS_connect));
        assert!(chroot.contains_key(&libc::SYS_connect));
        assert!(chroot.contains_key(&libc::SYS_clone));
    }
}
