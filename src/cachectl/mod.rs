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
    /// The compressed variant that is bad (absent: the entry's own body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
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
        let total: u64 = loaded.entries.iter().map(|e| e.stored_bytes()).sum();
        let bar = if show_progress { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}").expect("static template"),
        );
        let mut bad = Vec::new();
        // Each entry's body, and each of its compressed variants as a file of its own.
        for e in loaded.entries.iter().flat_map(Entry::files) {
            bar.set_message(e.key.clone());
            if let Err(err) = read::verify_sync(e) {
                let encoding = e.coding.map(|c| c.token());
                bad.push(BadEntry {
                    key: e.key.clone(),
                    lote_id: e.lote_id.clone(),
                    encoding,
                    reason: err.to_string(),
                });
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
            // Entries with missing content were already dropped by opening the store (and
            // variants with missing files left out); a bad variant is dropped, its entry kept.
            let entry = store.get(&b.key);
            let coding = b.encoding.and_then(crate::cache::negotiate::Coding::from_token);
            let bad_one = match coding {
                Some(c) => entry.and_then(|e| e.variant_in(c).cloned()),
                None => entry,
            };
            if let Some(bad_one) = bad_one {
                store.evict(&bad_one, "cache verify").await;
            }
            removed += 1;
        }
    }
    Ok(VerifyReport {
        dir: dir.display().to_string(),
        checked: loaded.entries.iter().map(|e| 1 + e.variants.len()).sum(),
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
    store::Store::open_loaded(dir.to_path_buf(), 0, Arc::default()).await
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
    /// Bytes of live entries (their bodies).
    pub bytes: u64,
    /// Compressed variants of live entries, and their bytes.
    pub variants: usize,
    pub variant_bytes: u64,
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
    let live: std::collections::HashSet<PathBuf> =
        entries.iter().flat_map(|e| e.files().map(|f| f.path.clone())).collect();
    let variants = entries.iter().flat_map(|e| e.variants.iter());
    let mut s = Stats {
        dir: dir.display().to_string(),
        entries: entries.len(),
        bytes: entries.iter().map(|e| e.size).sum(),
        variants: variants.clone().count(),
        variant_bytes: variants.map(|v| v.size).sum(),
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
                Err(reason) => {
                    report.bad.push(BadEntry { key: e.key.clone(), lote_id: e.lote_id.clone(), encoding: None, reason })
                }
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

/// One file `cache import` did not import, and why.
#[derive(Debug, Serialize)]
pub struct NotImported {
    pub file: String,
    pub reason: String,
}

/// What `cache import` did with each file of the directory.
#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub dir: String,
    pub rule: String,
    /// The entry whose stored head (less `Date` and `Content-Disposition`) the imported ones
    /// got, as a fill would have stored it; None: no entry of the rule was filled yet, and they
    /// got `Content-Type: application/json` (plus `Vary: Cookie` on a rule with an access
    /// check, as the legacy backend answers).
    pub head_from: Option<String>,
    /// Keys stored.
    pub imported: Vec<String>,
    /// Files left alone: not named like a key of the rule, or already stored.
    pub skipped: Vec<NotImported>,
    /// Files that are batches of the rule but could not be stored: an id outside the rule's
    /// pattern, a document failing its validation, a read or store error.
    pub failed: Vec<NotImported>,
}

/// Imports the saved documents in `from` (the owner's `<lote_id>_resultados.json`, or whatever
/// the rule's key template names) into the store at `dir`, as `rule`'s entries: each file whose
/// name is a key of the rule is read once, validated with the rule's checks for the id its name
/// gives while it is written, and committed with the head a fill of the rule stored (see
/// [`ImportReport::head_from`]) and `Content-Disposition` naming the file. Takes the store's
/// lock, so a running server's store
/// is refused. Re-running it stores nothing twice: a key already holding the same bytes is
/// skipped, and one holding other bytes is left as it is (purge it to replace it). The store
/// keeps to `max_size` and `min_free` (0: none) and the rule's `max_object_size` as a serving
/// one does; a file evicted by a later one of the same run is reported as failed.
pub async fn import(
    dir: &Path,
    (max_size, min_free): (u64, u64),
    from: &Path,
    rule: &crate::rules::RuleConfig,
    show_progress: bool,
) -> Result<ImportReport, store::StoreError> {
    // A check that proves the document is this id's: required, equal to the id, and at one
    // place (a `*` pointer is met by an empty array).
    let ties = |a: &crate::cache::validate::Assertion| {
        !a.optional
            && !a.pointer.split('/').any(|s| s == "*")
            && matches!(&a.check, crate::cache::validate::Check::Equals(t) if t == "{lote_id}")
    };
    if !rule.validation.asserts.iter().any(ties) {
        return Err(io_err(format!(
            "rule {} has no assertion tying a document to its id (a required `equals = \"{{lote_id}}\"` check at one pointer, as the shipped config's /metadata/lote_id); import needs one to know each file is the batch its name says",
            rule.name
        )));
    }
    let store = store::Store::open_loaded(dir.to_path_buf(), max_size, Arc::default()).await?;
    store.set_min_free(min_free);
    let template = head_template(&store, rule);
    let mut files: Vec<(String, bool)> = std::fs::read_dir(from)
        .map_err(|e| io_err(format!("cannot read {}: {e}", from.display())))?
        .filter_map(|entry| entry.ok())
        .map(|entry| (entry.file_name().to_string_lossy().into_owned(), entry.file_type().is_ok_and(|t| t.is_file())))
        .collect();
    files.sort();
    let bar = progress_bar(files.len() as u64, show_progress);
    let mut report = ImportReport {
        dir: from.display().to_string(),
        rule: rule.name.clone(),
        head_from: template.as_ref().map(|(key, _)| key.clone()),
        ..ImportReport::default()
    };
    let head = template.map(|(_, head)| head).unwrap_or_else(|| minimal_head(rule));
    use futures_util::StreamExt;
    // Files named like a key of the rule are imported several at once: each one's time is
    // mostly waiting for fsyncs, which a disk overlaps.
    let mut todo = Vec::new();
    for (name, regular) in files {
        let not = |reason: String| NotImported { file: name.clone(), reason };
        let id = name.strip_prefix(rule.key_prefix.as_str()).and_then(|r| r.strip_suffix(rule.key_suffix.as_str()));
        match id {
            _ if !regular => report.skipped.push(not("not a regular file (a directory, link or device)".into())),
            None | Some("") => report.skipped.push(not(format!("not named like a key of rule {}", rule.name))),
            Some(id) if id == "." || id == ".." || !rule.id_pattern.is_match(id) => {
                report.failed.push(not(format!("the id {id:?} does not match the rule's id_pattern")))
            }
            Some(id) => {
                let id = id.to_string();
                todo.push((name, id));
                continue;
            }
        }
        bar.inc(1);
    }
    let (store_ref, head_ref) = (&store, &head);
    let mut results = futures_util::stream::iter(todo)
        .map(|(name, id)| async move {
            let result = import_one(store_ref, rule, head_ref, &from.join(&name), &name, &id).await;
            (name, result)
        })
        .buffer_unordered(IMPORT_AT_ONCE);
    while let Some((name, result)) = results.next().await {
        bar.set_message(name.clone());
        let not = |reason: String| NotImported { file: name.clone(), reason };
        match result {
            Ok(Imported::Stored) => report.imported.push(name.clone()),
            Ok(Imported::AlreadyStored) => report.skipped.push(not("already stored, the same bytes".into())),
            Ok(Imported::OtherStored) => {
                report.skipped.push(not("another document is stored under this key (purge it to replace it)".into()))
            }
            Err(reason) => report.failed.push(not(reason)),
        }
        bar.inc(1);
    }
    drop(results);
    report.imported.sort();
    report.skipped.sort_by(|a, b| a.file.cmp(&b.file));
    report.failed.sort_by(|a, b| a.file.cmp(&b.file));
    bar.finish_and_clear();
    // Keeping to max_size may have evicted what this run stored earlier: say so.
    let (kept, evicted): (Vec<String>, Vec<String>) =
        report.imported.drain(..).partition(|key| store.holds(&rule.name, key));
    report.imported = kept;
    report.failed.extend(evicted.into_iter().map(|file| NotImported {
        file,
        reason: "stored, then evicted by a later file of this import to keep cache.max_size".into(),
    }));
    Ok(report)
}

/// Files `cache import` reads and stores at once.
const IMPORT_AT_ONCE: usize = 8;

/// The stored head of the newest entry of `rule` a fill stored (gen_ms > 0), less what is
/// per-answer (`Date`, `Content-Disposition`), with its key.
fn head_template(store: &Arc<store::Store>, rule: &crate::rules::RuleConfig) -> Option<(String, http::HeaderMap)> {
    let mut newest: Option<(u64, String)> = None;
    store.for_each(|key, _, s| {
        if *s.rule == rule.name && s.gen_ms > 0 && newest.as_ref().is_none_or(|(at, _)| s.stored_at_ms > *at) {
            newest = Some((s.stored_at_ms, key.to_string()));
        }
    });
    let newest = store.get(&newest?.1)?;
    let mut head = crate::cache::entry::stored_head(&newest.headers);
    head.remove(http::header::DATE);
    head.remove(http::header::CONTENT_DISPOSITION);
    Some((newest.key.clone(), head))
}

/// The head of an imported document when no fill of the rule shows the origin's: what the
/// legacy backend sends for one.
fn minimal_head(rule: &crate::rules::RuleConfig) -> http::HeaderMap {
    let mut head = http::HeaderMap::new();
    head.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    if matches!(rule.access, crate::cache::target::AccessPolicy::Auth { .. }) {
        head.insert(http::header::VARY, http::HeaderValue::from_static("Cookie"));
    }
    head
}

enum Imported {
    Stored,
    AlreadyStored,
    OtherStored,
}

async fn import_one(
    store: &Arc<store::Store>,
    rule: &crate::rules::RuleConfig,
    head: &http::HeaderMap,
    path: &Path,
    key: &str,
    id: &str,
) -> Result<Imported, String> {
    use tokio::io::AsyncReadExt as _;
    // Not following a link, not blocking on a FIFO swapped in since the listing: then only a
    // regular file is read.
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .await
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().await.map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let len = meta.len();
    let limit = match (store.max_size(), rule.max_object_size) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(limit) = limit.filter(|&limit| len > limit) {
        return Err(format!("{len} bytes: larger than the rule's max_object_size or cache.max_size ({limit} bytes)"));
    }
    if !store.has_room_for(Some(len)) {
        return Err("the cache's file system is below cache.min_free".into());
    }
    let existing = store.get(key);
    if let Some(e) = &existing {
        if e.rule != rule.name {
            return Err(format!("the key is stored already by rule {}", e.rule));
        }
    }
    let mut validator = crate::cache::validate::StreamingValidator::new(rule.validation.clone(), id.to_string());
    // Written only when the key is free; otherwise only hashed, to compare with what is stored.
    let mut writer = match existing {
        None => Some(store.begin().await.map_err(|e| format!("cannot open a store write: {e}"))?),
        Some(_) => None,
    };
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).await.map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            break;
        }
        validator.feed(&buf[..n]);
        hasher.update(&buf[..n]);
        if let Some(w) = writer.as_mut() {
            w.write(&buf[..n]).await.map_err(|e| format!("store write failed: {e}"))?;
        }
    }
    if let crate::cache::validate::Verdict::Invalid { reason, .. } = validator.finish() {
        return Err(format!("fails the rule's validation: {reason}"));
    }
    let Some(writer) = writer else {
        let same = existing.is_some_and(|e| e.sha256[..] == hasher.finalize()[..]);
        return Ok(if same { Imported::AlreadyStored } else { Imported::OtherStored });
    };
    let mut head = head.clone();
    let disposition = http::HeaderValue::from_str(&format!("attachment; filename={key}"))
        .map_err(|_| "the file name cannot be a Content-Disposition value".to_string())?;
    head.insert(http::header::CONTENT_DISPOSITION, disposition);
    let meta = crate::cache::entry::EntryMeta::new(&rule.name, id, http::StatusCode::OK, &head, 0);
    let expect = store::Expect { len: Some(len), ..store::Expect::default() };
    writer.commit(store, key, meta, expect).await.map_err(|e| format!("store commit failed: {e}"))?;
    Ok(Imported::Stored)
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

