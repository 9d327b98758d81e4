//! `read_file {path, offset?, limit?}`: the raw text (no line numbers: the UI shows the result
//! as the file), or an image part for png/jpeg/gif/webp, within the limits below.

use std::io::{BufRead, BufReader, Read};

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BINARY_SNIFF_BYTES, Context, Tool, ToolError, check_range, cut_chars, parse};
use crate::agent::workspace::{FsError, io_error};

pub(super) const TOOL: Tool = Tool {
    name: "read_file",
    description: "Read a file from the workspace. Text comes back as is (at most 2000 lines or \
                  256 KiB per call; use offset/limit for more); png, jpeg, gif and webp images \
                  come back as images.",
    schema,
    run,
};

const DEFAULT_LINES: u64 = 2000;
const MAX_LINES: u64 = 10_000;
const MAX_OUTPUT_BYTES: usize = 256 * 1024;
const MAX_LINE_CHARS: usize = 2000;
/// Bytes of one line kept while scanning: enough for 2000 characters of any width.
const MAX_LINE_BYTES: usize = MAX_LINE_CHARS * 4 + 4;
const MAX_IMAGE_BYTES: u64 = 5 * 1024 * 1024;
/// Bytes scanned between two looks at the cancellation token.
const CANCEL_CHECK_BYTES: usize = 1024 * 1024;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "offset": {"type": "integer", "minimum": 1, "description": "1-based line to start at"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10000, "description": "Maximum number of lines (default 2000)"},
        },
        "required": ["path"],
        "additionalProperties": false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
    offset: Option<u64>,
    limit: Option<u64>,
}

fn run(cx: &Context<'_>, arguments: &Value) -> Result<Value, ToolError> {
    let args: Args = parse(TOOL.name, arguments)?;
    if let Some(offset) = args.offset {
        check_range(TOOL.name, "offset", offset, 1, u64::MAX)?;
    }
    if let Some(limit) = args.limit {
        check_range(TOOL.name, "limit", limit, 1, MAX_LINES)?;
    }
    let path = cx.ws.resolve(&args.path)?;
    let given = path.given().to_owned();
    let (file, stat) = cx.ws.open_file(&path)?;
    let size = stat.st_size as u64;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let head = reader.fill_buf().map_err(|e| io_error(&e, &given))?;
    let head = &head[..head.len().min(BINARY_SNIFF_BYTES)];
    if let Some(mime) = image_type(head) {
        if size > MAX_IMAGE_BYTES {
            return Err(ToolError::TooLarge {
                size,
                limit: MAX_IMAGE_BYTES,
            });
        }
        let bytes = read_all(cx, &mut reader, MAX_IMAGE_BYTES, &given)?;
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        return Ok(json!([{"type": "image", "data": data, "mimeType": mime}]));
    }
    if head.contains(&0) {
        return Err(ToolError::Binary { path: given, size });
    }
    let window = Window {
        first: args.offset.unwrap_or(1),
        max_lines: args.limit.unwrap_or(DEFAULT_LINES),
    };
    let page = read_lines(cx, &mut reader, &window, &given, size)?;
    let mut parts = vec![json!({"type": "text", "text": page.text})];
    if page.cut || args.offset.is_some() || args.limit.is_some() {
        let note = if page.total == 0 {
            "[The file is empty.]".to_owned()
        } else if page.shown == 0 {
            format!(
                "[Offset {} is past the end of the file ({} lines).]",
                window.first, page.total
            )
        } else {
            format!(
                "[Lines {}-{} of {}. Use offset/limit to read more.]",
                window.first, page.last, page.total
            )
        };
        parts.push(json!({"type": "text", "text": note}));
    }
    Ok(Value::Array(parts))
}

