//! The isolation catalogue (isolation.md §4.3) at `strict` rootless: the supervisor drops to uid 65534 before it serves (isolation.md §4.2 "rootless" mode).
//! The tests themselves live in `isolation_support`.

mod isolation_support;

use isolation_support::Mode;

catalogue!(Mode::Rootless;
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
    t35_workspace_quota,
    t36_tmp_full,
    t39_file_api,
    t43_file_api_race,
    t48_deep_tree,
    t51_bad_frames,
    t55_supervisor_killed,
);
