//! The cache path of a request on a cache route: hit (verified read from the store) or
//! miss (join or start a fill, then stream from it).

pub mod access;
pub mod compress;
pub mod entry;
pub mod fill;
pub mod index;
pub mod negotiate;
pub mod policy;
pub mod range;
pub mod read;
pub mod shared;
pub mod status;
pub mod store;
pub mod target;
pub mod tier;
pub mod validate;

use crate::body::{empty, full, ProxyBody};
use crate::error::ProxyError;
use crate::headers::forward_request_headers;
use crate::origin::Origin;
use access::{Access, AccessChecks};
use compress::Compressor;
use entry::Entry;
use fill::{wait_end, wait_head, FillConfig, FillJob, Fills, Head, Lookup, Subscription};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use negotiate::{AcceptEncoding, CompressionConfig};
use range::RangeAnswer;
use status::{CacheStatus, NotStored};
use std::{net::SocketAddr, sync::Arc};
use store::Store;
use target::{AccessPolicy, CacheTarget};

/// Request headers never sent on a fill, even when a rule lists them: a fill fetches the
/// whole, identity-encoded representation, whatever the request that started it asked for.
const NOT_FORWARDED_ON_FILL: [header::HeaderName; 7] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::ACCEPT_ENCODING,
];

/// Longest a hit may take to open and verify its entry before it answers `503` (the file
/// table full, a disk stalled): a hit never hangs behind the fills or the blocking pool.
const HIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The cache: its store, its fills in flight, the origin it fills from, and the pool that
/// builds compressed variants.
pub struct Cache {
    pub store: Arc<Store>,
    pub fills: Arc<Fills>,
    origin: Origin,
    compressor: Arc<Compressor>,
    /// The access checks' kept decisions.
    access: AccessChecks,
}

impl Cache {
    pub fn new(store: Arc<Store>, origin: Origin, fill: FillConfig) -> Self {
        let fills = Arc::new(Fills::new(fill, store.metrics().clone()));
        let compressor = Compressor::new(store.clone());
        Cache { store, fills, origin, compressor, access: AccessChecks::default() }
    }

    /// Compressions queued or running.
    pub fn compressions_pending(&self) -> usize {
        self.compressor.pending()
    }

    /// Starts the fill of `target` without a client, unless its entry is stored (and fresh)
    /// or being fetched: a click arriving meanwhile joins it. The fill carries the rule's
    /// service headers only; what it fetches is stored under the rule's usual conditions
    /// (a refusal or an error from the backend is not).
    pub fn warm(&self, target: &CacheTarget) -> Warmed {
        let is_fresh = |e: &Entry| target.is_fresh(e.stored_at_ms);
        // None: stored, and left memory meanwhile: look again.
        (0..3).find_map(|_| self.warm_once(target, is_fresh)).unwrap_or(Warmed::Stored)
    }

    /// One round of [`Cache::warm`]; None: look again.
    fn warm_once(&self, target: &CacheTarget, is_fresh: impl Fn(&Entry) -> bool) -> Option<Warmed> {
        match self.store.get_for(&target.rule, &target.key) {
            Ok(Some(e)) if is_fresh(&e) => return Some(Warmed::Stored),
            Ok(_) => {}
            // Unknown whether it is stored: not generated again on a guess.
            Err(e) => return Some(Warmed::Busy(format!("the store's index could not be read: {e}"))),
        }
        // Warms take only free fill slots: they never queue ahead of users' clicks. They run
        // on the admin thread, whose own slots are `max_fills_per_worker`: the smaller bound.
        let config = self.fills.config();
        let free = config.max_fills.min(config.max_fills_per_worker);
        if self.fills.len() >= free {
            return Some(Warmed::Busy(format!(
                "{free} fills are under way (cache.max_fills = {}, cache.max_fills_per_worker = {}); a warm queues behind none: try again shortly",
                config.max_fills, config.max_fills_per_worker
            )));
        }
        let lookup = self.fills.join_or_start(&self.store, &self.origin, &target.rule, &target.key, is_fresh, || {
            self.fill_job_for(None, target)
        });
        Some(match lookup {
            Lookup::Stored(_) => Warmed::Stored,
            // The fill runs on without its subscriber (it is detached from every client).
            Lookup::Started(_) => Warmed::Started,
            Lookup::Joined(_) | Lookup::Closed(_) => Warmed::InFlight,
            Lookup::Busy(e) => Warmed::Busy(e.detail()),
            Lookup::LookAgain => return None,
        })
    }

