//! The shared store: a second tier on an S3-compatible object store (AWS S3, MinIO, Ceph
//! RGW, Garage), read on a local miss and written through after a local commit, so that
//! several replicas generate each batch once and survive the loss of any one of them.
//!
//! Layout under `s3://BUCKET/PREFIX/`:
//! - `_lotecache/blobs/sha256/<hex>`: each body once, named by its digest. A blob that
//!   exists intact is never rewritten, so reads do not race overwrites of the same name
//!   (Garage can cut such a read short), and engines that ignore conditional PUTs need no
//!   first-writer-wins; only a blob found damaged (wrong size, or an ETag that is not the
//!   body's: the MD5 of a single PUT, or the MD5 of the parts' MD5s of a multipart upload in
//!   parts of `PART_SIZE`) is replaced, and a read cut short is never served.
//! - `_lotecache/entries/<sha256 of key>.json`: the record (pointer) of a key, written last,
//!   so a record never names a blob that is not complete.
//! - `<key>` (by default `<lote_id>_resultados.json`): the document under the owner's naming
//!   convention, with its digest in the object metadata (`x-amz-meta-sha256`), for other tools.
//!   lotecache never reads it.
//!
//! Every read is verified by the receiving tier against the record's length and sha256. A
//! blob whose digest fails is deleted with its record (the next fill rewrites both). Every operation
//! has a deadline and is tried on each configured endpoint in turn; a failure is counted,
//! logged, and answered by the caller with the local tier or the origin, never with an error.

use super::tier::{Chunks, Record, Tier, TierError, RECORD_VERSION};

use crate::metrics::Metrics;
use bytes::Bytes;
use futures_util::{stream::StreamExt, TryStreamExt};
use object_store::{
    aws::AmazonS3Builder, path::Path, Attribute, Attributes, ClientOptions, ObjectStore, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use sha2::{Digest, Sha256};
use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

/// The shared store: where, and how long each operation may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    pub bucket: String,
    /// Object-name prefix inside the bucket (may be empty).
    pub prefix: String,
    /// Endpoints tried in turn; empty: AWS, from the region.
    pub endpoints: Vec<String>,
    /// Region (else `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// Credentials from the file (else the `AWS_*` variables).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub virtual_hosted: bool,
    /// Deadline of each small operation (record read, existence check, delete) per endpoint.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Deadline of a whole body transfer.
    pub transfer_timeout: Duration,
    /// How often the store is probed for `/readyz` and `lotecache_shared_up`.
    pub probe_interval: Duration,
}

const SHARED: &str = "shared";
/// Bodies up to this size are uploaded in one PUT; larger ones in parts of this size.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Write-through uploads running at once; more wait for a slot.
const UPLOAD_SLOTS: usize = 4;

/// One S3 endpoint (a node of the cluster, or the service's single address).
struct Endpoint {
    url: String,
    store: Arc<dyn ObjectStore>,
}

/// The shared store of this process.
pub struct SharedStore {
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint that answered last: tried first.
    preferred: AtomicUsize,
    bucket: String,
    prefix: Path,
    timeout: Duration,
    transfer_timeout: Duration,
    up: AtomicBool,
    /// Unix ms of the last failure that marked the store down (0: none).
    down_since_ms: AtomicU64,
    /// While down, the store is not asked again before this long has passed since the
    /// failure (the probe loop brings it back sooner).
    retry_after: Duration,
    last_error: Mutex<Option<String>>,
    /// Bounds concurrent write-through uploads (each holds a file open, and memory).
    upload_slots: Arc<tokio::sync::Semaphore>,
    uploads: AtomicUsize,
    uploads_done: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("shared store: {0}")]
pub struct SharedSetupError(String);

