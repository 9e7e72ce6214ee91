//! The on-disk store: cacache for content and index, behind a narrow API of ours, plus an
//! in-memory index of every live entry so that a hit never reads an index bucket.
//!
//! cacache specifics confined here: content is written with `open_hash` + `commit` (no key),
//! fsynced by us (cacache never fsyncs), and only then indexed with `index::insert`; the
//! content path follows cacache's `content-v2/{algo}/{hex[0..2]}/{hex[2..4]}/{rest}` layout,
//! which a test pins.

use super::entry::{validators, Entry, EntryMeta, META_VERSION};
use ssri::{Algorithm, Integrity};
use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};
use tokio::io::AsyncWriteExt;

/// Capacity of the buffer in front of cacache's writer (it spawns a blocking task per write).
const WRITE_BUFFER: usize = 256 * 1024;

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
    /// Serializes index-line appends with the matching in-memory update, so the two never
    /// disagree on which entry of a key is the latest.
    index_write: Mutex<()>,
}

impl Store {
    /// Opens (creating if needed) the store at `dir` and loads the index into memory,
    /// dropping entries whose content file is missing or has the wrong size.
    pub async fn open(dir: PathBuf) -> Result<Arc<Store>, StoreError> {
        tokio::task::spawn_blocking(move || Store::open_sync(dir)).await.map_err(io::Error::other)?
    }

