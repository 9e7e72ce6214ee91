//! Offline operations on a cache directory, for the `lotecache cache …` commands. Reads are
//! verified like the server's: a tool never reports or exports an entry it has not hashed.

use crate::cache::{read, store};
use serde::Serialize;
use std::path::Path;

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
        let store = store::Store::open(dir.to_path_buf()).await?;
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