impl SharedStore {
    /// Builds the clients (credentials and region from the standard `AWS_*` variables unless
    /// the configuration sets them). Nothing is contacted yet.
    pub fn new(config: &SharedConfig, metrics: Arc<Metrics>) -> Result<Arc<SharedStore>, SharedSetupError> {
        // Without keys the client would ask the cloud's instance-metadata service, which only
        // makes sense on AWS itself: with a custom endpoint, keys are required.
        let has_keys = config.access_key_id.is_some() || std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
        if !config.endpoints.is_empty() && !has_keys {
            return Err(SharedSetupError(
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or shared.access_key_id and shared.secret_access_key) for a custom S3 endpoint".into(),
            ));
        }
        let urls: Vec<Option<&str>> = if config.endpoints.is_empty() {
            vec![None]
        } else {
            config.endpoints.iter().map(|e| Some(e.as_str())).collect()
        };
        let mut endpoints = Vec::new();
        for url in urls {
            let options = ClientOptions::new()
                .with_timeout(config.transfer_timeout)
                .with_connect_timeout(config.connect_timeout)
                .with_pool_idle_timeout(Duration::from_secs(30));
            // Retries are ours: on the next endpoint, within the operation's deadline.
            let retry = RetryConfig { max_retries: 0, retry_timeout: config.timeout, ..Default::default() };
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&config.bucket)
                .with_client_options(options)
                .with_retry(retry)
                .with_virtual_hosted_style_request(config.virtual_hosted);
            if let Some(region) = &config.region {
                b = b.with_region(region);
            }
            if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            if let Some(url) = url {
                b = b.with_endpoint(url).with_allow_http(url.starts_with("http://"));
            }
            let store = b.build().map_err(|e| SharedSetupError(e.to_string()))?;
            endpoints.push(Endpoint { url: url.unwrap_or("aws").to_string(), store: Arc::new(store) });
        }
        let prefix = Path::parse(config.prefix.trim_matches('/'))
            .map_err(|e| SharedSetupError(format!("bad prefix {:?}: {e}", config.prefix)))?;
        Ok(Arc::new(SharedStore {
            endpoints,
            preferred: AtomicUsize::new(0),
            bucket: config.bucket.clone(),
            prefix,
            timeout: config.timeout,
            transfer_timeout: config.transfer_timeout,
            up: AtomicBool::new(false),
            down_since_ms: AtomicU64::new(0),
            retry_after: config.probe_interval,
            last_error: Mutex::new(None),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(UPLOAD_SLOTS)),
            uploads: AtomicUsize::new(0),
            uploads_done: tokio::sync::Notify::new(),
            metrics,
        }))
    }

    /// `s3://bucket/prefix`, for logs and `/readyz`.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// Whether the last operation reached the store, and the last failure seen.
    pub fn state(&self) -> (bool, Option<String>) {
        (self.up.load(Relaxed), self.last_error.lock().expect("shared state lock").clone())
    }

    /// The longest a promotion (record, blob, local commit) may take before the fill goes
    /// to the origin instead: the whole-transfer deadline, but at most 60 s.
    pub fn promote_budget(&self) -> Duration {
        self.transfer_timeout.min(Duration::from_secs(60))
    }

    /// Write-through uploads still running.
    pub fn uploads_pending(&self) -> usize {
        self.uploads.load(Relaxed)
    }

    fn blob_path(&self, sha256: &[u8; 32]) -> Path {
        self.prefix.child("_lotecache").child("blobs").child("sha256").child(hex::encode(sha256))
    }

    fn record_path(&self, key: &str) -> Path {
        let name = format!("{}.json", hex::encode(Sha256::digest(key.as_bytes())));
        self.prefix.child("_lotecache").child("entries").child(name)
    }

    /// The document under the owner's naming convention: the cache key itself.
    pub fn named_path(&self, key: &str) -> Path {
        key.split('/').filter(|s| !s.is_empty()).fold(self.prefix.clone(), |p, part| p.child(part))
    }

    fn count(&self, op: &str, result: &str) {
        self.metrics.shared_ops.with_label_values(&[op, result]).inc();
    }

    /// Whether the store failed recently and should not be asked now: requests then go
    /// straight to the origin instead of paying every endpoint's deadline again.
    pub fn recently_down(&self) -> bool {
        let since = self.down_since_ms.load(Relaxed);
        !self.up.load(Relaxed)
            && since > 0
            && crate::clock::now_ms().saturating_sub(since as u128) < self.retry_after.as_millis()
    }

    fn mark_up(&self) {
        self.down_since_ms.store(0, Relaxed);
        if !self.up.swap(true, Relaxed) {
            tracing::info!(store = %self.location(), "shared store reachable");
        }
        self.metrics.shared_up.set(1);
    }

    fn mark_down(&self, op: &str, detail: &str) {
        self.down_since_ms.store(crate::clock::now_ms() as u64, Relaxed);
        if self.up.swap(false, Relaxed) {
            tracing::warn!(store = %self.location(), op, error = %detail, "shared store unreachable; serving from the local tier and the origin");
        }
        self.metrics.shared_up.set(0);
        *self.last_error.lock().expect("shared state lock") = Some(format!("{op}: {detail}"));
    }

    /// Runs `op` against each endpoint in turn (the last good one first), each try bounded
    /// by `deadline`, until one answers. `NotFound` is an answer.
    async fn on_any<T, F, Fut>(&self, name: &str, deadline: Duration, op: F) -> Result<T, TierError>
    where
        F: Fn(Arc<dyn ObjectStore>) -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let n = self.endpoints.len();
        let first = self.preferred.load(Relaxed) % n;
        let mut failures = Vec::with_capacity(n);
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            match tokio::time::timeout(deadline, op(ep.store.clone())).await {
                Ok(Ok(v)) => {
                    self.preferred.store(idx, Relaxed);
                    self.mark_up();
                    return Ok(v);
                }
                Ok(Err(object_store::Error::NotFound { .. })) => {
                    self.preferred.store(idx, Relaxed);
                    self.mark_up();
                    return Err(TierError::NotFound { tier: SHARED });
                }
                Ok(Err(e)) => failures.push(format!("{}: {e}", ep.url)),
                Err(_) => failures.push(format!("{}: no answer within {deadline:?}", ep.url)),
            }
            tracing::debug!(op = name, error = %failures[failures.len() - 1], "shared store attempt failed");
        }
        let detail = failures.join("; ");
        self.mark_down(name, &detail);
        Err(TierError::Unavailable { tier: SHARED, detail })
    }

    /// Asks the store whether it answers (the metadata of a name that need not exist: a
    /// `404` is an answer), for the background probe.
    pub async fn probe(&self) -> bool {
        let r = self.head_object("probe", &self.prefix.child("_lotecache").child("probe")).await;
        let up = r.is_ok() || r.as_ref().is_err_and(not_found);
        self.count("probe", if up { "ok" } else { "error" });
        up
    }

    /// Writes `record` and its body through to the shared store in the background, counted
    /// as pending until done. Failures are logged and counted; nothing waits for it.
    /// Skipped while the store is down (the entry stays local; another replica that needs it
    /// regenerates it). `since_purge` is the purge epoch the body dates from: if a purge
    /// covering it arrives while the upload runs, the uploaded record is removed again (the
    /// admin purge removed shared records before this upload landed, or will after it).
    pub fn write_through(self: &Arc<Self>, local: Arc<super::store::Store>, record: Record, since_purge: u64) {
        if self.recently_down() {
            self.count("put-record", "skipped");
            tracing::info!(key = %record.key, "shared store down; not written through");
            return;
        }
        let shared = self.clone();
        shared.uploads.fetch_add(1, Relaxed);
        shared.metrics.shared_uploads_pending.inc();
        tokio::spawn(async move {
            let _slot = shared.upload_slots.clone().acquire_owned().await;
            let started = std::time::Instant::now();
            // Every endpoint is tried in turn within the copy; a body that failed half way is
            // tried once more, and so is one that found (and deleted) a damaged blob: the
            // second try uploads it.
            let mut result = super::tier::copy(&record, &local, &*shared).await;
            let retry =
                matches!(result, Err(TierError::Unavailable { .. }) | Err(TierError::Corrupt { tier: SHARED, .. }));
            if retry && !shared.recently_down() {
                result = super::tier::copy(&record, &local, &*shared).await;
            }
            match &result {
                Ok(()) => {
                    tracing::info!(key = %record.key, size = record.size, ms = started.elapsed().as_millis() as u64, "written through to the shared store")
                }
                Err(e) => {
                    tracing::warn!(key = %record.key, error = %e, "write-through to the shared store failed; the entry stays local")
                }
            }
            if result.is_ok() && local.purged_since(since_purge, &record.key, &record.meta.lote_id) {
                match Tier::remove(&*shared, &record.key).await {
                    Ok(()) => {
                        tracing::info!(key = %record.key, "purged while written through; shared record removed again")
                    }
                    Err(e) => {
                        tracing::warn!(key = %record.key, error = %e, "purged while written through; the shared record could not be removed")
                    }
                }
            }
            shared.metrics.shared_uploads_pending.dec();
            if shared.uploads.fetch_sub(1, Relaxed) == 1 {
                shared.uploads_done.notify_waiters();
            }
        });
    }

    /// Waits (at most `grace`) for write-through uploads to finish: shutdown.
    pub async fn drain(&self, grace: Duration) {
        let wait = async {
            loop {
                let done = self.uploads_done.notified();
                if self.uploads.load(Relaxed) == 0 {
                    return;
                }
                done.await;
            }
        };
        if tokio::time::timeout(grace, wait).await.is_err() {
            tracing::warn!(pending = self.uploads.load(Relaxed), "shutdown: write-through uploads unfinished");
        }
    }

    /// Deletes a blob whose content failed verification, and the record that led to it
    /// unless another replica has replaced it meanwhile, so that no replica tries them again
    /// and the next fill writes them afresh. Runs in the background.
    pub fn discard(self: &Arc<Self>, record: Record) {
        let shared = self.clone();
        tokio::spawn(async move {
            let (r, b) = (shared.record_path(&record.key), shared.blob_path(&record.sha256));
            let current = shared.lookup(&record.key).await;
            let same_record = matches!(&current, Ok(Some(c)) if c.sha256 == record.sha256);
            let res = shared
                .on_any("discard", shared.timeout, |s| {
                    let (r, b) = (r.clone(), b.clone());
                    async move {
                        if same_record {
                            s.delete(&r).await?;
                        }
                        s.delete(&b).await
                    }
                })
                .await;
            shared.count("discard", if res.is_ok() { "ok" } else { "error" });
            match res {
                Ok(()) => {
                    tracing::warn!(key = %record.key, sha256 = %hex::encode(record.sha256), record_deleted = same_record, "corrupt shared blob deleted")
                }
                Err(e) => tracing::warn!(key = %record.key, error = %e, "could not delete a corrupt shared blob"),
            }
        });
    }

    /// Deletes every record under the prefix (purge all); how many. Blobs and named copies
    /// stay: without a record no replica reads a blob.
    pub async fn remove_all_records(&self) -> Result<usize, TierError> {
        let dir = self.prefix.child("_lotecache").child("entries");
        let r = self
            .on_any("delete", self.transfer_timeout, |s| {
                let dir = dir.clone();
                async move {
                    let paths: Vec<Path> = s.list(Some(&dir)).map_ok(|m| m.location).try_collect().await?;
                    for p in &paths {
                        s.delete(p).await?;
                    }
                    Ok(paths.len())
                }
            })
            .await;
        self.count("delete", if r.is_ok() { "ok" } else { "error" });
        r
    }

    /// GET of one object on the first endpoint that answers (the body is read later).
    async fn get_object(&self, op: &str, path: &Path) -> Result<object_store::GetResult, TierError> {
        self.on_any(op, self.timeout, |s| {
            let path = path.clone();
            async move { s.get(&path).await }
        })
        .await
    }

    /// HEAD of one object on the first endpoint that answers.
    async fn head_object(&self, op: &str, path: &Path) -> Result<object_store::ObjectMeta, TierError> {
        self.on_any(op, self.timeout, |s| {
            let path = path.clone();
            async move { s.head(&path).await }
        })
        .await
    }

    /// A body stream that fails when no bytes arrive for `idle` (a node that stops
    /// mid-body), counting the failure.
    fn idle_limited(self: &Arc<Self>, body: Chunks, idle: Duration) -> Chunks {
        let shared = self.clone();
        futures_util::stream::unfold(Some(body), move |state| {
            let shared = shared.clone();
            async move {
                let mut body = state?;
                match tokio::time::timeout(idle, body.next()).await {
                    Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => {
                        shared.count("get-blob", "error");
                        Some((Err(e), None))
                    }
                    Err(_) => {
                        shared.count("get-blob", "error");
                        let detail = format!("no body bytes for {idle:?}");
                        Some((Err(TierError::Unavailable { tier: SHARED, detail }), None))
                    }
                }
            }
        })
        .boxed()
    }
}