    fn open_sync(dir: PathBuf) -> Result<Arc<Store>, StoreError> {
        // cacache creates index-v5 on first insert; listing a store without it is an error.
        std::fs::create_dir_all(dir.join("index-v5"))?;
        let lock = lock_dir(&dir)?;
        let swept = sweep_tmp(&dir);
        let loaded = load_entries(&dir);
        let mut map = HashMap::new();
        for entry in loaded.entries {
            match std::fs::metadata(&entry.path) {
                Ok(m) if m.len() == entry.size => {
                    map.insert(entry.key.clone(), Arc::new(entry));
                }
                _ => {
                    tracing::warn!(key = %entry.key, "content missing or wrong size; entry dropped");
                    let _ = cacache::index::delete(&dir, &entry.key);
                }
            }
        }
        tracing::info!(dir = %dir.display(), entries = map.len(), skipped = loaded.skipped, swept, "store opened");
        Ok(Arc::new(Store { dir, _lock: lock, index: RwLock::new(map), index_write: Mutex::new(()) }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live entry under `key`, from memory.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.index.read().expect("index lock").get(key).cloned()
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts writing a new body. Nothing is visible until [`PendingWrite::commit`].
    pub async fn begin(&self) -> Result<PendingWrite, StoreError> {
        let writer = cacache::WriteOpts::new().algorithm(Algorithm::Sha256).open_hash(&self.dir).await?;
        Ok(PendingWrite { writer: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, writer), written: 0 })
    }

    /// Removes `entry` because it can no longer be served (corrupt or missing content):
    /// tombstones its key unless a newer entry replaced it, and deletes its content file.
    pub async fn evict(self: &Arc<Self>, entry: &Arc<Entry>, reason: &str) {
        tracing::warn!(key = %entry.key, lote_id = %entry.lote_id, reason, "evicting entry");
        let (this, entry) = (self.clone(), entry.clone());
        let result = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            {
                let _w = this.index_write.lock().expect("index write lock");
                let mut index = this.index.write().expect("index lock");
                if index.get(&entry.key).is_some_and(|cur| Arc::ptr_eq(cur, &entry)) {
                    index.remove(&entry.key);
                    drop(index);
                    cacache::index::delete(&this.dir, &entry.key)?;
                }
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
}

/// A body being written to the store.
pub struct PendingWrite {
    writer: tokio::io::BufWriter<cacache::Writer>,
    written: u64,
}

impl PendingWrite {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.writer.write_all(data).await?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Makes the body durable and visible under `key`: commit the content, fsync it and its
    /// directories, then append the index line and publish the entry in memory. If
    /// `expected_len` is given and differs from what was written, nothing is stored.
    pub async fn commit(
        mut self,
        store: &Arc<Store>,
        key: &str,
        meta: EntryMeta,
        expected_len: Option<u64>,
    ) -> Result<Arc<Entry>, StoreError> {
        if let Some(expected) = expected_len {
            if expected != self.written {
                return Err(StoreError::Length { got: self.written, expected });
            }
        }
        self.writer.flush().await?;
        let integrity = self.writer.into_inner().commit().await?;
        let path = content_path(&store.dir, &integrity);
        let sha256 = sha256_of(&integrity).ok_or(StoreError::Algorithm)?;
        let (store, key, size) = (store.clone(), key.to_string(), self.written);
        tokio::task::spawn_blocking(move || {
            sync_file_and_dirs(&path, &store.dir)?;
            let stored_at_ms = now_ms();
            let meta_json = serde_json::to_value(&meta).map_err(io::Error::other)?;
            let headers = meta.header_map().ok_or_else(|| io::Error::other("unstorable header"))?;
            let (etag, repr_digest) = validators(&sha256, &integrity);
            let entry = Arc::new(Entry {
                etag,
                repr_digest,
                key: key.clone(),
                lote_id: meta.lote_id,
                integrity: integrity.clone(),
                sha256,
                size,
                status: http::StatusCode::from_u16(meta.status).map_err(io::Error::other)?,
                headers,
                stored_at_ms,
                gen_ms: meta.gen_ms,
                path,
            });
            let opts = cacache::WriteOpts::new()
                .integrity(integrity)
                .size(size as usize)
                .time(stored_at_ms)
                .metadata(meta_json);
            let _w = store.index_write.lock().expect("index write lock");
            cacache::index::insert(&store.dir, &key, opts)?;
            sync_file_and_dirs(&bucket_path(&store.dir, &key), &store.dir)?;
            store.index.write().expect("index lock").insert(key, entry.clone());
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

fn sha256_of(sri: &Integrity) -> Option<[u8; 32]> {
    let (algo, hex) = sri.to_hex();
    if algo != Algorithm::Sha256 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
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

fn entry_from_index(dir: &Path, md: cacache::Metadata) -> Option<Entry> {
    let meta: EntryMeta = serde_json::from_value(md.metadata).ok()?;
    if meta.v != META_VERSION {
        return None;
    }
    let sha256 = sha256_of(&md.integrity)?;
    let (etag, repr_digest) = validators(&sha256, &md.integrity);
    Some(Entry {
        etag,
        repr_digest,
        path: content_path(dir, &md.integrity),
        sha256,
        status: http::StatusCode::from_u16(meta.status).ok()?,
        headers: meta.header_map()?,
        key: md.key,
        lote_id: meta.lote_id,
        integrity: md.integrity,
        size: md.size as u64,
        stored_at_ms: md.time,
        gen_ms: meta.gen_ms,
    })
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

pub fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};

    fn meta() -> EntryMeta {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        EntryMeta::new("L1", StatusCode::OK, &h, 5)
    }

    #[tokio::test]
    async fn committed_content_lives_at_the_computed_cacache_path_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).await.unwrap();
        let mut w = store.begin().await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        let entry = w.commit(&store, "L1_resultados.json", meta(), Some(11)).await.unwrap();
        assert_eq!(std::fs::read(&entry.path).unwrap(), b"hello world");
        assert_eq!(entry.integrity, Integrity::from(b"hello world"));

        drop(store);
        let reopened = Store::open(dir.path().to_path_buf()).await.unwrap();
        let e = reopened.get("L1_resultados.json").unwrap();
        assert_eq!(e.size, 11);
        assert_eq!(e.lote_id, "L1");
        assert_eq!(e.headers["content-type"], "application/json");
    }

    #[tokio::test]
    async fn the_index_bucket_path_is_the_one_cacache_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).await.unwrap();
        let mut w = store.begin().await.unwrap();
        w.write(b"x").await.unwrap();
        w.commit(&store, "L9_resultados.json", meta(), None).await.unwrap();
        let bucket = std::fs::read_to_string(bucket_path(dir.path(), "L9_resultados.json")).unwrap();
        assert!(bucket.contains("L9_resultados.json"));
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path().to_path_buf()).await.unwrap();
        let err = Store::open(dir.path().to_path_buf()).await.err().expect("second open refused");
        assert!(err.to_string().contains("in use by another lotecache process"), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        Store::open(dir.path().to_path_buf()).await.expect("free again once the first is gone");
    }

    #[tokio::test]
    async fn temp_files_left_by_a_crash_are_swept_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/.tmpabc"), b"partial").unwrap();
        let _store = Store::open(dir.path().to_path_buf()).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_length_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).await.unwrap();
        let mut w = store.begin().await.unwrap();
        w.write(b"abc").await.unwrap();
        assert!(w.commit(&store, "k", meta(), Some(4)).await.is_err());
        assert!(store.get("k").is_none());
    }

    #[tokio::test]
    async fn latest_write_wins_and_eviction_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf()).await.unwrap();
        for body in [&b"one"[..], b"two"] {
            let mut w = store.begin().await.unwrap();
            w.write(body).await.unwrap();
            w.commit(&store, "k", meta(), None).await.unwrap();
        }
        drop(store);
        let reopened = Store::open(dir.path().to_path_buf()).await.unwrap();
        let e = reopened.get("k").unwrap();
        assert_eq!(std::fs::read(&e.path).unwrap(), b"two");
        reopened.evict(&e, "test").await;
        assert!(reopened.get("k").is_none());
        drop(reopened);
        assert!(Store::open(dir.path().to_path_buf()).await.unwrap().get("k").is_none());
    }
}
