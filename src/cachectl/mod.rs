//! Offline operations on a cache directory, for the `lotecache cache …` commands. Reads are
//! verified like the server's: a tool never exports an entry it has not hashed. Commands
//! that change the store take its lock (the server must be stopped; its admin API does the
//! same while it runs); the others only read.

pub mod cli;

use crate::cache::{entry::Entry, read, store};
use serde::Serialize;
use sha2::Digest;
use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

/// One entry that failed verification.
#[derive(Debug, Serialize)]
pub struct BadEntry {
    pub key: String,
    pub lote_id: String,
    pub reason: String,
}

/// What `cache verify` found.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub dir: String,
    pub checked: usize,
    pub bytes: u64,
    /// Index lines that could not be read.
    pub unreadable: usize,
    pub bad: Vec<BadEntry>,
    /// Bad entries removed (with `--remove`).
    pub removed: usize,
}

impl VerifyReport {
    pub fn all_good(&self) -> bool {
        self.bad.is_empty()
    }
}

/// Re-hashes every entry of the store at `dir`. Read-only unless `remove`, which takes the
/// directory's lock (so the server must be stopped) and evicts each bad entry.
pub async fn verify(dir: &Path, remove: bool, show_progress: bool) -> Result<VerifyReport, store::StoreError> {
    let owned = dir.to_path_buf();
    let (loaded, bad, bytes) = tokio::task::spawn_blocking(move || {
        let loaded = store::load_entries(&owned);
        let total: u64 = loaded.entries.iter().map(|e| e.size).sum();
        let bar = if show_progress { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}").expect("static template"),
        );
        let mut bad = Vec::new();
        for e in &loaded.entries {
            bar.set_message(e.key.clone());
            if let Err(err) = read::verify_sync(e) {
                bad.push(BadEntry { key: e.key.clone(), lote_id: e.lote_id.clone(), reason: err.to_string() });
            }
            bar.inc(e.size);
        }
        bar.finish_and_clear();
        (loaded, bad, total)
    })
    .await
    .map_err(|e| store::StoreError::Io(std::io::Error::other(e)))?;

    let mut removed = 0;
    if remove && !bad.is_empty() {
        let store = open_locked(dir).await?;
        for b in &bad {
            // Entries with missing content were already dropped by opening the store.
            if let Some(entry) = store.get(&b.key) {
                store.evict(&entry, "cache verify").await;
            }
            removed += 1;
        }
    }
    Ok(VerifyReport {
        dir: dir.display().to_string(),
        checked: loaded.entries.len(),
        bytes,
        unreadable: loaded.skipped,
        bad,
        removed,
    })
}

fn io_err(e: impl std::fmt::Display) -> store::StoreError {
    store::StoreError::Io(std::io::Error::other(e.to_string()))
}

/// Opens the store for a change: takes its lock, so this fails while a server runs.
async fn open_locked(dir: &Path) -> Result<Arc<store::Store>, store::StoreError> {
    store::Store::open(dir.to_path_buf(), 0, Arc::default()).await
}

fn progress_bar(total: u64, show: bool) -> indicatif::ProgressBar {
    let bar = if show { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("static template"));
    bar
}

/// Every live entry (read-only).
pub fn ls(dir: &Path) -> Vec<Entry> {
    store::load_entries(dir).entries
}

/// What a cache directory holds.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub dir: String,
    pub entries: usize,
    /// Bytes of live entries.
    pub bytes: u64,
    pub content_files: usize,
    pub content_bytes: u64,
    /// Content no live entry references (what `cache gc` would remove).
    pub unreferenced_files: usize,
    pub unreferenced_bytes: u64,
    /// Temp files of interrupted writes (swept at the next start).
    pub tmp_files: usize,
}

/// Counts entries and files (read-only).
pub fn stats(dir: &Path) -> Stats {
    let entries = ls(dir);
    let live: std::collections::HashSet<PathBuf> = entries.iter().map(|e| e.path.clone()).collect();
    let mut s = Stats {
        dir: dir.display().to_string(),
        entries: entries.len(),
        bytes: entries.iter().map(|e| e.size).sum(),
        content_files: 0,
        content_bytes: 0,
        unreferenced_files: 0,
        unreferenced_bytes: 0,
        tmp_files: std::fs::read_dir(dir.join("tmp")).map(|d| d.count()).unwrap_or(0),
    };
    let mut stack = vec![dir.join("content-v2")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            s.content_files += 1;
            s.content_bytes += len;
            if !live.contains(&path) {
                s.unreferenced_files += 1;
                s.unreferenced_bytes += len;
            }
        }
    }
    s
}

/// Removes entries (takes the lock).
pub async fn purge(dir: &Path, which: store::Purge) -> Result<Vec<String>, store::StoreError> {
    open_locked(dir).await?.purge(which).await
}

/// Collects unreferenced content and compacts the index (takes the lock; with no writer
/// possible, no grace period is needed).
pub async fn gc(dir: &Path) -> Result<store::GcReport, store::StoreError> {
    let store = open_locked(dir).await?;
    store.set_gc_grace(std::time::Duration::ZERO);
    store.gc().await
}

/// What `cache export` did.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub dir: String,
    pub exported: Vec<String>,
    pub bad: Vec<BadEntry>,
}