    /// Stops the background work that holds the store: the compression pool.
    pub async fn stop_background(&self) {
        self.compressor.stop().await;
    }

    /// Answers a request on a cache route.
    pub async fn handle<B>(&self, req: Request<B>, target: CacheTarget, peer: SocketAddr) -> Response<ProxyBody> {
        // A client that cannot tell a cut body from a complete one gets only framed bodies.
        let unframed_ok = req.version() >= http::Version::HTTP_11;
        let mut resp = self.answer(req, &target, peer).await;
        if !unframed_ok {
            resp = self.framed_for_http10(resp, &target).await;
        }
        // Every answer of a route with variants depends on Accept-Encoding (RFC 9110 §12.5.5),
        // also a miss or a refusal: a shared cache downstream must not hand it to others.
        if !target.compression.is_off() {
            vary_on_accept_encoding(resp.headers_mut());
        }
        resp
    }

    /// Runs the rule's access policy, then the cache path.
    async fn answer<B>(&self, req: Request<B>, target: &CacheTarget, peer: SocketAddr) -> Response<ProxyBody> {
        match &target.access {
            AccessPolicy::Public => {}
            AccessPolicy::CredentialsBypass => {
                if target.headers.carries_credentials(req.headers()) {
                    return self.bypass(&req, target, peer).await;
                }
            }
            AccessPolicy::Auth(auth) => {
                let metrics = self.store.metrics();
                match self.access.check(&self.origin, metrics, req.headers(), target, auth, peer).await {
                    Access::Refused(refusal) => return refusal,
                    Access::Allowed { cached: false } => {}
                    Access::Allowed { cached: true } => {
                        let mut resp = self.serve(req, target, peer).await;
                        access::mark_access_cached(&mut resp);
                        return resp;
                    }
                }
            }
        }
        self.serve(req, target, peer).await
    }

