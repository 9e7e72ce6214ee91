//! Connections to the origin: opened when none is idle, kept in a small LIFO pool between
//! requests, and, when the origin ends one after its answer (the legacy app's gunicorn sync
//! workers end every one), closed only once the client's answer has been written.
//!
//! Why the last part: closing a loopback connection runs the origin's side of the close on this
//! core at once: the FIN is delivered, and gunicorn's worker, waiting for it, is woken and often
//! preempts us. hyper's client closes the moment the answer is read, so that work fell between
//! reading the origin's answer and writing it to the client: ~110 µs of every pass-through
//! request to the Monitoring page (`examples/hop_latency`, 2026-11-26). nginx writes to the
//! client first and then closes; so does this. The close of a connection ended while a client's
//! request used it goes to that client connection's [`AfterAnswer`], which the connection's
//! [`crate::server::client_io::ClientIo`] releases when its next write is flushed.
//!
//! The pool is LIFO (the most recently used connection is the likeliest to be alive and warm),
//! bounded by `origin.pool_max_idle_per_host`, and a connection idle longer than
//! `origin.pool_idle_timeout` is closed by a sweep. A pooled connection the origin closed while
//! idle is noticed at checkout; a request not yet written when its pooled connection turns out
//! dead is sent again on a new one.

use crate::body::ProxyBody;
use futures_util::FutureExt as _;
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long a held connection waits for its client's answer to be flushed before it is closed
/// anyway, on a multi-threaded runtime (see [`AfterAnswer::hold`]): an origin worker waits for
/// our close.
const HOLD_AT_MOST: Duration = Duration::from_millis(2);

/// Origin connections ended while serving one client connection, held until that client's
/// answer is flushed. One per client connection.
#[derive(Default)]
pub struct AfterAnswer {
    held: Mutex<Vec<TcpStream>>,
    /// Whether `held` may be non-empty: the flush path checks this without the lock.
    pending: AtomicBool,
}

impl AfterAnswer {
    pub(crate) fn hold(self: &Arc<Self>, stream: TcpStream) {
        let first = {
            let mut held = self.held.lock().expect("held connections");
            held.push(stream);
            held.len() == 1
        };
        self.pending.store(true, Ordering::Release);
        if first {
            // The backstop, for a multi-threaded runtime only: there the origin connection's
            // task may end after the client's answer was flushed on another thread. On a
            // single-threaded one it ends before (it hands over the answer's last bytes, then
            // ends, in one poll), and the answer's flush, or the client connection's end,
            // releases it: no timer to set (a timer earlier than any other costs the runtime a
            // wake-up). A runtime that is shutting down drops the stream with the task.
            let multi = |r: &tokio::runtime::Handle| r.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
            if let Some(runtime) = tokio::runtime::Handle::try_current().ok().filter(multi) {
                let this = Arc::downgrade(self);
                runtime.spawn(async move {
                    tokio::time::sleep(HOLD_AT_MOST).await;
                    if let Some(this) = Weak::upgrade(&this) {
                        this.release();
                    }
                });
            }
        }
    }

    /// Closes the held connections: the client's answer is out (or never will be).
    pub fn release(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            let held = std::mem::take(&mut *self.held.lock().expect("held connections"));
            drop(held);
        }
    }

    /// How many connections wait for the answer (tests).
    pub fn held(&self) -> usize {
        self.held.lock().expect("held connections").len()
    }
}

/// Which client connection a request on this origin connection serves, if any.
type Owner = Mutex<Option<Arc<AfterAnswer>>>;

/// The origin stream as hyper's client sees it. Its end is the close, with no `shutdown` of
/// its own first (the close sends the FIN); dropped while serving a client connection's
/// request, the stream goes to that connection's [`AfterAnswer`] instead of closing.
struct OriginIo {
    stream: Option<TcpStream>,
    owner: Arc<Owner>,
}

impl OriginIo {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("the stream is only taken on drop"))
    }
}

