//! The on-disk store: cacache for content and index, behind a narrow API of ours, plus an
//! in-memory index of every live entry so that a hit never reads an index bucket.
//!
//! cacache specifics confined here: content is written with `open_hash` + `commit` (no key),
//! fsynced by us (cacache never fsyncs), and only then indexed with `index::insert`; the
//! content path follows cacache's `content-v2/{algo}/{hex[0..2]}/{hex[2..4]}/{rest}` layout
//! and the index bucket its `index-v5/{sha1[0..2]}/{sha1[2..4]}/{rest}` one (tests pin both).
//! Removing an entry writes a tombstone and keeps the content; the garbage collector here
//! removes content no live entry references, and compacts buckets.

use super::entry::{sha256_of, Entry, EntryMeta, EntryParts, META_VERSION};
use super::negotiate::Coding;
use crate::metrics::Metrics;
use ssri::{Algorithm, Integrity};
use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, RwLock,
    },
    time::{Duration, SystemTime},
};
use tokio::io::AsyncWriteExt;

/// Capacity of the buffer in front of cacache's writer (it spawns a blocking task per write).
const WRITE_BUFFER: usize = 256 * 1024;
/// Default for content files younger than which nothing is collected: a commit renames
/// its file into place a moment before it indexes it.
const GC_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache store: {0}")]
    Cacache(#[from] cacache::Error),
    #[error("cache store I/O: {0}")]
    Io(#[from] io::Error),
    #[error("body length {got} does not match the expected {expected}")]
    Length { got: u64, expected: u64 },
    #[error("content digest is not sha256")]
    Algorithm,
    #[error("body digest sha256:{got} does not match the expected sha256:{expected}")]
    Digest { got: String, expected: String },
    #[error("entry of {size} bytes is larger than cache.max_size ({max} bytes); not kept")]
    TooLarge { size: u64, max: u64 },
    #[error("a purge covering this entry arrived while it was being fetched; not stored")]
    Purged,
    #[error("cache directory {dir} is in use by another lotecache process{holder}; stop it first or use another --cache-dir")]
    Locked { dir: String, holder: String },
}

/// Name of the lock file that marks a cache directory as owned by one process.
pub const LOCK_FILE: &str = "lotecache.lock";

/// The store of one cache directory.
pub struct Store {
    dir: PathBuf,
    /// Held (flock) for the store's lifetime: one process owns a cache directory.
    _lock: std::fs::File,
    index: RwLock<HashMap<String, Arc<Entry>>>,
    /// Serializes index-file mutations with the matching in-memory update, so the two never
    /// disagree on which entry of a key is the latest.
    index_write: Mutex<()>,
    /// Bytes of live entries.
    bytes: AtomicU64,
    /// Size cap in bytes (0: none). Changes on reload.
    max_size: AtomicU64,
    /// Free space (bytes) kept on the file system: below it nothing is stored. Changes on reload.
    min_free: AtomicU64,
    /// Content files younger than this (ms) are never collected.
    gc_grace_ms: AtomicU64,
    /// Content files being read right now, with their reader counts: never collected.
    readers: Mutex<HashMap<PathBuf, usize>>,
    /// Bytes of verified bodies kept in memory, and the caps on them.
    memory_bytes: AtomicU64,
    /// How often (ms) a memory-tier hit re-checks that the file is unchanged.
    memory_recheck_ms: AtomicU64,
    memory_max: AtomicU64,
    memory_object_max: AtomicU64,
    /// Recent purges, so that a fill started before one does not store what it fetched.
    purges: Mutex<PurgeLog>,
    metrics: Arc<Metrics>,
}

/// The purges since the store opened: a counter (the epoch) and the most recent ones.
#[derive(Default)]
struct PurgeLog {
    epoch: u64,
    /// `(epoch it set, what it removed)`, oldest first, at most `PURGE_LOG` of them.
    recent: VecDeque<(u64, Purge)>,
}

/// Purges remembered individually; a fill older than all of them counts as purged.
const PURGE_LOG: usize = 256;

/// What a garbage collection did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct GcReport {
    pub removed_files: usize,
    pub removed_bytes: u64,
    pub compacted_buckets: usize,
}

impl Store {
    /// Opens (creating if needed) the store at `dir`: takes its lock, sweeps temp files left
    /// by a crash, loads the index into memory (dropping entries whose content is missing).
    pub async fn open(dir: PathBuf, max_size: u64, metrics: Arc<Metrics>) -> Result<Arc<Store>, StoreError> {
        tokio::task::spawn_blocking(move || Store::open_sync(dir, max_size, metrics)).await.map_err(io::Error::other)?
    }

