//! Strict request framing, in front of hyper. hyper's parser is lenient in two ways a
//! front-end proxy should not be: it accepts a bare LF as a line end, and it resolves a
//! request carrying both `Content-Length` and `Transfer-Encoding` by dropping the length.
//! Both are classic request-smuggling ingredients, so lotecache refuses them.
//!
//! [`StrictIo`] wraps a client connection and follows its HTTP/1.1 framing while bytes flow
//! to hyper: each request head is held until complete and checked; bodies (by length or
//! chunked) pass through untouched, then the next head. A head that fails the check is
//! replaced by a line no HTTP parser accepts, so hyper answers `400` and closes the
//! connection, exactly as for its own parse errors. Anything the wrapper cannot follow
//! (a malformed chunk, a protocol upgrade) is left to hyper, which rejects or closes.
//!
//! hyper answers a head it cannot parse (or one refused here) itself, with a bare status line
//! and no body, and no hook to change that. So the write side recognises that answer (see
//! `parser_answer`) and sends the proxy's JSON error and log line in its place.
//!
//! On the write side it sends registered file regions with `sendfile` (see
//! [`crate::sendfile`]) and everything else as it is.

use crate::upstream::AfterAnswer;
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper sees instead of a refused head: not a request line.
const REFUSED: &[u8] = b"\x00 refused by lotecache: ambiguous framing\r\n\r\n";

/// Where the connection's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head (held back until complete).
    Head,
    /// Inside a body of known length: this many bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Framing no longer followed: bytes pass as they are (hyper decides).
    Opaque,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (size so far, whether in an extension).
    Size { size: u64, digits: bool, ext: bool },
    /// Chunk data left, then its CRLF.
    Data(u64),
    /// The CRLF after chunk data: bytes still expected.
    DataEnd(u8),
    /// Trailer section after the last chunk: at a line start, and the current line's length.
    Trailers { line_len: usize },
}

/// A client connection whose request framing is checked before hyper parses it.
pub struct StrictIo<S> {
    inner: S,
    state: State,
    /// The head being collected, not yet shown to hyper.
    head: Vec<u8>,
    /// Bytes checked and ready for hyper.
    ready: Vec<u8>,
    ready_pos: usize,
    /// A head longer than this is passed on as is, for hyper to refuse (431).
    max_head: usize,
    /// Why the last head was refused here, for the answer's detail.
    refused: Option<&'static str>,
    /// The JSON answer replacing hyper's bare one, and how much of it is written.
    answer: Vec<u8>,
    answer_pos: usize,
    /// Origin connections ended while serving this client, closed once an answer is flushed
    /// (see [`crate::upstream`]).
    after_answer: Option<Arc<AfterAnswer>>,
    /// The connection's count of bytes its socket accepted (the access log's).
    written: Option<Arc<crate::access_log::Written>>,
}