impl Drop for OriginIo {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else { return };
        let owner = self.owner.lock().map(|mut o| o.take()).unwrap_or(None);
        match owner {
            Some(after) => after.hold(stream),
            None => drop(stream),
        }
    }
}

impl AsyncRead for OriginIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for OriginIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The close (on drop, maybe after the client's answer) ends the connection.
        Poll::Ready(Ok(()))
    }
}

/// Why a request did not get a response head from the origin.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect to the origin {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("no connection to the origin {addr} within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("no response head from the origin in time")]
    ResponseTimeout,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl PoolError {
    /// Whether no connection could be opened (as opposed to a failure on an open one).
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect { .. } | PoolError::ConnectTimeout { .. })
    }
}

/// A connection ready for a request, and the cell naming the client it serves.
struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    owner: Arc<Owner>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

thread_local! {
    /// This thread's pool of idle connections, an index into [`OriginPool`]'s pools.
    static POOL_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Gives this thread its own pool of idle origin connections (`lotecache serve`'s worker
/// threads: a connection is driven by the runtime that opened it, so one taken up by another
/// thread's request would make the two threads wake each other for every read and write).
pub fn use_pool_slot(slot: usize) {
    POOL_SLOT.with(|s| s.set(slot));
}

type IdleConns = Arc<Mutex<Vec<Idle>>>;

/// The pooled connections to one origin.
pub struct OriginPool {
    /// `host:port`.
    authority: http::uri::Authority,
    /// The authority's address when its host is an IP address (parsed once, not per connect).
    ip_addr: Option<std::net::SocketAddr>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// At most this many idle connections per pool.
    max_idle: usize,
    /// One pool per slot ([`use_pool_slot`]).
    pools: Arc<[IdleConns]>,
}

impl OriginPool {
    /// A pool for `authority`; with a runtime present, starts the sweep of expired idle
    /// connections (it ends with the pool).
    pub fn new(
        authority: http::uri::Authority,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> OriginPool {
        // A slot per possible worker thread, and one for the thread that accepts.
        let slots = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) + 1;
        let pools: Arc<[IdleConns]> = (0..slots).map(|_| IdleConns::default()).collect();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pools = Arc::downgrade(&pools);
            let every = (idle_timeout / 2).max(Duration::from_millis(100));
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(pools) = pools.upgrade() else { return };
                    for pool in pools.iter() {
                        let expired: Vec<Idle> = {
                            let mut pool = pool.lock().expect("idle pool");
                            let (keep, expired) = pool.drain(..).partition(|i| i.since.elapsed() < idle_timeout);
                            *pool = keep;
                            expired
                        };
                        drop(expired);
                    }
                }
            });
        }
        let ip_addr = authority.as_str().parse().ok();
        OriginPool { authority, ip_addr, connect_timeout, idle_timeout, max_idle, pools }
    }

    /// Sends `req` (absolute or origin-form URI) and returns the response head, with the
    /// connection's way back to the pool: [`Reuse::keep`] once the head is found acceptable
    /// (dropped, the connection is discarded). `after`: the client connection this request
    /// serves, whose answer a closing origin connection waits for (none for requests no client
    /// waits on directly, such as fills). The head must come within `response_timeout` of the
    /// call, a new connection within the connect timeout.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
        after: Option<&Arc<AfterAnswer>>,
        response_timeout: Duration,
    ) -> Result<(Response<Incoming>, Reuse), PoolError> {
        self.to_origin_form(&mut req);
        let now = tokio::time::Instant::now();
        let response_deadline = now + response_timeout;
        let connect_deadline = (now + self.connect_timeout).min(response_deadline);
        // One timer for both limits, set for the connect if there is one and then moved out to
        // the response's deadline: moving a timer later only updates it, while a second timer
        // would be registered with the runtime and removed again on every request.
        let mut pooled = self.checkout();
        let timer = tokio::time::sleep_until(if pooled.is_some() { response_deadline } else { connect_deadline });
        tokio::pin!(timer);
        loop {
            let (conn, reused) = match pooled.take() {
                Some(conn) => (conn, true),
                None => {
                    if timer.deadline() != connect_deadline {
                        timer.as_mut().reset(connect_deadline);
                    }
                    let conn = tokio::select! {
                        biased;
                        conn = self.connect() => conn?,
                        () = &mut timer => return Err(self.timed_out(connect_deadline < response_deadline)),
                    };
                    timer.as_mut().reset(response_deadline);
                    (conn, false)
                }
            };
            let Conn { mut sender, owner } = conn;
            *owner.lock().expect("owner") = after.cloned();
            let sent = tokio::select! {
                biased;
                sent = sender.try_send_request(req) => sent,
                () = &mut timer => {
                    owner.lock().expect("owner").take();
                    return Err(PoolError::ResponseTimeout);
                }
            };
            match sent {
                Ok(resp) => {
                    let reuse =
                        Reuse { conn: Conn { sender, owner }, pool: self.pool().clone(), max_idle: self.max_idle };
                    return Ok((resp, reuse));
                }
                Err(mut e) => {
                    owner.lock().expect("owner").take();
                    match e.take_message() {
                        // Never written: the pooled connection had been closed by the origin.
                        Some(unsent) if reused => {
                            req = unsent;
                            pooled = self.checkout();
                        }
                        _ => return Err(PoolError::Http(e.into_error())),
                    }
                }
            }
        }
    }

    /// The error for a timer that fired while connecting: the connect timeout's, or the
    /// response's when that came first.
    fn timed_out(&self, connecting: bool) -> PoolError {
        match connecting {
            true => PoolError::ConnectTimeout { addr: self.authority.to_string(), timeout: self.connect_timeout },
            false => PoolError::ResponseTimeout,
        }
    }

    /// What hyper writes is the target as given: an origin-form one, with `Host` if the client
    /// sent none.
    fn to_origin_form(&self, req: &mut Request<ProxyBody>) {
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            // The parsed path and query as they are: nothing to parse again.
            *req.uri_mut() = req.uri().path_and_query().cloned().map_or_else(|| Uri::from_static("/"), Uri::from);
        }
        if !req.headers().contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(self.authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
    }

    /// This thread's pool.
    fn pool(&self) -> &IdleConns {
        &self.pools[POOL_SLOT.with(|s| s.get()) % self.pools.len()]
    }

    fn checkout(&self) -> Option<Conn> {
        let mut pool = self.pool().lock().expect("idle pool");
        while let Some(idle) = pool.pop() {
            // A closed one is dropped here; an expired one too (the sweep may not have run).
            if idle.conn.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                return Some(idle.conn);
            }
        }
        None
    }

    /// A new connection, handshake included (the caller bounds it in time).
    async fn connect(&self) -> Result<Conn, PoolError> {
        let addr = self.authority.as_str();
        let connected = match self.ip_addr {
            Some(ip_addr) => TcpStream::connect(ip_addr).await,
            None => TcpStream::connect(addr).await,
        };
        let stream = connected.map_err(|source| PoolError::Connect { addr: addr.to_string(), source })?;
        let _ = stream.set_nodelay(true);
        let owner: Arc<Owner> = Arc::default();
        let io = TokioIo::new(OriginIo { stream: Some(stream), owner: owner.clone() });
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        // Spawned as it is, with a closure after it: an `async` block awaiting it would hold it
        // twice (captured, and again while awaited), and the task would be twice its size.
        tokio::spawn(connection.map(|ended| {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "origin connection ended with an error");
            }
        }));
        Ok(Conn { sender, owner })
    }
}

