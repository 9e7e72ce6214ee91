//! Fills: fetching one entry from the origin in a detached task, fanning its bytes out to
//! every request waiting for it (single-flight), and committing it to the store.
//!
//! A fill publishes into a `watch` channel holding a list of chunks. Each subscriber has a
//! cursor of its own: it replays from the start, then follows live; it never blocks the fill
//! and never skips data. The fill is owned by no client: any client may leave at any time.
//! The last chunk is held back until the fill has ended correctly (and, when storing, the
//! commit was attempted), so a failed fill never looks like a complete response.
//!
//! Memory is bounded by `replay_buffer` per fill: past it, chunks every subscriber has read
//! are dropped, the fill stops taking new subscribers (they wait for the commit and read
//! from disk), and a subscriber lagging by more than the buffer is cut with an error.

use super::entry::{Entry, EntryMeta};
use super::policy::{storability, Storability};
use super::shared::SharedStore;
use super::status::{CacheStatus, NotStored};
use super::store::{Expect, InMemory, Store};
use super::tier::{copy_in, Record, Tier, TierError};
use super::validate::{OnFail, StreamingValidator, Verdict};
use crate::body::{BoxError, ProxyBody};

use crate::error::ProxyError;
use crate::headers::{forward_response_headers, REPR_DIGEST};
use crate::metrics::Metrics;
use crate::origin::{body::IdleTimeoutBody, Origin};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::time::Duration;
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, OnceLock, Weak,
    },
    time::Instant,
};
use tokio::{
    sync::{watch, Semaphore},
    task::AbortHandle,
};

/// Limits of fills (single-flight fetches).
#[derive(Debug, Clone)]
pub struct FillConfig {
    /// Bytes of a fill kept in memory for replay to joiners; past it, consumed chunks are
    /// dropped, new requests wait for the commit, and a subscriber lagging by more is cut.
    pub replay_buffer: u64,
    /// Longest a request waits for a fill's response head (or, past the replay buffer, for
    /// its commit) before it gets `504`.
    pub wait_timeout: Duration,
    /// Longest a fill may run in all; a fill older than this is abandoned and replaced.
    pub fill_timeout: Duration,
    /// Fills fetching from the origin at once, in the whole process and on one worker
    /// thread; more wait in a queue of `fill_queue` (then `503` with `Retry-After`). Read at
    /// start: a change needs a restart.
    pub max_fills: usize,
    pub max_fills_per_worker: usize,
    pub fill_queue: usize,
}

impl Default for FillConfig {
    fn default() -> Self {
        FillConfig {
            replay_buffer: 32 * 1024 * 1024,
            wait_timeout: Duration::from_secs(130),
            fill_timeout: Duration::from_secs(900),
            max_fills: 64,
            max_fills_per_worker: 32,
            fill_queue: 1024,
        }
    }
}

/// The response head of a fill, as sent to subscribers.
#[derive(Debug)]
pub struct FillHead {
    pub status: StatusCode,
    /// Headers for every subscriber (hop-by-hop and per-request headers removed, `Via`
    /// added).
    pub headers: HeaderMap,
    /// The origin's per-request headers (`Set-Cookie`, …): only for the request that
    /// started the fill, whose request the origin answered.
    pub requester_only: HeaderMap,
    /// `Cache-Status` for the request that started the fill.
    pub cache_status: CacheStatus,
}

/// How a fill ended, if it has.
#[derive(Debug, Clone)]
pub enum FillEnd {
    Open,
    /// The origin body ended correctly: every chunk may be released.
    Complete,
    /// The fill failed: subscribers without a head get the error response, others an
    /// aborted body.
    Failed(Arc<ProxyError>),
    /// The entry was copied from the shared store into the local one, no head was sent:
    /// subscribers serve it from the store.
    Promoted,
}

/// What a subscriber waits for first.
#[derive(Debug)]
pub enum Head {
    /// The response head: stream the body from the fill.
    Response(Arc<FillHead>),
    /// The entry is in the local store now: serve it from there.
    Stored,
}

/// A subscriber's position, visible to the fill so that it can drop what all have read.
#[derive(Default)]
struct Cursor {
    /// Absolute index of the next chunk to send.
    next: AtomicUsize,
    /// Bytes sent so far.
    read: AtomicU64,
    /// Set by the fill when this subscriber fell more than the replay buffer behind.
    cut: AtomicBool,
}

/// Everything subscribers see of a fill.
pub struct FillState {
    pub head: Option<Arc<FillHead>>,
    chunks: VecDeque<Bytes>,
    /// Absolute index of `chunks[0]`.
    base: usize,
    retained: u64,
    total: u64,
    /// Chunks were dropped: the fill can no longer be replayed from the start.
    closed: bool,
    pub end: FillEnd,
    /// How the fill ended for the store (`Cache-Status` text: stored, or not and why), set
    /// as it completes: a head sent before the commit cannot say it, the access log does.
    pub outcome: Option<CacheStatus>,
    cursors: Vec<Weak<Cursor>>,
}

