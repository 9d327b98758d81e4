//! Server-sent event framing, in one place.
//!
//! Every agent event is written as a `data:` block followed by an `id: <seq>` block:
//!
//! ```text
//! data: {"id":"…","type":"user_message",…}
//!
//! id: 7
//!
//! ```
//!
//! Why two blocks: the official web UI splits the stream on blank lines and `JSON.parse`s
//! whatever follows `data: ` in a block, so an `id:` line inside the block would break it. A
//! block holding only `id:` is ignored by that UI, and for any SSE client it sets the last event
//! id *after* the data it names has arrived, so resuming from the last id seen never skips an
//! event. Comment blocks (`: ping`) keep idle connections alive.
//!
//! The follow stream (`/sessions/events/stream`) is read by EventSources and our own clients,
//! not by the official UI, so it uses the standard form with `id:` and `data:` in one block.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::bus::BusEvent;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// An agent event with its sequence number.
pub fn event_frame(event: &BusEvent) -> Bytes {
    Bytes::from(format!("data: {}\n\nid: {}\n\n", event.json, event.seq))
}

/// An agent event in the standard one-block form, for the follow stream
/// (`/sessions/events/stream`): its clients are EventSources and our own, not the official UI,
/// so `id` and `data` can share a block and every message carries its exact last event id.
pub(super) fn follow_frame(event: &BusEvent) -> Bytes {
    Bytes::from(format!("id: {}\ndata: {}\n\n", event.seq, event.json))
}

/// A server-made pseudo-event (no sequence number).
pub fn data_frame(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// Frames for `events`, as many per chunk as are ready at once: a fast run produces thousands
/// of deltas per wake-up, and one HTTP chunk each would dominate the cost of streaming them.
pub(super) fn batched(
    events: impl Stream<Item = BusEvent> + Send + 'static,
    frame: fn(&BusEvent) -> Bytes,
) -> impl Stream<Item = Bytes> + Send + 'static {
    events.ready_chunks(512).map(move |batch| {
        let mut out = Vec::with_capacity(batch.iter().map(|e| e.json.len() + 24).sum());
        for event in &batch {
            out.extend_from_slice(&frame(event));
        }
        Bytes::from(out)
    })
}

/// An SSE response that writes `frames` and ends when they end, with keep-alive comments.
pub fn response(frames: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let frames = Box::pin(frames);
    let body = futures::stream::unfold(
        (frames, tokio::time::interval(KEEP_ALIVE)),
        |(mut frames, mut tick)| async move {
            tick.reset();
            tokio::select! {
                frame = frames.next() => frame.map(|f| (Ok::<_, std::convert::Infallible>(f), (frames, tick))),
                _ = tick.tick() => Some((Ok(Bytes::from_static(b": ping\n\n")), (frames, tick))),
            }
        },
    );
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
