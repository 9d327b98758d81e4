//! The `file` backend: a directory of plain files that survive a crash of the process.
//!
//! ```text
//! <dir>/sessions/<id>.json   one record per session, replaced atomically (write, then rename)
//! <dir>/events/<id>.log      append-only, one event per line: "<seq> <event json>\n"
//! <dir>/events/<id>.seq      the highest sequence number reserved (see Storage::reserve_seq)
//! <dir>/events/<id>.live     the live run's streamed text, one record per line like the log
//! <dir>/sessions/<id>.uid    the session's host uid (root mode), replaced atomically
//! <dir>/tokens.json          every API token record (hashes, never secrets), replaced atomically
//! <dir>/share-links.json     every share link, replaced atomically (there are few)
//! <dir>/audit.log            the audit log, one JSON entry per line, appended; at
//!                            `AUDIT_KEEP` lines it becomes `audit.old.log` (the previous
//!                            one is dropped) and a new one begins
//! ```
//!
//! Only an index (id, `createdAt`, `updatedAt`) is kept in memory, built when the directory is
//! opened; a record is read from its file when it is asked for, so memory does not grow with
//! what the records hold, and a page of a listing reads only the records on it. Directories
//! are 0700 and files 0600 (see `crate::data_dir`).
//!
//! Why this layout: an event append is one `write` to one file, with no rewrite of anything
//! else, and a record update can never leave a half-written record behind. A crash can only
//! leave a torn last line in a log; it is detected when the log is opened, reported, and cut
//! off, and every complete line before it is kept. `updatedAt` is not rewritten on every event:
//! the log's modification time stands in for it when the directory is loaded.
//!
//! Writes reach the kernel before they are acknowledged, so they survive a crash of the
//! supervisor (including SIGKILL); they are not fsynced, so a power loss may lose the last ones.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use serde_json::{Map, Value};

use super::audit::AUDIT_KEEP;
use super::{
    AuditEntry, PageCursor, SessionInfo, ShareLink, Storage, StorageDescriptor, StorageError,
    StoredEvent, TokenRecord, check_metadata, recency_key,
};
use crate::data_dir;

pub struct FileStorage {
    dir: PathBuf,
    // Short critical sections of small file operations; no await inside.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every session's listing keys; the records stay on disk.
    sessions: HashMap<String, Keys>,
    /// `(createdAt, id)` of every session, for paging in creation order.
    by_creation: BTreeSet<(u64, String)>,
    /// Open logs, with the last seq they hold, opened on first use.
    logs: HashMap<String, Log>,
    /// Open live-text files, the same way.
    live: HashMap<String, Log>,
    /// Every share link (the file holds the same).
    share_links: Vec<ShareLink>,
    /// The last audit entry's id, and how many lines `audit.log` has.
    audit_last_id: u64,
    audit_lines: u64,
}

/// What listings need of a session without reading its record.
#[derive(Debug, Clone)]
struct Keys {
    created_at: u64,
    tenant: String,
    /// Kept here rather than in the record: an event bumps it without a record rewrite.
    updated_at: u64,
}

impl State {
    fn insert(&mut self, info: &SessionInfo) {
        self.sessions.insert(
            info.id.clone(),
            Keys {
                created_at: info.created_at,
                tenant: info.tenant.clone(),
                updated_at: info.updated_at,
            },
        );
        self.by_creation.insert((info.created_at, info.id.clone()));
    }
}

struct Log {
    file: File,
    last_seq: u64,
}

