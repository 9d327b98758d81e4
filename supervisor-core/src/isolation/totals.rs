//! What all sessions together may use: the memory and process totals admission counts the
//! sessions' limits against, and the cap on their parent cgroup.

use super::config::{GIB, KIB, LimitsConfig, MAX_PIDS};

/// Memory and processes of all sessions together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub memory: u64,
    pub pids: u64,
}

impl Totals {
    /// The configured totals, or the defaults: the host's memory less an eighth (at least
    /// 1 GiB) for the supervisor and the OS, and three quarters of the host's process ids.
    pub(super) fn from_config(limits: &LimitsConfig) -> Self {
        let read =
            |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(u64::MAX / 2, |kib| kib * KIB);
        let memory = limits.total_memory.map_or_else(
            || {
                mem_total
                    .saturating_sub((mem_total / 8).max(GIB))
                    .max(limits.memory.0)
            },
            |t| t.0,
        );
        let host_pids = [
            read("/proc/sys/kernel/pid_max"),
            read("/proc/sys/kernel/threads-max"),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(32_768);
        let pids = limits
            .total_pids
            .unwrap_or_else(|| (host_pids / 4 * 3).clamp(limits.pids, MAX_PIDS));
        Self { memory, pids }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::ByteSize;
    use super::*;

    #[test]
    fn totals_default_below_the_host_and_above_one_session() {
        let limits = LimitsConfig::default();
        let t = Totals::from_config(&limits);
        assert!(
            t.memory >= limits.memory.0 && t.pids >= limits.pids,
            "{t:?}"
        );
        let configured = LimitsConfig {
            total_memory: Some(ByteSize(3 * GIB)),
            total_pids: Some(1000),
            ..LimitsConfig::default()
        };
        assert_eq!(
            Totals::from_config(&configured),
            Totals {
                memory: 3 * GIB,
                pids: 1000
            }
        );
    }
}
