//! Frames on the worker channel: a 4-byte big-endian length, then a bincode payload.
//!
//! The worker is hostile (isolation.md §2.5.1), so the length is checked against
//! [`MAX_FRAME_LEN`] before anything is allocated, and decoding is bounded by the same limit.
//! bincode cannot carry `serde_json::Value`, so arbitrary JSON travels as a `String` inside the
//! message types. Changing the codec (say, to postcard) means changing this file only.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload accepted in either direction. Model requests may carry several base64 images,
/// which is why this is well above the 8 MiB a plain event would ever need.
pub const MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

const LIMIT: usize = MAX_FRAME_LEN;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: usize },
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
    let mut buf = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut buf, config())?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len })?;
    buf[..4].copy_from_slice(&prefix.to_be_bytes());
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
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
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
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode(&payload).map(Some)
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
}
