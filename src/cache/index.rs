//! The compact in-memory index of the store, and the reading of cacache's index buckets it
//! is loaded from.
//!
//! A store may hold a million batches, so what memory keeps per entry is only what the hot
//! path and the store's own bookkeeping need ([`Slot`]: digests, size, times, rule, batch id,
//! variants, counters — a few hundred bytes). The response head lives in the entry's index
//! line on disk: an entry is *materialized* into a full [`Entry`] (head, validators, verified
//! state) from its slot and that line when it is served, and a bounded number of those are
//! kept ([`HOT_ENTRIES`]). cacache's buckets stay the record of truth: a slot is only ever
//! built from a bucket's latest line for its key, or from a commit that wrote that line.
//!
//! Bucket format (cacache 13, `index-v5`): one line per write, `sha256hex(json)\tjson`, the
//! json `{key, integrity (null: a tombstone), time, size, metadata, raw_metadata}`; the
//! latest line of a key wins; a line whose hash does not match is skipped (a torn append).

use super::entry::{Entry, EntryMeta, EntryParts, EntryState, META_VERSION};
use super::negotiate::Coding;
use ssri::{Algorithm, Integrity};
use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

/// Materialized entries kept in memory beyond their slots: about 3 KB each (head, validators,
/// paths), so at most ≈50 MB, whatever the store's size. The rest are read from their index
/// line when asked for (one small file read).
pub const HOT_ENTRIES: usize = 16_384;

/// What memory keeps of one live entry.
#[derive(Debug)]
pub struct Slot {
    /// Which commit of the key this is (see [`Entry::commit`]).
    pub commit: u64,
    pub sha256: [u8; 32],
    pub size: u64,
    pub stored_at_ms: u64,
    pub gen_ms: u64,
    pub status: u16,
    /// The rule that stored it (one shared name per rule).
    pub rule: Arc<str>,
    pub lote: LoteId,
    /// Its compressed variants, in coding order.
    pub variants: Box<[VariantRef]>,
    /// Hits, LRU clock, compressions tried: shared with its materialized entry.
    pub state: Arc<EntryState>,
    /// Its materialized entry, while it is one of the [`HOT_ENTRIES`].
    pub hot: Option<Arc<Entry>>,
    /// Whether the store's queue of hot entries holds this slot (once at most).
    pub queued: bool,
    /// Which publication of the key this slot is (a successor with other variants is a new
    /// one): an entry is made hot only in the slot it was built from.
    pub generation: u32,
}

/// A slot's batch id: a span of its key when the key contains it (the usual case, as
/// `<lote_id>_resultados.json`), so that it costs no allocation.
#[derive(Debug)]
pub enum LoteId {
    InKey { start: u16, len: u16 },
    Own(Box<str>),
}

impl LoteId {
    pub fn of(key: &str, lote_id: &str) -> LoteId {
        match key.find(lote_id) {
            Some(start) if start + lote_id.len() <= u16::MAX as usize && !lote_id.is_empty() => {
                LoteId::InKey { start: start as u16, len: lote_id.len() as u16 }
            }
            _ => LoteId::Own(lote_id.into()),
        }
    }

    pub fn get<'a>(&'a self, key: &'a str) -> &'a str {
        match self {
            LoteId::InKey { start, len } => &key[*start as usize..(*start + *len) as usize],
            LoteId::Own(s) => s,
        }
    }
}

/// One stored compressed variant, as the slot keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantRef {
    pub coding: Coding,
    pub sha256: [u8; 32],
    pub size: u64,
}

impl Slot {
    /// The slot of `entry` (just committed or re-indexed), sharing its state.
    pub fn of(entry: &Entry, rule: Arc<str>) -> Slot {
        Slot {
            commit: entry.commit,
            sha256: entry.sha256,
            size: entry.size,
            stored_at_ms: entry.stored_at_ms as u64,
            gen_ms: entry.gen_ms,
            status: entry.status.as_u16(),
            rule,
            lote: LoteId::of(&entry.key, &entry.lote_id),
            variants: entry
                .variants
                .iter()
                .filter_map(|v| Some(VariantRef { coding: v.coding?, sha256: v.sha256, size: v.size }))
                .collect(),
            state: entry.state.clone(),
            hot: None,
            queued: false,
            generation: 0,
        }
    }

    /// Bytes on disk: the body and every variant.
    pub fn stored_bytes(&self) -> u64 {
        self.size + self.variants.iter().map(|v| v.size).sum::<u64>()
    }

    /// The sha256 of every content file it holds: its body, then its variants.
    pub fn digests(&self) -> impl Iterator<Item = &[u8; 32]> {
        std::iter::once(&self.sha256).chain(self.variants.iter().map(|v| &v.sha256))
    }

    /// Whether `line` (a bucket's latest line of `key`) is the one this slot was built from:
    /// same body, time, rule, status, batch and variants.
    pub fn matches(&self, key: &str, line: &Line) -> bool {
        line.sha256 == self.sha256
            && line.size == self.size
            && line.time as u64 == self.stored_at_ms
            && line.meta.rule == *self.rule
            && line.meta.status == self.status
            && line.meta.lote_id == self.lote.get(key)
            && line.meta.variants.len() == self.variants.len()
            && line
                .meta
                .variants
                .iter()
                .zip(self.variants.iter())
                .all(|(m, v)| m.coding == v.coding && m.size == v.size && sha256_of_sri(&m.integrity) == Some(v.sha256))
    }

