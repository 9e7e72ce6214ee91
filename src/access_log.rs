//! One log line per request on a cache route, written once its bytes reached the client's
//! socket (or its connection ended), so it tells the bytes really sent and whether the
//! response completed.
//!
//! hyper takes a body's frames ahead of what the socket accepts (a small body, or a file
//! region sent with `sendfile`, is taken whole at once), and drops the body when the last
//! frame is taken, before it is written. So the line is not written from the body alone:
//! each connection counts the bytes its socket accepted ([`Written`], fed by the connection
//! writer), and a finished body's line waits there until the socket has taken the response's
//! head and body, or the connection closes — then it says `client-gone` and how many body
//! bytes went out. The head's size is known from its headers up to what hyper adds to them,
//! so the count of a cut response can be over by those few bytes; never under.

use crate::body::{BoxError, ProxyBody};
use crate::cache::status::Outcome;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Instant,
};

/// What the line says besides bytes and timing.
pub struct AccessLog {
    pub lote_id: String,
    pub status: u16,
    pub cache_status: String,
    pub outcome: Outcome,
    pub started: Instant,
    /// Time waiting for the origin before the response head (forwarded requests only).
    pub origin_ms: Option<u64>,
    /// The response's Content-Length: hyper stops polling a body once that much is sent.
    pub content_length: Option<u64>,
    /// The fill this response streamed from, if any: its stored state is logged at the end
    /// (the head went out before the commit).
    pub fill: Option<crate::cache::fill::FillOutcome>,
}

/// Wraps `body` so that `log` is written when it ends, fails, or is dropped by the client —
/// with `conn`, once the connection's socket took its bytes (or the connection ended).
/// `head` is the response head, to count its bytes.
pub fn wrap(body: ProxyBody, log: AccessLog, conn: Option<(&Arc<Written>, &http::response::Parts)>) -> ProxyBody {
    let conn = conn.map(|(written, head)| Sent {
        written: written.clone(),
        from: written.sent(),
        head: head_len(head, &body),
    });
    LoggedBody { inner: body, log: Some(log), bytes: 0, conn }.boxed_unsync()
}

/// What a connection's socket has accepted, and the lines waiting for it.
#[derive(Default)]
pub struct Written {
    sent: AtomicU64,
    waiting: Mutex<VecDeque<Waiting>>,
    /// Whether `waiting` may be non-empty: the write path checks this without the lock.
    any_waiting: AtomicBool,
}

/// A finished response's line, waiting for its bytes to reach the socket.
struct Waiting {
    log: AccessLog,
    end: &'static str,
    /// Body bytes hyper took.
    body: u64,
    /// The socket's count when the response began, and its head's size.
    from: u64,
    head: u64,
}

impl Waiting {
    /// Body bytes the socket took of this response, given the connection's count.
    fn body_sent(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.from + self.head).min(self.body)
    }
}

impl Written {
    /// Bytes the socket has accepted so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// The connection writer's report: the socket accepted `n` more bytes.
    pub fn wrote(&self, n: usize) {
        let sent = self.sent.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        if self.any_waiting.load(Ordering::Acquire) {
            self.release(sent, false);
        }
    }

    /// The connection ended: every waiting line is written with what went out.
    pub fn closed(&self) {
        self.release(self.sent(), true);
    }

    fn wait(&self, w: Waiting) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.push_back(w);
        self.any_waiting.store(true, Ordering::Release);
        drop(waiting);
        // The bytes may all be out already.
        self.release(self.sent(), false);
    }

    fn release(&self, sent: u64, closed: bool) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(w) = waiting.front() {
            let all_out = sent >= w.from + w.head + w.body;
            if !all_out && !closed {
                break;
            }
            let w = waiting.pop_front().expect("front exists");
            let end = match (w.end, all_out) {
                ("complete", false) => "client-gone",
                (end, _) => end,
            };
            write_line(&w.log, w.body_sent(sent), end);
        }
        self.any_waiting.store(!waiting.is_empty(), Ordering::Release);
    }
}

/// The bytes a response head takes on the wire, at least: status line, headers, the `Date`
/// hyper adds, and the framing header hyper adds when there is none (`Content-Length` for a
/// body of known size, `Transfer-Encoding: chunked` otherwise). Never more than the real head:
/// a line waits until the socket took this much more than the body.
fn head_len(head: &http::response::Parts, body: &ProxyBody) -> u64 {
    use http::header::{CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
    let status = "HTTP/1.1 200 \r\n".len() + head.status.canonical_reason().unwrap_or("").len();
    let headers: usize = head.headers.iter().map(|(n, v)| n.as_str().len() + 2 + v.len() + 2).sum();
    let date = if head.headers.contains_key(DATE) { 0 } else { "date: Thu, 01 Jan 1970 00:00:00 GMT\r\n".len() };
    let bodiless = body.is_end_stream() || matches!(head.status.as_u16(), 100..=199 | 204 | 304);
    let framing =
        if head.headers.contains_key(CONTENT_LENGTH) || head.headers.contains_key(TRANSFER_ENCODING) || bodiless {
            0
        } else if let Some(n) = body.size_hint().exact() {
            "content-length: \r\n".len() + n.to_string().len()
        } else if head.version >= http::Version::HTTP_11 {
            "transfer-encoding: chunked\r\n".len()
        } else {
            0
        };
    (status + headers + date + framing + 2) as u64
}

/// The response's place in its connection's byte count.
struct Sent {
    written: Arc<Written>,
    from: u64,
    head: u64,
}

struct LoggedBody {
    inner: ProxyBody,
    log: Option<AccessLog>,
    bytes: u64,
    conn: Option<Sent>,
}

impl LoggedBody {
    fn finish(&mut self, end: &'static str) {
        let Some(log) = self.log.take() else { return };
        match &self.conn {
            Some(c) => c.written.wait(Waiting { log, end, body: self.bytes, from: c.from, head: c.head }),
            None => write_line(&log, self.bytes, end),
        }
    }
}

fn write_line(l: &AccessLog, bytes: u64, end: &'static str) {
    let fill = l.fill.as_ref().and_then(|f| f.ended_as());
    tracing::info!(
        target: "lotecache::access",
        lote_id = %l.lote_id,
        status = l.status,
        cache_status = %l.cache_status,
        outcome = l.outcome.label(),
        bytes,
        total_ms = l.started.elapsed().as_millis() as u64,
        origin_ms = l.origin_ms,
        fill = fill.as_deref(),
        end,
        "request"
    );
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                if this.inner.is_end_stream() {
                    this.finish("complete");
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish("aborted"),
            Poll::Ready(None) => this.finish("complete"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // hyper stops polling a body once Content-Length bytes are out: that is complete too.
        let all_sent = self.log.as_ref().and_then(|l| l.content_length).is_some_and(|n| n == self.bytes);
        let complete = all_sent || self.inner.is_end_stream();
        self.finish(if complete { "complete" } else { "client-gone" });
    }
}