impl FileStorage {
    /// Opens (creating if needed) the store in `dir` and loads the session records.
    ///
    /// # Errors
    /// The directory cannot be created or read.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        for sub in ["sessions", "events"] {
            data_dir::create_dir_all(&dir.join(sub)).map_err(|e| StorageError::io(dir, e))?;
        }
        let mut state = State::default();
        let entries =
            std::fs::read_dir(dir.join("sessions")).map_err(|e| StorageError::io(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| StorageError::io(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let record = std::fs::read(&path).map_err(|e| StorageError::io(&path, e))?;
            match serde_json::from_slice::<SessionInfo>(&record) {
                Ok(mut info) => {
                    let log = dir.join("events").join(format!("{}.log", info.id));
                    if let Some(modified) = modified_ms(&log) {
                        info.updated_at = info.updated_at.max(modified);
                    }
                    state.insert(&info);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable session record skipped")
                }
            }
        }
        state.share_links = read_share_links(&dir.join(SHARE_LINKS))?;
        for name in [AUDIT_OLD, AUDIT] {
            let (last_id, lines) = scan_audit(&dir.join(name))?;
            state.audit_last_id = state.audit_last_id.max(last_id);
            state.audit_lines = lines;
        }
        tracing::info!(dir = %dir.display(), sessions = state.sessions.len(), "file storage opened");
        Ok(Self {
            dir: dir.to_owned(),
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join("sessions").join(format!("{id}.json"))
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir.join("events").join(format!("{id}.log"))
    }

    fn live_path(&self, id: &str) -> PathBuf {
        self.dir.join("events").join(format!("{id}.live"))
    }

    fn reservation_path(&self, id: &str) -> PathBuf {
        self.dir.join("events").join(format!("{id}.seq"))
    }

    fn host_id_path(&self, id: &str) -> PathBuf {
        self.dir.join("sessions").join(format!("{id}.uid"))
    }

    fn tokens_path(&self) -> PathBuf {
        self.dir.join("tokens.json")
    }

    /// Every token record; none when the file does not exist yet.
    fn read_tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        let path = self.tokens_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(StorageError::io(&path, e)),
        }
    }

    fn write_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StorageError> {
        let path = self.tokens_path();
        let bytes = serde_json::to_vec(tokens).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        replace_file(&path, &path.with_extension("json.tmp"), &bytes)
    }

    fn reserved(&self, id: &str) -> u64 {
        std::fs::read_to_string(self.reservation_path(id))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Writes a record to a temporary file and renames it over the old one, so a reader sees
    /// the old record or the new one, never part of one.
    fn write_record(&self, info: &SessionInfo) -> Result<(), StorageError> {
        let path = self.record_path(&info.id);
        let bytes = serde_json::to_vec(info).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        replace_file(&path, &path.with_extension("json.tmp"), &bytes)
    }

    /// A record as stored (its `updatedAt` may be older than the index's); `None` when there
    /// is no record file. Safe without the lock: records are only ever replaced whole.
    fn read_record(&self, id: &str) -> Result<Option<SessionInfo>, StorageError> {
        let path = self.record_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io(&path, e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))
    }

    /// The records of `ids` that are still indexed, in that order, with the index's `updatedAt`.
    /// The files are read outside the lock; a session deleted meanwhile is left out.
    fn read_records(&self, ids: &[String]) -> Result<Vec<SessionInfo>, StorageError> {
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(info) = self.read_record(id)? {
                records.push(info);
            }
        }
        let state = self.state();
        records.retain_mut(|info| match state.sessions.get(&info.id) {
            Some(keys) => {
                info.updated_at = keys.updated_at;
                true
            }
            None => false,
        });
        Ok(records)
    }

    /// The open log of `id`, opening it (and cutting a torn tail) on first use.
    fn log<'a>(
        &self,
        logs: &'a mut HashMap<String, Log>,
        id: &str,
    ) -> Result<&'a mut Log, StorageError> {
        if !logs.contains_key(id) {
            logs.insert(id.to_owned(), open_log(&self.log_path(id))?);
        }
        logs.get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))
    }
}

/// Opens a log for appending, cutting a torn last line first so the next line starts clean.
fn open_log(path: &Path) -> Result<Log, StorageError> {
    let (events, valid_len) = read_log(path)?;
    let mut file = data_dir::file_options()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(path, e))?
        .len();
    if len > valid_len {
        tracing::warn!(path = %path.display(), bytes = len - valid_len, "cutting a torn last line off an event log");
        file.set_len(valid_len)
            .map_err(|e| StorageError::io(path, e))?;
    }
    file.seek(SeekFrom::End(0))
        .map_err(|e| StorageError::io(path, e))?;
    let last_seq = events.last().map_or(0, |e| e.seq);
    Ok(Log { file, last_seq })
}