    fn open_sync(dir: PathBuf, max_size: u64, metrics: Arc<Metrics>) -> Result<Arc<Store>, StoreError> {
        // cacache creates index-v5 on first insert; listing a store without it is an error.
        std::fs::create_dir_all(dir.join("index-v5"))?;
        let lock = lock_dir(&dir)?;
        let swept = sweep_tmp(&dir);
        let loaded = load_entries(&dir);
        let mut map = HashMap::new();
        for entry in loaded.entries {
            match std::fs::metadata(&entry.path) {
                Ok(m) if m.len() == entry.size => {
                    // A variant whose file is gone is left out, for good (a new index line
                    // without it), and built again on demand.
                    let entry = match entry.variants.iter().all(|v| file_has_size(&v.path, v.size)) {
                        true => entry,
                        false => {
                            let entry = entry.without(|v| !file_has_size(&v.path, v.size));
                            tracing::warn!(key = %entry.key, "a compressed variant's file is missing or wrong size; variant dropped");
                            if let Err(e) = write_index_line(&dir, &entry) {
                                tracing::warn!(key = %entry.key, error = %e, "could not record the dropped variant");
                            }
                            entry
                        }
                    };
                    map.insert(entry.key.clone(), Arc::new(entry));
                }
                _ => {
                    tracing::warn!(key = %entry.key, "content missing or wrong size; entry dropped");
                    let _ = cacache::index::delete(&dir, &entry.key);
                }
            }
        }
        let bytes: u64 = map.values().map(|e| e.stored_bytes()).sum();
        metrics.store_bytes.set(bytes as i64);
        metrics.store_entries.set(map.len() as i64);
        metrics.store_max_bytes.set(max_size as i64);
        tracing::info!(dir = %dir.display(), entries = map.len(), bytes, skipped = loaded.skipped, swept, "store opened");
        Ok(Arc::new(Store {
            dir,
            _lock: lock,
            index: RwLock::new(map),
            index_write: Mutex::new(()),
            bytes: AtomicU64::new(bytes),
            max_size: AtomicU64::new(max_size),
            min_free: AtomicU64::new(0),
            gc_grace_ms: AtomicU64::new(GC_GRACE.as_millis() as u64),
            readers: Mutex::default(),
            memory_bytes: AtomicU64::new(0),
            memory_recheck_ms: AtomicU64::new(1000),
            memory_max: AtomicU64::new(0),
            memory_object_max: AtomicU64::new(0),
            purges: Mutex::default(),
            metrics,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live entry under `key`, from memory.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.index.read().expect("index lock").get(key).cloned()
    }

    /// The live entry under `key` if rule `rule` stored it: entries are namespaced by rule,
    /// so two rules whose keys happen to coincide never serve each other's documents.
    pub fn get_for(&self, rule: &str, key: &str) -> Option<Arc<Entry>> {
        self.get(key).filter(|e| e.rule == rule)
    }

    /// Every live entry, sorted by key.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut v = self.entries_unsorted();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Every live entry, in no order (cheaper: for totals).
    pub fn entries_unsorted(&self) -> Vec<Arc<Entry>> {
        self.index.read().expect("index lock").values().cloned().collect()
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of live entries.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// The size cap, if one is set.
    pub fn max_size(&self) -> Option<u64> {
        Some(self.max_size.load(Relaxed)).filter(|&m| m > 0)
    }

    pub fn set_max_size(&self, max_size: u64) {
        self.max_size.store(max_size, Relaxed);
        self.metrics.store_max_bytes.set(max_size as i64);
    }

    /// Bytes free for this process on the store's file system (None if `statvfs` failed).
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    pub fn set_min_free(&self, min_free: u64) {
        self.min_free.store(min_free, Relaxed);
    }

    /// Whether a body of `len` bytes (unknown: 0) may be written now without taking the file
    /// system below `cache.min_free`. A failed `statvfs` says no: storing is optional.
    pub fn has_room_for(&self, len: Option<u64>) -> bool {
        let min_free = self.min_free.load(Relaxed);
        if min_free == 0 {
            return true;
        }
        free_bytes(&self.dir).is_some_and(|free| free >= min_free.saturating_add(len.unwrap_or(0)))
    }

    /// Sizes the memory tier: at most `total` bytes of verified bodies, each at most `object`,
    /// their files re-checked at most every `recheck`.
    pub fn set_memory_tier(&self, total: u64, object: u64, recheck: Duration) {
        self.memory_max.store(total, Relaxed);
        self.memory_object_max.store(object, Relaxed);
        self.memory_recheck_ms.store(recheck.as_millis() as u64, Relaxed);
    }

    pub fn memory_recheck_ms(&self) -> u64 {
        self.memory_recheck_ms.load(Relaxed)
    }

    /// Records that `entry`'s content, in the state `fingerprint`, hashed to its digest;
    /// keeps `body` in memory if the tier has room for it.
    pub fn record_verified(
        &self,
        entry: &Entry,
        fingerprint: crate::fingerprint::Fingerprint,
        body: Option<bytes::Bytes>,
    ) {
        let body = body.filter(|b| {
            let len = b.len() as u64;
            len <= self.memory_object_max.load(Relaxed)
                && self
                    .memory_bytes
                    .fetch_update(Relaxed, Relaxed, |used| {
                        (used + len <= self.memory_max.load(Relaxed)).then_some(used + len)
                    })
                    .is_ok()
        });
        let checked_ms = AtomicU64::new(crate::clock::now_ms() as u64);
        let old = entry.verified.swap(Some(Arc::new(super::entry::Verified { fingerprint, body, checked_ms })));
        self.release_memory(old.as_deref());
        // A read that finishes after its entry was replaced or removed: the removal already
        // released the entry's memory, so release what was just added (each body is swapped
        // out, and released, exactly once).
        if !self.is_live(entry) {
            self.forget_verified(entry);
        }
    }

    /// Whether `entry` is the live entry of its key, or a variant of it.
    pub fn is_live(&self, entry: &Entry) -> bool {
        self.index.read().expect("index lock").get(&entry.key).is_some_and(|e| {
            std::ptr::eq(e.as_ref(), entry) || e.variants.iter().any(|v| std::ptr::eq(v.as_ref(), entry))
        })
    }

    /// Forgets `entry`'s verification (its file changed, or it is gone).
    pub fn forget_verified(&self, entry: &Entry) {
        let old = entry.verified.swap(None);
        self.release_memory(old.as_deref());
    }

    fn release_memory(&self, old: Option<&super::entry::Verified>) {
        if let Some(b) = old.and_then(|v| v.body.as_ref()) {
            self.memory_bytes.fetch_sub(b.len() as u64, Relaxed);
        }
    }

    /// Whether a body of `size` bytes would be kept in the memory tier now.
    pub fn fits_memory_tier(&self, size: u64) -> bool {
        size <= self.memory_object_max.load(Relaxed)
            && self.memory_bytes.load(Relaxed) + size <= self.memory_max.load(Relaxed)
    }

    /// Bytes of verified bodies in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Relaxed)
    }

    pub fn set_gc_grace(&self, grace: Duration) {
        self.gc_grace_ms.store(grace.as_millis() as u64, Relaxed);
    }

    /// The purge epoch now: a fill notes it before asking the origin, and its commit is
    /// refused if a purge covering its entry came after (see [`Expect::since_purge`]).
    pub fn purge_epoch(&self) -> u64 {
        self.purges.lock().expect("purge log lock").epoch
    }

    /// Records that `which` is being purged. Under `index_write`, so that a commit either
    /// published before it (and the purge removes the entry) or sees it (and stores nothing).
    pub fn record_purge(&self, which: &Purge) {
        let _w = self.index_write.lock().expect("index write lock");
        let mut log = self.purges.lock().expect("purge log lock");
        log.epoch += 1;
        let epoch = log.epoch;
        if log.recent.len() == PURGE_LOG {
            log.recent.pop_front();
        }
        log.recent.push_back((epoch, which.clone()));
    }

    /// Whether a purge after `epoch` covers `key` (of batch `lote_id`). A fill older than the
    /// remembered purges counts as purged: it refetches rather than risk a stale entry.
    pub fn purged_since(&self, epoch: u64, key: &str, lote_id: &str) -> bool {
        let log = self.purges.lock().expect("purge log lock");
        if log.epoch == epoch {
            return false;
        }
        match log.recent.front() {
            Some((oldest, _)) if *oldest <= epoch + 1 => {
                log.recent.iter().any(|(e, which)| *e > epoch && which.covers(key, lote_id))
            }
            _ => true,
        }
    }

    /// Starts writing a new body. Nothing is visible until [`PendingWrite::commit`].
    pub async fn begin(&self) -> Result<PendingWrite, StoreError> {
        let writer = cacache::WriteOpts::new().algorithm(Algorithm::Sha256).open_hash(&self.dir).await?;
        Ok(PendingWrite {
            writer: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, writer),
            written: 0,
            hasher: sha2::Sha256::default(),
        })
    }

    /// fsyncs a content file and its directories (cacache never does). Blocking.
    pub fn sync_content(&self, path: &Path) -> io::Result<()> {
        sync_file_and_dirs(path, &self.dir)
    }

    /// Marks `path` as being read until the guard drops: the collector leaves it alone.
    pub fn reading(self: &Arc<Self>, path: &Path) -> ReadGuard {
        *self.readers.lock().expect("readers lock").entry(path.to_path_buf()).or_default() += 1;
        ReadGuard { store: self.clone(), path: path.to_path_buf() }
    }

    /// Publishes `entry` in memory (caller holds `index_write`), keeping byte counts. The
    /// entry it replaces is forgotten, but for the variants the new one carries over.
    fn publish(&self, entry: Arc<Entry>) {
        let mut index = self.index.write().expect("index lock");
        let size = entry.stored_bytes();
        if let Some(old) = index.insert(entry.key.clone(), entry.clone()) {
            self.bytes.fetch_sub(old.stored_bytes(), Relaxed);
            self.forget_verified(&old);
            for v in old.variants.iter().filter(|v| !entry.variants.iter().any(|n| Arc::ptr_eq(n, v))) {
                self.forget_verified(v);
            }
        }
        self.bytes.fetch_add(size, Relaxed);
        self.metrics.store_bytes.set(self.bytes.load(Relaxed) as i64);
        self.metrics.store_entries.set(index.len() as i64);
    }

    /// Removes `key` from memory and the index if its live entry is `expect` (or any, when
    /// None). Runs blocking; the caller is on a blocking thread.
    fn unpublish_sync(&self, key: &str, expect: Option<&Arc<Entry>>, reason: &'static str) -> Result<bool, StoreError> {
        let _w = self.index_write.lock().expect("index write lock");
        let mut index = self.index.write().expect("index lock");
        // The judged entry, or a successor of it (same commit, other variants).
        let matches = match (index.get(key), expect) {
            (Some(cur), Some(e)) => cur.commit == e.commit,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !matches {
            return Ok(false);
        }
        let old = index.remove(key).expect("present");
        self.bytes.fetch_sub(old.stored_bytes(), Relaxed);
        self.forget_verified(&old);
        for v in &old.variants {
            self.forget_verified(v);
        }
        self.metrics.store_bytes.set(self.bytes.load(Relaxed) as i64);
        self.metrics.store_entries.set(index.len() as i64);
        self.metrics.evictions.with_label_values(&[reason]).inc();
        drop(index);
        cacache::index::delete(&self.dir, key)?;
        Ok(true)
    }

    /// Adds the variants `built` (coding, integrity, size; their content files committed and
    /// checked by the caller) to `parent` if it is still the live entry of its key and the
    /// store has room for them under `max_size`: a new index line names them, and a successor
    /// entry carrying them is published. Whether they were added. Blocking.
    pub fn add_variants_sync(
        &self,
        parent: &Arc<Entry>,
        built: &[(Coding, Integrity, u64)],
    ) -> Result<bool, StoreError> {
        let next = {
            let _w = self.index_write.lock().expect("index write lock");
            let live = self.index.read().expect("index lock").get(&parent.key).cloned();
            // Built from this commit's body: good for any successor of it.
            let Some(live) = live.filter(|l| l.commit == parent.commit) else { return Ok(false) };
            let mut variants: Vec<Arc<Entry>> =
                live.variants.iter().filter(|v| !built.iter().any(|(c, ..)| v.coding == Some(*c))).cloned().collect();
            for (coding, integrity, size) in built {
                let path = content_path(&self.dir, integrity);
                let v = Entry::variant(&live, *coding, integrity.clone(), *size, path).ok_or(StoreError::Algorithm)?;
                variants.push(Arc::new(v));
            }
            variants.sort_by_key(|v| v.coding);
            let total = live.size + variants.iter().map(|v| v.size).sum::<u64>();
            if self.max_size().is_some_and(|max| total > max) {
                return Ok(false);
            }
            let next = Arc::new(live.successor(variants, live.compress_tried.load(Relaxed)));
            self.reindex(&live, &next)?;
            next
        };
        self.enforce_max_size_sync(&next)?;
        Ok(true)
    }

    /// Drops `variant` from the live entry holding it (a new index line without it; the
    /// entry stays), so that it is never served again and is built anew on a later request.
    /// Whether it was live. Blocking.
    fn drop_variant_sync(&self, variant: &Arc<Entry>, reason: &'static str) -> Result<bool, StoreError> {
        let _w = self.index_write.lock().expect("index write lock");
        let live = self.index.read().expect("index lock").get(&variant.key).cloned();
        let Some(live) = live.filter(|l| l.variants.iter().any(|v| Arc::ptr_eq(v, variant))) else {
            return Ok(false);
        };
        let kept = live.variants.iter().filter(|v| !Arc::ptr_eq(v, variant)).cloned().collect();
        let tried = live.compress_tried.load(Relaxed) & !variant.coding.map_or(0, Coding::bit);
        self.reindex(&live, &Arc::new(live.successor(kept, tried)))?;
        self.metrics.evictions.with_label_values(&[reason]).inc();
        Ok(true)
    }

    /// Writes `next`'s index line (same body and time, its variants) and publishes it in
    /// place of `live`, the live entry of its key, moving `live`'s verification over (the
    /// memory a verified body holds stays counted once). Caller holds `index_write`.
    fn reindex(&self, live: &Arc<Entry>, next: &Arc<Entry>) -> Result<(), StoreError> {
        write_index_line(&self.dir, next)?;
        next.verified.store(live.verified.swap(None));
        self.publish(next.clone());
        Ok(())
    }

    /// Whether the content file at `path` holds exactly the `size` bytes hashing to
    /// `sha256`, unchanged while it was hashed. Always hashed, even when a live entry vouches
    /// for the file: silent corruption changes no fingerprint, and re-storing is rare. Blocking.
    pub fn holds_content(&self, path: &Path, sha256: &[u8; 32], size: u64) -> bool {
        let Ok(mut file) = std::fs::File::open(path) else { return false };
        let Ok(before) = file.metadata() else { return false };
        if before.len() != size {
            return false;
        }
        let mut hasher = sha2::Sha256::default();
        if io::copy(&mut file, &mut hasher).is_err() {
            return false;
        }
        let got: [u8; 32] = sha2::Digest::finalize(hasher).into();
        let unchanged = file
            .metadata()
            .is_ok_and(|m| crate::fingerprint::Fingerprint::of(&m) == crate::fingerprint::Fingerprint::of(&before));
        got == *sha256 && unchanged
    }

    /// Removes `entry` because it can no longer be served (corrupt or missing content):
    /// tombstones its key unless a newer entry replaced it, and deletes its content file
    /// unless a live entry still references it (content is named by digest: a newer entry of
    /// this key, or another key, may hold the same bytes in a good file by now).
    /// A variant (`entry.coding` set) is dropped from its entry, which stays, and is built
    /// again on a later request.
    pub async fn evict(self: &Arc<Self>, entry: &Arc<Entry>, reason: &'static str) {
        let coding = entry.coding.map(Coding::token);
        tracing::warn!(key = %entry.key, lote_id = %entry.lote_id, reason, coding, "evicting entry");
        let (this, entry) = (self.clone(), entry.clone());
        let result = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let removed = match entry.coding {
                Some(_) => this.drop_variant_sync(&entry, reason)?,
                None => this.unpublish_sync(&entry.key, Some(&entry), reason)?,
            };
            if !removed {
                return Ok(()); // another version is live now: not the one judged
            }
            let _w = this.index_write.lock().expect("index write lock");
            let referenced = this.index.read().expect("index lock").values().any(|e| e.uses_path(&entry.path));
            // A commit of the same bytes may be about to index this very file.
            if referenced || this.readers.lock().expect("readers lock").contains_key(&entry.path) {
                return Ok(());
            }
            match std::fs::remove_file(&entry.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        })
        .await;
        if let Ok(Err(e)) | Err(e) = result.map_err(|e| StoreError::Io(io::Error::other(e))) {
            tracing::error!(error = %e, "eviction failed");
        }
    }

    /// Removes the entries selected by `which` (content is left to the collector). Returns
    /// the removed keys.
    pub async fn purge(self: &Arc<Self>, which: Purge) -> Result<Vec<String>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.record_purge(&which);
            let keys: Vec<String> = {
                let index = this.index.read().expect("index lock");
                match &which {
                    Purge::All => index.keys().cloned().collect(),
                    Purge::Key(k) => index.contains_key(k).then(|| k.clone()).into_iter().collect(),
                    Purge::LoteId(id) => index.values().filter(|e| &e.lote_id == id).map(|e| e.key.clone()).collect(),
                }
            };
            let mut removed = Vec::new();
            for k in keys {
                if this.unpublish_sync(&k, None, "purge")? {
                    removed.push(k);
                }
            }
            if !removed.is_empty() {
                tracing::info!(count = removed.len(), ?which, "purged");
            }
            Ok(removed)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
    }

    /// Keeps live bytes under `max_size` by removing least-recently-used entries; `keep` is
    /// the entry just committed, removed last (and only if it alone is over the cap).
    fn enforce_max_size_sync(&self, keep: &Arc<Entry>) -> Result<(), StoreError> {
        let max = self.max_size.load(Relaxed);
        if max == 0 {
            return Ok(());
        }
        if keep.stored_bytes() > max {
            // Nothing is evicted to make room for an entry that cannot fit anyway.
            tracing::warn!(key = %keep.key, size = keep.size, max, "entry larger than max_size; not kept");
            self.unpublish_sync(&keep.key, Some(keep), "too-large")?;
            return Err(StoreError::TooLarge { size: keep.size, max });
        }
        while self.bytes.load(Relaxed) > max {
            let victim = {
                let index = self.index.read().expect("index lock");
                index.values().filter(|e| !Arc::ptr_eq(e, keep)).min_by_key(|e| e.last_hit_ms.load(Relaxed)).cloned()
            };
            match victim {
                Some(v) => {
                    tracing::info!(key = %v.key, size = v.size, "evicting least recently used entry (max_size)");
                    self.unpublish_sync(&v.key, Some(&v), "lru")?;
                }
                None => {
                    tracing::warn!(key = %keep.key, size = keep.size, max, "entry larger than max_size; not kept");
                    self.unpublish_sync(&keep.key, Some(keep), "too-large")?;
                    return Err(StoreError::TooLarge { size: keep.size, max });
                }
            }
        }
        Ok(())
    }

    /// Removes content files no live entry references (and none is reading, and none was
    /// just written), and compacts index buckets to their latest line.
    pub async fn gc(self: &Arc<Self>) -> Result<GcReport, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.gc_sync()).await.map_err(|e| StoreError::Io(io::Error::other(e)))?
    }

    fn gc_sync(&self) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        {
            // Buckets change only under index_write: compact them there.
            let _w = self.index_write.lock().expect("index write lock");
            report.compacted_buckets = compact_buckets(&self.dir)?;
        }
        let live: HashSet<PathBuf> =
            self.index.read().expect("index lock").values().flat_map(|e| e.files().map(|f| f.path.clone())).collect();
        let now = SystemTime::now();
        let grace = Duration::from_millis(self.gc_grace_ms.load(Relaxed));
        for file in walk_files(&self.dir.join("content-v2")) {
            if live.contains(&file) || self.readers.lock().expect("readers lock").contains_key(&file) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&file) else { continue };
            let young = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_none_or(|age| age < grace);
            if young {
                continue;
            }
            // Re-check under the write lock: an entry may have been committed meanwhile.
            let _w = self.index_write.lock().expect("index write lock");
            let referenced = self.index.read().expect("index lock").values().any(|e| e.uses_path(&file));
            if referenced || self.readers.lock().expect("readers lock").contains_key(&file) {
                continue;
            }
            if std::fs::remove_file(&file).is_ok() {
                report.removed_files += 1;
                report.removed_bytes += meta.len();
            }
        }
        self.metrics.gc_removed_files.inc_by(report.removed_files as u64);
        if report.removed_files > 0 || report.compacted_buckets > 0 {
            tracing::info!(?report, "garbage collected");
        }
        Ok(report)
    }
}

