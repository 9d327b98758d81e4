//! Model tokens per tenant for the current UTC day: the gateway adds each finished call's
//! usage, quotas and `/usage` read it. A leaf of its own so that the gateway, which sits below
//! the sessions, can record usage without depending on the quota layer above them.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};

/// A UTC day, in milliseconds: the ledger's period.
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Model tokens used per tenant today; the gateway adds to it, quotas and `/usage` read it.
/// A process-wide static like `metrics::METRICS`: one server per process, and the gateway
/// records usage without being handed the quota state.
pub static TOKENS: LazyLock<TokenLedger> = LazyLock::new(TokenLedger::default);

/// Tokens per tenant for the current UTC day.
#[derive(Default)]
pub struct TokenLedger {
    /// Tenant → (day number, tokens that day).
    used: Mutex<HashMap<String, (u64, u64)>>,
}

impl TokenLedger {
    pub fn add(&self, tenant: &str, tokens: u64, now: u64) {
        let day = now / DAY_MS;
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = used.entry(tenant.to_owned()).or_insert((day, 0));
        if entry.0 != day {
            *entry = (day, 0);
        }
        entry.1 = entry.1.saturating_add(tokens);
    }

    pub fn today(&self, tenant: &str, now: u64) -> u64 {
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        used.get(tenant)
            .filter(|(day, _)| *day == now / DAY_MS)
            .map_or(0, |(_, tokens)| *tokens)
    }

    pub fn tenants(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        used.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_counted_per_tenant_and_day() {
        let ledger = TokenLedger::default();
        ledger.add("a", 10, DAY_MS * 5 + 1);
        ledger.add("a", 5, DAY_MS * 5 + 2);
        ledger.add("b", 7, DAY_MS * 5 + 3);
        assert_eq!(ledger.today("a", DAY_MS * 5 + 4), 15);
        assert_eq!(ledger.today("b", DAY_MS * 5 + 4), 7);
        assert_eq!(ledger.today("a", DAY_MS * 6), 0, "a new day starts at zero");
        ledger.add("a", 1, DAY_MS * 6);
        assert_eq!(ledger.today("a", DAY_MS * 6 + 1), 1);
    }
}
