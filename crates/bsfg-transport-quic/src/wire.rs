//! The framing of one call on one bidirectional QUIC stream (ALPN `bsfg/1`).
//!
//! ```text
//! client -> server:  op (1 byte) | frame | frame ... | FIN
//! server -> client:  status (1 byte: 0 ok, 1 error) | frame | FIN
//! frame:             length (u32, big-endian) | protobuf bytes
//! ```
//!
//! The request frames are the `bsfg.v1` request messages (`AppendFactRequest`,
//! `FetchFactsRequest`, `ConfirmReceiptRequest`, the `PutObjectRequest` parts:
//! header, chunks, end marker, `HeadObjectRequest`, `GetObjectRequest`). An ok
//! response is the matching response message; for GetObject it is the
//! `GetObjectResponse` parts, one frame each (the info, then the chunks), and a
//! stream that ends short is a failed read. An error response is a `CallError` with
//! the stable reason.

use bsfg_core::BoundaryError;
use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};

/// The ALPN protocol of BSFG over QUIC.
pub const ALPN: &[u8] = b"bsfg/1";

/// The four operations, as the first byte of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// AppendFact: one `AppendFactRequest`.
    Append = 1,
    /// FetchFacts: one `FetchFactsRequest`.
    Fetch = 2,
    /// ConfirmReceipt: one `ConfirmReceiptRequest`.
    Confirm = 3,
    /// PutObject: `PutObjectRequest` parts.
    Put = 4,
    /// HeadObject: one `HeadObjectRequest`.
    Head = 5,
    /// GetObject: one `GetObjectRequest`; answered by `GetObjectResponse` parts.
    Get = 6,
}

impl Op {
    /// The operation for a first byte.
    pub fn from_byte(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Append,
            2 => Op::Fetch,
            3 => Op::Confirm,
            4 => Op::Put,
            5 => Op::Head,
            6 => Op::Get,
            _ => return None,
        })
    }

    /// Its name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Append => "AppendFact",
            Op::Fetch => "FetchFacts",
            Op::Confirm => "ConfirmReceipt",
            Op::Put => "PutObject",
            Op::Head => "HeadObject",
            Op::Get => "GetObject",
        }
    }
}

/// Response status byte: the call succeeded.
pub const STATUS_OK: u8 = 0;
/// Response status byte: the frame is a `CallError`.
pub const STATUS_ERROR: u8 = 1;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer's frame is larger than this end accepts.
    #[error("a frame of {size} bytes exceeds max_message_bytes ({max})")]
    TooLarge {
        /// Announced size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not the expected message.
    #[error("not a valid {what}: {source}")]
    Decode {
        /// Expected message.
        what: &'static str,
        /// Cause.
        #[source]
        source: prost::DecodeError,
    },
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The stream or connection failed.
    #[error("{0}")]
    Stream(String),
}

impl WireError {
    /// The boundary error a caller sees: bad frames are the sender's fault
    /// (`invalid_argument`), broken streams are `unavailable`.
    pub fn into_boundary(self, field: &str) -> BoundaryError {
        match self {
            WireError::TooLarge { .. } | WireError::Decode { .. } | WireError::Truncated => {
                BoundaryError::invalid(field, self.to_string())
            }
            WireError::Stream(s) => BoundaryError::Unavailable(s),
        }
    }
}

fn read_error(e: quinn::ReadExactError) -> WireError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => WireError::Truncated,
        quinn::ReadExactError::ReadError(e) => WireError::Stream(e.to_string()),
    }
}

/// Reads one byte (the op or the status); `None` when the stream ended first.
pub async fn read_byte(recv: &mut RecvStream) -> Result<Option<u8>, WireError> {
    let mut b = [0u8; 1];
    match recv.read_exact(&mut b).await {
        Ok(()) => Ok(Some(b[0])),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(e) => Err(read_error(e)),
    }
}

/// Reads one frame's bytes; `None` when the stream ended cleanly before it.
pub async fn read_raw(recv: &mut RecvStream, max: usize) -> Result<Option<Bytes>, WireError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_error(e)),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > max {
        return Err(WireError::TooLarge { size, max });
    }
    // The buffer grows with the bytes that arrive, not with the size announced: a
    // peer that announces a large frame and stalls pins no more than it sent.
    let mut buf = BytesMut::with_capacity(size.min(READ_CHUNK));
    while buf.len() < size {
        match recv.read_chunk(size - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(WireError::Truncated),
            Err(e) => return Err(WireError::Stream(e.to_string())),
        }
    }
    Ok(Some(buf.freeze()))
}

/// What a frame's buffer starts with before its bytes arrive.
const READ_CHUNK: usize = 64 * 1024;

/// Reads and decodes one frame; `None` when the stream ended cleanly before it.
pub async fn read_frame<M: prost::Message + Default>(
    recv: &mut RecvStream,
    max: usize,
    what: &'static str,
) -> Result<Option<M>, WireError> {
    match read_raw(recv, max).await? {
        None => Ok(None),
        Some(b) => M::decode(b)
            .map(Some)
            .map_err(|source| WireError::Decode { what, source }),
    }
}

/// `prefix` (if any) and the length of a frame of `size` bytes, with room for it.
fn header(prefix: Option<u8>, size: usize, max: usize) -> Result<Vec<u8>, WireError> {
    if size > max {
        return Err(WireError::TooLarge { size, max });
    }
    let mut buf = Vec::with_capacity(size + 5);
    buf.extend(prefix);
    buf.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
    Ok(buf)
}

async fn write_all(send: &mut SendStream, buf: &[u8]) -> Result<(), WireError> {
    send.write_all(buf)
        .await
        .map_err(|e| WireError::Stream(e.to_string()))
}

/// Encodes `prefix` (if any) and one frame, and writes them in one go.
pub async fn write_frame(
    send: &mut SendStream,
    prefix: Option<u8>,
    message: &impl prost::Message,
    max: usize,
) -> Result<(), WireError> {
    let mut buf = header(prefix, message.encoded_len(), max)?;
    message
        .encode(&mut buf)
        .map_err(|e| WireError::Stream(e.to_string()))?;
    write_all(send, &buf).await
}

/// Writes `prefix` (if any) and one frame of already encoded `bytes`, in one go.
pub async fn write_encoded(
    send: &mut SendStream,
    prefix: Option<u8>,
    bytes: &[u8],
    max: usize,
) -> Result<(), WireError> {
    let mut buf = header(prefix, bytes.len(), max)?;
    buf.extend_from_slice(bytes);
    write_all(send, &buf).await
}
