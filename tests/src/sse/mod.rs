//! The one SSE reader of the tests: splits a body into blocks, parses each block as the server
//! writes them, and pairs query-stream data blocks with the `id:` block that follows them.
//!
//! Three layers, each usable alone: [`Splitter`] cuts bytes into blocks without allocating per
//! block (the benchmark counts events with it), [`parse_block`] reads one block without parsing
//! its JSON, and [`FrameReader`] turns blocks into [`Frame`]s. [`SseStream`] drives a
//! [`FrameReader`] from an HTTP response.

use std::collections::VecDeque;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

mod stream;

pub use stream::SseStream;

/// One SSE frame: optional `id:` and the JSON `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<u64>,
    pub data: Value,
}

impl Frame {
    /// The event's `type` ("" if missing).
    pub fn ty(&self) -> &str {
        self.data["type"].as_str().unwrap_or_default()
    }
}

/// One SSE block as the server writes them, its JSON not parsed yet.
///
/// Query streams write a data block as exactly one `data: <json>` line, because that is all
/// the official web UI understands (it `JSON.parse`s everything after `data: `), followed by an
/// `id:` block; the follow stream (`/sessions/events/stream`) uses the standard `id: <seq>` +
/// `data: <json>` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block<'a> {
    /// Only comment lines (keep-alives).
    Comment,
    /// An `id: <seq>` block on its own: the id of the data block before it.
    Id(u64),
    /// A `data: <json>` block, with its id when the block carries one.
    Data { id: Option<u64>, data: &'a str },
}

/// Parses one block (its text without the blank line that ends it). Comment lines are skipped;
/// what is left must be `data: <json>`, `id: <seq>`, or `id: <seq>` then `data: <json>`.
pub fn parse_block(text: &str) -> Result<Block<'_>> {
    let fields = || text.split('\n').filter(|l| !l.starts_with(':'));
    if fields().all(str::is_empty) {
        return Ok(Block::Comment);
    }
    let mut lines = fields();
    let (first, second, third) = (lines.next(), lines.next(), lines.next());
    let parse_id = |id: &str| {
        id.trim()
            .parse::<u64>()
            .with_context(|| format!("SSE id is not a u64: {id:?}"))
    };
    match (first, second, third) {
        (Some(line), None, _) => {
            if let Some(id) = line.strip_prefix("id: ") {
                return Ok(Block::Id(parse_id(id)?));
            }
            if let Some(data) = line.strip_prefix("data: ") {
                return Ok(Block::Data { id: None, data });
            }
            bail!("SSE block is neither `data: <json>` nor `id: <seq>`: {text:?}")
        }
        (Some(id_line), Some(data_line), None)
            if id_line.starts_with("id: ") && data_line.starts_with("data: ") =>
        {
            Ok(Block::Data {
                id: Some(parse_id(&id_line["id: ".len()..])?),
                data: &data_line["data: ".len()..],
            })
        }
        _ => bail!(
            "SSE block is neither `data: <json>`, `id: <seq>`, nor `id: <seq>` + `data: <json>`: {text:?}"
        ),
    }
}

/// Every block of a whole body, such as curl printed it, the last one even without the blank
/// line that would end it (so a body cut short shows as an error, not as fewer events).
pub fn parse_body(text: &str) -> impl Iterator<Item = Result<Block<'_>>> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(parse_block)
}

/// Cuts a byte stream into SSE blocks as it arrives. `\r` is dropped; the bytes are copied once
/// into one buffer and each block is handed out as a slice of it.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Where the next block starts.
    start: usize,
    /// Up to where `buf` holds no blank line (a search resumes here).
    scanned: usize,
}

impl Splitter {
    /// Adds bytes read from the body.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        if bytes.contains(&b'\r') {
            self.buf
                .extend(bytes.iter().copied().filter(|b| *b != b'\r'));
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete block, without its blank line.
    pub fn next_block(&mut self) -> Option<&[u8]> {
        let from = self.scanned.max(self.start);
        match blank_line(&self.buf[from..]) {
            Some(at) => {
                let (begin, end) = (self.start, from + at);
                self.start = end + 2;
                self.scanned = self.start;
                Some(&self.buf[begin..end])
            }
            None => {
                // A blank line may straddle the next push.
                self.scanned = self.buf.len().saturating_sub(1).max(self.start);
                None
            }
        }
    }

