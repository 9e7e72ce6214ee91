//! Verified reads of stored content. Every byte served as part of a complete response has
//! been hashed and matched against the entry's sha256: small bodies are verified whole before
//! the response head is sent (a corrupt one is evicted and refetched transparently); large
//! bodies are streamed and the last chunk is held back until the digest matches, so a
//! corrupt entry ends in an aborted response, never a clean `200`.

use super::entry::Entry;
use super::store::{ReadGuard, Store};
use crate::body::{BoxError, ProxyBody};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use std::{fs::File, io, io::Read, sync::Arc};

/// Bodies up to this size are read and verified whole before the response starts.
pub const WHOLE_MAX: u64 = 1024 * 1024;
/// Read size when streaming larger bodies.
const CHUNK: u64 = 256 * 1024;

/// Why stored content cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("content file missing")]
    Missing,
    #[error("content file has {actual} bytes, index says {expected}")]
    WrongSize { actual: u64, expected: u64 },
    #[error("content digest mismatch")]
    DigestMismatch,
    #[error("content read failed: {0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    /// A short reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::Missing => "content-missing",
            ReadError::WrongSize { .. } => "content-size",
            ReadError::DigestMismatch => "digest-mismatch",
            ReadError::Io(_) => "read-error",
        }
    }
}

/// An opened entry, ready to serve.
pub enum HitBody {
    /// Small body, already verified.
    Whole(Bytes),
    /// Large body: verifying stream, last chunk held until the digest matches.
    Stream(ProxyBody),
}

/// Opens `entry` for serving. On `Err` nothing was sent; the caller evicts and refetches.
pub async fn open(store: Arc<Store>, entry: Arc<Entry>) -> Result<HitBody, ReadError> {
    let reading = store.reading(&entry.path);
    let e = entry.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<Opened, ReadError> {
        let mut file = open_checked(&e)?;
        if e.size > WHOLE_MAX {
            return Ok(Opened::File(file));
        }
        let mut buf = Vec::with_capacity(e.size as usize);
        file.read_to_end(&mut buf)?;
        if buf.len() as u64 != e.size {
            return Err(ReadError::WrongSize { actual: buf.len() as u64, expected: e.size });
        }
        if Sha256::digest(&buf).as_slice() != e.sha256 {
            return Err(ReadError::DigestMismatch);
        }
        Ok(Opened::Whole(Bytes::from(buf)))
    })
    .await
    .map_err(io::Error::other)??;
    Ok(match opened {
        Opened::Whole(b) => HitBody::Whole(b),
        Opened::File(file) => HitBody::Stream(verifying_stream(store, entry, file, reading)),
    })
}

/// Hashes the whole content file and checks it against the entry (for answers that send
/// no body: `HEAD`, `304`).
pub async fn verify(store: &Arc<Store>, entry: Arc<Entry>) -> Result<(), ReadError> {
    let guard = store.reading(&entry.path);
    let result = tokio::task::spawn_blocking(move || verify_sync(&entry)).await.map_err(io::Error::other)?;
    drop(guard);
    result
}

/// Blocking form of [`verify`].
pub fn verify_sync(entry: &Entry) -> Result<(), ReadError> {
    let mut file = open_checked(entry)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total != entry.size {
        return Err(ReadError::WrongSize { actual: total, expected: entry.size });
    }
    if hasher.finalize().as_slice() != entry.sha256 {
        return Err(ReadError::DigestMismatch);
    }
    Ok(())
}

enum Opened {
    Whole(Bytes),
    File(File),
}

fn open_checked(e: &Entry) -> Result<File, ReadError> {
    let file = File::open(&e.path).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => ReadError::Missing,
        _ => ReadError::Io(err),
    })?;
    let actual = file.metadata()?.len();
    if actual != e.size {
        return Err(ReadError::WrongSize { actual, expected: e.size });
    }
    Ok(file)
}

/// State of a streaming read: the file, the running hash, and what is left to read.
struct Reading {
    file: File,
    hasher: Sha256,
    remaining: u64,
    /// Keeps the content file from the collector until the stream is dropped.
    _guard: ReadGuard,
}

/// A corrupt entry was detected while streaming it; the response is aborted.
#[derive(Debug, thiserror::Error)]
#[error("stored entry {key} failed verification: {source}")]
pub struct CorruptEntry {
    key: String,
    source: ReadError,
}

fn verifying_stream(store: Arc<Store>, entry: Arc<Entry>, file: File, guard: ReadGuard) -> ProxyBody {
    let start = Some(Reading { file, hasher: Sha256::new(), remaining: entry.size, _guard: guard });
    let stream = futures_util::stream::unfold(start, move |state| {
        let (store, entry) = (store.clone(), entry.clone());
        async move {
            let reading = state?;
            let expected = entry.sha256;
            let step = tokio::task::spawn_blocking(move || read_step(reading, &expected))
                .await
                .unwrap_or_else(|e| Err(ReadError::Io(io::Error::other(e))));
            match step {
                Ok((chunk, next)) => Some((Ok::<_, BoxError>(Frame::data(chunk)), next)),
                Err(err) => {
                    store.metrics().integrity_failures.with_label_values(&[err.reason()]).inc();
                    store.evict(&entry, err.reason()).await;
                    let err = CorruptEntry { key: entry.key.clone(), source: err };
                    Some((Err(Box::new(err) as BoxError), None))
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Reads the next chunk. The final chunk is returned only if the whole body's digest matches.
fn read_step(mut r: Reading, expected: &[u8; 32]) -> Result<(Bytes, Option<Reading>), ReadError> {
    let n = r.remaining.min(CHUNK) as usize;
    let mut buf = vec![0u8; n];
    r.file.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::WrongSize { actual: 0, expected: r.remaining },
        _ => ReadError::Io(e),
    })?;
    r.hasher.update(&buf);
    r.remaining -= n as u64;
    if r.remaining > 0 {
        return Ok((Bytes::from(buf), Some(r)));
    }
    if r.hasher.finalize().as_slice() != expected {
        return Err(ReadError::DigestMismatch);
    }
    Ok((Bytes::from(buf), None))
}
