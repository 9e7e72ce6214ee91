//! The client connection as hyper sees it: bytes read pass through the strict framing check
//! ([`crate::framing`]); bytes written go out as they are, or with `sendfile` when they lie in a
//! registered file region ([`crate::sendfile`]), or as the JSON error in place of hyper's bare
//! parse-error answer ([`super::parser_answer`]). Each flush releases the origin connections
//! held until this client's answer is out ([`crate::pool::AfterAnswer`]), and every byte the
//! socket accepts is counted for the access log. This file only joins those pieces.

use super::parser_answer::parser_answer;
use crate::access_log::Written;
use crate::framing::Framing;
use crate::pool::AfterAnswer;
use crate::sendfile::{self, ZeroCopySocket};
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client connection whose request framing is checked before hyper parses it.
pub struct ClientIo<S> {
    inner: S,
    framing: Framing,
    /// Bytes checked and ready for hyper.
    ready: Vec<u8>,
    ready_pos: usize,
    /// The JSON answer replacing hyper's bare one, and how much of it is written.
    answer: Vec<u8>,
    answer_pos: usize,
    /// Origin connections ended while serving this client, closed once an answer is flushed.
    after_answer: Option<Arc<AfterAnswer>>,
    /// The connection's count of bytes its socket accepted (the access log's).
    written: Option<Arc<Written>>,
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, max_head: usize) -> Self {
        ClientIo {
            inner,
            framing: Framing::new(max_head),
            ready: Vec::new(),
            ready_pos: 0,
            answer: Vec::new(),
            answer_pos: 0,
            after_answer: None,
            written: None,
        }
    }

    /// Releases `after`'s held origin connections whenever a write is flushed.
    pub fn with_after_answer(mut self, after: Arc<AfterAnswer>) -> Self {
        self.after_answer = Some(after);
        self
    }

    /// Reports every byte the socket accepts to `written`, and the connection's end.
    pub fn with_written(mut self, written: Arc<Written>) -> Self {
        self.written = Some(written);
        self
    }

    fn count(&self, polled: &Poll<io::Result<usize>>) {
        if let (Some(w), Poll::Ready(Ok(n))) = (&self.written, polled) {
            w.wrote(*n);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_pos < this.ready.len() {
                let n = (this.ready.len() - this.ready_pos).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
                this.ready_pos += n;
                if this.ready_pos == this.ready.len() {
                    this.ready.clear();
                    this.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            // Past the framing we follow, hand the caller's buffer straight through.
            if this.framing.passes_through() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Read into the caller's (uninitialised) buffer, take what arrived, and give the
            // buffer back: only what the framing check lets through is put into it. (A scratch
            // array here would be zeroed on every call, pending ones included.)
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    this.framing.end_of_stream(&mut this.ready);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    let input = &buf.filled()[before..];
                    // The common read: one whole head, nothing held back or queued. Checked
                    // where it lies, it stays in the caller's buffer (no copies through ours).
                    if this.ready.is_empty() && this.framing.take_whole_head(input) {
                        return Poll::Ready(Ok(()));
                    }
                    this.framing.process(input, &mut this.ready);
                    buf.set_filled(before);
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> ClientIo<S> {
    /// Takes `bytes` in place of hyper's bare parse-error answer if that is what they are (the
    /// JSON answer is then queued); false for anything else.
    fn replaced_parser_answer(&mut self, bytes: &[u8]) -> bool {
        match parser_answer(bytes, self.framing.refused()) {
            Some(answer) => {
                self.answer = answer;
                self.answer_pos = 0;
                true
            }
            None => false,
        }
    }

    /// Writes what is left of a queued JSON answer.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.answer_pos < self.answer.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.answer[self.answer_pos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.answer_pos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> Drop for ClientIo<S> {
    fn drop(&mut self) {
        if let Some(w) = &self.written {
            w.closed();
        }
    }
}

impl<S: ZeroCopySocket> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().poll_write_counted(cx, buf);
        self.count(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().poll_write_vectored_counted(cx, bufs);
        self.count(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        // hyper then queues body buffers as they are (never copies them into its own buffer).
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_answer(cx))?;
        std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        // hyper flushes after writing what it has: the answer an ended origin connection
        // carried is out now.
        if let Some(after) = &self.after_answer {
            after.release();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: ZeroCopySocket> ClientIo<S> {
    fn poll_write_counted(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some((region, offset)) = sendfile::lookup(buf) {
            return sendfile::poll_send(&self.inner, cx, &region, offset, buf.len());
        }
        if self.replaced_parser_answer(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        std::task::ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored_counted(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        };
        if let Some((region, offset)) = sendfile::lookup(&bufs[first]) {
            return sendfile::poll_send(&self.inner, cx, &region, offset, bufs[first].len());
        }
        if bufs[first + 1..].iter().all(|b| b.is_empty()) && self.replaced_parser_answer(&bufs[first]) {
            return Poll::Ready(Ok(bufs[first].len()));
        }
        std::task::ready!(self.poll_answer(cx))?;
        // Ordinary bytes up to the first file-backed slice go out with one writev.
        let end = bufs[first..].iter().position(|b| sendfile::lookup(b).is_some()).map_or(bufs.len(), |p| first + p);
        Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[first..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{one_whole_head_framing, State, REFUSED};

    #[tokio::test]
    async fn held_origin_connections_are_released_when_a_write_is_flushed_not_before() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_side = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let after = Arc::new(AfterAnswer::default());
        let mut io = ClientIo::new(client, 64 * 1024).with_after_answer(after.clone());
        // A single-threaded runtime: nothing but the flush releases it (no backstop timer).
        after.hold(origin_side);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        assert_eq!(after.held(), 1, "written, not yet flushed");
        io.flush().await.unwrap();
        assert_eq!(after.held(), 0);
    }

    /// What hyper would see for `input` fed in pieces of `step` bytes.
    fn seen(input: &[u8], step: usize) -> Vec<u8> {
        let (mut framing, mut out) = (Framing::new(64 * 1024), Vec::new());
        for piece in input.chunks(step) {
            framing.process(piece, &mut out);
        }
        out
    }

    #[test]
    fn well_formed_pipelined_requests_pass_unchanged_in_any_split() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        for step in [1, 3, 7, 64, input.len()] {
            assert_eq!(seen(input, step), input.to_vec(), "step {step}");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_passed_as_body() {
        let input =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nGET /\n\n\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(seen(input, 1), input.to_vec());
    }

    #[test]
    fn bare_lf_and_length_with_chunking_are_replaced_by_a_refusal() {
        for input in [
            &b"GET /x HTTP/1.1\nHost: a\n\n"[..],
            b"GET /x HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ] {
            let out = seen(input, 5);
            assert!(
                out.starts_with(REFUSED),
                "{:?} → {:?}",
                String::from_utf8_lossy(input),
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn a_refusal_on_the_second_request_keeps_the_first_intact() {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut input = first.to_vec();
        input.extend_from_slice(b"GET /b HTTP/1.1\nHost: x\n\n");
        let out = seen(&input, 4);
        assert!(out.starts_with(first));
        assert_eq!(&out[first.len()..first.len() + REFUSED.len()], REFUSED);
    }

    /// What hyper reads through the wrapper when `first` arrives in one read and `rest` after
    /// it (reads into a buffer large enough for either).
    async fn read_through(first: &[u8], rest: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut io = ClientIo::new(first.chain(rest), 64 * 1024);
        let mut out = Vec::with_capacity(4096);
        while io.read_buf(&mut out).await.unwrap() > 0 {
            out.reserve(4096);
        }
        out
    }

    #[test]
    fn only_exactly_one_well_formed_head_is_taken_whole() {
        assert_eq!(one_whole_head_framing(b"GET / HTTP/1.1\r\n\r\n"), Some(Ok(State::Head)));
        assert_eq!(
            one_whole_head_framing(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 12\r\n\r\n"),
            Some(Ok(State::Body(12)))
        );
        for not_one in [
            &b""[..],
            b"\r\n",
            b"\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        ] {
            assert_eq!(one_whole_head_framing(not_one), None, "{:?}", String::from_utf8_lossy(not_one));
        }
    }

    #[tokio::test]
    async fn a_head_read_whole_is_checked_and_followed_as_one_read_in_pieces_is() {
        let cases: [(&[u8], &[u8]); 8] = [
            (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b""),
            (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"),
            // The body after a head read alone is followed as a body, however it looks.
            (
                b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n",
                b"GET /\n\n\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
            (
                b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"5\r\nGET /\r\n0\r\n\r\nGET /d HTTP/1.1\nX: y\n\n",
            ),
            // Refused whether read whole or not.
            (b"GET /x HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", b""),
            (b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n"),
            (b"\r\nGET /a HTTP/1.1\r\n\r\n", b""),
            (b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", b"\x00anything\n"),
        ];
        for (first, rest) in cases {
            let whole = [first, rest].concat();
            let read = read_through(first, rest).await;
            assert_eq!(read, seen(&whole, 1), "{:?}", String::from_utf8_lossy(&whole));
            assert_eq!(read_through(&whole, b"").await, read, "{:?} in one read", String::from_utf8_lossy(&whole));
        }
    }

    use proptest::prelude::*;

    /// A request's body framing.
    #[derive(Debug, Clone)]
    enum Body {
        None,
        Length(Vec<u8>),
        /// Chunks (data, size in upper-case hex, extension), the last chunk's extension,
        /// trailer lines.
        Chunked {
            chunks: Vec<(Vec<u8>, bool, Option<String>)>,
            last_ext: Option<String>,
            trailers: Vec<String>,
        },
    }

    #[derive(Debug, Clone)]
    struct Req {
        leading_crlf: bool,
        path: String,
        headers: Vec<String>,
        /// Index of the header-name spelling to use.
        spelling: usize,
        /// Spaces around framing header values.
        padded: bool,
        body: Body,
    }

    const CL: [&str; 4] = ["Content-Length", "content-length", "CONTENT-LENGTH", "Content-length"];
    const TE: [&str; 4] = ["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING", "Transfer-encoding"];

    impl Req {
        /// The head's lines without their line ends (request line first; no empty line).
        fn head_lines(&self, ambiguous: Option<bool>) -> Vec<String> {
            let method = if matches!(self.body, Body::None) { "GET" } else { "POST" };
            let mut lines = vec![format!("{method} {} HTTP/1.1", self.path)];
            lines.extend(self.headers.iter().cloned());
            let pad = if self.padded { " " } else { "" };
            let cl = |n: usize| format!("{}:{pad}{n}{pad}", CL[self.spelling]);
            let te = |v: &str| format!("{}:{pad}{v}{pad}", TE[self.spelling]);
            match &self.body {
                Body::None => {}
                Body::Length(b) => lines.push(cl(b.len())),
                Body::Chunked { .. } => {
                    lines.push(te(if self.padded { "gzip, chunked" } else { "chunked" }));
                }
            }
            // Both framings at once, the length before or after the chunking.
            if let Some(length_first) = ambiguous {
                let n = lines.len();
                match (&self.body, length_first) {
                    (Body::Chunked { .. }, true) => lines.insert(1, cl(4)),
                    (Body::Chunked { .. }, false) => lines.insert(n, cl(4)),
                    (Body::Length(_), true) => lines.insert(n, te("chunked")),
                    (Body::Length(_), false) => lines.insert(1, te("chunked")),
                    (Body::None, length_first) => {
                        let (a, b) = if length_first { (cl(0), te("chunked")) } else { (te("chunked"), cl(0)) };
                        lines.extend([a, b]);
                    }
                }
            }
            lines
        }

        fn body_bytes(&self) -> Vec<u8> {
            match &self.body {
                Body::None => Vec::new(),
                Body::Length(b) => b.clone(),
                Body::Chunked { chunks, last_ext, trailers } => {
                    let mut out = Vec::new();
                    for (data, upper, ext) in chunks {
                        let size = if *upper { format!("{:X}", data.len()) } else { format!("{:x}", data.len()) };
                        out.extend_from_slice(format!("{size}{}\r\n", ext.as_deref().unwrap_or("")).as_bytes());
                        out.extend_from_slice(data);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(format!("0{}\r\n", last_ext.as_deref().unwrap_or("")).as_bytes());
                    for t in trailers {
                        out.extend_from_slice(format!("{t}\r\n").as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                    out
                }
            }
        }

        /// The request on the wire; `bare_lf` makes the line end of that head line (the empty
        /// line counting as the last) a bare LF. Returns the bytes and, for a refused request,
        /// where the refusal takes effect (what follows passes as it is).
        fn wire(&self, ambiguous: Option<bool>, bare_lf: Option<prop::sample::Index>) -> (Vec<u8>, Option<usize>) {
            let mut lines = self.head_lines(ambiguous);
            lines.push(String::new());
            let bare = bare_lf.map(|i| i.index(lines.len()));
            let mut out = Vec::new();
            if self.leading_crlf {
                out.extend_from_slice(b"\r\n");
            }
            let mut refused_at = None;
            for (i, line) in lines.iter().enumerate() {
                out.extend_from_slice(line.as_bytes());
                if bare == Some(i) {
                    out.push(b'\n');
                    refused_at = Some(out.len());
                } else {
                    out.extend_from_slice(b"\r\n");
                }
            }
            if ambiguous.is_some() && refused_at.is_none() {
                refused_at = Some(out.len());
            }
            out.extend_from_slice(&self.body_bytes());
            (out, refused_at)
        }
    }

    fn arb_ext() -> impl Strategy<Value = Option<String>> {
        prop::option::of(
            prop::sample::select(vec![";a=1", ";name", ";a=\"q s\";b", " ;x", "\t;y=2", ";"]).prop_map(String::from),
        )
    }

    fn arb_req() -> impl Strategy<Value = Req> {
        let header = prop_oneof![
            Just("Host: x".to_string()),
            "[A-Za-z-]{1,12}: [ -~]{0,16}".prop_map(|h| h.trim_end().to_string()),
            Just("Upgrade-Insecure-Requests: 1".to_string()),
            Just("Content-Type: text/plain".to_string()),
            Just("TE: trailers".to_string()),
            Just("Content-Lengthy: 7".to_string()),
            Just("Transfer-Encodings: chunked".to_string()),
        ]
        .prop_filter("not a framing header", |h| {
            let l = h.to_ascii_lowercase();
            !l.starts_with("content-length:") && !l.starts_with("transfer-encoding:") && !l.starts_with("upgrade:")
        });
        let data = prop_oneof![
            prop::collection::vec(any::<u8>(), 1..24),
            prop::sample::select(vec![b"GET / HTTP/1.1\r\n\r\n".to_vec(), b"\n\n\r\n".to_vec(), b"0\r\n\r\n".to_vec()]),
        ];
        let body = prop_oneof![
            2 => Just(Body::None),
            2 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Body::Length),
            1 => data.clone().prop_map(Body::Length),
            2 => (
                prop::collection::vec((data, any::<bool>(), arb_ext()), 0..4),
                arb_ext(),
                prop::collection::vec("X-[A-Za-z]{1,6}: [ -~]{0,8}".prop_map(|t| t.trim_end().to_string()), 0..3),
            )
                .prop_map(|(chunks, last_ext, trailers)| Body::Chunked { chunks, last_ext, trailers }),
        ];
        (
            prop::bool::weighted(0.1),
            "/[a-z0-9/._%-]{0,12}",
            prop::collection::vec(header, 0..4),
            0..CL.len(),
            any::<bool>(),
            body,
        )
            .prop_map(|(leading_crlf, path, headers, spelling, padded, body)| Req {
                leading_crlf,
                path,
                headers,
                spelling,
                padded,
                body,
            })
    }

    /// Where to cut the byte stream into reads.
    #[derive(Debug, Clone)]
    enum Split {
        Bytes,
        /// At each request's end (a head with nothing after it is read whole).
        Requests,
        At(Vec<prop::sample::Index>),
    }

    fn arb_split() -> impl Strategy<Value = Split> {
        prop_oneof![
            1 => Just(Split::Bytes),
            1 => Just(Split::Requests),
            4 => prop::collection::vec(any::<prop::sample::Index>(), 0..12).prop_map(Split::At),
        ]
    }

    fn pieces(input: &[u8], boundaries: &[usize], split: &Split) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = match split {
            Split::Bytes => (1..input.len()).collect(),
            Split::Requests => boundaries.to_vec(),
            Split::At(at) => at.iter().map(|i| i.index(input.len() + 1)).collect(),
        };
        cuts.extend([0, input.len()]);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2).map(|w| input[w[0]..w[1]].to_vec()).collect()
    }

    /// A peer whose bytes arrive in the given pieces, one read each (at most).
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some(front) = self.0.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.drain(..n);
                if front.is_empty() {
                    self.0.pop_front();
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper reads through ClientIo, in reads of `read_size`, and what the framing state
    /// machine alone lets through for the same pieces.
    fn read_both(pieces: Vec<Vec<u8>>, read_size: usize) -> (Vec<u8>, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let (mut framing, mut processed) = (Framing::new(64 * 1024), Vec::new());
        for p in &pieces {
            framing.process(p, &mut processed);
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let read = rt.block_on(async {
            let mut io = ClientIo::new(Pieces(pieces.into_iter().filter(|p| !p.is_empty()).collect()), 64 * 1024);
            let (mut out, mut buf) = (Vec::new(), vec![0; read_size]);
            loop {
                let n = io.read(&mut buf).await.unwrap();
                if n == 0 {
                    break out;
                }
                out.extend_from_slice(&buf[..n]);
            }
        });
        (read, processed)
    }

    fn wire_of(reqs: &[Req]) -> (Vec<u8>, Vec<usize>) {
        let (mut input, mut boundaries) = (Vec::new(), Vec::new());
        for r in reqs {
            input.extend_from_slice(&r.wire(None, None).0);
            boundaries.push(input.len());
        }
        (input, boundaries)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn well_formed_requests_reach_hyper_unchanged_however_the_stream_is_split(
            reqs in prop::collection::vec(arb_req(), 1..5),
            split in arb_split(),
            read_size in prop::sample::select(vec![7usize, 64, 4096]),
        ) {
            let (input, boundaries) = wire_of(&reqs);
            let (read, processed) = read_both(pieces(&input, &boundaries, &split), read_size);
            prop_assert_eq!(&read, &input, "{:?}", String::from_utf8_lossy(&read));
            prop_assert_eq!(&processed, &input);
        }

        #[test]
        fn an_ambiguous_head_is_replaced_by_the_refusal_however_the_stream_is_split(
            before in prop::collection::vec(arb_req(), 0..3),
            bad in arb_req(),
            // Some(length first): both Content-Length and Transfer-Encoding; None: a bare LF.
            both in prop::option::of(any::<bool>()),
            bare_lf in any::<prop::sample::Index>(),
            after in prop::collection::vec(arb_req(), 0..2),
            split in arb_split(),
            read_size in prop::sample::select(vec![7usize, 64, 4096]),
        ) {
            let (mut input, mut boundaries) = wire_of(&before);
            let (bad_wire, refused_at) = match both {
                Some(length_first) => bad.wire(Some(length_first), None),
                None => bad.wire(None, Some(bare_lf)),
            };
            let refused_at = input.len() + refused_at.expect("refused");
            let head_start = input.len();
            input.extend_from_slice(&bad_wire);
            boundaries.push(input.len());
            let (rest, _) = wire_of(&after);
            input.extend_from_slice(&rest);

            // Before it, intact (the empty line before its request line too); the bad head, up
            // to where it is refused, replaced; after that, passed as it is.
            let leading = if bad.leading_crlf { 2 } else { 0 };
            let expected = [&input[..head_start + leading], REFUSED, &input[refused_at..]].concat();
            let (read, processed) = read_both(pieces(&input, &boundaries, &split), read_size);
            prop_assert_eq!(&read, &expected, "{:?}", String::from_utf8_lossy(&read));
            prop_assert_eq!(&processed, &expected);
        }
    }
}
