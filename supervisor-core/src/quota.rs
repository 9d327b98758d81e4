//! Per-tenant quotas and the per-tenant request rate (`[tenants.<name>]`, `config::tenants`):
//! each check happens before anything is changed, and a refusal is a 429 naming the limit
//! ([`ApiError::QuotaExceeded`], [`ApiError::RateLimited`]) with a `Retry-After`.
//!
//! - sessions: counted in storage, checked when one is created; creations of one tenant are
//!   serialised so that two cannot both take the last place;
//! - live workers and concurrent runs: counted over the live sessions, plus the starts admitted
//!   but not yet visible there ([`RunPermit`]), so that racing starts cannot both pass; at its
//!   live-worker limit a tenant's least recently used idle worker makes room;
//! - model tokens per UTC day: counted as the gateway's calls finish (`crate::token_ledger`); a run
//!   starts only while the tenant is under its budget (a run may end past it);
//! - requests per second: a GCRA limiter per tenant (`governor`), checked by a middleware.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use serde_json::{Value, json};
use shared::ids::now_ms;

use crate::config::tenants::{Limits, Tenants};
use crate::error::ApiError;
use crate::principal::DEFAULT_TENANT;
use crate::sessions::{Session, Sessions};
use crate::storage::SharedStorage;
use crate::token_ledger::{DAY_MS, TOKENS};

/// When a refused run or worker may be tried again: runs end and workers idle out on their own.
const RUN_RETRY_SECS: u64 = 5;
/// When a refused session creation may be tried again: only a deletion makes room.
const SESSIONS_RETRY_SECS: u64 = 60;

/// A per-tenant gauge of `/metrics`: its name, help and value for a tenant.
type Gauge<'a> = (&'static str, &'static str, &'a dyn Fn(&str) -> u64);

/// The quota state of the server.
pub struct Quotas {
    tenants: Tenants,
    rates: Rates,
    /// Held from a tenant's session count to its new record, for tenants with a sessions limit.
    creating: tokio::sync::Mutex<()>,
    /// Starts admitted but not yet counted by the live sessions, per tenant.
    pending: Mutex<HashMap<String, Pending>>,
    /// Refusals per (tenant, limit), for `/metrics`.
    refusals: Mutex<HashMap<(String, &'static str), u64>>,
}

/// A limit a start would pass.
struct Refusal {
    limit: &'static str,
    used: u64,
    max: u64,
}

#[derive(Default, Clone, Copy)]
struct Pending {
    runs: usize,
    workers: usize,
}

/// One limiter per tenant with a rate of its own; tenants on the default rate share a keyed
/// limiter (one cell each).
struct Rates {
    default: Option<(DefaultKeyedRateLimiter<String>, NonZeroU32)>,
    named: HashMap<String, (DefaultDirectRateLimiter, NonZeroU32)>,
}

impl Rates {
    fn new(tenants: &Tenants) -> Self {
        let quota = |per_second: Option<u32>| {
            per_second
                .and_then(NonZeroU32::new)
                .map(|n| (Quota::per_second(n), n))
        };
        let defaults = tenants.limits(DEFAULT_TENANT).requests_per_second;
        Self {
            default: quota(defaults).map(|(q, n)| (governor::RateLimiter::keyed(q), n)),
            named: tenants
                .named()
                .filter(|(_, limits)| limits.requests_per_second != defaults)
                .filter_map(|(name, limits)| {
                    quota(limits.requests_per_second)
                        .map(|(q, n)| (name.to_owned(), (governor::RateLimiter::direct(q), n)))
                })
                .collect(),
        }
    }
}

/// A start admitted by the quotas: counted as pending until dropped, when the session's own
/// flags (worker live, run running) have taken over.
#[must_use = "the start is counted until this is dropped"]
pub struct RunPermit<'a> {
    quotas: &'a Quotas,
    tenant: String,
    pending: Pending,
}

impl Drop for RunPermit<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .quotas
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = pending.get_mut(&self.tenant) {
            entry.runs -= self.pending.runs;
            entry.workers -= self.pending.workers;
            if entry.runs == 0 && entry.workers == 0 {
                pending.remove(&self.tenant);
            }
        }
    }
}

