//! The event bridge: every event a session's worker emits is numbered, stored, then fanned
//! out, in that order (ARCHITECTURE decision 4), so a follower never sees what a crash would
//! take away. Streaming deltas are staged and shown once their text is stored (see
//! `live_text`); a run cut short, by its worker or by the server, is closed in the log like
//! every run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use shared::events::{Event, EventBody, RunStatus, SystemLevel};
use shared::ids::{SessionId, now_ms};

use super::Session;
use crate::bus::BusEvent;
use crate::live_text::{self, EventHead, InvalidEvent};
use crate::metrics::METRICS;
use crate::storage::{SharedStorage, StorageError};

/// Sequence numbers reserved in storage at a time (see `Storage::reserve_seq`).
pub(super) const SEQ_RESERVATION: u64 = 4096;
/// Events a session's bus keeps after a run ends, for followers that are a little behind.
const RING_KEEP_AFTER_RUN: usize = 64;

/// A session's sequence numbers: the last one handed out, and how far storage has promised
/// that none will be reused; and the streamed text of its running run (see `live_text`).
pub(super) struct Numbering {
    last: u64,
    reserved: u64,
    /// Deltas numbered but not yet shown: their text is stored first.
    staged: live_text::Staged,
    /// The seq of the running run's `agent_run_start`: its live text is what comes after.
    run_start: Option<u64>,
    /// Bytes of live-text records stored and not yet dropped (they count toward the session's
    /// stored total until they are). Dropped when the run ends; a failed drop is retried then.
    live_text_bytes: u64,
}

impl Numbering {
    /// Numbering after `last_seq`. Nothing is reserved yet in this process: the first event
    /// reserves a block.
    pub(super) fn after(last_seq: u64) -> Self {
        Self {
            last: last_seq,
            reserved: last_seq,
            staged: live_text::Staged::default(),
            run_start: None,
            live_text_bytes: 0,
        }
    }
}

/// Why an event from a worker was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(#[from] InvalidEvent),
    #[error("event outside of a run")]
    NoRun,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Deserialize)]
struct RunEndStatus {
    status: RunStatus,
}

#[derive(Deserialize)]
struct EventHeadTimed<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    timestamp: u64,
}

impl Session {
    /// Numbers, stores and fans out one event. A streaming delta is only staged: followers get
    /// it once its text is stored (see `live_text`), at the latest before the next stored event.
    ///
    /// # Errors
    /// An invalid event, an event outside any run, or a storage failure; the event is then
    /// neither stored nor delivered.
    pub async fn publish(&self, json: String) -> Result<(), PublishError> {
        let head = EventHead::of(&json)?;
        self.publish_as(&json, head).await
    }

    /// [`Session::publish`] for an event whose head the caller has read already
    /// ([`EventHead::of`]).
    ///
    /// # Errors
    /// As [`Session::publish`].
    pub async fn publish_as(&self, json: &str, head: EventHead<'_>) -> Result<(), PublishError> {
        let delta = if head.is_delta() {
            Some(head.delta().map_err(InvalidEvent::from)?)
        } else {
            None
        };
        let kind = head.kind;
        let mut numbering = self.publisher.lock().await;
        if self.inner.lock().await.run.is_none() {
            return Err(PublishError::NoRun);
        }
        if let Some(delta) = delta {
            let seq = self.next_seq(&mut numbering, &self.ctx.storage).await?;
            numbering.last = seq;
            if let Some(delta) = &delta {
                let added = numbering.staged.add_text(delta);
                self.stored_bytes.fetch_add(added, Ordering::AcqRel);
            }
            drop(delta);
            let json: Arc<str> = json.into();
            if let Some(agio) = &self.ctx.agio {
                agio.observe(&self.id, &kind, &json);
            }
            numbering.staged.hold(BusEvent {
                seq,
                json,
                ends_run: false,
            });
            if numbering.staged.len() >= live_text::MAX_STAGED {
                self.flush(&mut numbering, &self.ctx.storage).await;
            }
            return Ok(());
        }
        // Followers get the deltas before the event that follows them.
        self.flush(&mut numbering, &self.ctx.storage).await;
        let ends_run = kind == "agent_run_end";
        let event = self
            .record(&mut numbering, &self.ctx.storage, json.into(), ends_run)
            .await?;
        if kind == "agent_run_start" {
            numbering.run_start = Some(event.seq);
        }
        if let Some(agio) = &self.ctx.agio {
            agio.observe(&self.id, &kind, &event.json);
        }
        let end_seq = event.seq;
        if ends_run {
            let status = serde_json::from_str::<RunEndStatus>(&event.json)
                .map_or(RunStatus::Error, |e| e.status);
            self.finish_run(status).await;
        }
        self.bus.publish(event);
        if ends_run {
            self.bus.trim(RING_KEEP_AFTER_RUN);
            numbering.run_start = None;
            self.drop_live_text(&mut numbering, &self.ctx.storage, end_seq)
                .await;
        }
        Ok(())
    }