    /// The cache path of a request allowed to be served: a hit, or a miss through a fill.
    async fn serve<B>(&self, req: Request<B>, target: &CacheTarget, peer: SocketAddr) -> Response<ProxyBody> {
        let head_only = req.method() == Method::HEAD;
        let cond = HitConditions::of(req.headers(), head_only, &target.compression);
        let cond = &cond;
        let is_fresh = |e: &Entry| target.is_fresh(e.stored_at_ms);
        // An expired entry is kept aside: it is served if the refetch fails (stale-if-error).
        let mut stale = None;
        let stored = match self.store.lookup_for(&target.rule, &target.key).await {
            Ok(stored) => stored,
            Err(e) => return unreadable_index(e),
        };
        if let Some(entry) = stored {
            if !is_fresh(&entry) {
                stale = target.stale_if_error.then_some(entry);
            } else {
                match self.serve_hit(entry, cond).await {
                    Served::Response(resp) => return resp,
                    Served::Gone => {}
                }
            }
        }
        if only_if_cached(req.headers()) {
            let err = ProxyError::NotCached;
            return err.to_response(Some(CacheStatus::Rejected(err.token())));
        }
        let wait_timeout = self.fills.config().wait_timeout;
        let mut waited = false;
        // Set once a fill copied the entry from the shared store.
        let mut from_shared = false;
        // A few rounds at most: a stored entry may be evicted under us, and a fill past its
        // replay buffer is waited for, then looked up again.
        for _ in 0..3 {
            // Brings the entry into memory (a file read, off this thread) so that the check
            // under the fill registry's lock below finds it there.
            if let Err(e) = self.store.lookup(&target.key).await {
                return unreadable_index(e);
            }
            let lookup =
                self.fills.join_or_start(&self.store, &self.origin, &target.rule, &target.key, is_fresh, || {
                    self.fill_job(&req, target, peer)
                });
            let (sub, collapsed, requester) = match lookup {
                Lookup::Stored(entry) => {
                    if let Served::Response(mut resp) = self.serve_hit(entry, cond).await {
                        if resp.status().is_success() || resp.status() == http::StatusCode::NOT_MODIFIED {
                            if from_shared {
                                CacheStatus::SharedHit.set_on(&mut resp);
                            } else if waited {
                                CacheStatus::Collapsed.set_on(&mut resp);
                            }
                        }
                        return resp;
                    }
                    continue;
                }
                Lookup::Started(sub) => (sub, None, true),
                Lookup::Joined(sub) => (sub, Some(CacheStatus::Collapsed), false),
                Lookup::LookAgain => continue,
                Lookup::Busy(err) => {
                    // No fill may start: an expired entry kept for stale-if-error serves instead.
                    let resp = err.to_response(Some(CacheStatus::NotStored(NotStored::Failed(err.token()))));
                    return self.stale_or(stale.take(), resp, cond, target).await;
                }
                Lookup::Closed(rx) => {
                    waited = true;
                    if tokio::time::timeout(wait_timeout, wait_end(rx)).await.is_err() {
                        let err = ProxyError::WaitTimeout;
                        return err.to_response(Some(CacheStatus::NotStored(NotStored::Failed(err.token()))));
                    }
                    continue;
                }
            };
            return match respond_from_fill(sub, head_only, collapsed, requester, wait_timeout).await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    from_shared = true;
                    continue;
                }
                Err((_, resp)) => self.stale_or(stale.take(), resp, cond, target).await,
            };
        }
        let err = ProxyError::FillAborted;
        err.to_response(Some(CacheStatus::NotStored(NotStored::Failed(err.token()))))
    }

    /// `failed` (an origin failure, or no fill slot), unless `stale`, an expired entry kept
    /// for stale-if-error, can be served in its place.
    async fn stale_or(
        &self,
        stale: Option<Arc<Entry>>,
        failed: Response<ProxyBody>,
        cond: &HitConditions,
        target: &CacheTarget,
    ) -> Response<ProxyBody> {
        let Some(entry) = stale else { return failed };
        let origin_status = failed.status().as_u16();
        match self.serve_hit(entry, cond).await {
            Served::Response(mut resp)
                if resp.status().is_success() || resp.status() == http::StatusCode::NOT_MODIFIED =>
            {
                tracing::warn!(key = %target.key, origin_status, "no fresh answer; serving the expired entry");
                CacheStatus::Stale { origin_status }.set_on(&mut resp);
                resp
            }
            _ => failed,
        }
    }

    /// Serves a stored entry under the request's conditions: `304` (`If-None-Match`), `412`
    /// (`If-Match`), `206` or `416` (`Range`, GET only), else the whole entry. `Gone` if its
    /// content proved bad (missing, wrong size or digest, changed): it is then evicted and the
    /// caller fetches it again. A read that failed without proving anything (file table full,
    /// I/O error, past the hit deadline) answers `503` and keeps the entry. Every answer that
    /// sends no body (`HEAD`, `304`, `412`, `416`) verifies the content too, so no answer vouches
    /// for an entry that could not be served.
    ///
    /// The representation served is the one `Accept-Encoding` selects among the entry's
    /// variants the rule offers (see [`negotiate`]); conditions and ranges apply to it. A
    /// variant that proves bad is dropped, and the body it was built from answers instead.
    async fn serve_hit(&self, stored: Arc<Entry>, cond: &HitConditions) -> Served {
        let rep = self.representation(&stored, cond);
        if rep.coding.is_none() {
            return self.serve_representation(&stored, rep, cond).await;
        }
        match self.serve_representation(&stored, rep, cond).await {
            Served::Gone => self.serve_representation(&stored, stored.clone(), cond).await,
            served => served,
        }
    }

    /// [`Cache::serve_hit`] with `entry`, `stored` itself or one of its variants.
    async fn serve_representation(&self, stored: &Arc<Entry>, entry: Arc<Entry>, cond: &HitConditions) -> Served {
        // RFC 9110 §13.2.2: If-Match first, then If-None-Match, then Range.
        let failed_precondition = range::if_match_fails(cond.if_match.as_ref(), &entry.etag);
        let not_modified =
            !failed_precondition && cond.if_none_match.as_ref().is_some_and(|v| etag_matches(v, &entry.etag));
        let part =
            match entry.status == http::StatusCode::OK && !cond.head_only && !not_modified && !failed_precondition {
                true => range::answer(cond.range.as_ref(), cond.if_range.as_ref(), &entry.etag, entry.size),
                false => RangeAnswer::Whole,
            };
        let bodiless = cond.head_only || not_modified || failed_precondition || part == RangeAnswer::Unsatisfiable;
        let read = async {
            if bodiless {
                read::verify(&self.store, entry.clone()).await.map(|()| bytes::Bytes::new())
            } else {
                read::open(self.store.clone(), entry.clone()).await
            }
        };
        let bytes = match tokio::time::timeout(HIT_DEADLINE, read).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) if e.proves_bad_content() => {
                self.store.metrics().integrity_failures.with_label_values(&[e.reason()]).inc();
                self.store.evict(&entry, e.reason()).await;
                return Served::Gone;
            }
            Ok(Err(e)) => {
                self.store.metrics().read_errors.inc();
                let err = ProxyError::StoreUnavailable { detail: format!("reading the stored entry failed: {e}") };
                return Served::Response(err.to_response(Some(CacheStatus::HitFailed(err.token()))));
            }
            Err(_) => {
                self.store.metrics().read_errors.inc();
                let err = ProxyError::StoreUnavailable {
                    detail: format!("the stored entry could not be opened and verified within {HIT_DEADLINE:?}"),
                };
                return Served::Response(err.to_response(Some(CacheStatus::HitFailed(err.token()))));
            }
        };
        entry.touch();
        if entry.coding.is_some() {
            stored.touch(); // the entry's LRU clock and hit count cover its variants' hits
        }
        self.store.metrics().hit_encoding(entry.coding).inc();
        self.store.metrics().origin_seconds_saved.inc_by(entry.gen_ms as f64 / 1000.0);
        self.store.metrics().origin_bytes_saved.inc_by(stored.size);
        let refusal = match part {
            _ if failed_precondition => Some(ProxyError::PreconditionFailed),
            RangeAnswer::Unsatisfiable => Some(ProxyError::RangeNotSatisfiable { len: entry.size }),
            _ => None,
        };
        if let Some(err) = refusal {
            let mut resp = err.to_response(Some(CacheStatus::Hit));
            resp.headers_mut().insert(header::ETAG, entry.etag.clone());
            resp.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            return Served::Response(resp);
        }
        let mut resp = Response::new(empty());
        *resp.headers_mut() = hit_headers(&entry);
        // The header is in the entry's stored hit head; the extension is what metrics read.
        resp.extensions_mut().insert(CacheStatus::Hit);
        if entry.status == http::StatusCode::OK {
            resp.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        match part {
            _ if not_modified => {
                *resp.status_mut() = http::StatusCode::NOT_MODIFIED;
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            RangeAnswer::Part { start, end } => {
                *resp.status_mut() = http::StatusCode::PARTIAL_CONTENT;
                resp.headers_mut().insert(header::CONTENT_RANGE, range::content_range(Some((start, end)), entry.size));
                // Stored origin headers that describe the whole body would be wrong on a part
                // (`Repr-Digest` describes the representation, so it stays).
                for name in ["content-md5", "content-digest"] {
                    resp.headers_mut().remove(name);
                }
                resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
                // A slice of verified bytes: of the memory copy, or of the mapped file, whose
                // writes go out with sendfile at this offset (see `crate::sendfile`).
                *resp.body_mut() = full(bytes.slice(start as usize..=end as usize));
            }
            _ => {
                *resp.status_mut() = entry.status;
                if !bodiless {
                    *resp.body_mut() = full(bytes);
                }
            }
        }
        Served::Response(resp)
    }

    /// The representation of `stored` to serve: a variant the rule offers and the request
    /// prefers, else the identity body. A coding the request accepts that the entry lacks is
    /// built in the background for later requests.
    fn representation(&self, stored: &Arc<Entry>, cond: &HitConditions) -> Arc<Entry> {
        let Some(offer) = cond.offer.as_ref().filter(|o| !o.is_off()) else { return stored.clone() };
        let Some(accept) = cond.accept_encoding.as_ref() else { return stored.clone() };
        let all_tried =
            stored.compress_tried().load(std::sync::atomic::Ordering::Relaxed) & offer.bits() == offer.bits();
        if !all_tried && offer.offered().any(|c| stored.variant_in(c).is_none() && accept.accepts(c)) {
            self.compressor.submit(stored, offer);
        }
        let available = offer.offered().filter(|&c| stored.variant_in(c).is_some());
        match accept.choose(available).and_then(|c| stored.variant_in(c)) {
            Some(variant) => variant.clone(),
            None => stored.clone(),
        }
    }

    /// `resp` for a client that cannot detect a cut body (HTTP/1.0): a body without a
    /// `Content-Length` is read whole first (up to half the replay buffer) and sent with
    /// one; a larger one is served from the store once its fill committed it, or refused.
    /// Never a close-delimited body that might end early and look complete.
    async fn framed_for_http10(&self, resp: Response<ProxyBody>, target: &CacheTarget) -> Response<ProxyBody> {
        use http_body::Body as _;
        use http_body_util::BodyExt as _;
        if resp.headers().contains_key(header::CONTENT_LENGTH) || resp.body().is_end_stream() {
            return resp;
        }
        let cap = (self.fills.config().replay_buffer / 2) as usize;
        let cs = CacheStatus::of(&resp).cloned();
        let (mut parts, mut body) = resp.into_parts();
        let mut whole = bytes::BytesMut::new();
        let mut over = false;
        let ended = loop {
            match body.frame().await {
                None => break Ok(()),
                Some(Err(e)) => break Err(e.to_string()),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if !over && whole.len() + data.len() > cap {
                        over = true;
                        whole = bytes::BytesMut::new();
                    }
                    if !over {
                        whole.extend_from_slice(&data);
                    }
                }
            }
        };
        let refuse = |detail: String| {
            let err = ProxyError::Unframed { detail };
            err.to_response(Some(CacheStatus::NotStored(NotStored::Failed(err.token()))))
        };
        match ended {
            Err(e) => refuse(format!(
                "the download failed before its end ({e}); an HTTP/1.0 client could not tell the cut body from a complete one"
            )),
            Ok(()) if !over => {
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
                Response::from_parts(parts, full(whole.freeze()))
            }
            Ok(()) => {
                // Read to its end: the fill committed (or declined) the entry by now.
                if let Ok(Some(entry)) = self.store.lookup_for(&target.rule, &target.key).await {
                    if let Served::Response(mut hit) = self.serve_hit(entry, &HitConditions::default()).await {
                        if let Some(cs) = cs.filter(|_| hit.status().is_success()) {
                            cs.set_on(&mut hit);
                        }
                        return hit;
                    }
                }
                refuse(format!(
                    "the document has no Content-Length, is larger than {cap} bytes and was not stored; an HTTP/1.0 client cannot be sent it safely"
                ))
            }
        }
    }

    /// A credentialed request on a rule with no access policy: forwarded with its headers
    /// (rebuilt URI), answered by the origin, never stored, never joined to another user's
    /// fetch.
    async fn bypass<B>(&self, req: &Request<B>, target: &CacheTarget, peer: SocketAddr) -> Response<ProxyBody> {
        let mut headers = req.headers().clone();
        forward_request_headers(&mut headers, peer);
        let mut to_origin = Request::new(empty());
        *to_origin.method_mut() = req.method().clone();
        *to_origin.uri_mut() = self.origin.uri(&target.origin_path).expect("rebuilt origin path is a valid URI");
        *to_origin.headers_mut() = headers;
        let cs = CacheStatus::Bypass("credentials");
        match self.origin.send(to_origin).await {
            Ok(resp) => with_cache_status(self.origin.relay(resp).await, cs),
            Err(e) => e.to_response(Some(cs)),
        }
    }

    /// The fill for `req`: a request of its own, carrying only the rule's forwarded headers
    /// and, on a rule with an access check (which this request passed), its credentials.
    fn fill_job<B>(&self, req: &Request<B>, target: &CacheTarget, peer: SocketAddr) -> FillJob {
        self.fill_job_for(Some((req.headers(), peer)), target)
    }

    /// The fill of `target` on behalf of `client` (its headers and address), or of nobody (a
    /// warm): the rule's service headers in either case.
    fn fill_job_for(&self, client: Option<(&HeaderMap, SocketAddr)>, target: &CacheTarget) -> FillJob {
        let policy = &target.headers;
        let credentials_forwarded = client.is_some() && matches!(target.access, AccessPolicy::Auth { .. });
        let mut headers = HeaderMap::new();
        if let Some((client_headers, peer)) = client {
            let forwarded = policy.forward.iter().filter(|n| !policy.credentials.contains(n));
            let credentials = policy.credentials.iter().filter(|_| credentials_forwarded);
            for name in forwarded.chain(credentials) {
                if NOT_FORWARDED_ON_FILL.contains(name) {
                    continue;
                }
                for v in client_headers.get_all(name) {
                    headers.append(name.clone(), v.clone());
                }
            }
            forward_request_headers(&mut headers, peer);
        }
        for (name, value) in &policy.service {
            headers.insert(name.clone(), value.clone());
        }
        let mut request = Request::new(empty());
        *request.method_mut() = Method::GET;
        // The path was built by the rules from a validated id; it always forms a valid URI.
        *request.uri_mut() = self.origin.uri(&target.origin_path).expect("rebuilt origin path is a valid URI");
        *request.headers_mut() = headers;
        FillJob {
            rule: target.rule.clone(),
            key: target.key.clone(),
            lote_id: target.lote_id.clone(),
            credentials_forwarded,
            max_object_size: target.max_object_size,
            request,
            validation: target.validation.clone(),
            ignore: target.ignore,
            ttl: target.ttl,
            as_service: !policy.service.is_empty(),
            compress: (!target.compression.is_off()).then(|| compress::AfterCommit {
                compressor: self.compressor.clone(),
                config: target.compression.clone(),
            }),
        }
    }
}

