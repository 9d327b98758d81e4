//! The default backend: everything in process memory, gone when the process ends.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};

use super::audit::AUDIT_KEEP;
use super::{
    AuditEntry, PageCursor, SessionInfo, ShareLink, Storage, StorageDescriptor, StorageError,
    StoredEvent, TokenRecord, check_metadata, recency_key,
};

#[derive(Default)]
pub struct MemoryStorage {
    // A std mutex is right here: every critical section is a short map operation with no await.
    sessions: Mutex<HashMap<String, Entry>>,
    /// API tokens, oldest first.
    tokens: Mutex<Vec<TokenRecord>>,
    audit: Mutex<Audit>,
}

#[derive(Default)]
struct Audit {
    /// The newest entries, oldest first.
    entries: VecDeque<AuditEntry>,
    last_id: u64,
}

struct Entry {
    info: SessionInfo,
    events: Vec<StoredEvent>,
    reserved: u64,
    live_text: Vec<StoredEvent>,
    host_id: Option<u32>,
    /// Its share links, so they go with it.
    share_links: Vec<ShareLink>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Storage for MemoryStorage {
    fn descriptor(&self) -> StorageDescriptor {
        StorageDescriptor {
            kind: "memory",
            path: None,
            url: None,
        }
    }

    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError> {
        if let Some(metadata) = &info.metadata {
            check_metadata(metadata)?;
        }
        let mut map = self.map();
        if map.contains_key(&info.id) {
            return Err(StorageError::AlreadyExists(info.id));
        }
        map.insert(
            info.id.clone(),
            Entry {
                info: info.clone(),
                events: Vec::new(),
                reserved: 0,
                live_text: Vec::new(),
                host_id: None,
                share_links: Vec::new(),
            },
        );
        Ok(info)
    }

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError> {
        Ok(self.map().get(id).map(|e| e.info.clone()))
    }

    async fn sessions_page(
        &self,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        let map = self.map();
        let mut keys: Vec<(u64, &str)> = map
            .values()
            .map(|e| (e.info.created_at, e.info.id.as_str()))
            .filter(|(created, id)| after.is_none_or(|c| c.precedes(*created, id)))
            .collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        Ok(keys
            .into_iter()
            .take(limit)
            .filter_map(|(_, id)| map.get(id).map(|e| e.info.clone()))
            .collect())
    }

    async fn ids_by_recency(&self) -> Result<Vec<String>, StorageError> {
        let map = self.map();
        let mut infos: Vec<&SessionInfo> = map.values().map(|e| &e.info).collect();
        infos.sort_unstable_by(|a, b| {
            recency_key(a.updated_at, a.created_at, &a.id).cmp(&recency_key(
                b.updated_at,
                b.created_at,
                &b.id,
            ))
        });
        Ok(infos.into_iter().map(|i| i.id.clone()).collect())
    }

    async fn sessions_by_ids(&self, ids: &[String]) -> Result<Vec<SessionInfo>, StorageError> {
        let map = self.map();
        Ok(ids
            .iter()
            .filter_map(|id| map.get(id).map(|e| e.info.clone()))
            .collect())
    }

    async fn count_sessions(&self) -> Result<usize, StorageError> {
        Ok(self.map().len())
    }

    async fn merge_metadata(
        &self,
        id: &str,
        patch: Map<String, Value>,
        now: u64,
    ) -> Result<SessionInfo, StorageError> {
        let mut map = self.map();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        let mut metadata = entry.info.metadata.clone().unwrap_or_default();
        metadata.extend(patch);
        check_metadata(&metadata)?;
        entry.info.metadata = Some(metadata);
        entry.info.updated_at = now;
        Ok(entry.info.clone())
    }

    async fn delete_session(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.map().remove(id).is_some())
    }

