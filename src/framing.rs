//! Strict request framing, the pure part: a state machine that follows a client connection's
//! HTTP/1.1 byte stream (heads, bodies by length or chunked, trailers) and decides what hyper
//! may see. No I/O: [`crate::server::client_io`] feeds it the bytes a socket read.
//!
//! hyper's parser is lenient in two ways a front-end proxy should not be: it accepts a bare LF
//! as a line end, and it resolves a request carrying both `Content-Length` and
//! `Transfer-Encoding` by dropping the length. Both are classic request-smuggling ingredients, so
//! lotecache refuses them: each request head is held until complete and checked; bodies pass
//! through untouched, then the next head. A head that fails the check is replaced by a line no
//! HTTP parser accepts ([`REFUSED`]), so hyper answers `400` and closes the connection, exactly as
//! for its own parse errors. Anything the machine cannot follow (a malformed chunk, a protocol
//! upgrade) is left to hyper, which rejects or closes.

/// What hyper sees instead of a refused head: not a request line.
pub const REFUSED: &[u8] = b"\x00 refused by lotecache: ambiguous framing\r\n\r\n";

/// Where the connection's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
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
pub enum Chunk {
    /// Reading a chunk-size line (size so far, whether in an extension).
    Size { size: u64, digits: bool, ext: bool },
    /// Chunk data left, then its CRLF.
    Data(u64),
    /// The CRLF after chunk data: bytes still expected.
    DataEnd(u8),
    /// Trailer section after the last chunk: at a line start, and the current line's length.
    Trailers { line_len: usize },
}

/// The framing state of one client connection.
pub struct Framing {
    state: State,
    /// The head being collected, not yet shown to hyper.
    head: Vec<u8>,
    /// A head longer than this is passed on as is, for hyper to refuse (431).
    max_head: usize,
    /// Why the last head was refused here, for the answer's detail.
    refused: Option<&'static str>,
}

impl Framing {
    pub fn new(max_head: usize) -> Self {
        Framing { state: State::Head, head: Vec::new(), max_head, refused: None }
    }

    /// Why the last head was refused here, if one was.
    pub fn refused(&self) -> Option<&'static str> {
        self.refused
    }

    /// Whether bytes now pass as they are: framing no longer followed, nothing held back.
    pub fn passes_through(&self) -> bool {
        self.state == State::Opaque && self.head.is_empty()
    }

    /// Takes `input` where it lies if it is exactly one whole, well-formed request head read at
    /// the start of a head with nothing held back: the common read, checked without copying.
    /// False for anything else (feed it to [`Framing::process`] instead).
    pub fn take_whole_head(&mut self, input: &[u8]) -> bool {
        if self.state != State::Head || !self.head.is_empty() {
            return false;
        }
        match one_whole_head_framing(input) {
            Some(Ok(state)) => {
                self.state = state;
                true
            }
            _ => false,
        }
    }

    /// The stream ended: a partial head goes to hyper as it is (it reports it).
    pub fn end_of_stream(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.head);
    }

    /// Runs `input` through the framing state machine, appending what hyper may see to
    /// `out`.
    pub fn process(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Body(left) => {
                    let n = (left as usize).min(input.len());
                    out.extend_from_slice(&input[..n]);
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
                            self.refuse("ambiguous framing: a line of the request head ends in a bare LF", out);
                            continue;
                        }
                        if len == 2 {
                            // An empty line before the request line: pass it on, keep reading.
                            out.extend_from_slice(&self.head);
                            self.head.clear();
                        } else if self.head.ends_with(b"\r\n\r\n") {
                            self.end_of_head(out);
                        }
                    } else if self.head.len() > self.max_head {
                        out.extend_from_slice(&self.head);
                        self.head.clear();
                        self.state = State::Opaque;
                    }
                }
                State::Chunked(c) => {
                    input = self.chunked(c, input, out);
                }
            }
        }
    }

    /// A complete head: check it, release it (or its refusal), and set the body framing.
    fn end_of_head(&mut self, out: &mut Vec<u8>) {
        match framing(&self.head) {
            Err(why) => self.refuse(why, out),
            Ok(state) => {
                out.extend_from_slice(&self.head);
                // Cleared, not taken: the next request's head reuses the allocation.
                self.head.clear();
                self.state = state;
            }
        }
    }

    /// Replaces the head being collected with a line hyper refuses, and stops following. The
    /// log line and the JSON answer (with `why`) come when hyper answers it.
    fn refuse(&mut self, why: &'static str, out: &mut Vec<u8>) {
        self.refused = Some(why);
        self.head.clear();
        out.extend_from_slice(REFUSED);
        self.state = State::Opaque;
    }

    /// Follows a chunked body; returns the input not consumed.
    fn chunked<'a>(&mut self, c: Chunk, input: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        match c {
            Chunk::Data(left) => {
                let n = (left as usize).min(input.len());
                out.extend_from_slice(&input[..n]);
                self.state =
                    State::Chunked(if left == n as u64 { Chunk::DataEnd(2) } else { Chunk::Data(left - n as u64) });
                &input[n..]
            }
            _ => {
                let b = input[0];
                out.push(b);
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

/// `framing` of `input` if it is exactly one request head: a request line and header lines
/// each ending in CRLF (no bare LF, no empty line before the request line), then the empty
/// line, and nothing after it. One pass over the bytes.
pub fn one_whole_head_framing(input: &[u8]) -> Option<Result<State, &'static str>> {
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