/// A response's view of the fill it came from, for the access log's stored state.
#[derive(Clone)]
pub struct FillOutcome(pub watch::Receiver<FillState>);

impl FillOutcome {
    /// The `Cache-Status` the fill ended with, once it has ended.
    pub fn ended_as(&self) -> Option<String> {
        let s = self.0.borrow();
        match &s.end {
            FillEnd::Failed(e) => Some(format!("failed: {}", e.token())),
            _ => s.outcome.as_ref().map(CacheStatus::to_string),
        }
    }
}

impl FillState {
    fn push(&mut self, data: Bytes, replay_buffer: u64) {
        self.total += data.len() as u64;
        self.retained += data.len() as u64;
        self.chunks.push_back(data);
        if self.retained > replay_buffer {
            self.trim(replay_buffer);
        }
    }

    /// Cuts subscribers lagging by more than `limit`, then drops every chunk all the
    /// others have read. The newest chunk does not count as lag: no subscriber can have
    /// read it yet.
    fn trim(&mut self, limit: u64) {
        self.closed = true;
        self.cursors.retain(|c| c.strong_count() > 0);
        let readable = self.total - self.chunks.back().map_or(0, |c| c.len() as u64);
        let mut keep_from = self.base + self.chunks.len();
        for cursor in self.cursors.iter().filter_map(Weak::upgrade) {
            if cursor.cut.load(Relaxed) {
                continue;
            }
            if readable.saturating_sub(cursor.read.load(Relaxed)) > limit {
                cursor.cut.store(true, Relaxed);
                tracing::warn!(lag_limit = limit, "subscriber fell too far behind its fill; cutting it");
                continue;
            }
            keep_from = keep_from.min(cursor.next.load(Relaxed));
        }
        while self.base < keep_from {
            let Some(chunk) = self.chunks.pop_front() else { break };
            self.retained -= chunk.len() as u64;
            self.base += 1;
        }
    }
}

/// One fill in flight.
pub struct Fill {
    state: watch::Sender<FillState>,
    abort: OnceLock<AbortHandle>,
    started: Instant,
    /// The batch it fetches (a purge by lote id detaches it).
    lote_id: String,
}

impl Fill {
    fn new(lote_id: &str) -> Arc<Fill> {
        let (state, _) = watch::channel(FillState {
            head: None,
            chunks: VecDeque::new(),
            base: 0,
            retained: 0,
            total: 0,
            closed: false,
            end: FillEnd::Open,
            outcome: None,
            cursors: Vec::new(),
        });
        Arc::new(Fill { state, abort: OnceLock::new(), started: Instant::now(), lote_id: lote_id.to_string() })
    }

    /// A subscription replaying from the start, unless the fill already dropped chunks.
    fn try_subscribe(&self) -> Option<Subscription> {
        let cursor = Arc::new(Cursor::default());
        let mut added = false;
        self.state.send_if_modified(|s| {
            if !s.closed {
                s.cursors.push(Arc::downgrade(&cursor));
                added = true;
            }
            false // nobody needs waking for a new subscriber
        });
        added.then(|| Subscription { rx: self.state.subscribe(), cursor })
    }

    fn is_open(&self) -> bool {
        matches!(self.state.borrow().end, FillEnd::Open)
    }

    fn fail(&self, err: ProxyError) {
        let err = Arc::new(err);
        self.state.send_modify(|s| {
            if matches!(s.end, FillEnd::Open) {
                s.end = FillEnd::Failed(err);
            }
        });
    }
}

/// A request's view of a fill: the state, and its own cursor.
pub struct Subscription {
    pub rx: watch::Receiver<FillState>,
    cursor: Arc<Cursor>,
}

/// A fill's place in the registry: its rule and key (entries are namespaced by rule).
type FillKey = (String, String);

/// The registry of fills in flight, by rule and cache key.
pub struct Fills {
    inflight: Mutex<HashMap<FillKey, Arc<Fill>>>,
    /// Fills fetching at once in the whole process (`cache.max_fills`).
    running: Arc<Semaphore>,
    /// Fills waiting for a slot; more than `cache.fill_queue` and new ones are refused.
    queued: AtomicUsize,
    /// The second tier, if configured: read before the origin, written after a commit.
    shared: OnceLock<Arc<SharedStore>>,
    /// Replaced on reload; each fill keeps the limits it started with.
    config: ArcSwap<FillConfig>,
    metrics: Arc<Metrics>,
}

