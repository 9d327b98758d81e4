//! The self-audit: what the worker finds when it looks at itself after the
//! last jail step, gathered with syscalls (Landlock hides `/proc` from the worker), sent to the
//! supervisor with `Jailed`, which refuses the session if anything is off.

use shared::jail::{JailAudit, JailLevel};

use super::{Findings, fds, privileges, rlimits};

fn prctl_get(option: libc::c_int) -> i32 {
    // SAFETY: a PR_GET_* prctl with no pointer arguments.
    unsafe { libc::prctl(option, 0, 0, 0, 0) }
}

fn death_signal() -> i32 {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int into `signal`.
    unsafe {
        libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut signal as *mut libc::c_int as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    signal
}

fn res_ids(call: libc::c_long) -> [u32; 3] {
    let mut ids = [0 as libc::uid_t; 3];
    let [a, b, c] = &mut ids;
    // SAFETY: getresuid/getresgid write three ids into the pointers we pass.
    unsafe { libc::syscall(call, a as *mut u32, b as *mut u32, c as *mut u32) };
    ids
}

fn groups() -> Vec<u32> {
    let mut list = vec![0 as libc::gid_t; 256];
    // SAFETY: getgroups writes at most list.len() gids into the buffer.
    let n = unsafe { libc::getgroups(list.len() as libc::c_int, list.as_mut_ptr()) };
    list.truncate(usize::try_from(n).unwrap_or(0));
    list
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Translates an inside uid through the `uid_map` lines read earlier.
fn outside(uid: u32, map: &[(u32, u32, u32)]) -> u32 {
    map.iter()
        .find(|(inside, _, count)| uid >= *inside && uid - inside < *count)
        .map_or(uid, |(inside, out, _)| out + (uid - inside))
}

/// The audit, from syscalls plus what the steps recorded in `found`.
pub(crate) fn gather(level: JailLevel, found: &Findings) -> JailAudit {
    let (cap_effective, cap_permitted, cap_inheritable) =
        privileges::read_capabilities().unwrap_or((u64::MAX, u64::MAX, u64::MAX));
    let uids = res_ids(libc::SYS_getresuid);
    let rlimits = rlimits::REPORTED
        .iter()
        .map(|(resource, name)| {
            let (soft, hard) = rlimits::read(*resource);
            ((*name).to_owned(), soft, hard)
        })
        .collect();
    JailAudit {
        level,
        uids,
        gids: res_ids(libc::SYS_getresgid),
        groups: groups(),
        host_uid: outside(uids[1], &found.uid_map),
        cap_effective,
        cap_permitted,
        cap_inheritable,
        cap_bounding: privileges::read_bounding(),
        cap_ambient: privileges::read_ambient(),
        no_new_privs: prctl_get(libc::PR_GET_NO_NEW_PRIVS) == 1,
        seccomp_mode: prctl_get(libc::PR_GET_SECCOMP),
        dumpable: prctl_get(libc::PR_GET_DUMPABLE) == 1,
        parent_death_signal: death_signal(),
        namespaces: found.namespaces.clone(),
        root: found.root.clone(),
        proc: found.proc.clone(),
        cwd: std::env::current_dir()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        hostname: hostname(),
        env: std::env::vars_os()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect(),
        open_fds: fds::open_fds(),
        rlimits,
        landlock_abi: found.landlock_abi,
        landlock: found.landlock.clone(),
        mounts: found.mounts.clone(),
        pid: std::process::id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_maps_translate() {
        let map = [(1000, 200_005, 1)];
        assert_eq!(outside(1000, &map), 200_005);
        assert_eq!(outside(0, &map), 0);
        assert_eq!(outside(5, &[(0, 0, u32::MAX)]), 5);
    }
}
