//! One log line per request on a cache route, written when its response body ends, so it
//! tells the bytes really sent and whether the response completed.

use crate::body::{BoxError, ProxyBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

/// What the line says besides bytes and timing.
pub struct AccessLog {
    pub lote_id: String,
    pub status: u16,
    pub cache_status: String,
    pub outcome: &'static str,
    pub started: Instant,
    /// Time waiting for the origin before the response head (forwarded requests only).
    pub origin_ms: Option<u64>,
    /// The response's Content-Length: hyper stops polling a body once that much is sent.
    pub content_length: Option<u64>,
    /// The fill this response streamed from, if any: its stored state is logged at the end
    /// (the head went out before the commit).
    pub fill: Option<crate::cache::fill::FillOutcome>,
}

/// Wraps `body` so that `log` is written when it ends, fails, or is dropped by the client.
pub fn wrap(body: ProxyBody, log: AccessLog) -> ProxyBody {
    LoggedBody { inner: body, log: Some(log), bytes: 0 }.boxed_unsync()
}

struct LoggedBody {
    inner: ProxyBody,
    log: Option<AccessLog>,
    bytes: u64,
}

impl LoggedBody {
    fn finish(&mut self, end: &'static str) {
        if let Some(l) = self.log.take() {
            let fill = l.fill.as_ref().and_then(|f| f.ended_as());
            tracing::info!(
                target: "lotecache::access",
                lote_id = %l.lote_id,
                status = l.status,
                cache_status = %l.cache_status,
                outcome = l.outcome,
                bytes = self.bytes,
                total_ms = l.started.elapsed().as_millis() as u64,
                origin_ms = l.origin_ms,
                fill = fill.as_deref(),
                end,
                "request"
            );
        }
    }
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