impl<S> StrictIo<S> {
    pub fn new(inner: S, max_head: usize) -> Self {
        StrictIo {
            inner,
            state: State::Head,
            head: Vec::new(),
            ready: Vec::new(),
            ready_pos: 0,
            max_head,
            refused: None,
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
    pub fn with_written(mut self, written: Arc<crate::access_log::Written>) -> Self {
        self.written = Some(written);
        self
    }

    fn count(&self, polled: &Poll<io::Result<usize>>) {
        if let (Some(w), Poll::Ready(Ok(n))) = (&self.written, polled) {
            w.wrote(*n);
        }
    }

    /// Runs `input` through the framing state machine, appending what hyper may see to
    /// `self.ready`.
    fn process(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    self.ready.extend_from_slice(input);
                    return;
                }
                State::Body(left) => {
                    let n = (left as usize).min(input.len());
                    self.ready.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n as u64 { State::Head } else { State::Body(left - n as u64) };
                }
                State::Head => {
                    // Up to and including the next LF, or all of it: one line at a time.
                    let (line, rest) = match input.iter().position(|&b| b == b'\n') {
                        Some(i) => input.split_at(i + 1),
                        None => (input, &input[input.len()..]),
                    };
                    input = rest;
                    self.head.extend_from_slice(line);
                    if line.last() == Some(&b'\n') {
                        let len = self.head.len();
                        if len < 2 || self.head[len - 2] != b'\r' {
                            // A bare LF (the blank lines before a request, allowed by RFC
                            // 9112 §2.2, are tolerated as CRLF only).
                            self.refuse("ambiguous framing: a line of the request head ends in a bare LF");
                            continue;
                        }
                        if len == 2 {
                            // An empty line before the request line: pass it on, keep reading.
                            self.ready.extend_from_slice(&self.head);
                            self.head.clear();
                        } else if self.head.ends_with(b"\r\n\r\n") {
                            self.end_of_head();
                        }
                    } else if self.head.len() > self.max_head {
                        self.ready.extend_from_slice(&self.head);
                        self.head.clear();
                        self.state = State::Opaque;
                    }
                }
                State::Chunked(c) => {
                    input = self.chunked(c, input);
                }
            }
        }
    }

    /// A complete head: check it, release it (or its refusal), and set the body framing.
    fn end_of_head(&mut self) {
        match framing(&self.head) {
            Err(why) => self.refuse(why),
            Ok(state) => {
                self.ready.extend_from_slice(&self.head);
                // Cleared, not taken: the next request's head reuses the allocation.
                self.head.clear();
                self.state = state;
            }
        }
    }

    /// Replaces the head being collected with a line hyper refuses, and stops following. The
    /// log line and the JSON answer (with `why`) come when hyper answers it.
    fn refuse(&mut self, why: &'static str) {
        self.refused = Some(why);
        self.head.clear();
        self.ready.extend_from_slice(REFUSED);
        self.state = State::Opaque;
    }

    /// Follows a chunked body; returns the input not consumed.
    fn chunked<'a>(&mut self, c: Chunk, input: &'a [u8]) -> &'a [u8] {
        match c {
            Chunk::Data(left) => {
                let n = (left as usize).min(input.len());
                self.ready.extend_from_slice(&input[..n]);
                self.state =
                    State::Chunked(if left == n as u64 { Chunk::DataEnd(2) } else { Chunk::Data(left - n as u64) });
                &input[n..]
            }
            _ => {
                let b = input[0];
                self.ready.push(b);
                self.state = match (c, b) {
                    (Chunk::Size { size, ext: false, .. }, _) if b.is_ascii_hexdigit() && size >> 60 == 0 => {
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        State::Chunked(Chunk::Size { size: size * 16 + d, digits: true, ext: false })
                    }
                    (Chunk::Size { size, digits: true, .. }, b';' | b' ' | b'\t') => {
                        State::Chunked(Chunk::Size { size, digits: true, ext: true })
                    }
                    (Chunk::Size { size, digits: true, ext }, b'\r') => {
                        State::Chunked(Chunk::Size { size, digits: true, ext })
                    }
                    (Chunk::Size { size: 0, digits: true, .. }, b'\n') => {
                        State::Chunked(Chunk::Trailers { line_len: 0 })
                    }
                    (Chunk::Size { size, digits: true, .. }, b'\n') => State::Chunked(Chunk::Data(size)),
                    (Chunk::Size { size, digits: true, ext: true }, _) => {
                        State::Chunked(Chunk::Size { size, digits: true, ext: true })
                    }
                    (Chunk::DataEnd(2), b'\r') => State::Chunked(Chunk::DataEnd(1)),
                    (Chunk::DataEnd(1), b'\n') => State::Chunked(Chunk::Size { size: 0, digits: false, ext: false }),
                    (Chunk::Trailers { line_len: 0 }, b'\n') => State::Head,
                    (Chunk::Trailers { line_len }, b'\n') if line_len > 0 => {
                        State::Chunked(Chunk::Trailers { line_len: 0 })
                    }
                    (Chunk::Trailers { line_len }, b'\r') => State::Chunked(Chunk::Trailers { line_len }),
                    (Chunk::Trailers { line_len }, _) => State::Chunked(Chunk::Trailers { line_len: line_len + 1 }),
                    // Malformed chunking: hyper reports it as a body error (400); stop following.
                    _ => State::Opaque,
                };
                &input[1..]
            }
        }
    }
}

