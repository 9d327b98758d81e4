//! Single-use, short-lived tickets for clients that cannot send a header (a browser's
//! EventSource): `POST /api/v1/auth/ticket` makes one for the caller, and the follow stream
//! takes it as `?ticket=` once. A long-lived credential never goes into a URL (URLs end up in
//! logs and histories); a ticket is worthless a minute later, or after its one use.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::principal::Principal;

/// How long a ticket may wait for its use.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Tickets outstanding at most; a caller flooding the table is refused new ones.
const MAX_TICKETS: usize = 10_000;

#[derive(Default)]
pub struct Tickets(Mutex<HashMap<String, (Principal, Instant)>>);

impl Tickets {
    /// A new ticket for `principal`; `None` when too many are outstanding.
    pub fn issue(&self, principal: Principal) -> Option<String> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_TICKETS {
            map.retain(|_, (_, at)| at.elapsed() < TICKET_TTL);
            if map.len() >= MAX_TICKETS {
                return None;
            }
        }
        let ticket = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        map.insert(ticket.clone(), (principal, Instant::now()));
        Some(ticket)
    }

    /// The principal of `ticket`, which is used up by this call.
    pub fn redeem(&self, ticket: &str) -> Option<Principal> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (principal, at) = map.remove(ticket)?;
        (at.elapsed() < TICKET_TTL).then_some(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_works_once() {
        let tickets = Tickets::default();
        let ticket = tickets.issue(Principal::local()).unwrap();
        assert_eq!(tickets.redeem(&ticket), Some(Principal::local()));
        assert_eq!(tickets.redeem(&ticket), None);
        assert_eq!(tickets.redeem("made-up"), None);
    }
}
