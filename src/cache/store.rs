//! The on-disk store: cacache for content and index, behind a narrow API of ours, plus an
//! in-memory index of every live entry so that a hit never reads an index bucket.
//!
//! cacache specifics confined here: content is written with `open_hash` + `commit` (no key),
//! fsynced by us (cacache never fsyncs), and only then indexed with `index::insert`; the
//! content path follows cacache's `content-v2/{algo}/{hex[0..2]}/{hex[2..4]}/{rest}` layout
//! and the index bucket its `index-v5/{sha1[0..2]}/{sha1[2..4]}/{rest}` one (tests pin both).
//! Removing an entry writes a tombstone and keeps the content; the garbage collector here
//! removes content no live entry references, and compacts buckets.

use super::entry::{next_commit, sha256_of, Entry, EntryMeta, EntryParts, EntryState, META_VERSION};
pub use super::index::{bucket_path, content_path};
use super::index::{integrity_of, KeyState, Slot, HOT_ENTRIES};
use super::negotiate::Coding;
use crate::metrics::Metrics;
use ssri::{Algorithm, Integrity};
use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Condvar, Mutex, RwLock, Weak,
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
    #[error("the store's index is still loading; try again when /readyz says it is loaded")]
    Loading,
    #[error("part of the store's index could not be read (see the log); fix the directory and restart")]
    IndexIncomplete,
    #[error("cache directory {dir} is in use by another lotecache process{holder}; stop it first or use another --cache-dir")]
    Locked { dir: String, holder: String },
}

/// Name of the lock file that marks a cache directory as owned by one process.
pub const LOCK_FILE: &str = "lotecache.lock";

/// Purges made while the index was loading, one JSON line each (fsynced before the purge
/// answers): the next load removes what they cover if this one did not finish. Removed when a
/// load ends, having removed it all.
const PENDING_PURGES: &str = "purges-pending.jsonl";

/// The store of one cache directory.
pub struct Store {
    dir: PathBuf,
    /// Held (flock) for the store's lifetime: one process owns a cache directory.
    _lock: std::fs::File,
    /// Every live entry (loaded so far), compactly (see `cache::index`).
    index: RwLock<HashMap<Box<str>, Box<Slot>>>,
    /// Keys whose slot holds a materialized entry, oldest first, with the slot's commit and
    /// the hit count it had when it joined (an entry hit since gets a second chance): at most
    /// [`HOT_ENTRIES`].
    hot: Mutex<VecDeque<(Box<str>, u64, u64)>>,
    /// [`HOT_ENTRIES`] (smaller in tests).
    hot_max: std::sync::atomic::AtomicUsize,
    /// One shared name per rule, for slots.
    rule_names: Mutex<Vec<Arc<str>>>,
    /// The background load of the index (see [`Store::open`]). A leaf lock: nothing else is
    /// locked while it is held. Lock order: `index_write`, `hot`, `index`, then the leaves
    /// (`load`, `purges`, `readers`, `rule_names`).
    load: Mutex<LoadState>,
    /// `load.done`, readable without the lock (set under `index_write` and `index`).
    is_loaded: std::sync::atomic::AtomicBool,
    loaded: Condvar,
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

/// Where the background load of the index is.
#[derive(Default)]
struct LoadState {
    done: bool,
    /// Purges made while loading: a line the loader (or a request) reads afterwards that one
    /// covers was written before this process started, and is removed, not loaded.
    purges: Vec<Purge>,
    /// The load ended without reading everything (see `load_index`): it never counts as done.
    gave_up: bool,
    /// First-level bucket directories reached (of 256).
    dirs_done: u32,
    started: Option<std::time::Instant>,
    took_ms: u64,
}

/// Progress of the index load, for `/readyz` and the cache page.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LoadProgress {
    pub loaded: bool,
    /// Entries in memory so far.
    pub entries: usize,
    /// Fraction of the index's buckets read (1 once loaded).
    pub progress: f64,
    /// How long the load took (once loaded), in milliseconds.
    pub took_ms: Option<u64>,
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

/// How long opening waits for a previous owner of the directory that is just closing (its
/// index loader finishing a bucket) before saying it is in use.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// What a garbage collection did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct GcReport {
    pub removed_files: usize,
    pub removed_bytes: u64,
    pub compacted_buckets: usize,
}

/// What building an entry from its slot and line found.
enum Materialized {
    Entry(Arc<Entry>),
    /// No slot (or no line) for the key: not stored.
    Gone,
    /// The line and the slot disagree, or the slot changed meanwhile.
    Mismatch,
    /// The bucket could not be read: nothing is known.
    Failed(io::Error),
}

/// What [`Store::get_loaded_for`] finds in memory.
#[derive(Debug)]
pub enum InMemory {
    Entry(Arc<Entry>),
    Absent,
    /// Stored, but not built in memory (or changing): look it up, then check again.
    LookUp,
}

/// Second chances [`Store::made_hot`] gives at most per call.
const SECOND_CHANCES: usize = 8;

/// One content file of a live entry: its body or one of its variants, as the scrubber and
/// `evict_file` name it.
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub key: String,
    pub commit: u64,
    /// None for the body.
    pub coding: Option<Coding>,
    pub sha256: [u8; 32],
    pub size: u64,
    pub path: PathBuf,
}

/// What the cache page and `/stats` show of one live entry (read from its slot, without
/// reading its index line).
#[derive(Debug, Clone)]
pub struct EntrySummary {
    pub key: String,
    pub rule: Arc<str>,
    pub lote_id: String,
    pub status: u16,
    pub size: u64,
    pub stored_bytes: u64,
    pub stored_at_ms: u64,
    pub gen_ms: u64,
    pub sha256: [u8; 32],
    pub hits: u64,
    pub last_hit_ms: u64,
    pub variants: Vec<VariantSummary>,
}

/// One stored variant, as [`EntrySummary`] shows it.
#[derive(Debug, Clone)]
pub struct VariantSummary {
    pub coding: Coding,
    pub size: u64,
    pub sha256: [u8; 32],
    /// Hits on it since its entry was last brought into memory.
    pub hits: u64,
}

/// What [`Store::list`] sorts one entry by (then by key).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    None,
    Number(u64),
    Text(Box<str>),
}

/// How the cache page sorts entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Key,
    LoteId,
    Size,
    StoredAt,
    Hits,
    LastHit,
    GenMs,
}

