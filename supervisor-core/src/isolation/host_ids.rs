//! Per-session host uids (root mode): each session's worker runs as its own host uid/gid, taken
//! from the configured range (`isolation.uidBase` + 1 .. `uidBase` + `uidCount`; `uidBase`
//! itself is the start-up probes').
//!
//! An id is unique among every stored session, not only the live ones: two sessions sharing a
//! uid would share file ownership (one could read the other's workspace through any hole in the
//! mount isolation) and `RLIMIT_NPROC`. The id is recorded with the session in storage before
//! the session uses it and loaded again at start, so a restarted server gives a session the
//! uid its files belong to. Ids in the host's passwd and group databases are never handed out.
//! A new session starts probing at a hash of its id, so most first picks are free at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use shared::ids::SessionId;

use super::Isolation;

#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    #[error(
        "every host uid of the range {first}..={last} (isolation.uidBase, isolation.uidCount) belongs to a stored session; delete sessions or widen the range"
    )]
    Exhausted { first: u32, last: u32 },
}

#[derive(Debug, Default)]
struct Assigned {
    by_session: HashMap<SessionId, u32>,
    taken: HashSet<u32>,
}

/// The allocator. Cheap to query; every change happens under one short lock.
#[derive(Debug, Default)]
pub struct HostIds {
    /// First id sessions may get (`uidBase + 1`).
    first: u32,
    /// How many ids sessions may get (`uidCount - 1`).
    count: u32,
    /// Ids of the host's users and groups, and the server's own.
    reserved: HashSet<u32>,
    assigned: Mutex<Assigned>,
}

/// FNV-1a: a stable hash of the session id, the slot where probing starts.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl HostIds {
    /// Sessions get `base + 1 ..= base + count - 1`, never an id in `reserved`.
    pub fn new(base: u32, count: u32, reserved: HashSet<u32>) -> Self {
        Self {
            first: base.saturating_add(1),
            count: count.saturating_sub(1),
            reserved,
            assigned: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Assigned> {
        self.assigned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in the ids recorded in storage. A recorded id is kept as it is, even outside the
    /// current range (the session's files belong to it); a clash between two records (edited
    /// by hand, or two stores merged) is reported, and the first record keeps the id.
    pub fn load(&self, recorded: impl IntoIterator<Item = (SessionId, u32)>) -> Vec<String> {
        let mut assigned = self.lock();
        let mut problems = Vec::new();
        for (session, id) in recorded {
            if self.reserved.contains(&id) {
                problems.push(format!(
                    "session {session} is recorded with host uid {id}, which the host's passwd or group database also has"
                ));
            }
            if !assigned.taken.insert(id) {
                problems.push(format!(
                    "session {session} is recorded with host uid {id}, which another stored session has"
                ));
            }
            assigned.by_session.insert(session, id);
        }
        problems
    }

    /// The id of `session`, if it has one.
    pub fn get(&self, session: &SessionId) -> Option<u32> {
        self.lock().by_session.get(session).copied()
    }

    /// The id of `session`, assigning a free one if it has none yet. The caller records a new
    /// id in storage before using it (and [`HostIds::release`]s it if that fails).
    ///
    /// # Errors
    /// Every id of the range is taken or reserved.
    pub fn assign(&self, session: &SessionId) -> Result<u32, HostIdError> {
        let mut assigned = self.lock();
        if let Some(id) = assigned.by_session.get(session) {
            return Ok(*id);
        }
        let slots = u64::from(self.count);
        let start = if slots == 0 {
            0
        } else {
            stable_hash(session) % slots
        };
        let free = (0..slots)
            .map(|i| self.first + ((start + i) % slots) as u32)
            .find(|id| !self.reserved.contains(id) && !assigned.taken.contains(id))
            .ok_or(HostIdError::Exhausted {
                first: self.first,
                last: self.first + self.count.saturating_sub(1),
            })?;
        assigned.taken.insert(free);
        assigned.by_session.insert(session.clone(), free);
        Ok(free)
    }

    /// Gives `session`'s id back (the session was deleted, or recording it failed).
    pub fn release(&self, session: &SessionId) {
        let mut assigned = self.lock();
        if let Some(id) = assigned.by_session.remove(session)
            && !assigned.by_session.values().any(|other| *other == id)
        {
            assigned.taken.remove(&id);
        }
    }

    /// How many sessions hold an id.
    pub fn assigned(&self) -> usize {
        self.lock().by_session.len()
    }
}

/// How session identities are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidMode {
    /// Root mode: each session has its own host uid/gid.
    PerSession,
    /// Rootless: every session runs as the server's own uid (inside its own user namespace).
    Shared,
    /// `none`: the worker simply is the server's uid.
    Server,
}

impl UidMode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::PerSession => "per-session",
            Self::Shared => "shared",
            Self::Server => "server",
        }
    }
}