/// Streams a fill's response to one request; `cache_status` overrides the fill's own.
/// `None`: the fill put the entry in the local store (from the shared one); serve it.
/// `Err` carries the origin's failure (its status, and the response to send when no stale
/// entry can stand in): a fill error before the head, or a 5xx head.
/// `requester`: this request started the fill, so the origin's per-request headers
/// (`Set-Cookie`, …) answer it; a joiner never gets them.
async fn respond_from_fill(
    mut sub: Subscription,
    head_only: bool,
    cache_status: Option<CacheStatus>,
    requester: bool,
    wait_timeout: std::time::Duration,
) -> Result<Option<Response<ProxyBody>>, (u16, Response<ProxyBody>)> {
    let head = match tokio::time::timeout(wait_timeout, wait_head(&mut sub.rx)).await {
        Ok(Ok(Head::Response(h))) => h,
        Ok(Ok(Head::Stored)) => return Ok(None),
        Ok(Err(e)) => {
            let resp = e.to_response(Some(CacheStatus::NotStored(NotStored::Failed(e.token()))));
            return Err((resp.status().as_u16(), resp));
        }
        Err(_) => {
            let err = ProxyError::WaitTimeout;
            return Err((
                err.status().as_u16(),
                err.to_response(Some(CacheStatus::NotStored(NotStored::Failed(err.token())))),
            ));
        }
    };
    let server_error = head.status.is_server_error();
    let outcome = fill::FillOutcome(sub.rx.clone());
    // A HEAD request drops its subscription here, so it pins no replay data.
    let body = if head_only {
        drop(sub);
        empty()
    } else {
        sub.into_body()
    };
    if head_only && !server_error {
        // A head without a body vouches for a body: wait for the fill's verdict (a document
        // that fails validation after its head went out ends the fill in an error).
        let ended = tokio::time::timeout(wait_timeout, wait_end(outcome.0.clone())).await;
        let failed = match &outcome.0.borrow().end {
            fill::FillEnd::Failed(e) => Some(e.clone()),
            _ if ended.is_err() => Some(Arc::new(ProxyError::WaitTimeout)),
            _ => None,
        };
        if let Some(e) = failed {
            let resp = e.to_response(Some(CacheStatus::NotStored(NotStored::Failed(e.token()))));
            return Err((resp.status().as_u16(), resp));
        }
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers.clone();
    if requester {
        for (name, value) in &head.requester_only {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp.extensions_mut().insert(outcome);
    cache_status.unwrap_or_else(|| head.cache_status.clone()).set_on(&mut resp);
    if server_error {
        Err((head.status.as_u16(), resp))
    } else {
        Ok(Some(resp))
    }
}

/// `Cache-Control: only-if-cached`: answer from the store or not at all.
fn only_if_cached(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("only-if-cached"))
}

/// The request headers that decide how a stored entry is answered, and the variants its
/// rule offers.
#[derive(Default)]
struct HitConditions {
    head_only: bool,
    accept_encoding: Option<AcceptEncoding>,
    /// None: identity only.
    offer: Option<Arc<CompressionConfig>>,
    if_none_match: Option<HeaderValue>,
    if_match: Option<HeaderValue>,
    range: Option<HeaderValue>,
    if_range: Option<HeaderValue>,
}

impl HitConditions {
    fn of(headers: &HeaderMap, head_only: bool, offer: &Arc<CompressionConfig>) -> HitConditions {
        // List headers may come as several lines: one list (an unreadable line makes it so).
        let list = |name| {
            let mut lines = headers.get_all(name).iter();
            let first = lines.next()?.clone();
            let joined = lines.try_fold(first, |joined, line| {
                let (a, b) = (joined.to_str().ok()?, line.to_str().ok()?);
                HeaderValue::from_str(&format!("{a}, {b}")).ok()
            });
            // An unreadable line: a tag no representation has.
            Some(joined.unwrap_or(HeaderValue::from_static("\"\"")))
        };
        // One `Range` line only: several are not one range (the whole document is sent).
        let range = match headers.get_all(header::RANGE).iter().count() {
            1 => headers.get(header::RANGE).cloned(),
            _ => None,
        };
        HitConditions {
            head_only,
            accept_encoding: AcceptEncoding::of(headers),
            offer: Some(offer.clone()),
            if_none_match: list(header::IF_NONE_MATCH),
            if_match: list(header::IF_MATCH),
            range,
            if_range: headers.get(header::IF_RANGE).cloned(),
        }
    }
}

/// What a warm did for one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warmed {
    /// Already stored (and fresh): nothing to do.
    Stored,
    /// A fill for it was under way: left to finish.
    InFlight,
    /// A fill was started.
    Started,
    /// No fill could start now (the fill queue is full): why.
    Busy(String),
}

impl Warmed {
    /// The word the admin API answers with.
    pub fn token(&self) -> &'static str {
        match self {
            Warmed::Stored => "stored",
            Warmed::InFlight => "in-flight",
            Warmed::Started => "started",
            Warmed::Busy(_) => "busy",
        }
    }
}

