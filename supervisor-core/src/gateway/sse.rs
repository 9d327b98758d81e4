//! Server-sent events framing over a response body that arrives in arbitrary chunks (the
//! WHATWG `text/event-stream` rules that LLM providers use): `event:` and `data:` fields,
//! multi-line data, comments, `\n`, `\r\n` or `\r` line ends.
//!
//! Lines are cut at the byte level and only whole lines are decoded, so a UTF-8 character split
//! across two chunks is never mangled. A line longer than [`MAX_LINE`] is refused rather than
//! buffered without bound: the body comes from the network.

/// Longest line accepted (a base64 image in a non-standard server's chunk fits comfortably).
pub(super) const MAX_LINE: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SseEvent {
    /// The `event:` field; `message` when absent, as the standard says.
    pub event: String,
    pub data: String,
}

#[derive(Debug, thiserror::Error)]
#[error("an SSE line is longer than {MAX_LINE} bytes")]
pub(super) struct LineTooLong;

#[derive(Default)]
pub(super) struct SseParser {
    buffer: Vec<u8>,
    /// A `\r` ended the previous chunk: a `\n` starting the next one belongs to it.
    pending_cr: bool,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds one chunk; returns the events it completed, in order.
    ///
    /// # Errors
    /// A line grew beyond [`MAX_LINE`].
    pub(super) fn feed(&mut self, mut chunk: &[u8]) -> Result<Vec<SseEvent>, LineTooLong> {
        let mut events = Vec::new();
        if self.pending_cr {
            self.pending_cr = false;
            if chunk.first() == Some(&b'\n') {
                chunk = &chunk[1..];
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.buffer.extend_from_slice(&chunk[..end]);
            let line = std::mem::take(&mut self.buffer);
            self.line(&line, &mut events);
            if chunk[end] == b'\r' {
                match chunk.get(end + 1) {
                    Some(b'\n') => chunk = &chunk[end + 2..],
                    Some(_) => chunk = &chunk[end + 1..],
                    None => {
                        self.pending_cr = true;
                        chunk = &[];
                    }
                }
            } else {
                chunk = &chunk[end + 1..];
            }
        }
        self.buffer.extend_from_slice(chunk);
        if self.buffer.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        Ok(events)
    }

    /// The body ended: an event whose closing blank line never came is still delivered, because
    /// several servers end their last `data:` line with the connection instead.
    pub(super) fn finish(&mut self) -> Option<SseEvent> {
        let mut events = Vec::new();
        if !self.buffer.is_empty() {
            let line = std::mem::take(&mut self.buffer);
            self.line(&line, &mut events);
        }
        self.dispatch(&mut events);
        events.pop()
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(events);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if self.data.is_empty() {
            return;
        }
        events.push(SseEvent {
            event: event.unwrap_or_else(|| "message".into()),
            data: std::mem::take(&mut self.data).join("\n"),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(parser.feed(chunk).unwrap());
        }
        out.extend(parser.finish());
        out
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn frames_across_chunks_and_line_ends() {
        let got = all(&[
            b"data: {\"a\":",
            b"1}\n\n: OPENROUTER PROCESSING\n\nevent: ping\r",
            b"\ndata: {}\r\n\r\ndata: x\rdata: y\r\r",
            b"data: [DONE]\n\n",
        ]);
        assert_eq!(
            got,
            [
                ev("message", "{\"a\":1}"),
                ev("ping", "{}"),
                ev("message", "x\ny"),
                ev("message", "[DONE]")
            ]
        );
    }

    #[test]
    fn utf8_split_between_chunks_survives() {
        let text = "data: é🙂\n\n".as_bytes();
        let (a, b) = text.split_at(8);
        assert_eq!(all(&[a, b]), [ev("message", "é🙂")]);
    }

    #[test]
    fn last_event_without_blank_line_is_kept() {
        assert_eq!(all(&[b"data: [DONE]"]), [ev("message", "[DONE]")]);
        assert_eq!(all(&[b"event: x\n\n"]), []);
    }

    #[test]
    fn endless_line_is_refused() {
        let mut parser = SseParser::default();
        let big = vec![b'a'; MAX_LINE + 1];
        assert!(parser.feed(&big).is_err());
    }
}
