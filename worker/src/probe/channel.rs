//! A hostile worker on its own channel (T51, T54): bytes that are not a frame, and a flood of
//! well-formed events. Both are written on fd 3 before the probe's answer; the supervisor is
//! expected to stop the worker, so the answer may never arrive.

use serde_json::json;
use shared::frame::{encode, forge};
use shared::probe::RawFrame;
use shared::protocol::FromWorker;

use super::Reply;
use super::answer::Answer;

/// T51: a length prefix with nothing like it behind it, or a whole frame of random bytes.
pub(super) fn raw(frame: RawFrame) -> Reply {
    let bytes = match frame {
        RawFrame::Prefix(declared) => forge(declared, &[0u8; 16]),
        // The prefix announces exactly the payload, so the supervisor reads the whole thing
        // and has to make sense of it.
        RawFrame::Random(len) => forge(len, &garbage(len as usize)),
    };
    Reply {
        raw: Some(bytes),
        answer: Answer::ok(serde_json::Value::Null),
    }
}

/// `len` bytes that decode as nothing in particular (xorshift: garbage, not secrets, so no need
/// for the kernel's randomness).
fn garbage(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ shared::ids::now_ms();
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// T54: `count` `system` events of `bytes` each, as fast as the channel takes them, to run
/// into the session's limits on stored bytes and event rate.
pub(super) fn events(count: u64, bytes: u64) -> Reply {
    let filler = "z".repeat(usize::try_from(bytes).unwrap_or(0));
    let mut frames = Vec::new();
    for i in 0..count {
        let event = json!({
            "id": format!("flood-{i}"), "type": "system",
            "timestamp": shared::ids::now_ms(), "level": "info", "message": filler,
        });
        let frame = FromWorker::Event {
            json: event.to_string(),
        };
        match encode(&frame) {
            Ok(encoded) => frames.extend_from_slice(&encoded),
            Err(e) => return Answer::new(false, 0, e.to_string()).into(),
        }
    }
    Reply {
        raw: Some(frames),
        answer: Answer::ok(count),
    }
}