/// A connection that served a response, on its way back to the pool.
pub struct Reuse {
    conn: Conn,
    pool: IdleConns,
    max_idle: usize,
}

impl Reuse {
    /// Puts the connection back in the pool once `resp` (its response) has been read to its
    /// end, unless the origin said it ends the connection after it.
    pub fn keep<B>(self, resp: &Response<B>) {
        if self.max_idle == 0 || ends_connection(resp.version(), resp.headers()) {
            return;
        }
        let Reuse { conn: Conn { mut sender, owner }, pool, max_idle } = self;
        tokio::spawn(async move {
            // Ready again when the answer was read to its end; an error: the connection ended.
            if sender.ready().await.is_ok() {
                owner.lock().expect("owner").take();
                let mut pool = pool.lock().expect("idle pool");
                if pool.len() < max_idle {
                    pool.push(Idle { conn: Conn { sender, owner }, since: Instant::now() });
                }
            }
        });
    }
}

/// Whether the origin ends the connection after this response (`Connection: close`, or
/// HTTP/1.0 without keep-alive).
fn ends_connection(version: http::Version, headers: &http::HeaderMap) -> bool {
    // The usual case, a single `Connection: close`, without splitting it into tokens.
    if version == http::Version::HTTP_11 {
        let mut values = headers.get_all(header::CONNECTION).iter();
        if let (Some(v), None) = (values.next(), values.next()) {
            if v.as_bytes().eq_ignore_ascii_case(b"close") {
                return true;
            }
        }
    }
    let has = |token: &str| crate::headers::connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token));
    if version == http::Version::HTTP_10 {
        !has("keep-alive")
    } else {
        has("close")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// An origin connection ended while serving a client connection: that client's hold on it,
    /// and the origin's end of it.
    async fn ended_while_serving_a_client() -> (Arc<AfterAnswer>, TcpStream) {
        let (client, server) = pair().await;
        let after = Arc::new(AfterAnswer::default());
        let owner: Arc<Owner> = Arc::new(Mutex::new(Some(after.clone())));
        drop(OriginIo { stream: Some(client), owner });
        (after, server)
    }

    /// Whether the peer of `server` has closed: a read returns 0 within `wait`.
    async fn closed(server: &mut TcpStream, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(tokio::time::timeout(wait, server.read(&mut byte)).await, Ok(Ok(0)))
    }

    #[tokio::test]
    async fn a_connection_ended_while_serving_a_client_closes_when_its_answer_is_released() {
        let (after, mut server) = ended_while_serving_a_client().await;
        assert_eq!(after.held(), 1);
        // A loopback close delivers the FIN at once: none has arrived.
        let mut byte = [0u8; 1];
        assert_eq!(
            server.try_read(&mut byte).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "closed before the answer"
        );
        after.release();
        assert_eq!(after.held(), 0);
        assert!(closed(&mut server, Duration::from_secs(1)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_threaded_runtime_a_held_connection_is_closed_anyway_when_no_answer_is_written() {
        let (after, mut server) = ended_while_serving_a_client().await;
        assert!(closed(&mut server, Duration::from_secs(1)).await, "the backstop closed it");
        assert_eq!(after.held(), 0);
    }

    #[tokio::test]
    async fn held_connections_close_when_their_client_connection_ends() {
        let (after, mut server) = ended_while_serving_a_client().await;
        assert_eq!(after.held(), 1);
        drop(after);
        assert!(closed(&mut server, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn a_connection_serving_no_client_closes_at_once() {
        let (client, mut server) = pair().await;
        drop(OriginIo { stream: Some(client), owner: Arc::default() });
        assert!(closed(&mut server, Duration::from_millis(100)).await);
    }

    #[test]
    fn connection_close_and_http_1_0_end_the_connection() {
        use http::Version;
        let ends = |version, connection: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(c) = connection {
                headers.insert(header::CONNECTION, HeaderValue::from_str(c).unwrap());
            }
            ends_connection(version, &headers)
        };
        assert!(ends(Version::HTTP_11, Some("close")));
        assert!(ends(Version::HTTP_11, Some("x-foo, Close")));
        assert!(!ends(Version::HTTP_11, None));
        assert!(!ends(Version::HTTP_11, Some("keep-alive")));
        assert!(ends(Version::HTTP_10, None));
        assert!(!ends(Version::HTTP_10, Some("keep-alive")));
    }
}
