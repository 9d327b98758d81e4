//! What followers were shown of a live run's streamed text: kept durable, and turned into history
//! when a crash cuts the run short.
//!
//! Streaming deltas (`assistant_streaming_message`, and its thinking and tool-call siblings) are
//! never stored as events: the response's `assistant_message` (and `assistant_thinking_message`)
//! supersede them. But followers show the deltas as they come, and a crash of the server or of
//! the worker before those final events would take that text away. So the session's publisher
//! does not fan a delta out at once: it stages it here, with its text appended to the piece of
//! its message, and writes the batch's pieces as one live-text record
//! ([`crate::storage::Storage::append_live_text`]); only once that write has been acknowledged
//! does the batch reach the followers. A batch is written when the worker has nothing more
//! queued or when it is [`MAX_STAGED`] events long, so a fast stream costs one small write per
//! burst, not one per delta: awaiting a write per delta held one session on SQLite to about
//! 7,000 events/s, where a burst of a flood is a few hundred deltas and streams as fast as the
//! deltas are not stored at all.
//!
//! When a run was cut short, [`interrupted_events`] turns the records of its text that no final
//! event superseded into history: the partial reasoning as an `assistant_thinking_message`
//! (`isComplete: false`), the partial answer and tool calls as an `assistant_message` with
//! `finishReason: "interrupted"`, each with the deltas' `messageId`, so a client replaces what it
//! streamed with them instead of showing the text twice.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use shared::events::{Event, EventBody, FunctionCall, ToolCall, is_streaming_type};

use crate::bus::BusEvent;
use crate::storage::StoredEvent;

/// Most deltas staged before they are written even though the worker has more queued: bounds
/// the memory a flood holds and the delay before followers see it.
pub const MAX_STAGED: usize = 512;

/// The `finishReason` of an answer that a crash cut short.
pub const INTERRUPTED: &str = "interrupted";

/// The fields of an event the publisher looks at, read in one pass over the worker's JSON.
/// Everything else is skipped unparsed; the delta fields are kept raw and only read for deltas.
#[derive(Deserialize)]
pub struct EventHead<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(rename = "toolCallId", borrow, default)]
    tool_call_id: Option<&'a RawValue>,
    #[serde(rename = "toolName", borrow, default)]
    tool_name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the input unless it had escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

fn text<'a>(raw: Option<&'a RawValue>) -> Result<Option<Cow<'a, str>>, serde_json::Error> {
    raw.map(|raw| serde_json::from_str::<Text<'a>>(raw.get()).map(|t| t.0))
        .transpose()
}

/// What one streaming delta adds to its message.
pub struct Delta<'a> {
    kind: PieceKind,
    message_id: Cow<'a, str>,
    tool_call_id: Option<Cow<'a, str>>,
    tool_name: Option<Cow<'a, str>>,
    text: Cow<'a, str>,
}

