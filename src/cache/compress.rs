//! Precompressed variants: after an entry is committed (and again when a request finds a
//! variant its rule wants missing), its verified identity body is compressed off the request
//! path, on a small bounded pool, into one content file per coding. A variant is kept only
//! if it is smaller than the body by the rule's margin and only after it proved itself: its
//! file, read back from disk, hashes to its own sha256 and decodes to exactly the entry's
//! body (length and sha256). Then a new index line names it beside the body (see
//! [`Store::add_variants_sync`]); from there on it is served, and verified on every read,
//! exactly like the body (see `cache::read`).
//!
//! Nothing here is on a request's path: a request that finds no variant is served identity
//! while the variant is built. A job that cannot run (the queue is full) forgets its
//! attempt, so a later request asks again.

use super::entry::Entry;
use super::negotiate::{Coding, CompressionConfig};
use super::store::{content_path, Store};
use sha2::{Digest, Sha256};
use ssri::{Algorithm, Integrity};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Jobs waiting or running at most; more are dropped (and asked for again by a later request).
const QUEUE_MAX: usize = 256;
/// Read size of the body.
const CHUNK: usize = 256 * 1024;
/// Bodies smaller than this get no variants. Sent whole, they fit in the first flight of a new
/// connection (an initial window of 10 segments carries about 14 KB): compressing them saves
/// no round trip, and would cost two more files and disk blocks for every such batch.
pub const MIN_BODY: u64 = 12 * 1024;

/// The compression pool of one store.
pub struct Compressor {
    store: Arc<Store>,
    /// Compressions running at once: half the cores (at least one), so hits keep the rest.
    slots: Arc<tokio::sync::Semaphore>,
    queued: AtomicUsize,
    /// Set at shutdown: queued jobs do not start, running ones stop at their next chunk.
    stopping: AtomicBool,
}

/// One queued or running job, counted until it drops (also when its task is dropped with
/// its runtime).
struct Queued(Arc<Compressor>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Relaxed);
    }
}

