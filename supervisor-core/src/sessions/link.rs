//! How a worker's connection reaches its session: the session is the worker's event sink
//! (`workers::SessionLink`), so the worker code never names sessions.

use std::path::Path;

use shared::ids::SessionId;

use super::{PublishError, Session};
use crate::live_text::{EventHead, InvalidEvent};
use crate::workers::{SessionLink, StopCause};

impl SessionLink for Session {
    fn id(&self) -> &SessionId {
        &self.id
    }

    fn tenant(&self) -> &str {
        &self.tenant
    }

    fn workspace(&self) -> &Path {
        &self.workspace
    }

    fn stored_bytes(&self) -> u64 {
        Session::stored_bytes(self)
    }

    async fn publish(&self, json: &str, head: EventHead<'_>) -> Result<(), InvalidEvent> {
        match self.publish_as(json, head).await {
            Ok(()) => Ok(()),
            Err(PublishError::Invalid(e)) => Err(e),
            // Not the worker's fault: the event is lost, the worker carries on.
            Err(other) => {
                tracing::warn!(error = %other, "event dropped");
                Ok(())
            }
        }
    }

    async fn flush_deltas(&self) {
        Session::flush_deltas(self).await;
    }

    async fn set_result(&self, run_id: &str, json: String) {
        Session::set_result(self, run_id, json).await;
    }

    async fn note_model_request(&self) {
        Session::note_model_request(self).await;
    }

    async fn worker_exited(&self, generation: u64, reason: String, cause: Option<StopCause>) {
        Session::worker_exited(self, generation, reason, cause).await;
    }
}