/// Which entries a purge removes.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purge {
    All,
    Key(String),
    LoteId(String),
}

impl Purge {
    /// Whether this purge removes the entry `key` of batch `lote_id`.
    pub fn covers(&self, key: &str, lote_id: &str) -> bool {
        match self {
            Purge::All => true,
            Purge::Key(k) => k == key,
            Purge::LoteId(id) => id == lote_id,
        }
    }
}

/// Keeps a content file safe from the collector while it is read.
pub struct ReadGuard {
    store: Arc<Store>,
    path: PathBuf,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut readers = self.store.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = readers.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                readers.remove(&self.path);
            }
        }
    }
}

/// What a body being committed must match, and when it was first stored (an entry copied
/// from another tier keeps its original time, so its TTL runs from then).
#[derive(Debug, Default, Clone, Copy)]
pub struct Expect {
    pub len: Option<u64>,
    pub sha256: Option<[u8; 32]>,
    pub stored_at_ms: Option<u128>,
    /// The purge epoch the body dates from: a later purge covering the entry refuses it.
    pub since_purge: Option<u64>,
}

/// A body being written to the store.
pub struct PendingWrite {
    writer: tokio::io::BufWriter<cacache::Writer>,
    written: u64,
    /// Our own digest of what was written, known before cacache's commit renames the temp
    /// file into place: identical content already on disk is then kept, not replaced.
    hasher: sha2::Sha256,
}

