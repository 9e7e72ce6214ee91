//! Verified reads of stored content. The rule: every byte served as part of a complete
//! response was verified against the entry's sha256 since the content file last changed.
//!
//! - A content file is hashed when it is first read, and again whenever it changed: its
//!   fingerprint (device, inode, size, mtime, ctime) at the last successful hash is
//!   remembered, and a read that finds the same fingerprint skips the hash. The hash happens
//!   before the response starts, so a bad file is evicted and refetched within the same
//!   request, never even partly sent.
//! - Verified bodies up to `cache.memory_object_max` are kept in memory while the memory tier
//!   has room; a hit from memory sends that shared buffer (no read, no copy, no task hop). Its
//!   file is re-checked with one `stat` at most every `cache.memory_recheck`: a changed file
//!   drops the memory copy.
//! - Larger bodies are sent from the file with `sendfile` (see `crate::sendfile`); the
//!   fingerprint is checked again before every `sendfile`, so a file changed during the send
//!   aborts the response (a whole one or a range), never a clean `200` or `206`.
//! - Silent media corruption (which changes no fingerprint) is found by the scrubber, which
//!   re-hashes every file at a configured rate.

use super::entry::Entry;
use super::store::Store;
use crate::fingerprint::Fingerprint;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::{fs::File, io, io::Read, sync::Arc, time::Duration};

/// Bodies up to this size (and larger ones headed for the memory tier) are read, and
/// verified when needed, whole before the response starts.
pub const WHOLE_MAX: u64 = 1024 * 1024;
/// Read size when hashing a file.
const CHUNK: u64 = 256 * 1024;
/// Shortest time between the starts of two scrub passes over the store.
const SCRUB_MIN_PASS: Duration = Duration::from_secs(10);

/// Why stored content cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("content file missing")]
    Missing,
    #[error("content file has {actual} bytes, index says {expected}")]
    WrongSize { actual: u64, expected: u64 },
    #[error("content digest mismatch")]
    DigestMismatch,
    #[error("content file changed while it was read")]
    Changed,
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
            ReadError::Changed => "content-changed",
            ReadError::Io(_) => "read-error",
        }
    }

    /// Whether the error proves the content is not the entry's (missing, wrong size or
    /// digest, changed): only then is the entry evicted. An I/O error (file table full, a
    /// disk error) proves nothing about the bytes: the entry is kept.
    pub fn proves_bad_content(&self) -> bool {
        !matches!(self, ReadError::Io(_))
    }
}

/// Whether `entry` was verified in exactly this file state.
fn trusted(entry: &Entry, fp: &Fingerprint) -> bool {
    entry.verified.load().as_ref().is_some_and(|v| v.fingerprint == *fp)
}

/// The body from the memory tier, if it is there and its file unchanged. The bytes in
/// memory are the verified ones whatever happens to the file; the file is re-checked (one
/// `stat`, no task hop) at most every `cache.memory_recheck`, so that a damaged or replaced
/// file drops the memory copy and is verified, or refetched, again.
fn from_memory(store: &Store, entry: &Entry) -> Option<Bytes> {
    let v = entry.verified.load_full()?;
    let body = v.body.as_ref()?;
    let now = crate::clock::now_ms() as u64;
    let last = v.checked_ms.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(last) < store.memory_recheck_ms() {
        return Some(body.clone());
    }
    match std::fs::metadata(&entry.path) {
        Ok(m) if Fingerprint::of(&m) == v.fingerprint => {
            v.checked_ms.store(now, std::sync::atomic::Ordering::Relaxed);
            Some(body.clone())
        }
        _ => {
            store.forget_verified(entry);
            None
        }
    }
}

/// Opens `entry` for serving: verified bytes from memory, or a verified file mapped for
/// `sendfile`. On `Err` nothing was sent; the caller evicts and refetches.
pub async fn open(store: Arc<Store>, entry: Arc<Entry>) -> Result<Bytes, ReadError> {
    let e_size = entry.size;
    if let Some(body) = from_memory(&store, &entry) {
        return Ok(body);
    }
    // A large body bound for the memory tier is loaded once: concurrent first readers wait
    // for that load instead of each buffering their own copy.
    let to_memory = entry.size > WHOLE_MAX && store.fits_memory_tier(entry.size);
    let loader = entry.clone();
    let _loading = if to_memory { Some(loader.loading.lock().await) } else { None };
    if to_memory {
        if let Some(body) = from_memory(&store, &entry) {
            return Ok(body);
        }
    }
    let reading = store.reading(&entry.path);
    let (s, e) = (store.clone(), entry.clone());
    let opened = tokio::task::spawn_blocking(move || -> Result<Opened, ReadError> {
        let (mut file, fp) = open_checked(&e.path, e.size)?;
        let trusted = trusted(&e, &fp);
        if e.size > WHOLE_MAX && !to_memory {
            if !trusted {
                // Hashed in full before the head: a bad file is never even partly sent.
                hash_file(&mut file, e.size, &e.sha256, None)?;
                s.record_verified(&e, fp, None);
            }
            return Ok(Opened::File { file, fp });
        }
        let mut buf = Vec::with_capacity(e.size as usize);
        (&mut file).take(e.size + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 != e.size {
            return Err(ReadError::WrongSize { actual: buf.len() as u64, expected: e.size });
        }
        if trusted {
            // Unchanged while we read it? Then these bytes are the verified ones.
            if Fingerprint::of(&file.metadata()?) != fp {
                return Err(ReadError::Changed);
            }
        } else if Sha256::digest(&buf).as_slice() != e.sha256 {
            return Err(ReadError::DigestMismatch);
        }
        let body = Bytes::from(buf);
        if !trusted {
            s.record_verified(&e, fp, Some(body.clone()));
        }
        Ok(Opened::Whole(body))
    })
    .await
    .map_err(io::Error::other)??;
    match opened {
        Opened::Whole(b) => Ok(b),
        // Verified in this very state: sent from the file with sendfile, its fingerprint
        // checked again before every sendfile. A map shorter or longer than the entry means the
        // file changed since (a part is cut from it by the entry's length).
        Opened::File { file, fp } => {
            let mapped = crate::sendfile::map(file, fp, Box::new(reading))?;
            if mapped.len() as u64 != e_size {
                return Err(ReadError::Changed);
            }
            Ok(mapped)
        }
    }
}

/// Checks the content for answers that send no body (`HEAD`, `304`): hashes it unless the
/// file is in the state it was verified in.
pub async fn verify(store: &Arc<Store>, entry: Arc<Entry>) -> Result<(), ReadError> {
    let guard = store.reading(&entry.path);
    let s = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let (mut file, fp) = open_checked(&entry.path, entry.size)?;
        if trusted(&entry, &fp) {
            return Ok(());
        }
        hash_file(&mut file, entry.size, &entry.sha256, None)?;
        s.record_verified(&entry, fp, None);
        Ok(())
    })
    .await
    .map_err(io::Error::other)?;
    drop(guard);
    result
}

