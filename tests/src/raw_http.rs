//! The raw-socket HTTP/1.1 client, for what reqwest will not do: send a request whose body the
//! server stops reading (an early 413), or read a response only when told to, through a socket
//! the test configured itself.

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout};

use crate::{LONG, Server};

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 64 * 1024;

/// The status line and headers of a response.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
}

/// A response read from a raw socket (see [`Server::raw_request`]).
#[derive(Debug, Clone)]
pub struct RawResp {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub json: Value,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
    pub fn code(&self) -> Option<&str> {
        self.json.get("code").and_then(Value::as_str)
    }
}

impl Server {
    /// Sends a hand-written HTTP/1.1 request over a plain TCP socket, writing the body in the
    /// background while reading the response (so an early response such as 413 can be read
    /// even if the server stops reading the body). `head` is the request line + headers
    /// WITHOUT the final blank line; `Host`, `Content-Length` and `Connection: close` are added.
    pub async fn raw_request(&self, head: &str, body: Vec<u8>) -> Result<RawResp> {
        let port = self.port();
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .context("connect")?;
        let (rd, mut wr) = stream.into_split();
        let mut req = String::from(head.trim_end());
        if let Some(token) = &self.token {
            req.push_str(&format!("\r\nAuthorization: Bearer {token}"));
        }
        req.push_str(&format!(
            "\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let writer = tokio::spawn(async move {
            if wr.write_all(req.as_bytes()).await.is_err() {
                return;
            }
            for chunk in body.chunks(64 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = wr.flush().await;
            // Keep the write half open (no shutdown): some servers treat a half-close as abort.
            sleep(LONG).await;
            drop(wr);
        });
        let res = timeout(LONG, async {
            let (head, reader) = ResponseReader::start(rd).await?;
            let body = reader.read_to_end().await?;
            let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
            anyhow::Ok(RawResp {
                status: head.status,
                headers: head.headers,
                body,
                json,
            })
        })
        .await;
        writer.abort();
        res.context("timed out reading raw HTTP response")?
    }
}

/// How the body's end is known.
#[derive(Debug)]
enum Framing {
    /// `Content-Length`: this many bytes are still to come.
    Length(usize),
    Chunked(ChunkDecoder),
    /// Neither: the body ends when the connection does.
    UntilClose,
}

/// An HTTP/1.1 response read from a socket as it arrives, its body de-chunked.
pub struct ResponseReader<R> {
    rd: R,
    /// Body bytes read but not handed out yet (still chunk-encoded for a chunked body).
    pending: Vec<u8>,
    framing: Framing,
    /// Whether any body byte arrived: a reset after that ends the body instead of failing.
    body_started: bool,
    scratch: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> ResponseReader<R> {
    /// Reads the status line and headers.
    pub async fn start(rd: R) -> Result<(Head, Self)> {
        let mut reader = Self {
            rd,
            pending: Vec::new(),
            framing: Framing::UntilClose,
            body_started: false,
            scratch: vec![0; READ_SIZE].into_boxed_slice(),
        };
        let head_end = loop {
            if let Some(p) = find(&reader.pending, b"\r\n\r\n") {
                break p;
            }
            let got_some = !reader.pending.is_empty();
            ensure!(
                reader.read_more(got_some).await?,
                "connection closed before response headers: {:?}",
                String::from_utf8_lossy(&reader.pending)
            );
        };
        let text = String::from_utf8_lossy(&reader.pending[..head_end]).into_owned();
        reader.pending.drain(..head_end + 4);
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let head = Head {
            status,
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
        };
        reader.framing = if let Some(len) = head.header("content-length") {
            Framing::Length(len.parse().context("bad content-length")?)
        } else if head
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked(ChunkDecoder::default())
        } else {
            Framing::UntilClose
        };
        reader.body_started = !reader.pending.is_empty();
        Ok((head, reader))
    }