/// The image type of a file, from its first bytes: the extension may lie, the content does not.
fn image_type(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if head.starts_with(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

fn read_all(
    cx: &Context<'_>,
    reader: &mut impl Read,
    limit: u64,
    path: &str,
) -> Result<Vec<u8>, ToolError> {
    let mut bytes = Vec::new();
    let mut chunk = vec![0; CANCEL_CHECK_BYTES];
    loop {
        if cx.cancel.is_cancelled() {
            return Err(FsError::Aborted.into());
        }
        let n = reader.read(&mut chunk).map_err(|e| io_error(&e, path))?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&chunk[..n]);
        if bytes.len() as u64 > limit {
            return Err(ToolError::TooLarge {
                size: bytes.len() as u64,
                limit,
            });
        }
    }
}

struct Window {
    first: u64,
    max_lines: u64,
}

/// What one call returns of the file.
struct Page {
    text: String,
    /// Lines returned.
    shown: u64,
    /// The number of the last line returned.
    last: u64,
    /// Lines in the whole file.
    total: u64,
    /// Whether anything inside or after the window was left out or shortened.
    cut: bool,
}

/// Scans the whole file once: the lines of the window are kept (within the byte and line-length
/// limits), the others only counted, so the note can say how long the file is.
fn read_lines(
    cx: &Context<'_>,
    reader: &mut impl BufRead,
    window: &Window,
    path: &str,
    size: u64,
) -> Result<Page, ToolError> {
    let mut page = Page {
        text: String::new(),
        shown: 0,
        last: 0,
        total: 0,
        cut: false,
    };
    let mut full = false;
    let mut line = Vec::new();
    let mut scanned = 0;
    while let Some(ending) = next_line(reader, &mut line, &mut scanned, path)? {
        if scanned >= CANCEL_CHECK_BYTES {
            scanned = 0;
            if cx.cancel.is_cancelled() {
                return Err(FsError::Aborted.into());
            }
        }
        page.total += 1;
        let number = page.total;
        if number < window.first {
            continue;
        }
        if full || page.shown >= window.max_lines {
            page.cut = true;
            continue;
        }
        let (text, shortened) =
            decode(&line, ending.overflowed).ok_or_else(|| ToolError::Binary {
                path: path.to_owned(),
                size,
            })?;
        let mut piece = text.to_owned();
        if shortened {
            piece.push_str("…[line truncated]");
            page.cut = true;
        }
        if ending.newline {
            piece.push('\n');
        }
        if page.text.len() + piece.len() > MAX_OUTPUT_BYTES {
            full = true;
            page.cut = true;
            continue;
        }
        page.text.push_str(&piece);
        page.shown += 1;
        page.last = number;
    }
    Ok(page)
}

/// How a line read by [`next_line`] ended.
struct LineEnd {
    /// It ended with `\n` (the last line of a file may not).
    newline: bool,
    /// It was longer than [`MAX_LINE_BYTES`] and only its start was kept.
    overflowed: bool,
}

/// Reads the next line into `line` (without its `\n`), keeping at most [`MAX_LINE_BYTES`], so a
/// huge file without newlines cannot exhaust memory. `None` at the end of the file.
fn next_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    scanned: &mut usize,
    path: &str,
) -> Result<Option<LineEnd>, ToolError> {
    line.clear();
    let mut overflowed = false;
    let mut any = false;
    loop {
        let buf = reader.fill_buf().map_err(|e| io_error(&e, path))?;
        if buf.is_empty() {
            return Ok(any.then_some(LineEnd {
                newline: false,
                overflowed,
            }));
        }
        any = true;
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (&buf[..at], Some(at)),
            None => (buf, None),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        if chunk.len() > room {
            overflowed = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = found.map_or(buf.len(), |at| at + 1);
        *scanned += used;
        reader.consume(used);
        if found.is_some() {
            return Ok(Some(LineEnd {
                newline: true,
                overflowed,
            }));
        }
    }
}

/// A line as text, cut to [`MAX_LINE_CHARS`]; `None` when it is not UTF-8 (a binary file).
/// `overflowed` lines were cut mid-way by the reader, possibly inside a character.
fn decode(line: &[u8], overflowed: bool) -> Option<(&str, bool)> {
    let text = match std::str::from_utf8(line) {
        Ok(text) => text,
        // Only the cut at the end may split a character.
        Err(e) if overflowed && e.error_len().is_none() => {
            std::str::from_utf8(&line[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    let (text, cut) = cut_chars(text, MAX_LINE_CHARS);
    Some((text, cut || overflowed))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, run_with, text_of};
    use super::*;
    use crate::agent::workspace::tests::Fixture;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn reads_whole_small_files_exactly() {
        let f = Fixture::new();
        f.write("a.txt", "one\ntwo\r\nthree\n");
        let out = run(&f, "read_file", json!({"path": "a.txt"})).unwrap();
        assert_eq!(
            out,
            json!([{"type": "text", "text": "one\ntwo\r\nthree\n"}])
        );
        f.write("empty", "");
        let out = run(&f, "read_file", json!({"path": "empty"})).unwrap();
        assert_eq!(out, json!([{"type": "text", "text": ""}]));
    }

    #[test]
    fn offset_and_limit_add_the_note() {
        let f = Fixture::new();
        let body: String = (1..=10).map(|i| format!("l{i}\n")).collect();
        f.write("n.txt", &body);
        let out = run(
            &f,
            "read_file",
            json!({"path": "n.txt", "offset": 3, "limit": 2}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!([
                {"type": "text", "text": "l3\nl4\n"},
                {"type": "text", "text": "[Lines 3-4 of 10. Use offset/limit to read more.]"}
            ])
        );
        let out = run(&f, "read_file", json!({"path": "n.txt", "offset": 9})).unwrap();
        assert_eq!(
            out[1]["text"],
            "[Lines 9-10 of 10. Use offset/limit to read more.]"
        );
        let out = run(&f, "read_file", json!({"path": "n.txt", "offset": 20})).unwrap();
        assert_eq!(out[0]["text"], "");
        assert_eq!(
            out[1]["text"],
            "[Offset 20 is past the end of the file (10 lines).]"
        );
        let err = run(&f, "read_file", json!({"path": "n.txt", "limit": 0})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid arguments for read_file: limit must be between 1 and 10000, got 0"
        );
    }

    #[test]
    fn default_line_cap_and_long_lines() {
        let f = Fixture::new();
        let body: String = (1..=2500).map(|i| format!("{i}\n")).collect();
        f.write("many.txt", &body);
        let out = run(&f, "read_file", json!({"path": "many.txt"})).unwrap();
        assert!(out[0]["text"].as_str().unwrap().ends_with("\n2000\n"));
        assert_eq!(
            out[1]["text"],
            "[Lines 1-2000 of 2500. Use offset/limit to read more.]"
        );

        let long = format!("{}\nshort\n", "é".repeat(5000));
        f.write("long.txt", &long);
        let out = run(&f, "read_file", json!({"path": "long.txt"})).unwrap();
        let text = out[0]["text"].as_str().unwrap();
        assert_eq!(
            text,
            format!("{}…[line truncated]\nshort\n", "é".repeat(2000))
        );
        assert_eq!(
            out[1]["text"],
            "[Lines 1-2 of 2. Use offset/limit to read more.]"
        );
    }

    #[test]
    fn output_is_capped_at_256_kib() {
        let f = Fixture::new();
        let line = format!("{}\n", "x".repeat(1000));
        f.write("big.txt", &line.repeat(1000));
        let out = run(&f, "read_file", json!({"path": "big.txt", "limit": 10000})).unwrap();
        let text = out[0]["text"].as_str().unwrap();
        assert!(text.len() <= MAX_OUTPUT_BYTES);
        assert_eq!(text.len(), 261 * 1001);
        assert_eq!(
            out[1]["text"],
            "[Lines 1-261 of 1000. Use offset/limit to read more.]"
        );
    }

    #[test]
    fn binaries_are_refused_and_images_returned() {
        let f = Fixture::new();
        std::fs::write(f.root().join("bin"), b"ab\0cd").unwrap();
        let err = run(&f, "read_file", json!({"path": "bin"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bin is a binary file (5 bytes); read_file returns text or images only"
        );
        std::fs::write(f.root().join("latin1"), b"caf\xe9\n").unwrap();
        let err = run(&f, "read_file", json!({"path": "latin1"})).unwrap_err();
        assert!(matches!(err, ToolError::Binary { .. }), "{err}");
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        std::fs::write(f.root().join("pic.dat"), png).unwrap();
        let out = run(&f, "read_file", json!({"path": "pic.dat"})).unwrap();
        assert_eq!(out[0]["type"], "image");
        assert_eq!(out[0]["mimeType"], "image/png");
        let data = base64::engine::general_purpose::STANDARD
            .decode(out[0]["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(data, png);
    }

    #[test]
    fn missing_directories_fifos_and_escapes() {
        let f = Fixture::new();
        std::fs::create_dir(f.root().join("d")).unwrap();
        nix::unistd::mkfifo(
            &f.root().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", f.root().join("passwd")).unwrap();
        let cases = [
            ("nope.txt", "No such file or directory: nope.txt"),
            ("d", "Is a directory: d"),
            ("fifo", "Not a regular file: fifo"),
            ("passwd", "Path is outside the workspace: passwd"),
            (
                "../outside/secret.txt",
                "Path is outside the workspace: ../outside/secret.txt",
            ),
            ("/etc/passwd", "Path is outside the workspace: /etc/passwd"),
        ];
        for (path, message) in cases {
            let err = run(&f, "read_file", json!({"path": path})).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        let absolute = f.root().join("d/../inside.txt");
        f.write("inside.txt", "in");
        let out = run(&f, "read_file", json!({"path": absolute})).unwrap();
        assert_eq!(text_of(&out), "in");
    }

    #[test]
    fn abort_stops_a_long_scan() {
        let f = Fixture::new();
        f.write("big.txt", &"line\n".repeat(500_000));
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = run_with(&f, "read_file", json!({"path": "big.txt"}), &cancel).unwrap_err();
        assert!(err.is_aborted());
    }
}
