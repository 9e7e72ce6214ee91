//! The last line of defence for log lines: whatever a field holds (a batch id an
//! `id_pattern` let through, an origin's error text, a header value), no control character
//! reaches the log raw, so a client can never start a forged line or move a terminal's
//! cursor. Every writer the log formatter writes to is wrapped here.
//!
//! The formatter writes each event with one `write` of a whole line ending in `\n`: that
//! final newline is kept, every other control character is written as an escape (`\n`,
//! `\r`, `\t`, `\u{1b}`, …). ESC is kept only when colours are on (they are ours, and only
//! on a terminal).

use std::io::{self, Write};
use tracing_subscriber::fmt::MakeWriter;

/// Wraps a [`MakeWriter`] so that its writers escape control characters.
#[derive(Clone)]
pub struct Escaping<M> {
    inner: M,
    keep_esc: bool,
}

impl<M> Escaping<M> {
    pub fn new(inner: M, keep_esc: bool) -> Self {
        Escaping { inner, keep_esc }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter { inner: self.inner.make_writer(), keep_esc: self.keep_esc }
    }
}

/// A writer that escapes control characters; see the module docs.
pub struct EscapingWriter<W> {
    inner: W,
    keep_esc: bool,
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape(buf, self.keep_esc))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `buf` with every control character but a final `\n` (and ESC when `keep_esc`) escaped.
/// Borrowed work is avoided only when nothing needs escaping, the common case.
pub fn escape(buf: &[u8], keep_esc: bool) -> std::borrow::Cow<'_, [u8]> {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let raw = |b: u8| (b < 0x20 || b == 0x7f) && !(keep_esc && b == 0x1b);
    if !body.iter().any(|&b| raw(b)) {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if raw(b) => out.extend_from_slice(format!("\\u{{{b:x}}}").as_bytes()),
            b => out.push(b),
        }
    }
    if body.len() < buf.len() {
        out.push(b'\n');
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn a_line_keeps_its_final_newline_and_nothing_else_raw() {
        assert_eq!(
            &*escape(b"id=A\r\nINJECTED fake\x1b[2J\x00 end\n", false),
            &b"id=A\\r\\nINJECTED fake\\u{1b}[2J\\u{0} end\n"[..]
        );
        assert_eq!(&*escape(b"plain line\n", false), b"plain line\n");
        assert_eq!(&*escape(b"\x1b[32mINFO\x1b[0m x\n", true), b"\x1b[32mINFO\x1b[0m x\n");
        assert_eq!(&*escape(b"tab\there", true), b"tab\\there");
    }
}
