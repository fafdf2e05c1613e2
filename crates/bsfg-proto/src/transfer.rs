//! What every transport does the same way with the `bsfg.v1` messages: trimming a
//! fetched page to the message limit, turning a PutObject part stream into an object
//! body (and refusing a truncated one), and cutting a body into parts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bsfg_core::{ApiResult, BoundaryError, ByteStream, ObjectInfo, ObjectRead};
use futures::{Stream, StreamExt};

use crate::v1::{self, put_object_request::Part};

/// Trims a page from the end until its encoding fits `max` bytes, so a page of large
/// facts never fails to encode (which would stall its consumer on the same page). The
/// trimmed facts stay unconfirmed and come again after the consumer's ack wait; at
/// least one fact always stays (`max_message_bytes` is at least twice the fact limit).
pub fn fit_page(mut page: v1::FetchFactsResponse, max: usize) -> v1::FetchFactsResponse {
    use prost::Message as _;
    let before = page.facts.len();
    while page.facts.len() > 1 && page.encoded_len() > max {
        page.facts.pop();
    }
    if page.facts.len() < before {
        tracing::info!(
            kept = page.facts.len(),
            trimmed = before - page.facts.len(),
            max_message_bytes = max,
            "page trimmed to fit the message size limit; the rest comes again after the ack wait"
        );
    }
    page
}

/// The first error an object body met, kept so the handler answers with it rather than
/// with the store's wrapping of it.
pub type BodyError = Arc<Mutex<Option<BoundaryError>>>;

/// Turns the PutObject parts that follow the header into the object's bytes. A stream
/// that ends without the end marker, pauses longer than `idle`, grows past `max_size`
/// or whose end marker disagrees on the size ends in an error, so that the store
/// refuses the object: a broken upload never stores a truncated artifact. The first
/// such error is also left in `first_error`.
pub fn object_body<S>(parts: S, idle: Duration, max_size: u64, first_error: BodyError) -> ByteStream
where
    S: Stream<Item = Result<v1::PutObjectRequest, BoundaryError>> + Send + Unpin + 'static,
{
    futures::stream::unfold(Some((parts, 0u64)), move |state| {
        let first_error = first_error.clone();
        async move {
            let (mut s, size) = state?;
            let failure = match tokio::time::timeout(idle, s.next()).await {
                Err(_) => BoundaryError::invalid(
                    "chunk",
                    format!("no data for {idle:?}; the upload was cut off and nothing was stored"),
                ),
                Ok(Some(Err(e))) => e,
                Ok(None) => BoundaryError::invalid(
                    "end",
                    "the upload ended without its end marker; nothing was stored",
                ),
                Ok(Some(Ok(m))) => match m.part {
                    Some(Part::Chunk(c)) if size + c.len() as u64 <= max_size => {
                        let size = size + c.len() as u64;
                        return Some((Ok(c), Some((s, size))));
                    }
                    Some(Part::Chunk(_)) => BoundaryError::invalid(
                        "chunk",
                        format!(
                            "the object exceeds max_object_bytes ({max_size}); nothing was stored"
                        ),
                    ),
                    Some(Part::End(end)) if end.size == size => return None,
                    Some(Part::End(end)) => BoundaryError::invalid(
                        "end.size",
                        format!("says {} bytes but {size} arrived", end.size),
                    ),
                    Some(Part::Header(_)) | None => BoundaryError::invalid(
                        "part",
                        "after the header only chunks and one end marker may follow",
                    ),
                },
            };
            if let Ok(mut slot) = first_error.lock() {
                slot.get_or_insert_with(|| failure.clone());
            }
            Some((Err(failure), None))
        }
    })
    .boxed()
}