impl Compressor {
    pub fn new(store: Arc<Store>) -> Arc<Compressor> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Compressor {
            store,
            slots: Arc::new(tokio::sync::Semaphore::new((cores / 2).max(1))),
            queued: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        })
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// Stops the pool: nothing new starts, and a running job stops at its next step (a chunk
    /// read, a variant's commit, its check, the index line), its temp files removed. Waits up
    /// to 10 s for them to end, so that the store (and its lock) is free.
    pub async fn stop(&self) {
        self.stopping.store(true, Relaxed);
        for _ in 0..1000 {
            if self.queued.load(Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::warn!(jobs = self.queued.load(Relaxed), "compression jobs still running at shutdown");
    }

    /// Builds, in the background, the variants `config` wants that `entry` lacks and was not
    /// tried for. Never for a variant, a body under [`MIN_BODY`], a non-200 entry, one whose
    /// origin said `Cache-Control: no-transform`, or while the disk is below `cache.min_free`
    /// (a later request asks again).
    pub fn submit(self: &Arc<Self>, entry: &Arc<Entry>, config: &CompressionConfig) {
        if config.is_off()
            || entry.size < MIN_BODY
            || entry.coding.is_some()
            || entry.status != http::StatusCode::OK
            || self.stopping.load(Relaxed)
            || entry.no_transform()
            || entry.compress_tried().load(Relaxed) & config.bits() == config.bits()
            || !self.store.has_room_for(Some(entry.size))
        {
            return;
        }
        let want = config.bits();
        let todo = want & !entry.compress_tried().fetch_or(want, Relaxed);
        if todo == 0 {
            return;
        }
        let metrics = self.store.metrics().clone();
        let queued = Queued(self.clone());
        if self.queued.fetch_add(1, Relaxed) >= QUEUE_MAX {
            drop(queued);
            entry.compress_tried().fetch_and(!todo, Relaxed);
            metrics.variants_not_kept.with_label_values(&["queue-full"]).inc();
            return;
        }
        let codings: Vec<(Coding, u32)> = config.codings.iter().copied().filter(|(c, _)| todo & c.bit() != 0).collect();
        let min_saving = config.min_saving_percent;
        let (this, entry) = (self.clone(), entry.clone());
        tokio::spawn(async move {
            let permit = this.slots.clone().acquire_owned().await;
            let (store, job_entry, job_this) = (this.store.clone(), entry.clone(), this.clone());
            let done = tokio::task::spawn_blocking(move || {
                let _queued = queued;
                // An entry replaced or purged while it waited is not worth compressing.
                if !store.is_current_commit(&job_entry.key, job_entry.commit) || job_this.stopping.load(Relaxed) {
                    return Ok(Vec::new());
                }
                build(&store, &job_entry, &codings, min_saving, &job_this.stopping)
            })
            .await;
            drop(permit);
            match done {
                Ok(Ok(_)) => {}
                Ok(Err(JobError::BadBody(reason))) => {
                    tracing::warn!(key = %entry.key, reason, "stored body failed verification while being compressed");
                    metrics.integrity_failures.with_label_values(&[reason]).inc();
                    this.store.evict(&entry, reason).await;
                }
                Ok(Err(JobError::Failed(e))) => {
                    tracing::warn!(key = %entry.key, error = %e, "compression failed; the entry is served uncompressed");
                    metrics.variants_not_kept.with_label_values(&["failed"]).inc();
                }
                Err(e) => {
                    tracing::error!(key = %entry.key, error = %e, "compression task failed");
                    metrics.variants_not_kept.with_label_values(&["failed"]).inc();
                }
            }
        });
    }
}

/// What a fill compresses once it committed its entry: the rule's codings, on this pool.
#[derive(Clone)]
pub struct AfterCommit {
    pub compressor: Arc<Compressor>,
    pub config: Arc<CompressionConfig>,
}

impl AfterCommit {
    pub fn submit(&self, entry: &Arc<Entry>) {
        self.compressor.submit(entry, &self.config);
    }
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    /// The body on disk is not the entry's: it is evicted (and refetched on demand).
    #[error("{0}")]
    BadBody(&'static str),
    #[error("{0}")]
    Failed(String),
}

impl From<io::Error> for JobError {
    fn from(e: io::Error) -> Self {
        JobError::Failed(e.to_string())
    }
}

/// A writer that hashes and counts what passes through, and remembers a write error (the
/// brotli encoder's `into_inner` swallows them).
struct Counted<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
    failed: bool,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf).inspect_err(|_| self.failed = true)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

type ContentWriter = Counted<io::BufWriter<cacache::SyncWriter>>;

enum Encoder {
    Br(Box<brotli::CompressorWriter<ContentWriter>>),
    Gzip(Box<flate2::write::GzEncoder<ContentWriter>>),
}

impl Encoder {
    fn new(coding: Coding, level: u32, out: ContentWriter) -> Encoder {
        match coding {
            // A 4 MiB window (lgwin 22): the brotli default, decodable by every browser.
            Coding::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(out, 64 * 1024, level, 22))),
            Coding::Gzip => {
                Encoder::Gzip(Box::new(flate2::write::GzEncoder::new(out, flate2::Compression::new(level))))
            }
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Encoder::Br(w) => w.write_all(data),
            Encoder::Gzip(w) => w.write_all(data),
        }
    }

    fn finish(self) -> io::Result<ContentWriter> {
        let mut out = match self {
            Encoder::Br(w) => w.into_inner(),
            Encoder::Gzip(w) => w.finish()?,
        };
        out.flush()?;
        if out.failed {
            return Err(io::Error::other("writing the compressed file failed"));
        }
        Ok(out)
    }
}