/// Checks a complete request head (request line to the empty line) and gives the framing of
/// what follows it, or why the head is refused.
fn framing(head: &[u8]) -> Result<State, &'static str> {
    let mut framing = HeadFraming::default();
    for line in head.split(|&b| b == b'\n').skip(1) {
        framing.header_line(line.strip_suffix(b"\r").unwrap_or(line));
    }
    framing.finish(head)
}

/// [`framing`] of `input` if it is exactly one request head: a request line and header lines
/// each ending in CRLF (no bare LF, no empty line before the request line), then the empty
/// line, and nothing after it. One pass over the bytes.
fn one_whole_head_framing(input: &[u8]) -> Option<Result<State, &'static str>> {
    let mut rest = input.strip_suffix(b"\r\n")?;
    let mut framing = HeadFraming::default();
    let mut request_line = true;
    while !rest.is_empty() {
        let lf = rest.iter().position(|&b| b == b'\n')?;
        // A bare LF, or an empty line (the head's end, before the end of the input).
        if lf < 2 || rest[lf - 1] != b'\r' {
            return None;
        }
        if !request_line {
            framing.header_line(&rest[..lf - 1]);
        }
        request_line = false;
        rest = &rest[lf + 1..];
    }
    (!request_line).then(|| framing.finish(input))
}

/// The framing headers of a request head, read line by line.
#[derive(Default)]
struct HeadFraming {
    /// `u64::MAX` for a value that is not a number.
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    upgrade: bool,
}

impl HeadFraming {
    /// Takes one header line (without its line end).
    fn header_line(&mut self, line: &[u8]) {
        let value = |v: &[u8]| String::from_utf8_lossy(v).trim().to_ascii_lowercase();
        // The value after `name:` if `line` is that header (a name is followed by its colon at
        // once: no space is allowed between them).
        let field = |name: &[u8]| -> Option<String> {
            let (n, rest) = line.split_at_checked(name.len())?;
            (n.eq_ignore_ascii_case(name) && rest.first() == Some(&b':')).then(|| value(&rest[1..]))
        };
        // Only the framing headers are looked at: the first letter rules out most lines, and
        // only their values are allocated.
        match line.first().map(u8::to_ascii_lowercase) {
            Some(b'c') => {
                if let Some(v) = field(b"content-length") {
                    self.content_length = v.parse::<u64>().ok().or(Some(u64::MAX));
                }
            }
            Some(b't') => {
                if let Some(v) = field(b"transfer-encoding") {
                    self.transfer_encoding = true;
                    self.chunked = v.rsplit(',').next().is_some_and(|last| last.trim() == "chunked");
                }
            }
            Some(b'u') => self.upgrade |= field(b"upgrade").is_some(),
            _ => {}
        }
    }