/// The file name an entry is exported under: its key (by default the owner's
/// `<lote_id>_resultados.json`) when that is a plain file name; otherwise the key with
/// anything a file name cannot hold replaced, plus a digest of the key, so two keys never
/// share a file (`a/b` and `a_b` would otherwise both be `a_b`).
pub fn export_name(key: &str) -> String {
    let clean: String =
        key.chars().map(|c| if c == '/' || c == '\\' || c == '\0' || c.is_control() { '_' } else { c }).collect();
    if clean == key && !matches!(key, "" | "." | "..") && !key.starts_with('.') && !key.contains('~') {
        return clean;
    }
    use sha2::Digest as _;
    let digest = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..6]);
    format!("{}~{digest}", clean.trim_start_matches('.'))
}

/// Writes each entry as `<key>` in `out`: copied while hashing into a temp file, checked
/// against the digest, fsynced, then renamed into place. A bad entry is reported and not
/// written; an existing file is replaced only by a verified one.
pub async fn export(dir: &Path, out: &Path, show_progress: bool) -> Result<ExportReport, store::StoreError> {
    let (dir, out) = (dir.to_path_buf(), out.to_path_buf());
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&out)?;
        let entries = ls(&dir);
        let bar = progress_bar(entries.len() as u64, show_progress);
        let mut report = ExportReport { dir: out.display().to_string(), exported: Vec::new(), bad: Vec::new() };
        for e in &entries {
            let name = export_name(&e.key);
            bar.set_message(name.clone());
            match export_one(e, &out, &name) {
                Ok(()) => report.exported.push(name),
                Err(reason) => report.bad.push(BadEntry { key: e.key.clone(), lote_id: e.lote_id.clone(), reason }),
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Ok(d) = std::fs::File::open(&out) {
            let _ = d.sync_all();
        }
        Ok(report)
    })
    .await
    .map_err(io_err)?
}

fn export_one(e: &Entry, out: &Path, name: &str) -> Result<(), String> {
    let tmp = out.join(format!(".{name}.partial"));
    let result = (|| {
        let mut src = std::fs::File::open(&e.path).map_err(|err| format!("cannot open content: {err}"))?;
        let mut dst = std::fs::File::create(&tmp).map_err(|err| format!("cannot write {}: {err}", tmp.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(|err| format!("read failed: {err}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(|err| format!("write failed: {err}"))?;
            total += n as u64;
        }
        if total != e.size || hasher.finalize().as_slice() != e.sha256 {
            return Err("content digest mismatch".to_string());
        }
        dst.sync_all().map_err(|err| format!("fsync failed: {err}"))?;
        std::fs::rename(&tmp, out.join(name)).map_err(|err| format!("rename failed: {err}"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What `cache warm` did, by outcome.
#[derive(Debug, Default, Serialize)]
pub struct WarmReport {
    pub requested: usize,
    pub hit: usize,
    pub stored: usize,
    /// Answered but not stored (the detail says why in the proxy's logs and metrics).
    pub not_stored: usize,
    pub failed: Vec<String>,
}

/// Requests each id through the proxy at `via` (path from `template`, `{lote_id}` replaced),
/// at most `concurrency` at a time, reading each body to the end.
pub async fn warm(ids: Vec<String>, via: &str, template: &str, concurrency: usize, show_progress: bool) -> WarmReport {
    use futures_util::StreamExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let bar = progress_bar(ids.len() as u64, show_progress);
    let base = via.trim_end_matches('/').to_string();
    let mut report = WarmReport { requested: ids.len(), ..Default::default() };
    let results = futures_util::stream::iter(ids)
        .map(|id| {
            let url = format!("{base}{}", template.replace("{lote_id}", &id));
            let client = client.clone();
            async move {
                let outcome = async {
                    let resp = client
                        .get(url.parse().map_err(|e| format!("bad URL {url}: {e}"))?)
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = resp.status();
                    let cs = resp.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("status {status}"));
                    }
                    // A miss's head goes out before its commit: whether it was stored is
                    // asked of the store alone (only-if-cached never starts a fetch).
                    if !cs.contains("; hit") && !cs.contains("detail=") && !cs.ends_with("; stored") {
                        let check = hyper::Request::head(&url)
                            .header("cache-control", "only-if-cached")
                            .body(http_body_util::Empty::new())
                            .map_err(|e| e.to_string())?;
                        let stored = client.request(check).await.is_ok_and(|r| r.status().is_success());
                        return Ok(if stored { "stored".to_string() } else { "not-stored".to_string() });
                    }
                    Ok(cs)
                }
                .await;
                (id, outcome)
            }
        })
        .buffer_unordered(concurrency.max(1));
    futures_util::pin_mut!(results);
    while let Some((id, outcome)) = results.next().await {
        match outcome {
            Ok(cs) if cs.contains("; hit") => report.hit += 1,
            Ok(cs) if cs.ends_with("stored") && !cs.ends_with("not-stored") => report.stored += 1,
            Ok(_) => report.not_stored += 1,
            Err(e) => report.failed.push(format!("{id}: {e}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    report
}

#[cfg(test)]
mod tests {
    use super::export_name;

    #[test]
    fn two_keys_never_export_to_one_file_name() {
        assert_eq!(export_name("L-1_resultados.json"), "L-1_resultados.json");
        let names = ["a/b", "a_b", "a\\b", "a\nb", "..", ".", ".hidden", "x~1"].map(export_name);
        for (i, a) in names.iter().enumerate() {
            assert!(!a.contains('/') && !a.starts_with('.') && !a.is_empty(), "{a:?}");
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