/// What serving a stored entry came to.
enum Served {
    /// The answer: the entry, a `304`, or a `503` when the store could not be read.
    Response(Response<ProxyBody>),
    /// The entry proved bad and was evicted: fetch it again.
    Gone,
}

/// Adds `Accept-Encoding` to `Vary` unless it is there already (or `Vary: *`).
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("accept-encoding"));
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

fn with_cache_status(mut resp: Response<ProxyBody>, cs: CacheStatus) -> Response<ProxyBody> {
    cs.set_on(&mut resp);
    resp
}

/// `If-None-Match` (weak comparison, RFC 9110 §13.1.2) against our strong `etag`.
fn etag_matches(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = if_none_match.to_str() else { return false };
    let ours = etag.to_str().unwrap_or_default();
    list.split(',').map(str::trim).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == ours)
}

/// The entry's hit head plus `Age`.
fn hit_headers(entry: &Entry) -> HeaderMap {
    let mut h = entry.headers.clone();
    let age_s = (crate::clock::now_ms().saturating_sub(entry.stored_at_ms) / 1000) as u64;
    h.insert(header::AGE, HeaderValue::from(age_s));
    h
}

/// The answer when the store's index could not be read for a request: `503`, never a fill (the
/// batch may well be stored; generating it again on a guess is what the cache is for avoiding).
fn unreadable_index(e: store::StoreError) -> Response<ProxyBody> {
    let err = ProxyError::StoreUnavailable { detail: format!("the store's index could not be read: {e}") };
    err.to_response(Some(CacheStatus::HitFailed(err.token())))
}