/// The summary of the slot of `key`.
fn summary(key: &str, s: &Slot) -> EntrySummary {
    EntrySummary {
        key: key.to_string(),
        rule: s.rule.clone(),
        lote_id: s.lote.get(key).to_string(),
        status: s.status,
        size: s.size,
        stored_bytes: s.stored_bytes(),
        stored_at_ms: s.stored_at_ms,
        gen_ms: s.gen_ms,
        sha256: s.sha256,
        hits: s.state.hits.load(Relaxed),
        last_hit_ms: s.state.last_hit_ms.load(Relaxed),
        variants: s
            .variants
            .iter()
            .map(|v| VariantSummary {
                coding: v.coding,
                size: v.size,
                sha256: v.sha256,
                hits: s.hot.as_ref().and_then(|h| h.variant_in(v.coding)).map_or(0, |h| h.hits()),
            })
            .collect(),
    }
}

impl From<&Entry> for EntrySummary {
    fn from(e: &Entry) -> EntrySummary {
        EntrySummary {
            key: e.key.clone(),
            rule: e.rule.as_str().into(),
            lote_id: e.lote_id.clone(),
            status: e.status.as_u16(),
            size: e.size,
            stored_bytes: e.stored_bytes(),
            stored_at_ms: e.stored_at_ms as u64,
            gen_ms: e.gen_ms,
            sha256: e.sha256,
            hits: e.hits(),
            last_hit_ms: e.last_hit_ms(),
            variants: e
                .variants
                .iter()
                .filter_map(|v| {
                    Some(VariantSummary { coding: v.coding?, size: v.size, sha256: v.sha256, hits: v.hits() })
                })
                .collect(),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store at `dir` and returns at once: takes its lock,
    /// sweeps temp files left by a crash, and loads the index into memory on a background
    /// thread. Until that ends, a request for a key not loaded yet reads its bucket (see
    /// [`Store::get`]); the collector waits for it. [`Store::wait_loaded`] waits for it.
    pub async fn open(dir: PathBuf, max_size: u64, metrics: Arc<Metrics>) -> Result<Arc<Store>, StoreError> {
        tokio::task::spawn_blocking(move || Store::open_sync(dir, max_size, metrics)).await.map_err(io::Error::other)?
    }

    /// [`Store::open`], then waits until the whole index is in memory (offline commands).
    pub async fn open_loaded(dir: PathBuf, max_size: u64, metrics: Arc<Metrics>) -> Result<Arc<Store>, StoreError> {
        let store = Store::open(dir, max_size, metrics).await?;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.wait_loaded()).await.map_err(io::Error::other)? {
            true => Ok(store),
            false => Err(StoreError::IndexIncomplete),
        }
    }

    fn open_sync(dir: PathBuf, max_size: u64, metrics: Arc<Metrics>) -> Result<Arc<Store>, StoreError> {
        // cacache creates index-v5 on first insert; listing a store without it is an error.
        std::fs::create_dir_all(dir.join("index-v5"))?;
        let lock = lock_dir(&dir)?;
        let swept = sweep_tmp(&dir);
        let pending = read_pending_purges(&dir);
        if !pending.is_empty() {
            tracing::warn!(
                purges = pending.len(),
                "purges made during an unfinished index load: the load applies them"
            );
        }
        metrics.store_bytes.set(0);
        metrics.store_entries.set(0);
        metrics.store_max_bytes.set(max_size as i64);
        tracing::info!(dir = %dir.display(), swept, "store opened; loading its index in the background");
        let store = Arc::new(Store {
            dir,
            _lock: lock,
            index: RwLock::new(HashMap::new()),
            hot: Mutex::default(),
            hot_max: std::sync::atomic::AtomicUsize::new(HOT_ENTRIES),
            rule_names: Mutex::default(),
            load: Mutex::new(LoadState {
                started: Some(std::time::Instant::now()),
                purges: pending,
                ..LoadState::default()
            }),
            loaded: Condvar::new(),
            is_loaded: std::sync::atomic::AtomicBool::new(false),
            index_write: Mutex::new(()),
            bytes: AtomicU64::new(0),
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
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new().name("index-loader".into()).spawn(move || load_index(weak))?;
        Ok(store)
    }

    /// Blocks until the index is fully in memory; false if the load ended without reading
    /// all of it (see `load_index`).
    pub fn wait_loaded(&self) -> bool {
        let mut load = self.load.lock().expect("load lock");
        while !load.done && !load.gave_up {
            load = self.loaded.wait(load).expect("load lock");
        }
        load.done
    }

    /// Whether the index is fully in memory.
    pub fn is_loaded(&self) -> bool {
        self.is_loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where the index load is.
    pub fn load_progress(&self) -> LoadProgress {
        let entries = self.len(); // before the load lock: it is a leaf lock
        let load = self.load.lock().expect("load lock");
        LoadProgress {
            loaded: load.done,
            entries,
            // A directory read again after a failure counts twice: below 1 until done.
            progress: if load.done { 1.0 } else { (load.dirs_done as f64 / 256.0).min(0.999) },
            took_ms: load.done.then_some(load.took_ms),
        }
    }

    /// The shared name of rule `rule`.
    fn rule_name(&self, rule: &str) -> Arc<str> {
        let mut names = self.rule_names.lock().expect("rule names lock");
        match names.iter().find(|n| &***n == rule) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = rule.into();
                names.push(n.clone());
                n
            }
        }
    }

    /// Reads one bucket under `index_write` and adds the keys it holds that memory lacks (the
    /// loader's step, and a request's for a key not loaded yet). A line a purge made during
    /// the load covers is removed instead, as is one whose content file is missing or has the
    /// wrong size (a variant whose file is: left out of its entry, which stays, and a new
    /// line records it). Returns the entries added.
    fn load_bucket(&self, bucket: &Path) -> io::Result<u64> {
        let _w = self.index_write.lock().expect("index write lock");
        if self.is_loaded() {
            return Ok(0); // everything is in memory already: the bucket has nothing new
        }
        let lines = super::index::read_bucket(bucket)?;
        let purges = self.load.lock().expect("load lock").purges.clone();
        let mut new = Vec::new();
        // A failed write (a tombstone, a line without a missing variant) leaves the entry out
        // of memory, or in it as its line still says, and is logged: the next load tries
        // again. Only a bucket that cannot be read is an error.
        let write_failed = |key: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(key, error = %e, "index write at load failed; tried again at the next load");
        };
        for (key, state) in lines {
            let KeyState::Live(mut line) = state else { continue };
            if bucket_path(&self.dir, &key) != bucket {
                continue; // a stray file (a compaction's leftover): not this key's bucket
            }
            if self.index.read().expect("index lock").contains_key(key.as_str()) {
                continue; // committed since this process started: memory is newer
            }
            if purges.iter().any(|p| p.covers(&key, &line.meta.lote_id)) {
                tracing::info!(key = %key, "removed at load: a purge made while loading covers it");
                if let Err(e) = tombstone(&self.dir, &key) {
                    write_failed(&key, &e);
                }
                continue;
            }
            if file_is_not(&content_path(&self.dir, &integrity_of(&line.sha256)), line.size) {
                tracing::warn!(key = %key, "content missing or wrong size; entry dropped");
                if let Err(e) = tombstone(&self.dir, &key) {
                    write_failed(&key, &e);
                }
                continue;
            }
            let before = line.meta.variants.clone();
            line.meta.variants.retain(|v| {
                v.integrity.parse().is_ok_and(|sri: Integrity| !file_is_not(&content_path(&self.dir, &sri), v.size))
            });
            if line.meta.variants.len() != before.len() {
                tracing::warn!(key = %key, "a compressed variant's file is missing or wrong size; variant dropped");
                let rewrite = || -> io::Result<()> {
                    let opts = cacache::WriteOpts::new()
                        .integrity(integrity_of(&line.sha256))
                        .size(line.size as usize)
                        .time(line.time)
                        .metadata(serde_json::to_value(&line.meta).map_err(io::Error::other)?);
                    cacache::index::insert(&self.dir, &key, opts).map_err(io::Error::other)?;
                    sync_file_and_dirs(bucket, &self.dir)
                };
                if let Err(e) = rewrite() {
                    write_failed(&key, &e);
                    // The line still names the variant: memory says what the line says (see
                    // `Slot::matches`); a request for it finds the file missing and drops it then.
                    line.meta.variants = before;
                }
            }
            new.push((key, line.slot(self.rule_name(&line.meta.rule))));
        }
        let added = new.len() as u64;
        let mut index = self.index.write().expect("index lock");
        for (key, slot) in new {
            self.bytes.fetch_add(slot.stored_bytes(), Relaxed);
            index.insert(key.into_boxed_str(), Box::new(slot));
        }
        self.metrics.store_bytes.set(self.bytes.load(Relaxed) as i64);
        self.metrics.store_entries.set(index.len() as i64);
        Ok(added)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live entry under `key`: its materialized entry if it is one of the hot ones, else
    /// built from its slot and its index line (one bucket read). While the index loads, a key
    /// not in memory yet is looked up in its bucket: never a false miss. An index file that
    /// cannot be read is an error, never a miss (a miss would have the origin generate a
    /// stored batch again). May block on a file read: async callers use [`Store::lookup`].
    pub fn try_get(&self, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        self.get_inner(key, false)
    }

    /// [`Store::try_get`], an unreadable index file taken for an absent entry (logged): for
    /// tools and tests.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.try_get(key).unwrap_or_else(|e| {
            tracing::warn!(key, error = %e, "entry unreadable; taken as absent");
            None
        })
    }

    /// [`Store::try_get`] for a caller holding `index_write` (then the key's slot and bucket
    /// cannot change meanwhile). Only for a key memory holds: a key not loaded yet is none.
    fn get_locked(&self, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        self.get_inner(key, true)
    }

    fn get_inner(&self, key: &str, write_held: bool) -> Result<Option<Arc<Entry>>, StoreError> {
        loop {
            let commit = {
                let index = self.index.read().expect("index lock");
                match index.get(key) {
                    Some(slot) => match &slot.hot {
                        Some(hot) => return Ok(Some(hot.clone())),
                        None => Some(slot.commit),
                    },
                    // Read under the same lock: every key the load adds is in before it is
                    // done, so an absent key of a loaded index is absent.
                    None if self.is_loaded() || write_held => return Ok(None),
                    None => None,
                }
            };
            match commit {
                Some(commit) => return self.materialize(key, commit, write_held),
                None => {
                    self.load_bucket(&bucket_path(&self.dir, key))?;
                    // Loaded now (or by a commit meanwhile): look again. A key still absent is none.
                    if !self.index.read().expect("index lock").contains_key(key) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Builds the entry of `key`'s slot (commit `commit`) from its index line and makes it
    /// one of the hot ones. The line is read without a lock first; if it does not say what the
    /// slot does (a commit or re-index of the key between its line and its slot), again under
    /// `index_write`, where the two agree. None if they still do not: the line was changed
    /// behind the store's back (a fill then stores the document again).
    fn materialize(&self, key: &str, commit: u64, write_held: bool) -> Result<Option<Arc<Entry>>, StoreError> {
        let mismatch = || {
            tracing::warn!(key, "the index line no longer matches the entry in memory; treated as a miss");
            Ok(None)
        };
        match self.try_materialize(key, Some(commit)) {
            Materialized::Entry(e) => Ok(Some(e)),
            Materialized::Gone => Ok(None),
            Materialized::Failed(e) => Err(e.into()),
            Materialized::Mismatch if write_held => mismatch(),
            Materialized::Mismatch => {
                let _w = self.index_write.lock().expect("index write lock");
                match self.try_materialize(key, None) {
                    Materialized::Entry(e) => Ok(Some(e)),
                    Materialized::Gone => Ok(None),
                    Materialized::Failed(e) => Err(e.into()),
                    Materialized::Mismatch => {
                        // Memory no longer says what the record of truth does: memory goes, so
                        // that the miss that follows stores the batch again.
                        self.forget_slot_locked(key);
                        mismatch()
                    }
                }
            }
        }
    }

    /// Removes `key`'s slot from memory only (caller holds `index_write`): its line is left
    /// as it is.
    fn forget_slot_locked(&self, key: &str) {
        let mut index = self.index.write().expect("index lock");
        let Some(old) = index.remove(key) else { return };
        self.bytes.fetch_sub(old.stored_bytes(), Relaxed);
        self.metrics.store_bytes.set(self.bytes.load(Relaxed) as i64);
        self.metrics.store_entries.set(index.len() as i64);
        self.metrics.evictions.with_label_values(&["index-mismatch"]).inc();
        drop(index);
        if let Some(hot) = &old.hot {
            self.forget_with_variants(hot);
        }
    }

    /// One try of [`Store::materialize`], for commit `commit` of the key (any, when None).
    fn try_materialize(&self, key: &str, commit: Option<u64>) -> Materialized {
        let line = match super::index::read_key(&self.dir, key) {
            Ok(KeyState::Live(line)) => Some(line),
            Ok(KeyState::Gone) => None,
            Err(e) => {
                tracing::warn!(key, error = %e, "index bucket unreadable");
                return Materialized::Failed(e);
            }
        };
        let (entry, generation) = {
            let index = self.index.read().expect("index lock");
            let Some(slot) = index.get(key) else { return Materialized::Gone };
            if let Some(hot) = &slot.hot {
                return Materialized::Entry(hot.clone());
            }
            if commit.is_some_and(|c| c != slot.commit) {
                return Materialized::Mismatch; // replaced meanwhile: look again
            }
            match line.as_ref().filter(|l| slot.matches(key, l)).and_then(|l| slot.materialize(&self.dir, key, l)) {
                Some(e) => (Arc::new(e), slot.generation),
                None => return Materialized::Mismatch,
            }
        };
        let mut index = self.index.write().expect("index lock");
        // The very slot it was built from: not a successor published meanwhile (same commit,
        // other variants), nor another commit (whose generations start again at 0).
        let Some(slot) = index.get_mut(key).filter(|s| s.generation == generation && s.commit == entry.commit) else {
            return Materialized::Mismatch;
        };
        match &slot.hot {
            Some(hot) => Materialized::Entry(hot.clone()),
            None => {
                slot.hot = Some(entry.clone());
                let queued = std::mem::replace(&mut slot.queued, true);
                let commit = slot.commit;
                drop(index);
                if !queued {
                    self.made_hot(key, commit, entry.hits());
                }
                Materialized::Entry(entry)
            }
        }
    }

    /// Queues `key`'s slot (commit `commit`), which holds a materialized entry now, and drops
    /// the oldest ones beyond [`HOT_ENTRIES`]: one hit since it joined earns another round, a
    /// few per call at most (so that one call never walks the whole queue). Each slot is in the
    /// queue at most once (`Slot::queued`); an item of a slot since replaced by another
    /// commit, or removed, is passed over.
    fn made_hot(&self, key: &str, commit: u64, hits: u64) {
        let mut hot = self.hot.lock().expect("hot lock");
        hot.push_back((key.into(), commit, hits));
        let mut second_chances = SECOND_CHANCES;
        while hot.len() > self.hot_max.load(Relaxed) {
            let Some((k, c, seen)) = hot.pop_front() else { break };
            let mut index = self.index.write().expect("index lock");
            let Some(slot) = index.get_mut(&*k).filter(|s| s.commit == c) else { continue };
            let now = slot.state.hits.load(Relaxed);
            if now > seen && slot.hot.is_some() && second_chances > 0 {
                second_chances -= 1;
                drop(index);
                hot.push_back((k, c, now));
                continue;
            }
            slot.queued = false;
            if let Some(old) = slot.hot.take() {
                drop(index);
                self.forget_with_variants(&old);
            }
        }
    }

    /// Forgets the verification of `entry` and its variants (it leaves memory).
    fn forget_with_variants(&self, entry: &Entry) {
        for f in entry.files() {
            self.forget_verified(f);
        }
    }

    /// The live entry of rule `rule` under `key` if memory holds it built: a check for under
    /// another lock (the fill registry's), which never waits on `index_write` nor reads a file.
    /// The caller looked the key up first ([`Store::lookup`]), so that a key the index load
    /// has not reached is in memory by then; [`InMemory::LookUp`] asks it to look again
    /// (the entry is stored but not built, or is changing right now).
    pub fn get_loaded_for(&self, rule: &str, key: &str) -> InMemory {
        let index = self.index.read().expect("index lock");
        match index.get(key) {
            Some(slot) if *slot.rule != *rule => InMemory::Absent,
            Some(slot) => match &slot.hot {
                Some(hot) => InMemory::Entry(hot.clone()),
                None => InMemory::LookUp,
            },
            None if self.is_loaded() => InMemory::Absent,
            // Not loaded yet: looked up just before, so absent; unless the caller did not.
            None => InMemory::Absent,
        }
    }

    /// [`Store::try_get`] from async code: the file read, when one is needed, on a blocking
    /// thread.
    pub async fn lookup(self: &Arc<Self>, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        {
            let index = self.index.read().expect("index lock");
            match index.get(key) {
                Some(slot) if slot.hot.is_some() => return Ok(slot.hot.clone()),
                // Under the same lock as the look (see `get_inner`).
                None if self.is_loaded() => return Ok(None),
                _ => {}
            }
        }
        let (this, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || this.try_get(&key))
            .await
            .map_err(|e| StoreError::Io(io::Error::other(e)))?
    }

    /// The live entry under `key` if rule `rule` stored it: entries are namespaced by rule,
    /// so two rules whose keys happen to coincide never serve each other's documents. May
    /// block on a file read (see [`Store::try_get`]).
    pub fn get_for(&self, rule: &str, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        Ok(self.try_get(key)?.filter(|e| e.rule == rule))
    }

    /// Whether rule `rule` holds an entry under `key` in memory (no file read: for a loaded
    /// index).
    pub fn holds(&self, rule: &str, key: &str) -> bool {
        self.index.read().expect("index lock").get(key).is_some_and(|s| *s.rule == *rule)
    }

    /// [`Store::get_for`] from async code.
    pub async fn lookup_for(self: &Arc<Self>, rule: &str, key: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        Ok(self.lookup(key).await?.filter(|e| e.rule == rule))
    }

    /// Every live entry in full, sorted by key: reads each one's index line unless it is in
    /// memory. For tests and tools on small stores; the server works from slots.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut keys = Vec::new();
        self.for_each(|key, _, _| keys.push(key.to_string()));
        keys.sort();
        keys.iter().filter_map(|k| self.get(k)).collect()
    }

    /// A page of the live entries whose key or batch id contains `q` (any case), sorted by
    /// `sort` (ties in key order; `descending` reverses both), and how many match. Under the
    /// index's read lock only what the sort needs is copied out (a key and one value per
    /// entry): the sort runs without it, so that a page over a million entries does not hold
    /// stores and lookups up; the page's entries are then read again.
    pub fn list(
        &self,
        q: Option<&str>,
        sort: SortBy,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<EntrySummary>) {
        let q = q.map(str::to_lowercase).filter(|q| !q.is_empty());
        let matches = |text: &str, q: &str| {
            if text.is_ascii() && q.is_ascii() {
                text.as_bytes().windows(q.len()).any(|w| w.eq_ignore_ascii_case(q.as_bytes()))
            } else {
                text.to_lowercase().contains(q)
            }
        };
        let mut rows: Vec<(SortValue, Box<str>)> = {
            let index = self.index.read().expect("index lock");
            index
                .iter()
                .filter(|(k, s)| q.as_ref().is_none_or(|q| matches(k, q) || matches(s.lote.get(k), q)))
                .map(|(k, s)| {
                    // Counters that hits keep moving are read once each: a sort must see a fixed order.
                    let value = match sort {
                        SortBy::Key => SortValue::None,
                        SortBy::LoteId => SortValue::Text(s.lote.get(k).into()),
                        SortBy::Size => SortValue::Number(s.size),
                        SortBy::StoredAt => SortValue::Number(s.stored_at_ms),
                        SortBy::Hits => SortValue::Number(s.state.hits.load(Relaxed)),
                        SortBy::LastHit => SortValue::Number(s.state.last_hit_ms.load(Relaxed)),
                        SortBy::GenMs => SortValue::Number(s.gen_ms),
                    };
                    (value, k.clone())
                })
                .collect()
        };
        rows.sort_unstable();
        if descending {
            rows.reverse();
        }
        let total = rows.len();
        let index = self.index.read().expect("index lock");
        let page =
            rows.iter().skip(offset).take(limit).filter_map(|(_, k)| index.get(k).map(|s| summary(k, s))).collect();
        (total, page)
    }

    /// Calls `f` with each live entry's key, batch id and slot, under the index's read lock
    /// (keep `f` short: commits wait for it).
    pub fn for_each(&self, mut f: impl FnMut(&str, &str, &Slot)) {
        let index = self.index.read().expect("index lock");
        for (key, slot) in index.iter() {
            f(key, slot.lote.get(key), slot);
        }
    }

    /// Keys of the live entries `which` selects.
    pub fn keys_of(&self, which: &Purge) -> Vec<String> {
        let mut keys = Vec::new();
        self.for_each(|key, lote_id, _| {
            if which.covers(key, lote_id) {
                keys.push(key.to_string());
            }
        });
        keys
    }

    /// The content files of the live entries whose body digest starts with byte `shard` (the
    /// scrubber walks the store a 256th at a time).
    pub fn files_in_shard(&self, shard: u8) -> Vec<StoredFile> {
        let mut out = Vec::new();
        self.for_each(|key, _, slot| {
            if slot.sha256[0] != shard {
                return;
            }
            let file = |coding, sha256: &[u8; 32], size| StoredFile {
                key: key.to_string(),
                commit: slot.commit,
                coding,
                sha256: *sha256,
                size,
                path: content_path(&self.dir, &integrity_of(sha256)),
            };
            out.push(file(None, &slot.sha256, slot.size));
            out.extend(slot.variants.iter().map(|v| file(Some(v.coding), &v.sha256, v.size)));
        });
        out
    }

    /// Whether `file` is still a file of the live entry of its key.
    pub fn is_current(&self, file: &StoredFile) -> bool {
        self.index.read().expect("index lock").get(file.key.as_str()).is_some_and(|s| {
            s.commit == file.commit
                && match file.coding {
                    None => s.sha256 == file.sha256,
                    Some(c) => s.variants.iter().any(|v| v.coding == c && v.sha256 == file.sha256),
                }
        })
    }

    /// Number of live entries (loaded so far).
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

    /// Whether `entry` is the live entry of its key in memory (its slot's materialized
    /// entry), or a variant of it.
    pub fn is_live(&self, entry: &Entry) -> bool {
        self.index.read().expect("index lock").get(entry.key.as_str()).and_then(|s| s.hot.as_ref()).is_some_and(|e| {
            std::ptr::eq(e.as_ref(), entry) || e.variants.iter().any(|v| std::ptr::eq(v.as_ref(), entry))
        })
    }

    /// Whether commit `commit` of `key` is still its live entry (a compression built from its
    /// body is still worth storing).
    pub fn is_current_commit(&self, key: &str, commit: u64) -> bool {
        self.index.read().expect("index lock").get(key).is_some_and(|s| s.commit == commit)
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
    /// published before it (and the purge removes the entry) or sees it (and stores nothing),
    /// and that the index load either reads a line before it (and the purge finds the entry in
    /// memory) or after (and removes it, see `load_bucket`).
    pub fn record_purge(&self, which: &Purge) {
        let _w = self.index_write.lock().expect("index write lock");
        if !self.is_loaded() {
            // Lines the load has not reached are removed as it reaches them; the journal keeps
            // the purge for the next load should this one not finish.
            if let Err(e) = append_pending_purge(&self.dir, which) {
                tracing::error!(error = %e, ?which, "could not journal a purge made during the index load; it holds until this process stops");
            }
            self.load.lock().expect("load lock").purges.push(which.clone());
        }
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

    /// Publishes `entry` in memory (caller holds `index_write`), keeping byte counts: its slot
    /// replaces the key's, with `entry` materialized. The entry it replaces is forgotten, but
    /// for the variants the new one carries over.
    fn publish(&self, entry: Arc<Entry>) {
        let mut slot = Slot::of(&entry, self.rule_name(&entry.rule));
        slot.hot = Some(entry.clone());
        let size = slot.stored_bytes();
        let mut index = self.index.write().expect("index lock");
        // A successor (same commit) keeps its place in the hot queue; every publish is a new
        // generation of the key's slot.
        let previous = index.get(entry.key.as_str());
        slot.queued = previous.is_some_and(|o| o.queued && o.commit == slot.commit);
        slot.generation = previous.map_or(0, |o| o.generation.wrapping_add(1));
        let queued = slot.queued;
        slot.queued = true;
        let old = index.insert(entry.key.as_str().into(), Box::new(slot));
        self.bytes.fetch_add(size, Relaxed);
        if let Some(old) = &old {
            self.bytes.fetch_sub(old.stored_bytes(), Relaxed);
        }
        self.metrics.store_bytes.set(self.bytes.load(Relaxed) as i64);
        self.metrics.store_entries.set(index.len() as i64);
        drop(index);
        if let Some(old) = old.and_then(|o| o.hot) {
            self.forget_verified(&old);
            for v in old.variants.iter().filter(|v| !entry.variants.iter().any(|n| Arc::ptr_eq(n, v))) {
                self.forget_verified(v);
            }
        }
        if !queued {
            self.made_hot(&entry.key, entry.commit, entry.hits());
        }
    }

    /// Removes `key` from memory and the index if its live entry is commit `expect` (or any,
    /// when None). Runs blocking; the caller is on a blocking thread.
    fn unpublish_sync(&self, key: &str, expect: Option<u64>, reason: &'static str) -> Result<bool, StoreError> {
        let _w = self.index_write.lock().expect("index write lock");
        let mut index = self.index.write().expect("index lock");
        // The judged entry, or a successor of it (same commit, other variants).
        let matches = match (index.get(key), expect) {
            (Some(cur), Some(commit)) => cur.commit == commit,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !matches {
            return Ok(false);
        }
        let old = index.remove(key).expect("present");
        self.bytes.fetch_sub(old.stored_bytes(), Relaxed);
        self.metrics.store_bytes.set(self.bytes.load(Relaxed) as i64);
        self.metrics.store_entries.set(index.len() as i64);
        self.metrics.evictions.with_label_values(&[reason]).inc();
        drop(index);
        if let Some(hot) = &old.hot {
            self.forget_with_variants(hot);
        }
        tombstone(&self.dir, key)?;
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
            // Built from this commit's body: good for any successor of it.
            if !self.is_current_commit(&parent.key, parent.commit) {
                return Ok(false);
            }
            let Some(live) = self.get_locked(&parent.key)?.filter(|l| l.commit == parent.commit) else {
                return Ok(false);
            };
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
            let next = Arc::new(live.successor(variants, live.compress_tried().load(Relaxed)));
            self.reindex(&live, &next)?;
            next
        };
        self.enforce_max_size_sync(Some(&next))?;
        Ok(true)
    }

    /// Drops the variant in `coding` with digest `sha256` from commit `commit` of `key` (a
    /// new index line without it; the entry stays), so that it is never served again and is
    /// built anew on a later request. Whether it was live. Blocking.
    fn drop_variant_sync(
        &self,
        key: &str,
        commit: u64,
        coding: Coding,
        sha256: &[u8; 32],
        reason: &'static str,
    ) -> Result<bool, StoreError> {
        let _w = self.index_write.lock().expect("index write lock");
        let has_it = self.index.read().expect("index lock").get(key).is_some_and(|s| {
            s.commit == commit && s.variants.iter().any(|v| v.coding == coding && v.sha256 == *sha256)
        });
        if !has_it {
            return Ok(false);
        }
        let Some(live) = self.get_locked(key)?.filter(|l| l.commit == commit) else { return Ok(false) };
        let kept = live.variants.iter().filter(|v| v.coding != Some(coding)).cloned().collect();
        let tried = live.compress_tried().load(Relaxed) & !coding.bit();
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
    /// see [`Store::evict_file`].
    pub async fn evict(self: &Arc<Self>, entry: &Arc<Entry>, reason: &'static str) {
        let file = StoredFile {
            key: entry.key.clone(),
            commit: entry.commit,
            coding: entry.coding,
            sha256: entry.sha256,
            size: entry.size,
            path: entry.path.clone(),
        };
        self.evict_file(&file, reason).await
    }

    /// Removes the entry whose content `file` is because it can no longer be served:
    /// tombstones its key unless a newer entry replaced it, and deletes the content file
    /// unless a live entry still references it (content is named by digest: a newer entry of
    /// this key, or another key, may hold the same bytes in a good file by now).
    /// A variant (`coding` set) is dropped from its entry, which stays, and is built again on
    /// a later request.
    pub async fn evict_file(self: &Arc<Self>, file: &StoredFile, reason: &'static str) {
        let coding = file.coding.map(Coding::token);
        tracing::warn!(key = %file.key, reason, coding, "evicting entry");
        let (this, file) = (self.clone(), file.clone());
        let result = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let removed = match file.coding {
                Some(c) => this.drop_variant_sync(&file.key, file.commit, c, &file.sha256, reason)?,
                None => this.unpublish_sync(&file.key, Some(file.commit), reason)?,
            };
            if !removed {
                return Ok(()); // another version is live now: not the one judged
            }
            let _w = this.index_write.lock().expect("index write lock");
            // A commit of the same bytes may be about to index this very file.
            if this.references(&file.sha256) || this.readers.lock().expect("readers lock").contains_key(&file.path) {
                return Ok(());
            }
            match std::fs::remove_file(&file.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        })
        .await;
        if let Ok(Err(e)) | Err(e) = result.map_err(|e| StoreError::Io(io::Error::other(e))) {
            tracing::error!(error = %e, "eviction failed");
        }
    }

    /// Whether a live entry (loaded, or not loaded yet) holds the content with this digest.
    fn references(&self, sha256: &[u8; 32]) -> bool {
        // While the index loads, an entry not in memory yet may: assume so (the collector
        // removes the file later if none does).
        !self.is_loaded() || self.index.read().expect("index lock").values().any(|s| s.digests().any(|d| d == sha256))
    }

    /// Removes the entries selected by `which` (content is left to the collector). Returns
    /// the removed keys. While the index loads, a key is first looked up in its bucket; a
    /// purge by batch or of everything removes what is loaded, and the load (or a request)
    /// removes what it reaches later that the purge covers; the purge is journaled, so that a
    /// restart before the load ends applies it again. The removed keys are those memory held.
    pub async fn purge(self: &Arc<Self>, which: Purge) -> Result<Vec<String>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Purge::Key(k) = &which {
                let _ = this.get(k); // loads it from its bucket if the load has not reached it
            }
            this.record_purge(&which);
            let mut removed = Vec::new();
            for k in this.keys_of(&which) {
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
    fn enforce_max_size_sync(&self, keep: Option<&Arc<Entry>>) -> Result<(), StoreError> {
        let max = self.max_size.load(Relaxed);
        if max == 0 {
            return Ok(());
        }
        if let Some(keep) = keep.filter(|k| k.stored_bytes() > max) {
            // Nothing is evicted to make room for an entry that cannot fit anyway.
            tracing::warn!(key = %keep.key, size = keep.size, max, "entry larger than max_size; not kept");
            self.unpublish_sync(&keep.key, Some(keep.commit), "too-large")?;
            return Err(StoreError::TooLarge { size: keep.size, max });
        }
        while self.bytes.load(Relaxed) > max {
            let victim = {
                let index = self.index.read().expect("index lock");
                index
                    .iter()
                    .filter(|(k, s)| keep.is_none_or(|keep| !(keep.key == ***k && keep.commit == s.commit)))
                    .min_by_key(|(_, s)| s.state.last_hit_ms.load(Relaxed))
                    .map(|(k, s)| (k.to_string(), s.commit, s.size))
            };
            match (victim, keep) {
                (Some((key, commit, size)), _) => {
                    tracing::info!(key = %key, size, "evicting least recently used entry (max_size)");
                    self.unpublish_sync(&key, Some(commit), "lru")?;
                }
                (None, Some(keep)) => {
                    tracing::warn!(key = %keep.key, size = keep.size, max, "entry larger than max_size; not kept");
                    self.unpublish_sync(&keep.key, Some(keep.commit), "too-large")?;
                    return Err(StoreError::TooLarge { size: keep.size, max });
                }
                (None, None) => break,
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
        // What memory does not hold yet is live too: the collector waits for the whole index.
        if !self.is_loaded() {
            return Err(StoreError::Loading);
        }
        let mut report = GcReport::default();
        {
            // Buckets change only under index_write: compact them there.
            let _w = self.index_write.lock().expect("index write lock");
            report.compacted_buckets = compact_buckets(&self.dir)?;
        }
        // One digest per live content file (a single allocation, returned as the pass ends).
        let live: HashSet<[u8; 32]> = {
            let index = self.index.read().expect("index lock");
            index.values().flat_map(|s| s.digests().copied()).collect()
        };
        let digest_of = |file: &Path| -> Option<[u8; 32]> {
            let rel = file.strip_prefix(self.dir.join("content-v2").join("sha256")).ok()?;
            let hex: String = rel.iter().map(|c| c.to_string_lossy()).collect();
            let mut out = [0u8; 32];
            hex::decode_to_slice(hex, &mut out).ok()?;
            Some(out)
        };
        let now = SystemTime::now();
        let grace = Duration::from_millis(self.gc_grace_ms.load(Relaxed));
        for file in walk_files(&self.dir.join("content-v2")) {
            let digest = digest_of(&file);
            if digest.is_some_and(|d| live.contains(&d))
                || self.readers.lock().expect("readers lock").contains_key(&file)
            {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&file) else { continue };
            let young = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_none_or(|age| age < grace);
            if young {
                continue;
            }
            // Re-check under the write lock: an entry may have been committed meanwhile.
            let _w = self.index_write.lock().expect("index write lock");
            let referenced = digest.is_some_and(|d| self.references(&d));
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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
                state: EntryState::new(crate::clock::now_ms() as u64, 0),
                commit: next_commit(),
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
            store.enforce_max_size_sync(Some(&entry))?;
            Ok(entry)
        })
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e)))?
    }
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

/// Directories whose index load is held (see [`hold_index_load`]).
static HELD_LOADS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Holds the background index load of the store at `dir` (opened now or later) before its
/// next bucket directory until the returned guard drops: lets tests make requests, purges
/// and commits while a store is still loading, deterministically. Not for production use.
#[doc(hidden)]
pub fn hold_index_load(dir: &Path) -> LoadHold {
    HELD_LOADS.lock().expect("held loads lock").push(dir.to_path_buf());
    LoadHold(dir.to_path_buf())
}

/// See [`hold_index_load`].
#[doc(hidden)]
pub struct LoadHold(PathBuf);

impl Drop for LoadHold {
    fn drop(&mut self) {
        let mut held = HELD_LOADS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|d| *d == self.0) {
            held.remove(i);
        }
    }
}

/// Waits while the load of `dir` is held; false if the store went away meanwhile.
fn wait_while_held(store: &Weak<Store>, dir: &Path) -> bool {
    while HELD_LOADS.lock().expect("held loads lock").iter().any(|d| d == dir) {
        if store.strong_count() == 0 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Loads the index of the store `store` points to into memory, a bucket at a time, in the
/// background (see [`Store::open`]); stops early if the store is dropped. Logs its progress.
/// A directory or bucket that cannot be read is tried again a few times; if one still cannot,
/// the load never counts as done: keys are still looked up in their buckets when memory lacks
/// them, and the collector stays off (it would take their content for unreferenced).
fn load_index(store: Weak<Store>) {
    let Some(root) = store.upgrade().map(|s| s.dir.clone()) else { return };
    let mut last_log = std::time::Instant::now();
    // What could not be read: directories (to list) and buckets (to load).
    let mut todo: Vec<(PathBuf, bool)> = vec![(root.join("index-v5"), true)];
    let mut failed: Vec<(PathBuf, bool)> = Vec::new();
    for attempt in 0..LOAD_ATTEMPTS {
        if attempt > 0 {
            tracing::warn!(unreadable = todo.len(), attempt, "index load: trying again what could not be read");
            std::thread::sleep(LOAD_RETRY_PAUSE);
        }
        while let Some((path, is_dir)) = todo.pop() {
            if !wait_while_held(&store, &root) {
                return;
            }
            let Some(store) = store.upgrade() else { return };
            if !is_dir {
                if let Err(e) = store.load_bucket(&path) {
                    tracing::warn!(bucket = %path.display(), error = %e, "index bucket unreadable");
                    failed.push((path, false));
                }
                continue;
            }
            let first_level = path.parent() == Some(root.join("index-v5").as_path());
            match std::fs::read_dir(&path).and_then(|r| r.collect::<io::Result<Vec<_>>>()) {
                Ok(children) => {
                    // Only cacache's names: directories of 2 hex digits, buckets of 36 (the
                    // rest of a sha1); a leftover of an interrupted compaction is not a bucket.
                    let hex = |name: &std::ffi::OsStr, len: usize| {
                        name.to_str().is_some_and(|n| n.len() == len && n.bytes().all(|b| b.is_ascii_hexdigit()))
                    };
                    let mut children: Vec<(PathBuf, bool)> = children
                        .into_iter()
                        .filter_map(|e| {
                            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                            hex(&e.file_name(), if is_dir { 2 } else { 36 }).then(|| (e.path(), is_dir))
                        })
                        .collect();
                    // Popped from the end: sorted backwards, the first directory goes first.
                    children.sort_by(|a, b| b.0.cmp(&a.0));
                    todo.extend(children);
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "index directory unreadable");
                    failed.push((path, true));
                }
            }
            // A first-level directory (of 256) done: progress.
            if first_level {
                let entries = store.len();
                let dirs_done = {
                    let mut load = store.load.lock().expect("load lock");
                    load.dirs_done += 1;
                    load.dirs_done
                };
                if last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = std::time::Instant::now();
                    tracing::info!(entries, progress = format!("{:.0}%", dirs_done as f64 / 2.56), "loading the index");
                }
            }
        }
        if failed.is_empty() {
            break;
        }
        todo = std::mem::take(&mut failed);
    }
    let Some(store) = store.upgrade() else { return };
    if !todo.is_empty() {
        tracing::error!(
            unreadable = todo.len(),
            "index load incomplete: keys there are looked up in their buckets when asked for, and the collector stays off until a restart loads them"
        );
        store.load.lock().expect("load lock").gave_up = true;
        store.loaded.notify_all();
        return;
    }
    if !wait_while_held(&Arc::downgrade(&store), &root) {
        return;
    }
    let took_ms = {
        // Under index_write and the index lock: a request or purge either saw the load running
        // or sees it done with every key in.
        let _w = store.index_write.lock().expect("index write lock");
        let _index = store.index.write().expect("index lock");
        let mut load = store.load.lock().expect("load lock");
        load.done = true;
        load.purges = Vec::new();
        load.dirs_done = 256;
        load.took_ms = load.started.map_or(0, |t| t.elapsed().as_millis() as u64);
        store.is_loaded.store(true, std::sync::atomic::Ordering::Release);
        // Every line a pending purge covers is removed by now: the journal has done its work.
        if let Err(e) = remove_pending_purges(&store.dir) {
            tracing::warn!(error = %e, "could not remove the journal of purges made during the load; the next load applies them again");
        }
        load.took_ms
    };
    tracing::info!(entries = store.len(), bytes = store.bytes(), took_ms, "index loaded");
    store.loaded.notify_all();
    // Entries the load added may take the store over its cap.
    if let Err(e) = store.enforce_max_size_sync(None) {
        tracing::warn!(error = %e, "keeping to max_size after the index load failed");
    }
}

/// The purges journaled by an index load that did not finish (a torn last line, from a purge
/// that never answered, is skipped).
fn read_pending_purges(dir: &Path) -> Vec<Purge> {
    let Ok(text) = std::fs::read_to_string(dir.join(PENDING_PURGES)) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Journals `which` (see [`PENDING_PURGES`]), durably.
fn append_pending_purge(dir: &Path, which: &Purge) -> io::Result<()> {
    use std::io::Write;
    let path = dir.join(PENDING_PURGES);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    writeln!(file, "{}", serde_json::to_string(which).map_err(io::Error::other)?)?;
    sync_file_and_dirs(&path, dir)
}

fn remove_pending_purges(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(PENDING_PURGES)) {
        Ok(()) => std::fs::File::open(dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Appends a tombstone for `key` to its bucket and fsyncs it: a removal survives a crash.
fn tombstone(dir: &Path, key: &str) -> io::Result<()> {
    cacache::index::delete(dir, key).map_err(io::Error::other)?;
    sync_file_and_dirs(&bucket_path(dir, key), dir)
}

/// How many times the load tries what it could not read, and the pause between tries.
const LOAD_ATTEMPTS: usize = 5;
const LOAD_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Whether the file at `path` is provably not `size` bytes (missing, or another size); an
/// error that proves nothing (a full file table) says it is.
fn file_is_not(path: &Path, size: u64) -> bool {
    match std::fs::metadata(path) {
        Ok(m) => m.len() != size,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Takes the directory's lock file, or says who holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut taken = file.try_lock();
    while matches!(taken, Err(std::fs::TryLockError::WouldBlock)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        taken = file.try_lock();
    }
    if let Err(e) = taken {
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
            let replaced = std::fs::write(&tmp, kept)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &bucket));
            if let Err(e) = replaced {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
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
        state: EntryState::new(md.time as u64, 0),
        commit: next_commit(),
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
        assert_eq!(live.hits(), 1);
        assert_eq!(live.last_hit_ms(), served.last_hit_ms());
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
        assert_eq!(building_on.compress_tried().load(Relaxed), Coding::Gzip.bit(), "br may be built again");
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

    #[tokio::test]
    async fn an_entry_dropped_from_memory_is_served_again_from_its_index_line_with_its_counters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_loaded(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        store.hot_max.store(1, Relaxed);
        let first = committed(&store, "k1", b"first body").await;
        first.touch();
        first.touch();
        let head = first.headers.clone();
        // One hot entry at most: k1, hit since it joined, gets a second round (k2 leaves);
        // not hit again, it leaves when k3 comes.
        committed(&store, "k2", b"second body").await;
        assert!(store.index.read().unwrap()["k2"].hot.is_none());
        assert!(store.index.read().unwrap()["k1"].hot.is_some());
        committed(&store, "k3", b"third body").await;
        assert!(store.index.read().unwrap()["k1"].hot.is_none());
        let again = store.get("k1").expect("still stored");
        assert!(!Arc::ptr_eq(&again, &first), "built anew from its index line");
        assert_eq!((again.commit, again.sha256, again.size), (first.commit, first.sha256, first.size));
        assert_eq!(again.headers, head);
        assert_eq!(again.hits(), 2, "its counters live in its slot");
        assert_eq!(again.path, first.path);
        // A judgment of the old snapshot still holds for the entry built anew (same commit).
        store.evict(&first, "digest-mismatch").await;
        assert!(store.get("k1").is_none());
    }

    #[tokio::test]
    async fn an_index_line_that_no_longer_says_what_memory_does_is_a_miss_not_another_document() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_loaded(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        store.hot_max.store(1, Relaxed);
        committed(&store, "k1", b"first body").await;
        committed(&store, "k2", b"second body").await;
        // Someone rewrites k1's line behind the store's back, naming other content.
        let opts = cacache::WriteOpts::new()
            .integrity(Integrity::from(b"other"))
            .size(5)
            .metadata(serde_json::to_value(meta()).unwrap());
        cacache::index::insert(dir.path(), "k1", opts).unwrap();
        assert!(store.get("k1").is_none());
        // Memory lets go too: the next request is a miss whose fill stores the batch again.
        assert!(!store.holds("batch-results", "k1"));
        assert!(matches!(store.get_loaded_for("batch-results", "k1"), InMemory::Absent));
    }

    #[tokio::test]
    async fn keys_are_found_in_their_buckets_before_the_load_reaches_them_and_a_purge_meanwhile_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_loaded(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        for k in ["a", "b", "c"] {
            committed(&store, k, k.as_bytes()).await;
        }
        drop(store);
        let hold = hold_index_load(dir.path());
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        assert_eq!(store.len(), 0, "the load is held");
        assert!(!store.is_loaded());
        assert_eq!(std::fs::read(&store.get("a").expect("read from its bucket").path).unwrap(), b"a");
        assert!(store.get("never").is_none());
        // meta() is batch L1: every entry is covered, "a" loaded, "b" and "c" not yet. The
        // purge removes "a" at once and answers; the load removes the others as it reads them.
        assert_eq!(store.purge(Purge::LoteId("L1".into())).await.unwrap(), ["a"]);
        assert!(store.get("b").is_none(), "a purged entry is never served, loaded or not");
        assert!(matches!(store.gc().await, Err(StoreError::Loading)));
        drop(hold);
        let s = store.clone();
        assert!(tokio::task::spawn_blocking(move || s.wait_loaded()).await.unwrap());
        assert!(store.is_empty(), "the load brought back a purged entry");
        assert!(!dir.path().join(PENDING_PURGES).exists(), "the journal outlived the load");
        drop(store);
        let reopened = Store::open_loaded(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        assert!(reopened.is_empty(), "the purge is on disk");
    }

    #[tokio::test]
    async fn a_purge_made_during_a_load_that_never_ends_holds_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_loaded(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        for k in ["a", "b"] {
            committed(&store, k, k.as_bytes()).await;
        }
        drop(store);
        let hold = hold_index_load(dir.path());
        let store = Store::open(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        assert!(store.purge(Purge::All).await.unwrap().is_empty(), "nothing was loaded yet");
        assert!(store.get("a").is_none());
        // The process stops before its load reaches "b".
        drop(store);
        drop(hold);
        let reopened = Store::open_loaded(dir.path().to_path_buf(), 0, Arc::default()).await.unwrap();
        assert!(reopened.get("b").is_none(), "a purge made during an unfinished load came back");
        assert!(reopened.is_empty());
        assert!(!dir.path().join(PENDING_PURGES).exists(), "applied by the load that finished");
    }
}