fn not_found(e: &TierError) -> bool {
    matches!(e, TierError::NotFound { .. })
}

impl Tier for Arc<SharedStore> {
    async fn lookup(&self, key: &str) -> Result<Option<Record>, TierError> {
        (**self).lookup(key).await
    }
    async fn read(&self, record: &Record) -> Result<Chunks, TierError> {
        let body = (**self).read(record).await?;
        Ok(self.idle_limited(body, self.timeout))
    }
    async fn store(&self, record: &Record, body: Chunks) -> Result<(), TierError> {
        (**self).store(record, body).await
    }
    async fn remove(&self, key: &str) -> Result<(), TierError> {
        (**self).remove(key).await
    }
}

impl Tier for SharedStore {
    async fn lookup(&self, key: &str) -> Result<Option<Record>, TierError> {
        let path = self.record_path(key);
        let got = self
            .on_any("get-record", self.timeout, |s| {
                let path = path.clone();
                async move { s.get(&path).await?.bytes().await }
            })
            .await;
        let bytes = match got {
            Ok(b) => b,
            Err(e) if not_found(&e) => {
                self.count("get-record", "not-found");
                return Ok(None);
            }
            Err(e) => {
                self.count("get-record", "error");
                return Err(e);
            }
        };
        // A record cut short or from another version is no record: the origin answers.
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) if r.v == RECORD_VERSION && r.key == key && r.meta.status == 200 => {
                self.count("get-record", "ok");
                Ok(Some(r.sanitized()))
            }
            Ok(_) => {
                self.count("get-record", "mismatch");
                Ok(None)
            }
            Err(e) => {
                self.count("get-record", "corrupt");
                Err(TierError::Corrupt { tier: SHARED, detail: format!("record of {key:?}: {e}") })
            }
        }
    }

    async fn read(&self, record: &Record) -> Result<Chunks, TierError> {
        let got = self.get_object("get-blob", &self.blob_path(&record.sha256)).await;
        match got {
            Ok(r) => {
                self.count("get-blob", "ok");
                Ok(r.into_stream().map_err(|e| TierError::Unavailable { tier: SHARED, detail: e.to_string() }).boxed())
            }
            Err(e) => {
                self.count("get-blob", if not_found(&e) { "not-found" } else { "error" });
                Err(e)
            }
        }
    }

    /// Blob (unless it already exists), then the named copy, then the record. The body is
    /// hashed on the way: a body that does not match the record is never completed.
    async fn store(&self, record: &Record, mut body: Chunks) -> Result<(), TierError> {
        // A newer document of this key (refetched by another replica after a TTL) is not
        // replaced by an older upload that happens to finish later.
        if let Ok(Some(current)) = self.lookup(&record.key).await {
            if current.stored_at_ms > record.stored_at_ms {
                self.count("put-record", "superseded");
                return Ok(());
            }
        }
        let blob = self.blob_path(&record.sha256);
        let exists = self.head_object("head-blob", &blob).await;
        // A small blob of the right size is checked against its ETag (the MD5 of a single PUT):
        // one damaged in place is replaced, not kept and copied to the named object.
        let small = record.size as usize <= PART_SIZE;
        let mut local = None;
        let upload = match exists {
            Ok(meta) if meta.size == record.size && small => match plain_md5(meta.e_tag.as_deref()) {
                Some(etag) => {
                    let bytes = read_verified(record, &mut body).await?;
                    let same = etag == <md5::Md5 as Digest>::digest(&bytes).as_slice();
                    local = Some(bytes);
                    self.count("head-blob", if same { "ok" } else { "different" });
                    !same
                }
                None => {
                    self.count("head-blob", "ok");
                    false
                }
            },
            Ok(meta) if meta.size == record.size => match etag_form(meta.e_tag.as_deref(), record.size) {
                Some(etag) => {
                    if large_body_etag(record, &mut body, etag).await? != etag {
                        // The body is consumed: delete the damaged blob and let the caller copy
                        // again with a fresh body, which then uploads.
                        self.count("head-blob", "different");
                        let r = self
                            .on_any("delete-blob", self.timeout, |s| {
                                let blob = blob.clone();
                                async move { s.delete(&blob).await }
                            })
                            .await;
                        self.count("delete-blob", if r.is_ok() { "ok" } else { "error" });
                        r?;
                        return Err(TierError::Corrupt {
                            tier: SHARED,
                            detail: format!(
                                "blob {blob} had the right size and another ETag: deleted, to upload again"
                            ),
                        });
                    }
                    self.count("head-blob", "ok");
                    false
                }
                None => {
                    // An ETag of another form (an engine's own, or parts of another size).
                    self.count("head-blob", "ok");
                    false
                }
            },
            Err(e) if !not_found(&e) => {
                self.count("head-blob", "error");
                return Err(e);
            }
            other => {
                self.count("head-blob", if other.is_ok() { "wrong-size" } else { "not-found" });
                true
            }
        };
        if upload {
            let attributes = self.attributes(record);
            let r = if small {
                let bytes = match local.take() {
                    Some(b) => b,
                    None => read_verified(record, &mut body).await?,
                };
                self.put_small(&blob, bytes, attributes).await
            } else {
                self.put_large(&blob, record, &mut body, attributes).await
            };
            self.count("put-blob", r.as_ref().map_or_else(TierError::token, |_| "ok"));
            r?;
        }
        // The named copy: a server-side copy of the blob (its metadata comes along).
        let named = self.named_path(&record.key);
        let r = self
            .on_any("copy-named", self.transfer_timeout, |s| {
                let (blob, named) = (blob.clone(), named.clone());
                async move { s.copy(&blob, &named).await }
            })
            .await;
        // The named copy is for other tools: its failure does not keep the record from
        // replicas (which read the blob).
        self.count("copy-named", if r.is_ok() { "ok" } else { "error" });
        if let Err(e) = r {
            tracing::warn!(key = %record.key, error = %e, "named copy not written");
        }
        let json = serde_json::to_vec(record).map_err(|e| TierError::Failed { tier: SHARED, detail: e.to_string() })?;
        let payload = PutPayload::from(Bytes::from(json));
        let path = self.record_path(&record.key);
        let r = self
            .on_any("put-record", self.timeout, |s| {
                let (path, payload) = (path.clone(), payload.clone());
                async move { s.put(&path, payload).await }
            })
            .await;
        self.count("put-record", if r.is_ok() { "ok" } else { "error" });
        r.map(drop)
    }

    async fn remove(&self, key: &str) -> Result<(), TierError> {
        let (record, named) = (self.record_path(key), self.named_path(key));
        let r = self
            .on_any("delete", self.timeout, |s| {
                let (record, named) = (record.clone(), named.clone());
                async move {
                    s.delete(&record).await?;
                    s.delete(&named).await
                }
            })
            .await;
        self.count("delete", if r.is_ok() || r.as_ref().is_err_and(not_found) { "ok" } else { "error" });
        match r {
            Err(e) if !not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

impl SharedStore {
    /// The blob's metadata, which the named copy inherits: its digest (what other tools
    /// verify the named copy with) and its content type. Nothing per key: keys with the same
    /// body share the blob.
    fn attributes(&self, record: &Record) -> Attributes {
        let mut a = Attributes::new();
        a.insert(Attribute::Metadata("sha256".into()), hex::encode(record.sha256).into());
        if let Some(ct) = record.meta.headers.iter().find(|(n, _)| n == "content-type") {
            if let super::entry::StoredValue::Text(t) = &ct.1 {
                a.insert(Attribute::ContentType, t.clone().into());
            }
        }
        a
    }

    /// Reads the whole (small) body, verifies it, then PUTs it in one request.
    async fn put_small(&self, blob: &Path, body: Vec<u8>, attributes: Attributes) -> Result<(), TierError> {
        let payload = PutPayload::from(Bytes::from(body));
        let opts = PutOptions { attributes, ..Default::default() };
        self.on_any("put-blob", self.transfer_timeout, |s| {
            let (payload, opts) = (payload.clone(), opts.clone());
            async move { s.put_opts(&blob.clone(), payload, opts).await }
        })
        .await
        .map(drop)
    }

    /// Streams a large body in parts, hashing it; completes the upload only if it matches.
    async fn put_large(
        &self,
        blob: &Path,
        record: &Record,
        body: &mut Chunks,
        attributes: Attributes,
    ) -> Result<(), TierError> {
        let opts = object_store::PutMultipartOptions { attributes, ..Default::default() };
        let upload = self
            .on_any("put-blob", self.timeout, |s| {
                let opts = opts.clone();
                async move { s.put_multipart_opts(&blob.clone(), opts).await }
            })
            .await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let unavailable = |e: object_store::Error| TierError::Unavailable { tier: SHARED, detail: e.to_string() };
        let streamed = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                len += chunk.len() as u64;
                if len > record.size {
                    break;
                }
                w.wait_for_capacity(2).await.map_err(unavailable)?;
                w.write(&chunk);
            }
            check(record, len, hasher.finalize().into())
        };
        match tokio::time::timeout(self.transfer_timeout, streamed).await {
            Ok(Ok(())) => match tokio::time::timeout(self.transfer_timeout, w.finish()).await {
                Ok(r) => r.map(drop).map_err(unavailable),
                Err(_) => Err(TierError::Unavailable { tier: SHARED, detail: "multipart upload timed out".into() }),
            },
            Ok(Err(e)) => {
                let _ = tokio::time::timeout(self.timeout, w.abort()).await;
                Err(e)
            }
            Err(_) => {
                let _ = tokio::time::timeout(self.timeout, w.abort()).await;
                Err(TierError::Unavailable { tier: SHARED, detail: "multipart upload timed out".into() })
            }
        }
    }
}