/// Compresses `entry`'s body into each of `codings` in one read of its file, checks each
/// result, and adds the ones worth keeping to the entry. Blocking.
fn build(
    store: &Arc<Store>,
    entry: &Arc<Entry>,
    codings: &[(Coding, u32)],
    min_saving: u8,
    stopping: &AtomicBool,
) -> Result<Vec<Coding>, JobError> {
    let metrics = store.metrics().clone();
    let stopped = || match stopping.load(Relaxed) {
        true => Err(JobError::Failed("stopped at shutdown".into())),
        false => Ok(()),
    };
    // Never blocks on what is not a regular file (a FIFO put in its place).
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&entry.path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(JobError::BadBody("content-missing")),
        Err(e) => return Err(e.into()),
    };
    if !file.metadata()?.is_file() {
        return Err(JobError::Failed("the content file is not a regular file".into()));
    }
    let mut encoders = Vec::with_capacity(codings.len());
    for &(coding, level) in codings {
        let writer = cacache::WriteOpts::new()
            .algorithm(Algorithm::Sha256)
            .open_hash_sync(store.dir())
            .map_err(|e| JobError::Failed(e.to_string()))?;
        let out = Counted { inner: io::BufWriter::new(writer), hasher: Sha256::new(), written: 0, failed: false };
        encoders.push((coding, Encoder::new(coding, level, out)));
    }
    let mut body_hash = Sha256::new();
    let mut read = 0u64;
    let mut buf = vec![0u8; CHUNK.min(entry.size.max(1) as usize)];
    loop {
        stopped()?;
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        body_hash.update(&buf[..n]);
        for (_, enc) in &mut encoders {
            enc.write_all(&buf[..n])?;
        }
    }
    if read != entry.size {
        return Err(JobError::BadBody("content-size"));
    }
    if body_hash.finalize().as_slice() != entry.sha256 {
        return Err(JobError::BadBody("digest-mismatch"));
    }
    let mut built = Vec::new();
    let mut guards = Vec::new();
    for (coding, enc) in encoders {
        stopped()?;
        let out = enc.finish()?;
        let size = out.written;
        // Kept only when at least `min_saving` percent smaller than the body.
        if size as u128 * 100 > entry.size as u128 * (100 - min_saving.min(100) as u128) {
            tracing::debug!(key = %entry.key, coding = coding.token(), size, body = entry.size, "variant not smaller enough; not kept");
            metrics.variants_not_kept.with_label_values(&["not-smaller"]).inc();
            continue; // the temp file goes with the writer
        }
        let digest: [u8; 32] = out.hasher.finalize().into();
        let known = Integrity::from_hex(hex::encode(digest), Algorithm::Sha256)
            .map_err(|e| JobError::Failed(format!("digest: {e}")))?;
        let path = content_path(store.dir(), &known);
        guards.push(store.reading(&path));
        let writer = out.inner.into_inner().map_err(|e| JobError::Failed(e.to_string()))?;
        if !store.has_room_for(Some(size)) {
            metrics.variants_not_kept.with_label_values(&["no-room"]).inc();
            continue;
        }
        if store.holds_content(&path, &digest, size) {
            // Identical bytes are on disk and verified (another entry's, or this one's from
            // before a restart): not renamed over, as that would cut their downloads.
            drop(writer);
        } else {
            let integrity = writer.commit().map_err(|e| JobError::Failed(e.to_string()))?;
            if integrity.to_hex().1 != known.to_hex().1 {
                return Err(JobError::Failed("the committed variant's digest differs from the one written".into()));
            }
        }
        store.sync_content(&path)?;
        if let Err(reason) = decodes_to(&path, coding, &digest, entry) {
            tracing::error!(key = %entry.key, coding = coding.token(), reason, "a compressed variant did not read back as the body; not kept");
            metrics.variants_not_kept.with_label_values(&["failed"]).inc();
            continue;
        }
        built.push((coding, known, size));
    }
    if built.is_empty() {
        return Ok(Vec::new());
    }
    stopped()?;
    let codings: Vec<Coding> = built.iter().map(|(c, ..)| *c).collect();
    match store.add_variants_sync(entry, &built) {
        Ok(true) => {
            for (coding, _, size) in &built {
                metrics.variants_built.with_label_values(&[coding.token()]).inc();
                tracing::info!(key = %entry.key, coding = coding.token(), size, body = entry.size, "variant stored");
            }
            Ok(codings)
        }
        Ok(false) => {
            // Replaced, purged, or no room under max_size: the files are left to the collector.
            metrics.variants_not_kept.with_label_values(&["over-max-size-or-replaced"]).inc();
            Ok(Vec::new())
        }
        Err(e) => Err(JobError::Failed(e.to_string())),
    }
}

/// Reads the variant file at `path` back: its bytes must hash to `digest`, and decode to the
/// entry's body (length and sha256).
fn decodes_to(path: &std::path::Path, coding: Coding, digest: &[u8; 32], entry: &Entry) -> Result<(), &'static str> {
    struct Hashing<R> {
        inner: R,
        hasher: Sha256,
    }
    impl<R: Read> Read for Hashing<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            Ok(n)
        }
    }
    let file = std::fs::File::open(path).map_err(|_| "variant-missing")?;
    let mut raw = Hashing { inner: io::BufReader::with_capacity(CHUNK, file), hasher: Sha256::new() };
    let mut decoded = Sha256::new();
    // Reads the decoder to its end (or just past the body's length), hashing what it yields.
    let mut drain = |r: &mut dyn Read| -> io::Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        while total <= entry.size {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            decoded.update(&buf[..n]);
            total += n as u64;
        }
        Ok(total)
    };
    let len = match coding {
        Coding::Br => drain(&mut brotli::Decompressor::new(&mut raw, 64 * 1024)),
        Coding::Gzip => drain(&mut flate2::read::GzDecoder::new(&mut raw)),
    }
    .map_err(|_| "variant-undecodable")?;
    // Whatever the decoder left unread still belongs to the file.
    io::copy(&mut raw, &mut io::sink()).map_err(|_| "variant-read")?;
    if raw.hasher.finalize().as_slice() != digest {
        return Err("variant-digest");
    }
    if len != entry.size || decoded.finalize().as_slice() != entry.sha256 {
        return Err("variant-decodes-wrong");
    }
    Ok(())
}
