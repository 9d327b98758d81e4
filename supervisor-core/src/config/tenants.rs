//! `[tenants.<name>]`: each tenant's quotas and rate limit, and its own provider keys.
//! `[tenants.default]` holds the defaults: a tenant without a section, or a key left out of its
//! section, gets the default tenant's value; a limit set nowhere is no limit.
//!
//! A tenant's keys are named by environment variable (`keys = { openai = "ACME_OPENAI_KEY" }`)
//! and read at load time like every other key; they stay in the supervisor (the gateway adds
//! them to the tenant's model calls), never reach a worker, and are masked on shared pages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Catalogue, ConfigError, Secret};
use crate::principal::{DEFAULT_TENANT, check_tenant_name};

/// One `[tenants.<name>]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantConfig {
    /// Sessions the tenant may have stored at once.
    #[serde(default)]
    pub sessions: Option<u64>,
    /// Its sessions with a live worker at once.
    #[serde(default)]
    pub live_workers: Option<u64>,
    /// Its queries running at once.
    #[serde(default)]
    pub concurrent_runs: Option<u64>,
    /// Model tokens (prompt and completion) its sessions may use per UTC day.
    #[serde(default)]
    pub model_tokens_per_day: Option<u64>,
    /// API requests per second, with bursts of as many.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// Provider name → the environment variable holding the tenant's own key for it.
    #[serde(default)]
    pub keys: BTreeMap<String, String>,
}

/// The limits in force for one tenant, once the defaults are applied; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub sessions: Option<u64>,
    pub live_workers: Option<u64>,
    pub concurrent_runs: Option<u64>,
    pub model_tokens_per_day: Option<u64>,
    pub requests_per_second: Option<u32>,
}

/// Every tenant's limits and keys, resolved at load time.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    defaults: Limits,
    named: BTreeMap<String, Limits>,
    /// Tenant → provider → key.
    keys: BTreeMap<String, BTreeMap<String, Secret>>,
}

impl Tenants {
    /// The limits of `tenant`.
    pub fn limits(&self, tenant: &str) -> Limits {
        self.named.get(tenant).copied().unwrap_or(self.defaults)
    }

    /// The tenants with a section of their own, besides `default`.
    pub fn named(&self) -> impl Iterator<Item = (&str, &Limits)> {
        self.named
            .iter()
            .map(|(name, limits)| (name.as_str(), limits))
    }

    /// `tenant`'s own key for `provider`, if it has one.
    pub fn key(&self, tenant: &str, provider: &str) -> Option<&Secret> {
        self.keys.get(tenant)?.get(provider)
    }

    /// Every tenant key, for masking on shared pages.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.keys.values().flat_map(BTreeMap::values)
    }
}

/// Resolves the sections: names checked, defaults applied, keys read from `env`.
///
/// # Errors
/// A tenant name that cannot be one, a limit of zero, a key for a provider no model uses, or a
/// key variable that is not set; each names its key.
pub(crate) fn resolve(
    sections: &BTreeMap<String, TenantConfig>,
    catalogue: &Catalogue,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Tenants, ConfigError> {
    let default_section = sections.get(DEFAULT_TENANT).cloned().unwrap_or_default();
    let with_defaults = |section: &TenantConfig| Limits {
        sessions: section.sessions.or(default_section.sessions),
        live_workers: section.live_workers.or(default_section.live_workers),
        concurrent_runs: section.concurrent_runs.or(default_section.concurrent_runs),
        model_tokens_per_day: section
            .model_tokens_per_day
            .or(default_section.model_tokens_per_day),
        requests_per_second: section
            .requests_per_second
            .or(default_section.requests_per_second),
    };
    let mut tenants = Tenants {
        defaults: with_defaults(&default_section),
        ..Tenants::default()
    };
    for (name, section) in sections {
        check_tenant_name(name).map_err(|e| ConfigError::Invalid(format!("tenants: {e}")))?;
        let zero = [
            ("sessions", section.sessions),
            ("liveWorkers", section.live_workers),
            ("concurrentRuns", section.concurrent_runs),
            ("modelTokensPerDay", section.model_tokens_per_day),
            (
                "requestsPerSecond",
                section.requests_per_second.map(u64::from),
            ),
        ]
        .into_iter()
        .find(|(_, value)| *value == Some(0));
        if let Some((key, _)) = zero {
            return Err(ConfigError::Invalid(format!(
                "tenants.{name}.{key} must be at least 1 (leave it out for no limit)"
            )));
        }
        let mut keys = BTreeMap::new();
        for (provider, variable) in &section.keys {
            let key = format!("tenants.{name}.keys.{provider}");
            if !catalogue.listed_providers().any(|p| p == provider) {
                return Err(ConfigError::Invalid(format!(
                    "{key}: no configured model uses the provider {provider:?}"
                )));
            }
            let value = env(variable).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "{key} names the environment variable {variable}, which is not set"
                ))
            })?;
            keys.insert(provider.clone(), Secret::new(value));
        }
        if !keys.is_empty() {
            tenants.keys.insert(name.clone(), keys);
        }
        if name != DEFAULT_TENANT {
            tenants.named.insert(name.clone(), with_defaults(section));
        }
    }
    Ok(tenants)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> BTreeMap<String, TenantConfig> {
        #[derive(Deserialize)]
        struct File {
            tenants: BTreeMap<String, TenantConfig>,
        }
        let file: File = figment::Figment::from(figment::providers::Serialized::defaults(
            serde_json::json!({}),
        ))
        .merge(<figment::providers::Toml as figment::providers::Format>::string(text))
        .extract()
        .unwrap();
        file.tenants
    }

    #[test]
    fn a_named_tenant_inherits_what_it_leaves_out() {
        let tenants = resolve(
            &section(
                "[tenants.default]\nsessions = 5\nrequestsPerSecond = 10\n\
                 [tenants.acme]\nsessions = 50\nconcurrentRuns = 2\n",
            ),
            &Catalogue::default(),
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            tenants.limits("acme"),
            Limits {
                sessions: Some(50),
                concurrent_runs: Some(2),
                requests_per_second: Some(10),
                ..Limits::default()
            }
        );
        assert_eq!(tenants.limits("unknown"), tenants.limits("default"));
        assert_eq!(tenants.limits("default").sessions, Some(5));
        assert_eq!(tenants.limits("default").concurrent_runs, None);
    }

    #[test]
    fn bad_sections_are_refused_by_name() {
        let refused = |text: &str| {
            resolve(&section(text), &Catalogue::default(), &|_| None)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("[tenants.\"a b\"]\nsessions = 1\n").contains("invalid tenant name"));
        assert!(refused("[tenants.acme]\nliveWorkers = 0\n").contains("tenants.acme.liveWorkers"));
        assert!(
            refused("[tenants.acme]\nkeys = { openai = \"ACME_KEY\" }\n")
                .contains("tenants.acme.keys.openai")
        );
    }

    #[test]
    fn keys_are_read_from_the_named_variable() {
        let tenants = resolve(
            &section("[tenants.acme]\nkeys = { echo = \"ACME_KEY\" }\n"),
            &Catalogue::default(),
            &|name| (name == "ACME_KEY").then(|| "sk-acme-0123456789".to_owned()),
        )
        .unwrap();
        assert_eq!(
            tenants.key("acme", "echo").map(Secret::expose),
            Some("sk-acme-0123456789")
        );
        assert!(tenants.key("default", "echo").is_none());
        assert_eq!(tenants.secrets().count(), 1);
    }
}
