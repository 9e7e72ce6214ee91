//! What is stored beside each body: the response head and facts about the entry, kept as
//! the JSON metadata of the cacache index line, and its in-memory form.

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use ssri::Integrity;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Version of the metadata layout; entries of another version are ignored at load.
pub const META_VERSION: u32 = 1;

/// A header value as stored: text when it is UTF-8, raw bytes otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StoredValue {
    Text(String),
    Bytes(Vec<u8>),
}

/// The JSON metadata of an index line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryMeta {
    pub v: u32,
    /// The rule that stored it (entries are namespaced by rule). Entries written before
    /// rules were recorded belong to the built-in rule's name, which the shipped config uses.
    #[serde(default = "legacy_rule")]
    pub rule: String,
    pub lote_id: String,
    pub status: u16,
    pub headers: Vec<(String, StoredValue)>,
    /// Milliseconds the origin took to produce the whole body.
    pub gen_ms: u64,
}

fn legacy_rule() -> String {
    "batch-results".to_string()
}

impl EntryMeta {
    pub fn new(rule: &str, lote_id: &str, status: StatusCode, headers: &HeaderMap, gen_ms: u64) -> Self {
        let headers = headers
            .iter()
            .map(|(n, v)| {
                let value = match std::str::from_utf8(v.as_bytes()) {
                    Ok(s) => StoredValue::Text(s.to_string()),
                    Err(_) => StoredValue::Bytes(v.as_bytes().to_vec()),
                };
                (n.as_str().to_string(), value)
            })
            .collect();
        EntryMeta {
            v: META_VERSION,
            rule: rule.to_string(),
            lote_id: lote_id.to_string(),
            status: status.as_u16(),
            headers,
            gen_ms,
        }
    }

    /// The stored head as a header map; None if any stored name or value is no longer valid.
    pub fn header_map(&self) -> Option<HeaderMap> {
        let mut map = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            let value = match value {
                StoredValue::Text(s) => HeaderValue::from_str(s).ok()?,
                StoredValue::Bytes(b) => HeaderValue::from_bytes(b).ok()?,
            };
            map.append(name, value);
        }
        Some(map)
    }
}

/// One stored entry as the proxy serves it.
#[derive(Debug)]
pub struct Entry {
    pub key: String,
    /// The rule that stored it: only that rule's requests are served it.
    pub rule: String,
    pub lote_id: String,
    pub integrity: Integrity,
    /// The sha256 of the body, as raw bytes.
    pub sha256: [u8; 32],
    pub size: u64,
    pub status: StatusCode,
    /// The head a hit answers with: the origin's end-to-end headers plus the exact
    /// `Content-Length`, `ETag`, `Repr-Digest`, `Via` and `Cache-Status` (built once; each hit
    /// clones it and adds `Age`).
    pub headers: HeaderMap,
    /// Unix milliseconds when the entry was committed.
    pub stored_at_ms: u128,
    pub gen_ms: u64,
    /// Where the content file is.
    pub path: PathBuf,
    /// Strong `ETag`, derived from the digest.
    pub etag: HeaderValue,
    /// `Repr-Digest` (RFC 9530) of the body.
    pub repr_digest: HeaderValue,
    /// Hits served since the process started.
    pub hits: AtomicU64,
    /// Unix milliseconds of the last hit (the commit time until the first hit): the LRU clock.
    pub last_hit_ms: AtomicU64,
    /// The content file as it was when last hashed and found good (and, for small entries,
    /// its verified bytes). A hit that finds the file unchanged skips hashing.
    pub verified: ArcSwapOption<Verified>,
    /// Held while one request loads this entry into the memory tier, so concurrent first
    /// readers of a large body wait for it instead of each buffering a copy.
    pub loading: tokio::sync::Mutex<()>,
}

/// A successful verification of an entry's content file.
#[derive(Debug)]
pub struct Verified {
    pub fingerprint: crate::fingerprint::Fingerprint,
    /// The verified body, kept in memory (while the memory tier has room).
    pub body: Option<bytes::Bytes>,
    /// Unix ms when the file was last found unchanged (the memory tier re-checks it at most
    /// every `cache.memory_recheck`).
    pub checked_ms: AtomicU64,
}

impl Entry {
    /// Records a hit now.
    pub fn touch(&self) {
        self.hits.fetch_add(1, Relaxed);
        self.last_hit_ms.store(crate::clock::now_ms() as u64, Relaxed);
    }
}

/// The head of a hit, from the origin's stored end-to-end headers.
pub fn hit_head(mut h: HeaderMap, size: u64, etag: &HeaderValue, repr_digest: &HeaderValue) -> HeaderMap {
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(http::header::ETAG, etag.clone());
    h.insert(crate::headers::REPR_DIGEST, repr_digest.clone());
    h.append(http::header::VIA, HeaderValue::from_static(crate::headers::VIA));
    h.insert(super::status::CACHE_STATUS, super::status::CacheStatus::Hit.header_value());
    h
}

/// The origin's end-to-end headers a hit head was built from (the inverse of [`hit_head`]).
pub fn stored_head(hit: &HeaderMap) -> HeaderMap {
    let mut h = hit.clone();
    for name in [http::header::CONTENT_LENGTH, http::header::ETAG, http::header::VIA, http::header::AGE] {
        h.remove(name);
    }
    h.remove(crate::headers::REPR_DIGEST);
    h.remove(super::status::CACHE_STATUS);
    h
}

/// The `ETag` and `Repr-Digest` values for a body with this sha256.
pub fn validators(sha256: &[u8; 32], integrity: &Integrity) -> (HeaderValue, HeaderValue) {
    let etag = HeaderValue::from_str(&format!("\"sha256-{}\"", hex::encode(sha256))).expect("hex is a valid header");
    // ssri keeps each digest as standard base64, which is what RFC 9530 byte sequences use.
    let b64 = integrity
        .hashes
        .iter()
        .find(|h| h.algorithm == ssri::Algorithm::Sha256)
        .map(|h| h.digest.as_str())
        .unwrap_or_default();
    let digest = HeaderValue::from_str(&format!("sha-256=:{b64}:")).unwrap_or_else(|_| HeaderValue::from_static(""));
    (etag, digest)
}
