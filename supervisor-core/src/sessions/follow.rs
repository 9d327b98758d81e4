//! Reading a session's events back out: live, in order and without gaps, replaying from
//! storage what a slow follower missed.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::Stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::Session;
use crate::bus::{BusEvent, Cursor, Lagged};
use crate::metrics::METRICS;
use crate::storage::SharedStorage;

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

impl Session {
    /// The session's events after `cursor`, live, in order, without gaps: events that fell out
    /// of the bus's ring are read back from storage. With `until_run_end`, the stream ends after
    /// the first `agent_run_end`; it also ends when the session is deleted or the server stops.
    pub fn follow(
        self: &Arc<Self>,
        storage: SharedStorage,
        shutdown: CancellationToken,
        cursor: Cursor,
        until_run_end: bool,
    ) -> impl Stream<Item = BusEvent> + Send + 'static {
        struct Follow {
            session: Arc<Session>,
            storage: SharedStorage,
            shutdown: CancellationToken,
            cursor: Cursor,
            pending: VecDeque<BusEvent>,
            done: bool,
        }
        let start = Follow {
            session: self.clone(),
            storage,
            shutdown,
            cursor,
            pending: VecDeque::new(),
            done: false,
        };
        futures::stream::unfold(start, move |mut f| async move {
            loop {
                if f.done {
                    return None;
                }
                if let Some(event) = f.pending.pop_front() {
                    f.done = until_run_end && event.ends_run;
                    return Some((event, f));
                }
                let batch = tokio::select! {
                    batch = f.cursor.next_batch(&f.session.bus) => batch?,
                    () = f.session.closed.cancelled() => return None,
                    () = f.shutdown.cancelled() => return None,
                };
                match batch {
                    Ok(events) => f.pending.extend(events),
                    Err(Lagged { after, oldest }) => {
                        METRICS.follower_lags.inc();
                        tracing::info!(session_id = %f.session.id, after, oldest, "follower fell behind the live ring; replaying from storage");
                        let stored = f
                            .storage
                            .events_after(&f.session.id, after, usize::MAX)
                            .await
                            .ok()?;
                        f.pending
                            .extend(stored.into_iter().filter(|e| e.seq < oldest).map(|e| {
                                BusEvent {
                                    ends_run: is_run_end(&e.json),
                                    seq: e.seq,
                                    json: e.json,
                                }
                            }));
                        f.cursor.skip_to(oldest - 1);
                    }
                }
            }
        })
    }
}

fn is_run_end(json: &str) -> bool {
    serde_json::from_str::<EventHead<'_>>(json).is_ok_and(|h| h.kind == "agent_run_end")
}
