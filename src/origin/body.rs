//! Body wrappers for what comes from the origin: the first frame read before a relayed head
//! goes out (head and body in one write), and the idle timeout hyper's client does not have.

use crate::body::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

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
}