/// What a request found when it looked for its key.
pub enum Lookup {
    /// The entry is in the store.
    Stored(Arc<Entry>),
    /// This request started the fill.
    Started(Subscription),
    /// A fill was already running; this request joined it from the start.
    Joined(Subscription),
    /// A fill is running but past its replay buffer: wait for it to end, then look again.
    Closed(watch::Receiver<FillState>),
    /// No fill may start now: too many wait for a slot already.
    Busy(ProxyError),
    /// The entry is stored but not built in memory: look it up, then call again.
    LookAgain,
}

/// What a fill needs to run.
pub struct FillJob {
    /// The rule whose entry this is (its namespace) and whose settings apply.
    pub rule: String,
    pub key: String,
    pub lote_id: String,
    /// Whether the request carries the client's credentials (rules with an access check).
    pub credentials_forwarded: bool,
    /// The rule's largest stored body.
    pub max_object_size: Option<u64>,
    /// The rebuilt origin request (GET, absolute URI, empty body).
    pub request: Request<ProxyBody>,
    /// Checks the document must pass before it is stored, if the route has any.
    pub validation: Option<Arc<super::validate::Validation>>,
    /// Response headers this route stores despite.
    pub ignore: super::policy::IgnoreResponse,
    /// The route's TTL: an older shared entry is not copied, but refetched.
    pub ttl: Option<std::time::Duration>,
    /// The variants to build once the entry is stored (None: the route keeps none).
    pub compress: Option<super::compress::AfterCommit>,
    /// The request carries the rule's service headers: its answer speaks to lotecache, so
    /// per-request headers (`Set-Cookie`, …) go to nobody, not even the requester.
    pub as_service: bool,
}

impl Fills {
    pub fn new(config: FillConfig, metrics: Arc<Metrics>) -> Self {
        Fills {
            inflight: Mutex::default(),
            running: Arc::new(Semaphore::new(config.max_fills)),
            queued: AtomicUsize::new(0),
            shared: OnceLock::new(),
            config: ArcSwap::from_pointee(config),
            metrics,
        }
    }

    /// Sets the shared store fills read from and write through to (once, at start).
    pub fn set_shared(&self, shared: Arc<SharedStore>) {
        self.metrics.shared_configured.set(1);
        let _ = self.shared.set(shared);
    }

    pub fn shared(&self) -> Option<&Arc<SharedStore>> {
        self.shared.get()
    }

    pub fn config(&self) -> Arc<FillConfig> {
        self.config.load_full()
    }

    pub fn set_config(&self, config: FillConfig) {
        self.config.store(Arc::new(config));
    }

    /// Joins the fill for `key`, or starts one. The store is checked under the registry
    /// lock: a fill publishes its entry before it ends, so a request never sees neither and
    /// starts a second generation. A fill older than `fill_timeout` is abandoned and replaced.
    /// The caller looks the key up in the store first ([`Store::lookup`]): under the lock only
    /// memory is checked, so a key the index load has not reached must be in memory by then.
    pub fn join_or_start(
        self: &Arc<Self>,
        store: &Arc<Store>,
        origin: &Origin,
        rule: &str,
        key: &str,
        is_fresh: impl Fn(&Entry) -> bool,
        job: impl FnOnce() -> FillJob,
    ) -> Lookup {
        let config = self.config.load_full();
        let mut inflight = self.inflight.lock().expect("fills lock");
        // Memory only (no wait on a commit, no bucket read for an absent key, under this lock):
        // the caller looked the key up first.
        match store.get_loaded_for(rule, key) {
            InMemory::Entry(entry) if is_fresh(&entry) => return Lookup::Stored(entry),
            InMemory::Entry(_) | InMemory::Absent => {}
            InMemory::LookUp => return Lookup::LookAgain,
        }
        let fill_key = (rule.to_string(), key.to_string());
        if let Some(fill) = inflight.get(&fill_key) {
            if fill.started.elapsed() > config.fill_timeout {
                tracing::warn!(key, age = ?fill.started.elapsed(), "abandoning a fill older than fill_timeout");
                abort_fill(fill);
            } else if fill.is_open() {
                return match fill.try_subscribe() {
                    Some(sub) => Lookup::Joined(sub),
                    None => Lookup::Closed(fill.state.subscribe()),
                };
            }
            // Ended without storing: start afresh (the old task never removes a newer fill).
        }
        // Slots taken now when free (on the worker this request runs on, where its fill will
        // run); otherwise the fill waits for them in a bounded queue.
        let worker = worker_fill_slots(config.max_fills_per_worker);
        let slots =
            worker.try_acquire_owned().ok().and_then(|w| Some((w, self.running.clone().try_acquire_owned().ok()?)));
        if slots.is_none() {
            if self.queued.load(Relaxed) >= config.fill_queue {
                self.metrics.not_stored.with_label_values(&["busy"]).inc();
                return Lookup::Busy(ProxyError::Busy {
                    detail: format!(
                        "{} origin fetches already wait for a slot (cache.max_fills = {}, cache.max_fills_per_worker = {}); try again shortly",
                        config.fill_queue, config.max_fills, config.max_fills_per_worker
                    ),
                });
            }
            self.queued.fetch_add(1, Relaxed);
        }
        let job = job();
        let fill = Fill::new(&job.lote_id);
        let sub = fill.try_subscribe().expect("a new fill takes subscribers");
        inflight.insert(fill_key.clone(), fill.clone());
        let guard = FillGuard { fills: self.clone(), key: fill_key, fill: fill.clone(), queued: slots.is_none() };
        self.metrics.fills_in_flight.inc();
        let shared = self.shared.get().cloned();
        let task = tokio::spawn(run(guard, slots, store.clone(), origin.clone(), job, (*config).clone(), shared));
        let _ = fill.abort.set(task.abort_handle());
        Lookup::Started(sub)
    }

