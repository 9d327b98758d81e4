//! Test builds only: probe requests in flight towards a worker, for the in-jail probe server
//! the isolation suite drives (see `shared::probe`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use shared::probe::{Probe, ProbeAnswer, ProbeOutcome, ProbeRequest};
use shared::protocol::ToWorker;
use tokio::sync::oneshot;

use super::{WorkerError, WorkerHandle};

#[derive(Clone, Default)]
pub(super) struct Pending {
    next: Arc<AtomicU64>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<ProbeOutcome>>>>,
}

impl Pending {
    pub(super) fn deliver(&self, answer: ProbeAnswer) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&answer.id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer.outcome);
        }
    }
}

impl WorkerHandle {
    /// Runs `probe` inside this worker's jail and returns what it found.
    ///
    /// # Errors
    /// The worker is gone before it answered.
    pub async fn probe(&self, probe: Probe) -> Result<ProbeOutcome, WorkerError> {
        let id = self.probes.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.probes
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        self.send(ToWorker::Probe(ProbeRequest { id, probe }))
            .await?;
        tokio::select! {
            answer = rx => answer.map_err(|_| WorkerError::Closed),
            () = self.exited() => Err(WorkerError::Closed),
        }
    }
}
