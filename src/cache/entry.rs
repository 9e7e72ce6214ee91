//! What is stored beside each body: the response head and facts about the entry, kept as
//! the JSON metadata of the cacache index line, and its in-memory form.

use super::negotiate::Coding;
use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use ssri::{Algorithm, Integrity};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

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
    /// Compressed representations of the body, each its own content file (absent in
    /// entries written before variants existed, and in shared-store records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantMeta>,
}

/// One stored compressed representation of an entry's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantMeta {
    pub coding: Coding,
    /// Subresource integrity (sha256) of the compressed bytes: names its content file.
    pub integrity: String,
    pub size: u64,
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
            variants: Vec::new(),
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

/// One stored entry as the proxy serves it, or one compressed variant of one (`coding` set;
/// its entry holds it in `variants`). A variant has its own content file, digest, size,
/// `ETag` and hit head, and is read and verified exactly like the entry's own body.
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
    /// Hit counters, LRU clock and compressions tried: shared with the entry's successors
    /// (same body, other variants) and with its slot in the store's compact index, so a hit
    /// on a snapshot taken before its variants changed, or on one since dropped from memory,
    /// still counts.
    pub state: Arc<EntryState>,
    /// The content file as it was when last hashed and found good (and, for small entries,
    /// its verified bytes). A hit that finds the file unchanged skips hashing.
    pub verified: ArcSwapOption<Verified>,
    /// Held while one request loads this entry into the memory tier, so concurrent first
    /// readers of a large body wait for it instead of each buffering a copy.
    pub loading: tokio::sync::Mutex<()>,
    /// The content coding of a variant; None for the identity body.
    pub coding: Option<Coding>,
    /// The entry's stored variants (empty on a variant).
    pub variants: Vec<Arc<Entry>>,
    /// Which commit (or load) of the key this is. A successor — the same body with other
    /// variants — keeps it; every commit gets a new one. A judgment of an entry (evict it,
    /// add a variant built from its body) holds for every successor of it, never for a
    /// later commit.
    pub commit: u64,
}

/// Source of [`Entry::commit`] numbers.
static COMMITS: AtomicU64 = AtomicU64::new(1);

/// A new commit number (see [`Entry::commit`]).
pub fn next_commit() -> u64 {
    COMMITS.fetch_add(1, Relaxed)
}

/// What changes about a stored entry while it is served, kept once per commit of a key.
#[derive(Debug, Default)]
pub struct EntryState {
    /// Hits served since the process started (a variant's hits count on its entry too).
    pub hits: AtomicU64,
    /// Unix milliseconds of the last hit (the commit time until the first hit): the LRU clock.
    pub last_hit_ms: AtomicU64,
    /// Codings a compression was started for (bits of [`Coding::bit`]), so that hits do not
    /// ask again: cleared for a coding whose variant is dropped as bad, and not kept across a
    /// restart (an entry loaded without a variant is tried again once).
    pub compress_tried: AtomicU8,
}

impl EntryState {
    /// The state of an entry whose LRU clock starts at `last_hit_ms`, with `tried` set.
    pub fn new(last_hit_ms: u64, tried: u8) -> Arc<EntryState> {
        Arc::new(EntryState {
            hits: AtomicU64::new(0),
            last_hit_ms: AtomicU64::new(last_hit_ms),
            compress_tried: AtomicU8::new(tried),
        })
    }
}

/// What an [`Entry`] is built from.
pub struct EntryParts {
    pub key: String,
    pub rule: String,
    pub lote_id: String,
    pub integrity: Integrity,
    pub size: u64,
    pub status: StatusCode,
    /// The origin's end-to-end headers (see [`stored_head`]).
    pub head: HeaderMap,
    pub stored_at_ms: u128,
    pub gen_ms: u64,
    pub path: PathBuf,
    /// Its hit counters and LRU clock (see [`EntryState::new`]).
    pub state: Arc<EntryState>,
    /// Its commit number: [`next_commit`] for a new one, the slot's for a stored one.
    pub commit: u64,
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
    /// The entry (identity body) of `parts`, with `variants`; None if the integrity is not sha256.
    pub fn new(parts: EntryParts, variants: Vec<Arc<Entry>>) -> Option<Entry> {
        Entry::build(parts, None, variants)
    }

    /// A variant of `parent` in `coding`, stored as `integrity` (`size` bytes) at `path`.
    pub fn variant(parent: &Entry, coding: Coding, integrity: Integrity, size: u64, path: PathBuf) -> Option<Entry> {
        let mut head = stored_head(&parent.headers);
        // Digests of the identity body from the origin would be wrong on compressed bytes.
        for name in ["content-md5", "content-digest", "digest"] {
            head.remove(name);
        }
        head.insert(http::header::CONTENT_ENCODING, coding.header_value());
        let parts = EntryParts {
            key: parent.key.clone(),
            rule: parent.rule.clone(),
            lote_id: parent.lote_id.clone(),
            integrity,
            size,
            status: parent.status,
            head,
            stored_at_ms: parent.stored_at_ms,
            gen_ms: parent.gen_ms,
            path,
            // A variant's own hits (its entry counts them too); judged with its entry's commit.
            state: EntryState::new(parent.state.last_hit_ms.load(Relaxed), 0),
            commit: parent.commit,
        };
        Entry::build(parts, Some(coding), Vec::new())
    }

