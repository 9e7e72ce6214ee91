//! The storage trait both tiers implement — the local cacache store and the shared S3
//! store — and the one operation built on it: copying a verified document from one tier to
//! the other (promotion of a shared entry into the local store, write-through of a fresh
//! local entry to the shared store).
//!
//! A tier's `read` hands out raw bytes; the receiving tier's `store` verifies them against
//! the record's length and sha256 before anything becomes visible, so a copy never
//! publishes a document that differs from the one that was digested when it was generated.
//! A promotion also runs the route's validation again: the digest proves the bytes are the
//! ones stored, not that they passed this replica's rules.

use super::entry::{stored_head, Entry, EntryMeta};
use super::store::{Expect, Purge, Store, StoreError};
use super::validate::{StreamingValidator, Validation, Verdict};
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use std::{future::Future, sync::Arc};

/// Version of the record layout; records of another version are ignored.
pub const RECORD_VERSION: u32 = 1;

/// Everything a tier knows about one stored document: enough to serve it, verify it and
/// copy it to another tier. In the shared store it is the per-entry pointer object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub key: String,
    /// sha256 of the body, hex.
    #[serde(with = "hex")]
    pub sha256: [u8; 32],
    pub size: u64,
    /// Unix milliseconds when the document was first stored (TTLs run from here).
    pub stored_at_ms: u64,
    /// The response head and facts stored beside the body.
    pub meta: EntryMeta,
}

impl Record {
    /// The record with only end-to-end headers a hit may carry: a record read from a shared
    /// bucket is not trusted to carry framing or hop-by-hop headers.
    pub fn sanitized(mut self) -> Record {
        let mut headers = stored_head(&self.meta.header_map().unwrap_or_default());
        crate::headers::forward_response_headers(&mut headers);
        for h in [http::header::TRANSFER_ENCODING, http::header::CONTENT_LENGTH, http::header::VIA] {
            headers.remove(h);
        }
        super::policy::take_per_request(&mut headers);
        self.meta =
            EntryMeta::new(&self.meta.rule, &self.meta.lote_id, http::StatusCode::OK, &headers, self.meta.gen_ms);
        self
    }

    /// The record of a local entry.
    pub fn of(entry: &Entry) -> Record {
        Record {
            v: RECORD_VERSION,
            key: entry.key.clone(),
            sha256: entry.sha256,
            size: entry.size,
            stored_at_ms: entry.stored_at_ms as u64,
            meta: EntryMeta::new(&entry.rule, &entry.lote_id, entry.status, &stored_head(&entry.headers), entry.gen_ms),
        }
    }
}