/// An event a worker sent that cannot be published: the worker is at fault.
#[derive(Debug, thiserror::Error)]
pub enum InvalidEvent {
    #[error("not a JSON object")]
    NotAnObject,
    /// Not an object with a string `type`, or a delta whose text fields are not strings.
    #[error("{0}")]
    Malformed(#[from] serde_json::Error),
}

impl<'a> EventHead<'a> {
    pub fn parse(json: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The head of an event as a worker sent it: what publishing reads of it (a JSON object)
    /// before numbering it, in one pass. Its `type` decides whether it is stored; a streaming
    /// delta's text fields are read too.
    ///
    /// # Errors
    /// Not a JSON object with a string `type`.
    pub fn of(json: &'a str) -> Result<Self, InvalidEvent> {
        if !json.starts_with('{') {
            return Err(InvalidEvent::NotAnObject);
        }
        Ok(Self::parse(json)?)
    }

    /// A streaming delta: never stored as an event, staged until its text is.
    pub fn is_delta(&self) -> bool {
        is_streaming_type(&self.kind)
    }

    /// The text a delta adds. `None` for `final_answer_streaming`, which research agents send
    /// and our worker never does (the official UI ignores it too): it carries no text we keep.
    ///
    /// # Errors
    /// A delta whose text fields are not strings: it could not be kept, so it must not be shown.
    pub fn delta(&self) -> Result<Option<Delta<'a>>, serde_json::Error> {
        let (kind, body) = match self.kind.as_ref() {
            "assistant_streaming_message" => (PieceKind::Text, self.content),
            "assistant_streaming_thinking_message" => (PieceKind::Thinking, self.content),
            "assistant_streaming_tool_call" => (PieceKind::ToolCall, self.arguments),
            _ => return Ok(None),
        };
        let tool_call_id = text(self.tool_call_id)?;
        if kind == PieceKind::ToolCall && tool_call_id.is_none() {
            return Err(serde::de::Error::missing_field("toolCallId"));
        }
        Ok(Some(Delta {
            kind,
            message_id: text(self.message_id)?.unwrap_or_default(),
            tool_call_id: tool_call_id.filter(|_| kind == PieceKind::ToolCall),
            tool_name: text(self.tool_name)?.filter(|_| kind == PieceKind::ToolCall),
            text: text(body)?.unwrap_or_default(),
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum PieceKind {
    Text,
    Thinking,
    ToolCall,
}

/// The text consecutive deltas of one message (or one of its tool calls) added. A live-text
/// record is a JSON array of pieces.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Piece {
    kind: PieceKind,
    #[serde(default)]
    message_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    /// A tool call's name as the latest delta gave it (deltas carry the whole name so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_name: Option<String>,
    #[serde(default)]
    text: String,
}

impl Piece {
    fn continues(&self, delta: &Delta<'_>) -> bool {
        self.kind == delta.kind
            && self.message_id == delta.message_id
            && self.tool_call_id.as_deref() == delta.tool_call_id.as_deref()
    }
}

/// Deltas numbered but not yet shown to anyone, and the text they add.
#[derive(Default)]
pub struct Staged {
    events: Vec<BusEvent>,
    pieces: Vec<Piece>,
    /// Bytes of text the pieces hold.
    text_bytes: u64,
}

/// A batch of staged deltas ready to be written, then shown.
pub struct Batch {
    /// The highest seq among them.
    pub upto: u64,
    /// Their text as one live-text record; `None` when they carry none.
    pub record: Option<Arc<str>>,
    /// Bytes of text in the record (what [`Staged::add_text`] reported for its deltas).
    pub text_bytes: u64,
    pub events: Vec<BusEvent>,
}

impl Staged {
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Adds what `delta` says to the text of its message, and says how many bytes of text that
    /// is.
    pub fn add_text(&mut self, delta: &Delta<'_>) -> u64 {
        match self.pieces.last_mut() {
            Some(piece) if piece.continues(delta) => piece.text.push_str(&delta.text),
            _ => self.pieces.push(Piece {
                kind: delta.kind,
                message_id: delta.message_id.clone().into_owned(),
                tool_call_id: delta.tool_call_id.clone().map(Cow::into_owned),
                tool_name: None,
                text: delta.text.clone().into_owned(),
            }),
        }
        if let (Some(piece), Some(name)) = (self.pieces.last_mut(), &delta.tool_name)
            && !name.is_empty()
        {
            piece.tool_name = Some(name.clone().into_owned());
        }
        let added = delta.text.len() as u64;
        self.text_bytes += added;
        added
    }

    /// Holds the delta's event back until its batch is written.
    pub fn hold(&mut self, event: BusEvent) {
        self.events.push(event);
    }

    /// Everything staged, as one batch; `None` when nothing is.
    pub fn take(&mut self) -> Option<Batch> {
        let upto = self.events.last()?.seq;
        let record = (!self.pieces.is_empty()).then(|| {
            // Serialising plain strings cannot fail.
            serde_json::to_string(&self.pieces)
                .unwrap_or_default()
                .into()
        });
        self.pieces.clear();
        Some(Batch {
            upto,
            record,
            text_bytes: std::mem::take(&mut self.text_bytes),
            events: std::mem::take(&mut self.events),
        })
    }
}

/// One message's text as its deltas left it.
#[derive(Default)]
struct Partial {
    message_id: String,
    thinking: String,
    text: String,
    calls: Vec<ToolCall>,
}

#[derive(Deserialize)]
struct Settling {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "messageId", default)]
    message_id: Option<String>,
}

/// The history a cut-short run's streamed text becomes: for each message, in the order it
/// started streaming, its reasoning and its answer, unless the run's stored events (`run`,
/// everything after its `agent_run_start`) already hold their final form. `records` are the
/// run's live-text records, in order.
pub fn interrupted_events(run: &[StoredEvent], records: &[StoredEvent]) -> Vec<Event> {
    let mut messages: Vec<Partial> = Vec::new();
    for record in records {
        let pieces = match serde_json::from_str::<Vec<Piece>>(&record.json) {
            Ok(pieces) => pieces,
            Err(e) => {
                tracing::warn!(seq = record.seq, error = %e, "unreadable live-text record skipped");
                continue;
            }
        };
        for piece in pieces {
            let at = match messages
                .iter()
                .position(|m| m.message_id == piece.message_id)
            {
                Some(at) => at,
                None => {
                    messages.push(Partial {
                        message_id: piece.message_id.clone(),
                        ..Partial::default()
                    });
                    messages.len() - 1
                }
            };
            let message = &mut messages[at];
            match piece.kind {
                PieceKind::Text => message.text.push_str(&piece.text),
                PieceKind::Thinking => message.thinking.push_str(&piece.text),
                PieceKind::ToolCall => {
                    let id = piece.tool_call_id.unwrap_or_default();
                    let call = match message.calls.iter().position(|c| c.id == id) {
                        Some(at) => &mut message.calls[at],
                        None => {
                            message.calls.push(ToolCall {
                                id,
                                kind: "function".into(),
                                function: FunctionCall {
                                    name: String::new(),
                                    arguments: String::new(),
                                },
                            });
                            let last = message.calls.len() - 1;
                            &mut message.calls[last]
                        }
                    };
                    call.function.arguments.push_str(&piece.text);
                    if let Some(name) = piece.tool_name {
                        call.function.name = name;
                    }
                }
            }
        }
    }
    for event in run {
        let Ok(head) = serde_json::from_str::<Settling>(&event.json) else {
            continue;
        };
        let Some(message) = messages
            .iter_mut()
            .find(|m| head.message_id.as_deref() == Some(m.message_id.as_str()))
        else {
            continue;
        };
        match head.kind.as_str() {
            "assistant_message" => {
                message.text.clear();
                message.calls.clear();
            }
            "assistant_thinking_message" => message.thinking.clear(),
            _ => {}
        }
    }
    let mut events = Vec::new();
    for message in messages {
        let message_id = (!message.message_id.is_empty()).then_some(message.message_id);
        if !message.thinking.is_empty() {
            events.push(Event::new(EventBody::AssistantThinkingMessage {
                content: message.thinking,
                is_complete: false,
                thinking_duration_ms: None,
                message_id: message_id.clone().unwrap_or_default(),
                signature: None,
                redacted_data: None,
            }));
        }
        if !message.text.is_empty() || !message.calls.is_empty() {
            events.push(Event::new(EventBody::AssistantMessage {
                content: message.text,
                raw_content: None,
                tool_calls: (!message.calls.is_empty()).then_some(message.calls),
                finish_reason: Some(INTERRUPTED.into()),
                message_id,
                ttft_ms: None,
                ttlt_ms: None,
            }));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn stage(staged: &mut Staged, seq: u64, event: Value) {
        let json = event.to_string();
        let head = EventHead::parse(&json).unwrap();
        assert!(head.is_delta());
        if let Some(delta) = head.delta().unwrap() {
            staged.add_text(&delta);
        }
        staged.hold(BusEvent {
            seq,
            json: json.into(),
            ends_run: false,
        });
    }

    fn text(content: &str, message: &str) -> Value {
        json!({"id": "e", "type": "assistant_streaming_message", "content": content,
            "isComplete": false, "messageId": message, "timestamp": 1})
    }

    fn thinking(content: &str, message: &str) -> Value {
        json!({"id": "e", "type": "assistant_streaming_thinking_message", "content": content,
            "isComplete": false, "messageId": message, "timestamp": 1})
    }

    fn call(id: &str, name: &str, arguments: &str, message: &str) -> Value {
        json!({"id": "e", "type": "assistant_streaming_tool_call", "toolCallId": id,
            "toolName": name, "arguments": arguments, "isComplete": false, "messageId": message,
            "timestamp": 1})
    }

    fn stored(seq: u64, json: Arc<str>) -> StoredEvent {
        StoredEvent { seq, json }
    }

    fn body(event: &Event) -> Value {
        serde_json::from_str(&event.to_json()).unwrap()
    }

    #[test]
    fn consecutive_deltas_of_a_message_become_one_piece() {
        let mut staged = Staged::default();
        stage(&mut staged, 5, thinking("hm", "m1"));
        stage(&mut staged, 6, text("a \"quoted\"", "m1"));
        stage(&mut staged, 7, text(" b", "m1"));
        stage(&mut staged, 8, call("c1", "", "{\"pa", "m1"));
        stage(&mut staged, 9, call("c1", "write_file", "th\":1", "m1"));
        assert_eq!(staged.len(), 5);
        let batch = staged.take().unwrap();
        assert_eq!(batch.upto, 9);
        assert_eq!(
            batch.text_bytes,
            ("hm".len() + "a \"quoted\" b".len() + "{\"path\":1".len()) as u64
        );
        assert_eq!(batch.events.len(), 5);
        let record: Value = serde_json::from_str(&batch.record.unwrap()).unwrap();
        assert_eq!(
            record,
            json!([
                {"kind": "thinking", "messageId": "m1", "text": "hm"},
                {"kind": "text", "messageId": "m1", "text": "a \"quoted\" b"},
                {"kind": "toolCall", "messageId": "m1", "toolCallId": "c1",
                    "toolName": "write_file", "text": "{\"path\":1"},
            ])
        );
        assert!(staged.take().is_none(), "a batch is taken once");
    }

    #[test]
    fn non_deltas_and_bad_deltas_are_told_apart() {
        let json = json!({"id": "e", "type": "user_message", "content": [{"type": "text"}],
            "timestamp": 1})
        .to_string();
        let head = EventHead::parse(&json).unwrap();
        assert!(!head.is_delta());
        assert!(head.delta().unwrap().is_none());

        let json = json!({"type": "assistant_streaming_message", "content": 5}).to_string();
        assert!(EventHead::parse(&json).unwrap().delta().is_err());
        let json = json!({"type": "assistant_streaming_tool_call", "arguments": "x"}).to_string();
        assert!(
            EventHead::parse(&json).unwrap().delta().is_err(),
            "a tool-call delta names its call"
        );
        let json =
            json!({"type": "final_answer_streaming", "content": "x", "isDeepResearch": false})
                .to_string();
        let head = EventHead::parse(&json).unwrap();
        assert!(head.is_delta() && head.delta().unwrap().is_none());
    }

    #[test]
    fn unsettled_text_becomes_interrupted_history_in_streaming_order() {
        let mut staged = Staged::default();
        stage(&mut staged, 3, text("done", "m0"));
        stage(&mut staged, 5, thinking("let me", "m1"));
        let first = staged.take().unwrap();
        stage(&mut staged, 6, thinking(" think", "m1"));
        stage(&mut staged, 8, text("half an", "m1"));
        stage(&mut staged, 9, call("c1", "write_file", "{\"pa", "m1"));
        stage(&mut staged, 10, text(" answer", "m1"));
        let second = staged.take().unwrap();
        let records = [
            stored(first.upto, first.record.unwrap()),
            stored(second.upto, second.record.unwrap()),
        ];
        // m0 was answered in full before the crash; m1's reasoning was not yet settled.
        let run = [stored(
            4,
            json!({"type": "assistant_message", "messageId": "m0", "content": "done"})
                .to_string()
                .into(),
        )];
        let events: Vec<Value> = interrupted_events(&run, &records)
            .iter()
            .map(body)
            .collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0]["type"], "assistant_thinking_message");
        assert_eq!(events[0]["content"], "let me think");
        assert_eq!(events[0]["isComplete"], false);
        assert_eq!(events[0]["messageId"], "m1");
        assert_eq!(events[1]["type"], "assistant_message");
        assert_eq!(events[1]["content"], "half an answer");
        assert_eq!(events[1]["finishReason"], "interrupted");
        assert_eq!(events[1]["messageId"], "m1");
        assert_eq!(
            events[1]["toolCalls"],
            json!([{"id": "c1", "type": "function",
                "function": {"name": "write_file", "arguments": "{\"pa"}}])
        );
    }

    #[test]
    fn settled_parts_are_not_repeated() {
        let mut staged = Staged::default();
        stage(&mut staged, 5, thinking("reasoned", "m1"));
        stage(&mut staged, 7, text("answer", "m1"));
        let batch = staged.take().unwrap();
        let records = [stored(batch.upto, batch.record.unwrap())];
        let thought = stored(
            6,
            json!({"type": "assistant_thinking_message", "messageId": "m1", "content": "reasoned"})
                .to_string()
                .into(),
        );
        let events = interrupted_events(std::slice::from_ref(&thought), &records);
        assert_eq!(events.len(), 1);
        assert_eq!(body(&events[0])["type"], "assistant_message");
        let answered = stored(
            8,
            json!({"type": "assistant_message", "messageId": "m1", "content": "answer"})
                .to_string()
                .into(),
        );
        assert!(interrupted_events(&[thought, answered], &records).is_empty());
        assert!(interrupted_events(&[], &[]).is_empty());
        assert!(
            interrupted_events(&[], &[stored(3, "not json".into())]).is_empty(),
            "a damaged record is skipped"
        );
    }
}