    /// Aborts the fills of `key` (under any rule), if any run; their subscribers get an
    /// error. Returns whether there was one.
    pub fn abort(&self, key: &str) -> bool {
        let fills: Vec<_> = self
            .inflight
            .lock()
            .expect("fills lock")
            .iter()
            .filter(|((_, k), _)| k == key)
            .map(|(_, f)| f.clone())
            .collect();
        fills.iter().for_each(|f| abort_fill(f));
        !fills.is_empty()
    }

    /// Lets go of the fills `which` covers: they finish for the requests already on them
    /// (their store refuses what they fetched), while new requests start fresh fills.
    pub fn detach(&self, which: &super::store::Purge) {
        let mut inflight = self.inflight.lock().expect("fills lock");
        inflight.retain(|(_, key), fill| !which.covers(key, &fill.lote_id));
    }

    /// Aborts every fill in flight (shutdown past its grace period).
    pub fn abort_all(&self) {
        let fills: Vec<_> = self.inflight.lock().expect("fills lock").values().cloned().collect();
        fills.iter().for_each(|f| abort_fill(f));
    }

    /// Number of fills in flight.
    pub fn len(&self) -> usize {
        self.inflight.lock().expect("fills lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn abort_fill(fill: &Fill) {
    fill.fail(ProxyError::FillAborted);
    if let Some(handle) = fill.abort.get() {
        handle.abort();
    }
}

/// Removes the fill from the registry when the fill task ends in any way (return, panic,
/// abort), and fails it if it had not ended, so no subscriber waits forever.
struct FillGuard {
    fills: Arc<Fills>,
    key: FillKey,
    fill: Arc<Fill>,
    /// Still counted among the fills waiting for a slot.
    queued: bool,
}

impl FillGuard {
    /// Leaves the queue of fills waiting for a slot (once).
    fn dequeue(&mut self) {
        if std::mem::take(&mut self.queued) {
            self.fills.queued.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.dequeue();
        self.fill.fail(ProxyError::FillAborted);
        self.fills.metrics.fills_in_flight.dec();
        let mut inflight = self.fills.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.fill)) {
            inflight.remove(&self.key);
        }
    }
}

/// The fill task: copy from the shared store, or fetch, fan out, validate, write, commit
/// (and write through).
async fn run(
    mut guard: FillGuard,
    slots: Option<FillSlots>,
    store: Arc<Store>,
    origin: Origin,
    job: FillJob,
    config: FillConfig,
    shared: Option<Arc<SharedStore>>,
) {
    let fill = guard.fill.clone();
    let key = job.key.clone();
    // A slot on this worker and one in the process, waited for at most as long as the
    // requests on this fill wait for it. Held until the fill ends (dropped with the task).
    let _slots = match slots {
        Some(slots) => slots,
        None => {
            let worker = worker_fill_slots(config.max_fills_per_worker);
            let running = guard.fills.running.clone();
            let waited = tokio::time::timeout(config.wait_timeout, async move {
                let w = worker.acquire_owned().await;
                let g = running.acquire_owned().await;
                (w, g)
            })
            .await;
            guard.dequeue();
            match waited {
                Ok((Ok(w), Ok(g))) => (w, g),
                _ => {
                    let detail = format!(
                        "no origin fetch slot within cache.wait_timeout (cache.max_fills = {}, cache.max_fills_per_worker = {})",
                        config.max_fills, config.max_fills_per_worker
                    );
                    tracing::warn!(key = %key, "{detail}");
                    store.metrics().not_stored.with_label_values(&["busy"]).inc();
                    fill.fail(ProxyError::Busy { detail });
                    return;
                }
            }
        }
    };
    if let Some(shared) = &shared {
        if promote(shared, &store, &job.rule, &job.key, &job.lote_id, job.ttl, job.validation.as_ref()).await {
            // The shared store keeps identity only: this replica builds its own variants.
            if let (Some(c), Some(entry)) = (&job.compress, store.lookup_for(&job.rule, &job.key).await.ok().flatten())
            {
                c.submit(&entry);
            }
            fill.state.send_modify(|s| s.end = FillEnd::Promoted);
            return;
        }
    }
    if let Err(e) = fetch(&fill, &store, &origin, job, &config, shared.as_ref()).await {
        tracing::warn!(key = %key, error = %e, detail = %e.detail(), "fill failed; nothing stored");
        store.metrics().not_stored.with_label_values(&[&e.token()]).inc();
        fill.fail(e);
    }
    drop(guard);
}

/// A response head not yet published to subscribers (validated routes publish it once the
/// verdict is known, so that `Cache-Status`, `ETag` and the status itself tell the truth).
struct HeldHead {
    status: StatusCode,
    headers: HeaderMap,
    requester_only: HeaderMap,
}

impl Fill {
    fn publish_head(
        &self,
        status: StatusCode,
        headers: HeaderMap,
        requester_only: HeaderMap,
        cache_status: CacheStatus,
    ) {
        self.state.send_modify(|s| s.head = Some(Arc::new(FillHead { status, headers, requester_only, cache_status })));
    }
}

thread_local! {
    /// This worker thread's fill slots (`cache.max_fills_per_worker`), made on first use.
    static WORKER_FILL_SLOTS: std::cell::OnceCell<Arc<Semaphore>> = const { std::cell::OnceCell::new() };
}

/// A fill's hold on a slot of its worker and one of the process.
type FillSlots = (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit);

fn worker_fill_slots(per_worker: usize) -> Arc<Semaphore> {
    WORKER_FILL_SLOTS.with(|slots| slots.get_or_init(|| Arc::new(Semaphore::new(per_worker))).clone())
}

/// Copies `job`'s entry from the shared store into the local one if a fresh record is
/// there, its body verifies and it passes the route's validation; whether it did. Any
/// failure leaves the fill to the origin.
async fn promote(
    shared: &Arc<SharedStore>,
    store: &Arc<Store>,
    rule: &str,
    key: &str,
    lote_id: &str,
    ttl: Option<std::time::Duration>,
    validation: Option<&Arc<super::validate::Validation>>,
) -> bool {
    if shared.recently_down() {
        return false;
    }
    // Noted before the record is read: a purge after this refuses the copy.
    let since_purge = store.purge_epoch();
    let record = match shared.lookup(key).await {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "shared store lookup failed; filling from the origin");
            return false;
        }
    };
    if record.meta.rule != rule {
        // Another rule's entry under a coinciding key: never this rule's document.
        return false;
    }
    let age_ms = crate::clock::now_ms().saturating_sub(record.stored_at_ms as u128);
    if ttl.is_some_and(|ttl| age_ms >= ttl.as_millis()) {
        tracing::info!(key = %key, age_ms = age_ms as u64, "shared entry expired; filling from the origin");
        return false;
    }
    if store.max_size().is_some_and(|max| record.size > max) {
        return false;
    }
    let started = Instant::now();
    // One deadline for the whole copy (each step also has its own): the origin is asked
    // well before a waiting client gives up.
    let budget = shared.promote_budget();
    let copied = match tokio::time::timeout(
        budget,
        copy_in(&record, shared, store, since_purge, validation.map(|v| (v, lote_id))),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(TierError::Unavailable { tier: "shared", detail: format!("copy took over {budget:?}") }),
    };
    match copied {
        Ok(()) => {
            tracing::info!(key = %key, lote_id = %lote_id, size = record.size, ms = started.elapsed().as_millis() as u64, "entry copied from the shared store");
            true
        }
        Err(e @ TierError::Corrupt { .. }) => {
            tracing::warn!(key = %key, error = %e, "shared entry failed verification; not served, filling from the origin");
            store.metrics().integrity_failures.with_label_values(&["shared-digest"]).inc();
            shared.discard(record);
            false
        }
        Err(TierError::Invalid { token, detail, .. }) => {
            // Not discarded: a replica with other rules may have stored it. The refetch's
            // write-through replaces it if it passes here.
            tracing::warn!(key = %key, lote_id = %lote_id, reason = %detail, "shared document failed this route's validation; not served, filling from the origin");
            store.metrics().validation_failures.with_label_values(&[&token]).inc();
            false
        }
        Err(e @ TierError::Short { .. }) => {
            // Not deleted (a transfer cut short is no proof of damage); the write-through of
            // the refetch replaces a short blob.
            tracing::warn!(key = %key, error = %e, "shared entry shorter than its record; not served, filling from the origin");
            store.metrics().integrity_failures.with_label_values(&["shared-length"]).inc();
            false
        }
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "copy from the shared store failed; filling from the origin");
            false
        }
    }
}