    async fn append_event(
        &self,
        id: &str,
        seq: u64,
        json: Arc<str>,
        now: u64,
    ) -> Result<(), StorageError> {
        let mut map = self.map();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        if entry.events.last().is_some_and(|last| last.seq >= seq) {
            return Err(StorageError::OutOfOrder {
                session: id.to_owned(),
                seq,
            });
        }
        entry.events.push(StoredEvent { seq, json });
        entry.info.updated_at = now;
        Ok(())
    }

    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let map = self.map();
        let Some(entry) = map.get(id) else {
            return Ok(Vec::new());
        };
        let start = entry.events.partition_point(|e| e.seq <= after);
        Ok(entry.events[start..].iter().take(limit).cloned().collect())
    }

    async fn reserve_seq(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        let mut map = self.map();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        entry.reserved = entry.reserved.max(upto);
        Ok(())
    }

    async fn last_seq(&self, id: &str) -> Result<u64, StorageError> {
        Ok(self.map().get(id).map_or(0, |e| {
            e.events.last().map_or(0, |last| last.seq).max(e.reserved)
        }))
    }

    async fn append_live_text(
        &self,
        id: &str,
        seq: u64,
        record: Arc<str>,
    ) -> Result<(), StorageError> {
        let mut map = self.map();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        if entry.live_text.last().is_some_and(|last| last.seq >= seq) {
            return Err(StorageError::OutOfOrder {
                session: id.to_owned(),
                seq,
            });
        }
        entry.live_text.push(StoredEvent { seq, json: record });
        Ok(())
    }

    async fn live_text_after(
        &self,
        id: &str,
        after: u64,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let map = self.map();
        let Some(entry) = map.get(id) else {
            return Ok(Vec::new());
        };
        let start = entry.live_text.partition_point(|r| r.seq <= after);
        Ok(entry.live_text[start..].to_vec())
    }

    async fn clear_live_text(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        if let Some(entry) = self.map().get_mut(id) {
            let keep = entry.live_text.partition_point(|r| r.seq <= upto);
            entry.live_text.drain(..keep);
            // A long run's records are dead weight once it ended; an idle session holds none.
            entry.live_text.shrink_to_fit();
        }
        Ok(())
    }

    async fn set_host_id(&self, id: &str, host_id: u32) -> Result<(), StorageError> {
        let mut map = self.map();
        let entry = map
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        entry.host_id = Some(host_id);
        Ok(())
    }

    async fn host_ids(&self) -> Result<Vec<(String, u32)>, StorageError> {
        Ok(self
            .map()
            .iter()
            .filter_map(|(id, e)| e.host_id.map(|h| (id.clone(), h)))
            .collect())
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        if tokens.iter().any(|t| t.id == token.id) {
            return Err(StorageError::AlreadyExists(token.id));
        }
        tokens.push(token);
        Ok(())
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StorageError> {
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(tokens.iter().find(|t| t.id == id).cloned())
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        Ok(self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }

    async fn revoke_token(&self, id: &str, now: u64) -> Result<bool, StorageError> {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(match tokens.iter_mut().find(|t| t.id == id) {
            Some(token) => {
                token.revoked_at.get_or_insert(now);
                true
            }
            None => false,
        })
    }

    async fn count_tenant_sessions(&self, tenant: &str) -> Result<usize, StorageError> {
        Ok(self
            .map()
            .values()
            .filter(|e| e.info.tenant == tenant)
            .count())
    }

    async fn create_share_link(&self, link: ShareLink) -> Result<(), StorageError> {
        let mut map = self.map();
        if map
            .values()
            .flat_map(|e| &e.share_links)
            .any(|l| l.id == link.id || l.token_hash == link.token_hash)
        {
            return Err(StorageError::AlreadyExists(link.id));
        }
        let entry = map
            .get_mut(&link.session_id)
            .ok_or_else(|| StorageError::NotFound(link.session_id.clone()))?;
        entry.share_links.push(link);
        Ok(())
    }

    async fn share_link_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ShareLink>, StorageError> {
        Ok(self
            .map()
            .values()
            .flat_map(|e| &e.share_links)
            .find(|l| l.token_hash == token_hash)
            .cloned())
    }

    async fn share_links(&self, tenant: &str) -> Result<Vec<ShareLink>, StorageError> {
        let mut links: Vec<ShareLink> = self
            .map()
            .values()
            .flat_map(|e| &e.share_links)
            .filter(|l| l.tenant == tenant)
            .cloned()
            .collect();
        links.sort_unstable_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(links)
    }

    async fn revoke_share_link(&self, tenant: &str, id: &str) -> Result<bool, StorageError> {
        let mut map = self.map();
        for entry in map.values_mut() {
            if let Some(at) = entry
                .share_links
                .iter()
                .position(|l| l.id == id && l.tenant == tenant)
            {
                entry.share_links.remove(at);
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn append_audit(&self, mut entry: AuditEntry) -> Result<u64, StorageError> {
        let mut audit = self.audit.lock().unwrap_or_else(PoisonError::into_inner);
        audit.last_id += 1;
        entry.id = audit.last_id;
        audit.entries.push_back(entry);
        while audit.entries.len() as u64 > AUDIT_KEEP {
            audit.entries.pop_front();
        }
        Ok(audit.last_id)
    }

    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        let audit = self.audit.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(audit
            .entries
            .iter()
            .rev()
            .filter(|e| before.is_none_or(|b| e.id < b))
            .take(limit)
            .cloned()
            .collect())
    }
}