    /// Drops the live text of a run the log has closed (records up to `upto`): it will never be
    /// read again. A failure only leaves records behind that recovery ignores; they stay
    /// counted, and the next run's end tries again.
    async fn drop_live_text(&self, numbering: &mut Numbering, storage: &SharedStorage, upto: u64) {
        if numbering.live_text_bytes == 0 {
            return;
        }
        match storage.clear_live_text(&self.id, upto).await {
            Ok(()) => {
                let dropped = std::mem::take(&mut numbering.live_text_bytes);
                self.stored_bytes.fetch_sub(dropped, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::warn!(session_id = %self.id, error = %e, "could not drop the live text of an ended run");
            }
        }
    }

    /// Writes the text of the staged deltas, then shows them to followers. Deltas whose text
    /// could not be stored are dropped, never shown: a follower must not see what a crash would
    /// take away. (Their seqs stay unused, as those of missed deltas may.)
    async fn flush(&self, numbering: &mut Numbering, storage: &SharedStorage) {
        let Some(batch) = numbering.staged.take() else {
            return;
        };
        if let Some(record) = batch.record {
            let len = record.len() as u64;
            if let Err(e) = storage.append_live_text(&self.id, batch.upto, record).await {
                tracing::warn!(session_id = %self.id, error = %e, deltas = batch.events.len(), "streamed text could not be stored; its deltas are dropped");
                self.stored_bytes
                    .fetch_sub(batch.text_bytes, Ordering::AcqRel);
                return;
            }
            METRICS.live_text_writes.inc();
            // The text was counted when it was staged; the record's framing is counted now.
            self.stored_bytes
                .fetch_add(len.saturating_sub(batch.text_bytes), Ordering::AcqRel);
            numbering.live_text_bytes += len;
        }
        self.bus.publish_all(batch.events);
    }

    /// Shows the staged deltas once their text is stored. The worker's connection calls this
    /// whenever it has no further frame queued, so a burst of deltas costs one write.
    pub(super) async fn flush_deltas(&self) {
        let mut numbering = self.publisher.lock().await;
        self.flush(&mut numbering, &self.ctx.storage).await;
    }

    /// The next sequence number (not yet taken: the caller sets `last`), reserving a block in
    /// storage when the reservation is used up.
    async fn next_seq(
        &self,
        numbering: &mut Numbering,
        storage: &SharedStorage,
    ) -> Result<u64, StorageError> {
        let seq = numbering.last + 1;
        METRICS.events_published.inc();
        if seq > numbering.reserved {
            let upto = numbering.reserved.max(numbering.last) + SEQ_RESERVATION;
            storage.reserve_seq(&self.id, upto).await?;
            numbering.reserved = upto;
        }
        Ok(seq)
    }

    /// Gives a stored event the next `seq` and stores it. The caller holds the publisher lock
    /// (`numbering`) and hands the returned event to the bus.
    async fn record(
        &self,
        numbering: &mut Numbering,
        storage: &SharedStorage,
        json: Arc<str>,
        ends_run: bool,
    ) -> Result<BusEvent, StorageError> {
        let seq = self.next_seq(numbering, storage).await?;
        storage
            .append_event(&self.id, seq, json.clone(), now_ms())
            .await?;
        self.stored_bytes
            .fetch_add(json.len() as u64, Ordering::AcqRel);
        METRICS.events_stored.inc();
        numbering.last = seq;
        Ok(BusEvent {
            seq,
            json,
            ends_run,
        })
    }

    /// A run whose `agent_run_start` has no `agent_run_end` in the log was cut short by a crash
    /// of the server. It is closed the way a crashed worker's run is, so the log stays
    /// well-bracketed and the model context stays valid; what it had streamed becomes history
    /// first. The same reading of the log counts the session's stored bytes.
    pub(super) async fn close_interrupted_run(
        &self,
        storage: &SharedStorage,
    ) -> Result<(), StorageError> {
        let mut numbering = self.publisher.lock().await;
        let events = storage.events_after(&self.id, 0, usize::MAX).await?;
        let bytes: u64 = events.iter().map(|e| e.json.len() as u64).sum();
        self.stored_bytes.store(bytes, Ordering::Release);
        // (index and seq of its agent_run_start, its timestamp, iterations so far)
        let mut open: Option<(usize, u64, u64, u32)> = None;
        for (index, event) in events.iter().enumerate() {
            let Ok(head) = serde_json::from_str::<EventHeadTimed<'_>>(&event.json) else {
                continue;
            };
            match head.kind.as_ref() {
                "agent_run_start" => open = Some((index, event.seq, head.timestamp, 0)),
                "agent_run_end" => open = None,
                "assistant_message" => {
                    if let Some((.., iterations)) = open.as_mut() {
                        *iterations += 1;
                    }
                }
                _ => {}
            }
        }
        let Some((index, start_seq, started, mut iterations)) = open else {
            return Ok(());
        };
        tracing::warn!(session_id = %self.id, "closing a run the server stopped in the middle of");
        let records = storage.live_text_after(&self.id, start_seq).await?;
        numbering.live_text_bytes = records.iter().map(|r| r.json.len() as u64).sum();
        self.stored_bytes
            .fetch_add(numbering.live_text_bytes, Ordering::AcqRel);
        let mut history = live_text::interrupted_events(&events[index + 1..], &records);
        iterations += history
            .iter()
            .filter(|e| matches!(e.body, EventBody::AssistantMessage { .. }))
            .count() as u32;
        let elapsed = Duration::from_millis(now_ms().saturating_sub(started));
        let reason = "the server stopped during the run";
        let details = serde_json::json!({"kind": "run_interrupted", "reason": reason});
        history.extend(closing_events(
            &self.id, reason, details, iterations, elapsed,
        ));
        let mut end_seq = numbering.last;
        for event in history {
            let ends_run = matches!(event.body, EventBody::AgentRunEnd { .. });
            let recorded = self
                .record(&mut numbering, storage, event.to_json().into(), ends_run)
                .await?;
            end_seq = recorded.seq;
            self.bus.publish(recorded);
        }
        self.drop_live_text(&mut numbering, storage, end_seq).await;
        Ok(())
    }