/// The PutObject parts of `body`: header, chunks of at most `chunk` bytes, end marker.
/// A pump task reads the body; on a body error it sends that error to `err_tx` and
/// stops without the end marker, so the server stores nothing.
pub fn upload_parts(
    bucket: &str,
    key: &str,
    mut body: ByteStream,
    chunk: usize,
    err_tx: tokio::sync::oneshot::Sender<BoundaryError>,
) -> tokio_stream::wrappers::ReceiverStream<v1::PutObjectRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = v1::PutObjectRequest {
        part: Some(Part::Header(v1::PutObjectHeader {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })),
    };
    let chunk = chunk.max(1);
    tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return;
        }
        let mut size = 0u64;
        while let Some(item) = body.next().await {
            let mut data = match item {
                Ok(b) => b,
                Err(e) => {
                    let _ = err_tx.send(e);
                    return;
                }
            };
            while !data.is_empty() {
                let piece = data.split_to(data.len().min(chunk));
                size += piece.len() as u64;
                let msg = v1::PutObjectRequest {
                    part: Some(Part::Chunk(piece)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
        let end = v1::PutObjectRequest {
            part: Some(Part::End(v1::PutObjectEnd { size })),
        };
        let _ = tx.send(end).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The parts of a GetObject answer: the object's info, then its bytes in chunks of at
/// most `chunk` bytes (each fits the message limit).
pub fn read_parts(
    read: ObjectRead,
    chunk: usize,
) -> impl Stream<Item = Result<v1::GetObjectResponse, BoundaryError>> + Send + 'static {
    use v1::get_object_response::Part as GetPart;
    let chunk = chunk.max(1);
    let info = v1::GetObjectResponse {
        part: Some(GetPart::Info(read.info.into())),
    };
    let body = read.body.flat_map(move |item| {
        let pieces: Vec<Result<v1::GetObjectResponse, BoundaryError>> = match item {
            Err(e) => vec![Err(e)],
            Ok(mut data) => {
                let mut out = Vec::with_capacity(data.len() / chunk + 1);
                while !data.is_empty() {
                    let piece = data.split_to(data.len().min(chunk));
                    out.push(Ok(v1::GetObjectResponse {
                        part: Some(GetPart::Chunk(piece)),
                    }));
                }
                out
            }
        };
        futures::stream::iter(pieces)
    });
    futures::stream::once(async move { Ok(info) }).chain(body)
}

/// A GetObject answer's parts back into an [`ObjectRead`]. The first part must be the
/// info; the body then yields exactly `size - offset` bytes, and ends in an error
/// when the parts end short, run long, pause longer than `idle`, or break.
pub async fn object_read<S>(mut parts: S, offset: u64, idle: Duration) -> ApiResult<ObjectRead>
where
    S: Stream<Item = Result<v1::GetObjectResponse, BoundaryError>> + Send + Unpin + 'static,
{
    use v1::get_object_response::Part as GetPart;
    let first = tokio::time::timeout(idle, parts.next())
        .await
        .map_err(|_| {
            BoundaryError::Unavailable(format!("no answer to GetObject within {idle:?}"))
        })?;
    let info: ObjectInfo = match first {
        Some(Ok(v1::GetObjectResponse {
            part: Some(GetPart::Info(info)),
        })) => info.into(),
        Some(Err(e)) => return Err(e),
        _ => {
            return Err(BoundaryError::Internal(
                "a GetObject answer must start with the object's info".into(),
            ));
        }
    };
    let remaining = info.size.checked_sub(offset).ok_or_else(|| {
        BoundaryError::Internal(format!(
            "the server answered an object of {} bytes to a read from {offset}",
            info.size
        ))
    })?;
    let body = futures::stream::unfold(Some((parts, remaining)), move |state| async move {
        let (mut s, left) = state?;
        let failure = match tokio::time::timeout(idle, s.next()).await {
            Err(_) => BoundaryError::Unavailable(format!("the object read paused for {idle:?}")),
            Ok(Some(Err(e))) => e,
            Ok(None) if left == 0 => return None,
            Ok(None) => {
                BoundaryError::Unavailable(format!("the object read ended {left} bytes short"))
            }
            Ok(Some(Ok(v1::GetObjectResponse {
                part: Some(GetPart::Chunk(c)),
            }))) if c.len() as u64 <= left => {
                let left = left - c.len() as u64;
                return Some((Ok(c), Some((s, left))));
            }
            Ok(Some(Ok(_))) => BoundaryError::Internal(
                "a GetObject answer sent more bytes than the object holds, or a second info".into(),
            ),
        };
        Some((Err(failure), None))
    })
    .boxed();
    Ok(ObjectRead { info, offset, body })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;

    fn chunk(b: &'static [u8]) -> Result<v1::PutObjectRequest, BoundaryError> {
        Ok(v1::PutObjectRequest {
            part: Some(Part::Chunk(Bytes::from_static(b))),
        })
    }

    fn end(size: u64) -> Result<v1::PutObjectRequest, BoundaryError> {
        Ok(v1::PutObjectRequest {
            part: Some(Part::End(v1::PutObjectEnd { size })),
        })
    }

    async fn collect(
        parts: Vec<Result<v1::PutObjectRequest, BoundaryError>>,
    ) -> (Vec<u8>, Option<BoundaryError>) {
        let first: BodyError = Arc::default();
        let mut body = object_body(
            futures::stream::iter(parts),
            Duration::from_secs(5),
            8,
            first.clone(),
        );
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            match c {
                Ok(c) => out.extend_from_slice(&c),
                Err(_) => break,
            }
        }
        let e = first.lock().unwrap().take();
        (out, e)
    }

    #[tokio::test]
    async fn a_body_with_its_end_marker_yields_every_byte() {
        let (bytes, e) = collect(vec![chunk(b"abc"), chunk(b"de"), end(5)]).await;
        assert_eq!(bytes, b"abcde");
        assert!(e.is_none());
    }

    #[tokio::test]
    async fn a_body_without_end_marker_or_over_the_limit_or_with_a_wrong_size_fails() {
        let (_, e) = collect(vec![chunk(b"abc")]).await;
        assert!(
            matches!(e, Some(BoundaryError::InvalidArgument { ref field, .. }) if field == "end")
        );
        let (_, e) = collect(vec![chunk(b"abcdefghi"), end(9)]).await;
        assert!(
            matches!(e, Some(BoundaryError::InvalidArgument { ref field, .. }) if field == "chunk")
        );
        let (_, e) = collect(vec![chunk(b"abc"), end(4)]).await;
        assert!(
            matches!(e, Some(BoundaryError::InvalidArgument { ref field, .. }) if field == "end.size")
        );
    }

    fn read_of(bytes: &'static [u8], offset: u64) -> ObjectRead {
        ObjectRead {
            info: ObjectInfo {
                bucket: "b".into(),
                key: "k".into(),
                digest: "sha256:x".into(),
                size: bytes.len() as u64,
            },
            offset,
            body: futures::stream::iter(vec![Ok(Bytes::from_static(&bytes[offset as usize..]))])
                .boxed(),
        }
    }

    async fn bytes_of(read: ObjectRead) -> Result<Vec<u8>, BoundaryError> {
        let mut out = Vec::new();
        let mut body = read.body;
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_read_crosses_as_info_then_chunks_and_comes_back_whole() {
        let parts: Vec<_> = read_parts(read_of(b"hello world", 3), 3).collect().await;
        assert_eq!(parts.len(), 1 + 3, "info, then 8 bytes in chunks of 3");
        let back = object_read(futures::stream::iter(parts), 3, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(back.info.size, 11);
        assert_eq!(bytes_of(back).await.unwrap(), b"lo world");
    }

    #[tokio::test]
    async fn a_read_that_ends_short_or_runs_long_is_an_error() {
        let mut parts: Vec<_> = read_parts(read_of(b"hello world", 0), 4).collect().await;
        parts.pop();
        let short = object_read(futures::stream::iter(parts), 0, Duration::from_secs(5))
            .await
            .unwrap();
        let e = bytes_of(short).await.unwrap_err();
        assert!(e.to_string().contains("3 bytes short"), "{e}");
        let mut parts: Vec<_> = read_parts(read_of(b"hello", 0), 4).collect().await;
        parts.push(Ok(v1::GetObjectResponse {
            part: Some(v1::get_object_response::Part::Chunk(Bytes::from_static(
                b"!",
            ))),
        }));
        let long = object_read(futures::stream::iter(parts), 0, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(bytes_of(long).await.is_err());
    }

    #[tokio::test]
    async fn upload_parts_cut_a_body_into_header_chunks_and_end() {
        let body: ByteStream =
            futures::stream::iter(vec![Ok(Bytes::from_static(b"hello world"))]).boxed();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let parts: Vec<_> = upload_parts("b", "k", body, 4, tx).collect().await;
        assert_eq!(parts.len(), 1 + 3 + 1);
        assert!(matches!(parts[0].part, Some(Part::Header(_))));
        assert!(matches!(
            parts[4].part,
            Some(Part::End(v1::PutObjectEnd { size: 11 }))
        ));
    }
}
