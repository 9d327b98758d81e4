//! `GET /metrics`: the server's counters in the Prometheus text format.
//!
//! A static of atomics rather than a metrics library: the set is small and fixed, recording is
//! one atomic add on hot paths, and the exposition format is a few lines of text. Gauges that
//! describe the present (live workers, their memory, follower lag) are gathered by the caller
//! when scraped and handed in as [`Gauges`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shared::events::RunStatus;

/// The process's metrics; there is one server per process.
pub static METRICS: Metrics = Metrics::new();

pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with fixed buckets (seconds).
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }
}

pub struct Metrics {
    pub sessions_created: Counter,
    pub worker_starts: Counter,
    pub worker_start_failures: Counter,
    /// Workers that died without the supervisor asking them to.
    pub worker_crashes: Counter,
    /// Sessions whose worker the kernel's OOM killer stopped at their memory limit.
    pub oom_kills: Counter,
    /// Sessions stopped by another resource limit (processes, CPU time, `server.sessionLimits`).
    pub limit_kills: Counter,
    pub worker_start_seconds: Histogram,
    /// Idle workers stopped to make room for another session's.
    pub hibernations: Counter,
    /// Idle workers stopped after the idle timeout.
    pub idle_stops: Counter,
    /// Queries refused by admission control.
    pub admissions_refused: Counter,
    pub runs_started: Counter,
    runs_idle: Counter,
    runs_aborted: Counter,
    runs_error: Counter,
    pub events_published: Counter,
    pub events_stored: Counter,
    /// Writes of streamed text: one per burst of deltas, before they are delivered.
    pub live_text_writes: Counter,
    /// Followers that fell out of a session's ring and were replayed from storage.
    pub follower_lags: Counter,
    pub model_requests: Counter,
    pub model_failures: Counter,
    pub model_request_seconds: Histogram,
    pub model_prompt_tokens: Counter,
    pub model_completion_tokens: Counter,
}

impl Metrics {
    const fn new() -> Self {
        Self {
            sessions_created: Counter::new(),
            worker_starts: Counter::new(),
            worker_start_failures: Counter::new(),
            worker_crashes: Counter::new(),
            oom_kills: Counter::new(),
            limit_kills: Counter::new(),
            worker_start_seconds: Histogram::new(),
            hibernations: Counter::new(),
            idle_stops: Counter::new(),
            admissions_refused: Counter::new(),
            runs_started: Counter::new(),
            runs_idle: Counter::new(),
            runs_aborted: Counter::new(),
            runs_error: Counter::new(),
            events_published: Counter::new(),
            events_stored: Counter::new(),
            live_text_writes: Counter::new(),
            follower_lags: Counter::new(),
            model_requests: Counter::new(),
            model_failures: Counter::new(),
            model_request_seconds: Histogram::new(),
            model_prompt_tokens: Counter::new(),
            model_completion_tokens: Counter::new(),
        }
    }