/// Hashes the whole content file and checks it, whatever was remembered (scrubs, tools).
pub fn verify_sync(entry: &Entry) -> Result<(), ReadError> {
    let (mut file, _) = open_checked(&entry.path, entry.size)?;
    hash_file(&mut file, entry.size, &entry.sha256, None)
}

/// Hashes `file`; with `pace`, sleeps after each piece so that hashing runs at that many bytes
/// per second (the scrubber: a smooth background load, never a burst).
fn hash_file(file: &mut File, size: u64, sha256: &[u8; 32], pace: Option<u64>) -> Result<(), ReadError> {
    let mut hasher = Sha256::new();
    // Sized to the file: a small entry does not pay for zeroing a large buffer.
    let mut buf = vec![0u8; CHUNK.min(size.max(1)) as usize];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
        if let Some(rate) = pace {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    if total != size {
        return Err(ReadError::WrongSize { actual: total, expected: size });
    }
    if hasher.finalize().as_slice() != sha256 {
        return Err(ReadError::DigestMismatch);
    }
    Ok(())
}

enum Opened {
    Whole(Bytes),
    File { file: File, fp: Fingerprint },
}

fn open_checked(path: &std::path::Path, size: u64) -> Result<(File, Fingerprint), ReadError> {
    let file = File::open(path).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => ReadError::Missing,
        _ => ReadError::Io(err),
    })?;
    let meta = file.metadata()?;
    if meta.len() != size {
        return Err(ReadError::WrongSize { actual: meta.len(), expected: size });
    }
    Ok((file, Fingerprint::of(&meta)))
}

/// Re-hashes every entry, pacing itself to `bytes_per_sec`, forever: catches corruption that
/// changes no file attribute. Bad entries are evicted (and refetched on their next request).
pub async fn scrub_loop(store: Arc<Store>, bytes_per_sec: u64, mut stopped: tokio::sync::watch::Receiver<bool>) {
    if bytes_per_sec == 0 {
        return;
    }
    loop {
        let pass_started = tokio::time::Instant::now();
        // A 256th of the store at a time (by the body's digest), so that a pass over a million
        // entries holds a few thousand of them in memory, not all; each entry's body, then
        // each of its variants: a file of its own, evicted alone.
        for shard in 0..=u8::MAX {
            for file in store.files_in_shard(shard) {
                let f = file.clone();
                let scrub = tokio::task::spawn_blocking(move || {
                    let (mut handle, _) = open_checked(&f.path, f.size)?;
                    hash_file(&mut handle, f.size, &f.sha256, Some(bytes_per_sec))
                });
                // Shutdown does not wait for a paced hash (it only reads).
                let result = tokio::select! {
                    r = scrub => r,
                    _ = stopped.changed() => return,
                };
                if let Ok(Err(err)) = result {
                    if !err.proves_bad_content() {
                        tracing::warn!(key = %file.key, error = %err, "scrub could not read an entry; kept, tried again next pass");
                        store.metrics().read_errors.inc();
                        continue;
                    }
                    if !matches!(err, ReadError::Missing) || store.is_current(&file) {
                        let coding = file.coding.map(|c| c.token());
                        tracing::warn!(key = %file.key, coding, reason = err.reason(), "scrub found a bad entry");
                        store.metrics().integrity_failures.with_label_values(&[err.reason()]).inc();
                        store.evict_file(&file, err.reason()).await;
                    }
                }
            }
        }
        // An empty store is looked at again soon: the first entry is scrubbed within a second.
        let min_pass = if store.is_empty() { Duration::from_secs(1) } else { SCRUB_MIN_PASS };
        // A small store would otherwise be re-hashed in a tight loop (each file costs an
        // open, a stat and a buffer besides its bytes): passes start at most this often.
        tokio::select! {
            _ = tokio::time::sleep_until(pass_started + min_pass) => {}
            _ = stopped.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReadError;
    use std::io;

    #[test]
    fn only_a_proven_mismatch_counts_as_bad_content() {
        for proven in [
            ReadError::Missing,
            ReadError::WrongSize { actual: 1, expected: 2 },
            ReadError::DigestMismatch,
            ReadError::Changed,
        ] {
            assert!(proven.proves_bad_content(), "{proven}");
        }
        for transient in [io::Error::from_raw_os_error(libc::EMFILE), io::Error::from_raw_os_error(libc::EIO)] {
            assert!(!ReadError::Io(transient).proves_bad_content());
        }
    }
}
