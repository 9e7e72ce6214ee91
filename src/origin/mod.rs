//! The origin client: requests over [`crate::pool`]'s connections to the configured origin, the
//! timeouts hyper does not have (response head, body idle), readiness, and access-check
//! subrequests to any URL. Header rewriting lives in [`crate::headers`]; body wrappers in [`body`].

pub mod body;

use crate::body::ProxyBody;

use crate::error::ProxyError;
use crate::headers::{forward_response_headers, framing_problem, MalformedResponse};
use crate::metrics::Metrics;
use crate::pool::{AfterAnswer, OriginPool, PoolError, Reuse};
use body::{FirstFrameRead, IdleTimeoutBody, HEAD_WAITS_FOR_BODY};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};
use std::{future::Future, time::Duration};

#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// `http://host:port`, no path.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    pub connect_timeout: Duration,
    /// Time allowed from sending the request to receiving the response head.
    pub response_timeout: Duration,
    /// Longest silence allowed between two body frames from the origin.
    pub body_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

/// A pooled HTTP/1.1 client bound to one origin.
#[derive(Clone)]
pub struct Origin {
    pool: Arc<OriginPool>,
    /// Access checks may name another host: a general client for those.
    client: Client<HttpConnector, ProxyBody>,
    config: OriginConfig,
    metrics: Arc<Metrics>,
    /// Unix ms of the last response head received from the origin (readiness).
    last_ok_ms: Arc<AtomicU64>,
}

impl Origin {
    pub fn new(config: OriginConfig, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let pool = Arc::new(OriginPool::new(
            config.authority.clone(),
            config.connect_timeout,
            config.pool_idle_timeout,
            config.pool_max_idle_per_host,
        ));
        Origin { pool, client, config, metrics, last_ok_ms: Arc::default() }
    }

    /// Whether the origin answered within `recent`, or accepts a TCP connection now.
    pub async fn reachable(&self, recent: Duration) -> bool {
        let last = self.last_ok_ms.load(Relaxed) as u128;
        if last > 0 && crate::clock::now_ms().saturating_sub(last) < recent.as_millis() {
            return true;
        }
        let addr = self.config.authority.as_str().to_string();
        matches!(
            tokio::time::timeout(self.config.connect_timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        )
    }

    pub fn authority(&self) -> &http::uri::Authority {
        &self.config.authority
    }

    /// A request to any absolute URI with this client (access checks), within `timeout`.
    pub async fn subrequest(
        &self,
        req: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::OriginTimeout { phase: "access check" }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(ProxyError::OriginUnreachable(Box::new(e))),
            Ok(Err(e)) => Err(ProxyError::OriginFailed(Box::new(e))),
        }
    }

    /// The absolute URI of `path_and_query` on the origin.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, ProxyError> {
        Uri::builder()
            .scheme(self.config.scheme.clone())
            .authority(self.config.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::BadRequest { detail: format!("cannot build the origin URI: {e}") })
    }

    /// The longest silence allowed between two body frames.
    pub fn body_idle_timeout(&self) -> Duration {
        self.config.body_idle_timeout
    }

    /// An origin response passed on as it came: hop-by-hop headers removed, `Via` added, the
    /// body streamed under the idle timeout. The head waits (briefly) for the body's first
    /// bytes so both leave in one write: see [`FirstFrameRead`].
    pub async fn relay(&self, resp: Response<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        forward_response_headers(&mut parts.headers);
        let body = FirstFrameRead::read(body, HEAD_WAITS_FOR_BODY).await;
        let body = IdleTimeoutBody::new(body, self.config.body_idle_timeout);
        Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
    }

    /// Sends `req` (already rewritten; an absolute or origin-form target) and waits for the
    /// response head, at most the configured response timeout.
    pub fn send(&self, req: Request<ProxyBody>) -> impl Future<Output = Result<Response<Incoming>, ProxyError>> + '_ {
        self.send_for(req, None)
    }

    /// [`Origin::send`] for a client connection waiting on the answer directly: should the
    /// origin end the connection, it is closed after that client's answer is written.
    ///
    /// The pool's future with a closure after it, not an `async fn`: that would hold the
    /// request a second time, and the future grows the one boxed for every pass-through request.
    pub fn send_for<'a>(
        &'a self,
        req: Request<ProxyBody>,
        after: Option<&'a Arc<AfterAnswer>>,
    ) -> impl Future<Output = Result<Response<Incoming>, ProxyError>> + 'a {
        let started = std::time::Instant::now();
        let sent = self.pool.send(req, after, self.config.response_timeout);
        futures_util::FutureExt::map(sent, move |sent| self.answered(sent, started))
    }

    /// The outcome of a request sent at `started`: the head checked, the connection kept for
    /// reuse if it may be, and the metrics told.
    fn answered(
        &self,
        sent: Result<(Response<Incoming>, Reuse), PoolError>,
        started: std::time::Instant,
    ) -> Result<Response<Incoming>, ProxyError> {
        let result = match sent {
            Err(PoolError::ResponseTimeout) => Err(ProxyError::OriginTimeout { phase: "response head" }),
            // Not kept, a refused response's connection is discarded: never reused.
            Ok((resp, reuse)) => match framing_problem(resp.headers()) {
                Some(problem) => Err(ProxyError::OriginFailed(Box::new(MalformedResponse(problem)))),
                None => {
                    reuse.keep(&resp);
                    Ok(resp)
                }
            },
            Err(e) if e.is_connect() => Err(ProxyError::OriginUnreachable(Box::new(e))),
            Err(e) => Err(ProxyError::OriginFailed(Box::new(e))),
        };
        match &result {
            Ok(resp) => {
                self.metrics.origin_latency.observe(started.elapsed().as_secs_f64());
                self.last_ok_ms.store(crate::clock::now_ms() as u64, Relaxed);
                if resp.status().is_server_error() {
                    self.metrics.origin_errors.with_label_values(&["status-5xx"]).inc();
                }
            }
            Err(e) => self.metrics.origin_errors.with_label_values(&[&e.token()]).inc(),
        }
        result
    }
}