/// Appends `<seq> <json>` as one write, so a crash leaves at most this line torn.
fn append_line(
    log: &mut Log,
    id: &str,
    path: &Path,
    seq: u64,
    json: &str,
) -> Result<(), StorageError> {
    if seq <= log.last_seq {
        return Err(StorageError::OutOfOrder {
            session: id.to_owned(),
            seq,
        });
    }
    if json.contains('\n') {
        return Err(StorageError::Corrupt(
            "an event must be single-line JSON".into(),
        ));
    }
    let line = format!("{seq} {json}\n");
    log.file
        .write_all(line.as_bytes())
        .map_err(|e| StorageError::io(path, e))?;
    log.last_seq = seq;
    Ok(())
}

/// Reads a log: its complete, well-formed lines, and the length of the prefix that holds them.
/// A damaged line in the middle is reported and skipped; reading goes on after it.
fn read_log(path: &Path) -> Result<(Vec<StoredEvent>, u64), StorageError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(StorageError::io(path, e)),
    };
    let mut reader = BufReader::new(file);
    let mut events = Vec::new();
    let mut valid_len = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| StorageError::io(path, e))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            tracing::warn!(path = %path.display(), bytes = n, "event log ends with a torn line; it is ignored");
            break;
        }
        valid_len += n as u64;
        match parse_line(&line[..n - 1]) {
            Some(event)
                if events
                    .last()
                    .is_none_or(|last: &StoredEvent| last.seq < event.seq) =>
            {
                events.push(event)
            }
            _ => {
                tracing::warn!(path = %path.display(), offset = valid_len - n as u64, "damaged event line skipped")
            }
        }
    }
    Ok((events, valid_len))
}

fn parse_line(line: &[u8]) -> Option<StoredEvent> {
    let text = std::str::from_utf8(line).ok()?;
    let (seq, json) = text.split_once(' ')?;
    let seq = seq.parse().ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(json).ok()?;
    Some(StoredEvent {
        seq,
        json: json.into(),
    })
}

/// Writes `bytes` to `tmp` (0600) and renames it over `path`.
fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let mut file = data_dir::file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|e| StorageError::io(tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| StorageError::io(tmp, e))?;
    drop(file);
    std::fs::rename(tmp, path).map_err(|e| StorageError::io(path, e))
}

const SHARE_LINKS: &str = "share-links.json";
const AUDIT: &str = "audit.log";
const AUDIT_OLD: &str = "audit.old.log";

impl FileStorage {
    fn write_share_links(&self, links: &[ShareLink]) -> Result<(), StorageError> {
        let path = self.dir.join(SHARE_LINKS);
        let bytes = serde_json::to_vec(links).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        replace_file(&path, &path.with_extension("json.tmp"), &bytes)
    }
}

fn read_share_links(path: &Path) -> Result<Vec<ShareLink>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StorageError::io(path, e)),
    }
}

/// The audit entries of one file, oldest first, one at a time; a torn or damaged line is
/// skipped.
fn each_audit_entry(path: &Path, mut each: impl FnMut(AuditEntry)) -> Result<(), StorageError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io(path, e)),
    };
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| StorageError::io(path, e))?;
        if let Ok(entry) = serde_json::from_slice::<AuditEntry>(&line) {
            each(entry);
        }
    }
    Ok(())
}

/// The last id and the line count of an audit file. A torn last line (a crash during an append)
/// is ended, so the next entry starts on a line of its own.
fn scan_audit(path: &Path) -> Result<(u64, u64), StorageError> {
    let (mut last_id, mut lines) = (0, 0);
    each_audit_entry(path, |entry| {
        last_id = entry.id;
        lines += 1;
    })?;
    if let Ok(bytes) = std::fs::read(path)
        && bytes.last().is_some_and(|b| *b != b'\n')
    {
        let mut file = data_dir::file_options()
            .append(true)
            .open(path)
            .map_err(|e| StorageError::io(path, e))?;
        file.write_all(b"\n")
            .map_err(|e| StorageError::io(path, e))?;
    }
    Ok((last_id, lines))
}

