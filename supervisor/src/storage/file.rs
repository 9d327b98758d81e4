//! The `file` backend: a directory of plain files that survive a crash of the process.
//!
//! ```text
//! <dir>/sessions/<id>.json   one record per session, replaced atomically (write, then rename)
//! <dir>/events/<id>.log      append-only, one event per line: "<seq> <event json>\n"
//! <dir>/events/<id>.seq      the highest sequence number reserved (see Storage::reserve_seq)
//! <dir>/sessions/<id>.uid    the session's host uid (root mode), replaced atomically
//! ```
//!
//! Why this layout: an event append is one `write` to one file, with no rewrite of anything
//! else, and a record update can never leave a half-written record behind. A crash can only
//! leave a torn last line in a log; it is detected when the log is opened, reported, and cut
//! off, and every complete line before it is kept. `updatedAt` is not rewritten on every event:
//! the log's modification time stands in for it when the directory is loaded.
//!
//! Writes reach the kernel before they are acknowledged, so they survive a crash of the
//! supervisor (including SIGKILL); they are not fsynced, so a power loss may lose the last ones.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use serde_json::{Map, Value};

use super::{SessionInfo, Storage, StorageDescriptor, StorageError, StoredEvent};

pub struct FileStorage {
    dir: PathBuf,
    // Short critical sections of small file operations; no await inside.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, SessionInfo>,
    /// Open logs, with the last seq they hold, opened on first use.
    logs: HashMap<String, Log>,
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
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| StorageError::io(dir, e))?;
        }
        let mut sessions = HashMap::new();
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
                    sessions.insert(info.id.clone(), info);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable session record skipped")
                }
            }
        }
        tracing::info!(dir = %dir.display(), sessions = sessions.len(), "file storage opened");
        Ok(Self {
            dir: dir.to_owned(),
            state: Mutex::new(State {
                sessions,
                logs: HashMap::new(),
            }),
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

    fn reservation_path(&self, id: &str) -> PathBuf {
        self.dir.join("events").join(format!("{id}.seq"))
    }

    fn host_id_path(&self, id: &str) -> PathBuf {
        self.dir.join("sessions").join(format!("{id}.uid"))
    }

    fn reserved(&self, id: &str) -> u64 {
        std::fs::read_to_string(self.reservation_path(id))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Writes a record to a temporary file and renames it over the old one.
    fn write_record(&self, info: &SessionInfo) -> Result<(), StorageError> {
        let path = self.record_path(&info.id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(info).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(|e| StorageError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io(&path, e))
    }

    /// The open log of `id`, opening it (and cutting a torn tail) on first use.
    fn log<'a>(
        &self,
        logs: &'a mut HashMap<String, Log>,
        id: &str,
    ) -> Result<&'a mut Log, StorageError> {
        if !logs.contains_key(id) {
            let path = self.log_path(id);
            let (events, valid_len) = read_log(&path)?;
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| StorageError::io(&path, e))?;
            let len = file
                .metadata()
                .map_err(|e| StorageError::io(&path, e))?
                .len();
            if len > valid_len {
                tracing::warn!(path = %path.display(), bytes = len - valid_len, "cutting a torn last line off an event log");
                file.set_len(valid_len)
                    .map_err(|e| StorageError::io(&path, e))?;
            }
            file.seek(SeekFrom::End(0))
                .map_err(|e| StorageError::io(&path, e))?;
            let last_seq = events.last().map_or(0, |e| e.seq);
            logs.insert(id.to_owned(), Log { file, last_seq });
        }
        logs.get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))
    }
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
        }
    }

    async fn create_session(&self, info: SessionInfo) -> Result<SessionInfo, StorageError> {
        let mut state = self.state();
        if state.sessions.contains_key(&info.id) {
            return Err(StorageError::AlreadyExists(info.id));
        }
        // A stale log of an id that is being created anew must not become its history.
        for stale in [self.log_path(&info.id), self.reservation_path(&info.id)] {
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(|e| StorageError::io(&stale, e))?;
            }
        }
        self.write_record(&info)?;
        state.sessions.insert(info.id.clone(), info.clone());
        Ok(info)
    }

    async fn session(&self, id: &str) -> Result<Option<SessionInfo>, StorageError> {
        Ok(self.state().sessions.get(id).cloned())
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, StorageError> {
        let mut all: Vec<SessionInfo> = self.state().sessions.values().cloned().collect();
        super::sort_by_recency(&mut all);
        Ok(all)
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
        let mut state = self.state();
        let mut info = state
            .sessions
            .get(id)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        info.metadata.get_or_insert_with(Map::new).extend(patch);
        info.updated_at = now;
        self.write_record(&info)?;
        state.sessions.insert(id.to_owned(), info.clone());
        Ok(info)
    }

    async fn delete_session(&self, id: &str) -> Result<bool, StorageError> {
        let mut state = self.state();
        if state.sessions.remove(id).is_none() {
            return Ok(false);
        }
        state.logs.remove(id);
        // The record goes first: without it the session does not exist, whatever is left.
        let record = self.record_path(id);
        std::fs::remove_file(&record).map_err(|e| StorageError::io(&record, e))?;
        for file in [
            self.log_path(id),
            self.reservation_path(id),
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
        let State { sessions, logs } = &mut *state;
        let info = sessions
            .get_mut(id)
            .ok_or_else(|| StorageError::NotFound(id.to_owned()))?;
        let log = self.log(logs, id)?;
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
        // One write per event: a crash leaves at most this line torn.
        let line = format!("{seq} {json}\n");
        log.file
            .write_all(line.as_bytes())
            .map_err(|e| StorageError::io(&self.log_path(id), e))?;
        log.last_seq = seq;
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
        let tmp = path.with_extension("seq.tmp");
        std::fs::write(&tmp, upto.to_string()).map_err(|e| StorageError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io(&path, e))
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

    async fn set_host_id(&self, id: &str, host_id: u32) -> Result<(), StorageError> {
        // Under the lock: a concurrent delete cannot remove the record between the check and
        // the write and leave a stray id file behind.
        let state = self.state();
        if !state.sessions.contains_key(id) {
            return Err(StorageError::NotFound(id.to_owned()));
        }
        let path = self.host_id_path(id);
        let tmp = path.with_extension("uid.tmp");
        std::fs::write(&tmp, host_id.to_string()).map_err(|e| StorageError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io(&path, e))
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
}

#[cfg(test)]
mod tests {
    use super::*;
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
    async fn a_damaged_middle_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStorage::open(dir.path()).unwrap();
        let info = SessionInfo {
            id: "s".into(),
            created_at: 1,
            updated_at: 1,
            workspace: "/w".into(),
            metadata: None,
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
}