/// Reads a whole (small) local body and checks it is the one its record describes.
async fn read_verified(record: &Record, body: &mut Chunks) -> Result<Vec<u8>, TierError> {
    let mut buf = Vec::with_capacity(record.size as usize);
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        if buf.len() as u64 > record.size {
            break;
        }
    }
    check(record, buf.len() as u64, Sha256::digest(&buf).into())?;
    Ok(buf)
}

/// The MD5 an ETag carries, if it is a plain one (a single PUT's; not a multipart `…-N`).
fn plain_md5(etag: Option<&str>) -> Option<[u8; 16]> {
    let hex_str = etag?.trim_matches('"');
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_str, &mut out).ok()?;
    Some(out)
}

/// What a large blob's ETag can be checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Etag {
    /// A single PUT's: the body's MD5.
    Plain([u8; 16]),
    /// A multipart upload's `<md5>-<parts>`: the MD5 of the parts' MD5s.
    Parts([u8; 16], u64),
}

/// `etag` as one this replica can recompute for a body of `size` bytes: plain, or multipart
/// with as many parts as an upload in parts of `PART_SIZE` makes (another count means
/// another part size, which cannot be recomputed).
fn etag_form(etag: Option<&str>, size: u64) -> Option<Etag> {
    let etag = etag?.trim_matches('"');
    match etag.split_once('-') {
        None => plain_md5(Some(etag)).map(Etag::Plain),
        Some((md5, parts)) => {
            let parts: u64 = parts.parse().ok()?;
            (parts == size.div_ceil(PART_SIZE as u64)).then_some(Etag::Parts(plain_md5(Some(md5))?, parts))
        }
    }
}

