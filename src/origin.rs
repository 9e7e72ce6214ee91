//! Talking to the origin: requests over [`crate::upstream`]'s pooled connections, request
//! rewriting (hop-by-hop headers, `X-Forwarded-*`, `Via`), the timeouts hyper does not have
//! (response head, body idle), and access-check subrequests to any URL.

use crate::body::{BoxError, ProxyBody};
use crate::config::OriginConfig;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::upstream::{AfterAnswer, Reuse, Upstream, UpstreamError};
use bytes::Bytes;
use http::header::Entry;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

/// `Via` value this proxy adds.
pub const VIA: &str = "1.1 lotecache";

/// A pooled HTTP/1.1 client bound to one origin.
#[derive(Clone)]
pub struct Origin {
    upstream: Arc<Upstream>,
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
        let upstream = Arc::new(Upstream::new(
            config.authority.clone(),
            config.connect_timeout,
            config.pool_idle_timeout,
            config.pool_max_idle_per_host,
        ));
        Origin { upstream, client, config, metrics, last_ok_ms: Arc::default() }
    }

    /// Whether the origin answered within `recent`, or accepts a TCP connection now.
    pub async fn reachable(&self, recent: Duration) -> bool {
        let last = self.last_ok_ms.load(Relaxed) as u128;
        if last > 0 && crate::cache::store::now_ms().saturating_sub(last) < recent.as_millis() {
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
            .map_err(|e| ProxyError::BadRequest { detail: format!("cannot build the upstream URI: {e}") })
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
    /// The upstream's future with a closure after it, not an `async fn`: that would hold the
    /// request a second time, and the future grows the one boxed for every pass-through request.
    pub fn send_for<'a>(
        &'a self,
        req: Request<ProxyBody>,
        after: Option<&'a Arc<AfterAnswer>>,
    ) -> impl Future<Output = Result<Response<Incoming>, ProxyError>> + 'a {
        let started = std::time::Instant::now();
        let sent = self.upstream.send(req, after, self.config.response_timeout);
        futures_util::FutureExt::map(sent, move |sent| self.answered(sent, started))
    }

    /// The outcome of a request sent at `started`: the head checked, the connection kept for
    /// reuse if it may be, and the metrics told.
    fn answered(
        &self,
        sent: Result<(Response<Incoming>, Reuse), UpstreamError>,
        started: std::time::Instant,
    ) -> Result<Response<Incoming>, ProxyError> {
        let result = match sent {
            Err(UpstreamError::ResponseTimeout) => Err(ProxyError::OriginTimeout { phase: "response head" }),
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
                self.last_ok_ms.store(crate::cache::store::now_ms() as u64, Relaxed);
                if resp.status().is_server_error() {
                    self.metrics.origin_errors.with_label_values(&["status-5xx"]).inc();
                }
            }
            Err(e) => self.metrics.origin_errors.with_label_values(&[&e.token()]).inc(),
        }
        result
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Upgrade`.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Request headers that override routing, method or origin identity in some backends
/// (IIS, Symfony, Flask extensions): dropped from every forwarded request.
fn is_client_untrusted(name: &str) -> bool {
    matches!(
        name,
        "x-original-url"
            | "x-rewrite-url"
            | "forwarded"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-forwarded-server"
            | "x-forwarded-port"
    )
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Why an origin response's framing is refused (502, connection discarded), if it is:
/// several Content-Length values, Content-Length with Transfer-Encoding, or a
/// Transfer-Encoding other than exactly `chunked`.
pub fn framing_problem(headers: &HeaderMap) -> Option<&'static str> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() || length.is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Some("several Content-Length values");
    }
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let first = te.next()?;
    if length.is_some() {
        return Some("Content-Length with Transfer-Encoding");
    }
    if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
        return Some("a Transfer-Encoding other than chunked");
    }
    None
}

/// The origin answered with framing we refuse to pass on.
#[derive(Debug, thiserror::Error)]
#[error("malformed response framing from the origin: {0}")]
pub struct MalformedResponse(pub &'static str);

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |_| false);
}

/// The tokens of the `Connection` header(s), trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Removes hop-by-hop headers, those the `Connection` header names, and those `also` picks:
/// one pass over the names present for the first two kinds (no lookup per name that could be
/// there), one lookup per `Connection` token (usually one: `close` or `keep-alive`) for the
/// last, and no allocation unless there are several `Connection` headers.
fn remove_where(headers: &mut HeaderMap, also: impl Fn(&str) -> bool) {
    // The `Connection` values are kept aside (a reference count each): the header itself is
    // among those removed.
    let mut values = headers.get_all(header::CONNECTION).iter();
    let first = values.next().cloned();
    let more: Vec<HeaderValue> = values.cloned().collect();
    // Found and removed one at a time: a header map cannot drop entries while iterated.
    while let Some(name) = headers.keys().find(|n| is_hop_by_hop(n.as_str()) || also(n.as_str())).cloned() {
        headers.remove(name);
    }
    let tokens = first.iter().chain(&more).filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    for token in tokens.map(str::trim).filter(|t| !t.is_empty()) {
        // Looked up as text: a token that is no header name (`close`) finds nothing.
        headers.remove(token);
    }
}

/// Rewrites a client request's headers for the origin: hop-by-hop removed, `X-Forwarded-For`
/// appended with the peer, `X-Forwarded-Proto`/`-Host` overwritten (never trusted from clients),
/// `Via` appended.
pub fn forward_request_headers(headers: &mut HeaderMap, peer: SocketAddr) {
    // Headers some frameworks trust for routing or identity: never from a client.
    remove_where(headers, is_client_untrusted);
    // Room for the four added below at once, rather than a regrowth on the way.
    headers.reserve(4);
    let peer_ip = ip_text(peer.ip());
    // One lookup per added header (an entry), not a `get` and then an `insert`.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut prev) => {
            let joined = match prev.get().to_str() {
                Ok(p) if !p.trim().is_empty() => [p.as_bytes(), b", ", &peer_ip].concat(),
                _ => peer_ip,
            };
            match HeaderValue::from_bytes(&joined) {
                Ok(v) => drop(prev.insert(v)),
                Err(_) => drop(prev.remove()),
            }
        }
        Entry::Vacant(slot) => {
            if let Ok(v) = HeaderValue::from_bytes(&peer_ip) {
                slot.insert(v);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    append_via(headers);
}

/// Rewrites an origin response's headers for the client.
pub fn forward_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    append_via(headers);
}

fn append_via(headers: &mut HeaderMap) {
    match headers.entry(header::VIA) {
        Entry::Occupied(mut prev) => {
            if let Ok(v) = HeaderValue::from_bytes(&[prev.get().as_bytes(), b", ", VIA.as_bytes()].concat()) {
                prev.insert(v);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(HeaderValue::from_static(VIA));
        }
    }
}

/// An address as text, IPv4 without the formatting machinery (this runs on every forwarded
/// request; `Display` for an IPv4 address costs more than the rest of the header rewrite).
fn ip_text(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = Vec::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
            out
        }
        ip => ip.to_string().into_bytes(),
    }
}

/// How long a relayed response head waits for its body's first bytes before it goes alone.
pub const HEAD_WAITS_FOR_BODY: Duration = Duration::from_millis(1);

/// A body whose first frame was read before its response head went to the client.
///
/// Origins often write a head and its body apart (gunicorn uses two `send`s). When the proxy
/// wakes between the two, a head relayed as it comes goes out alone and the body in a second
/// write: the client wakes twice, and so does the proxy. With the first frame in hand, hyper
/// writes head and body in one `writev`, as nginx does with `postpone_output`. Unlike nginx,
/// the wait is bounded: a head whose body does not follow within the window (a stream that
/// starts late) goes out alone, as before. (On loopback here gunicorn's two sends come close
/// enough together that the split showed only with every syscall slowed by `perf trace`; it
/// matters for an origin across a network, or one that pauses between head and body.)
pub struct FirstFrameRead<B: Body> {
    first: Option<Result<Frame<B::Data>, B::Error>>,
    inner: B,
}

impl<B: Body + Unpin> FirstFrameRead<B> {
    /// Waits at most `window` for `body`'s first frame. No timer is set when the frame is
    /// already there or the body is empty.
    pub async fn read(mut body: B, window: Duration) -> Self {
        if body.is_end_stream() {
            return FirstFrameRead { first: None, inner: body };
        }
        let first = tokio::time::timeout(window, http_body_util::BodyExt::frame(&mut body)).await.ok().flatten();
        FirstFrameRead { first, inner: body }
    }
}

// The held frame is never pinned: moving the whole is fine whenever the body itself may move.
impl<B: Body + Unpin> Unpin for FirstFrameRead<B> {}

impl<B: Body + Unpin> Body for FirstFrameRead<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        match this.first.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| bytes::Buf::remaining(d) as u64),
            _ => return self.inner.size_hint(),
        };
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// The origin went silent for longer than the body idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("origin body idle for more than {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// A body that fails when no frame arrives within `idle` of the previous one. The timer is
/// created the first time the body has to wait: a body that is already complete (most small
/// responses) never registers one.
pub struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeoutBody { inner, idle, sleep: None }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(tokio::time::Instant::now() + this.idle);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the first frame of a body whose only frame, `data`, is sent `after` (paused
    /// clock); returns how long the read waited and what it read.
    async fn read_frame_sent_after(
        after: Duration,
        data: &'static [u8],
        window: Duration,
    ) -> (Duration, FirstFrameRead<impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tx.send(Ok(Frame::data(Bytes::from_static(data)))).unwrap();
        });
        let started = tokio::time::Instant::now();
        let read = FirstFrameRead::read(body, window).await;
        (started.elapsed(), read)
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_frame_arriving_within_the_window_is_held_for_the_head() {
        let (waited, read) = read_frame_sent_after(Duration::from_millis(10), b"page", Duration::from_millis(50)).await;
        assert_eq!(waited, Duration::from_millis(10), "waited for the frame, not the window");
        assert!(read.first.is_some());
        assert!(!read.is_end_stream());
        assert_eq!(read.size_hint().lower(), 4, "the held bytes count in the size hint");
        assert_eq!(http_body_util::BodyExt::collect(read).await.unwrap().to_bytes(), "page");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_starts_after_the_window_lets_the_head_go_alone() {
        let (waited, read) =
            read_frame_sent_after(Duration::from_millis(100), b"late", Duration::from_millis(50)).await;
        assert_eq!(waited, Duration::from_millis(50), "the wait is bounded by the window");
        assert!(read.first.is_none());
        assert_eq!(http_body_util::BodyExt::collect(read).await.unwrap().to_bytes(), "late", "nothing is lost");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_body_is_not_waited_for() {
        let started = tokio::time::Instant::now();
        let read = FirstFrameRead::read(http_body_util::Empty::<Bytes>::new(), Duration::from_millis(50)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(read.is_end_stream());
        assert_eq!(read.size_hint().exact(), Some(0));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn connection_tokens_name_headers_in_any_case_across_several_connection_headers() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.append(header::CONNECTION, HeaderValue::from_static(" , x-other ,not a name"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("2"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn origin_framing_is_checked() {
        let h = |pairs: &[(&str, &str)]| -> HeaderMap {
            pairs.iter().map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap())).collect()
        };
        assert_eq!(framing_problem(&h(&[("content-length", "5")])), None);
        assert_eq!(framing_problem(&h(&[("transfer-encoding", "chunked")])), None);
        assert!(framing_problem(&h(&[("content-length", "5, 7")])).is_some());
        assert!(framing_problem(&h(&[("transfer-encoding", "gzip, chunked")])).is_some());
        assert!(framing_problem(&h(&[("transfer-encoding", "chunked"), ("content-length", "5")])).is_some());
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "1.100.9.99", "::1", "2001:db8::7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string().into_bytes());
        }
    }

    #[test]
    fn via_is_appended_to_the_origins_own() {
        let mut h = HeaderMap::new();
        forward_response_headers(&mut h);
        assert_eq!(h[header::VIA], VIA);
        h.insert(header::VIA, HeaderValue::from_static("1.0 fred"));
        forward_response_headers(&mut h);
        assert_eq!(h[header::VIA], "1.0 fred, 1.1 lotecache");
    }

    #[test]
    fn forwarded_headers_append_the_peer_and_overwrite_client_claims() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        forward_request_headers(&mut h, "127.0.0.9:1234".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h[header::VIA], VIA);
    }
}