    /// The next piece of the body; `None` at its end. A `Content-Length` body that the server
    /// cut short ends early; a chunked one is an error.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if !self.pending.is_empty() {
                let piece = match &mut self.framing {
                    Framing::Length(left) => {
                        let n = (*left).min(self.pending.len());
                        *left -= n;
                        let piece: Vec<u8> = self.pending.drain(..n).collect();
                        if *left == 0 {
                            self.pending.clear();
                        }
                        piece
                    }
                    Framing::Chunked(chunks) => {
                        let mut piece = Vec::new();
                        chunks.push(&std::mem::take(&mut self.pending), &mut piece)?;
                        piece
                    }
                    Framing::UntilClose => std::mem::take(&mut self.pending),
                };
                if !piece.is_empty() {
                    return Ok(Some(piece));
                }
            }
            match &self.framing {
                Framing::Length(0) => return Ok(None),
                Framing::Chunked(chunks) if chunks.done => return Ok(None),
                _ => {}
            }
            if !self.read_more(self.body_started).await? {
                return match &self.framing {
                    Framing::Chunked(_) => bail!("connection closed inside a chunked body"),
                    _ => Ok(None),
                };
            }
            self.body_started = true;
        }
    }

    /// The rest of the body.
    pub async fn read_to_end(mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(piece) = self.next_chunk().await? {
            body.extend_from_slice(&piece);
        }
        Ok(body)
    }

    /// Reads once into `pending`; `false` at the end of the connection. A reset counts as the
    /// end once something of the current part (`got_some`) has arrived: report what we have.
    async fn read_more(&mut self, got_some: bool) -> Result<bool> {
        match self.rd.read(&mut self.scratch).await {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.pending.extend_from_slice(&self.scratch[..n]);
                Ok(true)
            }
            Err(_) if got_some => Ok(false),
            Err(e) => Err(anyhow!(e).context("read raw response")),
        }
    }
}

/// Decodes `Transfer-Encoding: chunked` as the bytes arrive.
#[derive(Debug, Default)]
struct ChunkDecoder {
    /// Encoded bytes not decoded yet (an incomplete chunk).
    raw: Vec<u8>,
    /// The last (empty) chunk was read.
    done: bool,
}

impl ChunkDecoder {
    /// Adds encoded bytes and appends the data of every chunk they complete to `out`.
    fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.raw.extend_from_slice(bytes);
        let mut at = 0;
        while !self.done {
            let Some(line) = find(&self.raw[at..], b"\r\n") else {
                break;
            };
            let size_line = String::from_utf8_lossy(&self.raw[at..at + line]);
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .with_context(|| format!("bad chunk size {size_line:?}"))?;
            let data = at + line + 2;
            if size == 0 {
                // Trailers, if any, are not read.
                self.done = true;
                at = self.raw.len();
                break;
            }
            if self.raw.len() < data + size + 2 {
                break;
            }
            ensure!(
                &self.raw[data + size..data + size + 2] == b"\r\n",
                "chunk data not followed by CRLF"
            );
            out.extend_from_slice(&self.raw[data..data + size]);
            at = data + size + 2;
        }
        self.raw.drain(..at);
        Ok(())
    }
}

/// The value of header `name` (any case) among lower-cased `headers`.
fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(response: &[u8]) -> Result<(Head, Vec<u8>)> {
        let (head, reader) = ResponseReader::start(response).await?;
        Ok((head, reader.read_to_end().await?))
    }

    #[tokio::test]
    async fn bodies_by_length_by_chunks_and_until_close() {
        let (head, body) = read(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\n{}junk")
            .await
            .unwrap();
        assert_eq!((head.status, body.as_slice()), (413, &b"{}"[..]));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\n\r\n";
        assert_eq!(read(chunked).await.unwrap().1, b"abcd");
        let (head, body) = read(b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nto the end")
            .await
            .unwrap();
        assert_eq!(head.header("x-a"), Some("b"));
        assert_eq!(body, b"to the end");
    }

    #[tokio::test]
    async fn a_cut_chunked_body_is_an_error() {
        let cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(read(cut).await.is_err());
        assert!(read(b"HTTP/1.1 200 OK\r\n").await.is_err());
    }

    #[test]
    fn chunks_split_anywhere_decode_the_same() {
        let encoded = b"4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n";
        for split in 0..encoded.len() {
            let mut decoder = ChunkDecoder::default();
            let mut out = Vec::new();
            decoder.push(&encoded[..split], &mut out).unwrap();
            decoder.push(&encoded[split..], &mut out).unwrap();
            assert_eq!(out, b"wikipedia");
            assert!(decoder.done);
        }
    }
}