    /// What follows the last complete block (empty when the body ended cleanly).
    pub fn rest(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Where the first blank line (`\n\n`) starts.
fn blank_line(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = bytes[from..].iter().position(|&b| b == b'\n') {
        let at = from + at;
        if bytes.get(at + 1) == Some(&b'\n') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Turns a body into frames as it arrives. A query-stream data block is held back until its
/// `id:` block (or the next data block, or the end of the body) has been read.
#[derive(Debug, Default)]
pub struct FrameReader {
    blocks: Splitter,
    ready: VecDeque<Frame>,
    /// A data frame whose `id:` block may still follow.
    held: Option<Frame>,
}

impl FrameReader {
    /// Adds bytes read from the body and parses the blocks they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<()> {
        self.blocks.push(bytes);
        while let Some(block) = self.blocks.next_block() {
            let text = std::str::from_utf8(block).context("SSE block is not UTF-8")?;
            match parse_block(text)? {
                Block::Comment => {}
                Block::Id(id) => {
                    let held = self
                        .held
                        .take()
                        .with_context(|| format!("SSE id block {id} follows no data block"))?;
                    ensure!(held.id.is_none(), "SSE data block got two ids");
                    self.ready.push_back(Frame {
                        id: Some(id),
                        ..held
                    });
                }
                Block::Data { id, data } => {
                    let data = serde_json::from_str(data)
                        .with_context(|| format!("SSE data is not JSON: {data:?}"))?;
                    let frame = Frame { id, data };
                    if let Some(previous) = self.held.take() {
                        self.ready.push_back(previous);
                    }
                    // A frame that carries its id is complete; one without may get it next.
                    if frame.id.is_some() {
                        self.ready.push_back(frame);
                    } else {
                        self.held = Some(frame);
                    }
                }
            }
        }
        Ok(())
    }

    /// The next complete frame, if one was read.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.ready.pop_front()
    }

    /// The body ended: releases a held frame; fails if the body stopped inside a block.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(held) = self.held.take() {
            self.ready.push_back(held);
        }
        let rest = String::from_utf8_lossy(self.blocks.rest());
        ensure!(
            rest.trim().is_empty(),
            "SSE stream ended with an incomplete frame: {rest:?}"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blocks_of_both_stream_shapes() {
        assert_eq!(parse_block(": keep-alive").unwrap(), Block::Comment);
        assert_eq!(parse_block("id: 7").unwrap(), Block::Id(7));
        assert_eq!(
            parse_block("data: {}").unwrap(),
            Block::Data {
                id: None,
                data: "{}"
            }
        );
        assert_eq!(
            parse_block("id: 3\ndata: {\"a\":1}").unwrap(),
            Block::Data {
                id: Some(3),
                data: "{\"a\":1}"
            }
        );
        assert!(parse_block("event: x\ndata: {}").is_err());
        assert!(parse_block("data: {}\nid: 3").is_err());
        assert!(parse_block("id: x").is_err());
    }

    #[test]
    fn splitter_finds_blank_lines_across_pushes() {
        let mut s = Splitter::default();
        s.push(b"data: 1\n");
        assert!(s.next_block().is_none());
        s.push(b"\ndata: 2\r\n\r\nid");
        assert_eq!(s.next_block(), Some(&b"data: 1"[..]));
        assert_eq!(s.next_block(), Some(&b"data: 2"[..]));
        assert!(s.next_block().is_none());
        assert_eq!(s.rest(), b"id");
    }

    #[test]
    fn frames_pair_data_with_the_following_id() {
        let mut r = FrameReader::default();
        r.push(b"data: {\"type\":\"session_created\"}\n\ndata: {\"type\":\"a\"}\n\nid: 4\n\n")
            .unwrap();
        r.push(b"id: 5\ndata: {\"type\":\"b\"}\n\n: ping\n\ndata: {\"type\":\"c\"}\n\n")
            .unwrap();
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame() {
            frames.push((f.id, f.data));
        }
        r.finish().unwrap();
        while let Some(f) = r.next_frame() {
            frames.push((f.id, f.data));
        }
        assert_eq!(
            frames,
            [
                (None, json!({"type": "session_created"})),
                (Some(4), json!({"type": "a"})),
                (Some(5), json!({"type": "b"})),
                (None, json!({"type": "c"})),
            ]
        );
    }

    #[test]
    fn a_lone_id_or_a_cut_body_is_an_error() {
        assert!(FrameReader::default().push(b"id: 1\n\n").is_err());
        let mut r = FrameReader::default();
        r.push(b"data: {\"type\"").unwrap();
        assert!(r.finish().is_err());
    }
}
