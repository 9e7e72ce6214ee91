//! The proxy service: routes each request to the cache, to the origin untouched, or to a
//! rejection. It is a `tower::Service`, one clone per connection carrying the peer address.

use crate::access_log::{self, AccessLog};
use crate::body::{BoxError, ProxyBody};
use crate::cache::status::{CacheStatus, Outcome};
use crate::cache::target::CacheTarget;
use crate::cache::Cache;
use crate::error::ProxyError;
use crate::headers::forward_request_headers;
use crate::metrics::Metrics;
use crate::origin::Origin;
use crate::pool::AfterAnswer;
use crate::rules::{Route, Rules};
use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use std::time::Instant;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

/// The proxy's state, shared by every connection (and the admin API).
pub struct ProxyState {
    /// Replaced on reload; a request keeps the rules it started with.
    pub rules: ArcSwap<Rules>,
    pub cache: Cache,
    pub origin: Origin,
    pub metrics: Arc<Metrics>,
}

/// The per-connection service.
#[derive(Clone)]
pub struct ProxyService {
    state: Arc<ProxyState>,
    peer: SocketAddr,
    /// The connection's hold on origin connections its answers came over.
    after_answer: Arc<AfterAnswer>,
    /// What the connection's socket accepted: access-log lines count bytes really sent.
    written: Arc<access_log::Written>,
}

impl ProxyService {
    pub fn new(
        state: Arc<ProxyState>,
        peer: SocketAddr,
        after_answer: Arc<AfterAnswer>,
        written: Arc<access_log::Written>,
    ) -> Self {
        ProxyService { state, peer, after_answer, written }
    }
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        // Routing needs no waiting: only the chosen branch's future is built and boxed. (One
        // future for every branch would be the size of the largest, the cache path's, and
        // would be copied whole into its box on every request, pass-through ones included.)
        let state = self.state.clone();
        match state.route(req) {
            // Boxed as it is: wrapped in an `async` block, its arguments would be held twice.
            Routed::Pass(req) => Box::pin(state.pass_through(req, self.peer, self.after_answer.clone())),
            Routed::Cache { req, target, started } => {
                let peer = self.peer;
                let written = self.written.clone();
                Box::pin(async move {
                    let lote_id = target.lote_id.clone();
                    let resp = state.cache.handle(req, target, peer).await;
                    Ok(state.finish(resp, lote_id, started, Some(&written)))
                })
            }
            Routed::Answered(resp) => Box::pin(std::future::ready(Ok(resp))),
        }
    }
}

/// Why a request's target is ambiguous, if it is: several `Host` headers, or an
/// absolute-form URI naming another host than `Host` (a front end and the origin could
/// disagree on which site is meant).
fn ambiguous_target<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("several Host headers");
    }
    match (req.uri().authority(), host) {
        (Some(authority), Some(host)) if !authority.as_str().eq_ignore_ascii_case(host.to_str().unwrap_or("")) => {
            Some("the request target names another host than the Host header")
        }
        _ => None,
    }
}

/// Marks a refusal so hyper closes the connection after it: nothing after a malformed
/// request on the same connection is trusted.
fn closing(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    resp
}

/// Where a request goes, decided before anything is awaited. A stack value moved once per
/// request (the chosen branch's future is what gets boxed), so its size matters little.
#[allow(clippy::large_enum_variant)]
enum Routed {
    /// To the origin as it is.
    Pass(Request<Incoming>),
    /// Through the cache; `started` is when the request came in (access log).
    Cache { req: Request<Incoming>, target: CacheTarget, started: Instant },
    /// Nowhere: answered at once (a refusal).
    Answered(Response<ProxyBody>),
}

impl ProxyState {
    fn route(&self, req: Request<Incoming>) -> Routed {
        let started = Instant::now();
        if let Some(problem) = ambiguous_target(&req) {
            self.metrics.outcome.of(Outcome::Rejected).inc();
            let err = ProxyError::BadRequest { detail: problem.into() };
            return Routed::Answered(closing(err.to_response(None)));
        }
        match self.rules.load().route(&req) {
            Route::Pass => {
                self.metrics.outcome.of(Outcome::Pass).inc();
                Routed::Pass(req)
            }
            Route::Reject { rule, error, varies } => {
                tracing::info!(rule = %rule, path = ?req.uri().path(), "cache route request rejected");
                let mut resp = closing(error.to_response(Some(CacheStatus::Rejected(error.token()))));
                if varies {
                    crate::cache::vary_on_accept_encoding(resp.headers_mut());
                }
                Routed::Answered(self.finish(resp, String::new(), started, None))
            }
            Route::Cache(target) => Routed::Cache { req, target, started },
        }
    }

    /// Counts a cache-route answer's outcome and, when the access log is on, wraps its body to
    /// write the log line once the body is sent.
    fn finish(
        &self,
        resp: Response<ProxyBody>,
        lote_id: String,
        started: Instant,
        written: Option<&Arc<access_log::Written>>,
    ) -> Response<ProxyBody> {
        let cache_status = CacheStatus::of(&resp);
        let outcome = cache_status.map_or(Outcome::Error, CacheStatus::outcome);
        self.metrics.outcome.of(outcome).inc();
        // The log wrapper costs an allocation per request: only when the line will be written.
        if !tracing::enabled!(target: "lotecache::access", tracing::Level::INFO) {
            return resp;
        }
        let log = AccessLog {
            lote_id,
            status: resp.status().as_u16(),
            cache_status: cache_status.map(CacheStatus::to_string).unwrap_or_default(),
            outcome,
            started,
            origin_ms: outcome.forwarded().then(|| started.elapsed().as_millis() as u64),
            fill: resp.extensions().get::<crate::cache::fill::FillOutcome>().cloned(),
            content_length: resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        };
        let (parts, body) = resp.into_parts();
        let body = access_log::wrap(body, log, written.map(|w| (w, &parts)));
        Response::from_parts(parts, body)
    }

    /// Forwards a request the cache does not handle: bodies stream both ways. (It owns its
    /// arguments, and is the future boxed for the request as it is: see `call`.)
    async fn pass_through(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        after: Arc<AfterAnswer>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        // The target goes as the client sent it; the upstream writes an absolute-form one in
        // origin-form (one naming another host than `Host` was refused before routing).
        let (mut parts, body) = req.into_parts();
        parts.version = Version::HTTP_11;
        forward_request_headers(&mut parts.headers, peer);
        // A request without a body (most of them) has none to fail: nothing to set up.
        if body.is_end_stream() {
            let empty = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
            return Ok(match self.origin.send_for(Request::from_parts(parts, empty), Some(&after)).await {
                Ok(resp) => self.origin.relay(resp).await,
                Err(e) => e.to_response(None),
            });
        }
        // Remember a failure of the client's own body, to answer 400 rather than 502.
        let body_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let seen = body_error.clone();
        let body = body
            .map_err(move |e| -> BoxError {
                *seen.lock().expect("body error slot") = Some(e.to_string());
                Box::new(e)
            })
            .boxed_unsync();
        Ok(match self.origin.send_for(Request::from_parts(parts, body), Some(&after)).await {
            Ok(resp) => self.origin.relay(resp).await,
            Err(e) => match body_error.lock().expect("body error slot").take() {
                Some(detail) => closing(ProxyError::MalformedBody { detail }.to_response(None)),
                None => e.to_response(None),
            },
        })
    }
}