fn modified_ms(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

#[async_trait::async_trait]
impl Storage for FileStorage {
    fn descriptor(&self) -> StorageDescriptor {
        StorageDescriptor {
            kind: "file",
            path: Some(self.dir.clone()),
            url: None,
        }
    }

    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError> {
        if let Some(metadata) = &info.metadata {
            check_metadata(metadata)?;
        }
        let mut state = self.state();
        if state.sessions.contains_key(&info.id) {
            return Err(StorageError::AlreadyExists(info.id));
        }
        // A stale log of an id that is being created anew must not become its history.
        for stale in [
            self.log_path(&info.id),
            self.reservation_path(&info.id),
            self.live_path(&info.id),
        ] {
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(|e| StorageError::io(&stale, e))?;
            }
        }
        self.write_record(&info)?;
        state.insert(&info);
        Ok(info)
    }

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError> {
        if !self.state().sessions.contains_key(id) {
            return Ok(None);
        }
        Ok(self.read_records(&[id.to_owned()])?.pop())
    }

    async fn sessions_page(
        &self,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        let ids: Vec<String> = {
            use std::ops::Bound::{Excluded, Unbounded};
            let state = self.state();
            let before = match after {
                Some(cursor) => Excluded((cursor.created_at, cursor.id.clone())),
                None => Unbounded,
            };
            state
                .by_creation
                .range((Unbounded, before))
                .rev()
                .take(limit)
                .map(|(_, id)| id.clone())
                .collect()
        };
        self.read_records(&ids)
    }

    async fn ids_by_recency(&self) -> Result<Vec<String>, StorageError> {
        let state = self.state();
        let mut keys: Vec<(&String, &Keys)> = state.sessions.iter().collect();
        keys.sort_unstable_by(|(a_id, a), (b_id, b)| {
            recency_key(a.updated_at, a.created_at, a_id).cmp(&recency_key(
                b.updated_at,
                b.created_at,
                b_id,
            ))
        });
        Ok(keys.into_iter().map(|(id, _)| id.clone()).collect())
    }

    async fn sessions_by_ids(&self, ids: &[String]) -> Result<Vec<SessionInfo>, StorageError> {
        self.read_records(ids)
    }

    async fn count_sessions(&self) -> Result<usize, StorageError> {
        Ok(self.state().sessions.len())
    }

    async fn merge_metadata(
        &self,
        id: &str,
        patch: Map<String, Value>,
        now: u64,
    ) -> Result<SessionInfo, StorageError> {
        // Under the lock: two merges must not both read the old record.
        let mut state = self.state();
        let keys = state
            .sessions
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        let mut info = self
            .read_record(id)?
            .ok_or_else(|| StorageError::Corrupt(format!("the record of session {id} is gone")))?;
        let mut metadata = info.metadata.take().unwrap_or_default();
        metadata.extend(patch);
        check_metadata(&metadata)?;
        info.metadata = Some(metadata);
        info.updated_at = now;
        self.write_record(&info)?;
        keys.updated_at = now;
        Ok(info)
    }

    async fn delete_session(&self, id: &str) -> Result<bool, StorageError> {
        let mut state = self.state();
        let Some(keys) = state.sessions.remove(id) else {
            return Ok(false);
        };
        state.by_creation.remove(&(keys.created_at, id.to_owned()));
        state.logs.remove(id);
        state.live.remove(id);
        if state.share_links.iter().any(|l| l.session_id == id) {
            state.share_links.retain(|l| l.session_id != id);
            self.write_share_links(&state.share_links)?;
        }
        // The record goes first: without it the session does not exist, whatever is left.
        let record = self.record_path(id);
        std::fs::remove_file(&record).map_err(|e| StorageError::io(&record, e))?;
        for file in [
            self.log_path(id),
            self.reservation_path(id),
            self.live_path(id),
            self.host_id_path(id),
        ] {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StorageError::io(&file, e));
                }
                _ => {}
            }
        }
        Ok(true)
    }

    async fn append_event(
        &self,
        id: &str,
        seq: u64,
        json: Arc<str>,
        now: u64,
    ) -> Result<(), StorageError> {
        let mut state = self.state();
        let State { sessions, logs, .. } = &mut *state;
        let info = sessions
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        let log = self.log(logs, id)?;
        append_line(log, id, &self.log_path(id), seq, &json)?;
        info.updated_at = now;
        Ok(())
    }

    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let path = self.log_path(id);
        // Read under the lock so a concurrent append is either fully in or fully out.
        let _state = self.state();
        let (events, _) = read_log(&path)?;
        let start = events.partition_point(|e| e.seq <= after);
        Ok(events.into_iter().skip(start).take(limit).collect())
    }

    async fn reserve_seq(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        let state = self.state();
        if !state.sessions.contains_key(id) {
            return Err(StorageError::NotFound(id.to_owned()));
        }
        if upto <= self.reserved(id) {
            return Ok(());
        }
        let path = self.reservation_path(id);
        replace_file(
            &path,
            &path.with_extension("seq.tmp"),
            upto.to_string().as_bytes(),
        )
    }

    async fn last_seq(&self, id: &str) -> Result<u64, StorageError> {
        let mut state = self.state();
        if !state.sessions.contains_key(id) {
            return Ok(0);
        }
        Ok(self
            .log(&mut state.logs, id)?
            .last_seq
            .max(self.reserved(id)))
    }

    async fn append_live_text(
        &self,
        id: &str,
        seq: u64,
        record: Arc<str>,
    ) -> Result<(), StorageError> {
        let mut state = self.state();
        if !state.sessions.contains_key(id) {
            return Err(StorageError::NotFound(id.to_owned()));
        }
        let path = self.live_path(id);
        let log = match state.live.entry(id.to_owned()) {
            std::collections::hash_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(open_log(&path)?),
        };
        append_line(log, id, &path, seq, &record)
    }

    async fn live_text_after(
        &self,
        id: &str,
        after: u64,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let path = self.live_path(id);
        let _state = self.state();
        let (records, _) = read_log(&path)?;
        let start = records.partition_point(|r| r.seq <= after);
        Ok(records.into_iter().skip(start).collect())
    }

    async fn clear_live_text(&self, id: &str, upto: u64) -> Result<(), StorageError> {
        let mut state = self.state();
        let path = self.live_path(id);
        let (records, _) = read_log(&path)?;
        let start = records.partition_point(|r| r.seq <= upto);
        if start == 0 {
            return Ok(());
        }
        // Reopened (and its torn tail cut) by the next append.
        state.live.remove(id);
        if start == records.len() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StorageError::io(&path, e))
                }
                _ => Ok(()),
            };
        }
        let mut kept = String::new();
        for record in &records[start..] {
            kept.push_str(&format!("{} {}\n", record.seq, record.json));
        }
        replace_file(&path, &path.with_extension("live.tmp"), kept.as_bytes())
    }

    async fn set_host_id(&self, id: &str, host_id: u32) -> Result<(), StorageError> {
        // Under the lock: a concurrent delete cannot remove the record between the check and
        // the write and leave a stray id file behind.
        let state = self.state();
        if !state.sessions.contains_key(id) {
            return Err(StorageError::NotFound(id.to_owned()));
        }
        let path = self.host_id_path(id);
        replace_file(
            &path,
            &path.with_extension("uid.tmp"),
            host_id.to_string().as_bytes(),
        )
    }

    async fn host_ids(&self) -> Result<Vec<(String, u32)>, StorageError> {
        let state = self.state();
        let mut ids = Vec::new();
        for id in state.sessions.keys() {
            let path = self.host_id_path(id);
            match std::fs::read_to_string(&path) {
                Ok(text) => match text.trim().parse() {
                    Ok(host_id) => ids.push((id.clone(), host_id)),
                    Err(_) => {
                        return Err(StorageError::Corrupt(format!(
                            "{} does not hold a uid",
                            path.display()
                        )));
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(&path, e)),
            }
        }
        Ok(ids)
    }

    async fn create_token(&self, token: TokenRecord) -> Result<(), StorageError> {
        // The state lock serialises the read-modify-write of the tokens file.
        let _state = self.state();
        let mut tokens = self.read_tokens()?;
        if tokens.iter().any(|t| t.id == token.id) {
            return Err(StorageError::AlreadyExists(token.id));
        }
        tokens.push(token);
        self.write_tokens(&tokens)
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StorageError> {
        Ok(self.read_tokens()?.into_iter().find(|t| t.id == id))
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        self.read_tokens()
    }

    async fn revoke_token(&self, id: &str, now: u64) -> Result<bool, StorageError> {
        let _state = self.state();
        let mut tokens = self.read_tokens()?;
        let Some(token) = tokens.iter_mut().find(|t| t.id == id) else {
            return Ok(false);
        };
        token.revoked_at.get_or_insert(now);
        self.write_tokens(&tokens)?;
        Ok(true)
    }
    async fn count_tenant_sessions(&self, tenant: &str) -> Result<usize, StorageError> {
        Ok(self
            .state()
            .sessions
            .values()
            .filter(|k| k.tenant == tenant)
            .count())
    }

    async fn create_share_link(&self, link: ShareLink) -> Result<(), StorageError> {
        let mut state = self.state();
        if !state.sessions.contains_key(&link.session_id) {
            return Err(StorageError::NotFound(link.session_id));
        }
        if state
            .share_links
            .iter()
            .any(|l| l.id == link.id || l.token_hash == link.token_hash)
        {
            return Err(StorageError::AlreadyExists(link.id));
        }
        let mut links = state.share_links.clone();
        links.push(link);
        self.write_share_links(&links)?;
        state.share_links = links;
        Ok(())
    }

    async fn share_link_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ShareLink>, StorageError> {
        Ok(self
            .state()
            .share_links
            .iter()
            .find(|l| l.token_hash == token_hash)
            .cloned())
    }

    async fn share_links(&self, tenant: &str) -> Result<Vec<ShareLink>, StorageError> {
        let mut links: Vec<ShareLink> = self
            .state()
            .share_links
            .iter()
            .filter(|l| l.tenant == tenant)
            .cloned()
            .collect();
        links.sort_unstable_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(links)
    }

    async fn revoke_share_link(&self, tenant: &str, id: &str) -> Result<bool, StorageError> {
        let mut state = self.state();
        let Some(at) = state
            .share_links
            .iter()
            .position(|l| l.id == id && l.tenant == tenant)
        else {
            return Ok(false);
        };
        let mut links = state.share_links.clone();
        links.remove(at);
        self.write_share_links(&links)?;
        state.share_links = links;
        Ok(true)
    }

    async fn append_audit(&self, mut entry: AuditEntry) -> Result<u64, StorageError> {
        let mut state = self.state();
        let path = self.dir.join(AUDIT);
        if state.audit_lines >= AUDIT_KEEP {
            let old = self.dir.join(AUDIT_OLD);
            std::fs::rename(&path, &old).map_err(|e| StorageError::io(&old, e))?;
            state.audit_lines = 0;
        }
        entry.id = state.audit_last_id + 1;
        let mut line =
            serde_json::to_vec(&entry).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        line.push(b'\n');
        let mut file = data_dir::file_options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StorageError::io(&path, e))?;
        file.write_all(&line)
            .map_err(|e| StorageError::io(&path, e))?;
        state.audit_last_id = entry.id;
        state.audit_lines += 1;
        Ok(entry.id)
    }

    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        // Under the lock, so a rotation cannot move entries between the two reads.
        let _state = self.state();
        let mut newest = std::collections::VecDeque::with_capacity(limit.min(1024));
        for name in [AUDIT_OLD, AUDIT] {
            each_audit_entry(&self.dir.join(name), |entry| {
                if limit > 0 && before.is_none_or(|b| entry.id < b) {
                    if newest.len() == limit {
                        newest.pop_front();
                    }
                    newest.push_back(entry);
                }
            })?;
        }
        Ok(newest.into_iter().rev().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Read;

    #[tokio::test]
    async fn a_torn_last_line_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(info).await.unwrap();
        store
            .append_event("s", 1, r#"{"type":"a"}"#.into(), 2)
            .await
            .unwrap();
        store
            .append_event("s", 2, r#"{"type":"b"}"#.into(), 3)
            .await
            .unwrap();
        drop(store);

        // Simulate a crash in the middle of the third write.
        let log = dir.path().join("events/s.log");
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(b"3 {\"type\":\"c").unwrap();
        drop(file);

        let store = FileStorage::open(dir.path()).unwrap();
        let seqs: Vec<u64> = store
            .events_after("s", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(store.last_seq("s").await.unwrap(), 2);
        store
            .append_event("s", 3, r#"{"type":"c"}"#.into(), 4)
            .await
            .unwrap();
        let mut text = String::new();
        File::open(&log).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(
            text.lines().count(),
            3,
            "the torn tail was cut before appending: {text:?}"
        );
    }

    #[tokio::test]
    async fn a_torn_live_text_line_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(info).await.unwrap();
        store
            .append_live_text("s", 4, r#"[{"text":"a"}]"#.into())
            .await
            .unwrap();
        drop(store);
        let live = dir.path().join("events/s.live");
        let mut file = OpenOptions::new().append(true).open(&live).unwrap();
        file.write_all(b"9 [{\"te").unwrap();
        drop(file);

        let store = FileStorage::open(dir.path()).unwrap();
        let seqs = |records: Vec<StoredEvent>| records.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.live_text_after("s", 0).await.unwrap()), [4]);
        store
            .append_live_text("s", 9, r#"[{"text":"b"}]"#.into())
            .await
            .unwrap();
        assert_eq!(seqs(store.live_text_after("s", 0).await.unwrap()), [4, 9]);
    }

    #[tokio::test]
    async fn a_damaged_middle_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(info).await.unwrap();
        drop(store);
        std::fs::write(
            dir.path().join("events/s.log"),
            "1 {\"a\":1}\ngarbage\n3 {\"c\":3}\n",
        )
        .unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let seqs: Vec<u64> = store
            .events_after("s", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 3]);
    }

    /// A page reads the records on it and no others; memory holds the index only.
    #[tokio::test]
    async fn a_page_reads_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        for n in 0..5u64 {
            let info = SessionInfo {
                id: format!("s{n}"),
                created_at: n,
                updated_at: n,
                workspace: "/w".into(),
                metadata: None,
                tenant: "default".into(),
            };
            store.create_session(info).await.unwrap();
        }
        // Records off the first page become unreadable: a page that read them would fail.
        for n in 0..3 {
            std::fs::write(dir.path().join(format!("sessions/s{n}.json")), "garbage").unwrap();
        }
        let page = store.sessions_page(None, 2).await.unwrap();
        let ids: Vec<&str> = page.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s4", "s3"]);
        assert_eq!(store.ids_by_recency().await.unwrap().len(), 5);
        assert!(matches!(
            store
                .sessions_page(Some(&PageCursor::after(&page[1])), 2)
                .await,
            Err(StorageError::Corrupt(_))
        ));
    }

    /// A record written before sessions had a tenant belongs to the default tenant.
    #[tokio::test]
    async fn a_record_without_a_tenant_is_the_default_tenants() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sessions")).unwrap();
        std::fs::write(
            dir.path().join("sessions/old.json"),
            r#"{"id":"old","createdAt":1,"updatedAt":2,"workspace":"/w/old"}"#,
        )
        .unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        assert_eq!(
            store.session("old").await.unwrap().unwrap().tenant,
            "default"
        );
        assert_eq!(store.count_tenant_sessions("default").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let store = FileStorage::open(&dir.path().join("store")).unwrap();
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(info).await.unwrap();
        store
            .append_event("s", 1, r#"{"a":1}"#.into(), 2)
            .await
            .unwrap();
        store.reserve_seq("s", 10).await.unwrap();
        // Live text, as appended and as rewritten when part of it is dropped.
        for seq in [11, 12] {
            store
                .append_live_text("s", seq, r#"[{"text":"a"}]"#.into())
                .await
                .unwrap();
        }
        store.clear_live_text("s", 11).await.unwrap();
        let other = SessionInfo {
            id: "u".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
            tenant: "default".into(),
        };
        store.create_session(other).await.unwrap();
        store
            .append_live_text("u", 3, r#"[{"text":"a"}]"#.into())
            .await
            .unwrap();
        nix::sys::stat::umask(old);
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join("store").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        for d in ["", "sessions", "events"] {
            assert_eq!(mode(d), 0o700, "{d}");
        }
        for f in [
            "sessions/s.json",
            "events/s.log",
            "events/s.seq",
            "events/s.live",
            "events/u.live",
        ] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
    }
}
