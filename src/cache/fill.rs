//! Fills: fetching one entry from the origin in a detached task, fanning its bytes out to
//! every request waiting for it, and committing it to the store.
//!
//! A fill publishes into a `watch` channel holding an append-only list of chunks. Each
//! subscriber keeps its own cursor: it replays from the start, then follows live, never
//! lags and never blocks the fill. The fill is owned by no client: any client may leave
//! at any time. The last chunk is held back from subscribers until the fill has seen the
//! origin body end correctly, so a failed fill never looks like a complete response.

use super::entry::EntryMeta;
use super::policy::{storability, Storability};
use super::status;
use super::store::Store;
use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::origin::{forward_response_headers, IdleTimeoutBody, Origin};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio::sync::watch;

/// The response head of a fill, as sent to subscribers.
#[derive(Debug)]
pub struct FillHead {
    pub status: StatusCode,
    /// Headers for the client (hop-by-hop removed, `Via` added).
    pub headers: HeaderMap,
    /// `Cache-Status` for the request that started the fill.
    pub cache_status: HeaderValue,
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
}

/// Everything subscribers see of a fill.
#[derive(Debug)]
pub struct FillState {
    pub head: Option<Arc<FillHead>>,
    pub chunks: Vec<Bytes>,
    pub end: FillEnd,
}

/// One fill in flight.
pub struct Fill {
    state: watch::Sender<FillState>,
}

impl Fill {
    fn new() -> Arc<Fill> {
        let (state, _) = watch::channel(FillState {
            head: None,
            chunks: Vec::new(),
            end: FillEnd::Open,
        });
        Arc::new(Fill { state })
    }

    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
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

/// The registry of fills in flight, by cache key.
#[derive(Default)]
pub struct Fills {
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
}

/// What a request found when it looked for its key.
pub enum Lookup {
    /// The entry was committed meanwhile.
    Stored(Arc<super::entry::Entry>),
    /// A fill was already running; this request joins it.
    Joined(Arc<Fill>),
    /// This request started the fill.
    Started(Arc<Fill>),
}

/// What a fill needs to run.
pub struct FillJob {
    pub key: String,
    pub lote_id: String,
    /// The rebuilt upstream request (GET, absolute URI, empty body).
    pub request: Request<ProxyBody>,
}

impl Fills {
    /// Joins the fill for `job.key`, or starts one. The store is re-checked under the
    /// registry lock: a fill publishes its entry before leaving the registry, so a request
    /// never sees neither and starts a second generation.
    pub fn join_or_start(
        self: &Arc<Self>,
        store: &Arc<Store>,
        origin: &Origin,
        key: &str,
        job: impl FnOnce() -> FillJob,
    ) -> Lookup {
        let mut inflight = self.inflight.lock().expect("fills lock");
        if let Some(entry) = store.get(key) {
            return Lookup::Stored(entry);
        }
        if let Some(fill) = inflight.get(key) {
            return Lookup::Joined(fill.clone());
        }
        let fill = Fill::new();
        inflight.insert(key.to_string(), fill.clone());
        let guard = FillGuard {
            fills: self.clone(),
            key: key.to_string(),
            fill: fill.clone(),
        };
        tokio::spawn(run(guard, store.clone(), origin.clone(), job()));
        Lookup::Started(fill)
    }

    /// Number of fills in flight.
    pub fn len(&self) -> usize {
        self.inflight.lock().expect("fills lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the fill from the registry when the fill task ends in any way (return, panic,
/// abort), and fails it if it had not ended, so no subscriber waits forever.
struct FillGuard {
    fills: Arc<Fills>,
    key: String,
    fill: Arc<Fill>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.fill.fail(ProxyError::FillAborted);
        let mut inflight = self
            .fills
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inflight
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            inflight.remove(&self.key);
        }
    }
}

/// The fill task: fetch, fan out, write, commit.
async fn run(guard: FillGuard, store: Arc<Store>, origin: Origin, job: FillJob) {
    let fill = guard.fill.clone();
    let started = Instant::now();
    let response = match origin.send(job.request).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(key = %job.key, error = %e, detail = %e.detail(), "fill failed before the response head");
            fill.fail(e);
            return;
        }
    };
    let (mut parts, body) = response.into_parts();
    let decision = storability(parts.status, &parts.headers);
    forward_response_headers(&mut parts.headers);
    let cache_status = match &decision {
        Storability::Store { .. } => status::miss_stored(),
        Storability::DontStore(reason) => status::miss_not_stored(reason),
    };
    let stored_headers = {
        let mut h = parts.headers.clone();
        h.remove(http::header::CONTENT_LENGTH);
        h.remove(http::header::VIA);
        h
    };
    fill.state.send_modify(|s| {
        s.head = Some(Arc::new(FillHead {
            status: parts.status,
            headers: parts.headers,
            cache_status,
        }))
    });