/// A session-creation slot: the tenant's creations wait for each other while it is held.
pub struct CreationSlot<'a> {
    _held: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl Quotas {
    pub fn new(tenants: Tenants) -> Self {
        Self {
            rates: Rates::new(&tenants),
            tenants,
            creating: tokio::sync::Mutex::new(()),
            pending: Mutex::default(),
            refusals: Mutex::default(),
        }
    }

    pub fn limits(&self, tenant: &str) -> Limits {
        self.tenants.limits(tenant)
    }

    fn refused(&self, tenant: &str, limit: &'static str) {
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        *refusals.entry((tenant.to_owned(), limit)).or_default() += 1;
    }

    /// One request of `tenant`, against its rate.
    ///
    /// # Errors
    /// `RateLimited` when the tenant is over its requests per second.
    pub fn check_rate(&self, tenant: &str) -> Result<(), ApiError> {
        let checked = match self.rates.named.get(tenant) {
            Some((limiter, per_second)) => limiter.check().map_err(|e| (e, *per_second)),
            None => match &self.rates.default {
                Some((limiter, per_second)) => limiter
                    .check_key(&tenant.to_owned())
                    .map_err(|e| (e, *per_second)),
                None => Ok(()),
            },
        };
        checked.map_err(|(not_until, per_second)| {
            self.refused(tenant, "requestsPerSecond");
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            ApiError::RateLimited {
                tenant: tenant.to_owned(),
                limit: per_second.get(),
                // Whole seconds, at least one: `Retry-After` has no fractions.
                retry_after_secs: wait.as_secs().max(1),
            }
        })
    }

    /// Room for one more session of `tenant`, held until the session is stored.
    ///
    /// # Errors
    /// `QuotaExceeded` when the tenant has its `sessions` already; a storage failure.
    pub async fn session_slot(
        &self,
        storage: &SharedStorage,
        tenant: &str,
    ) -> Result<CreationSlot<'_>, ApiError> {
        let Some(max) = self.limits(tenant).sessions else {
            return Ok(CreationSlot { _held: None });
        };
        let held = self.creating.lock().await;
        let used = storage.count_tenant_sessions(tenant).await? as u64;
        if used >= max {
            self.refused(tenant, "sessions");
            return Err(ApiError::QuotaExceeded {
                tenant: tenant.to_owned(),
                limit: "sessions",
                used,
                max,
                retry_after_secs: SESSIONS_RETRY_SECS,
            });
        }
        Ok(CreationSlot { _held: Some(held) })
    }

    /// Whether `session` may start a run now: its tenant's tokens today, concurrent runs, and
    /// live workers when the run needs a new one. At the live-worker limit, the tenant's least
    /// recently used idle worker is stopped to make room (it hibernates, as admission does
    /// server-wide); only when all of them are running is the run refused. The permit counts
    /// the start until dropped.
    ///
    /// # Errors
    /// `QuotaExceeded` naming the first limit reached.
    pub async fn admit_run(
        &self,
        sessions: &Sessions,
        session: &Session,
    ) -> Result<RunPermit<'_>, ApiError> {
        let tenant = session.tenant.as_str();
        let limits = self.limits(tenant);
        let now = now_ms();
        if let Some(max) = limits.model_tokens_per_day {
            let used = TOKENS.today(tenant, now);
            if used >= max {
                self.refused(tenant, "modelTokensPerDay");
                return Err(ApiError::QuotaExceeded {
                    tenant: tenant.to_owned(),
                    limit: "modelTokensPerDay",
                    used,
                    max,
                    retry_after_secs: (DAY_MS - now % DAY_MS).div_ceil(1000),
                });
            }
        }
        loop {
            let refusal = match self.try_admit(sessions, session, limits) {
                Ok(permit) => return Ok(permit),
                Err(refusal) => refusal,
            };
            if refusal.limit == "liveWorkers"
                && let Some(victim) = sessions.least_recent_idle_of(tenant, &session.id)
            {
                tracing::info!(session_id = %victim.id, tenant, "hibernating the tenant's least recently used idle worker to make room");
                victim.stop_worker().await;
                continue;
            }
            self.refused(tenant, refusal.limit);
            return Err(ApiError::QuotaExceeded {
                tenant: tenant.to_owned(),
                limit: refusal.limit,
                used: refusal.used,
                max: refusal.max,
                retry_after_secs: RUN_RETRY_SECS,
            });
        }
    }

    /// One count-and-reserve of [`Quotas::admit_run`], under the pending lock.
    fn try_admit(
        &self,
        sessions: &Sessions,
        session: &Session,
        limits: Limits,
    ) -> Result<RunPermit<'_>, Refusal> {
        let tenant = session.tenant.as_str();
        let needs_worker = !session.activity.has_worker();
        let (workers, runs) = sessions.tenant_activity(tenant);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let current = pending.get(tenant).copied().unwrap_or_default();
        let checks = [
            (
                "concurrentRuns",
                limits.concurrent_runs,
                runs + current.runs,
                true,
            ),
            (
                "liveWorkers",
                limits.live_workers,
                workers + current.workers,
                needs_worker,
            ),
        ];
        for (limit, max, used, applies) in checks {
            if let Some(max) = max
                && applies
                && used as u64 >= max
            {
                return Err(Refusal {
                    limit,
                    used: used as u64,
                    max,
                });
            }
        }
        let admitted = Pending {
            runs: 1,
            workers: usize::from(needs_worker),
        };
        let entry = pending.entry(tenant.to_owned()).or_default();
        entry.runs += admitted.runs;
        entry.workers += admitted.workers;
        Ok(RunPermit {
            quotas: self,
            tenant: tenant.to_owned(),
            pending: admitted,
        })
    }

    /// `GET /api/v1/usage`: `tenant`'s use against each of its limits (`null`: no limit).
    ///
    /// # Errors
    /// Storage failed counting its sessions.
    pub async fn usage(
        &self,
        storage: &SharedStorage,
        sessions: &Sessions,
        tenant: &str,
    ) -> Result<Value, ApiError> {
        let limits = self.limits(tenant);
        let stored = storage.count_tenant_sessions(tenant).await?;
        let (workers, runs) = sessions.tenant_activity(tenant);
        let now = now_ms();
        Ok(json!({
            "tenant": tenant,
            "usage": {
                "sessions": {"used": stored, "limit": limits.sessions},
                "liveWorkers": {"used": workers, "limit": limits.live_workers},
                "concurrentRuns": {"used": runs, "limit": limits.concurrent_runs},
                "modelTokensPerDay": {
                    "used": TOKENS.today(tenant, now),
                    "limit": limits.model_tokens_per_day,
                    "resetsAt": (now / DAY_MS + 1) * DAY_MS,
                },
                "requestsPerSecond": {"limit": limits.requests_per_second},
            },
        }))
    }

    /// The per-tenant lines of `/metrics`: for every tenant that is configured, has live
    /// sessions, used tokens today or was refused.
    pub fn render_metrics(&self, sessions: &Sessions) -> String {
        let now = now_ms();
        let mut tenants: Vec<String> = vec![DEFAULT_TENANT.to_owned()];
        tenants.extend(self.tenants.named().map(|(name, _)| name.to_owned()));
        tenants.extend(sessions.all().iter().map(|s| s.tenant.clone()));
        tenants.extend(TOKENS.tenants());
        let refusals: Vec<((String, &'static str), u64)> = {
            let refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
            refusals.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        tenants.extend(refusals.iter().map(|((tenant, _), _)| tenant.clone()));
        tenants.sort();
        tenants.dedup();
        let mut out = String::new();
        let gauges: [Gauge<'_>; 4] = [
            (
                "agent_tenant_sessions_live",
                "Loaded sessions per tenant.",
                &|t| sessions.all().iter().filter(|s| s.tenant == t).count() as u64,
            ),
            (
                "agent_tenant_workers_live",
                "Sessions with a live worker per tenant.",
                &|t| sessions.tenant_activity(t).0 as u64,
            ),
            (
                "agent_tenant_runs_active",
                "Queries running per tenant.",
                &|t| sessions.tenant_activity(t).1 as u64,
            ),
            (
                "agent_tenant_model_tokens_today",
                "Model tokens used per tenant this UTC day.",
                &|t| TOKENS.today(t, now),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for tenant in &tenants {
                let label = label_value(tenant);
                let _ = writeln!(out, "{name}{{tenant=\"{label}\"}} {}", value(tenant));
            }
        }
        let name = "agent_tenant_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests refused by a tenant quota or rate limit.\n# TYPE {name} counter"
        );
        for ((tenant, limit), count) in refusals {
            let label = label_value(&tenant);
            let _ = writeln!(
                out,
                "{name}{{tenant=\"{label}\",limit=\"{limit}\"}} {count}"
            );
        }
        out
    }
}

/// A tenant name as a Prometheus label value. Names from the configuration and imports are
/// plain, but a principal's tenant comes from whatever authenticated it (a JWT claim, a proxy
/// header), so it is escaped rather than trusted not to end the label or the line.
fn label_value(tenant: &str) -> String {
    tenant
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn quotas(text: &str) -> Quotas {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            tenants: BTreeMap<String, crate::config::tenants::TenantConfig>,
        }
        let file: File = figment::Figment::new()
            .merge(<figment::providers::Toml as figment::providers::Format>::string(text))
            .extract()
            .unwrap();
        let tenants = crate::config::tenants::resolve(
            &file.tenants,
            &crate::config::Catalogue::default(),
            &|_| None,
        )
        .unwrap();
        Quotas::new(tenants)
    }

    #[test]
    fn each_tenant_has_its_own_rate() {
        let quotas = quotas(
            "[tenants.default]\nrequestsPerSecond = 2\n[tenants.big]\nrequestsPerSecond = 5\n",
        );
        for tenant in ["default", "other", "big"] {
            let burst = if tenant == "big" { 5 } else { 2 };
            for _ in 0..burst {
                quotas.check_rate(tenant).unwrap();
            }
            let refused = quotas.check_rate(tenant).unwrap_err();
            let ApiError::RateLimited {
                tenant: named,
                limit,
                retry_after_secs,
            } = refused
            else {
                panic!("{tenant}: {refused:?}");
            };
            assert_eq!((named.as_str(), limit), (tenant, burst));
            assert!(retry_after_secs >= 1);
        }
        let refusals = quotas.refusals.lock().unwrap();
        assert_eq!(refusals[&("big".to_owned(), "requestsPerSecond")], 1);
    }

    #[test]
    fn tenant_labels_cannot_break_out() {
        assert_eq!(label_value("acme"), "acme");
        assert_eq!(
            label_value("a\"} 1\nforged{x=\"\\"),
            "a\\\"} 1\\nforged{x=\\\"\\\\"
        );
    }

    #[test]
    fn no_rate_no_limiter() {
        let quotas = quotas("");
        for _ in 0..1000 {
            quotas.check_rate("default").unwrap();
        }
    }
}