    /// Turns what a lost run streamed, and no final event superseded, into history: it goes
    /// into the log before the run's closing events.
    pub(super) async fn record_interrupted_text(
        &self,
        storage: &SharedStorage,
    ) -> Result<(), StorageError> {
        let mut numbering = self.publisher.lock().await;
        self.flush(&mut numbering, storage).await;
        let Some(start) = numbering
            .run_start
            .filter(|_| numbering.live_text_bytes > 0)
        else {
            return Ok(());
        };
        let records = storage.live_text_after(&self.id, start).await?;
        let run = storage.events_after(&self.id, start, usize::MAX).await?;
        for event in live_text::interrupted_events(&run, &records) {
            let recorded = self
                .record(&mut numbering, storage, event.to_json().into(), false)
                .await?;
            self.bus.publish(recorded);
        }
        Ok(())
    }
}

/// How a run that its agent could not finish is closed: an error `system` event, then
/// `agent_run_end` with status `error` (ARCHITECTURE decision 5).
pub(super) fn closing_events(
    session_id: &SessionId,
    reason: &str,
    details: Value,
    iterations: u32,
    elapsed: Duration,
) -> [Event; 2] {
    let mut message = reason.to_owned();
    if let Some(first) = message.get(..1) {
        message.replace_range(..1, &first.to_uppercase());
    }
    [
        Event::new(EventBody::System {
            level: SystemLevel::Error,
            message,
            details: Some(details),
        }),
        Event::new(EventBody::AgentRunEnd {
            session_id: session_id.to_string(),
            iterations,
            elapsed_ms: elapsed.as_millis() as u64,
            status: RunStatus::Error,
        }),
    ]
}