async fn fetch(
    fill: &Fill,
    store: &Arc<Store>,
    origin: &Origin,
    job: FillJob,
    config: &FillConfig,
    shared: Option<&Arc<SharedStore>>,
) -> Result<(), ProxyError> {
    let started = Instant::now();
    // Noted before the origin is asked: what it answers dates from now, and a purge after
    // this refuses the commit.
    let since_purge = store.purge_epoch();
    let deadline = tokio::time::Instant::now() + config.fill_timeout;
    let too_old = || ProxyError::OriginTimeout { phase: "complete response (cache.fill_timeout)" };
    let response = tokio::time::timeout_at(deadline, origin.send(job.request)).await.map_err(|_| too_old())??;
    let (mut parts, body) = response.into_parts();
    let json_checked = job.validation.as_ref().is_some_and(|v| v.json);
    let mut decision = storability(parts.status, &parts.headers, json_checked, job.ignore);
    if let Storability::Store { expected_len: Some(n) } = decision {
        if store.max_size().is_some_and(|max| n > max) || job.max_object_size.is_some_and(|max| n > max) {
            decision = Storability::DontStore(NotStored::TooLarge);
        }
    }
    if let Storability::Store { expected_len } = decision {
        if !store.has_room_for(expected_len) {
            decision = Storability::DontStore(NotStored::DiskFull);
        }
    }
    if matches!(parts.status.as_u16(), 401 | 403) {
        let hint = if job.credentials_forwarded {
            "the client's credentials were forwarded and refused"
        } else {
            "fills on this rule carry no client credentials: give the rule an access check ([rules.auth]) if the backend needs them, or let the backend serve this route anonymously"
        };
        tracing::warn!(rule = %job.rule, key = %job.key, status = parts.status.as_u16(), hint, "the origin refused a fill; passed on, not stored");
    }
    forward_response_headers(&mut parts.headers);
    // Per-request headers go to the requester alone, never to joiners, never to the store; to
    // nobody when the fill spoke as the service.
    let mut requester_only = super::policy::take_per_request(&mut parts.headers);
    if job.as_service {
        requester_only.clear();
    }
    let stored_headers = {
        let mut h = parts.headers.clone();
        h.remove(http::header::CONTENT_LENGTH);
        h.remove(http::header::VIA);
        h.remove(http::header::ETAG); // ours, from the digest, replaces the origin's
        h
    };
    if let Storability::DontStore(reason) = &decision {
        tracing::info!(key = %job.key, reason = %reason.token(), "origin response will not be stored");
        store.metrics().not_stored.with_label_values(&[&reason.token()]).inc();
    }

    // Validation applies to every successful answer on a validated route, stored or not:
    // a document that fails it never reaches a client as a complete response.
    let mut validator = match &job.validation {
        Some(v) if parts.status.is_success() => {
            if parts.headers.get(http::header::CONTENT_ENCODING).is_some_and(|e| e.as_bytes() != b"identity") {
                return Err(ProxyError::InvalidDocument {
                    token: "content-encoding".into(),
                    reason: "the origin sent an encoded body on a validated route (fills ask for identity); it cannot be checked".into(),
                });
            }
            Some(StreamingValidator::new(v.clone(), job.lote_id.clone()))
        }
        _ => None,
    };
    // What a head sent before the end says: only a validated head, sent at the end, can say
    // whether the entry was stored.
    let early_status = match &decision {
        Storability::Store { .. } => CacheStatus::MissPending,
        Storability::DontStore(reason) => CacheStatus::NotStored(reason.clone()),
    };
    let mut held = None;
    if validator.is_some() {
        held = Some(HeldHead { status: parts.status, headers: parts.headers, requester_only });
    } else {
        fill.publish_head(parts.status, parts.headers, requester_only, early_status.clone());
    }

    let mut writer = match &decision {
        Storability::Store { .. } => match store.begin().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(key = %job.key, error = %e, "cannot open a store write; serving without storing");
                None
            }
        },
        Storability::DontStore(_) => None,
    };
    // The largest body this fill may store: past it, the rest is served and not written.
    let store_limit = match (store.max_size(), job.max_object_size) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut too_large = false;

    let mut body = IdleTimeoutBody::new(body, origin.body_idle_timeout());
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| too_old())? {
            Some(frame) => frame.map_err(ProxyError::OriginFailed)?,
            None => break,
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers are not part of the body
        let mut retained = 0;
        fill.state.send_modify(|s| {
            s.push(data.clone(), config.replay_buffer);
            retained = s.retained;
        });
        if let Some(v) = validator.as_mut() {
            v.feed(&data);
        }
        // A document too large to hold whole: start streaming; the last chunk stays held.
        if retained >= config.replay_buffer / 2 {
            if let Some(h) = held.take() {
                fill.publish_head(h.status, h.headers, h.requester_only, early_status.clone());
            }
        }
        if writer.as_ref().is_some_and(|w| store_limit.is_some_and(|max| w.written() + data.len() as u64 > max)) {
            // Never written past the limit, and nothing evicted for it.
            tracing::info!(key = %job.key, limit = store_limit, "body larger than the route's max_object_size or cache.max_size; serving without storing");
            writer = None;
            too_large = true;
        }
        if let Some(w) = writer.as_mut() {
            if let Err(e) = w.write(&data).await {
                // A cache-side failure never cuts the client's stream: stop storing, keep serving.
                tracing::warn!(key = %job.key, error = %e, "store write failed; serving without storing");
                writer = None;
            }
        }
        // Let subscribers on this worker take the chunk before the next one arrives.
        tokio::task::yield_now().await;
    }
    let gen_ms = started.elapsed().as_millis() as u64;

    let mut cache_status = match &decision {
        Storability::Store { .. } if too_large => CacheStatus::NotStored(NotStored::TooLarge),
        Storability::Store { .. } => CacheStatus::MissStored,
        Storability::DontStore(reason) => CacheStatus::NotStored(reason.clone()),
    };
    if too_large {
        store.metrics().not_stored.with_label_values(&["too-large"]).inc();
    }
    if let Some(v) = validator {
        if let Verdict::Invalid { token, reason, on_fail } = v.finish() {
            tracing::warn!(key = %job.key, lote_id = %job.lote_id, %reason, ?on_fail, "document failed validation; not stored");
            store.metrics().validation_failures.with_label_values(&[&token]).inc();
            if on_fail == OnFail::Abort {
                return Err(ProxyError::InvalidDocument { token, reason });
            }
            if writer.take().is_some() {
                store.metrics().not_stored.with_label_values(&[&token]).inc();
                cache_status = CacheStatus::NotStored(NotStored::Invalid(token));
            }
        }
    }

    // The final chunk is released after the commit attempt: a download that completed as
    // "stored" is on disk by then, and the next request is a hit. A failed commit still
    // completes the client's response.
    let mut stored = None;
    if let (Some(w), Storability::Store { expected_len }) = (writer, &decision) {
        let meta = EntryMeta::new(&job.rule, &job.lote_id, StatusCode::OK, &stored_headers, gen_ms);
        let expect = Expect { len: *expected_len, since_purge: Some(since_purge), ..Expect::default() };
        match w.commit(store, &job.key, meta, expect).await {
            Ok(entry) => {
                tracing::info!(key = %job.key, lote_id = %job.lote_id, size = entry.size, gen_ms, "entry stored");
                if let Some(shared) = shared {
                    shared.write_through(store.clone(), Record::of(&entry), since_purge);
                }
                if let Some(c) = &job.compress {
                    c.submit(&entry);
                }
                stored = Some(entry);
            }
            Err(e) => {
                let reason = match e {
                    super::store::StoreError::TooLarge { .. } => NotStored::TooLarge,
                    super::store::StoreError::Purged => NotStored::Purged,
                    _ => NotStored::StoreError,
                };
                tracing::warn!(key = %job.key, error = %e, "commit failed; nothing stored");
                store.metrics().not_stored.with_label_values(&[&reason.token()]).inc();
                cache_status = CacheStatus::NotStored(reason);
            }
        }
    } else if matches!(decision, Storability::Store { .. }) && cache_status == CacheStatus::MissStored {
        store.metrics().not_stored.with_label_values(&[&NotStored::StoreError.token()]).inc();
        cache_status = CacheStatus::NotStored(NotStored::StoreError);
    }
    if let Some(mut h) = held {
        if let Some(entry) = &stored {
            h.headers.insert(http::header::ETAG, entry.etag.clone());
            h.headers.insert(REPR_DIGEST, entry.repr_digest.clone());
        }
        // The whole body is known now: its length frames it for every client (an HTTP/1.0
        // one could not tell a cut close-delimited body from a complete one).
        let total = fill.state.borrow().total;
        h.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(total));
        fill.publish_head(h.status, h.headers, h.requester_only, cache_status.clone());
    }
    fill.state.send_modify(|s| {
        s.outcome = Some(cache_status);
        s.end = FillEnd::Complete;
    });
    Ok(())
}