/// Reads a large local body, checks it is the one its record describes, and returns the
/// ETag of the same form as `like` it would have in the shared store.
async fn large_body_etag(record: &Record, body: &mut Chunks, like: Etag) -> Result<Etag, TierError> {
    let (mut sha, mut whole, mut part, mut parts) = (Sha256::new(), md5::Md5::new(), md5::Md5::new(), md5::Md5::new());
    let (mut len, mut in_part, mut count) = (0u64, 0usize, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        len += chunk.len() as u64;
        if len > record.size {
            break;
        }
        sha.update(&chunk);
        match like {
            Etag::Plain(_) => whole.update(&chunk),
            Etag::Parts(..) => {
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let n = rest.len().min(PART_SIZE - in_part);
                    part.update(&rest[..n]);
                    (in_part, rest) = (in_part + n, &rest[n..]);
                    if in_part == PART_SIZE {
                        parts.update(std::mem::take(&mut part).finalize());
                        (in_part, count) = (0, count + 1);
                    }
                }
            }
        }
    }
    check(record, len, sha.finalize().into())?;
    Ok(match like {
        Etag::Plain(_) => Etag::Plain(whole.finalize().into()),
        Etag::Parts(..) => {
            if in_part > 0 {
                parts.update(part.finalize());
                count += 1;
            }
            Etag::Parts(parts.finalize().into(), count)
        }
    })
}

