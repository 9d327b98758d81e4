//! Frames on the worker channel: a 4-byte big-endian length, then a bincode payload.
//!
//! This file is the only place that knows the length prefix, the size cap and the codec: every
//! reader and writer on either side of the channel, blocking or async, goes through it. The
//! worker is hostile, so a length is checked against the cap before anything is allocated, and
//! decoding is bounded by the same cap. bincode cannot carry `serde_json::Value`, so arbitrary
//! JSON travels as a `String` inside the message types. Changing the codec (say, to postcard)
//! means changing this file only.

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload accepted in either direction. Model requests may carry several base64 images,
/// which is why this is well above the 8 MiB a plain event would ever need.
pub const MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

/// Bytes of the length prefix in front of every payload.
const PREFIX_LEN: usize = 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("channel closed in the middle of a frame")]
    Truncated,
    #[error("could not encode frame: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("could not decode frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame has {0} trailing bytes after its message")]
    TrailingBytes(usize),
}

/// Encodes `msg` as one complete frame (length prefix included).
///
/// # Errors
/// [`FrameError::TooLarge`] when the payload would exceed [`MAX_FRAME_LEN`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; PREFIX_LEN];
    bincode::serde::encode_into_std_write(msg, &mut buf, config())?;
    let len = buf.len() - PREFIX_LEN;
    let too_large = FrameError::TooLarge {
        len,
        limit: MAX_FRAME_LEN,
    };
    if len > MAX_FRAME_LEN {
        return Err(too_large);
    }
    let prefix = u32::try_from(len).map_err(|_| too_large)?;
    buf[..PREFIX_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(buf)
}

/// Decodes one payload (without its length prefix).
///
/// # Errors
/// Any decoding failure, or bytes left over after the message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// The payload length a prefix announces, refused above `limit` (itself capped at
/// [`MAX_FRAME_LEN`]) before the caller allocates anything for it.
fn announced_len(prefix: [u8; PREFIX_LEN], limit: usize) -> Result<usize, FrameError> {
    let limit = limit.min(MAX_FRAME_LEN);
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(len)
}

/// A payload cut short by the end of the stream is a truncated frame, not an I/O failure.
fn truncated_or_io(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

/// Writes one frame.
///
/// # Errors
/// Encoding or I/O failure.
pub async fn write_frame<W, T>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(msg)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

/// Writes every message in `first` and whatever else is already queued in `rest`, as one
/// buffered write. Frames are small and come in bursts (a model streaming tokens), so one
/// syscall per burst instead of one per frame is most of the channel's throughput.
///
/// # Errors
/// Encoding or I/O failure.
pub async fn write_batch<W, T>(
    writer: &mut W,
    first: T,
    rest: &mut tokio::sync::mpsc::Receiver<T>,
) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    /// Past this many bytes a burst is written out even if more is queued.
    const BURST: usize = 256 * 1024;
    let mut buf = encode(&first)?;
    while buf.len() < BURST {
        match rest.try_recv() {
            Ok(next) => buf.extend_from_slice(&encode(&next)?),
            Err(_) => break,
        }
    }
    writer.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame. A clean end of stream between frames is `Ok(None)`, not an error.
///
/// # Errors
/// I/O failure, a length above [`MAX_FRAME_LEN`] (checked before allocating), a stream that ends
/// inside a frame, or a payload that does not decode.
pub async fn read_frame<R, T>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let mut payload = vec![0u8; announced_len(prefix, MAX_FRAME_LEN)?];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(truncated_or_io)?;
    decode(&payload).map(Some)
}

/// Writes one frame on a blocking writer: what a worker uses before its runtime exists (the
/// audit or a jail failure), and the supervisor for a launcher's jail spec.
///
/// # Errors
/// Encoding or I/O failure.
pub fn write_frame_blocking<W: Write, T: Serialize>(
    writer: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode(msg)?)?;
    Ok(())
}

/// Reads one frame from a blocking reader, as [`read_frame`] does; `limit` narrows
/// [`MAX_FRAME_LEN`] for a message known to be small (a launcher's jail spec), so a prefix above
/// it is refused before anything is allocated.
///
/// # Errors
/// As [`read_frame`], with `limit` as the cap.
pub fn read_frame_blocking<R: Read, T: DeserializeOwned>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut payload = vec![0u8; announced_len(prefix, limit)?];
    reader.read_exact(&mut payload).map_err(truncated_or_io)?;
    decode(&payload).map(Some)
}

/// Test builds only: bytes that look like a frame announcing `declared_len` bytes, followed by
/// `payload` whatever its real length, for the tests that play a worker sending garbage.
#[cfg(feature = "isolation-tests")]
pub fn forge(declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PREFIX_LEN + payload.len());
    bytes.extend_from_slice(&declared_len.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FromWorker, ToWorker};

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let msg = FromWorker::Event {
            json: r#"{"type":"x"}"#.into(),
        };
        write_frame(&mut a, &msg).await.unwrap();
        drop(a);
        let got: Option<FromWorker> = read_frame(&mut b).await.unwrap();
        assert!(matches!(got, Some(FromWorker::Event { json }) if json == r#"{"type":"x"}"#));
        let end: Option<FromWorker> = read_frame(&mut b).await.unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let got: Result<Option<ToWorker>, _> = read_frame(&mut b).await;
        assert!(matches!(got, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn truncated_frame_and_garbage_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(a);
        let got: Result<Option<ToWorker>, _> = read_frame(&mut b).await;
        assert!(matches!(got, Err(FrameError::Truncated)));

        let garbage = [0xffu8; 16];
        assert!(decode::<ToWorker>(&garbage).is_err());
    }

    #[test]
    fn blocking_frames_read_back_like_async_ones() {
        let msg = FromWorker::Event {
            json: r#"{"type":"x"}"#.into(),
        };
        let mut bytes = Vec::new();
        write_frame_blocking(&mut bytes, &msg).unwrap();
        assert_eq!(bytes, encode(&msg).unwrap());
        let mut reader = std::io::Cursor::new(bytes);
        let got: Option<FromWorker> = read_frame_blocking(&mut reader, 1024).unwrap();
        assert!(matches!(got, Some(FromWorker::Event { json }) if json == r#"{"type":"x"}"#));
        let end: Option<FromWorker> = read_frame_blocking(&mut reader, 1024).unwrap();
        assert!(end.is_none());
    }

    #[test]
    fn a_blocking_reader_refuses_more_than_its_limit_before_allocating() {
        let frame = encode(&FromWorker::Event {
            json: "x".repeat(100),
        })
        .unwrap();
        let got: Result<Option<FromWorker>, _> =
            read_frame_blocking(&mut std::io::Cursor::new(&frame), 50);
        assert!(matches!(got, Err(FrameError::TooLarge { limit: 50, .. })));
        // A limit above the cap is the cap.
        let huge = u32::MAX.to_be_bytes();
        let got: Result<Option<FromWorker>, _> =
            read_frame_blocking(&mut std::io::Cursor::new(&huge), usize::MAX);
        assert!(matches!(
            got,
            Err(FrameError::TooLarge {
                limit: MAX_FRAME_LEN,
                ..
            })
        ));
        let got: Result<Option<FromWorker>, _> =
            read_frame_blocking(&mut std::io::Cursor::new(&frame[..frame.len() - 1]), 1024);
        assert!(matches!(got, Err(FrameError::Truncated)));
        let got: Result<Option<FromWorker>, _> =
            read_frame_blocking(&mut std::io::Cursor::new(&frame[..2]), 1024);
        assert!(matches!(got, Err(FrameError::Truncated)));
    }
}