impl PendingWrite {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.writer.write_all(data).await?;
        sha2::Digest::update(&mut self.hasher, data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the body durable and visible under `key`: commit the content, fsync it and its
    /// directories, then append the index line (fsynced too) and publish the entry in
    /// memory; then keep the store under its size cap. If what was written differs from
    /// what `expect` says (length, digest), nothing is stored.
    pub async fn commit(
        mut self,
        store: &Arc<Store>,
        key: &str,
        mut meta: EntryMeta,
        expect: Expect,
    ) -> Result<Arc<Entry>, StoreError> {
        // Variants are built by this store's compressor from the committed body, never taken
        // from elsewhere: their files were not written and verified here.
        meta.variants.clear();
        if let Some(expected) = expect.len {
            if expected != self.written {
                return Err(StoreError::Length { got: self.written, expected });
            }
        }
        self.writer.flush().await?;
        let digest: [u8; 32] = sha2::Digest::finalize(self.hasher).into();
        let known = Integrity::from_hex(hex::encode(digest), Algorithm::Sha256).map_err(|_| StoreError::Algorithm)?;
        let known_path = content_path(&store.dir, &known);
        // Kept from the collector from here until the index line names it.
        let _reading = store.reading(&known_path);
        let (s, p, size) = (store.clone(), known_path.clone(), self.written);
        let on_disk = tokio::task::spawn_blocking(move || s.holds_content(&p, &digest, size))
            .await
            .map_err(|e| StoreError::Io(io::Error::other(e)))?;
        let integrity = if on_disk {
            // The same bytes are on disk, verified: renaming a new file over them would change
            // the file under every download of it in progress (and abort them). The temp
            // file is removed as the writer drops.
            drop(self.writer);
            known
        } else {
            self.writer.into_inner().commit().await?
        };
        let path = content_path(&store.dir, &integrity);
        let sha256 = sha256_of(&integrity).ok_or(StoreError::Algorithm)?;
        if let Some(expected) = expect.sha256.filter(|e| *e != sha256) {
            // The content file stays behind unreferenced; the collector removes it.
            return Err(StoreError::Digest { got: hex::encode(sha256), expected: hex::encode(expected) });
        }
        let (store, key, size) = (store.clone(), key.to_string(), self.written);
        tokio::task::spawn_blocking(move || {
            sync_file_and_dirs(&path, &store.dir)?;
            let stored_at_ms = expect.stored_at_ms.unwrap_or_else(crate::clock::now_ms);
            let meta_json = serde_json::to_value(&meta).map_err(io::Error::other)?;
            let head = meta.header_map().ok_or_else(|| io::Error::other("unstorable header"))?;
            let parts = EntryParts {
                key: key.clone(),
                rule: meta.rule.clone(),
                lote_id: meta.lote_id.clone(),
                integrity: integrity.clone(),
                size,
                status: http::StatusCode::from_u16(meta.status).map_err(io::Error::other)?,
                head,
                stored_at_ms,
                gen_ms: meta.gen_ms,
                path,
                // The LRU clock starts now, also for an entry copied with an older store time.
                last_hit_ms: crate::clock::now_ms() as u64,
            };
            let entry = Arc::new(Entry::new(parts, Vec::new()).ok_or(StoreError::Algorithm)?);
            let opts = cacache::WriteOpts::new()
                .integrity(integrity)
                .size(size as usize)
                .time(stored_at_ms)
                .metadata(meta_json);
            {
                let _w = store.index_write.lock().expect("index write lock");
                if expect.since_purge.is_some_and(|epoch| store.purged_since(epoch, &key, &entry.lote_id)) {
                    // The content file stays behind unreferenced; the collector removes it.
                    return Err(StoreError::Purged);
                }
                cacache::index::insert(&store.dir, &key, opts)?;
                sync_file_and_dirs(&bucket_path(&store.dir, &key), &store.dir)?;
                store.publish(entry.clone());
            }
            store.metrics.stored.inc();
            store.enforce_max_size_sync(&entry)?;
            Ok(entry)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
    }
}

/// Where cacache keeps the content of `sri` (its `content-v2` layout).
pub fn content_path(dir: &Path, sri: &Integrity) -> PathBuf {
    let (algo, hex) = sri.to_hex();
    dir.join("content-v2").join(algo.to_string()).join(&hex[0..2]).join(&hex[2..4]).join(&hex[4..])
}

/// Appends `entry`'s index line (its body, time and variants) and fsyncs its bucket.
fn write_index_line(dir: &Path, entry: &Entry) -> Result<(), StoreError> {
    let meta_json = serde_json::to_value(entry.meta()).map_err(io::Error::other)?;
    let opts = cacache::WriteOpts::new()
        .integrity(entry.integrity.clone())
        .size(entry.size as usize)
        .time(entry.stored_at_ms)
        .metadata(meta_json);
    cacache::index::insert(dir, &entry.key, opts)?;
    sync_file_and_dirs(&bucket_path(dir, &entry.key), dir)?;
    Ok(())
}

fn file_has_size(path: &Path, size: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == size)
}

/// Entries read from a cache directory's index, without touching anything.
pub struct Loaded {
    pub entries: Vec<Entry>,
    /// Index lines that could not be read or are not ours.
    pub skipped: usize,
}

/// Reads every live entry of the index at `dir` (read-only: safe beside a running server).
pub fn load_entries(dir: &Path) -> Loaded {
    let mut out = Loaded { entries: Vec::new(), skipped: 0 };
    if !dir.join("index-v5").is_dir() {
        return out;
    }
    for md in cacache::index::ls(dir) {
        match md.ok().and_then(|md| entry_from_index(dir, md)) {
            Some(e) => out.entries.push(e),
            None => out.skipped += 1,
        }
    }
    out.entries.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Takes the directory's lock file, or says who holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    if let Err(e) = file.try_lock() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let holder = match pid.trim() {
            "" => String::new(),
            p => format!(" (pid {p})"),
        };
        return match e {
            std::fs::TryLockError::WouldBlock => Err(StoreError::Locked { dir: dir.display().to_string(), holder }),
            std::fs::TryLockError::Error(e) => Err(e.into()),
        };
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Removes cacache temp files left by a crash (safe: we hold the lock, so no writer is live).
fn sweep_tmp(dir: &Path) -> usize {
    let Ok(read) = std::fs::read_dir(dir.join("tmp")) else { return 0 };
    let mut swept = 0;
    for e in read.flatten() {
        if std::fs::remove_file(e.path()).is_ok() {
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::warn!(swept, "removed temp files left by an interrupted write");
    }
    swept
}

/// Where cacache keeps the index bucket of `key`.
fn bucket_path(dir: &Path, key: &str) -> PathBuf {
    use sha1::Digest as _;
    let h = hex::encode(sha1::Sha1::digest(key.as_bytes()));
    dir.join("index-v5").join(&h[0..2]).join(&h[2..4]).join(&h[4..])
}

/// Every regular file below `dir`.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&d) else { continue };
        for e in read.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

/// Rewrites each bucket holding more than one line as its latest valid line per key
/// (removing buckets whose keys are all tombstoned). Caller holds `index_write`.
fn compact_buckets(dir: &Path) -> io::Result<usize> {
    use sha2::Digest as _;
    let mut compacted = 0;
    for bucket in walk_files(&dir.join("index-v5")) {
        let text = std::fs::read_to_string(&bucket)?;
        let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
        if lines.len() <= 1 {
            continue;
        }
        // Latest valid line per key, in first-seen order of keys.
        let mut latest: Vec<(String, &str, bool)> = Vec::new();
        for line in &lines {
            let Some((hash, json)) = line.split_once('\t') else { continue };
            if hex::encode(sha2::Sha256::digest(json.as_bytes())) != hash {
                continue; // torn or damaged: cacache skips it too
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else { continue };
            let Some(key) = v["key"].as_str() else { continue };
            let live = !v["integrity"].is_null();
            match latest.iter_mut().find(|(k, _, _)| k == key) {
                Some(slot) => *slot = (key.to_string(), line, live),
                None => latest.push((key.to_string(), line, live)),
            }
        }
        let kept: String = latest.iter().filter(|(_, _, live)| *live).map(|(_, l, _)| format!("\n{l}")).collect();
        if kept.is_empty() {
            std::fs::remove_file(&bucket)?;
        } else {
            let tmp = bucket.with_extension("compact");
            std::fs::write(&tmp, kept)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &bucket)?;
        }
        compacted += 1;
    }
    Ok(compacted)
}

fn entry_from_index(dir: &Path, md: cacache::Metadata) -> Option<Entry> {
    let meta: EntryMeta = serde_json::from_value(md.metadata).ok()?;
    if meta.v != META_VERSION {
        return None;
    }
    let parts = EntryParts {
        head: meta.header_map()?,
        path: content_path(dir, &md.integrity),
        status: http::StatusCode::from_u16(meta.status).ok()?,
        key: md.key,
        rule: meta.rule,
        lote_id: meta.lote_id,
        integrity: md.integrity,
        size: md.size as u64,
        stored_at_ms: md.time,
        gen_ms: meta.gen_ms,
        last_hit_ms: md.time as u64,
    };
    let entry = Entry::new(parts, Vec::new())?;
    let variants = meta
        .variants
        .iter()
        .filter_map(|v| {
            let integrity: Integrity = v.integrity.parse().ok()?;
            let path = content_path(dir, &integrity);
            Entry::variant(&entry, v.coding, integrity, v.size, path).map(Arc::new)
        })
        .collect();
    Some(entry.with_variants(variants))
}

/// fsyncs `file`, then each directory from its parent up to (and including) `root`, so a
/// rename into a freshly created directory survives a crash.
fn sync_file_and_dirs(file: &Path, root: &Path) -> io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    let mut dir = file.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        if d == root {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Bytes available to this process on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};

    fn meta() -> EntryMeta {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        EntryMeta::new("batch-results", "L1", StatusCode::OK, &h, 5)
    }

    #[tokio::test]
    async fn committed_content_lives_at_the_computed_cacache_path_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let mut w = store.begin().await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        let entry = w
            .commit(&store, "L1_resultados.json", meta(), Expect { len: Some(11), ..Expect::default() })
            .await
            .unwrap();
        assert_eq!(std::fs::read(&entry.path).unwrap(), b"hello world");
        assert_eq!(entry.integrity, Integrity::from(b"hello world"));

        drop(store);
        let reopened = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let e = reopened.get("L1_resultados.json").unwrap();
        assert_eq!(e.size, 11);
        assert_eq!(e.lote_id, "L1");
        assert_eq!(e.headers["content-type"], "application/json");
    }

    #[tokio::test]
    async fn the_index_bucket_path_is_the_one_cacache_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let mut w = store.begin().await.unwrap();
        w.write(b"x").await.unwrap();
        w.commit(&store, "L9_resultados.json", meta(), Expect::default()).await.unwrap();
        let bucket = std::fs::read_to_string(bucket_path(dir.path(), "L9_resultados.json")).unwrap();
        assert!(bucket.contains("L9_resultados.json"));
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let err = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.err().expect("second open refused");
        assert!(err.to_string().contains("in use by another lotecache process"), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.expect("free again once the first is gone");
    }

    #[tokio::test]
    async fn temp_files_left_by_a_crash_are_swept_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/.tmpabc"), b"partial").unwrap();
        let _store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_length_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let mut w = store.begin().await.unwrap();
        w.write(b"abc").await.unwrap();
        assert!(w.commit(&store, "k", meta(), Expect { len: Some(4), ..Expect::default() }).await.is_err());
        assert!(store.get("k").is_none());
    }

