//! What the server prints, captured line by line so that a failing test can show it, and its
//! readiness line picked out of stdout as it arrives.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::oneshot;

/// The exact prefix of the readiness line printed on stdout.
pub const LISTENING_PREFIX: &str = "supervisor listening on ";

#[derive(Debug, Default)]
struct Buffers {
    stdout: String,
    stderr: String,
    combined: String,
}

/// Both output streams of one process, shared with the tasks that read them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Buffers>>);

/// Which stream a capture reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Logs {
    fn lock(&self) -> MutexGuard<'_, Buffers> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// stdout + stderr, each line tagged with its stream.
    pub fn combined(&self) -> String {
        self.lock().combined.clone()
    }
    pub fn stdout(&self) -> String {
        self.lock().stdout.clone()
    }
    pub fn stderr(&self) -> String {
        self.lock().stderr.clone()
    }

    /// Reads `reader` line by line into the buffers until EOF. On stdout, the URL of the first
    /// readiness line is reported through `ready`.
    pub async fn capture<R: AsyncRead + Unpin>(
        self,
        reader: R,
        stream: Stream,
        mut ready: Option<oneshot::Sender<String>>,
    ) {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            {
                let mut g = self.lock();
                let tag = match stream {
                    Stream::Stdout => {
                        g.stdout.push_str(&text);
                        "[stdout] "
                    }
                    Stream::Stderr => {
                        g.stderr.push_str(&text);
                        "[stderr] "
                    }
                };
                g.combined.push_str(tag);
                g.combined.push_str(&text);
                if !text.ends_with('\n') {
                    g.combined.push('\n');
                }
            }
            if stream == Stream::Stdout
                && let Some(url) = text.trim().strip_prefix(LISTENING_PREFIX)
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(url.trim().trim_end_matches('/').to_string());
            }
        }
    }
}