    fn build(p: EntryParts, coding: Option<Coding>, variants: Vec<Arc<Entry>>) -> Option<Entry> {
        let sha256 = sha256_of(&p.integrity)?;
        let (etag, repr_digest) = validators(&sha256, &p.integrity);
        let tried = variants.iter().filter_map(|v| v.coding).fold(0, |bits, c| bits | c.bit());
        p.state.compress_tried.fetch_or(tried, Relaxed);
        Some(Entry {
            headers: hit_head(p.head, p.size, &etag, &repr_digest),
            etag,
            repr_digest,
            key: p.key,
            rule: p.rule,
            lote_id: p.lote_id,
            integrity: p.integrity,
            sha256,
            size: p.size,
            status: p.status,
            stored_at_ms: p.stored_at_ms,
            gen_ms: p.gen_ms,
            path: p.path,
            state: p.state,
            verified: Default::default(),
            loading: Default::default(),
            coding,
            variants,
            commit: p.commit,
        })
    }

    /// This entry with `variants` as its variants (an entry just read from the index).
    pub fn with_variants(self, variants: Vec<Arc<Entry>>) -> Entry {
        let tried = variants.iter().filter_map(|v| v.coding).fold(0, |bits, c| bits | c.bit());
        self.state.compress_tried.fetch_or(tried, Relaxed);
        Entry { variants, ..self }
    }

    /// The entry that replaces this live one when its variants change: the same body, head,
    /// commit number and (shared) state, whose compressions tried become `tried`. Its verification is moved over when it is published (see
    /// `Store::reindex`), not here: a successor that is never published takes nothing.
    pub fn successor(&self, variants: Vec<Arc<Entry>>, tried: u8) -> Entry {
        let tried = variants.iter().filter_map(|v| v.coding).fold(tried, |bits, c| bits | c.bit());
        self.state.compress_tried.store(tried, Relaxed);
        Entry {
            key: self.key.clone(),
            rule: self.rule.clone(),
            lote_id: self.lote_id.clone(),
            integrity: self.integrity.clone(),
            sha256: self.sha256,
            size: self.size,
            status: self.status,
            headers: self.headers.clone(),
            stored_at_ms: self.stored_at_ms,
            gen_ms: self.gen_ms,
            path: self.path.clone(),
            etag: self.etag.clone(),
            repr_digest: self.repr_digest.clone(),
            state: self.state.clone(),
            verified: Default::default(),
            loading: Default::default(),
            coding: self.coding,
            variants,
            commit: self.commit,
        }
    }

    /// The stored variant in `coding`, if any.
    pub fn variant_in(&self, coding: Coding) -> Option<&Arc<Entry>> {
        self.variants.iter().find(|v| v.coding == Some(coding))
    }

    /// Bytes on disk: the body and every variant.
    pub fn stored_bytes(&self) -> u64 {
        self.size + self.variants.iter().map(|v| v.size).sum::<u64>()
    }

    /// This entry, then each of its variants: every content file it holds, each verified and
    /// removed on its own.
    pub fn files(&self) -> impl Iterator<Item = &Entry> {
        std::iter::once(self).chain(self.variants.iter().map(|v| v.as_ref()))
    }

    /// The entry's metadata as stored in its index line, variants included.
    pub fn meta(&self) -> EntryMeta {
        let mut meta = EntryMeta::new(&self.rule, &self.lote_id, self.status, &stored_head(&self.headers), self.gen_ms);
        meta.variants = self
            .variants
            .iter()
            .filter_map(|v| Some(VariantMeta { coding: v.coding?, integrity: v.integrity.to_string(), size: v.size }))
            .collect();
        meta
    }

    /// Whether the origin forbade transforming the body (`Cache-Control: no-transform`).
    pub fn no_transform(&self) -> bool {
        self.headers
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
    }

    /// Records a hit now.
    pub fn touch(&self) {
        self.state.hits.fetch_add(1, Relaxed);
        self.state.last_hit_ms.store(crate::clock::now_ms() as u64, Relaxed);
    }

    /// Hits served since the process started.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Relaxed)
    }

    /// Unix ms of the last hit (the commit time until the first).
    pub fn last_hit_ms(&self) -> u64 {
        self.state.last_hit_ms.load(Relaxed)
    }

    /// Codings a compression was started for (see [`EntryState::compress_tried`]).
    pub fn compress_tried(&self) -> &AtomicU8 {
        &self.state.compress_tried
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
    for name in [
        http::header::CONTENT_LENGTH,
        http::header::ETAG,
        http::header::VIA,
        http::header::AGE,
        http::header::CONTENT_ENCODING,
    ] {
        h.remove(name);
    }
    h.remove(crate::headers::REPR_DIGEST);
    h.remove(super::status::CACHE_STATUS);
    h
}

/// The sha256 of a sha256 integrity, as raw bytes.
pub fn sha256_of(sri: &Integrity) -> Option<[u8; 32]> {
    let (algo, hex) = sri.to_hex();
    if algo != Algorithm::Sha256 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
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