    #[tokio::test]
    async fn a_commit_started_before_a_purge_that_covers_it_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let commit = |key: &'static str, since: u64| {
            let store = store.clone();
            async move {
                let mut w = store.begin().await.unwrap();
                w.write(b"doc").await.unwrap();
                w.commit(&store, key, meta(), Expect { since_purge: Some(since), ..Expect::default() }).await
            }
        };
        let before = store.purge_epoch();
        store.record_purge(&Purge::LoteId("L1".into())); // meta() is batch L1
        assert!(matches!(commit("L1_resultados.json", before).await, Err(StoreError::Purged)));
        assert!(store.get("L1_resultados.json").is_none());
        // A purge of another batch or key does not touch it; one started after the purge stores.
        store.record_purge(&Purge::Key("other".into()));
        store.record_purge(&Purge::LoteId("L2".into()));
        let after = store.purge_epoch() - 2;
        commit("L1_resultados.json", after).await.unwrap();
        assert!(store.get("L1_resultados.json").is_some());
    }

    #[test]
    fn a_fill_older_than_every_remembered_purge_counts_as_purged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sync(dir.path().to_path_buf(), 0, Arc::default()).unwrap();
        let start = store.purge_epoch();
        assert!(!store.purged_since(start, "k", "L1"), "no purge yet");
        for i in 0..PURGE_LOG {
            store.record_purge(&Purge::Key(format!("other-{i}")));
        }
        assert!(!store.purged_since(start, "k", "L1"), "every purge since is remembered, none covers k");
        store.record_purge(&Purge::Key("other-last".into()));
        assert!(store.purged_since(start, "k", "L1"), "the oldest purge since was forgotten");
        assert!(!store.purged_since(start + 1, "k", "L1"));
    }

    async fn committed(store: &Arc<Store>, key: &str, body: &[u8]) -> Arc<Entry> {
        let mut w = store.begin().await.unwrap();
        w.write(body).await.unwrap();
        w.commit(store, key, meta(), Expect::default()).await.unwrap()
    }

    fn fake_variant(coding: Coding, bytes: &[u8]) -> (Coding, Integrity, u64) {
        (coding, Integrity::from(bytes), bytes.len() as u64)
    }

    #[tokio::test]
    async fn an_entry_judged_bad_is_evicted_even_after_its_variants_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let judged = committed(&store, "k", b"the body").await;
        assert!(store.add_variants_sync(&judged, &[fake_variant(Coding::Br, b"br")]).unwrap());
        let successor = store.get("k").unwrap();
        assert!(!Arc::ptr_eq(&successor, &judged), "a new entry carries the variant");
        // A scrub that hashed the old snapshot and found it bad: the same body is live.
        store.evict(&judged, "digest-mismatch").await;
        assert!(store.get("k").is_none(), "the successor of a bad body was kept");
        // A later commit of the key is another body: a stale judgment never touches it.
        let recommitted = committed(&store, "k", b"the body").await;
        store.evict(&judged, "digest-mismatch").await;
        assert!(store.get("k").is_some_and(|e| Arc::ptr_eq(&e, &recommitted)));
    }

    #[tokio::test]
    async fn a_hit_on_an_entry_whose_variants_changed_meanwhile_still_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let served = committed(&store, "k", b"the body").await;
        assert!(store.add_variants_sync(&served, &[fake_variant(Coding::Br, b"br")]).unwrap());
        served.touch(); // a request that took the entry before the variant was added
        let live = store.get("k").unwrap();
        assert_eq!(live.hits.load(Relaxed), 1);
        assert_eq!(live.last_hit_ms.load(Relaxed), served.last_hit_ms.load(Relaxed));
    }

    #[tokio::test]
    async fn a_variant_built_for_an_earlier_successor_of_the_same_body_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let e = committed(&store, "k", b"the body").await;
        let built = [fake_variant(Coding::Br, b"br"), fake_variant(Coding::Gzip, b"gz")];
        assert!(store.add_variants_sync(&e, &built).unwrap());
        // br proves bad and is dropped; a job to build it again starts on that successor...
        let br = store.get("k").unwrap().variant_in(Coding::Br).unwrap().clone();
        store.evict(&br, "digest-mismatch").await;
        let building_on = store.get("k").unwrap();
        assert_eq!(building_on.compress_tried.load(Relaxed), Coding::Gzip.bit(), "br may be built again");
        // ...then gzip is dropped too, before the br job ends.
        let gz = building_on.variant_in(Coding::Gzip).unwrap().clone();
        store.evict(&gz, "digest-mismatch").await;
        assert!(store.add_variants_sync(&building_on, &[fake_variant(Coding::Br, b"br2")]).unwrap());
        let live = store.get("k").unwrap();
        assert_eq!(live.variants.iter().map(|v| v.coding).collect::<Vec<_>>(), [Some(Coding::Br)]);
        drop(store);
        // The index lines say the same after a restart (the files are fake: left out at open).
        let reopened = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        assert!(reopened.get("k").is_some());
    }

    #[tokio::test]
    async fn latest_write_wins_and_eviction_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        for body in [&b"one"[..], b"two"] {
            let mut w = store.begin().await.unwrap();
            w.write(body).await.unwrap();
            w.commit(&store, "k", meta(), Expect::default()).await.unwrap();
        }
        drop(store);
        let reopened = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        let e = reopened.get("k").unwrap();
        assert_eq!(std::fs::read(&e.path).unwrap(), b"two");
        reopened.evict(&e, "test").await;
        assert!(reopened.get("k").is_none());
        drop(reopened);
        assert!(Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap().get("k").is_none());
    }
}