/// A body as a tier hands it out: raw, not yet verified.
pub type Chunks = BoxStream<'static, Result<Bytes, TierError>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TierError {
    /// Nothing is stored under that name.
    #[error("{tier} store: not found")]
    NotFound { tier: &'static str },
    /// The tier did not answer (connection, timeout, server error): try elsewhere.
    #[error("{tier} store unavailable: {detail}")]
    Unavailable { tier: &'static str, detail: String },
    /// The bytes do not match the record (length or digest): the copy is discarded.
    #[error("{tier} store: content does not match its record: {detail}")]
    Corrupt { tier: &'static str, detail: String },
    /// Fewer bytes than the record says: cut in transit or truncated where stored. Never
    /// stored; not proof enough of damage to delete the source.
    #[error("{tier} store: body shorter than its record: {detail}")]
    Short { tier: &'static str, detail: String },
    /// The bytes match their record but fail the route's validation here: not stored.
    #[error("{tier} store: the document fails this route's validation: {detail}")]
    Invalid { tier: &'static str, token: String, detail: String },
    /// Anything else (local disk, too large, bad record).
    #[error("{tier} store: {detail}")]
    Failed { tier: &'static str, detail: String },
}

impl TierError {
    /// Short label for metrics.
    pub fn token(&self) -> &'static str {
        match self {
            TierError::NotFound { .. } => "not-found",
            TierError::Unavailable { .. } => "error",
            TierError::Corrupt { .. } => "corrupt",
            TierError::Short { .. } => "short",
            TierError::Invalid { .. } => "invalid",
            TierError::Failed { .. } => "error",
        }
    }
}

/// A place documents are stored in, by cache key.
pub trait Tier: Send + Sync {
    /// The record stored under `key`, if any.
    fn lookup(&self, key: &str) -> impl Future<Output = Result<Option<Record>, TierError>> + Send;
    /// The body of `record`, unverified.
    fn read(&self, record: &Record) -> impl Future<Output = Result<Chunks, TierError>> + Send;
    /// Stores `body` under `record.key`; visible only if its length and sha256 match the record.
    fn store(&self, record: &Record, body: Chunks) -> impl Future<Output = Result<(), TierError>> + Send;
    /// Removes what is stored under `key` (nothing if absent).
    fn remove(&self, key: &str) -> impl Future<Output = Result<(), TierError>> + Send;
}

/// Copies `record`'s body from one tier to another; the destination verifies it.
pub async fn copy(record: &Record, from: &impl Tier, to: &impl Tier) -> Result<(), TierError> {
    let body = from.read(record).await?;
    to.store(record, body).await
}

/// [`copy`] into the local store, refused if a purge covering the entry came after the
/// purge epoch `since_purge` (the copy was started before it), or if the document fails
/// `validation` (the route's rules for batch `lote_id`) as it arrives.
pub async fn copy_in(
    record: &Record,
    from: &impl Tier,
    to: &Arc<Store>,
    since_purge: u64,
    validation: Option<(&Arc<Validation>, &str)>,
) -> Result<(), TierError> {
    let body = from.read(record).await?;
    let validator = validation.map(|(v, lote_id)| StreamingValidator::new(v.clone(), lote_id.to_string()));
    store_local(to, record, body, Some(since_purge), validator).await
}

/// Writes `body` into the local store under `record`, verified against its length and digest
/// (and by `validator`, if any, before the commit).
async fn store_local(
    store: &Arc<Store>,
    record: &Record,
    mut body: Chunks,
    since_purge: Option<u64>,
    mut validator: Option<StreamingValidator>,
) -> Result<(), TierError> {
    use sha2::Digest as _;
    let mut w = store.begin().await.map_err(local_error)?;
    let mut written = 0u64;
    // With a validator, the digest is also taken here: damage (length, digest) is reported as
    // such before a verdict the damage itself may have caused.
    let mut hasher = validator.as_ref().map(|_| sha2::Sha256::new());
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        written += chunk.len() as u64;
        if written > record.size {
            return Err(TierError::Corrupt { tier: LOCAL, detail: format!("body longer than {} bytes", record.size) });
        }
        if let (Some(v), Some(h)) = (validator.as_mut(), hasher.as_mut()) {
            v.feed(&chunk);
            h.update(&chunk);
        }
        w.write(&chunk).await.map_err(local_error)?;
    }
    if let (Some(v), Some(h)) = (validator, hasher) {
        if written < record.size {
            return Err(TierError::Short { tier: LOCAL, detail: format!("{written} of {} bytes", record.size) });
        }
        if <[u8; 32]>::from(h.finalize()) != record.sha256 {
            return Err(TierError::Corrupt { tier: LOCAL, detail: "sha256 differs from the record's".into() });
        }
        if let Verdict::Invalid { token, reason, .. } = v.finish() {
            return Err(TierError::Invalid { tier: LOCAL, token, detail: reason });
        }
    }
    let expect = Expect {
        len: Some(record.size),
        sha256: Some(record.sha256),
        stored_at_ms: Some(record.stored_at_ms as u128),
        since_purge,
    };
    w.commit(store, &record.key, record.meta.clone(), expect).await.map_err(local_error)?;
    Ok(())
}

const LOCAL: &str = "local";

fn local_error(e: StoreError) -> TierError {
    match e {
        StoreError::Digest { .. } => TierError::Corrupt { tier: LOCAL, detail: e.to_string() },
        StoreError::Length { .. } => TierError::Short { tier: LOCAL, detail: e.to_string() },
        e => TierError::Failed { tier: LOCAL, detail: e.to_string() },
    }
}

/// The local cacache store as a tier.
impl Tier for Arc<Store> {
    async fn lookup(&self, key: &str) -> Result<Option<Record>, TierError> {
        Ok(self.get(key).map(|e| Record::of(&e)))
    }

    async fn read(&self, record: &Record) -> Result<Chunks, TierError> {
        let entry = self.get(&record.key).filter(|e| e.sha256 == record.sha256).ok_or_else(|| TierError::Failed {
            tier: LOCAL,
            detail: format!("no entry {:?} with that digest", record.key),
        })?;
        let file = tokio::fs::File::open(&entry.path)
            .await
            .map_err(|e| TierError::Failed { tier: LOCAL, detail: format!("{}: {e}", entry.path.display()) })?;
        // Held while the stream lives: the collector leaves the file alone.
        let guard = self.reading(&entry.path);
        let stream = file_chunks(file).map(move |r| {
            let _ = &guard;
            r.map_err(|e| TierError::Failed { tier: LOCAL, detail: e.to_string() })
        });
        Ok(stream.boxed())
    }

    async fn store(&self, record: &Record, body: Chunks) -> Result<(), TierError> {
        store_local(self, record, body, None, None).await
    }

    async fn remove(&self, key: &str) -> Result<(), TierError> {
        self.purge(Purge::Key(key.to_string())).await.map(drop).map_err(local_error)
    }
}

/// A file as a stream of large chunks.
fn file_chunks(file: tokio::fs::File) -> BoxStream<'static, std::io::Result<Bytes>> {
    const CHUNK: usize = 256 * 1024;
    futures_util::stream::unfold(Some(file), |state| async move {
        use tokio::io::AsyncReadExt;
        let mut file = state?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}