    let mut writer = match &decision {
        Storability::Store { .. } => match store.begin().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(key = %job.key, error = %e, "cannot open a store write; serving without storing");
                None
            }
        },
        Storability::DontStore(reason) => {
            tracing::info!(key = %job.key, reason = %reason, "origin response will not be stored");
            None
        }
    };

    let mut body = IdleTimeoutBody::new(body, origin.body_idle_timeout());
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not part of the stored body
            },
            Err(e) => {
                tracing::warn!(key = %job.key, error = %crate::error::error_chain(e.as_ref()), "origin body failed; nothing stored");
                fill.fail(ProxyError::OriginFailed(e));
                return;
            }
        };
        fill.state.send_modify(|s| s.chunks.push(data.clone()));
        if let Some(w) = writer.as_mut() {
            if let Err(e) = w.write(&data).await {
                // A cache-side failure never cuts the client's stream: stop storing, keep serving.
                tracing::warn!(key = %job.key, error = %e, "store write failed; serving without storing");
                writer = None;
            }
        }
    }
    let gen_ms = started.elapsed().as_millis() as u64;
    // The final chunk is released after the commit attempt: a download that completed as
    // "stored" is on disk by then, and the next request is a hit. A failed commit still
    // completes the client's response.
    if let (Some(w), Storability::Store { expected_len }) = (writer, decision) {
        let meta = EntryMeta::new(&job.lote_id, StatusCode::OK, &stored_headers, gen_ms);
        match w.commit(&store, &job.key, meta, expected_len).await {
            Ok(entry) => {
                tracing::info!(key = %job.key, lote_id = %job.lote_id, size = entry.size, gen_ms, "entry stored")
            }
            Err(e) => tracing::warn!(key = %job.key, error = %e, "commit failed; nothing stored"),
        }
    }
    fill.state.send_modify(|s| s.end = FillEnd::Complete);
    drop(guard);
}

/// Waits for the fill's response head, or its failure.
pub async fn wait_head(
    rx: &mut watch::Receiver<FillState>,
) -> Result<Arc<FillHead>, Arc<ProxyError>> {
    loop {
        {
            let s = rx.borrow_and_update();
            if let Some(h) = &s.head {
                return Ok(h.clone());
            }
            if let FillEnd::Failed(e) = &s.end {
                return Err(e.clone());
            }
        }
        if rx.changed().await.is_err() && rx.borrow().head.is_none() {
            return Err(Arc::new(ProxyError::FillAborted));
        }
    }
}

/// The fill ended in failure after this subscriber's response had started.
#[derive(Debug, thiserror::Error)]
#[error("upstream fill failed: {0}")]
pub struct FillFailed(String);

enum Step {
    Chunk(Bytes),
    End,
    Fail(String),
    Wait,
}

/// The body a subscriber streams: replay from the start, then live; the last chunk is
/// released only once the fill is complete.
pub fn subscriber_body(rx: watch::Receiver<FillState>) -> ProxyBody {
    let stream = futures_util::stream::unfold(Some((rx, 0usize)), |state| async move {
        let (mut rx, cursor) = state?;
        loop {
            let step = {
                let s = rx.borrow_and_update();
                match &s.end {
                    FillEnd::Failed(e) => Step::Fail(format!("{e}: {}", e.detail())),
                    FillEnd::Complete if cursor < s.chunks.len() => {
                        Step::Chunk(s.chunks[cursor].clone())
                    }
                    FillEnd::Complete => Step::End,
                    FillEnd::Open if cursor + 1 < s.chunks.len() => {
                        Step::Chunk(s.chunks[cursor].clone())
                    }
                    FillEnd::Open => Step::Wait,
                }
            };
            match step {
                Step::Chunk(b) => {
                    return Some((Ok::<_, BoxError>(Frame::data(b)), Some((rx, cursor + 1))))
                }
                Step::End => return None,
                Step::Fail(msg) => return Some((Err(Box::new(FillFailed(msg)) as BoxError), None)),
                Step::Wait => {
                    if rx.changed().await.is_err() && matches!(rx.borrow().end, FillEnd::Open) {
                        let err = Box::new(FillFailed("fill task ended without finishing".into()));
                        return Some((Err(err as BoxError), None));
                    }
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}