    /// The full entry of this slot under `key`, with the head of `line` (which must match:
    /// see [`Slot::matches`]). None if the stored head is no longer valid.
    pub fn materialize(&self, dir: &Path, key: &str, line: &Line) -> Option<Entry> {
        let integrity = integrity_of(&self.sha256);
        let parts = EntryParts {
            key: key.to_string(),
            rule: self.rule.to_string(),
            lote_id: self.lote.get(key).to_string(),
            path: content_path(dir, &integrity),
            integrity,
            size: self.size,
            status: http::StatusCode::from_u16(self.status).ok()?,
            head: line.meta.header_map()?,
            stored_at_ms: self.stored_at_ms as u128,
            gen_ms: self.gen_ms,
            state: self.state.clone(),
            commit: self.commit,
        };
        let entry = Entry::new(parts, Vec::new())?;
        let variants = self
            .variants
            .iter()
            .filter_map(|v| {
                let integrity = integrity_of(&v.sha256);
                let path = content_path(dir, &integrity);
                Entry::variant(&entry, v.coding, integrity, v.size, path).map(Arc::new)
            })
            .collect();
        Some(entry.with_variants(variants))
    }
}

/// A bucket's latest valid line for one key.
#[derive(Debug)]
pub struct Line {
    pub key: String,
    pub sha256: [u8; 32],
    pub size: u64,
    pub time: u128,
    pub meta: EntryMeta,
}

impl Line {
    /// The slot this line describes (a new commit number and state: a restart starts them).
    pub fn slot(&self, rule: Arc<str>) -> Slot {
        let tried = self.meta.variants.iter().fold(0, |bits, v| bits | v.coding.bit());
        Slot {
            commit: super::entry::next_commit(),
            sha256: self.sha256,
            size: self.size,
            stored_at_ms: self.time as u64,
            gen_ms: self.meta.gen_ms,
            status: self.meta.status,
            rule,
            lote: LoteId::of(&self.key, &self.meta.lote_id),
            variants: self
                .meta
                .variants
                .iter()
                .filter_map(|v| {
                    Some(VariantRef { coding: v.coding, sha256: sha256_of_sri(&v.integrity)?, size: v.size })
                })
                .collect(),
            state: EntryState::new(self.time as u64, tried),
            hot: None,
            queued: false,
            generation: 0,
        }
    }
}

/// What a bucket says of one key.
#[derive(Debug)]
pub enum KeyState {
    /// Its latest line: an entry of ours.
    Live(Box<Line>),
    /// Its latest line is a tombstone, or an entry that is not ours (another metadata version,
    /// not sha256, unreadable): nothing to serve.
    Gone,
}

/// The raw form of a bucket line.
#[derive(serde::Deserialize)]
struct RawLine {
    key: String,
    integrity: Option<String>,
    time: u128,
    size: u64,
    metadata: serde_json::Value,
}

/// Reads the bucket at `path`: per key, in first-seen order, what its latest valid line says
/// (a missing bucket is empty). Lines whose hash does not match are skipped, as cacache does.
pub fn read_bucket(path: &Path) -> io::Result<Vec<(String, KeyState)>> {
    use sha2::Digest as _;
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let text = String::from_utf8_lossy(&text);
    let mut out: Vec<(String, Option<RawLine>)> = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let Some((hash, json)) = line.split_once('\t') else { continue };
        if hex::encode(sha2::Sha256::digest(json.as_bytes())) != hash {
            continue;
        }
        let raw: Option<RawLine> = serde_json::from_str(json).ok();
        let key = match &raw {
            Some(r) => r.key.clone(),
            // A valid line that is not a cacache line at all: its key is unknown; skipped.
            None => continue,
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = raw,
            None => out.push((key, raw)),
        }
    }
    Ok(out
        .into_iter()
        .map(|(key, raw)| (key, raw.and_then(line_of).map_or(KeyState::Gone, |l| KeyState::Live(Box::new(l)))))
        .collect())
}

/// The latest line of `key` in its bucket under `dir`.
pub fn read_key(dir: &Path, key: &str) -> io::Result<KeyState> {
    Ok(read_bucket(&bucket_path(dir, key))?.into_iter().find(|(k, _)| k == key).map_or(KeyState::Gone, |(_, s)| s))
}

fn line_of(raw: RawLine) -> Option<Line> {
    let integrity: Integrity = raw.integrity?.parse().ok()?;
    let sha256 = super::entry::sha256_of(&integrity)?;
    let meta: EntryMeta = serde_json::from_value(raw.metadata).ok()?;
    if meta.v != META_VERSION {
        return None;
    }
    Some(Line { key: raw.key, sha256, size: raw.size, time: raw.time, meta })
}

/// Where cacache keeps the index bucket of `key`.
pub fn bucket_path(dir: &Path, key: &str) -> PathBuf {
    use sha1::Digest as _;
    let h = hex::encode(sha1::Sha1::digest(key.as_bytes()));
    dir.join("index-v5").join(&h[0..2]).join(&h[2..4]).join(&h[4..])
}

/// Where cacache keeps the content of `sri` (its `content-v2` layout).
pub fn content_path(dir: &Path, sri: &Integrity) -> PathBuf {
    let (algo, hex) = sri.to_hex();
    dir.join("content-v2").join(algo.to_string()).join(&hex[0..2]).join(&hex[2..4]).join(&hex[4..])
}

/// The sha256 integrity of a digest.
pub fn integrity_of(sha256: &[u8; 32]) -> Integrity {
    Integrity::from_hex(hex::encode(sha256), Algorithm::Sha256).expect("a sha256 hex digest")
}

fn sha256_of_sri(sri: &str) -> Option<[u8; 32]> {
    super::entry::sha256_of(&sri.parse().ok()?)
}