    /// The framing of what follows `head`, or why it is refused.
    fn finish(self, head: &[u8]) -> Result<State, &'static str> {
        let HeadFraming { content_length, transfer_encoding, chunked, upgrade } = self;
        if transfer_encoding && content_length.is_some() {
            return Err("ambiguous framing: Content-Length together with Transfer-Encoding");
        }
        let connect = head.starts_with(b"CONNECT ");
        Ok(if upgrade || connect || (transfer_encoding && !chunked) || content_length == Some(u64::MAX) {
            // hyper refuses these or takes the connection over: stop following it.
            State::Opaque
        } else if chunked {
            State::Chunked(Chunk::Size { size: 0, digits: false, ext: false })
        } else {
            match content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StrictIo<S> {
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
            if this.state == State::Opaque && this.head.is_empty() {
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
                    // End of stream: a partial head goes to hyper as it is (it reports it).
                    let rest = std::mem::take(&mut this.head);
                    this.ready.extend_from_slice(&rest);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    let input = &buf.filled()[before..];
                    // The common read: one whole head, nothing held back or queued. Checked
                    // where it lies, it stays in the caller's buffer (no copies through ours).
                    if this.state == State::Head && this.head.is_empty() && this.ready.is_empty() {
                        if let Some(Ok(state)) = one_whole_head_framing(input) {
                            this.state = state;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    this.process(input);
                    buf.set_filled(before);
                }
            }
        }
    }
}

/// A socket that can also send file ranges without copying them (see [`crate::sendfile`]).
pub trait ZeroCopySocket: AsyncWrite + Unpin + std::os::fd::AsRawFd {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_send(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
}

impl ZeroCopySocket for tokio::net::TcpStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }

    fn try_send(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, f)
    }
}

impl<S: ZeroCopySocket> StrictIo<S> {
    /// Sends `len` bytes of a registered file region with `sendfile`.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        region: &crate::sendfile::Region,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_writable(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.inner.try_send(|| crate::sendfile::send(&self.inner, region, offset, len)) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // try_io cleared the readiness: wait for the socket again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// If `bytes` is hyper's own answer to a request head it could not parse, the JSON answer that
/// replaces it (the error is logged). hyper's answer is a status line of 400, 414 or 431 with
/// only `content-length: 0` and `date` (and perhaps `connection`), written alone: every
/// response of this proxy carries a header more (`content-type`, `via`), so none is mistaken
/// for it. Cheap for everything else: most writes fail the first ten bytes.
fn parser_answer(bytes: &[u8], refused: Option<&'static str>) -> Option<Vec<u8>> {
    if bytes.len() < 12 || !bytes.starts_with(b"HTTP/1.1 4") || !matches!(&bytes[9..12], b"400" | b"414" | b"431") {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; 4];
    let mut parsed = httparse::Response::new(&mut headers);
    if parsed.parse(bytes) != Ok(httparse::Status::Complete(bytes.len())) {
        return None;
    }
    let mut date = None;
    for h in parsed.headers.iter() {
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" if h.value == b"0" => {}
            "connection" => {}
            "date" => date = Some(h.value),
            _ => return None,
        }
    }
    let date = date?;
    let status = http::StatusCode::from_u16(parsed.code?).ok()?;
    let detail = match (refused, status.as_u16()) {
        (Some(why), _) => why,
        (None, 414) => "the request target is too long",
        (None, 431) => "the request head is larger than server.max_header_bytes",
        _ => "the request line or a header is not valid HTTP/1.1, or the framing headers conflict",
    };
    let body = crate::error::ProxyError::MalformedHead { status, detail: detail.to_string() }.logged_json_body();
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\n\
         content-length: {}\r\ndate: ",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(date);
    answer.extend_from_slice(b"\r\n\r\n");
    answer.extend_from_slice(body.as_bytes());
    Some(answer)
}