    pub fn run_finished(&self, status: RunStatus) {
        match status {
            RunStatus::Aborted => self.runs_aborted.inc(),
            RunStatus::Error => self.runs_error.inc(),
            RunStatus::Idle | RunStatus::Executing => self.runs_idle.inc(),
        }
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn gauge_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// The present, as a scrape sees it.
pub struct Gauges {
    /// Sessions loaded in this process.
    pub sessions_live: usize,
    /// `(session id, pid)` of every live worker.
    pub workers: Vec<(String, u32)>,
    /// `(session id, events)` its slowest follower has yet to read, for every loaded session.
    pub follower_lags: Vec<(String, u64)>,
    /// Since the server started.
    pub uptime: Duration,
}

/// The whole exposition: the counters, then `gauges`.
pub fn render(gauges: &Gauges) -> String {
    let m = &METRICS;
    let mut out = String::with_capacity(4096);
    counter(
        &mut out,
        "agent_sessions_created_total",
        "Sessions created.",
        m.sessions_created.get(),
    );
    counter(
        &mut out,
        "agent_worker_starts_total",
        "Worker processes started.",
        m.worker_starts.get(),
    );
    counter(
        &mut out,
        "agent_worker_start_failures_total",
        "Worker processes that failed to start.",
        m.worker_start_failures.get(),
    );
    counter(
        &mut out,
        "agent_worker_crashes_total",
        "Workers that exited without being asked to.",
        m.worker_crashes.get(),
    );
    counter(
        &mut out,
        "agent_worker_oom_kills_total",
        "Workers killed at their session's memory limit.",
        m.oom_kills.get(),
    );
    counter(
        &mut out,
        "agent_worker_limit_kills_total",
        "Workers stopped by another session limit.",
        m.limit_kills.get(),
    );
    m.worker_start_seconds.render(
        &mut out,
        "agent_worker_start_seconds",
        "From spawn to a worker ready for its first query.",
    );
    counter(
        &mut out,
        "agent_worker_hibernations_total",
        "Idle workers stopped to make room.",
        m.hibernations.get(),
    );
    counter(
        &mut out,
        "agent_worker_idle_stops_total",
        "Idle workers stopped after the idle timeout.",
        m.idle_stops.get(),
    );
    counter(
        &mut out,
        "agent_admissions_refused_total",
        "Queries refused by admission control.",
        m.admissions_refused.get(),
    );
    counter(
        &mut out,
        "agent_runs_started_total",
        "Runs started.",
        m.runs_started.get(),
    );
    let _ = writeln!(
        out,
        "# HELP agent_runs_finished_total Runs finished, by final status.\n# TYPE agent_runs_finished_total counter"
    );
    for (status, value) in [
        ("idle", &m.runs_idle),
        ("aborted", &m.runs_aborted),
        ("error", &m.runs_error),
    ] {
        let _ = writeln!(
            out,
            "agent_runs_finished_total{{status=\"{status}\"}} {}",
            value.get()
        );
    }
    counter(
        &mut out,
        "agent_events_published_total",
        "Events numbered and delivered, deltas included.",
        m.events_published.get(),
    );
    counter(
        &mut out,
        "agent_events_stored_total",
        "Events written to storage.",
        m.events_stored.get(),
    );
    counter(
        &mut out,
        "agent_live_text_writes_total",
        "Writes of streamed text (one per burst of deltas), each before its deltas are delivered.",
        m.live_text_writes.get(),
    );
    counter(
        &mut out,
        "agent_follower_lags_total",
        "Followers replayed from storage after falling behind.",
        m.follower_lags.get(),
    );
    counter(
        &mut out,
        "agent_model_requests_total",
        "Model calls made for workers.",
        m.model_requests.get(),
    );
    counter(
        &mut out,
        "agent_model_failures_total",
        "Model calls that failed.",
        m.model_failures.get(),
    );
    m.model_request_seconds.render(
        &mut out,
        "agent_model_request_seconds",
        "Model calls, retries included.",
    );
    counter(
        &mut out,
        "agent_model_prompt_tokens_total",
        "Prompt tokens reported or estimated.",
        m.model_prompt_tokens.get(),
    );
    counter(
        &mut out,
        "agent_model_completion_tokens_total",
        "Completion tokens reported or estimated.",
        m.model_completion_tokens.get(),
    );

    gauge_header(
        &mut out,
        "agent_sessions_live",
        "Sessions loaded in this process.",
    );
    let _ = writeln!(out, "agent_sessions_live {}", gauges.sessions_live);
    let (workers, lags) = (&gauges.workers, &gauges.follower_lags);
    gauge_header(&mut out, "agent_workers_live", "Live worker processes.");
    let _ = writeln!(out, "agent_workers_live {}", workers.len());
    gauge_header(
        &mut out,
        "agent_worker_rss_bytes",
        "Resident memory of each session's worker.",
    );
    for (session, pid) in workers {
        if let Some(kib) = rss_kib(*pid) {
            let _ = writeln!(
                out,
                "agent_worker_rss_bytes{{session_id=\"{session}\"}} {}",
                kib * 1024
            );
        }
    }
    gauge_header(
        &mut out,
        "agent_follower_lag_events",
        "Events the slowest follower of a session has yet to read.",
    );
    for (session, lag) in lags.iter().filter(|(_, lag)| *lag > 0) {
        let _ = writeln!(
            out,
            "agent_follower_lag_events{{session_id=\"{session}\"}} {lag}"
        );
    }
    gauge_header(
        &mut out,
        "agent_uptime_seconds",
        "Seconds since the server started.",
    );
    let _ = writeln!(out, "agent_uptime_seconds {}", gauges.uptime.as_secs());
    out
}

/// Resident memory of process `pid`, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(40));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.002\"} 0"));
        assert!(out.contains("x_bucket{le=\"0.005\"} 1"));
        assert!(out.contains("x_bucket{le=\"0.05\"} 2"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2"));
        assert!(out.contains("x_count 2"));
    }
}