/// Waits for the fill's response head (or word that the entry is stored), or its failure.
pub async fn wait_head(rx: &mut watch::Receiver<FillState>) -> Result<Head, Arc<ProxyError>> {
    loop {
        {
            let s = rx.borrow_and_update();
            if let Some(h) = &s.head {
                return Ok(Head::Response(h.clone()));
            }
            match &s.end {
                FillEnd::Failed(e) => return Err(e.clone()),
                FillEnd::Promoted => return Ok(Head::Stored),
                FillEnd::Open | FillEnd::Complete => {}
            }
        }
        if rx.changed().await.is_err() && rx.borrow().head.is_none() {
            return Err(Arc::new(ProxyError::FillAborted));
        }
    }
}

/// Waits until the fill has ended, however it ended.
pub async fn wait_end(mut rx: watch::Receiver<FillState>) {
    while matches!(rx.borrow_and_update().end, FillEnd::Open) {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The fill ended in failure after this subscriber's response had started, or this
/// subscriber fell too far behind.
#[derive(Debug, thiserror::Error)]
#[error("origin fill failed: {0}")]
pub struct FillFailed(String);

enum Step {
    Chunk(Bytes),
    End,
    Fail(String),
    Wait,
}

impl Subscription {
    /// The next thing to do for this subscriber, decided under the state's read lock.
    fn step(&mut self) -> Step {
        let s = self.rx.borrow_and_update();
        if let FillEnd::Failed(e) = &s.end {
            return Step::Fail(format!("{e}: {}", e.detail()));
        }
        if self.cursor.cut.load(Relaxed) {
            return Step::Fail("this download fell more than cache.replay_buffer behind the origin".into());
        }
        let next = self.cursor.next.load(Relaxed);
        let Some(idx) = next.checked_sub(s.base) else {
            return Step::Fail("replay data no longer available".into());
        };
        let complete = matches!(s.end, FillEnd::Complete);
        // While the fill is open, the newest chunk is held back.
        let releasable = if complete { idx < s.chunks.len() } else { idx + 1 < s.chunks.len() };
        if releasable {
            let chunk = s.chunks[idx].clone();
            self.cursor.next.store(next + 1, Relaxed);
            self.cursor.read.fetch_add(chunk.len() as u64, Relaxed);
            Step::Chunk(chunk)
        } else if complete {
            Step::End
        } else {
            Step::Wait
        }
    }

    /// The body this subscriber streams: replay from the start, then live.
    pub fn into_body(self) -> ProxyBody {
        let stream = futures_util::stream::unfold(Some(self), |state| async move {
            let mut sub = state?;
            loop {
                match sub.step() {
                    Step::Chunk(b) => return Some((Ok::<_, BoxError>(Frame::data(b)), Some(sub))),
                    Step::End => return None,
                    Step::Fail(msg) => return Some((Err(Box::new(FillFailed(msg)) as BoxError), None)),
                    Step::Wait => {
                        if sub.rx.changed().await.is_err() && matches!(sub.rx.borrow().end, FillEnd::Open) {
                            let err = Box::new(FillFailed("fill task ended without finishing".into()));
                            return Some((Err(err as BoxError), None));
                        }
                    }
                }
            }
        });
        StreamBody::new(stream).boxed_unsync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_drops_only_what_every_live_subscriber_has_read_and_cuts_laggards() {
        let fill = Fill::new("L");
        let fast = fill.try_subscribe().unwrap();
        let slow = fill.try_subscribe().unwrap();
        let push = |n: u8| fill.state.send_modify(|s| s.push(Bytes::from(vec![n; 10]), 15));
        push(0);
        push(1);
        fast.cursor.next.store(2, Relaxed);
        fast.cursor.read.store(20, Relaxed);
        push(2); // 30 bytes retained > 15: trim; slow lags 20 readable bytes > 15 and is cut
        assert!(slow.cursor.cut.load(Relaxed));
        assert!(!fast.cursor.cut.load(Relaxed));
        let s = fill.state.borrow();
        assert_eq!((s.base, s.chunks.len(), s.retained), (2, 1, 10));
        assert!(s.closed);
        drop(s);
        assert!(fill.try_subscribe().is_none(), "a trimmed fill takes no new subscribers");
    }

    #[tokio::test]
    async fn a_panicking_fill_task_releases_its_waiters_with_an_error() {
        let fills = Arc::new(Fills::new(FillConfig::default(), Arc::default()));
        let fill = Fill::new("L");
        let mut sub = fill.try_subscribe().unwrap();
        let key = ("r".to_string(), "k".to_string());
        fills.inflight.lock().unwrap().insert(key.clone(), fill.clone());
        let guard = FillGuard { fills: fills.clone(), key, fill, queued: false };
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("fill task bug");
        });
        assert!(task.await.unwrap_err().is_panic());
        let err = wait_head(&mut sub.rx).await.unwrap_err();
        assert!(matches!(*err, ProxyError::FillAborted));
        assert!(fills.is_empty(), "the registry entry is removed");
        assert!(matches!(sub.step(), Step::Fail(_)));
    }
}