/// Whether the local body about to be uploaded is the one its record describes.
fn check(record: &Record, len: u64, sha256: [u8; 32]) -> Result<(), TierError> {
    if len != record.size || sha256 != record.sha256 {
        return Err(TierError::Corrupt {
            tier: "local",
            detail: format!("{len} bytes hashing to {} for a record of {} bytes", hex::encode(sha256), record.size),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_of(body: &[u8]) -> Record {
        Record {
            v: RECORD_VERSION,
            key: "K_resultados.json".into(),
            sha256: Sha256::digest(body).into(),
            size: body.len() as u64,
            stored_at_ms: 0,
            meta: super::super::entry::EntryMeta::new(
                "batch-results",
                "K",
                http::StatusCode::OK,
                &http::HeaderMap::new(),
                0,
            ),
        }
    }

    /// `body` as a stream of chunks of `step` bytes (part boundaries fall inside chunks).
    fn chunks(body: &[u8], step: usize) -> Chunks {
        let pieces: Vec<Result<Bytes, TierError>> = body.chunks(step).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures_util::stream::iter(pieces).boxed()
    }

    #[test]
    fn etags_are_read_as_plain_or_as_parts_of_this_part_size() {
        let md5 = "0123456789abcdef0123456789abcdef";
        let raw = <[u8; 16]>::try_from(hex::decode(md5).unwrap()).unwrap();
        let size = PART_SIZE as u64 + 1;
        assert_eq!(etag_form(Some(&format!("\"{md5}\"")), size), Some(Etag::Plain(raw)));
        assert_eq!(etag_form(Some(&format!("\"{md5}-2\"")), size), Some(Etag::Parts(raw, 2)));
        // Three parts for a body this size: another part size, not recomputable.
        assert_eq!(etag_form(Some(&format!("\"{md5}-3\"")), size), None);
        assert_eq!(etag_form(Some("\"an-engine's-own\""), size), None);
        assert_eq!(etag_form(None, size), None);
    }

    #[tokio::test]
    async fn a_large_body_gets_the_etag_a_multipart_upload_in_parts_of_part_size_has() {
        let body: Vec<u8> = (0..PART_SIZE + 12345).map(|i| (i % 251) as u8).collect();
        let (p1, p2) = body.split_at(PART_SIZE);
        let mut of_parts = md5::Md5::new();
        of_parts.update(md5::Md5::digest(p1));
        of_parts.update(md5::Md5::digest(p2));
        let want = Etag::Parts(of_parts.finalize().into(), 2);
        let record = record_of(&body);
        for step in [1 << 20, 333_333, body.len()] {
            let got = large_body_etag(&record, &mut chunks(&body, step), Etag::Parts([0; 16], 2)).await.unwrap();
            assert_eq!(got, want, "chunks of {step}");
        }
        let plain = large_body_etag(&record, &mut chunks(&body, 65536), Etag::Plain([0; 16])).await.unwrap();
        assert_eq!(plain, Etag::Plain(md5::Md5::digest(&body).into()));
    }

    #[tokio::test]
    async fn a_local_body_that_differs_from_its_record_is_never_taken_for_the_blob() {
        let body = vec![7u8; PART_SIZE + 10];
        let record = record_of(&body);
        let mut other = body.clone();
        other[5] ^= 1;
        let got = large_body_etag(&record, &mut chunks(&other, 1 << 20), Etag::Parts([0; 16], 2)).await;
        assert!(matches!(got, Err(TierError::Corrupt { tier: "local", .. })), "{got:?}");
    }
}