/// What `cache warm --admin` did: the admin API's answer for each id and rule, counted.
#[derive(Debug, Default, Serialize)]
pub struct AdminWarmReport {
    pub requested: usize,
    /// How many (id, rule) pairs came to each result (`started`, `in-flight`, `stored`, …).
    pub results: std::collections::BTreeMap<String, usize>,
    /// Those not started nor done (`busy`, `refused`), with the reason, and failed requests.
    pub failed: Vec<String>,
}

/// Asks the admin API at `admin` (`POST /warm`, with `token`) to warm each id, 1000 per
/// request: the fills run in the server, with its service headers, none through this client.
pub async fn warm_via_admin(ids: Vec<String>, admin: &str, token: &str) -> AdminWarmReport {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let url = format!("{}/warm", admin.trim_end_matches('/'));
    let mut report = AdminWarmReport { requested: ids.len(), ..Default::default() };
    for chunk in ids.chunks(1000) {
        let answer = async {
            let body = serde_json::json!({ "lote_ids": chunk }).to_string();
            let req = hyper::Request::post(&url)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .map_err(|e| format!("bad admin URL {url}: {e}"))?;
            let resp = client.request(req).await.map_err(|e| format!("{url}: {e}"))?;
            let status = resp.status();
            let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| e.to_string())?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not JSON ({e})"))?;
            if status != http::StatusCode::ACCEPTED {
                return Err(format!("{url} answered {status}: {}", v["detail"].as_str().unwrap_or("")));
            }
            Ok(v)
        }
        .await;
        match answer {
            Ok(v) => {
                for w in v["warmed"].as_array().into_iter().flatten() {
                    let result = w["result"].as_str().unwrap_or("?").to_string();
                    if matches!(result.as_str(), "busy" | "refused") {
                        let (id, rule, detail) = (&w["lote_id"], &w["rule"], w["detail"].as_str().unwrap_or(""));
                        report.failed.push(format!(
                            "{} ({}): {result}: {detail}",
                            id.as_str().unwrap_or(""),
                            rule.as_str().unwrap_or("")
                        ));
                    }
                    *report.results.entry(result).or_default() += 1;
                }
            }
            Err(e) => report.failed.extend(chunk.iter().map(|id| format!("{id}: {e}"))),
        }
    }
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