/// Ids in the host passwd and group databases: never handed to a session, so that a session's
/// files and processes never belong to a host user.
pub(super) fn host_database_ids() -> HashSet<u32> {
    let mut ids = HashSet::new();
    for file in ["/etc/passwd", "/etc/group"] {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
            if let Some(id) = line.split(':').nth(2).and_then(|v| v.parse().ok()) {
                ids.insert(id);
            }
        }
    }
    ids
}

impl Isolation {
    /// The host uid/gid of a session in root mode; `None` when sessions use the server's.
    /// The id was assigned and recorded in storage before (see [`crate::host_ids`]).
    ///
    /// # Errors
    /// Root mode, and the session has no id: it must never fall back to any other identity.
    pub fn session_ids(&self, session_id: &SessionId) -> std::io::Result<Option<(u32, u32)>> {
        if self.uid_mode != UidMode::PerSession {
            return Ok(None);
        }
        self.host_ids
            .get(session_id)
            .map(|id| Some((id, id)))
            .ok_or_else(|| std::io::Error::other(format!("session {session_id} has no host uid")))
    }

    /// The allocator of per-session host uids, in root mode.
    pub fn host_ids(&self) -> Option<&HostIds> {
        (self.uid_mode == UidMode::PerSession).then_some(&self.host_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(text: &str) -> SessionId {
        SessionId::parse(text).unwrap()
    }

    #[test]
    fn ids_are_unique_while_the_range_lasts() {
        // 9 ids for sessions (201..=209), 3 of them the host's.
        let ids = HostIds::new(200, 10, HashSet::from([203, 204, 209]));
        let mut seen = HashSet::new();
        for n in 0..6 {
            let id = ids.assign(&sid(&format!("session-{n}"))).unwrap();
            assert!((201..=209).contains(&id), "{id} out of range");
            assert!(![203, 204, 209].contains(&id), "{id} is a host id");
            assert!(seen.insert(id), "{id} handed out twice");
        }
        assert!(matches!(
            ids.assign(&sid("one-too-many")),
            Err(HostIdError::Exhausted {
                first: 201,
                last: 209
            })
        ));
        let freed = ids.get(&sid("session-2")).unwrap();
        ids.release(&sid("session-2"));
        assert_eq!(ids.assign(&sid("one-too-many")).unwrap(), freed);
        assert_eq!(ids.assigned(), 6);
    }

    #[test]
    fn ids_that_a_hash_would_share_are_apart() {
        // Two slots: the old hash put about half of all pairs on the same uid.
        let ids = HostIds::new(500, 3, HashSet::new());
        let a = ids.assign(&sid("V1StGXR8_Z5jdHi6B-myT")).unwrap();
        let b = ids.assign(&sid("another-session-id-01")).unwrap();
        assert_ne!(a, b);
        assert_eq!(HashSet::from([a, b]), HashSet::from([501, 502]));
    }

    #[test]
    fn an_assigned_id_is_stable_and_survives_a_reload() {
        let ids = HostIds::new(200_000, 65_536, HashSet::from([200_001]));
        let a = ids.assign(&sid("a")).unwrap();
        assert_eq!(
            ids.assign(&sid("a")).unwrap(),
            a,
            "asking again gives the same id"
        );
        assert_eq!(ids.get(&sid("a")), Some(a));
        assert_eq!(ids.get(&sid("b")), None);

        // A restarted server loads what storage recorded.
        let restarted = HostIds::new(200_000, 65_536, HashSet::from([200_001]));
        assert!(restarted.load([(sid("a"), a)]).is_empty());
        assert_eq!(restarted.get(&sid("a")), Some(a));
        assert_eq!(restarted.assign(&sid("a")).unwrap(), a);
        let b = restarted.assign(&sid("b")).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn clashing_records_are_reported() {
        let ids = HostIds::new(100, 10, HashSet::from([105]));
        let problems = ids.load([(sid("x"), 102), (sid("y"), 102), (sid("z"), 105)]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(ids.get(&sid("x")), Some(102));
        let fresh = ids.assign(&sid("w")).unwrap();
        assert!(fresh != 102 && fresh != 105);
    }

    #[test]
    fn a_session_without_a_recorded_uid_is_refused_in_root_mode() {
        let mut iso = super::Isolation {
            uid_mode: UidMode::PerSession,
            host_ids: HostIds::new(200_000, 65_536, HashSet::from([0])),
            ..super::Isolation::default()
        };
        assert!(iso.session_ids(&sid("V1StGXR8_Z5jdHi6B-myT")).is_err());
        let id = iso
            .host_ids()
            .unwrap()
            .assign(&sid("V1StGXR8_Z5jdHi6B-myT"))
            .unwrap();
        assert_eq!(
            iso.session_ids(&sid("V1StGXR8_Z5jdHi6B-myT")).unwrap(),
            Some((id, id))
        );
        assert!(id > 200_000 && id < 265_536);
        iso.uid_mode = UidMode::Shared;
        assert_eq!(iso.session_ids(&sid("x")).unwrap(), None);
        assert!(iso.host_ids().is_none());
    }
}