impl<S: AsyncWrite + Unpin> StrictIo<S> {
    /// Takes `bytes` in place of hyper's bare parse-error answer if that is what they are (the
    /// JSON answer is then queued); false for anything else.
    fn replaced_parser_answer(&mut self, bytes: &[u8]) -> bool {
        match parser_answer(bytes, self.refused) {
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

impl<S> Drop for StrictIo<S> {
    fn drop(&mut self) {
        if let Some(w) = &self.written {
            w.closed();
        }
    }
}

impl<S: ZeroCopySocket> AsyncWrite for StrictIo<S> {
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

impl<S: ZeroCopySocket> StrictIo<S> {
    fn poll_write_counted(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some((region, offset)) = crate::sendfile::lookup(buf) {
            return self.poll_sendfile(cx, &region, offset, buf.len());
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
        if let Some((region, offset)) = crate::sendfile::lookup(&bufs[first]) {
            return self.poll_sendfile(cx, &region, offset, bufs[first].len());
        }
        if bufs[first + 1..].iter().all(|b| b.is_empty()) && self.replaced_parser_answer(&bufs[first]) {
            return Poll::Ready(Ok(bufs[first].len()));
        }
        std::task::ready!(self.poll_answer(cx))?;
        // Ordinary bytes up to the first file-backed slice go out with one writev.
        let end =
            bufs[first..].iter().position(|b| crate::sendfile::lookup(b).is_some()).map_or(bufs.len(), |p| first + p);
        Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[first..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn held_origin_connections_are_released_when_a_write_is_flushed_not_before() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_side = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let after = Arc::new(AfterAnswer::default());
        let mut io = StrictIo::new(client, 64 * 1024).with_after_answer(after.clone());
        // A single-threaded runtime: nothing but the flush releases it (no backstop timer).
        after.hold(origin_side);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        assert_eq!(after.held(), 1, "written, not yet flushed");
        io.flush().await.unwrap();
        assert_eq!(after.held(), 0);
    }

    /// What hyper would see for `input` fed in pieces of `step` bytes.
    fn seen(input: &[u8], step: usize) -> Vec<u8> {
        let mut s = StrictIo::new((), 64 * 1024);
        for piece in input.chunks(step) {
            s.process(piece);
        }
        std::mem::take(&mut s.ready)
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

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Thu, 26 Nov 2026 09:30:00 GMT\r\n\r\n";

    #[test]
    fn hypers_bare_parse_error_answer_becomes_a_json_error_with_its_date() {
        let answer = String::from_utf8(parser_answer(HYPER_400, None).expect("recognised")).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(head.contains("\r\ndate: Thu, 26 Nov 2026 09:30:00 GMT"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "malformed request head");
        assert!(json["detail"].as_str().unwrap().contains("not valid HTTP/1.1"), "{json}");

        let too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(parser_answer(too_large, None).expect("recognised")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{answer}");
        assert!(answer.contains("server.max_header_bytes"), "{answer}");
    }

    #[test]
    fn a_refusal_made_here_gives_its_reason_in_the_answer() {
        let answer = String::from_utf8(parser_answer(HYPER_400, Some("ambiguous framing: why")).unwrap()).unwrap();
        let json: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(json["detail"], "ambiguous framing: why");
    }

    #[test]
    fn responses_of_the_proxy_and_bodies_are_never_taken_for_the_parsers_answer() {
        for bytes in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\ndate: x\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\nvia: 1.1 lotecache\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\ndate: x\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"{\"metadata\": {}}",
        ] {
            assert!(parser_answer(bytes, None).is_none(), "{}", String::from_utf8_lossy(bytes));
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
        let mut io = StrictIo::new(first.chain(rest), 64 * 1024);
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

    /// What hyper reads through StrictIo, in reads of `read_size`, and what the framing state
    /// machine alone lets through for the same pieces.
    fn read_both(pieces: Vec<Vec<u8>>, read_size: usize) -> (Vec<u8>, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut s = StrictIo::new((), 64 * 1024);
        for p in &pieces {
            s.process(p);
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let read = rt.block_on(async {
            let mut io = StrictIo::new(Pieces(pieces.into_iter().filter(|p| !p.is_empty()).collect()), 64 * 1024);
            let (mut out, mut buf) = (Vec::new(), vec![0; read_size]);
            loop {
                let n = io.read(&mut buf).await.unwrap();
                if n == 0 {
                    break out;
                }
                out.extend_from_slice(&buf[..n]);
            }
        });
        (read, std::mem::take(&mut s.ready))
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
